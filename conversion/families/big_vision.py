"""google-research/big_vision ViT `.npz` files: Linen module names, a top-level `pos_embedding`, optionally scanned.

big_vision's models/vit.py names a block's modules `LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
`MlpBlock_0` (vit_jax: `_1`, `LayerNorm_2`, `MlpBlock_3`), keeps learned position embeddings as `pos_embedding` with
one row per patch, added to the patch tokens *before* the class token is prepended (the class token carries none),
and may scan the encoder (one `Transformer/encoderblock/...` array with a leading depth axis, which
`conversion.checkpoint` presents as per-layer keys). Its `params/` prefix is dropped there too.
"""

import dataclasses
import re

from ..errors import ConversionError
from ..flax_checkpoint import PRE_LINEN_BLOCK_NAMES
from ..keys import Rule
from . import Family, RenamedParams, vit_jax


_LINEN = {pre_linen: linen for linen, pre_linen in PRE_LINEN_BLOCK_NAMES.items()}  # as Linen numbers them


def linen_name(vit_jax_key: str) -> str:
    """The big_vision key of a vit_jax key."""
    return re.sub("|".join(_LINEN), lambda match: _LINEN[match[0]], vit_jax_key)


POSEMB = "pos_embedding"
TABLE: tuple[Rule, ...] = tuple(
    Rule(POSEMB, rule.target, "1 G D", "posemb_before_cls")
    if rule.source == vit_jax.POSEMB
    else dataclasses.replace(rule, source=linen_name(rule.source))
    for rule in vit_jax.TABLE
)


def detect(checkpoint, source_size=None, target_size=None):
    if any(key.startswith("MAPHead_0/") for key in checkpoint.keys()):
        raise ConversionError(
            f"{checkpoint.path} uses big_vision's 'map' (attention pooling) classifier, which hf_vit does not have: "
            "only 'tok' and 'gap' models convert."
        )
    if POSEMB not in checkpoint.keys():
        raise ConversionError(
            f"{checkpoint.path}: missing key 'pos_embedding': a big_vision model with fixed (sincos2d) position "
            "embeddings stores none, and hf_vit converts learned ones only."
        )
    return vit_jax.detect(checkpoint, source_size, target_size, names=linen_name, posemb=POSEMB)


def _vit_jax_name_to_key(name: str) -> str:
    return name if name == POSEMB else linen_name(name)


FAMILY = Family(
    name="big_vision .npz",
    table=TABLE,
    matches=lambda checkpoint: (
        checkpoint.kind == "npz"
        and (POSEMB in checkpoint.keys() or any("/MlpBlock_0/" in key for key in checkpoint.keys()))
    ),
    detect=detect,
    # The reference reads "pos_embedding" (added before the class token) by that name: big_vision's own semantics.
    reference_params=lambda checkpoint, arch: RenamedParams(checkpoint, _vit_jax_name_to_key),
)
