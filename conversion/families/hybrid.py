"""The R+ViT hybrids (vit_jax models_vit.py + models_resnet.py): a ResNet stem, then a ViT on its feature map.

Two families: vit_jax hybrid `.npz` files (`conv_root/...`, `gn_root/...`, `block{b}/unit{u}/...`, then the plain
ViT's keys, its `embedding` a 1x1 convolution on the feature map) and the seed repo's hybrid `*_checkpoint.bin`
(`transformer.embeddings.hybrid_model.*`, the seed's ResNet numerics). Each is its plain family (`vit_jax`, `seed`)
plus the ResNet: the architecture is read off the tensors (`conversion.hybrid_keys.detect_resnet`: stages, units,
width), the ViT part by the plain detector on the feature map, and the ResNet's tensors are rules appended to the plain
table. The reference runs `conversion.reference_resnet.resnet_features` before `flax_vit_forward`.
"""

import dataclasses
import re

import numpy as np

from ..checkpoint import Architecture
from ..hybrid_keys import HYBRID_PREFIX, detect_resnet, hybrid_key_table, seed_shapes_as_npz, seed_to_npz
from ..keys import Rule
from ..reference import round_to_dtype
from ..reference_resnet import resnet_features
from . import Family, seed, vit_jax


_NPZ_RESNET = re.compile(r"(conv_root|gn_root|block\d+)/")
_TRANSFORM = {"conv_hwio_to_oihw": "conv_hwio_to_oihw", "group_norm": "flatten"}  # hybrid_keys -> conversion.keys


def _num_layers(arch: Architecture) -> tuple[int, ...]:
    return tuple(dict(arch.extra_config)["resnet_num_layers"])


def _with_resnet(detect_plain, shapes, checkpoint, source_size, target_size, flavour: str) -> Architecture:
    """The plain detector on the feature map (sizes divided by the stem's stride), plus the ResNet."""
    num_layers, width_factor = detect_resnet(shapes)
    stride = 4 * 2 ** max(len(num_layers) - 1, 0)  # root conv /2, max-pool /2, then /2 per stage after the first

    def on_feature_map(size):
        return None if size is None else (max(size[0] // stride, 1), max(size[1] // stride, 1))

    arch = detect_plain(checkpoint, on_feature_map(source_size), on_feature_map(target_size))
    width = int(64 * width_factor)
    extra = (("resnet_num_layers", num_layers), ("resnet_width_factor", width_factor))
    if flavour != "vit_jax":
        extra += (("resnet_flavour", flavour),)
    return dataclasses.replace(
        arch,
        num_channels=shapes["conv_root/kernel"][2],
        stem_channels=arch.num_channels,  # what the plain detector read off the patch embedding
        stem_stride=stride,
        stem=f"hybrid: ResNet stem {list(num_layers)} width {width}"
        + (" (seed numerics)" if flavour == "seed" else ""),
        extra_config=extra,
    )


def _shape_text(shape) -> str:
    return " ".join(str(int(s)) for s in shape)


# --- vit_jax hybrid .npz ------------------------------------------------------------------------------------------


def npz_detect(checkpoint, source_size=None, target_size=None) -> Architecture:
    shapes = {key: checkpoint.shape(key) for key in checkpoint.keys()}
    return _with_resnet(vit_jax.detect, shapes, checkpoint, source_size, target_size, "vit_jax")


def npz_stem_rules(checkpoint, arch: Architecture) -> tuple[Rule, ...]:
    """The ResNet's keys, with the shapes `detect_resnet` checked ((C,) or (1, 1, 1, C) GroupNorms as in the file)."""
    return tuple(
        Rule(npz, target, _shape_text(checkpoint.shape(npz)), _TRANSFORM[transform])
        for npz, target, transform in hybrid_key_table(_num_layers(arch))
    )


def npz_reference_stem(checkpoint, arch: Architecture, images: np.ndarray, dtype: str) -> np.ndarray:
    params = {npz: round_to_dtype(checkpoint.load(npz), dtype) for npz, _, _ in hybrid_key_table(_num_layers(arch))}
    return resnet_features(params, images.transpose(0, 2, 3, 1), flavour="vit_jax").transpose(0, 3, 1, 2)


FAMILY = Family(
    name="vit_jax hybrid .npz",
    table=vit_jax.TABLE,
    matches=lambda checkpoint: checkpoint.kind == "npz" and any(_NPZ_RESNET.match(key) for key in checkpoint.keys()),
    detect=npz_detect,
    reference_params=lambda checkpoint, arch: checkpoint,  # already under the reference's names
    stem_rules=npz_stem_rules,
    reference_stem=npz_reference_stem,
)


# --- seed hybrid *_checkpoint.bin ---------------------------------------------------------------------------------


def seed_detect(checkpoint, source_size=None, target_size=None) -> Architecture:
    shapes = seed_shapes_as_npz({key: checkpoint.shape(key) for key in checkpoint.keys()})
    return _with_resnet(seed.detect, shapes, checkpoint, source_size, target_size, "seed")


def seed_stem_rules(checkpoint, arch: Architecture) -> tuple[Rule, ...]:
    """The ResNet's keys, already in hf_vit's names and layouts (their shapes were checked under the npz names)."""
    return tuple(
        Rule(target, target, _shape_text(checkpoint.shape(target)))
        for _, target, _ in hybrid_key_table(_num_layers(arch))
    )


def seed_reference_stem(checkpoint, arch: Architecture, images: np.ndarray, dtype: str) -> np.ndarray:
    num_layers = _num_layers(arch)
    state = {target: round_to_dtype(checkpoint.load(target), dtype) for _, target, _ in hybrid_key_table(num_layers)}
    params = seed_to_npz(state, num_layers)
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
