"""Configuration of the Vision Transformer of "An Image is Worth 16x16 Words" (arXiv 2010.11929).

Defaults are ViT-B/16 at 224 px with the semantics of Google's original Flax model (vit_jax/models_vit.py):
LayerNorm epsilon 1e-6 and the tanh approximation of GELU. The seed repo (jeonsworld/ViT-pytorch) and transformers'
ViT use exact GELU; set `hidden_act="gelu"` to reproduce them.
"""

import re

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


# The original models take RGB scaled to [-1, 1]: (x / 255 - 0.5) / 0.5 (vit_jax input_pipeline).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Model sizes of the paper (Table 1) and of the google-research/vision_transformer configs (vit_jax/configs/models.py):
# name -> (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size, representation_size).
# representation_size is the pre_logits width of the ImageNet-21k releases; fine-tuned checkpoints drop it.
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
}

CLASSIFIERS = ("token", "gap")
_SIZE_NAMES = {"ti": "Ti", "s": "S", "b": "B", "l": "L", "h": "H"}


def canonical_variant_name(name: str) -> str:
    """'ViT-B_16', 'ViT-B/16', 'vit-b16', 'B_16' and 'B/16' all name the variant 'B/16'."""
    match = re.fullmatch(r"(?:vit[-_]?)?(ti|s|b|l|h)[-_/]?(\d+)", name.strip(), flags=re.IGNORECASE)
    key = f"{_SIZE_NAMES[match[1].lower()]}/{match[2]}" if match else None
    if key not in VARIANTS:
        known = ", ".join(f"ViT-{v.replace('/', '_')}" for v in VARIANTS)
        raise ValueError(f"Unknown ViT variant {name!r}: expected one of {known} (or the same with '/').")
    return key


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

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)
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
        image, patch = _as_pair(self.image_size), _as_pair(self.patch_size)
        if min(image + patch) <= 0 or image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(
                f"image_size {image[0]}x{image[1]} must be a positive multiple of patch_size {patch[0]}x{patch[1]}: "
                "change one of them."
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

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of patches at `image_size`."""
        image, patch = _as_pair(self.image_size), _as_pair(self.patch_size)
        return image[0] // patch[0], image[1] // patch[1]

    @classmethod
    def from_variant(cls, name: str, **kwargs) -> "VisionTransformerConfig":
        """
        The configuration of a named model size of the paper.

        Args:
            name: `"ViT-B_16"`, `"ViT-B/16"`, `"B/16"`... one of Ti/16, S/16, S/32, B/8, B/16, B/32, L/16, L/32, H/14.
            kwargs: any other field, e.g. `num_labels=10` or `image_size=384`.

        Example:

        ```python
        >>> from hf_vit import VisionTransformerConfig
        >>> VisionTransformerConfig.from_variant("ViT-L_16", image_size=384).num_hidden_layers
        24
        ```
        """
        hidden, layers, heads, mlp, patch, representation = VARIANTS[canonical_variant_name(name)]
        sizes = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=mlp,
            patch_size=patch,
            representation_size=representation,
        )
        return cls(**{**sizes, **kwargs})


__all__ = ["VisionTransformerConfig", "VARIANTS", "IMAGE_MEAN", "IMAGE_STD"]
