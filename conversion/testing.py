"""Random checkpoints in the exact layouts of Google's vit_jax `.npz` files, of vit_jax's training checkpoints (flax
msgpack) and of the seed repo's `*_checkpoint.bin`.

For tests, examples and benchmarks: no network, any size. The weights are random with realistic scales (fan-in
normalised kernels, LayerNorm scales near 1) so that activations stay O(1) through the blocks and a parity test
between two implementations has something to compare.
"""

import os
import re
from pathlib import Path

import numpy as np


def random_vit_arrays(
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    mlp_dim: int = 37,
    patch_size: int = 8,
    image_size: int | tuple[int, int] = 32,
    num_classes: int = 10,
    classifier: str = "token",
    representation_size: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The parameter tree of vit_jax `VisionTransformer`, flattened with '/' as in the released `.npz` files."""
    if classifier not in ("token", "gap"):
        raise ValueError(f"classifier must be 'token' or 'gap', got {classifier!r}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height % patch_size or width % patch_size:
        raise ValueError(f"image_size {height}x{width} must be a multiple of patch_size {patch_size}.")
    rng = np.random.default_rng(seed)
    head_dim = hidden_size // num_heads
    num_tokens = (height // patch_size) * (width // patch_size) + (1 if classifier == "token" else 0)

    def normal(shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def small(shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    def scale(shape):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    arrays = {
        "embedding/kernel": normal((patch_size, patch_size, 3, hidden_size), patch_size * patch_size * 3),
        "embedding/bias": small((hidden_size,)),
    }
    if classifier == "token":
        arrays["cls"] = small((1, 1, hidden_size))
    arrays["Transformer/posembed_input/pos_embedding"] = small((1, num_tokens, hidden_size))
    for i in range(num_layers):
        block = f"Transformer/encoderblock_{i}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        arrays[f"{block}/LayerNorm_0/scale"] = scale((hidden_size,))
        arrays[f"{block}/LayerNorm_0/bias"] = small((hidden_size,))
        for name in ("query", "key", "value"):
            arrays[f"{attention}/{name}/kernel"] = normal((hidden_size, num_heads, head_dim), hidden_size)
            arrays[f"{attention}/{name}/bias"] = small((num_heads, head_dim))
        arrays[f"{attention}/out/kernel"] = normal((num_heads, head_dim, hidden_size), hidden_size)
        arrays[f"{attention}/out/bias"] = small((hidden_size,))
        arrays[f"{block}/LayerNorm_2/scale"] = scale((hidden_size,))
        arrays[f"{block}/LayerNorm_2/bias"] = small((hidden_size,))
        arrays[f"{block}/MlpBlock_3/Dense_0/kernel"] = normal((hidden_size, mlp_dim), hidden_size)
        arrays[f"{block}/MlpBlock_3/Dense_0/bias"] = small((mlp_dim,))
        arrays[f"{block}/MlpBlock_3/Dense_1/kernel"] = normal((mlp_dim, hidden_size), mlp_dim)
        arrays[f"{block}/MlpBlock_3/Dense_1/bias"] = small((hidden_size,))
    arrays["Transformer/encoder_norm/scale"] = scale((hidden_size,))
    arrays["Transformer/encoder_norm/bias"] = small((hidden_size,))
    head_in = hidden_size
    if representation_size:
        arrays["pre_logits/kernel"] = normal((hidden_size, representation_size), hidden_size)
        arrays["pre_logits/bias"] = small((representation_size,))
        head_in = representation_size
    arrays["head/kernel"] = normal((head_in, num_classes), head_in)
    arrays["head/bias"] = small((num_classes,))
    return arrays


def write_random_npz(path: str | os.PathLike, **architecture) -> Path:
    """
    Write a random checkpoint with the key names, shapes and float32 dtype of Google's released ViT `.npz` files.

    `path` is where to write (`.npz` is not appended); `architecture` takes the keyword arguments of
    `random_vit_arrays`: `hidden_size`, `num_layers`, `num_heads`, `mlp_dim`, `patch_size` (defaults: the tiny test
    model), `image_size` (the pre-training resolution, N or (H, W), which sets the position-embedding grid),
    `num_classes`, `classifier` (`"token"`: a `cls` token and one more position-embedding row; `"gap"`: neither),
    `representation_size` (a `pre_logits` layer, as in the ImageNet-21k releases) and `seed`.

    Example:

    ```python
    >>> import tempfile, numpy as np
    >>> from conversion.testing import write_random_npz
    >>> path = write_random_npz(tempfile.mkdtemp() + "/tiny.npz", num_classes=5)
    >>> np.load(path)["Transformer/posembed_input/pos_embedding"].shape
    (1, 17, 32)
    ```
    """
    arrays = random_vit_arrays(**architecture)
    path = Path(path)
    # np.savez would append ".npz" to a name without it; write through a file object to keep the name as given.
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


def big_vision_arrays(arrays: dict[str, np.ndarray], *, scanned: bool = False) -> dict[str, np.ndarray]:
    """
    `random_vit_arrays` in big_vision's layout: `params/` prefix, Linen names, a top-level `pos_embedding` without the
    class-token row (big_vision adds it before prepending the class token), optionally a scanned encoder.
    """
    from .families.big_vision import linen_name

    result, stacked = {}, {}
    for key, value in arrays.items():
        if key == "Transformer/posembed_input/pos_embedding":
            result["pos_embedding"] = value[:, 1:] if "cls" in arrays else value
            continue
        name = linen_name(key)
        block = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", name)
        if scanned and block:
            stacked.setdefault(block[2], []).append((int(block[1]), value))
        else:
            result[name] = value
    for name, layers in stacked.items():
        result[f"Transformer/encoderblock/{name}"] = np.stack([value for _, value in sorted(layers)])
    return {f"params/{key}": value for key, value in result.items()}


def write_random_seed_checkpoint(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    num_labels: int = 10,
    image_size: int = 32,
    seed: int = 0,
    **config_kwargs,
) -> Path:
    """
    Write a `*_checkpoint.bin` as the seed repo (jeonsworld/ViT-pytorch) saves it: `torch.save(model.state_dict())`.

    hf_vit keeps the seed's module names, so a random hf_vit classifier's state dict has exactly the seed's keys.
    Without `variant` the tiny test sizes are used; `config_kwargs` override any config field.
    """
    import torch

    from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=8)
    fields = dict(image_size=image_size, num_labels=num_labels, hidden_act="gelu", **config_kwargs)
    if variant:
        config = VisionTransformerConfig.from_variant(variant, **fields)
    else:
        config = VisionTransformerConfig(**{**tiny, **fields})
    # The shapes from a weightless model; random values with realistic scales (a fresh init would take seconds).
    with torch.device("meta"):
        shapes = {
            key: value.shape for key, value in VisionTransformerForImageClassification(config).state_dict().items()
        }
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if key.endswith(("cls_token", "position_embeddings")) or (len(shape) == 1 and key.endswith("bias")):
            state[key] = 0.1 * values
        elif len(shape) == 1:  # LayerNorm scales
            state[key] = 1.0 + 0.1 * values
        else:  # fan-in normalised kernels, the head included (a fresh hf_vit head would be zero)
            state[key] = values / shape[1:].numel() ** 0.5
    path = Path(path)
    torch.save(state, path)
    return path


def random_resnet_arrays(
    num_layers=(3, 4, 9), *, width: int = 64, channels: int = 3, gn_shape: str = "1110", seed: int = 0
) -> dict[str, np.ndarray]:
    """
    The ResNet stem of a vit_jax hybrid `.npz` (models_resnet.py names): HWIO kernels with fan-in scales (as trained
    kernels have, so that the epsilon of the weight standardisation matters), GroupNorms near identity, stored
    (1, 1, 1, C) as in the 2020 files, or (C,) with `gn_shape="C"`.
    """
    from .families.hybrid import resnet_tensors

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, _, shape in resnet_tensors(num_layers, width, channels):
        if len(shape) == 4:
            arrays[name] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:3]))).astype(np.float32)
        else:
            values = rng.standard_normal((1, 1, 1, *shape) if gn_shape == "1110" else shape)
            arrays[name] = (1 + 0.1 * values if name.endswith("/scale") else 0.1 * values).astype(np.float32)
    return arrays


def random_hybrid_arrays(
    *, resnet_num_layers=(3, 4, 9), width: int = 64, gn_shape: str = "1110", image_size: int = 64,
    patch_size: int = 1, seed: int = 0, **vit,
) -> dict[str, np.ndarray]:  # fmt: skip
    """An R+ViT hybrid's parameters under the vit_jax `.npz` names (see `write_random_hybrid_npz`)."""
    stride = 4 * 2 ** max(len(resnet_num_layers) - 1, 0)
    if image_size % (stride * patch_size):
        raise ValueError(f"image_size {image_size} must be a multiple of {stride * patch_size} (stem x patch).")
    arrays = random_resnet_arrays(resnet_num_layers, width=width, gn_shape=gn_shape, seed=seed)
    channels = 4 * width * 2 ** (len(resnet_num_layers) - 1) if resnet_num_layers else width
    transformer = random_vit_arrays(patch_size=patch_size, image_size=image_size // stride, seed=seed + 1, **vit)
    hidden = transformer["embedding/kernel"].shape[-1]
    kernel = np.random.default_rng(seed + 2).standard_normal((patch_size, patch_size, channels, hidden))
    transformer["embedding/kernel"] = (kernel / np.sqrt(patch_size * patch_size * channels)).astype(np.float32)
    return {**arrays, **transformer}


def write_random_hybrid_npz(path: str | os.PathLike, **architecture) -> Path:
    """
    Write a random R+ViT hybrid in the exact layout of vit_jax's hybrid `.npz` files: the ResNet stem
    (`random_resnet_arrays`: `resnet_num_layers`, `width`, `gn_shape`), then a ViT (`random_vit_arrays`, tiny by
    default; its keywords override its sizes) whose `embedding` takes the feature map (image_size / 16 for three
    stages) in `patch_size` patches.
    """
    arrays = random_hybrid_arrays(**architecture)
    path = Path(path)
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


# --- vit_jax training checkpoints (flax msgpack) --------------------------------------------------------------------


class BFloat16:
    """An array to write as bfloat16 (NumPy has none): its float32 values' upper 16 bits, truncated."""

    def __init__(self, array: np.ndarray):
        self.shape = np.shape(array)
        self.bits = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def flax_msgpack_bytes(tree) -> bytes:
    """
    What `flax.serialization.msgpack_serialize` writes for a state dict `tree` (nested dicts, arrays, ints), from
    flax/serialization.py: arrays as msgpack extension type 1 with the payload `packb((shape, dtype name, C-order
    bytes))`, NumPy scalars as type 3 with the same payload, `strict_types=True`.
    """
    import msgpack

    def payload(shape, name, data):
        return msgpack.packb((shape, name, data), use_bin_type=True)

    def extension(value):
        if isinstance(value, BFloat16):
            return msgpack.ExtType(1, payload(value.shape, "bfloat16", value.bits.tobytes("C")))
        if isinstance(value, np.ndarray):
            return msgpack.ExtType(1, payload(value.shape, value.dtype.name, value.tobytes("C")))
        if isinstance(value, np.generic):
            return msgpack.ExtType(3, payload((), value.dtype.name, np.asarray(value).tobytes("C")))
        raise TypeError(f"flax serialises no {type(value).__name__}")

    return msgpack.packb(tree, default=extension, strict_types=True)


def linen_params(arrays: dict[str, np.ndarray]) -> dict:
    """vit_jax `.npz` arrays as the nested params tree of the Linen model (models_vit.py) that train.py saves."""
    from .families.big_vision import linen_name

    tree: dict = {}
    for key, value in arrays.items():
        *path, leaf = linen_name(key).split("/")
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = value
    tree.setdefault("pre_logits", {})  # models_vit's IdentityLayer(name="pre_logits"): a subtree without arrays
    return tree


def write_random_flax_checkpoint(workdir: str | os.PathLike, step: int = 500, *, hybrid: bool = False, **arch) -> Path:
    """
    Write `workdir/checkpoint_{step}` as vit_jax's train.py does, `flax.training.checkpoints.save_checkpoint(workdir,
    (params, opt_state, step), step)`, byte for byte in flax's msgpack format, with random params
    (`random_vit_arrays(**arch)`, or `random_hybrid_arrays(**arch)` with Linen's (C,) GroupNorms) and the state of
    train.py's optimizer, `optax.chain(clip_by_global_norm, sgd(momentum, accumulator_dtype="bfloat16"))`:
    (EmptyState(), (TraceState(trace), ScaleByScheduleState(count))), namedtuples and tuples as flax maps them.
    """
    arrays = random_hybrid_arrays(gn_shape="C", **arch) if hybrid else random_vit_arrays(**arch)
    params = linen_params(arrays)
    trace = linen_params({key: BFloat16(0.01 * value) for key, value in arrays.items()})
    opt_state = {"0": {}, "1": {"0": {"trace": trace}, "1": {"count": np.asarray(step, np.int32)}}}
    path = Path(workdir) / f"checkpoint_{step}"
    path.write_bytes(flax_msgpack_bytes({"0": params, "1": opt_state, "2": step}))
    return path


__all__ = [
    "BFloat16",
    "big_vision_arrays",
    "flax_msgpack_bytes",
    "linen_params",
    "random_hybrid_arrays",
    "random_resnet_arrays",
    "random_vit_arrays",
    "write_random_flax_checkpoint",
    "write_random_hybrid_npz",
    "write_random_npz",
    "write_random_seed_checkpoint",
]
