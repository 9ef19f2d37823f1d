"""The ResNet part of the R+ViT hybrid checkpoints as data: vit_jax `.npz` keys -> the seed's (hf_vit's) state-dict keys.

vit_jax (models_vit.py + models_resnet.py) names the stem `conv_root`, `gn_root` and `block{b}/unit{u}/...`; the seed
(jeonsworld/ViT-pytorch modeling_resnet.py), and so hf_vit, `transformer.embeddings.hybrid_model.root.*` and
`...body.block{b}.unit{u}.*`, with vit_jax's `conv_proj` called `downsample`. Kernels are HWIO in the `.npz` and OIHW
in PyTorch; the GroupNorm scales and biases are (C,) or, in the 2020 files, (1, 1, 1, C). The rest of a hybrid
(`embedding`, `cls`, `Transformer/...`, `pre_logits`, `head`) is the plain ViT's table.

`{b}` is the stage (1-based) and `{u}` the unit (1-based). Only unit1 of each stage has the projection: that is
where vit_jax's `needs_projection` holds (4x the channels of the root in block1, stride 2 in the later ones).
"""

import re
from collections.abc import Mapping

import numpy as np

from .errors import ConversionError


HYBRID_PREFIX = "transformer.embeddings.hybrid_model"
GROUPS = 32  # every GroupNorm has 32 groups (but the seed's gn_proj), so 32 must divide the ResNet's width
_UNIT = "block{b}/unit{u}"
_SEED_UNIT = HYBRID_PREFIX + ".body.block{b}.unit{u}"

# (npz key, seed state-dict key, transform)
ROOT_KEYS: tuple[tuple[str, str, str], ...] = (
    ("conv_root/kernel", HYBRID_PREFIX + ".root.conv.weight", "conv_hwio_to_oihw"),
    ("gn_root/scale", HYBRID_PREFIX + ".root.gn.weight", "group_norm"),
    ("gn_root/bias", HYBRID_PREFIX + ".root.gn.bias", "group_norm"),
)
UNIT_KEYS: tuple[tuple[str, str, str], ...] = (
    (f"{_UNIT}/conv1/kernel", f"{_SEED_UNIT}.conv1.weight", "conv_hwio_to_oihw"),
    (f"{_UNIT}/gn1/scale", f"{_SEED_UNIT}.gn1.weight", "group_norm"),
    (f"{_UNIT}/gn1/bias", f"{_SEED_UNIT}.gn1.bias", "group_norm"),
    (f"{_UNIT}/conv2/kernel", f"{_SEED_UNIT}.conv2.weight", "conv_hwio_to_oihw"),
    (f"{_UNIT}/gn2/scale", f"{_SEED_UNIT}.gn2.weight", "group_norm"),
    (f"{_UNIT}/gn2/bias", f"{_SEED_UNIT}.gn2.bias", "group_norm"),
    (f"{_UNIT}/conv3/kernel", f"{_SEED_UNIT}.conv3.weight", "conv_hwio_to_oihw"),
    (f"{_UNIT}/gn3/scale", f"{_SEED_UNIT}.gn3.weight", "group_norm"),
    (f"{_UNIT}/gn3/bias", f"{_SEED_UNIT}.gn3.bias", "group_norm"),
)
PROJECTION_KEYS: tuple[tuple[str, str, str], ...] = (  # unit1 of every stage only
    (f"{_UNIT}/conv_proj/kernel", f"{_SEED_UNIT}.downsample.weight", "conv_hwio_to_oihw"),
    (f"{_UNIT}/gn_proj/scale", f"{_SEED_UNIT}.gn_proj.weight", "group_norm"),
    (f"{_UNIT}/gn_proj/bias", f"{_SEED_UNIT}.gn_proj.bias", "group_norm"),
)

# npz array -> seed tensor, and back (for a seed `.bin` seen under the vit_jax names, e.g. by the reference).
TRANSFORMS = {
    "conv_hwio_to_oihw": lambda array: np.ascontiguousarray(np.asarray(array).transpose(3, 2, 0, 1)),
    "group_norm": lambda array: np.asarray(array).reshape(-1),
}
INVERSE_TRANSFORMS = {
    "conv_hwio_to_oihw": lambda array: np.ascontiguousarray(np.asarray(array).transpose(2, 3, 1, 0)),
    "group_norm": lambda array: np.asarray(array).reshape(-1),
}


def hybrid_key_table(num_layers: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """Every (npz key, seed key, transform) of a ResNet stem with `num_layers[k]` units in stage k + 1."""
    table = list(ROOT_KEYS)
    for stage, num_units in enumerate(num_layers, 1):
        for unit in range(1, num_units + 1):
            rules = UNIT_KEYS + (PROJECTION_KEYS if unit == 1 else ())
            table += [(npz.format(b=stage, u=unit), seed.format(b=stage, u=unit), t) for npz, seed, t in rules]
    return table


def npz_to_seed(arrays: Mapping[str, np.ndarray], num_layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The ResNet tensors of a hybrid `.npz` under the seed's names and PyTorch layouts (other keys are ignored)."""
    return {seed: TRANSFORMS[t](arrays[npz]) for npz, seed, t in hybrid_key_table(num_layers)}


def seed_to_npz(state_dict: Mapping[str, np.ndarray], num_layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The ResNet tensors of a seed state dict under the vit_jax names and layouts (GroupNorms as (C,))."""
    return {npz: INVERSE_TRANSFORMS[t](np.asarray(state_dict[seed])) for npz, seed, t in hybrid_key_table(num_layers)}


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, expected: tuple[int, ...], what: str) -> None:
    if key not in shapes:
        raise ConversionError(f"hybrid checkpoint has no {key!r} ({what}, expected shape {expected}): is it complete?")
    found = tuple(int(s) for s in shapes[key])
    if found != expected and not (len(expected) == 1 and found == (1, 1, 1, *expected)):
        raise ConversionError(
            f"hybrid checkpoint: {key!r} ({what}) has shape {found}, expected {expected} for the ResNet read off "
            "conv_root/kernel and the stages before it: the file is damaged or not a vit_jax hybrid."
        )


def detect_resnet(shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], float] | None:
    """
    The ResNet of a vit_jax hybrid from its `.npz` keys and shapes: `(num_layers, width_factor)`, e.g.
    `((3, 4, 9), 1.0)` for R50+ViT-B/16 and `((), 1.0)` for R+ViT-Ti/16; `None` for a plain ViT (no `conv_root`).

    Every ResNet tensor is checked against the shape the stages imply (GroupNorms as (C,) or (1, 1, 1, C)), a unit
    missing inside a stage or a key the ResNet does not have is refused, and so is an `embedding/kernel` whose input
    channels are not the feature map's: each with a one-line `ConversionError`.
    """
    if "conv_root/kernel" not in shapes:
        if any(re.match(r"(gn_root|block\d+)/", key) for key in shapes):
            raise ConversionError("hybrid checkpoint has ResNet keys but no 'conv_root/kernel' (7, 7, 3, width).")
        return None
    root = tuple(int(s) for s in shapes["conv_root/kernel"])
    if len(root) != 4 or root[:2] != (7, 7) or root[3] % GROUPS:
        raise ConversionError(
            f"hybrid checkpoint: 'conv_root/kernel' has shape {root}, expected (7, 7, channels, width) with a width "
            f"divisible by {GROUPS} (64 x width factor)."
        )
    width = root[3]
    _shape(shapes, "gn_root/scale", (width,), "root GroupNorm scale")
    _shape(shapes, "gn_root/bias", (width,), "root GroupNorm bias")

    units: dict[int, set[int]] = {}
    for key in shapes:
        match = re.match(r"block(\d+)/unit(\d+)/", key)
        if match:
            units.setdefault(int(match[1]), set()).add(int(match[2]))
        elif re.match(r"block\d+/", key):
            raise ConversionError(
                f"hybrid checkpoint: unexpected key {key!r}: stage keys are block{{b}}/unit{{u}}/..."
            )
    if sorted(units) != list(range(1, len(units) + 1)):
        raise ConversionError(
            f"hybrid checkpoint has stages {sorted(units)}: block{min(set(range(1, max(units) + 1)) - set(units))} "
            "is missing."
        )
    num_layers = []
    for stage in range(1, len(units) + 1):
        present = sorted(units[stage])
        if present != list(range(1, len(present) + 1)):
            missing = min(set(range(1, max(present) + 1)) - set(present))
            raise ConversionError(
                f"hybrid checkpoint: block{stage} has units {present}: block{stage}/unit{missing} is missing."
            )
        num_layers.append(len(present))

    expected: dict[str, tuple[int, ...]] = {}
    in_channels = width
    for stage, num_units in enumerate(num_layers, 1):
        mid = width * 2 ** (stage - 1)
        for unit in range(1, num_units + 1):
            prefix = f"block{stage}/unit{unit}"
            expected |= {
                f"{prefix}/conv1/kernel": (1, 1, in_channels, mid),
                f"{prefix}/gn1/scale": (mid,),
                f"{prefix}/gn1/bias": (mid,),
                f"{prefix}/conv2/kernel": (3, 3, mid, mid),
                f"{prefix}/gn2/scale": (mid,),
                f"{prefix}/gn2/bias": (mid,),
                f"{prefix}/conv3/kernel": (1, 1, mid, 4 * mid),
                f"{prefix}/gn3/scale": (4 * mid,),
                f"{prefix}/gn3/bias": (4 * mid,),
            }
            if unit == 1:
                expected |= {
                    f"{prefix}/conv_proj/kernel": (1, 1, in_channels, 4 * mid),
                    f"{prefix}/gn_proj/scale": (4 * mid,),
                    f"{prefix}/gn_proj/bias": (4 * mid,),
                }
            in_channels = 4 * mid
    for key, shape in expected.items():
        _shape(shapes, key, shape, key.rsplit("/", 2)[-2])
    for key in shapes:
        if re.match(r"block\d+/", key) and key not in expected:
            raise ConversionError(f"hybrid checkpoint: unexpected key {key!r}, which vit_jax's ResNet does not have.")
    if "embedding/kernel" in shapes:
        embedding = tuple(int(s) for s in shapes["embedding/kernel"])
        if len(embedding) != 4 or embedding[2] != in_channels:
            raise ConversionError(
                f"hybrid checkpoint: 'embedding/kernel' has shape {embedding}, expected (P, P, {in_channels}, D): "
                f"the ResNet read off the file ends with {in_channels} channels."
            )
    return tuple(num_layers), (width // 64 if width % 64 == 0 else width / 64)


def seed_shapes_as_npz(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A seed state dict's ResNet keys and shapes under the vit_jax names (OIHW -> HWIO), for `detect_resnet`;
    `embedding/kernel` comes from `patch_embeddings.weight`. Keys outside the ResNet are dropped."""
    to_npz = {}
    for npz, seed, transform in ROOT_KEYS + UNIT_KEYS + PROJECTION_KEYS:
        pattern = re.escape(seed).replace(r"\{b\}", r"(?P<b>\d+)").replace(r"\{u\}", r"(?P<u>\d+)")
        to_npz[re.compile(pattern + "$")] = (npz, transform)
    result = {}
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        hwio = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape  # from OIHW
        if key == "transformer.embeddings.patch_embeddings.weight":
            result["embedding/kernel"] = hwio
            continue
        for pattern, (npz, transform) in to_npz.items():
            match = pattern.match(key)
            if match:
                result[npz.format(**match.groupdict())] = hwio if transform == "conv_hwio_to_oihw" else shape
                break
        else:
            if key.startswith(HYBRID_PREFIX + "."):
                raise ConversionError(
                    f"seed hybrid checkpoint: unexpected key {key!r}, which the seed's ResNetV2 has not."
                )
    return result


__all__ = [
    "HYBRID_PREFIX",
    "PROJECTION_KEYS",
    "ROOT_KEYS",
    "TRANSFORMS",
    "UNIT_KEYS",
    "detect_resnet",
    "hybrid_key_table",
    "npz_to_seed",
    "seed_shapes_as_npz",
    "seed_to_npz",
]
