"""
ONNX export of a ViT image classifier, verified with ONNX Runtime: `onnx/model.onnx` (float32, dynamic batch) and, on
request, `onnx/model_quantized.onnx` (int8 weights, `onnxruntime.quantization.quantize_dynamic`) in the model folder,
the layout transformers.js and optimum read. Where OpenVINO is installed (the `openvino` extra), `onnx/model.onnx` is
checked under it too: f32 against the same bound as ONNX Runtime, bf16 (`INFERENCE_PRECISION_HINT`) reported.

Works for hf_vit folders and for stock `transformers.ViTForImageClassification` folders (e.g. `hf-vit-convert ...
--export transformers-vit`): anything `AutoModelForImageClassification` loads completely (every weight of the folder
used, none new) whose forward returns `.logits`; a base model such as transformers' `ViTModel` is refused.
Needs the `onnx` extra (`pip install 'hf_vit[onnx]'`: onnx, onnxruntime, onnxscript).

    python -m hf_vit.onnx_export MODEL_DIR [--quantize]
"""

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import VisionTransformerConfig  # noqa: F401  (importing hf_vit registers it with the Auto classes)
from .configuration_hf_vit import _as_pair
from .verification import VerificationError, check_drift, drift_bound, relative_difference, verification_images


ONNX_DIR = "onnx"
FP32_FILE, INT8_FILE = "model.onnx", "model_quantized.onnx"
# Above this many bytes of weights the tensors go to `<file>.data` beside the graph (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_500_000_000
CARD_HEADING = "## ONNX"


class OnnxExportError(ValueError):
    """An export that cannot be made or does not match PyTorch: one line saying what and what to do."""


class _Logits(nn.Module):
    """The classifier with one tensor in (`pixel_values`) and one out (`logits`), as the ONNX graph has them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def require_onnx():
    try:
        import onnx  # noqa: PLC0415, F401
        import onnxruntime  # noqa: PLC0415
        import onnxscript  # noqa: PLC0415, F401
    except ImportError as error:
        raise OnnxExportError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({error.name} is missing): "
            "pip install 'hf_vit[onnx]'."
        ) from None
    return onnxruntime


def openvino_or_none():
    """The `openvino` module, or None where it is not installed (its check is then left out, and said so)."""
    try:
        import openvino  # noqa: PLC0415
    except ImportError:
        return None
    return openvino


def compile_openvino(path: str | os.PathLike, precision: str, threads: int | None = None, profile: bool = False):
    """`path` (ONNX) compiled by OpenVINO's CPU plugin with `INFERENCE_PRECISION_HINT` `precision` ("f32", "bf16"),
    on `threads` threads (default: OpenVINO's choice), with per-layer timings (`PERF_COUNT`) if `profile`."""
    openvino = openvino_or_none()
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": profile}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return openvino.Core().compile_model(str(path), "CPU", config)


def _against_pytorch(logits: np.ndarray, single: np.ndarray, references: dict[str, np.ndarray]) -> tuple[float, float]:
    """(drift to PyTorch's float64 logits, max abs difference to its float32 ones) of an engine's outputs for the
    check's batch (`logits`) and its first image alone (`single`)."""
    exact, reference = references["float64"], references["float32"]
    drift = max(relative_difference(logits, exact), relative_difference(single, exact[:1]))
    return drift, float(max(np.abs(logits - reference).max(), np.abs(single - reference[:1]).max()))


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _check_openvino(fp32_path: Path, images: np.ndarray, references: dict[str, np.ndarray]) -> dict:
    """OpenVINO's f32 and bf16 logits of the export against PyTorch's float64 ones; f32 is held to the same bound as
    ONNX Runtime (`check_drift` against PyTorch's own float32 drift), bf16 is reported."""
    openvino = openvino_or_none()
    if openvino is None:
        return {}
    exact, reference = references["float64"], references["float32"]
    result = {"openvino": openvino.__version__.split("-")[0]}  # "2026.4.1-22982-e213a14...": the release
    for precision in ("f32", "bf16"):
        try:
            compiled = compile_openvino(fp32_path, precision)
            logits, single = compiled(images)[0], compiled(images[:1])[0]
        except RuntimeError as error:  # OpenVINO reports what it cannot compile or run as a RuntimeError
            raise OnnxExportError(
                f"OpenVINO {result['openvino']} cannot run the export in {precision} ({_first_line(error)}): ONNX "
                "Runtime could; uninstall openvino to export without its check; nothing was written."
            ) from None
        # A CPU without BF16 runs the bf16 hint in f32: say what ran.
        ran_as = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type: "f32", "bf16"
        result[f"openvino_{precision}_ran_as"] = ran_as.to_string() if hasattr(ran_as, "to_string") else str(ran_as)
        drift, difference = _against_pytorch(logits, single, references)
        result[f"openvino_{precision}_drift"], result[f"openvino_{precision}_max_abs_diff"] = drift, difference
        result[f"openvino_{precision}_top1_agreement"] = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    try:
        check_drift(result["openvino_f32_drift"], relative_difference(reference, exact), "OpenVINO's f32 output")
    except VerificationError as error:
        raise OnnxExportError(str(error)) from None
    return result


def load_classifier(model_dir: str | os.PathLike) -> nn.Module:
    """The float32 classifier in `model_dir`, or an OnnxExportError saying why the folder is not one."""
    from transformers import AutoModelForImageClassification  # noqa: PLC0415
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise OnnxExportError(f"{str(folder)!r} {what}: expected a model folder written by save_pretrained.")
    verbosity, progress_bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()  # a loading report would come before the one line said below
    transformers_logging.disable_progress_bar()
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # RuntimeError: weights of the wrong shapes
        raise OnnxExportError(f"{str(folder)!r} does not load as an image classifier: {_first_line(error)}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()
    # A base model (e.g. transformers' ViTModel with its pooler) loads as a classifier with a new random head and
    # without some of its weights: the export would not be the folder's model.
    unused = sorted(info["unexpected_keys"])
    new = sorted(info["missing_keys"]) + sorted(
        key if isinstance(key, str) else key[0] for key in info["mismatched_keys"]
    )
    if unused or new:
        names = ", ".join(unused[:2] + new[:2])
        raise OnnxExportError(
            f"{str(folder)!r} is not a complete image classifier: loading it as one leaves {len(unused)} of its "
            f"weights unused and initialises {len(new)} at random ({names}): export the classifier folder (a "
            "feature extractor's ONNX needs an hf_vit folder, whose logits are the features)."
        )
    return model


def _parameter_bytes(model: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def _run(session, pixel_values: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"pixel_values": pixel_values})[0]


def export_onnx(
    model_or_dir: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    quantize: bool = False,
    num_images: int = 4,
    opset_version: int | None = None,
) -> dict[str, object]:
    r"""
    Write `onnx/model.onnx` (and with `quantize`, `onnx/model_quantized.onnx`) into the model folder, check each with
    ONNX Runtime against the PyTorch logits, and describe the files and the check in the folder's README.md.

    The graph takes `pixel_values` (batch, channels, height, width) float32, normalised as the folder's image
    processor does, at the model's `image_size`, any batch size, and returns `logits` (batch, num_labels). The check
    runs `num_images` fixed random images in [-1, 1] as one batch and the first alone, against the PyTorch model in
    float64: ONNX Runtime's float32 logits may drift from it by at most 100x what PyTorch's own float32 forward does
    on the same inputs (`hf_vit.verification.check_drift`: rounding, not a wrong graph); int8 reports its top-1
    agreement with PyTorch and its largest logit change.
    Nothing is written into the folder unless the float32 check passes; a new export replaces the `onnx/` files of an
    earlier one.

    Args:
        model_or_dir: a model folder (hf_vit or stock transformers ViT), or a loaded classifier (then `output_dir`).
        output_dir: where `onnx/` and README.md go; default: the model folder.
        quantize: also write and check the int8 model (dynamic quantization: int8 weights, activations quantized per
            call).

    Returns the check's figures: `drift` (ONNX Runtime float32 against PyTorch float64, relative to the logits'
    scale), `pytorch_drift` (PyTorch float32 against the same), `bound`, `max_abs_diff` (ONNX Runtime against PyTorch,
    both float32), and with `quantize` `int8_top1_agreement` and `int8_max_abs_diff`, plus the `files` written.

    Example:

    ```python
    >>> from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification
    >>> from hf_vit.onnx_export import export_onnx
    >>> config = VisionTransformerConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
    ...                                  num_attention_heads=4, intermediate_size=37, num_labels=10)
    >>> VisionTransformerForImageClassification(config).save_pretrained("vit-tiny")
    >>> export_onnx("vit-tiny", quantize=True)["drift"] < 1e-5  # doctest: +SKIP
    True
    ```
    """
    onnxruntime = require_onnx()
    if isinstance(model_or_dir, nn.Module):
        if output_dir is None:
            raise OnnxExportError("export_onnx(model) needs output_dir: the folder to write onnx/ into.")
        model = model_or_dir
        if any(parameter.dtype != torch.float32 for parameter in model.parameters()):
            model = copy.deepcopy(model).float()  # the export is float32; leave the caller's model as it is
    else:
        model = load_classifier(model_or_dir)
        output_dir = model_or_dir if output_dir is None else output_dir
    if num_images < 1:
        raise OnnxExportError(f"num_images must be at least 1, got {num_images}.")
    output_dir = Path(output_dir)
    config = model.config
    height, width = _as_pair(config.image_size)
    images = verification_images(num_images, height, width, channels=config.num_channels)

    was_training = model.training
    model.eval()
    try:
        references = _pytorch_logits(model, images)
        output_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=output_dir))
        try:
            with _quiet_exporters():
                result = _export_and_check(model, work, images, references, quantize, opset_version, onnxruntime)
            _install(work, output_dir / ONNX_DIR)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        model.train(was_training)
    result["files"] = sorted(str(path.relative_to(output_dir)) for path in (output_dir / ONNX_DIR).iterdir())
    write_card_section(output_dir, result)
    return result


def _is_not_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Please consider to run pre-processing before quantization")


@contextlib.contextmanager
def _quiet_exporters():
    """Keep the exporters' notes out of the export's one-line report: torch.onnx lists the torchvision operators it
    skips (a ViT uses none), a torch deprecation warning fires inside the exporter, and ONNX Runtime suggests its
    optional pre-processing (shape inference) before every quantization."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    logging.getLogger().addFilter(_is_not_preprocessing_advice)  # ONNX Runtime logs it on the root logger
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)
        logging.getLogger().removeFilter(_is_not_preprocessing_advice)


def _pytorch_logits(model: nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    """The model's logits in float32 (what the graph is compared with) and, from a float64 copy, in float64 (what both
    are measured against), as float64 arrays."""
    pixel_values = torch.from_numpy(images)
    with torch.inference_mode():
        float32 = model(pixel_values=pixel_values).logits.double().numpy()
        float64 = copy.deepcopy(model).double()(pixel_values=pixel_values.double()).logits.numpy()
    return {"float32": float32, "float64": float64}


def _export_and_check(model, work, images, references, quantize, opset_version, onnxruntime) -> dict:
    """Export into `work`, run both files with ONNX Runtime, raise if float32 is off; the check's figures."""
    fp32_path = work / FP32_FILE
    external = _parameter_bytes(model) > EXTERNAL_DATA_BYTES
    example = torch.from_numpy(images[:2] if len(images) > 1 else np.concatenate([images, images]))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        _Logits(model).eval(),
        (example,),
        dynamo=True,
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: batch}},
        opset_version=opset_version,
        external_data=external,
        verbose=False,
    )
    program.save(str(fp32_path), external_data=external)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the quantized graph's "unused initializer" warnings are noise
    session = onnxruntime.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"])
    logits = _run(session, images)
    single = _run(session, images[:1])  # a different batch size than the export's example: the batch is dynamic
    exact, reference = references["float64"], references["float32"]
    drift, difference = _against_pytorch(logits, single, references)
    pytorch_drift = relative_difference(reference, exact)
    try:
        check_drift(drift, pytorch_drift, "ONNX Runtime's float32 output")
    except VerificationError as error:
        raise OnnxExportError(str(error)) from None
    result = {
        "drift": drift,
        "pytorch_drift": pytorch_drift,
        "bound": drift_bound(pytorch_drift),
        "max_abs_diff": difference,
        "num_images": len(images),
        "image_size": list(images.shape[2:]),
        "opset": _opset(fp32_path),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "quantized": quantize,
    }
    result.update(_check_openvino(fp32_path, images, references))
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

        int8_path = work / INT8_FILE
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, use_external_data_format=external)
        session = onnxruntime.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
        int8 = _run(session, images)
        result["int8_top1_agreement"] = float((int8.argmax(-1) == reference.argmax(-1)).mean())
        result["int8_max_abs_diff"] = float(np.abs(int8 - reference).max())
        result["logit_range"] = float(reference.max() - reference.min())
    return result


def _opset(path: Path) -> int:
    import onnx  # noqa: PLC0415

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _install(work: Path, target: Path) -> None:
    """Move the checked files into `target`, replacing the files of an earlier export (and only those)."""
    target.mkdir(exist_ok=True)
    for stale in target.glob("model*.onnx*"):
        if stale.name.split(".onnx")[0] in ("model", "model_quantized"):
            stale.unlink()
    for path in sorted(work.iterdir()):
        os.replace(path, target / path.name)


def card_section(result: dict[str, object]) -> str:
    """The README.md section saying what the ONNX files are and how they were checked."""
    height, width = result["image_size"]
    lines = [
        CARD_HEADING,
        "",
        f"`onnx/{FP32_FILE}` is this classifier as an ONNX graph (opset {result['opset']}, float32, exported with "
        f"torch {result['torch']}'s `torch.onnx.export(dynamo=True)`): input `pixel_values` (batch, channels, "
        f"{height}, {width}) float32, normalised as `preprocessor_config.json` says, any batch size; output `logits` "
        "(batch, num_labels).",
    ]
    if result["quantized"]:
        lines += [
            "",
            f"`onnx/{INT8_FILE}` is the same graph with int8 weights (ONNX Runtime's `quantize_dynamic`, QInt8: the "
            "activations are quantized on the fly, per call). It is smaller and faster on CPUs with int8 dot "
            "products, and not exact.",
        ]
    checked = (
        f"Checked with ONNX Runtime {result['onnxruntime']} (CPU) against this folder's PyTorch model in float64 on "
        f"{result['num_images']} fixed random {height}x{width} inputs in [-1, 1], as one batch and the first alone: "
        f"ONNX Runtime's float32 logits are within **{result['drift']:.1e}** of the logits' scale (PyTorch's own "
        f"float32 forward: {result['pytorch_drift']:.1e}; bound {result['bound']:.1e}), max abs logit difference to "
        f"PyTorch float32 {result['max_abs_diff']:.1e}"
    )
    if result["quantized"]:
        agree = round(result["int8_top1_agreement"] * result["num_images"])
        checked += (
            f"; int8 top-1 agreement with PyTorch **{agree}/{result['num_images']}**, max abs logit change "
            f"**{result['int8_max_abs_diff']:.1e}** (the logits span {result['logit_range']:.2g})"
        )
    lines += ["", checked + ".", "", "```python", "import numpy as np", "import onnxruntime", ""]
    lines += [
        f'session = onnxruntime.InferenceSession("onnx/{FP32_FILE}")',
        f"pixel_values = np.zeros((1, 3, {height}, {width}), np.float32)  # from the image processor",
        'logits = session.run(["logits"], {"pixel_values": pixel_values})[0]',
        "```",
    ]
    return "\n".join(lines + openvino_card_lines(result)) + "\n"


def openvino_card_lines(result: dict[str, object]) -> list[str]:
    """How to run `onnx/model.onnx` with OpenVINO, and its check where it ran at export."""
    if "openvino" in result:
        checked = (
            f"Checked with OpenVINO {result['openvino']} (CPU) on the same inputs, against the same float64 logits: "
            f"f32 within **{result['openvino_f32_drift']:.1e}** of the logits' scale (same bound as ONNX Runtime); "
            f"bf16 (ran as {result['openvino_bf16_ran_as']}) **{result['openvino_bf16_drift']:.1e}**, top-1 agreement "
            f"**{round(result['openvino_bf16_top1_agreement'] * result['num_images'])}/{result['num_images']}**."
        )
    else:
        checked = (
            "OpenVINO was not installed at export, so the file was not checked under it (`pip install "
            "'hf_vit[openvino]'`)."
        )
    height, width = result["image_size"]
    return [
        "",
        f'OpenVINO reads the same file: `"f32"` is exact, `"bf16"` the fast choice on CPUs with AVX512-BF16 or AMX '
        f"(elsewhere it runs as f32). {checked}",
        "",
        "```python",
        "import numpy as np",
        "import openvino",
        "",
        f'compiled = openvino.Core().compile_model("onnx/{FP32_FILE}", "CPU", {{"INFERENCE_PRECISION_HINT": "bf16"}})',
        f"logits = compiled(np.zeros((1, 3, {height}, {width}), np.float32))[0]",
        "```",
    ]


def write_card_section(folder: Path, result: dict[str, object]) -> None:
    """Add (or replace) the ONNX section of `folder`/README.md, creating the card if there is none."""
    card = folder / "README.md"
    text = card.read_text() if card.exists() else ""
    section = card_section(result)
    pattern = re.compile(rf"^{re.escape(CARD_HEADING)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    partial = folder / "README.md.partial"
    partial.write_text(text)
    os.replace(partial, card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_vit.onnx_export", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder (hf_vit or stock transformers ViT)")
    parser.add_argument("--quantize", action="store_true", help=f"also write onnx/{INT8_FILE} (int8 weights)")
    parser.add_argument("--num-images", type=int, default=4, help="verification images (default 4)")
    parser.add_argument("--json", action="store_true", help="print the check's figures as JSON")
    args = parser.parse_args(argv)
    try:
        result = export_onnx(args.model_dir, quantize=args.quantize, num_images=args.num_images)
    except OnnxExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        line = (
            f"wrote {', '.join(result['files'])} into {args.model_dir}: float32 within {result['drift']:.1e} of the "
            f"float64 logits (PyTorch float32: {result['pytorch_drift']:.1e})"
        )
        if result["quantized"]:
            line += (
                f"; int8 top-1 agreement {result['int8_top1_agreement']:.0%}, max logit change "
                f"{result['int8_max_abs_diff']:.1e}"
            )
        if "openvino" in result:
            line += (
                f"; OpenVINO f32 within {result['openvino_f32_drift']:.1e}, bf16 {result['openvino_bf16_drift']:.1e}"
            )
        print(line)
    return 0


__all__ = [
    "OnnxExportError",
    "card_section",
    "compile_openvino",
    "export_onnx",
    "load_classifier",
    "openvino_or_none",
]


if __name__ == "__main__":
    sys.exit(main())
