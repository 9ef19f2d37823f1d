"""The seed repo's (jeonsworld/ViT-pytorch) `*_checkpoint.bin`: `torch.save(model.state_dict())` in hf_vit's names.

The keys and PyTorch layouts are already hf_vit's, so the table only checks shapes (and the grid may change); the
number of heads is not in the shapes and comes from --variant. The seed uses exact (erf) GELU.
"""

import re

from ..checkpoint import Architecture, count_layers, position_grid, require
from ..keys import Rule
from . import Family, RenamedParams, vit_jax


POSEMB = "transformer.embeddings.position_embeddings"
PATCH = "transformer.embeddings.patch_embeddings.weight"
_LAYER = "transformer.encoder.layer.{i}"
_LAYER_SHAPES = {
    "attention_norm.weight": "D",
    "attention_norm.bias": "D",
    **{f"attn.{name}.weight": "D D" for name in ("query", "key", "value", "out")},
    **{f"attn.{name}.bias": "D" for name in ("query", "key", "value", "out")},
    "ffn_norm.weight": "D",
    "ffn_norm.bias": "D",
    "ffn.fc1.weight": "M D",
    "ffn.fc1.bias": "M",
    "ffn.fc2.weight": "D M",
    "ffn.fc2.bias": "D",
}
TABLE: tuple[Rule, ...] = (
    Rule(PATCH, PATCH, "D C Ph Pw"),
    Rule("transformer.embeddings.patch_embeddings.bias", "transformer.embeddings.patch_embeddings.bias", "D"),
    Rule("transformer.embeddings.cls_token", "transformer.embeddings.cls_token", "1 1 D", when="token"),
    Rule(POSEMB, POSEMB, "1 T D", "posemb"),
    *(Rule(f"{_LAYER}.{name}", f"{_LAYER}.{name}", shape) for name, shape in _LAYER_SHAPES.items()),
    Rule("transformer.encoder.encoder_norm.weight", "transformer.encoder.encoder_norm.weight", "D"),
    Rule("transformer.encoder.encoder_norm.bias", "transformer.encoder.encoder_norm.bias", "D"),
    Rule("pre_logits.weight", "pre_logits.weight", "R D", when="pre_logits", role="pre_logits"),
    Rule("pre_logits.bias", "pre_logits.bias", "R", when="pre_logits", role="pre_logits"),
    Rule("head.weight", "head.weight", "N K", role="head"),
    Rule("head.bias", "head.bias", "N", role="head"),
)


def detect(checkpoint, source_size=None, target_size=None) -> Architecture:
    keys = set(checkpoint.keys())
    hidden, channels, patch_h, patch_w = require(checkpoint, PATCH, 4, "patch embedding, (D, 3, P, P)")
    _, tokens, _ = require(checkpoint, POSEMB, 3, "position embeddings, (1, N + 1, D)")
    classifier = "token" if "transformer.embeddings.cls_token" in keys else "gap"
    patches = tokens - (classifier == "token")
    mlp_dim, _ = require(checkpoint, "transformer.encoder.layer.0.ffn.fc1.weight", 2, "MLP weight, (M, D)")
    num_classes, _ = require(checkpoint, "head.weight", 2, "classifier weight, (classes, D)")
    representation_size = None
    if "pre_logits.weight" in keys:
        representation_size = require(checkpoint, "pre_logits.weight", 2, "pre_logits weight, (R, D)")[0]
    return Architecture(
        hidden_size=hidden,
        num_layers=count_layers(checkpoint, r"transformer\.encoder\.layer\.(\d+)\."),
        num_heads=None,
        mlp_dim=mlp_dim,
        patch_size=(patch_h, patch_w),
        num_channels=channels,
        grid=position_grid(checkpoint, POSEMB, patches, (patch_h, patch_w), source_size, target_size),
        num_classes=num_classes,
        classifier=classifier,
        representation_size=representation_size,
    )


# The reference reads vit_jax names in Flax layouts: the vit_jax table gives each one's hf_vit (= seed) key and the
# transform to undo, with the number of heads the shapes do not hold.
_TO_FLAX = {
    "conv_hwio_to_oihw": lambda array, heads: array.transpose(2, 3, 1, 0),  # (D, C, P, P) -> (P, P, C, D)
    "dense": lambda array, heads: array.T,  # nn.Linear (out, in) -> Dense (in, out)
    "heads_in": lambda array, heads: array.T.reshape(array.shape[1], heads, -1),  # (H*d, D) -> (D, H, d)
    "heads_out": lambda array, heads: array.T.reshape(heads, -1, array.shape[0]),  # (D, H*d) -> (H, d, D)
    "heads_bias": lambda array, heads: array.reshape(heads, -1),
}
_VIT_JAX_RULES = [(re.compile(re.escape(rule.source).replace(r"\{i\}", r"(\d+)")), rule) for rule in vit_jax.TABLE]


def _vit_jax_rule(name: str) -> tuple[str, str]:
    """(seed key, transform) of a vit_jax parameter name."""
    for pattern, rule in _VIT_JAX_RULES:
        if match := pattern.fullmatch(name):
            return rule.target.format(i=match[1] if pattern.groups else None), rule.transform
    return name, "identity"  # no such parameter: `in` says False


def reference_params(checkpoint, arch: Architecture) -> RenamedParams:
    def to_flax(name, array):
        undo = _TO_FLAX.get(_vit_jax_rule(name)[1])
        return array if undo is None else undo(array, arch.num_heads)

    return RenamedParams(checkpoint, lambda name: _vit_jax_rule(name)[0], to_flax)


FAMILY = Family(
    name="seed *_checkpoint.bin",
    table=TABLE,
    matches=lambda checkpoint: checkpoint.kind == "seed",
    detect=detect,
    reference_params=reference_params,
    hidden_act="gelu",
    seed=True,
)
