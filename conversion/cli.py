"""The command lines, thin layers over the API: `hf-vit-convert SOURCE OUTPUT_DIR [options]` (also
`python -m conversion`) over `convert()`, `hf-vit-export MODEL_DIR OUTPUT.npz [options]` over `export_npz()`."""

import argparse
import sys

from .errors import ConversionError


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line too, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="hf-vit-convert",
        description="Convert Google's original ViT checkpoints (vit_jax or big_vision .npz) or a seed *_checkpoint.bin into a "
        "Hub-ready hf_vit folder, verified against a NumPy implementation of the original Flax model.",
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="a local .npz or *_checkpoint.bin, or an official name: ViT-B_16, imagenet21k/ViT-L_16, "
        "imagenet21k+imagenet2012/ViT-B_16-224, or an augreg file name (downloaded into the cache)",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to create (must not exist or be empty)")
    parser.add_argument("--variant", help="e.g. ViT-B_16: cross-check the detected sizes (required for a .bin)")
    parser.add_argument(
        "--image-size", type=int, nargs="+", metavar="N", help="N or H W: resample the position embeddings"
    )
    parser.add_argument(
        "--source-image-size",
        type=int,
        nargs="+",
        metavar="N",
        help="pre-training resolution N or H W, only needed when its patch grid is not square",
    )
    parser.add_argument("--num-heads", type=int, help="heads of a seed .bin whose sizes match no --variant")
    parser.add_argument("--num-labels", type=int, help="new zero-initialised classifier with N classes")
    parser.add_argument("--labels", help="class names: a file with one per line, 'imagenet-1k' or 'imagenet-21k'")
    parser.add_argument(
        "--keep-pre-logits", action="store_true", help="keep pre_logits when --num-labels replaces the head"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--export",
        default="hf_vit",
        choices=("hf_vit", "transformers-vit"),
        help="transformers-vit: a folder for stock transformers.ViTForImageClassification (no remote code; a feature "
        "extractor with pre_logits becomes ViTModel, pre_logits its pooler)",
    )
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    parser.add_argument("--verify-images", type=int, default=2, help="random inputs used by verification")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write onnx/model.onnx, checked with ONNX Runtime (needs hf_vit[onnx])",
    )
    parser.add_argument(
        "--onnx-quantize", action="store_true", help="also write onnx/model_quantized.onnx (int8 dynamic quantization)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="shard model.safetensors above this size")
    parser.add_argument("--cache-dir", help="where official checkpoints are downloaded (default: ~/.cache/hf_vit)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="create REPO_ID and upload once verification passed")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", help="branch to upload to (created if needed)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def _run(call) -> int:
    """Bad input is one line on stderr and exit 2, an interrupt exit 130; nothing was written either way."""
    try:
        call()
    except ConversionError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, whatever the message held
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .converter import convert

    def one(values):
        return None if values is None else (values[0] if len(values) == 1 else values)

    options = {k: v for k, v in vars(args).items() if k not in ("source", "output_dir", "quiet")}
    options.update(image_size=one(args.image_size), source_image_size=one(args.source_image_size))
    log = None if args.quiet else print
    return _run(lambda: convert(args.source, args.output_dir, **options, progress=not args.quiet, log=log))


def build_export_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="hf-vit-export",
        description="Write an hf_vit model folder as an original .npz (vit_jax or big_vision layout), verified first: "
        "the NumPy reference of the Flax model run on the written arrays must give the model's logits in float64.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an hf_vit folder (hf-vit-convert, fine-tuning, ...)")
    parser.add_argument("output", metavar="OUTPUT.npz", help="the file to write (its folder must exist)")
    parser.add_argument(
        "--layout",
        default="vit_jax",
        choices=("vit_jax", "big_vision"),
        help="vit_jax: what vit_jax.checkpoint.load reads (the default; hybrids only in this one); big_vision: "
        "params/ prefix, Linen names, pos_embedding without the class token's row",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--verify-images", type=int, default=2, help="random inputs used by verification")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT.npz")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    args = build_export_parser().parse_args(argv)
    from .export import export_npz

    options = dict(layout=args.layout, dtype=args.dtype, overwrite=args.overwrite, verify_images=args.verify_images)
    return _run(lambda: export_npz(args.model_dir, args.output, **options, log=None if args.quiet else print))


if __name__ == "__main__":
    sys.exit(main())
