"""Configuration of the Vision Transformer of "An Image is Worth 16x16 Words" (arXiv 2010.11929).

Defaults are ViT-B/16 at 224 px with the semantics of Google's original Flax model (vit_jax/models_vit.py):
LayerNorm epsilon 1e-6 and the tanh approximation of GELU. The seed repo (jeonsworld/ViT-pytorch) and transformers'
ViT use exact GELU; set `hidden_act="gelu"` to reproduce them.

The R+ViT hybrids (a ResNet stem whose feature map is cut into patches) are the same config with
`resnet_num_layers` set (vit_jax `models_vit.py` + `models_resnet.py`).
"""

import dataclasses
import difflib
import re

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


# The original models take RGB scaled to [-1, 1]: (x / 255 - 0.5) / 0.5 (vit_jax input_pipeline).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Model sizes of the paper (Table 1) and of the google-research/vision_transformer configs (vit_jax/configs/models.py):
# name -> (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size, representation_size
# [, resnet_num_layers]). representation_size is the pre_logits width of the ImageNet-21k releases; fine-tuned
# checkpoints drop it. The hybrids "R...+X/n" add the ResNet stem's units per stage (width factor 1); their patch_size
# is taken on the feature map, and /n is the overall downscaling: the root is /4, every stage after the first /2.
# (vit_jax's R50+ViT-B_16 config also sets dropout 0.1, a training setting left to the user here.)
VARIANT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "representation_size",
    "resnet_num_layers",
)
VARIANTS = {
    "Ti/16": (192, 12, 3, 768, 16, None),
    "S/16": (384, 12, 6, 1536, 16, None),
    "S/32": (384, 12, 6, 1536, 32, None),
    "B/8": (768, 12, 12, 3072, 8, None),
    "B/16": (768, 12, 12, 3072, 16, None),
    "B/32": (768, 12, 12, 3072, 32, None),
    "L/16": (1024, 24, 16, 4096, 16, None),
    "L/32": (1024, 24, 16, 4096, 32, None),
    "H/14": (1280, 32, 16, 5120, 14, None),
    "R50+B/16": (768, 12, 12, 3072, 1, None, (3, 4, 9)),  # not the "real" ResNet-50 (3, 4, 6, 3): /16 needs 3 stages
    "R26+B/32": (768, 12, 12, 3072, 1, None, (2, 2, 2, 2)),
    "R26+S/32": (384, 12, 6, 1536, 1, None, (2, 2, 2, 2)),
    "R50+L/32": (1024, 24, 16, 4096, 1, None, (3, 4, 6, 3)),
    "R+Ti/16": (192, 12, 3, 768, 8, None, ()),  # the root alone (/4), then 8x8 patches
}

CLASSIFIERS = ("token", "gap")
# vit_jax: TF "SAME" padding everywhere, weight standardisation (w - mean) / (std + 1e-5), gn_proj with 32 groups.
# seed (jeonsworld/ViT-pytorch modeling_resnet.py): symmetric padding, an unpadded max-pool,
# (w - mean) / sqrt(var + 1e-5), gn_proj = GroupNorm(C, C) with epsilon 1e-5, and always three stages.
RESNET_FLAVOURS = ("vit_jax", "seed")
_SIZE_NAMES = {"ti": "Ti", "s": "S", "b": "B", "l": "L", "h": "H"}


def variant_display_name(key: str) -> str:
    """'B/16' -> 'ViT-B_16', 'R50+B/16' -> 'R50+ViT-B_16': the names of Google's files."""
    stem, _, size = key.rpartition("+")
    return f"{stem}+ViT-{size.replace('/', '_')}" if stem else f"ViT-{size.replace('/', '_')}"


def canonical_variant_name(name: str) -> str:
    """'ViT-B_16', 'ViT-B/16', 'vit-b16', 'B_16' and 'B/16' all name the variant 'B/16'; 'R50+ViT-B_16' (and the
    seed's 'R50-ViT-B_16') name 'R50+B/16'."""
    match = re.fullmatch(r"(?:(r\d*)[+-])?(?:vit[-_]?)?(ti|s|b|l|h)[-_/]?(\d+)", name.strip(), flags=re.IGNORECASE)
    key = None
    if match:
        key = f"{_SIZE_NAMES[match[2].lower()]}/{match[3]}"
        key = f"{match[1].upper()}+{key}" if match[1] else key
    if key not in VARIANTS:
        known = ", ".join(variant_display_name(v) for v in VARIANTS)
        raise ValueError(f"Unknown ViT variant {name!r}: expected one of {known} (or the same with '/').")
    return key


def resnet_output_size(size: int, num_stages: int, flavour: str = "vit_jax") -> int:
    """
    Side of the ResNet's feature map for an input side of `size`: the 7x7 stride-2 root conv, the 3x3 stride-2
    max-pool, then a stride-2 3x3 conv in every stage after the first.

    TF "SAME" padding rounds each stride-2 step up (ceil(n / 2)); the seed's symmetric padding (3 and 1) does too,
    but its unpadded pool gives (n - 3) // 2 + 1 (224 px: 112 -> 55 -> 28 -> 14, vit_jax 112 -> 56 -> 28 -> 14).
    """
    size = -(-size // 2)
    size = -(-size // 2) if flavour == "vit_jax" else (size - 3) // 2 + 1
    for _ in range(num_stages - 1):
        size = -(-size // 2)
    return size


def _as_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class VisionTransformerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VisionTransformerModel`] / [`VisionTransformerForImageClassification`].

    Args:
        image_size (`int` or `(height, width)`, defaults to 224): resolution the position embeddings are laid out for.
        patch_size (`int` or `(height, width)`, defaults to 16): side of the square patches (the Conv2d stride).
        num_channels (`int`, defaults to 3): input channels.
        hidden_size (`int`, defaults to 768): width D of the tokens.
        num_hidden_layers (`int`, defaults to 12): number of encoder blocks.
        num_attention_heads (`int`, defaults to 12): heads per attention layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): width of the MLP inside each block.
        hidden_act (`str`, defaults to `"gelu_pytorch_tanh"`): MLP activation; the original Flax model uses the tanh
            approximation of GELU, `"gelu"` (exact) reproduces the seed repo and timm.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after the embeddings, the attention output and in
            the MLP (vit_jax `dropout_rate`).
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on the attention probabilities.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon of the original model.
        qkv_bias (`bool`, defaults to `True`): biases on the query, key and value projections.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal used for fresh weights.
        classifier (`str`, defaults to `"token"`): `"token"` pools the class token (row 0), `"gap"` has no class token
            and averages the patch tokens after `encoder_norm`.
        representation_size (`int`, *optional*): width of the optional `pre_logits` layer (Linear + tanh) before the
            head, as in the ImageNet-21k releases.
        resnet_num_layers (`list[int]`, *optional*): makes an R+ViT hybrid: the bottleneck units of each ResNet stage
            before the patch embedding, e.g. `[3, 4, 9]` for R50+ViT-B/16, `[]` for the root alone (R+ViT-Ti/16).
            `None` (default) is the plain ViT. `patch_size` then applies to the ResNet's feature map.
        resnet_width_factor (`int` or `float`, defaults to 1): the ResNet's width is 64 x this (32 GroupNorm groups
            must divide it).
        resnet_flavour (`str`, defaults to `"vit_jax"`): the numerics of the original Flax ResNet (TF "SAME" padding,
            `(w - mean) / (std + 1e-5)` weight standardisation, 32-group `gn_proj`), or `"seed"`: the seed repo's
            port, whose fine-tuned hybrids only give their logits with its symmetric padding, unpadded max-pool,
            `(w - mean) / sqrt(var + 1e-5)` and `gn_proj = GroupNorm(C, C, eps=1e-5)` (three stages only).

    Example:

    ```python
    >>> from hf_vit import VisionTransformerConfig
    >>> config = VisionTransformerConfig.from_variant("ViT-B/16", num_labels=10)
    >>> config.hidden_size, config.layer_norm_eps, config.hidden_act
    (768, 1e-06, 'gelu_pytorch_tanh')
    ```
    """

    model_type = "hf_vit"

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    initializer_range: float = 0.02
    classifier: str = "token"
    representation_size: int | None = None
    resnet_num_layers: list[int] | tuple[int, ...] | None = None
    resnet_width_factor: int | float = 1
    resnet_flavour: str = "vit_jax"

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)
        if isinstance(self.resnet_num_layers, list):
            self.resnet_num_layers = tuple(self.resnet_num_layers)
        self._check_architecture()
        # Every folder this config is saved to loads without hf_vit installed (`trust_remote_code=True`).
        if getattr(self, "auto_map", None) is None and "auto_map" not in kwargs:
            kwargs["auto_map"] = {
                "AutoConfig": "configuration_hf_vit.VisionTransformerConfig",
                "AutoModel": "modeling_hf_vit.VisionTransformerModel",
                "AutoModelForImageClassification": "modeling_hf_vit.VisionTransformerForImageClassification",
            }
        super().__post_init__(**kwargs)

    def _check_architecture(self) -> None:
        """Raise a one-line ValueError for settings no ViT can be built from."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): change one of them."
            )
        self._check_resnet()
        image, patch = _as_pair(self.image_size), _as_pair(self.patch_size)
        if min(image + patch) <= 0:
            raise ValueError(f"image_size {image} and patch_size {patch} must be positive.")
        feature = self.feature_map_size(*image)
        if min(feature) <= 0 or feature[0] % patch[0] or feature[1] % patch[1]:
            if self.resnet_num_layers is None:
                raise ValueError(
                    f"image_size {image[0]}x{image[1]} must be a positive multiple of patch_size "
                    f"{patch[0]}x{patch[1]}: change one of them."
                )
            raise ValueError(
                f"image_size {image[0]}x{image[1]} gives a {feature[0]}x{feature[1]} ResNet feature map, which must be "
                f"a positive multiple of patch_size {patch[0]}x{patch[1]}: change one of them."
            )
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}.")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError(
                f"representation_size must be a positive int or None (no pre_logits), got {self.representation_size}."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is unknown: use 'gelu_pytorch_tanh' (the original) or 'gelu' (exact)."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.num_hidden_layers <= 0 or self.intermediate_size <= 0 or self.num_channels <= 0:
            raise ValueError("num_hidden_layers, intermediate_size and num_channels must be positive.")

    def _check_resnet(self) -> None:
        """Raise a one-line ValueError for ResNet settings of a hybrid that cannot be built."""
        if self.resnet_flavour not in RESNET_FLAVOURS:
            raise ValueError(f"resnet_flavour must be one of {RESNET_FLAVOURS}, got {self.resnet_flavour!r}.")
        layers = self.resnet_num_layers
        if layers is None:
            return
        if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in layers):
            raise ValueError(
                f"resnet_num_layers must list a positive number of units per stage (or be [] for the root alone, "
                f"None for no ResNet), got {list(layers)}."
            )
        width = int(64 * self.resnet_width_factor)
        if width <= 0 or width % 32:
            raise ValueError(
                f"resnet_width_factor {self.resnet_width_factor} gives a ResNet width of {width} channels, which the "
                "32 groups of its GroupNorms must divide: use a positive multiple of 0.5."
            )
        if self.resnet_flavour == "seed" and len(layers) != 3:
            raise ValueError(
                f"resnet_flavour='seed' always has three stages (the seed's ResNetV2), got resnet_num_layers="
                f"{list(layers)}: use resnet_flavour='vit_jax'."
            )

    @property
    def resnet_width(self) -> int | None:
        """Channels of the ResNet's root (64 x `resnet_width_factor`); None without a ResNet."""
        return None if self.resnet_num_layers is None else int(64 * self.resnet_width_factor)

    def feature_map_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of what the patch embedding sees for an input of `height` x `width`: the input itself for
        a plain ViT, the ResNet's feature map for a hybrid."""
        if self.resnet_num_layers is None:
            return height, width
        stages, flavour = len(self.resnet_num_layers), self.resnet_flavour
        return resnet_output_size(height, stages, flavour), resnet_output_size(width, stages, flavour)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of patches at `image_size` (of the ResNet's feature map for a hybrid)."""
        feature, patch = self.feature_map_size(*_as_pair(self.image_size)), _as_pair(self.patch_size)
        return feature[0] // patch[0], feature[1] // patch[1]

    @classmethod
    def from_variant(cls, name: str, **kwargs) -> "VisionTransformerConfig":
        """
        The configuration of a named model size of the paper.

        Args:
            name: `"ViT-B_16"`, `"ViT-B/16"`, `"B/16"`... one of Ti/16, S/16, S/32, B/8, B/16, B/32, L/16, L/32, H/14,
                or a hybrid: `"R50+ViT-B_16"`, `"R26+ViT-B_32"`, `"R26+ViT-S_32"`, `"R50+ViT-L_32"`, `"R+ViT-Ti_16"`.
            kwargs: any other field, e.g. `num_labels=10`, `image_size=384` or `resnet_flavour="seed"`.

        Example:

        ```python
        >>> from hf_vit import VisionTransformerConfig
        >>> VisionTransformerConfig.from_variant("ViT-L_16", image_size=384).num_hidden_layers
        24
        >>> VisionTransformerConfig.from_variant("R50+ViT-B_16").grid_size
        (14, 14)
        ```
        """
        sizes = dict(zip(VARIANT_FIELDS, VARIANTS[canonical_variant_name(name)], strict=False))  # plain ViTs: 6
        # The constructor keeps an unknown keyword as an attribute nothing reads: a typo would go unnoticed.
        known = {field.name for field in dataclasses.fields(cls)} | set(cls().to_dict()) | {"num_labels"}
        for key in kwargs:
            if key not in known:
                matches = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {matches[0]!r}?)" if matches else ""
                raise TypeError(f"from_variant() got an unknown field {key!r}{hint}.")
        return cls(**{**sizes, **kwargs})


__all__ = ["VisionTransformerConfig", "VARIANTS", "IMAGE_MEAN", "IMAGE_STD", "RESNET_FLAVOURS"]
