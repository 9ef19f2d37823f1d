"""google-research/vision_transformer (vit_jax) `.npz` files of 2020-2021: ImageNet-21k, fine-tunes, augreg.

Parameter names of vit_jax/models_vit.py; the position embeddings include the class token's row and are added after
the class token is prepended.
"""

from ..checkpoint import Architecture, count_layers, position_grid, require
from ..keys import Rule
from . import Family


# Shapes: D hidden, H heads, d = D / H, M MLP, Ph Pw patch, C channels, T tokens (class token + patches), R pre_logits
# width, K head input (R or D), N classes.
_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_1"
_LAYER = "transformer.encoder.layer.{i}"
POSEMB = "Transformer/posembed_input/pos_embedding"
TABLE: tuple[Rule, ...] = (
    Rule("embedding/kernel", "transformer.embeddings.patch_embeddings.weight", "Ph Pw C D", "conv_hwio_to_oihw"),
    Rule("embedding/bias", "transformer.embeddings.patch_embeddings.bias", "D"),
    Rule("cls", "transformer.embeddings.cls_token", "1 1 D", when="token"),
    Rule(POSEMB, "transformer.embeddings.position_embeddings", "1 T D", "posemb"),
    Rule(_BLOCK + "/LayerNorm_0/scale", _LAYER + ".attention_norm.weight", "D"),
    Rule(_BLOCK + "/LayerNorm_0/bias", _LAYER + ".attention_norm.bias", "D"),
    Rule(_ATTN + "/query/kernel", _LAYER + ".attn.query.weight", "D H d", "heads_in"),
    Rule(_ATTN + "/query/bias", _LAYER + ".attn.query.bias", "H d", "heads_bias"),
    Rule(_ATTN + "/key/kernel", _LAYER + ".attn.key.weight", "D H d", "heads_in"),
    Rule(_ATTN + "/key/bias", _LAYER + ".attn.key.bias", "H d", "heads_bias"),
    Rule(_ATTN + "/value/kernel", _LAYER + ".attn.value.weight", "D H d", "heads_in"),
    Rule(_ATTN + "/value/bias", _LAYER + ".attn.value.bias", "H d", "heads_bias"),
    Rule(_ATTN + "/out/kernel", _LAYER + ".attn.out.weight", "H d D", "heads_out"),
    Rule(_ATTN + "/out/bias", _LAYER + ".attn.out.bias", "D"),
    Rule(_BLOCK + "/LayerNorm_2/scale", _LAYER + ".ffn_norm.weight", "D"),
    Rule(_BLOCK + "/LayerNorm_2/bias", _LAYER + ".ffn_norm.bias", "D"),
    Rule(_BLOCK + "/MlpBlock_3/Dense_0/kernel", _LAYER + ".ffn.fc1.weight", "D M", "dense"),
    Rule(_BLOCK + "/MlpBlock_3/Dense_0/bias", _LAYER + ".ffn.fc1.bias", "M"),
    Rule(_BLOCK + "/MlpBlock_3/Dense_1/kernel", _LAYER + ".ffn.fc2.weight", "M D", "dense"),
    Rule(_BLOCK + "/MlpBlock_3/Dense_1/bias", _LAYER + ".ffn.fc2.bias", "D"),
    Rule("Transformer/encoder_norm/scale", "transformer.encoder.encoder_norm.weight", "D"),
    Rule("Transformer/encoder_norm/bias", "transformer.encoder.encoder_norm.bias", "D"),
    Rule("pre_logits/kernel", "pre_logits.weight", "D R", "dense", when="pre_logits", role="pre_logits"),
    Rule("pre_logits/bias", "pre_logits.bias", "R", when="pre_logits", role="pre_logits"),
    Rule("head/kernel", "head.weight", "K N", "dense", role="head"),
    Rule("head/bias", "head.bias", "N", role="head"),
)


def detect(checkpoint, source_size=None, target_size=None, *, names=None, posemb=POSEMB) -> Architecture:
    """The architecture from the shapes alone (no table of variants); `names` maps vit_jax names to the file's."""
    names = names or (lambda key: key)
    keys = set(checkpoint.keys())
    patch_h, patch_w, channels, hidden = require(checkpoint, "embedding/kernel", 4, "patch embedding, (P, P, 3, D)")
    classifier = "token" if "cls" in keys else "gap"
    prefix = 1 if classifier == "token" and posemb == POSEMB else 0  # rows of the position embedding before the grid
    _, tokens, _ = require(checkpoint, posemb, 3, f"position embeddings, (1, {'N + 1' if prefix else 'N'}, D)")
    hint = (
        " (no 'cls' key, so no class-token row is expected: is 'cls' missing?)"
        if posemb == POSEMB and not prefix
        else ""
    )
    grid = position_grid(checkpoint, posemb, tokens - prefix, (patch_h, patch_w), source_size, target_size, hint)
    query = names("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    _, num_heads, _ = require(checkpoint, query, 3, "query kernel, (D, heads, D / heads)")
    mlp = names("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel")
    _, mlp_dim = require(checkpoint, mlp, 2, "MLP kernel, (D, M)")
    representation_size = None
    if "pre_logits/kernel" in keys:
        representation_size = require(checkpoint, "pre_logits/kernel", 2, "pre_logits kernel, (D, R)")[1]
    _, num_classes = require(checkpoint, "head/kernel", 2, "classifier kernel, (D or R, classes)")
    return Architecture(
        hidden_size=hidden,
        num_layers=count_layers(checkpoint, r"Transformer/encoderblock_(\d+)/"),
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        patch_size=(patch_h, patch_w),
        num_channels=channels,
        grid=grid,
        num_classes=num_classes,
        classifier=classifier,
        representation_size=representation_size,
    )


FAMILY = Family(
    name="vit_jax .npz",
    table=TABLE,
    matches=lambda checkpoint: checkpoint.kind == "npz",
    detect=detect,
    reference_params=lambda checkpoint, arch: checkpoint,  # already under the reference's names
)
