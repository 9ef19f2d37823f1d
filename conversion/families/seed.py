"""The seed repo's (jeonsworld/ViT-pytorch) `*_checkpoint.bin`: `torch.save(model.state_dict())` in hf_vit's names.

The keys and PyTorch layouts are already hf_vit's, so the table only checks shapes (and the grid may change); the
number of heads is not in the shapes and comes from --variant. The seed uses exact (erf) GELU.
"""

from ..checkpoint import Architecture, count_layers, position_grid, require
from ..errors import ConversionError
from ..keys import Rule
from . import Family, RenamedParams


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
    if any(".hybrid_model." in k for k in keys):
        raise ConversionError(
            f"{checkpoint.path} is a hybrid ResNet+ViT (R50-ViT) checkpoint: hf_vit converts plain ViTs only."
        )
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


_NAMES = {
    "embedding/kernel": PATCH,
    "embedding/bias": "transformer.embeddings.patch_embeddings.bias",
    "cls": "transformer.embeddings.cls_token",
    "Transformer/posembed_input/pos_embedding": POSEMB,
    "Transformer/encoder_norm/scale": "transformer.encoder.encoder_norm.weight",
    "Transformer/encoder_norm/bias": "transformer.encoder.encoder_norm.bias",
    "pre_logits/kernel": "pre_logits.weight",
    "pre_logits/bias": "pre_logits.bias",
    "head/kernel": "head.weight",
    "head/bias": "head.bias",
}
_BLOCK_NAMES = {
    "LayerNorm_0/scale": "attention_norm.weight",
    "LayerNorm_0/bias": "attention_norm.bias",
    "LayerNorm_2/scale": "ffn_norm.weight",
    "LayerNorm_2/bias": "ffn_norm.bias",
    "MlpBlock_3/Dense_0/kernel": "ffn.fc1.weight",
    "MlpBlock_3/Dense_0/bias": "ffn.fc1.bias",
    "MlpBlock_3/Dense_1/kernel": "ffn.fc2.weight",
    "MlpBlock_3/Dense_1/bias": "ffn.fc2.bias",
    **{
        f"MultiHeadDotProductAttention_1/{n}/{p}": f"attn.{n}.{q}"
        for n in ("query", "key", "value", "out")
        for p, q in (("kernel", "weight"), ("bias", "bias"))
    },
}


def _seed_key(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    if not name.startswith("Transformer/encoderblock_"):
        return name  # not a seed key: `in` says False
    block, rest = name.removeprefix("Transformer/encoderblock_").split("/", 1)
    return f"transformer.encoder.layer.{block}.{_BLOCK_NAMES.get(rest, rest)}"


def reference_params(checkpoint, arch: Architecture) -> RenamedParams:
    """The seed's tensors under vit_jax names and Flax layouts (Dense kernels (in, out), attention (D, H, d))."""
    heads = arch.num_heads

    def to_flax(name, array):
        if name == "embedding/kernel":  # (D, C, P, P) -> (P, P, C, D)
            return array.transpose(2, 3, 1, 0)
        if name.endswith(("query/kernel", "key/kernel", "value/kernel")):  # (H*d, D) -> (D, H, d)
            return array.T.reshape(array.shape[1], heads, -1)
        if name.endswith(("query/bias", "key/bias", "value/bias")):
            return array.reshape(heads, -1)
        if name.endswith("out/kernel"):  # (D, H*d) -> (H, d, D)
            return array.T.reshape(heads, -1, array.shape[0])
        if name.endswith("kernel"):  # nn.Linear (out, in) -> Dense (in, out)
            return array.T
        return array

    return RenamedParams(checkpoint, _seed_key, to_flax)


FAMILY = Family(
    name="seed *_checkpoint.bin",
    table=TABLE,
    matches=lambda checkpoint: checkpoint.kind == "seed",
    detect=detect,
    reference_params=reference_params,
    hidden_act="gelu",
    seed=True,
)
