"""An independent NumPy implementation of the ResNet stem of vit_jax's hybrids (models_vit.py + models_resnet.py).

For verifying converted R+ViT checkpoints: it reads the parameters by their vit_jax names straight from the
checkpoint, computes in float64 on NHWC arrays with HWIO kernels (as Flax does), and shares no code with hf_vit or
with the key table. The structure is read off the keys (`block{b}/unit{u}/...`); a unit has a projection when Flax
would build one (the channels or the stride change), and then its `conv_proj`/`gn_proj` must be there.

Numerics of the original: TF "SAME" padding from each input's size, `StdConv` kernels standardised as
(w - mean) / (std + 1e-5) over (H, W, in), GroupNorm with 32 groups and epsilon 1e-6, max-pool padded with -inf.
`flavour="seed"` computes the seed port's (jeonsworld/ViT-pytorch) differences instead, for its `*_checkpoint.bin`:
symmetric padding, an unpadded max-pool, (w - mean) / sqrt(var + 1e-5), gn_proj with one group per channel and
epsilon 1e-5.

The feature map then goes into the ViT part (`embedding` with kernel = stride = patch): `reference.flax_vit_forward`
takes it as its `images` in (B, C, H, W).
"""

from collections.abc import Mapping

import numpy as np


GROUPS = 32
GROUP_NORM_EPS = 1e-6  # flax.linen.GroupNorm
STD_CONV_EPS = 1e-5  # vit_jax models_resnet.StdConv
FLAVOURS = ("vit_jax", "seed")


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis, (before, after): the output has ceil(size / stride) positions."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pads(x: np.ndarray, kernel: int, stride: int, flavour: str) -> tuple[tuple[int, int], tuple[int, int]]:
    if flavour == "seed":
        return (kernel // 2, kernel // 2), (kernel // 2, kernel // 2)
    return same_pads(x.shape[1], kernel, stride), same_pads(x.shape[2], kernel, stride)


def standardize(kernel: np.ndarray, flavour: str = "vit_jax") -> np.ndarray:
    """Weight standardisation of an HWIO kernel per output channel (population statistics over H, W, in)."""
    kernel = kernel.astype(np.float64)
    centred = kernel - kernel.mean(axis=(0, 1, 2))
    if flavour == "seed":
        return centred / np.sqrt(centred.var(axis=(0, 1, 2)) + STD_CONV_EPS)
    return centred / (centred.std(axis=(0, 1, 2)) + STD_CONV_EPS)


def conv2d(x: np.ndarray, kernel: np.ndarray, stride: int, flavour: str = "vit_jax") -> np.ndarray:
    """`StdConv` without bias: (B, H, W, C) * HWIO -> (B, H', W', O), padded for `flavour`."""
    kh, kw, cin, cout = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"kernel {kernel.shape} expects {cin} input channels, the input has {x.shape[-1]}.")
    (top, bottom), (left, right) = _pads(x, kh, stride, flavour)
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    # windows: (B, H', W', C, kh, kw); contract (C, kh, kw) with the kernel's (in, H, W)
    return np.tensordot(windows, standardize(kernel, flavour).transpose(2, 0, 1, 3), axes=3)


def group_norm(
    x: np.ndarray, scale: np.ndarray, bias: np.ndarray, groups: int = GROUPS, eps: float = GROUP_NORM_EPS
) -> np.ndarray:
    """GroupNorm over (H, W, C / groups) of (B, H, W, C); `scale` and `bias` of shape (C,) or (1, 1, 1, C)."""
    batch, height, width, channels = x.shape
    grouped = x.reshape(batch, height, width, groups, channels // groups)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    variance = ((grouped - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    normalised = ((grouped - mean) / np.sqrt(variance + eps)).reshape(x.shape)
    return normalised * np.reshape(scale, -1).astype(np.float64) + np.reshape(bias, -1).astype(np.float64)


def max_pool(x: np.ndarray, flavour: str = "vit_jax") -> np.ndarray:
    """3x3 stride-2 max-pool of (B, H, W, C): "SAME" with -inf padding (flax), or unpadded (the seed)."""
    if flavour == "vit_jax":
        (top, bottom), (left, right) = same_pads(x.shape[1], 3, 2), same_pads(x.shape[2], 3, 2)
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def residual_unit(params: Mapping, prefix: str, x: np.ndarray, features: int, stride: int, flavour: str = "vit_jax"):
    """vit_jax `ResidualUnit` (a post-activation bottleneck) named `prefix` (e.g. "block2/unit1")."""

    def gn(name: str, y: np.ndarray, groups: int = GROUPS, eps: float = GROUP_NORM_EPS) -> np.ndarray:
        return group_norm(y, params[f"{prefix}/{name}/scale"], params[f"{prefix}/{name}/bias"], groups, eps)

    residual = x
    if x.shape[-1] != 4 * features or stride != 1:
        residual = conv2d(x, params[f"{prefix}/conv_proj/kernel"], stride, flavour)
        groups, eps = (4 * features, 1e-5) if flavour == "seed" else (GROUPS, GROUP_NORM_EPS)
        residual = gn("gn_proj", residual, groups, eps)
    y = relu(gn("gn1", conv2d(x, params[f"{prefix}/conv1/kernel"], 1, flavour)))
    y = relu(gn("gn2", conv2d(y, params[f"{prefix}/conv2/kernel"], stride, flavour)))
    y = gn("gn3", conv2d(y, params[f"{prefix}/conv3/kernel"], 1, flavour))
    return relu(residual + y)


def resnet_layout(params: Mapping) -> tuple[int, ...]:
    """Units per stage, read off the keys: `block1/unit1/...` up to the first stage or unit that is absent."""
    keys = list(params.keys())
    layout = []
    while any(k.startswith(f"block{len(layout) + 1}/unit1/") for k in keys):
        stage = len(layout) + 1
        units = 1
        while any(k.startswith(f"block{stage}/unit{units + 1}/") for k in keys):
            units += 1
        layout.append(units)
    return tuple(layout)


def resnet_features(params: Mapping, images: np.ndarray, flavour: str = "vit_jax") -> np.ndarray:
    """
    The ResNet stem of a vit_jax hybrid: (B, H, W, C) images in [-1, 1] -> (B, H', W', C') feature map, float64.

    `params` maps vit_jax names to arrays (a dict of an `.npz`, or anything with `keys()` and `[]`): `conv_root/kernel`
    (7, 7, C, width) HWIO, `gn_root/{scale,bias}` (width,) or (1, 1, 1, width), and for stage b and unit u
    `block{b}/unit{u}/{conv1,conv2,conv3,conv_proj}/kernel` and `.../{gn1,gn2,gn3,gn_proj}/{scale,bias}`.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}.")
    x = np.asarray(images, dtype=np.float64)
    root = params["conv_root/kernel"]
    width = root.shape[-1]
    x = conv2d(x, root, 2, flavour)
    x = relu(group_norm(x, params["gn_root/scale"], params["gn_root/bias"]))
    x = max_pool(x, flavour)
    for index, num_units in enumerate(resnet_layout(params)):
        for unit in range(1, num_units + 1):
            stride = 2 if index > 0 and unit == 1 else 1
            x = residual_unit(params, f"block{index + 1}/unit{unit}", x, width * 2**index, stride, flavour)
    return x


__all__ = [
    "conv2d",
    "group_norm",
    "max_pool",
    "residual_unit",
    "resnet_features",
    "resnet_layout",
    "same_pads",
    "standardize",
]
