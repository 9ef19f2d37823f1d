"""The R+ViT hybrids (vit_jax models_vit.py + models_resnet.py): a ResNet stem, then a ViT on its feature map.

Two families, each its plain family plus the ResNet: vit_jax hybrid `.npz` files (`conv_root/...`, `gn_root/...`,
`block{b}/unit{u}/...`, then the plain ViT's keys, its `embedding` a 1x1 convolution on the feature map) and the seed
repo's hybrid `*_checkpoint.bin` (`transformer.embeddings.hybrid_model.*`, the seed's ResNet numerics). The detector
reads the stages, units and width off the keys and the root convolution; `resnet_tensors` then lays out every ResNet
tensor with its shape, and those become rules planned before the plain table, so that the planner checks every shape
and refuses a missing or extra key like any other. The ViT part is the plain detector on the feature map. The
reference runs `conversion.reference_resnet.resnet_features` before `flax_vit_forward`.

Names: vit_jax's `conv_root`, `gn_root`, `block{b}/unit{u}/{conv1,gn1,...,conv_proj,gn_proj}` are the seed's (and so
hf_vit's) `root.conv`, `root.gn`, `body.block{b}.unit{u}.{conv1,gn1,...,downsample,gn_proj}`. Kernels are HWIO in the
`.npz` and OIHW in PyTorch; the GroupNorm scales and biases are (C,), or (1, 1, 1, C) in the 2020 files. Only unit1 of
each stage has the projection: that is where vit_jax's `needs_projection` holds (4x the root's channels in block1,
stride 2 in the later ones).
"""

import dataclasses
import re

import numpy as np

from ..checkpoint import Architecture
from ..errors import ConversionError
from ..keys import TRANSFORMS, Rule
from ..reference import round_to_dtype
from ..reference_resnet import resnet_features
from . import Family, seed, vit_jax


HYBRID_PREFIX = "transformer.embeddings.hybrid_model"
GROUPS = 32  # every GroupNorm has 32 groups (but the seed's gn_proj), so 32 must divide the ResNet's width


def resnet_tensors(num_layers, width: int, channels: int = 3) -> list[tuple[str, str, tuple[int, ...]]]:
    """(vit_jax name, seed name, vit_jax shape) of every ResNet tensor: HWIO kernels, (C,) GroupNorms."""
    tensors = []

    def conv(npz: str, seed: str, kernel: int, cin: int, cout: int) -> None:
        tensors.append((f"{npz}/kernel", f"{HYBRID_PREFIX}.{seed}.weight", (kernel, kernel, cin, cout)))

    def norm(npz: str, seed: str, size: int) -> None:
        tensors.append((f"{npz}/scale", f"{HYBRID_PREFIX}.{seed}.weight", (size,)))
        tensors.append((f"{npz}/bias", f"{HYBRID_PREFIX}.{seed}.bias", (size,)))

    conv("conv_root", "root.conv", 7, channels, width)
    norm("gn_root", "root.gn", width)
    cin = width
    for stage, num_units in enumerate(num_layers, 1):
        mid = width * 2 ** (stage - 1)
        for unit in range(1, num_units + 1):
            npz, seed_name = f"block{stage}/unit{unit}", f"body.block{stage}.unit{unit}"
            for i, (kernel, cout) in enumerate(((1, mid), (3, mid), (1, 4 * mid)), 1):
                conv(f"{npz}/conv{i}", f"{seed_name}.conv{i}", kernel, mid if i > 1 else cin, cout)
                norm(f"{npz}/gn{i}", f"{seed_name}.gn{i}", cout)
            if unit == 1:
                conv(f"{npz}/conv_proj", f"{seed_name}.downsample", 1, cin, 4 * mid)
                norm(f"{npz}/gn_proj", f"{seed_name}.gn_proj", 4 * mid)
            cin = 4 * mid
    return tensors


def _shape_text(shape) -> str:
    return " ".join(str(int(s)) for s in shape)


def _resnet(arch: Architecture) -> tuple[tuple[int, ...], int]:
    extra = dict(arch.extra_config)
    return tuple(extra["resnet_num_layers"]), round(64 * extra["resnet_width_factor"])


def _count(checkpoint, pattern: str, sep: str) -> tuple[int, ...]:
    """Units per stage, read off the keys (`pattern` captures the stage and unit); a gap is refused in one line."""
    units: dict[int, set[int]] = {}
    for key in checkpoint.keys():
        if match := re.match(pattern, key):
            units.setdefault(int(match[1]), set()).add(int(match[2]))
    if sorted(units) != list(range(1, len(units) + 1)):
        missing = min(set(range(1, max(units) + 1)) - set(units))
        raise ConversionError(
            f"{checkpoint.path}: hybrid checkpoint has stages {sorted(units)}: block{missing} is missing."
        )
    for stage, present in sorted(units.items()):
        if sorted(present) != list(range(1, len(present) + 1)):
            missing = min(set(range(1, max(present) + 1)) - present)
            raise ConversionError(
                f"{checkpoint.path}: hybrid checkpoint: block{stage} has units {sorted(present)}: "
                f"block{stage}{sep}unit{missing} is missing."
            )
    return tuple(len(units[stage]) for stage in sorted(units))


def _with_resnet(detect_plain, checkpoint, source_size, target_size, root: str, unit_pattern: str, flavour: str):
    """The plain detector on the feature map (sizes divided by the stem's stride), plus the ResNet off the keys."""
    if root not in checkpoint.keys():
        raise ConversionError(f"{checkpoint.path}: hybrid checkpoint has ResNet keys but no {root!r}: is it complete?")
    shape = tuple(checkpoint.shape(root))
    hwio = shape if flavour == "vit_jax" else shape[2:] + shape[1::-1]  # the seed's OIHW as HWIO
    if len(hwio) != 4 or hwio[:2] != (7, 7) or hwio[3] % GROUPS:
        raise ConversionError(
            f"{checkpoint.path}: {root!r} has shape {tuple(shape)}, expected a 7x7 convolution with a width "
            f"divisible by {GROUPS} (64 x width factor)."
        )
    channels, width = hwio[2:]
    num_layers = _count(checkpoint, unit_pattern, "/" if flavour == "vit_jax" else ".")
    stride, stem_channels = resnet_geometry(num_layers, width)

    def on_feature_map(size):
        return None if size is None else (max(size[0] // stride, 1), max(size[1] // stride, 1))

    arch = detect_plain(checkpoint, on_feature_map(source_size), on_feature_map(target_size))
    extra = (
        ("resnet_num_layers", num_layers),
        ("resnet_width_factor", width // 64 if width % 64 == 0 else width / 64),
    )
    if flavour != "vit_jax":
        extra += (("resnet_flavour", flavour),)
    return dataclasses.replace(
        arch,
        num_channels=channels,
        stem_channels=stem_channels,
        stem_stride=stride,
        stem=stem_description(num_layers, width) + (" (seed numerics)" if flavour == "seed" else ""),
        extra_config=extra,
    )


def resnet_geometry(num_layers, width: int) -> tuple[int, int]:
    """(stride, channels) of the ResNet's feature map: root conv /2, max-pool /2, then /2 per stage after the first;
    4x the widest stage's width (the root's width alone)."""
    stride = 4 * 2 ** max(len(num_layers) - 1, 0)
    return stride, 4 * width * 2 ** (len(num_layers) - 1) if num_layers else width


def stem_description(num_layers, width: int) -> str:
    return f"hybrid: ResNet stem {list(num_layers)} width {width}"


# --- vit_jax hybrid .npz ------------------------------------------------------------------------------------------


def npz_detect(checkpoint, source_size=None, target_size=None) -> Architecture:
    return _with_resnet(
        vit_jax.detect, checkpoint, source_size, target_size, "conv_root/kernel", r"block(\d+)/unit(\d+)/",
        "vit_jax",
    )  # fmt: skip


def npz_stem_rules(checkpoint, arch: Architecture) -> tuple[Rule, ...]:
    """The ResNet's tensors; the GroupNorms in the file's form ((C,) or the 2020 files' (1, 1, 1, C), as gn_root)."""
    legacy = "gn_root/scale" in checkpoint.keys() and len(checkpoint.shape("gn_root/scale")) == 4
    return stem_table(arch, legacy_group_norms=legacy)


def stem_table(arch: Architecture, *, legacy_group_norms: bool) -> tuple[Rule, ...]:
    """The ResNet's rules: HWIO kernels, GroupNorms (C,) or, with `legacy_group_norms`, (1, 1, 1, C)."""
    rules = []
    for npz, target, shape in resnet_tensors(*_resnet(arch), arch.num_channels):
        if len(shape) == 4:
            rules.append(Rule(npz, target, _shape_text(shape), "conv_hwio_to_oihw"))
        else:
            rules.append(Rule(npz, target, _shape_text((1, 1, 1, *shape) if legacy_group_norms else shape), "flatten"))
    return tuple(rules)


def npz_reference_stem(checkpoint, arch: Architecture, images: np.ndarray, dtype: str) -> np.ndarray:
    tensors = resnet_tensors(*_resnet(arch), arch.num_channels)
    params = {npz: round_to_dtype(checkpoint.load(npz), dtype) for npz, _, _ in tensors}
    return resnet_features(params, images.transpose(0, 2, 3, 1), flavour="vit_jax").transpose(0, 3, 1, 2)


FAMILY = Family(
    name="vit_jax hybrid .npz",
    table=vit_jax.TABLE,
    matches=lambda checkpoint: (
        checkpoint.kind == "npz" and any(re.match(r"(conv_root|gn_root|block\d+)/", key) for key in checkpoint.keys())
    ),
    detect=npz_detect,
    reference_params=lambda checkpoint, arch: checkpoint,  # already under the reference's names
    stem_rules=npz_stem_rules,
    reference_stem=npz_reference_stem,
)


# --- seed hybrid *_checkpoint.bin ---------------------------------------------------------------------------------


def seed_detect(checkpoint, source_size=None, target_size=None) -> Architecture:
    return _with_resnet(
        seed.detect, checkpoint, source_size, target_size, f"{HYBRID_PREFIX}.root.conv.weight",
        re.escape(HYBRID_PREFIX) + r"\.body\.block(\d+)\.unit(\d+)\.", "seed",
    )  # fmt: skip


def seed_stem_rules(checkpoint, arch: Architecture) -> tuple[Rule, ...]:
    """The ResNet's tensors, already in hf_vit's names and layouts."""
    tensors = resnet_tensors(*_resnet(arch), arch.num_channels)
    to_oihw = TRANSFORMS["conv_hwio_to_oihw"].shape
    return tuple(Rule(target, target, _shape_text(to_oihw(s, None) if len(s) == 4 else s)) for _, target, s in tensors)


def seed_reference_stem(checkpoint, arch: Architecture, images: np.ndarray, dtype: str) -> np.ndarray:
    params = {}
    for npz, target, shape in resnet_tensors(*_resnet(arch), arch.num_channels):
        array = round_to_dtype(checkpoint.load(target), dtype)
        params[npz] = array.transpose(2, 3, 1, 0) if len(shape) == 4 else array  # OIHW -> HWIO
    return resnet_features(params, images.transpose(0, 2, 3, 1), flavour="seed").transpose(0, 3, 1, 2)


SEED_FAMILY = Family(
    name="seed hybrid *_checkpoint.bin",
    table=seed.TABLE,
    matches=lambda checkpoint: (
        checkpoint.kind == "seed" and any(key.startswith(HYBRID_PREFIX + ".") for key in checkpoint.keys())
    ),
    detect=seed_detect,
    reference_params=seed.reference_params,
    hidden_act="gelu",
    seed=True,
    stem_rules=seed_stem_rules,
    reference_stem=seed_reference_stem,
)
