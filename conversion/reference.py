"""An independent NumPy implementation of the original Flax ViT forward (vit_jax/models_vit.py), for verification.

It reads the parameters by their vit_jax names, straight from the checkpoint, computes in float64, and shares no code
with hf_vit or with the key table: pre-LayerNorm blocks with epsilon 1e-6, attention scaled by 1/sqrt(d), GELU with
the tanh approximation (Flax `nn.gelu`), encoder_norm, the "token" (row 0) or "gap" (mean of the patch tokens)
classifier, optional pre_logits (Dense + tanh), then the head. Each checkpoint family presents its tensors under
the vit_jax names and Flax layouts (`Family.reference_params`); a big_vision `pos_embedding` is read as big_vision
uses it (added to the patch tokens before the class token is prepended).
"""

import math

import numpy as np

from .checkpoint import Architecture


LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm default, used by vit_jax


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """jax.nn.gelu(approximate=True), what Flax `nn.gelu` computes."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """x * Phi(x) with the exact error function (the seed repo and PyTorch's default)."""
    try:
        from scipy.special import erf
    except ImportError:  # scipy is optional; math.erf is exact but slower
        erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * x * (1.0 + np.asarray(erf(x / math.sqrt(2.0)), dtype=np.float64))


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + LAYER_NORM_EPS) * scale + bias


def zoom_linear(grid: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
    """`scipy.ndimage.zoom(grid, (new_h / h, new_w / w, 1), order=1)` for a (h, w, D) array: corner-aligned linear."""
    for axis, new in enumerate(new_shape):
        old = grid.shape[axis]
        if old == new:
            continue
        coordinates = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
        low = np.clip(np.floor(coordinates).astype(int), 0, old - 1)
        high = np.minimum(low + 1, old - 1)
        weight = (coordinates - low).reshape([-1 if a == axis else 1 for a in range(grid.ndim)])
        grid = np.take(grid, low, axis=axis) * (1 - weight) + np.take(grid, high, axis=axis) * weight
    return grid


def round_to_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of `array` after a round trip through `dtype` (round to nearest even)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "float32":
        return array
    if dtype == "float16":
        return array.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":  # keep the upper 16 bits of the float32, rounding the lower half to nearest even
        bits = array.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")


def flax_vit_forward(
    params,
    arch: Architecture,
    images: np.ndarray,
    *,
    gelu: str = "tanh",
    use_pre_logits: bool = True,
    new_head_classes: int | None = None,
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """
    The Flax model's (features, logits) for `images` (B, C, H, W) in [-1, 1]; features are the head's input.

    `params[key]` returns a parameter by its vit_jax name. Position embeddings are resampled to the image's patch grid
    as vit_jax does. `dtype` rounds every parameter (after resampling) to the saved precision first. With
    `new_head_classes` N the head is the zero-initialised classifier the converter writes; with 0 there is none (a
    feature extractor: the logits are the features).
    """

    def param(key: str) -> np.ndarray:
        return round_to_dtype(params[key], dtype).astype(np.float64)

    batch, _, height, width = images.shape
    patch_h, patch_w = arch.patch_size
    grid_h, grid_w = height // patch_h, width // patch_w
    hidden = arch.hidden_size

    # Patch embedding: a stride-P convolution is a matmul over non-overlapping P x P x C patches (HWIO kernel).
    x = images.astype(np.float64).transpose(0, 2, 3, 1)  # (B, H, W, C)
    x = x.reshape(batch, grid_h, patch_h, grid_w, patch_w, -1).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, grid_h * grid_w, -1) @ param("embedding/kernel").reshape(-1, hidden)
    x = x + param("embedding/bias")  # (B, N, D)

    before_cls = "pos_embedding" in params  # big_vision: one row per patch, added before the class token
    posemb = params["pos_embedding" if before_cls else "Transformer/posembed_input/pos_embedding"].astype(np.float64)
    prefix = 0 if before_cls else arch.num_prefix_tokens
    if (grid_h, grid_w) != tuple(arch.grid):
        patches = zoom_linear(posemb[0, prefix:].reshape(*arch.grid, hidden), (grid_h, grid_w))
        posemb = np.concatenate([posemb[:, :prefix], patches.reshape(1, grid_h * grid_w, hidden)], axis=1)
    posemb = round_to_dtype(posemb.astype(np.float32), dtype).astype(np.float64)
    if before_cls:
        x = x + posemb
    if arch.classifier == "token":
        x = np.concatenate([np.broadcast_to(param("cls"), (batch, 1, hidden)), x], axis=1)
    if not before_cls:
        x = x + posemb

    activation = gelu_tanh if gelu == "tanh" else gelu_exact
    for i in range(arch.num_layers):
        block = f"Transformer/encoderblock_{i}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        y = layer_norm(x, param(f"{block}/LayerNorm_0/scale"), param(f"{block}/LayerNorm_0/bias"))

        def project(name: str, y: np.ndarray = y, attention: str = attention) -> np.ndarray:
            kernel = param(f"{attention}/{name}/kernel")  # (D, H, d)
            y = y @ kernel.reshape(hidden, -1) + param(f"{attention}/{name}/bias").reshape(-1)
            # contiguous (B, H, S, d), so that the batched matmuls below go to BLAS
            return np.ascontiguousarray(y.reshape(batch, -1, *kernel.shape[1:]).transpose(0, 2, 1, 3))

        q, k, v = project("query"), project("key"), project("value")
        scores = q @ np.ascontiguousarray(k.transpose(0, 1, 3, 2)) / math.sqrt(q.shape[-1])  # (B, H, S, S)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        weights = scores / scores.sum(-1, keepdims=True)
        heads = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, -1, hidden)  # (B, S, H * d)
        out = heads @ param(f"{attention}/out/kernel").reshape(-1, hidden)  # out kernel (H, d, D)
        x = x + out + param(f"{attention}/out/bias")
        y = layer_norm(x, param(f"{block}/LayerNorm_2/scale"), param(f"{block}/LayerNorm_2/bias"))
        y = activation(y @ param(f"{block}/MlpBlock_3/Dense_0/kernel") + param(f"{block}/MlpBlock_3/Dense_0/bias"))
        x = x + y @ param(f"{block}/MlpBlock_3/Dense_1/kernel") + param(f"{block}/MlpBlock_3/Dense_1/bias")
    x = layer_norm(x, param("Transformer/encoder_norm/scale"), param("Transformer/encoder_norm/bias"))

    features = x[:, 0] if arch.classifier == "token" else x.mean(axis=1)
    if arch.representation_size and use_pre_logits:
        features = np.tanh(features @ param("pre_logits/kernel") + param("pre_logits/bias"))
    if new_head_classes == 0:
        logits = features
    elif new_head_classes is not None:
        logits = np.zeros((batch, new_head_classes))
    else:
        logits = features @ param("head/kernel") + param("head/bias")
    return features, logits


__all__ = ["flax_vit_forward", "gelu_tanh", "round_to_dtype", "zoom_linear"]
