"""VisionTransformerConfig: defaults of the original model, the variant table and one-line errors."""

import pytest
from conftest import tiny_config
from transformers import AutoConfig

import hf_vit
from hf_vit import VARIANTS, VisionTransformerConfig


def test_defaults_are_the_original_vit_b16_at_224():
    config = AutoConfig.for_model("hf_vit", num_labels=10)
    assert isinstance(config, VisionTransformerConfig)
    assert (config.image_size, config.patch_size, config.num_channels) == (224, 16, 3)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.intermediate_size == 3072
    assert config.layer_norm_eps == 1e-6
    assert config.hidden_act == "gelu_pytorch_tanh"
    assert config.classifier == "token" and config.representation_size is None
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0
    assert config.qkv_bias is True and config.num_labels == 10
    assert config.grid_size == (14, 14)


def test_auto_map_names_all_three_auto_classes():
    assert VisionTransformerConfig().auto_map == {
        "AutoConfig": "configuration_hf_vit.VisionTransformerConfig",
        "AutoModel": "modeling_hf_vit.VisionTransformerModel",
        "AutoModelForImageClassification": "modeling_hf_vit.VisionTransformerForImageClassification",
    }


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ViT-Ti_16", (192, 12, 3, 768, 16)),
        ("ViT-S/16", (384, 12, 6, 1536, 16)),
        ("S_32", (384, 12, 6, 1536, 32)),
        ("ViT-B_8", (768, 12, 12, 3072, 8)),
        ("ViT-B/16", (768, 12, 12, 3072, 16)),
        ("vit-b32", (768, 12, 12, 3072, 32)),
        ("ViT-L_16", (1024, 24, 16, 4096, 16)),
        ("L/32", (1024, 24, 16, 4096, 32)),
        ("ViT-H_14", (1280, 32, 16, 5120, 14)),
    ],
)
def test_from_variant_accepts_both_spellings(name, expected):
    config = VisionTransformerConfig.from_variant(name, num_labels=10)
    sizes = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        config.patch_size,
    )
    assert sizes == expected
    assert config.num_labels == 10


def test_variant_table_covers_the_paper_and_the_hybrids():
    assert set(VARIANTS) == {"Ti/16", "S/16", "S/32", "B/8", "B/16", "B/32", "L/16", "L/32", "H/14"} | {
        "R50+B/16",
        "R26+B/32",
        "R26+S/32",
        "R50+L/32",
        "R+Ti/16",
    }


@pytest.mark.parametrize(
    "name, sizes, resnet, patch, grid",
    [  # vit_jax configs/models.py; grid at 224 px
        ("R50+ViT-B_16", (768, 12, 12, 3072), (3, 4, 9), 1, (14, 14)),
        ("R50-ViT-B_16", (768, 12, 12, 3072), (3, 4, 9), 1, (14, 14)),  # the seed's spelling
        ("R26+ViT-B_32", (768, 12, 12, 3072), (2, 2, 2, 2), 1, (7, 7)),
        ("R26+ViT-S/32", (384, 12, 6, 1536), (2, 2, 2, 2), 1, (7, 7)),
        ("r50+vit-l32", (1024, 24, 16, 4096), (3, 4, 6, 3), 1, (7, 7)),
        ("R+ViT-Ti_16", (192, 12, 3, 768), (), 8, (7, 7)),
    ],
)
def test_hybrid_variants(name, sizes, resnet, patch, grid):
    config = VisionTransformerConfig.from_variant(name)
    found = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)
    assert found == sizes
    assert (config.resnet_num_layers, config.patch_size, config.grid_size) == (resnet, patch, grid)
    assert config.resnet_width_factor == 1 and config.resnet_flavour == "vit_jax" and config.resnet_width == 64


def test_plain_variants_have_no_resnet():
    assert VisionTransformerConfig.from_variant("ViT-B_16").resnet_num_layers is None
    assert VisionTransformerConfig().resnet_width is None


@pytest.mark.parametrize(
    "image_size, flavour, expected",
    [  # feature map of R50+ViT-B/16; the seed's unpadded pool takes 112 to 55, SAME to 56, both end at 14
        (224, "vit_jax", (14, 14)),
        (224, "seed", (14, 14)),
        (384, "vit_jax", (24, 24)),
        ((240, 320), "vit_jax", (15, 20)),
        (225, "vit_jax", (15, 15)),  # 225 -> 113 -> 57 -> 29 -> 15
        (225, "seed", (14, 14)),  # 225 -> 113 -> (113 - 3) // 2 + 1 = 56 -> 28 -> 14
    ],
)
def test_feature_map_size_of_a_hybrid(image_size, flavour, expected):
    config = VisionTransformerConfig(
        image_size=image_size, patch_size=1, resnet_num_layers=[3, 4, 9], resnet_flavour=flavour
    )
    assert config.grid_size == expected


def test_hybrid_config_round_trips(tmp_path):
    config = VisionTransformerConfig.from_variant("R+ViT-Ti_16", image_size=64, resnet_width_factor=0.5)
    config.save_pretrained(tmp_path)
    loaded = VisionTransformerConfig.from_pretrained(tmp_path)
    assert (loaded.resnet_num_layers, loaded.resnet_width_factor, loaded.resnet_width) == ((), 0.5, 32)
    assert loaded.grid_size == (2, 2)


def test_from_variant_overrides_win():
    config = VisionTransformerConfig.from_variant("ViT-B_16", image_size=384, hidden_act="gelu")
    assert config.image_size == 384 and config.hidden_act == "gelu" and config.grid_size == (24, 24)


def test_non_square_image_size_round_trips(tmp_path):
    config = tiny_config(image_size=(32, 48))
    assert config.grid_size == (4, 6)
    config.save_pretrained(tmp_path)
    assert VisionTransformerConfig.from_pretrained(tmp_path).grid_size == (4, 6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30), r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
        (dict(image_size=30), r"image_size 30x30 must be a positive multiple of patch_size 8x8"),
        (dict(image_size=(32, 36)), r"image_size 32x36 must be a positive multiple of patch_size 8x8"),
        (dict(classifier="mean"), r"classifier must be one of \('token', 'gap'\), got 'mean'"),
        (dict(representation_size=0), r"representation_size must be a positive int or None"),
        (dict(hidden_act="swishy"), r"hidden_act 'swishy' is unknown"),
        (dict(hidden_dropout_prob=1.5), r"hidden_dropout_prob must be in \[0, 1\), got 1.5"),
        (dict(num_hidden_layers=0), r"num_hidden_layers, intermediate_size and num_channels must be positive"),
        (dict(resnet_num_layers=[3, 0]), r"resnet_num_layers must list a positive number of units per stage"),
        (
            dict(resnet_num_layers=[2], resnet_width_factor=0.25),
            r"resnet_width_factor 0.25 gives a ResNet width of 16",
        ),
        (dict(resnet_num_layers=[2], resnet_flavour="timm"), r"resnet_flavour must be one of \('vit_jax', 'seed'\)"),
        (dict(resnet_flavour="timm"), r"resnet_flavour must be one of"),
        (dict(resnet_num_layers=[2, 2], resnet_flavour="seed"), r"resnet_flavour='seed' always has three stages"),
        (dict(resnet_num_layers=[], patch_size=16), r"image_size 32x32 gives a 8x8 ResNet feature map, which must be"),
        (dict(resnet_num_layers=[1, 1, 1], image_size=8, patch_size=2, resnet_flavour="seed"), r"gives a 1x1 ResNet"),
    ],
)
def test_invalid_combinations_raise_one_line_value_error(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        tiny_config(**overrides)
    assert "\n" not in str(error.value)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown ViT variant 'ViT-X_16': expected one of ViT-Ti_16, ViT-S_16") as e:
        VisionTransformerConfig.from_variant("ViT-X_16")
    assert "R50+ViT-B_16, R26+ViT-B_32" in str(e.value)
    with pytest.raises(ValueError, match=r"Unknown ViT variant 'R50\+ViT-S_16'"):
        VisionTransformerConfig.from_variant("R50+ViT-S_16")


def test_package_exports():
    assert hf_vit.IMAGE_MEAN == hf_vit.IMAGE_STD == (0.5, 0.5, 0.5)
    assert AutoConfig.for_model("hf_vit").__class__ is VisionTransformerConfig


def test_from_variant_refuses_a_field_it_does_not_know():
    # A typo was kept as an unused attribute: from_variant("ViT-Ti_16", imagesize=64) gave a 224 px model.
    with pytest.raises(
        TypeError, match=r"from_variant\(\) got an unknown field 'imagesize' \(did you mean 'image_size'\?\)"
    ):
        VisionTransformerConfig.from_variant("ViT-Ti_16", imagesize=64)
    config = VisionTransformerConfig.from_variant("ViT-Ti_16", num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    assert config.num_labels == 3 and config.id2label[2] == "c"
