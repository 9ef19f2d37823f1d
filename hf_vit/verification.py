"""
Verification of a converted or exported model against a float64 reference: one home for the conversion's check, the
ONNX export's and the `.npz` export's.

Two questions, answered apart because they have different answers on different CPUs:

- **The mapping** (is every tensor where it belongs?): the model with its weights upcast to float64 against a float64
  reference computed from the original checkpoint. Upcasting is exact, so a correct mapping agrees to float64
  rounding, ~1e-14 of the logits' scale, on any CPU; the most measured over the test suite's conversions (plain,
  hybrid, seed, bfloat16/float16 weights) is 1e-9, where position embeddings were resampled: both sides store the
  resampled values in float32, and where the two float64 interpolations straddle a float32 rounding tie they land
  one float32 ulp apart. A wrong mapping (a transposed qkv kernel, a wrong head split, swapped LayerNorms, a conv
  kernel read with H and W exchanged) measured 0.4 to 1.4. `MAPPING_TOLERANCE` (1e-6) sits 1000x above the first
  and 1e5x below the second; this is the check that refuses a conversion.
- **The drift** (what the saved precision costs): the model in its saved dtype (float32, bfloat16 or float16) against
  the same float64 reference. It depends on the CPU's kernels, the thread count, the depth, the resolution and, for
  the hybrids, GroupNorm statistics (an R50 hybrid in float32 drifts by ~1e-5 of its logits' scale, a plain ViT by
  ~1e-7), so it is measured and reported in the log and the model card, and refused only when it is not finite (a
  float16 overflow). A runtime that computes the same model in another engine (ONNX Runtime, OpenVINO) is checked
  by `check_drift`: its drift may be at most `DRIFT_FACTOR` times PyTorch's own in the same precision on the same
  inputs, so the bound scales with the computation instead of one machine's rounding.

Differences are relative to the scale of what is compared: `max |a - b| / max(1, max |b|)`.
"""

from collections.abc import Mapping

import numpy as np
import torch


MAPPING_TOLERANCE = 1e-6  # float64 vs float64: a correct mapping measures <= 1e-9 (see above), a wrong one >= 0.4
DRIFT_FACTOR = 100  # another engine's drift vs PyTorch's in the same precision: summation order, fused kernels
DRIFT_FLOOR = 1e-5  # ... or at most this (float32 rounding alone is 6e-8): PyTorch's own drift can be ~1e-7


class VerificationError(ValueError):
    """A model that does not compute what its reference does: one line saying by how much and what it means."""


def verification_images(num_images: int, height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Fixed random inputs in the models' input range [-1, 1], (B, C, H, W) float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(num_images, channels, height, width)).astype(np.float32)


def relative_difference(values: np.ndarray, reference: np.ndarray) -> float:
    """max |values - reference| / max(1, max |reference|), in float64; inf where `values` is not finite."""
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape:
        raise VerificationError(f"outputs of shape {values.shape} cannot be compared with {reference.shape}.")
    if not np.isfinite(values).all():
        return float("inf")
    return float(np.abs(values - reference).max(initial=0.0) / max(1.0, float(np.abs(reference).max(initial=0.0))))


def largest_difference(outputs: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray]) -> float:
    """The largest `relative_difference` over the outputs both mappings name (e.g. logits and head input)."""
    return max(relative_difference(outputs[name], references[name]) for name in references)


def model_outputs(model: torch.nn.Module, images: np.ndarray, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """
    `{"logits", "head input"}` of an image classifier (hf_vit, or transformers' ViTForImageClassification) with its
    weights and `images` cast to `dtype`, or `{"features"}` of a base model (transformers' ViTModel: its pooler).
    The model is cast in place and returned in eval mode; the outputs are float64.
    """
    model = model.to(dtype).eval()
    pixel_values = torch.from_numpy(images).to(dtype)
    head = getattr(model, "classifier", None)  # transformers' ViTForImageClassification
    head = getattr(model, "head", None) if head is None else head  # hf_vit's
    with torch.inference_mode():
        if head is None:  # a base model: its pooler output is what it gives
            return {"features": model(pixel_values=pixel_values).pooler_output.double().numpy()}
        captured = {}
        hook = head.register_forward_pre_hook(lambda module, inputs: captured.__setitem__("head input", inputs[0]))
        try:
            logits = model(pixel_values=pixel_values).logits
        finally:
            hook.remove()
    return {"logits": logits.double().numpy(), "head input": captured["head input"].double().numpy()}


def check_mapping(difference: float, what: str) -> None:
    """Refuse a float64 `difference` above `MAPPING_TOLERANCE`: some tensor is not where it belongs."""
    if not difference <= MAPPING_TOLERANCE:
        raise VerificationError(
            f"{what} differs from the reference in float64 by {difference:.1e} of the logits' scale (tolerance "
            f"{MAPPING_TOLERANCE:.0e}): a weight is misplaced, not rounded; nothing was written."
        )


def check_finite(drift: float, dtype: str, what: str) -> None:
    """Refuse a forward in the saved dtype that overflows (float16's range ends at 65504)."""
    if not np.isfinite(drift):
        raise VerificationError(
            f"{what} in {dtype} gives non-finite outputs (an overflow): save float32 or bfloat16 instead; nothing "
            "was written."
        )


def drift_bound(baseline: float) -> float:
    """The most another engine may drift from the float64 reference, given PyTorch's own drift `baseline`."""
    return max(DRIFT_FACTOR * baseline, DRIFT_FLOOR)


def check_drift(drift: float, baseline: float, what: str) -> None:
    """Refuse `what` when its drift is far outside PyTorch's own in the same precision: a wrong graph, not rounding."""
    if not drift <= drift_bound(baseline):
        raise VerificationError(
            f"{what} differs from the float64 reference by {drift:.1e} of the logits' scale, more than "
            f"{DRIFT_FACTOR}x PyTorch's own {baseline:.1e} (bound {drift_bound(baseline):.1e}): the export computes "
            "another function; nothing was written."
        )


__all__ = [
    "DRIFT_FACTOR",
    "MAPPING_TOLERANCE",
    "VerificationError",
    "check_drift",
    "check_finite",
    "check_mapping",
    "drift_bound",
    "largest_difference",
    "model_outputs",
    "relative_difference",
    "verification_images",
]
