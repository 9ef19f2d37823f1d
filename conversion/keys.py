"""The conversion as data: key tables (checkpoint key -> hf_vit state-dict key, shape, named transform) and the plan.

`plan_conversion` walks a family's table against a checkpoint's headers (no tensor is loaded): every rule's key must
be there with the shape the detected architecture implies, every checkpoint key must be claimed by a rule, and the
result is the list of output tensors (target key, shape, source key, transform) that `build_state_dict` fills.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .checkpoint import Architecture, format_shape
from .errors import ConversionError


@dataclass(frozen=True)
class Rule:
    """One line of a key table. `{i}` stands for the block index; `shape` names the source dimensions."""

    source: str
    target: str
    shape: str
    transform: str = "identity"
    when: str = "always"  # "token": only with a class token; "pre_logits": only with a representation layer
    role: str = "body"  # "head" and "pre_logits" rules are replaced or dropped by --num-labels


# hf_vit state-dict keys -> stock transformers `ViTForImageClassification` (transformers 5 names), for
# `--export transformers-vit`. Stock ViT has no pre_logits and no "gap" pooling, so those are refused before this.
_LAYER = "transformer.encoder.layer.{i}"
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


def rename_for_transformers_vit(key: str) -> str:
    """The stock `ViTForImageClassification` name of an hf_vit state-dict key."""
    for pattern, replacement in TRANSFORMERS_VIT_KEYS:
        regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        if match := re.fullmatch(regex, key):
            return replacement.format(**match.groupdict())
    raise ConversionError(f"{key!r} has no counterpart in transformers' ViTForImageClassification.")


def rename_for_transformers_vit_model(key: str) -> str:
    """The stock `ViTModel` name of an hf_vit key: no `vit.` prefix, and pre_logits is its pooler (Linear + tanh)."""
    if key.startswith("pre_logits."):
        return "pooler.dense." + key.removeprefix("pre_logits.")
    return rename_for_transformers_vit(key).removeprefix("vit.")


# --- named transforms: (array function, shape function) -----------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the shape-changing transforms need to know besides the tensor."""

    source_grid: tuple[int, int]
    target_grid: tuple[int, int]
    num_prefix_tokens: int


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


def posemb_before_cls(array: np.ndarray, context: Context) -> np.ndarray:
    """
    big_vision adds its (1, N, D) `pos_embedding` to the patch tokens before it prepends the class token, so the class
    token carries none: hf_vit, which adds (1, 1 + N, D) after, gets a zero row for the class token. Same logits.
    """
    zeros = np.zeros((1, context.num_prefix_tokens, array.shape[-1]), np.float32)
    return resample_position_embeddings(np.concatenate([zeros, array], axis=1), context)


def unresampled(array: np.ndarray, shape: tuple[int, ...], context: Context) -> np.ndarray:
    """The inverse of `posemb` where it is one: an export writes the grid the model has, so nothing was resampled."""
    if context.source_grid != context.target_grid:
        raise ValueError(
            f"resampled position embeddings have no inverse ({context.source_grid} -> {context.target_grid})"
        )
    return array


def posemb_after_cls(array: np.ndarray, shape: tuple[int, ...], context: Context) -> np.ndarray:
    """
    The inverse of `posemb_before_cls`: the patch rows. The class token's rows must be zero (an export to big_vision
    first adds them to the class token, `conversion.export.fold_class_position`), so that nothing is dropped.
    """
    prefix = array[:, : context.num_prefix_tokens]
    if prefix.any():
        raise ValueError("the class token's position-embedding row is not zero: fold it into the class token first")
    return unresampled(array[:, context.num_prefix_tokens :], shape, context)


@dataclass(frozen=True)
class Transform:
    """
    A named transform of a key table: `array` and `shape` read the checkpoint (checkpoint layout -> hf_vit), and
    `inverse(hf_vit array, checkpoint shape, context)` writes one (`conversion.export`): the same table, read backwards.
    """

    array: Callable[[np.ndarray, Context], np.ndarray]
    shape: Callable[[tuple[int, ...], Context], tuple[int, ...]]
    inverse: Callable[[np.ndarray, tuple[int, ...], Context], np.ndarray]


def _posemb_shape(shape, context):
    return (shape[0], context.num_prefix_tokens + context.target_grid[0] * context.target_grid[1], shape[2])


def _reshape(array, shape, context):
    return array.reshape(shape)


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda a, c: a, lambda s, c: s, lambda a, s, c: a),
    # Conv kernels: Flax HWIO (Ph, Pw, C, D) -> PyTorch OIHW (D, C, Ph, Pw); back: (2, 3, 1, 0).
    "conv_hwio_to_oihw": Transform(
        lambda a, c: a.transpose(3, 2, 0, 1),
        lambda s, c: (s[3], s[2], s[0], s[1]),
        lambda a, s, c: a.transpose(2, 3, 1, 0),
    ),
    # Flax Dense kernels are (in, out); nn.Linear weights are (out, in).
    "dense": Transform(lambda a, c: a.T, lambda s, c: (s[1], s[0]), lambda a, s, c: a.T),
    # Attention input projections (D, H, d) -> (H * d, D): heads concatenated along the output features.
    "heads_in": Transform(
        lambda a, c: a.reshape(a.shape[0], -1).T, lambda s, c: (s[1] * s[2], s[0]), lambda a, s, c: a.T.reshape(s)
    ),
    # Attention output projection (H, d, D) -> (D, H * d).
    "heads_out": Transform(
        lambda a, c: a.reshape(-1, a.shape[-1]).T, lambda s, c: (s[2], s[0] * s[1]), lambda a, s, c: a.T.reshape(s)
    ),
    "heads_bias": Transform(lambda a, c: a.reshape(-1), lambda s, c: (s[0] * s[1],), _reshape),
    # (C,) or (1, 1, 1, C) -> (C,), e.g. the GroupNorms of the 2020 hybrid files.
    "flatten": Transform(lambda a, c: a.reshape(-1), lambda s, c: (math.prod(s),), _reshape),
    "posemb": Transform(resample_position_embeddings, _posemb_shape, unresampled),
    "posemb_before_cls": Transform(posemb_before_cls, _posemb_shape, posemb_after_cls),
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
        "C": arch.stem_channels or arch.num_channels,
        "G": arch.grid[0] * arch.grid[1],  # patches
        "T": arch.num_prefix_tokens + arch.grid[0] * arch.grid[1],  # tokens: class token + patches
        "R": arch.representation_size,
        "K": arch.representation_size or arch.hidden_size,
        "N": arch.num_classes,
        "1": 1,
    }


def expand(table: tuple[Rule, ...], arch: Architecture):
    """Each rule that applies to `arch`, once per block: (rule, checkpoint key, hf_vit key, checkpoint shape), the
    shape with None where the tensors do not determine a size (a seed checkpoint's heads)."""
    symbols = _symbols(arch)
    for rule in table:
        if rule.when == "token" and arch.classifier != "token":
            continue
        if rule.when == "pre_logits" and not arch.representation_size:
            continue
        for i in range(arch.num_layers) if "{i}" in rule.source else (None,):
            shape = tuple(int(s) if s.isdigit() else symbols[s] for s in rule.shape.split())
            yield rule, rule.source.format(i=i), rule.target.format(i=i), shape


def plan_conversion(
    checkpoint,
    table: tuple[Rule, ...],
    arch: Architecture,
    *,
    target_grid: tuple[int, int],
    new_head: int | None = None,
    keep_pre_logits: bool = True,
) -> Plan:
    """
    Match `table` against the checkpoint's keys and shapes and lay out the output tensors.

    `new_head`: None keeps the checkpoint's head; N > 0 writes a new zero-initialised N-way head (as the paper
    fine-tunes); 0 writes none (a feature extractor). `keep_pre_logits=False` drops pre_logits (as vit_jax
    fine-tuning does).
    """
    context = Context(arch.grid, target_grid, arch.num_prefix_tokens)
    head_in = arch.representation_size if arch.representation_size and keep_pre_logits else arch.hidden_size
    entries, dropped, consumed = [], [], set()
    for rule, source, target, expected in expand(table, arch):
        if source not in checkpoint.keys():
            raise ConversionError(
                f"{checkpoint.path}: missing key {source!r} (expected for {arch.describe()}): the checkpoint is "
                "incomplete."
            )
        found = checkpoint.shape(source)
        if None not in expected and found != expected:
            symbolic = "" if rule.shape.replace(" ", "").isdigit() else f" = ({rule.shape.replace(' ', ', ')})"
            raise ConversionError(
                f"{checkpoint.path}: {source!r} has shape {format_shape(found)}, expected "
                f"{format_shape(expected)}{symbolic} for the architecture the other tensors give "
                f"({arch.describe()}): the checkpoint is inconsistent."
            )
        consumed.add(source)
        if (rule.role == "pre_logits" and not keep_pre_logits) or (rule.role == "head" and new_head is not None):
            dropped.append(source)
            continue
        entries.append(Entry(target, TRANSFORMS[rule.transform].shape(found, context), source, rule.transform))
    leftovers = [k for k in checkpoint.keys() if k not in consumed]
    if leftovers:
        shown = ", ".join(repr(k) for k in leftovers[:5]) + (
            f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
        )
        raise ConversionError(
            f"{checkpoint.path}: {len(leftovers)} unexpected key(s) that no rule converts: {shown}; this is not a "
            "plain ViT checkpoint, or one with extra parameters hf_vit does not have."
        )
    if new_head:
        entries.append(Entry("head.weight", (new_head, head_in), None))
        entries.append(Entry("head.bias", (new_head,), None))
    return Plan(tuple(entries), tuple(dropped), context)


def produce(checkpoint, entry: Entry, context: Context) -> np.ndarray:
    """The C-contiguous float32 tensor of one entry: loaded (checked finite) and transformed, or zeros."""
    if entry.source is None:
        return np.zeros(entry.shape, dtype=np.float32)
    array = np.ascontiguousarray(TRANSFORMS[entry.transform].array(checkpoint.load(entry.source), context))
    if array.shape != entry.shape:  # the shape functions and the array functions must agree
        raise AssertionError(f"{entry.target}: transform {entry.transform} gave {array.shape}, planned {entry.shape}")
    return array


def unconvert(state: dict[str, np.ndarray], table: tuple[Rule, ...], arch: Architecture) -> dict[str, np.ndarray]:
    """
    The key table read backwards: hf_vit's tensors `state` -> the checkpoint's arrays, by checkpoint key, in the
    table's order. Each rule's checkpoint shape comes from `arch` (as `plan_conversion` checks it), its transform's
    `inverse` gives the array; every tensor of `state` must be claimed by a rule.
    """
    context = Context(arch.grid, arch.grid, arch.num_prefix_tokens)
    arrays, consumed = {}, set()
    for rule, source, target, shape in expand(table, arch):
        if target not in state:
            raise ConversionError(f"the model has no tensor {target!r}, which {source!r} is written from.")
        array = TRANSFORMS[rule.transform].inverse(state[target], shape, context)
        if array.shape != shape:  # the inverse and the table's shape must agree
            raise AssertionError(f"{source}: inverse of {rule.transform} gave {array.shape}, expected {shape}")
        arrays[source] = np.ascontiguousarray(array)
        consumed.add(target)
    leftovers = sorted(set(state) - consumed)
    if leftovers:
        raise ConversionError(
            f"{len(leftovers)} tensor(s) of the model that the layout has no key for: "
            + ", ".join(repr(k) for k in leftovers[:5])
        )
    return arrays


__all__ = [
    "TRANSFORMERS_VIT_KEYS",
    "TRANSFORMS",
    "Context",
    "Entry",
    "Plan",
    "Rule",
    "expand",
    "plan_conversion",
    "posemb_after_cls",
    "posemb_before_cls",
    "produce",
    "rename_for_transformers_vit",
    "rename_for_transformers_vit_model",
    "resample_position_embeddings",
    "unconvert",
    "unresampled",
]
