"""An independent NumPy implementation of the original Flax ViT forward (vit_jax/models_vit.py), for verification.

It reads the parameters by their vit_jax names, straight from the checkpoint, computes in float64, and shares no code
with hf_vit or with the key table: pre-LayerNorm blocks with epsilon 1e-6, attention scaled by 1/sqrt(d), GELU with
the tanh approximation (Flax `nn.gelu`), encoder_norm, the "token" (row 0) or "gap" (mean of the patch tokens)
classifier, optional pre_logits (Dense + tanh), then the head. A seed `*_checkpoint.bin` is read through
`SeedAsFlax`, which presents its PyTorch tensors under the Flax names (the seed uses exact GELU).
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


class SeedAsFlax:
    """A seed state dict seen under vit_jax names and Flax layouts (Dense kernels (in, out), attention (D, H, d))."""

    def __init__(self, checkpoint, num_heads: int):
        self.checkpoint, self.num_heads = checkpoint, num_heads

    def __contains__(self, key: str) -> bool:
        try:
            return self._seed_key(key) in self.checkpoint.keys()
        except KeyError:
            return False

    def _seed_key(self, key: str) -> str:
        simple = {
            "embedding/kernel": "transformer.embeddings.patch_embeddings.weight",
            "embedding/bias": "transformer.embeddings.patch_embeddings.bias",
            "cls": "transformer.embeddings.cls_token",
            "Transformer/posembed_input/pos_embedding": "transformer.embeddings.position_embeddings",
            "Transformer/encoder_norm/scale": "transformer.encoder.encoder_norm.weight",
            "Transformer/encoder_norm/bias": "transformer.encoder.encoder_norm.bias",
            "pre_logits/kernel": "pre_logits.weight",
            "pre_logits/bias": "pre_logits.bias",
            "head/kernel": "head.weight",
            "head/bias": "head.bias",
        }
        if key in simple:
            return simple[key]
        block, rest = key.removeprefix("Transformer/encoderblock_").split("/", 1)
        names = {
            "LayerNorm_0/scale": "attention_norm.weight",
            "LayerNorm_0/bias": "attention_norm.bias",
            "LayerNorm_2/scale": "ffn_norm.weight",
            "LayerNorm_2/bias": "ffn_norm.bias",
            "MlpBlock_3/Dense_0/kernel": "ffn.fc1.weight",
            "MlpBlock_3/Dense_0/bias": "ffn.fc1.bias",
            "MlpBlock_3/Dense_1/kernel": "ffn.fc2.weight",
            "MlpBlock_3/Dense_1/bias": "ffn.fc2.bias",
        }
        for name in ("query", "key", "value", "out"):
            names[f"MultiHeadDotProductAttention_1/{name}/kernel"] = f"attn.{name}.weight"
            names[f"MultiHeadDotProductAttention_1/{name}/bias"] = f"attn.{name}.bias"
        return f"transformer.encoder.layer.{block}.{names[rest]}"

    def __getitem__(self, key: str) -> np.ndarray:
        array = self.checkpoint.load(self._seed_key(key))
        heads = self.num_heads
        if key == "embedding/kernel":  # (D, C, P, P) -> (P, P, C, D)
            return array.transpose(2, 3, 1, 0)
        if key.endswith(("query/kernel", "key/kernel", "value/kernel")):  # (H*d, D) -> (D, H, d)
            return array.T.reshape(array.shape[1], heads, -1)
        if key.endswith(("query/bias", "key/bias", "value/bias")):
            return array.reshape(heads, -1)
        if key.endswith("out/kernel"):  # (D, H*d) -> (H, d, D)
            return array.T.reshape(heads, -1, array.shape[0])
        if key.endswith("kernel"):  # nn.Linear (out, in) -> Dense (in, out)
            return array.T
        return array


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
    `new_head_classes` the head is the zero-initialised classifier the converter writes.
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

    if arch.classifier == "token":
        x = np.concatenate([np.broadcast_to(param("cls"), (batch, 1, hidden)), x], axis=1)
    posemb = params["Transformer/posembed_input/pos_embedding"].astype(np.float64)
    prefix = arch.num_prefix_tokens
    if (grid_h, grid_w) != tuple(arch.grid):
        patches = zoom_linear(posemb[0, prefix:].reshape(*arch.grid, hidden), (grid_h, grid_w))
        posemb = np.concatenate([posemb[:, :prefix], patches.reshape(1, grid_h * grid_w, hidden)], axis=1)
    x = x + round_to_dtype(posemb.astype(np.float32), dtype).astype(np.float64)

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
    if new_head_classes is not None:
        logits = np.zeros((batch, new_head_classes))
    else:
        logits = features @ param("head/kernel") + param("head/bias")
    return features, logits


def verification_images(num_images: int, height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Fixed random inputs in the model's input range [-1, 1], (B, C, H, W) float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(num_images, channels, height, width)).astype(np.float32)


__all__ = ["SeedAsFlax", "flax_vit_forward", "gelu_tanh", "round_to_dtype", "verification_images", "zoom_linear"]
