"""R+ViT hybrids: the ResNet stem against the NumPy reference of vit_jax, the seed's layout and numerics, the key table
and its detector, and everything plain ViT supports (Auto classes, remote code, pipeline, maps, compile, bf16)."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from PIL import Image
from test_modeling import seed_forward, seed_state_dict
from transformers import AutoModelForImageClassification, pipeline

from conversion.checkpoint import Architecture
from conversion.errors import ConversionError
from conversion.families import find_family
from conversion.families.hybrid import resnet_tensors
from conversion.families.vit_jax import TABLE as NPZ_KEY_TABLE
from conversion.keys import TRANSFORMS, Context, plan_conversion
from conversion.reference import flax_vit_forward
from conversion.reference_resnet import conv2d, group_norm, max_pool, relu, resnet_features, same_pads
from conversion.testing import random_resnet_arrays, random_vit_arrays
from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification
from hf_vit.modeling_resnet import same_padding
from hf_vit.verification import relative_difference
from hf_vit.visualization import attention_map


R50 = (3, 4, 9)
# The tiny transformer of every test on the full R50 stem: 64 px -> 32 -> 16 (pool) -> 16 -> 8 -> 4, a 4x4 grid.
HYBRID = dict(TINY, image_size=64, patch_size=1, resnet_num_layers=list(R50))


def hybrid_npz_arrays(num_layers=R50, width: int = 64, grid: int = 4, gn_shape: str = "1110") -> dict[str, np.ndarray]:
    """A whole hybrid `.npz` (ResNet + tiny ViT with 1x1 patches) in the exact vit_jax layout."""
    arrays = random_resnet_arrays(num_layers, width=width, gn_shape=gn_shape)
    channels = 4 * width * 2 ** (len(num_layers) - 1) if num_layers else width
    vit = random_vit_arrays(patch_size=1, image_size=grid, seed=1)  # hidden 32, 2 layers, 4 heads, MLP 37, 10 classes
    kernel = np.random.default_rng(2).standard_normal((1, 1, channels, 32)) / math.sqrt(channels)
    vit["embedding/kernel"] = kernel.astype(np.float32)
    return arrays | vit


def resnet_state_dict(arrays, num_layers, width: int = 64) -> dict[str, np.ndarray]:
    """The ResNet tensors of a hybrid `.npz` under the seed's names: HWIO kernels to OIHW, GroupNorms to (C,)."""
    return {
        seed: TRANSFORMS["conv_hwio_to_oihw" if len(shape) == 4 else "flatten"].array(arrays[npz], None)
        for npz, seed, shape in resnet_tensors(num_layers, width)
    }


class ShapesOnly:
    """A checkpoint of which only the headers are known (zeros when loaded): full-size layouts and damage, cheaply."""

    path = "R50+ViT-B_16.npz"

    def __init__(self, shapes, kind: str = "npz"):
        self.shapes, self.kind = shapes, kind

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return tuple(self.shapes[key])

    def load(self, key):
        return np.zeros(self.shapes[key], np.float32)


def planned(shapes, kind: str = "npz"):
    """What the converter makes of a checkpoint with these keys and shapes: (family, architecture, plan)."""
    checkpoint = ShapesOnly(shapes, kind)
    family = find_family(checkpoint)
    arch = family.detect(checkpoint, None, None)
    arch = (
        arch if arch.num_heads else dataclasses.replace(arch, num_heads=4)
    )  # a seed .bin's heads come from --variant
    return family, arch, plan_conversion(checkpoint, family.rules(checkpoint, arch), arch, target_grid=arch.grid)


def resnet_of(arch) -> tuple:
    extra = dict(arch.extra_config)
    return extra["resnet_num_layers"], extra["resnet_width_factor"]


def state_dict_from_npz(arrays, num_layers, grid=(4, 4)) -> dict[str, torch.Tensor]:
    """The conversion: the plain ViT's key table for the transformer, the hybrid family's tensors for the ResNet."""
    context = Context(grid, grid, 1)
    state = {}
    for rule in NPZ_KEY_TABLE:
        if rule.when == "pre_logits" and "pre_logits/kernel" not in arrays:
            continue
        for i in range(2) if "{i}" in rule.source else (None,):
            array = TRANSFORMS[rule.transform].array(arrays[rule.source.format(i=i)], context)
            state[rule.target.format(i=i)] = np.asarray(array)
    state |= resnet_state_dict(arrays, num_layers)
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}


def reference_logits(arrays, images: np.ndarray, flavour: str = "vit_jax") -> tuple[np.ndarray, np.ndarray]:
    """(feature map NHWC, logits) of the NumPy references: ResNet stem, then the ViT part on the feature map."""
    features = resnet_features(arrays, images.transpose(0, 2, 3, 1), flavour=flavour)
    arch = Architecture(32, 2, 4, 37, (1, 1), features.shape[-1], (4, 4), 10, "token", None)
    _, logits = flax_vit_forward(arrays, arch, features.transpose(0, 3, 1, 2))
    return features, logits


@pytest.fixture(scope="module")
def r50_hybrid():
    arrays = hybrid_npz_arrays()
    model = VisionTransformerForImageClassification(VisionTransformerConfig(**HYBRID)).eval()
    model.load_state_dict(state_dict_from_npz(arrays, R50), strict=True)
    return arrays, model


# --- parity with the NumPy reference of vit_jax -------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (70, 72)])  # the native size; odd sizes through interpolation
def test_r50_hybrid_matches_the_numpy_reference(r50_hybrid, size):
    arrays, model = r50_hybrid
    images = np.random.default_rng(3).uniform(-1, 1, (2, 3, *size))
    features, logits = reference_logits(arrays, images)
    stem = model.transformer.embeddings.hybrid_model
    with torch.no_grad():
        # float64: the same numerics, so only float64 rounding may differ
        model64 = VisionTransformerForImageClassification(model.config).double().eval()
        model64.load_state_dict(model.state_dict())
        features64 = model64.transformer.embeddings.hybrid_model(torch.from_numpy(images)).numpy()
        logits64 = model64(torch.from_numpy(images), interpolate_pos_encoding=True).logits.numpy()
        # float32, what is shipped
        pixel_values = torch.from_numpy(images.astype(np.float32))
        features32 = stem(pixel_values).double().numpy()
        logits32 = model(pixel_values, interpolate_pos_encoding=True).logits.double().numpy()
    assert features64.transpose(0, 2, 3, 1).shape == features.shape == (2, *model.config.feature_map_size(*size), 1024)
    np.testing.assert_allclose(features64.transpose(0, 2, 3, 1), features, rtol=0, atol=1e-10)
    # (at another size the reference rounds the resampled position embeddings to float32, as the converter stores them)
    np.testing.assert_allclose(logits64, logits, rtol=0, atol=1e-10 if size == (64, 64) else 1e-8)
    # float32: 16 units and 49 GroupNorms compound rounding to ~3e-5 of the feature map's largest value and ~1e-5 of
    # the logits' scale (measured on Intel AMX and AMD Zen 4, 1 and 2 threads: 3.1-4.0e-5 and 0.9-1.2e-5), by an
    # amount that depends on the CPU's kernels and thread count. So this bound is 1e-3, far above any CPU's rounding
    # and far below what a float32-only defect gives (bf16 rounding of the same model: 1e-1).
    assert relative_difference(features32.transpose(0, 2, 3, 1), features) < 1e-3
    assert relative_difference(logits32, logits) < 1e-3


def test_the_reference_tells_the_seed_numerics_apart(r50_hybrid):
    """The parity above can fail: the seed's four differences move the feature map by far more than its bound."""
    arrays, model = r50_hybrid
    images = np.random.default_rng(3).uniform(-1, 1, (1, 3, 64, 64))
    vit_jax, _ = reference_logits(arrays, images)
    seed, _ = reference_logits(arrays, images, flavour="seed")
    assert np.abs(seed - vit_jax).max() / np.abs(vit_jax).max() > 1e-2


# --- the released R50+ViT-B/16 layout ------------------------------------------------------------------------------


def r50_vit_b16_imagenet21k_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `imagenet21k/R50+ViT-B_16.npz`, written out: 2020 GroupNorms (1, 1, 1, C), pre_logits 768,
    a 21843-class head, position embeddings for 14x14 + 1 tokens."""
    shapes = {"conv_root/kernel": (7, 7, 3, 64), "gn_root/scale": (1, 1, 1, 64), "gn_root/bias": (1, 1, 1, 64)}
    cin = 64
    for b, (units, mid) in enumerate(zip((3, 4, 9), (64, 128, 256), strict=True), 1):
        for u in range(1, units + 1):
            p = f"block{b}/unit{u}"
            shapes |= {f"{p}/conv1/kernel": (1, 1, cin, mid), f"{p}/conv2/kernel": (3, 3, mid, mid)}
            shapes |= {f"{p}/conv3/kernel": (1, 1, mid, 4 * mid)}
            for gn, c in (("gn1", mid), ("gn2", mid), ("gn3", 4 * mid)) + ((("gn_proj", 4 * mid),) if u == 1 else ()):
                shapes |= {f"{p}/{gn}/scale": (1, 1, 1, c), f"{p}/{gn}/bias": (1, 1, 1, c)}
            if u == 1:
                shapes[f"{p}/conv_proj/kernel"] = (1, 1, cin, 4 * mid)
            cin = 4 * mid
    shapes |= {"embedding/kernel": (1, 1, 1024, 768), "embedding/bias": (768,), "cls": (1, 1, 768)}
    shapes["Transformer/posembed_input/pos_embedding"] = (1, 197, 768)
    for i in range(12):
        block, attention = (
            f"Transformer/encoderblock_{i}",
            f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1",
        )
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            shapes |= {f"{block}/{norm}/scale": (768,), f"{block}/{norm}/bias": (768,)}
        for name in ("query", "key", "value"):
            shapes |= {f"{attention}/{name}/kernel": (768, 12, 64), f"{attention}/{name}/bias": (12, 64)}
        shapes |= {f"{attention}/out/kernel": (12, 64, 768), f"{attention}/out/bias": (768,)}
        shapes |= {f"{block}/MlpBlock_3/Dense_0/kernel": (768, 3072), f"{block}/MlpBlock_3/Dense_0/bias": (3072,)}
        shapes |= {f"{block}/MlpBlock_3/Dense_1/kernel": (3072, 768), f"{block}/MlpBlock_3/Dense_1/bias": (768,)}
    shapes |= {"Transformer/encoder_norm/scale": (768,), "Transformer/encoder_norm/bias": (768,)}
    shapes |= {"pre_logits/kernel": (768, 768), "pre_logits/bias": (768,)}
    shapes |= {"head/kernel": (768, 21843), "head/bias": (21843,)}
    return shapes


def test_r50_vit_b16_imagenet21k_layout_maps_onto_the_model_with_115_277_971_parameters():
    shapes = r50_vit_b16_imagenet21k_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == 115_277_971
    assert resnet_of(planned(shapes)[1]) == ((3, 4, 9), 1)
    config = VisionTransformerConfig.from_variant("R50+ViT-B_16", representation_size=768, num_labels=21843)
    with torch.device("meta"):
        model = VisionTransformerForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == 115_277_971
    # Every npz key goes to exactly one model key, with the shape its transform gives; every model key is filled.
    context = Context((14, 14), (14, 14), 1)
    expected = {}
    for rule in NPZ_KEY_TABLE:
        for i in range(12) if "{i}" in rule.source else (None,):
            source = rule.source.format(i=i)
            expected[rule.target.format(i=i)] = (source, TRANSFORMS[rule.transform].shape(shapes[source], context))
    for source, target, kind in resnet_tensors((3, 4, 9), 64):
        shape = shapes[source]  # GroupNorms (1, 1, 1, C) in this file
        expected[target] = (source, (shape[3], shape[2], shape[0], shape[1]) if len(kind) == 4 else shape[-1:])
    assert sorted(source for source, _ in expected.values()) == sorted(shapes)
    state_dict = model.state_dict()
    assert sorted(state_dict) == sorted(expected)
    for key, (source, shape) in expected.items():
        assert tuple(state_dict[key].shape) == tuple(shape), (key, source)


# --- TF "SAME" padding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, kernel, stride, pads",
    [  # TensorFlow's rule: out = ceil(size / stride), pad = max((out - 1) * stride + kernel - size, 0), odd one after
        (224, 7, 2, (2, 3)),  # the root conv at 224: 2 before, 3 after (the seed pads 3 and 3)
        (384, 7, 2, (2, 3)),
        (225, 7, 2, (3, 3)),
        (112, 3, 2, (0, 1)),  # the max-pool and the stride-2 3x3 convs on even sizes (the seed: 0 and 1 / 1 and 1)
        (113, 3, 2, (1, 1)),
        (56, 3, 1, (1, 1)),
        (56, 1, 1, (0, 0)),
        (56, 1, 2, (0, 0)),  # conv_proj
        (55, 1, 2, (0, 0)),
    ],
)
def test_same_padding_is_tensorflows(size, kernel, stride, pads):
    assert same_padding(size, kernel, stride) == pads
    assert same_pads(size, kernel, stride) == pads


@pytest.mark.parametrize("size", [(224, 224), (384, 384), (240, 200)])
def test_root_and_pool_match_the_reference_at_224_384_and_non_square(size):
    """In float64 (so any padding offset shows): conv_root -> gn_root -> ReLU -> max-pool, the reference's SAME."""
    arrays = random_resnet_arrays(())
    config = VisionTransformerConfig(**{**HYBRID, "resnet_num_layers": [], "patch_size": 4})
    stem = VisionTransformerForImageClassification(config).double().transformer.embeddings.hybrid_model
    prefix = "transformer.embeddings.hybrid_model."
    stem.load_state_dict(
        {k.removeprefix(prefix): torch.from_numpy(v) for k, v in resnet_state_dict(arrays, ()).items()}
    )
    images = np.random.default_rng(4).uniform(-1, 1, (1, *size, 3))
    expected = max_pool(
        relu(
            group_norm(conv2d(images, arrays["conv_root/kernel"], 2), arrays["gn_root/scale"], arrays["gn_root/bias"])
        )
    )
    with torch.no_grad():
        found = stem(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert found.shape[1:3] == config.feature_map_size(*size) == (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(224, 224), (384, 384), (240, 200)])
def test_feature_map_of_r50_follows_the_input_size(size):
    model = VisionTransformerForImageClassification(VisionTransformerConfig(**HYBRID)).eval()
    with torch.no_grad():
        features = model.transformer.embeddings.hybrid_model(torch.zeros(1, 3, *size))
    assert tuple(features.shape) == (1, 1024, *model.config.feature_map_size(*size))
    assert model.config.feature_map_size(*size) == (math.ceil(size[0] / 16), math.ceil(size[1] / 16))


# --- the seed's hybrid: its layout and its numerics ----------------------------------------------------------------


def seed_hybrid_state_dict(config: VisionTransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seed `R50-ViT-B_16`-style `*_checkpoint.bin` state dict, its ResNet keys and shapes written out."""
    width, layers = config.resnet_width, config.resnet_num_layers
    prefix = "transformer.embeddings.hybrid_model"
    shapes = {f"{prefix}.root.conv.weight": (width, 3, 7, 7)}
    shapes |= {f"{prefix}.root.gn.weight": (width,), f"{prefix}.root.gn.bias": (width,)}
    cin = width
    for b, units in enumerate(layers, 1):
        mid = width * 2 ** (b - 1)
        for u in range(1, units + 1):
            unit = f"{prefix}.body.block{b}.unit{u}"
            shapes |= {f"{unit}.conv1.weight": (mid, cin, 1, 1), f"{unit}.conv2.weight": (mid, mid, 3, 3)}
            shapes |= {f"{unit}.conv3.weight": (4 * mid, mid, 1, 1)}
            for gn, c in (("gn1", mid), ("gn2", mid), ("gn3", 4 * mid)) + ((("gn_proj", 4 * mid),) if u == 1 else ()):
                shapes |= {f"{unit}.{gn}.weight": (c,), f"{unit}.{gn}.bias": (c,)}
            if u == 1:
                shapes[f"{unit}.downsample.weight"] = (4 * mid, cin, 1, 1)
            cin = 4 * mid
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if len(shape) == 4:
            state[key] = values / math.sqrt(math.prod(shape[1:]))
        else:
            state[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * values
    vit = seed_state_dict(config, seed=seed)  # the transformer part, with patch_embeddings (D, 3, P, P)
    vit["transformer.embeddings.patch_embeddings.weight"] = (
        torch.randn((32, cin, 1, 1), generator=generator) / cin**0.5
    )
    return state | vit


def seed_resnet_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The seed's ResNetV2 (jeonsworld modeling_resnet.py) written out with torch.nn.functional."""
    prefix = "transformer.embeddings.hybrid_model"

    def std_conv(name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        w = sd[f"{name}.weight"]
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return F.conv2d(x, (w - m) / torch.sqrt(v + 1e-5), None, stride, w.shape[-1] // 2)

    def gn(name: str, x: torch.Tensor, groups: int = 32, eps: float = 1e-6) -> torch.Tensor:
        return F.group_norm(x, groups, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)

    x = F.relu(gn(f"{prefix}.root.gn", std_conv(f"{prefix}.root.conv", x, 2)))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=0)
    for b in (1, 2, 3):
        u = 1
        while f"{prefix}.body.block{b}.unit{u}.conv1.weight" in sd:
            unit, stride = f"{prefix}.body.block{b}.unit{u}", 2 if b > 1 and u == 1 else 1
            residual = x
            if f"{unit}.downsample.weight" in sd:
                residual = std_conv(f"{unit}.downsample", x, stride)
                residual = gn(f"{unit}.gn_proj", residual, groups=residual.shape[1], eps=1e-5)
            y = F.relu(gn(f"{unit}.gn1", std_conv(f"{unit}.conv1", x)))
            y = F.relu(gn(f"{unit}.gn2", std_conv(f"{unit}.conv2", y, stride)))
            y = gn(f"{unit}.gn3", std_conv(f"{unit}.conv3", y))
            x = F.relu(residual + y)
            u += 1
    return x


def test_seed_hybrid_state_dict_loads_strict_and_gives_the_seed_logits():
    # 64 px through the seed's unpadded pool: 32 -> 15 -> 15 -> 8 -> 4 (vit_jax: 32 -> 16 -> ... -> 4)
    config = VisionTransformerConfig(
        **{**HYBRID, "resnet_num_layers": [2, 1, 2]}, resnet_flavour="seed", hidden_act="gelu"
    )
    # float64 on both sides, so that only the structure is compared, not this CPU's float32 rounding
    state_dict = {key: value.double() for key, value in seed_hybrid_state_dict(config).items()}
    model = VisionTransformerForImageClassification(config).double().eval()
    assert sorted(model.state_dict()) == sorted(state_dict)
    model.load_state_dict(state_dict, strict=True)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    features = seed_resnet_forward(state_dict, pixel_values)
    assert features.shape == (2, 1024, 4, 4)
    expected = seed_forward(state_dict, features, heads=4, layers=2)
    with torch.no_grad():
        torch.testing.assert_close(
            model.transformer.embeddings.hybrid_model(pixel_values), features, atol=1e-10, rtol=1e-10
        )
        torch.testing.assert_close(model(pixel_values).logits, expected, atol=1e-10, rtol=1e-10)
        # the same weights with vit_jax numerics give other logits: the flavour is what makes a seed .bin faithful
        original = (
            VisionTransformerForImageClassification(
                VisionTransformerConfig(**{**config.to_dict(), "resnet_flavour": "vit_jax"})
            )
            .double()
            .eval()
        )
        original.load_state_dict(state_dict, strict=True)
        assert (original(pixel_values).logits - expected).abs().max() > 1e-2
    # the detector reads the seed's layout too (the seed always has three stages)
    family, arch, _ = planned({key: tuple(value.shape) for key, value in state_dict.items()}, kind="seed")
    assert family.name == "seed hybrid *_checkpoint.bin" and resnet_of(arch) == ((2, 1, 2), 1)


def test_npz_resnet_tensors_go_to_the_seed_names_and_layouts():
    arrays = random_resnet_arrays((2, 1), gn_shape="1110")
    seed = resnet_state_dict(arrays, (2, 1))
    root = seed["transformer.embeddings.hybrid_model.root.conv.weight"]
    assert root.shape == (64, 3, 7, 7) and root[5, 2, 1, 6] == arrays["conv_root/kernel"][1, 6, 2, 5]  # HWIO -> OIHW
    assert seed["transformer.embeddings.hybrid_model.body.block2.unit1.gn_proj.bias"].shape == (512,)
    assert "transformer.embeddings.hybrid_model.body.block1.unit2.downsample.weight" not in seed
    assert sorted(npz for npz, _, _ in resnet_tensors((2, 1), 64)) == sorted(arrays)


# --- the hybrid detector and planner: the architecture from the tensors, and bad files -----------------------------


def shapes_of(arrays) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in arrays.items()}


@pytest.mark.parametrize(
    "num_layers, width, gn_shape",
    [((3, 4, 9), 64, "1110"), ((2, 2, 2, 2), 64, "C"), ((3, 4, 6, 3), 64, "1110"), ((), 64, "C"), ((1, 1), 96, "C")],
)
def test_the_resnet_is_read_off_stages_units_and_width(num_layers, width, gn_shape):
    family, arch, plan = planned(shapes_of(hybrid_npz_arrays(num_layers, width, gn_shape=gn_shape)))
    assert family.name == "vit_jax hybrid .npz"
    assert resnet_of(arch) == (num_layers, width / 64 if width % 64 else width // 64)
    assert len(plan.entries) == len(resnet_tensors(num_layers, width)) + 2 * 16 + 8  # + the tiny ViT's tensors


def test_a_plain_vit_is_not_a_hybrid():
    family, arch, _ = planned(shapes_of(random_vit_arrays()))
    assert family.name == "vit_jax .npz" and not arch.stem


def _without(shapes, *prefixes):
    return {k: v for k, v in shapes.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: _without(s, "block2/unit3/"), r"block2 has units \[1, 2, 4\]: block2/unit3 is missing"),
        (lambda s: _without(s, "block2/"), r"stages \[1, 3\]: block2 is missing"),
        (
            lambda s: s | {"block1/unit2/gn2/scale": (1, 1, 1, 32)},
            r"'block1/unit2/gn2/scale' has shape \(1, 1, 1, 32\), expected \(1, 1, 1, 64\) for",
        ),
        (
            lambda s: s | {"block3/unit1/conv2/kernel": (3, 3, 256, 128)},
            r"'block3/unit1/conv2/kernel' has shape \(3, 3, 256, 128\), expected \(3, 3, 256, 256\)",
        ),
        (lambda s: _without(s, "block1/unit1/conv_proj/"), r"missing key 'block1/unit1/conv_proj/kernel'"),
        (
            lambda s: s | {"block1/unit2/conv_proj/kernel": (1, 1, 256, 256)},
            r"unexpected key\(s\) that no rule converts: 'block1/unit2/conv_proj/kernel'",
        ),
        (
            lambda s: s | {"embedding/kernel": (1, 1, 512, 32)},
            r"'embedding/kernel' has shape \(1, 1, 512, 32\), expected \(1, 1, 1024, 32\) = \(Ph, Pw, C, D\)",
        ),
        (lambda s: _without(s, "conv_root/"), r"ResNet keys but no 'conv_root/kernel'"),
        (lambda s: s | {"conv_root/kernel": (7, 7, 3, 48)}, r"'conv_root/kernel' has shape \(7, 7, 3, 48\)"),
        (lambda s: _without(s, "gn_root/bias"), r"missing key 'gn_root/bias'"),
    ],
)
def test_damaged_hybrids_are_refused_in_one_line(edit, message):
    shapes = edit(shapes_of(hybrid_npz_arrays()))
    with pytest.raises(ConversionError, match=message) as error:
        planned(shapes)
    assert "\n" not in str(error.value)


def test_a_seed_hybrid_with_a_key_the_seed_resnet_has_not_is_refused():
    config = VisionTransformerConfig(
        **{**HYBRID, "resnet_num_layers": [1, 1, 1]}, resnet_flavour="seed", hidden_act="gelu"
    )
    shapes = {key: tuple(value.shape) for key, value in seed_hybrid_state_dict(config).items()}
    shapes["transformer.embeddings.hybrid_model.body.block1.unit1.bn1.weight"] = (64,)
    with pytest.raises(
        ConversionError,
        match=r"unexpected key\(s\).*'transformer.embeddings.hybrid_model.body.block1.unit1.bn1.weight'",
    ):
        planned(shapes, kind="seed")


# --- everything plain ViT does, on a tiny hybrid ------------------------------------------------------------------

# Width 32 (factor 0.5), stages (1, 2): 32 px -> 16 -> 8 -> 8 -> 4, a 4x4 grid of 1x1 patches on 256 channels.
TINY_HYBRID = {**HYBRID, "image_size": 32, "resnet_num_layers": [1, 2], "resnet_width_factor": 0.5}
LABELS = [f"digit {i}" for i in range(10)]


def tiny_hybrid(**overrides) -> VisionTransformerForImageClassification:
    config = VisionTransformerConfig(**{**TINY_HYBRID, **overrides})
    model = VisionTransformerForImageClassification(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # random, but GroupNorms near identity
            noise = torch.randn(parameter.shape, generator=generator)
            if ".gn" in name or "root.gn" in name:
                parameter.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return model.eval()


@pytest.fixture
def pixel_values():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_hybrid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hybrid")
    model = tiny_hybrid(id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})
    model.save_pretrained(folder)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save({"pixel_values": pixel_values, "logits": model(pixel_values).logits}, folder.parent / "io.pt")
    return folder


def test_hybrid_round_trips_through_the_auto_classes(saved_hybrid):
    assert "modeling_resnet.py" in os.listdir(saved_hybrid)
    config = json.loads((saved_hybrid / "config.json").read_text())
    assert (config["resnet_num_layers"], config["resnet_width_factor"], config["resnet_flavour"]) == (
        [1, 2],
        0.5,
        "vit_jax",
    )
    io = torch.load(saved_hybrid.parent / "io.pt")
    model = AutoModelForImageClassification.from_pretrained(saved_hybrid).eval()
    assert type(model) is VisionTransformerForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(model(io["pixel_values"]).logits, io["logits"], atol=0, rtol=0)


FRESH_PYTHON = """
import json, sys
sys.modules["hf_vit"] = None  # only the folder's own code can load it
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
folder, io = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
stem = model.transformer.embeddings.hybrid_model
assert type(stem).__module__.startswith("transformers_modules."), type(stem).__module__
with torch.no_grad():
    torch.testing.assert_close(model(io["pixel_values"]).logits, io["logits"], atol=0, rtol=0)
classify = pipeline("image-classification", model=folder, trust_remote_code=True)
print(json.dumps([type(stem).__name__, classify(Image.new("RGB", (40, 30), "white"))[0]["label"]]))
"""


def test_hybrid_loads_as_remote_code_without_hf_vit(saved_hybrid, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH_PYTHON), str(saved_hybrid), str(saved_hybrid.parent / "io.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stem, label = json.loads(result.stdout.strip().splitlines()[-1])
    assert stem == "ResNetV2" and label in LABELS


def test_hybrid_pipeline_on_a_pil_image(saved_hybrid):
    classify = pipeline("image-classification", model=str(saved_hybrid))
    predictions = classify(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)))
    assert len(predictions) == 5 and all(p["label"] in LABELS for p in predictions)


def test_hybrid_attentions_cover_the_feature_map_grid(pixel_values):
    model = tiny_hybrid()
    with torch.no_grad():
        outputs = model(pixel_values, output_attentions=True, output_hidden_states=True)
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (2, 4, 17, 17)  # 4x4 patches + cls
    assert outputs.hidden_states[0].shape == (2, 17, 32)


def test_hybrid_interpolates_with_padding_recomputed_for_the_new_size():
    model = tiny_hybrid()
    pixel_values = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(2))  # 6x5 feature map
    with torch.no_grad():
        outputs = model(pixel_values, interpolate_pos_encoding=True, output_attentions=True)
    assert outputs.attentions[0].shape == (1, 4, 31, 31)
    with pytest.raises(ValueError, match=r"doesn't match the model \(32x32\)"):
        model(pixel_values)
    patched = tiny_hybrid(patch_size=2)  # 4x4 feature map -> 2x2 grid; 40 px gives 5 columns, not divisible by 2
    with pytest.raises(
        ValueError, match=r"\(48x40\)'s ResNet feature map \(6x5\) must be divisible by the patch size"
    ):
        patched(pixel_values, interpolate_pos_encoding=True)


def test_attention_rollout_on_a_hybrid_has_the_feature_map_grid():
    model = tiny_hybrid()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    assert attention_map(model, image).shape == (4, 4)
    weights = attention_map(model, image, method="rollout", image_size=(48, 40))
    assert weights.shape == (6, 5) and (weights >= 0).all()
    assert attention_map(model, image, method="last_layer", image_size=(40, 64)).shape == (5, 8)


def test_hybrid_gradient_checkpointing_gives_the_same_gradients(pixel_values):
    model = tiny_hybrid().train()
    labels = torch.tensor([1, 2])

    def gradients():
        model.zero_grad()
        model(pixel_values, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.transformer.embeddings.hybrid_model.body.block2.unit2.gradient_checkpointing  # the ResNet units too
    checkpointed = gradients()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_hybrid_torch_compile_fullgraph(pixel_values):
    model = tiny_hybrid()
    # fullgraph raises on any graph break. dynamic=False: a second resolution is compiled for its own sizes (with
    # symbolic sizes, dynamo's shape reasoning through the ResNet's nested ceil-divisions takes minutes on a CPU).
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits)
        other = torch.randn(1, 3, 48, 40)  # another size: SAME padding traced again
        torch.testing.assert_close(
            compiled(other, interpolate_pos_encoding=True).logits, model(other, interpolate_pos_encoding=True).logits
        )
    compiled(pixel_values, labels=torch.tensor([1, 2])).loss.backward()
    assert model.transformer.embeddings.hybrid_model.root.conv.weight.grad is not None


def test_hybrid_in_bfloat16(pixel_values):
    model = tiny_hybrid()
    with torch.no_grad():
        expected = model(pixel_values).logits
        logits = model.to(torch.bfloat16)(pixel_values).logits  # float32 pixels are cast to the weights' dtype
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_stem_only_hybrid_has_no_body():
    model = tiny_hybrid(resnet_num_layers=[], patch_size=2)  # 32 -> 16 -> 8, 2x2 patches: 4x4
    assert not any(".body." in key for key in model.state_dict())
    assert model.transformer.embeddings.patch_embeddings.weight.shape == (32, 32, 2, 2)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32), output_attentions=True).attentions[0].shape == (1, 4, 17, 17)


def test_fresh_hybrid_starts_each_unit_as_its_residual():
    """vit_jax initialises gn3's scale to zero; every other GroupNorm to one."""
    model = VisionTransformerForImageClassification(VisionTransformerConfig(**TINY_HYBRID))
    stem = model.transformer.embeddings.hybrid_model
    assert all((unit.gn3.weight == 0).all() for block in stem.body for unit in block)
    assert (stem.body.block2.unit1.gn2.weight == 1).all() and (stem.root.gn.weight == 1).all()


def test_readme_variant_table_lists_every_variant_with_its_grid():
    from hf_vit.configuration_hf_vit import VARIANTS, variant_display_name

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and ("ViT-" in line.split("|")[1])]
    for key in VARIANTS:
        name = variant_display_name(key)
        (row,) = [r for r in rows if name in r.split("|")[1].replace(" ", "").split(",")]
        grid = VisionTransformerConfig.from_variant(name).grid_size
        assert f"{grid[0]}×{grid[1]}" in row.split("|")[5], (name, row)
