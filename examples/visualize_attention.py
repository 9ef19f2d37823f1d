"""Draw where a Vision Transformer looks: the image, its attention map and the overlay, with the top-5 predictions.

    python examples/visualize_attention.py --model DIR_OR_HUB_ID --image PATH_OR_URL --output map.png \
        [--method rollout|last_layer] [--head-fusion mean|max|min] [--discard-ratio R] [--image-size H [W]]

Works for any model `hf_vit` loads (a saved folder, a Hub id, the default sdpa attention included) and at any
resolution that is a multiple of the patch size. Bad input ends with one `error: ...` line and exit status 2, and
leaves no PNG behind.
"""

import argparse
import io
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import huggingface_hub
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

import hf_vit  # noqa: F401  (registers model_type "hf_vit" with the Auto classes)
from hf_vit import image_processor_for
from hf_vit.visualization import (
    HEAD_FUSIONS,
    METHODS,
    grid_of,
    map_from_attentions,
    pixel_values_for,
    plot_attention,
)


class UsageError(Exception):
    """Bad input: reported as one `error: ...` line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a folder saved by save_pretrained, or a Hub id")
    parser.add_argument("--image", required=True, help="a local image file or an http(s) URL")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--method", choices=METHODS, default="rollout")
    parser.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="rollout only, in [0, 1)")
    parser.add_argument(
        "--image-size", type=int, nargs="+", metavar=("H", "W"), help="run at H x W (default: the model's size)"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.discard_ratio < 1.0:
        raise UsageError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}.")
    if args.discard_ratio and args.method != "rollout":
        raise UsageError("--discard-ratio applies to --method rollout only.")
    if args.image_size is not None:
        if len(args.image_size) > 2 or min(args.image_size) <= 0:
            raise UsageError(f"--image-size takes one or two positive ints (H [W]), got {args.image_size}.")
        args.image_size = (args.image_size[0], args.image_size[-1])
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png file, got {args.output!r}.")
    if output.is_dir():
        raise UsageError(f"--output {args.output!r} is a folder, expected a .png file.")
    folder = output.parent.resolve()
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {args.output!r}: {folder} is not a writable folder.")
    return args


def load_image(source: str) -> Image.Image:
    """A local file or an http(s) URL, decoded and converted to RGB."""
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=20) as response:
                image = Image.open(io.BytesIO(response.read()))
        else:
            if not os.path.isfile(source):
                raise UsageError(f"image {source!r} does not exist (expected an image file or an http(s) URL).")
            image = Image.open(source)
        image.load()
    except UsageError:
        raise
    except Exception as error:  # PIL and urllib raise many kinds (UnidentifiedImageError, URLError, timeouts...)
        raise UsageError(f"could not read an image from {source!r}: {_one_line(error)}") from error
    return image.convert("RGB")


def load_model(name: str):
    """The model with its preprocessing: the classifier when the folder has one, else the base model."""
    if os.path.exists(name) and not os.path.isdir(name):
        raise UsageError(f"--model {name!r} is a file, expected a folder saved by save_pretrained or a Hub id.")
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1  # Hub ids are "name" or "namespace/name"
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(
            f"model folder {name!r} does not exist (expected a folder saved by save_pretrained or a Hub id)."
        )
    name = os.path.expanduser(name)
    try:
        config = AutoConfig.from_pretrained(name)
        has_head = not any(arch.endswith("Model") for arch in (config.architectures or []))
        auto_class = AutoModelForImageClassification if has_head else AutoModel
        # hf_vit returns attention probabilities with any implementation; other models need the eager one.
        options = {} if config.model_type == "hf_vit" else {"attn_implementation": "eager"}
        model = auto_class.from_pretrained(name, **options).eval()
    except Exception as error:  # a missing folder, an unreachable Hub, an unknown model type...
        where = "" if os.path.isdir(name) else " (no such folder, so it was looked up on the Hub)"
        raise UsageError(f"could not load model {name!r}{where}: {_one_line(error)}") from error
    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
    except Exception:  # no preprocessor_config.json: the original models' preprocessing
        image_processor = image_processor_for(model.config) if config.model_type == "hf_vit" else None
        if image_processor is None:
            raise UsageError(f"model {name!r} has no preprocessor_config.json to prepare the image with.") from None
    return model, image_processor


def top_predictions(model, logits: torch.Tensor | None, k: int = 5) -> str:
    if logits is None:
        return "no predictions: a base model without a classification head"
    probabilities = logits[0].float().softmax(dim=-1)
    scores, indices = probabilities.topk(min(k, probabilities.numel()))
    names = [str(model.config.id2label.get(index, index))[:40] for index in indices.tolist()]
    width = max(len(name) for name in names)
    return "\n".join(
        f"{rank}. {name:<{width}} {score:6.1%}"
        for rank, (name, score) in enumerate(zip(names, scores.tolist(), strict=True), 1)
    )


def save_png(figure, output: str) -> None:
    """Write next to `output` and rename, so that a failure leaves no half-written PNG."""
    folder = os.path.dirname(os.path.abspath(output))
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            figure.savefig(file, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; a PNG is shared like any output
        os.replace(temporary, output)
    except BaseException:
        os.unlink(temporary)
        raise


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    image = load_image(args.image)
    model, image_processor = load_model(args.model)
    broken = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if broken:
        raise UsageError(
            f"model {args.model!r} has non-finite weights ({len(broken)} tensors, first {broken[0]}): "
            "its attention maps and predictions would be meaningless; re-export or re-train it."
        )
    try:
        pixel_values = pixel_values_for(model, image, image_processor=image_processor, image_size=args.image_size)
        outputs = model(pixel_values, output_attentions=True, interpolate_pos_encoding=True)
        attention = map_from_attentions(
            outputs.attentions,
            grid_size=grid_of(model, pixel_values),
            method=args.method,
            head_fusion=args.head_fusion,
            discard_ratio=args.discard_ratio,
        )[0]
    except ValueError as error:  # e.g. an --image-size that is not a multiple of the patch size
        raise UsageError(_one_line(error)) from error
    logits = getattr(outputs, "logits", None)
    if not torch.isfinite(torch.as_tensor(attention)).all() or (
        logits is not None and not torch.isfinite(logits).all()
    ):
        raise UsageError(
            f"model {args.model!r} gives non-finite {'logits' if logits is not None else 'attentions'} on this "
            "image (an overflow in its dtype?): no map written."
        )
    height, width = pixel_values.shape[-2:]
    title = f"rollout, {args.head_fusion}" if args.method == "rollout" else f"last layer, {args.head_fusion}"
    if args.discard_ratio:
        title += f", discard {args.discard_ratio:g}"
    shown = min(5, logits.shape[-1]) if logits is not None else 0  # what top_predictions lists
    header = f"{args.model} at {height}x{width}" + (f", top-{shown}:" if shown else "")
    caption = header + "\n" + top_predictions(model, logits)
    save_png(plot_attention(image, attention, title=title, caption=caption), args.output)
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # The Hub client logs each retry of an unreachable server; the one error line says what failed.
    huggingface_hub.utils.logging.set_verbosity_error()
    sys.exit(main())
