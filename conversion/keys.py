"""The conversion as data: one table from checkpoint keys to hf_vit state-dict keys, with a few named transforms.

`plan_conversion` walks a table against a checkpoint's headers (no tensor is loaded): every rule's key must be there
with the shape the detected architecture implies, every checkpoint key must be claimed by a rule, and the result is a
list of `Entry` (target key, target shape, source key, transform) that the writer then streams one tensor at a time.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .checkpoint import Architecture, _format_shape, sum_is_finite
from .errors import ConversionError
from .fast_transpose import copy_into


@dataclass(frozen=True)
class Rule:
    """One line of a key table. `{i}` stands for the block index; `shape` names the source dimensions."""

    source: str
    target: str
    shape: str
    transform: str = "identity"
    when: str = "always"  # "token": only with a class token; "pre_logits": only with a representation layer
    role: str = "body"  # "head" and "pre_logits" rules are replaced or dropped by --num-labels


# vit_jax/models_vit.py parameter names -> hf_vit (the seed's names). Shapes: D hidden, H heads, d = D / H, M MLP,
# Ph Pw patch, C channels, T tokens (class token + patches), R pre_logits width, K head input (R or D), N classes.
_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_1"
_LAYER = "transformer.encoder.layer.{i}"
NPZ_KEY_TABLE: tuple[Rule, ...] = (
    Rule("embedding/kernel", "transformer.embeddings.patch_embeddings.weight", "Ph Pw C D", "conv_hwio_to_oihw"),
    Rule("embedding/bias", "transformer.embeddings.patch_embeddings.bias", "D"),
    Rule("cls", "transformer.embeddings.cls_token", "1 1 D", when="token"),
    Rule("Transformer/posembed_input/pos_embedding", "transformer.embeddings.position_embeddings", "1 T D", "posemb"),
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

# The seed repo's `*_checkpoint.bin` already uses hf_vit's names and PyTorch layouts: only the grid may change.
_SEED_LAYER = "transformer.encoder.layer.{i}"
SEED_KEY_TABLE: tuple[Rule, ...] = (
    Rule(
        "transformer.embeddings.patch_embeddings.weight", "transformer.embeddings.patch_embeddings.weight", "D C Ph Pw"
    ),
    Rule("transformer.embeddings.patch_embeddings.bias", "transformer.embeddings.patch_embeddings.bias", "D"),
    Rule("transformer.embeddings.cls_token", "transformer.embeddings.cls_token", "1 1 D", when="token"),
    Rule(
        "transformer.embeddings.position_embeddings", "transformer.embeddings.position_embeddings", "1 T D", "posemb"
    ),
    *(
        Rule(f"{_SEED_LAYER}.{name}", f"{_SEED_LAYER}.{name}", shape)
        for name, shape in (
            ("attention_norm.weight", "D"),
            ("attention_norm.bias", "D"),
            ("attn.query.weight", "D D"),
            ("attn.query.bias", "D"),
            ("attn.key.weight", "D D"),
            ("attn.key.bias", "D"),
            ("attn.value.weight", "D D"),
            ("attn.value.bias", "D"),
            ("attn.out.weight", "D D"),
            ("attn.out.bias", "D"),
            ("ffn_norm.weight", "D"),
            ("ffn_norm.bias", "D"),
            ("ffn.fc1.weight", "M D"),
            ("ffn.fc1.bias", "M"),
            ("ffn.fc2.weight", "D M"),
            ("ffn.fc2.bias", "D"),
        )
    ),
    Rule("transformer.encoder.encoder_norm.weight", "transformer.encoder.encoder_norm.weight", "D"),
    Rule("transformer.encoder.encoder_norm.bias", "transformer.encoder.encoder_norm.bias", "D"),
    Rule("pre_logits.weight", "pre_logits.weight", "R D", when="pre_logits", role="pre_logits"),
    Rule("pre_logits.bias", "pre_logits.bias", "R", when="pre_logits", role="pre_logits"),
    Rule("head.weight", "head.weight", "N K", role="head"),
    Rule("head.bias", "head.bias", "N", role="head"),
)

# hf_vit state-dict keys -> stock transformers `ViTForImageClassification` (transformers 5 names), for
# `--export transformers-vit`. Stock ViT has no pre_logits and no "gap" pooling, so those are refused before this.
TRANSFORMERS_VIT_KEYS: tuple[tuple[str, str], ...] = (
    ("transformer.embeddings.cls_token", "vit.embeddings.cls_token"),
    ("transformer.embeddings.position_embeddings", "vit.embeddings.position_embeddings"),
    ("transformer.embeddings.patch_embeddings.weight", "vit.embeddings.patch_embeddings.projection.weight"),
    ("transformer.embeddings.patch_embeddings.bias", "vit.embeddings.patch_embeddings.projection.bias"),
    (_LAYER + ".attention_norm.{p}", "vit.layers.{i}.layernorm_before.{p}"),
    (_LAYER + ".attn.query.{p}", "vit.layers.{i}.attention.q_proj.{p}"),
    (_LAYER + ".attn.key.{p}", "vit.layers.{i}.attention.k_proj.{p}"),
    (_LAYER + ".attn.value.{p}", "vit.layers.{i}.attention.v_proj.{p}"),
    (_LAYER + ".attn.out.{p}", "vit.layers.{i}.attention.o_proj.{p}"),
    (_LAYER + ".ffn_norm.{p}", "vit.layers.{i}.layernorm_after.{p}"),
    (_LAYER + ".ffn.fc1.{p}", "vit.layers.{i}.mlp.fc1.{p}"),
    (_LAYER + ".ffn.fc2.{p}", "vit.layers.{i}.mlp.fc2.{p}"),
    ("transformer.encoder.encoder_norm.{p}", "vit.layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
)


# --- named transforms: (array function, shape function) ---------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the shape-changing transforms need to know besides the tensor."""

    source_grid: tuple[int, int]
    target_grid: tuple[int, int]
    num_prefix_tokens: int


@dataclass(frozen=True)
class Transform:
    array: Callable[[np.ndarray, Context], np.ndarray]
    shape: Callable[[tuple[int, ...], Context], tuple[int, ...]]


def resample_position_embeddings(array: np.ndarray, context: Context) -> np.ndarray:
    """
    vit_jax `checkpoint.interpolate_posembed` / the seed's `load_from`: keep the class-token row, zoom the grid.

    hf_vit's own `resample_position_embeddings` (scipy `zoom(order=1)` semantics: bilinear, corner-aligned), run in
    float64 so that rounding to the saved dtype does not depend on the summation order.
    """
    import torch

    from hf_vit.modeling_hf_vit import resample_position_embeddings as resample

    if context.source_grid == context.target_grid:
        return array
    float64 = torch.from_numpy(array.astype(np.float64))
    resampled = resample(float64, context.source_grid, context.target_grid, context.num_prefix_tokens)
    return resampled.numpy().astype(np.float32)


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda a, c: a, lambda s, c: s),
    # Conv kernels: Flax HWIO (Ph, Pw, C, D) -> PyTorch OIHW (D, C, Ph, Pw).
    "conv_hwio_to_oihw": Transform(lambda a, c: a.transpose(3, 2, 0, 1), lambda s, c: (s[3], s[2], s[0], s[1])),
    # Flax Dense kernels are (in, out); nn.Linear weights are (out, in).
    "dense": Transform(lambda a, c: a.T, lambda s, c: (s[1], s[0])),
    # Attention input projections (D, H, d) -> (H * d, D): heads concatenated along the output features.
    "heads_in": Transform(lambda a, c: a.reshape(a.shape[0], -1).T, lambda s, c: (s[1] * s[2], s[0])),
    # Attention output projection (H, d, D) -> (D, H * d).
    "heads_out": Transform(lambda a, c: a.reshape(-1, a.shape[-1]).T, lambda s, c: (s[2], s[0] * s[1])),
    "heads_bias": Transform(lambda a, c: a.reshape(-1), lambda s, c: (s[0] * s[1],)),
    "posemb": Transform(
        resample_position_embeddings,
        lambda s, c: (s[0], c.num_prefix_tokens + c.target_grid[0] * c.target_grid[1], s[2]),
    ),
}


# --- planning -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tensor of the output: from `source` through `transform`, or zeros when `source` is None (a new head)."""

    target: str
    shape: tuple[int, ...]
    source: str | None
    transform: str = "identity"


@dataclass(frozen=True)
class Plan:
    entries: tuple[Entry, ...]
    dropped: tuple[str, ...]  # source keys read by a rule but deliberately not converted (old head, pre_logits)
    context: Context


def _symbols(arch: Architecture) -> dict[str, int | None]:
    heads = arch.num_heads
    return {
        "D": arch.hidden_size,
        "H": heads,
        "d": arch.hidden_size // heads if heads else None,
        "M": arch.mlp_dim,
        "Ph": arch.patch_size[0],
        "Pw": arch.patch_size[1],
        "C": arch.num_channels,
        "T": arch.num_prefix_tokens + arch.grid[0] * arch.grid[1],
        "R": arch.representation_size,
        "K": arch.representation_size or arch.hidden_size,
        "N": arch.num_classes,
        "1": 1,
    }


def plan_conversion(
    checkpoint,
    table: tuple[Rule, ...],
    arch: Architecture,
    *,
    target_grid: tuple[int, int],
    num_labels: int | None = None,
    keep_pre_logits: bool = False,
) -> Plan:
    """
    Match `table` against the checkpoint's keys and shapes and lay out the output tensors.

    With `num_labels`, the head becomes a new zero-initialised `num_labels`-way classifier (as the paper fine-tunes)
    and pre_logits is dropped (as vit_jax fine-tuning does) unless `keep_pre_logits`.
    """
    keys = checkpoint.keys()
    present = set(keys)
    symbols = _symbols(arch)
    context = Context(arch.grid, target_grid, arch.num_prefix_tokens)
    drop_pre_logits = num_labels is not None and not keep_pre_logits
    head_in = arch.representation_size if arch.representation_size and not drop_pre_logits else arch.hidden_size
    entries, dropped, consumed = [], [], set()
    for rule in table:
        if rule.when == "token" and arch.classifier != "token":
            continue
        if rule.when == "pre_logits" and not arch.representation_size:
            continue
        for i in range(arch.num_layers) if "{i}" in rule.source else (None,):
            source, target = rule.source.format(i=i), rule.target.format(i=i)
            if source not in present:
                raise ConversionError(
                    f"{checkpoint.path}: missing key {source!r} (expected for {arch.describe()}): the checkpoint is "
                    "incomplete."
                )
            expected = tuple(symbols[s] for s in rule.shape.split())
            found = checkpoint.shape(source)
            if None not in expected and found != expected:
                raise ConversionError(
                    f"{checkpoint.path}: {source!r} has shape {_format_shape(found)}, expected "
                    f"{_format_shape(expected)} = ({rule.shape.replace(' ', ', ')}) for the architecture the other "
                    f"tensors give ({arch.describe()}): the checkpoint is inconsistent."
                )
            consumed.add(source)
            if (rule.role == "pre_logits" and drop_pre_logits) or (rule.role == "head" and num_labels is not None):
                dropped.append(source)
                continue
            entries.append(Entry(target, TRANSFORMS[rule.transform].shape(found, context), source, rule.transform))
    leftovers = [k for k in keys if k not in consumed]
    if leftovers:
        shown = ", ".join(repr(k) for k in leftovers[:5]) + (
            f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
        )
        raise ConversionError(
            f"{checkpoint.path}: {len(leftovers)} unexpected key(s) that no rule converts: {shown}; this is not a "
            "plain vit_jax ViT checkpoint, or one with extra parameters hf_vit does not have."
        )
    if num_labels is not None:
        entries.append(Entry("head.weight", (num_labels, head_in), None))
        entries.append(Entry("head.bias", (num_labels,), None))
    return Plan(tuple(entries), tuple(dropped), context)


def rename_for_transformers_vit(key: str) -> str:
    """The stock `ViTForImageClassification` name of an hf_vit state-dict key."""
    for pattern, replacement in TRANSFORMERS_VIT_KEYS:
        regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        match = re.fullmatch(regex, key)
        if match:
            return replacement.format(**match.groupdict())
    raise ConversionError(f"{key!r} has no counterpart in transformers' ViTForImageClassification.")


class ScratchRing:
    """
    Reusable float32 output buffers for `produce`'s transposes, `slots` of them taken in turn, one per transposed
    tensor.

    A fresh buffer per tensor costs a page fault per 4 KiB (a third of a fresh process's conversion time). A buffer is
    reused `slots` transposes later, so this is safe while fewer than `slots` produced tensors are alive at once:
    `write_safetensors` holds `PRODUCED_AHEAD + 1` (the one it writes and those made ahead of it).
    """

    def __init__(self, slots: int = 3):
        self._buffers = [bytearray() for _ in range(slots)]
        self._turn = -1

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        """The next buffer (grown if it is too small) as a C-contiguous float32 array of `shape`."""
        self._turn = (self._turn + 1) % len(self._buffers)
        count = math.prod(shape)
        if len(self._buffers[self._turn]) < 4 * count:
            self._buffers[self._turn] = bytearray(4 * count)
        return np.frombuffer(self._buffers[self._turn], np.float32, count).reshape(shape)


def produce(checkpoint, entry: Entry, context: Context, scratch: ScratchRing | None = None) -> np.ndarray:
    """
    The float32 tensor of one entry, loaded, checked to be finite and transformed now (the caller writes it and lets
    it go).

    With a `ScratchRing`, the tensor is transposed into its next buffer instead of fresh memory.
    """
    if entry.source is None:
        return np.zeros(entry.shape, dtype=np.float32)
    raw = checkpoint.load(entry.source, check_finite=False)
    array = TRANSFORMS[entry.transform].array(raw, context)
    if array.shape != entry.shape:  # the shape functions and the array functions must agree
        raise AssertionError(f"{entry.target}: transform {entry.transform} gave {array.shape}, planned {entry.shape}")
    if array.flags.c_contiguous:
        result, checked = array, raw
    else:  # a permuted view of `raw`: the same values, checked in the transposed copy while it is in cache
        out = np.empty(entry.shape, dtype=np.float32) if scratch is None else scratch.array(entry.shape)
        result = checked = copy_into(out, array)
    if not sum_is_finite(checked):
        checkpoint.load(entry.source)  # the exact check: raises, counting the NaN and inf values, unless none
    if not np.may_share_memory(result, raw):  # the view is no longer needed
        checkpoint.release(entry.source)
    return result


__all__ = [
    "NPZ_KEY_TABLE",
    "SEED_KEY_TABLE",
    "TRANSFORMERS_VIT_KEYS",
    "TRANSFORMS",
    "Entry",
    "Plan",
    "Rule",
    "ScratchRing",
    "plan_conversion",
    "produce",
    "rename_for_transformers_vit",
    "resample_position_embeddings",
]
