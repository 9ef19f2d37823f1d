"""vit_jax training checkpoints: the `checkpoint_N` files of `flax.training.checkpoints.save_checkpoint(workdir,
(params, opt_state, step), step)` (vit_jax/train.py), read with the `msgpack` package, without flax or jax.

The format, from flax/serialization.py (`msgpack_serialize(to_state_dict(target))`): one msgpack map; a tuple is a map
with keys "0", "1", ...; an array is msgpack extension type 1 whose payload is itself msgpack, [shape, dtype name,
C-order bytes]; a NumPy scalar is type 3 with the same payload; arrays over 2**30 bytes are split into chunks (no ViT
parameter is that large: refused). vit_jax's params are the Linen tree of models_vit.py, which numbers a block's
modules per class (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`) where the released `.npz` files
have the pre-Linen names (`_1`, `LayerNorm_2`, `MlpBlock_3`; vit_jax's `checkpoint.load` converts those with flax's
`convert_pre_linen`): the parameters are presented under the `.npz` names, so that the vit_jax families read them.
A flax `TrainState` (`{"step", "params", "opt_state"}`) is read the same way.

Nothing is executed or unpickled: msgpack is data. The optimizer state is skipped unread (`Unpacker.skip`); every
declared length is bounded, dtypes come from a fixed list, and an array's bytes must match its shape before it is
built, so a truncated or hostile file is one line.
"""

import math
import re
from pathlib import Path

import numpy as np

from .checkpoint import checked_float32, one_line
from .errors import ConversionError


NDARRAY, NPSCALAR = 1, 3  # flax serialization._MsgpackExtType
PARAMS_KEYS, STEP_KEYS = ("0", "params"), ("2", "step")  # (params, opt_state, step) tuple; TrainState
FLOAT_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "bfloat16": "bfloat16"}
INT_DTYPES = {name: np.dtype(name) for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")}
MAX_DEPTH = 32  # a ViT's params tree is 5 deep
MAX_ARRAY_BYTES = 2**31 - 1  # msgpack's own limit for one object; flax chunks above 2**30
# Linen's per-class names of an encoder block's modules -> the released files' pre-Linen ones.
PRE_LINEN_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
}
PRE_LINEN_BLOCK_NAMES["MlpBlock_0"] = "MlpBlock_3"
_BLOCK_CHILD = re.compile(r"(Transformer/encoderblock_\d+/)(" + "|".join(PRE_LINEN_BLOCK_NAMES) + ")(/.*)")


def is_msgpack_map(head: bytes) -> bool:
    """A msgpack map of 1 to 15 entries (fixmap), or a map16 / map32: how flax's checkpoints begin. (0x80, an empty
    fixmap, is also how a pickle begins: never a checkpoint.)"""
    return bool(head) and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


class FlaxCheckpoint:
    """A vit_jax training checkpoint's params under the `.npz` names: `keys()`, `shape()`, `load()`; `step`."""

    kind = "npz"  # the families read it as a vit_jax .npz

    def __init__(self, path: Path):
        import msgpack

        self.path = path
        params, self.step = None, None
        try:
            with open(path, "rb") as file:
                unpacker = msgpack.Unpacker(
                    file,
                    raw=False,
                    ext_hook=self._decode_extension,
                    max_buffer_size=MAX_ARRAY_BYTES,
                    max_bin_len=MAX_ARRAY_BYTES,
                    max_ext_len=MAX_ARRAY_BYTES,
                    max_str_len=1 << 16,
                    max_array_len=1 << 16,
                    max_map_len=1 << 16,
                )
                found = []
                for _ in range(unpacker.read_map_header()):
                    key = unpacker.unpack()
                    found.append(key)
                    if key in PARAMS_KEYS and params is None:
                        params = unpacker.unpack()
                    elif key in STEP_KEYS:
                        self.step = unpacker.unpack()
                    else:
                        unpacker.skip()  # the optimizer state: not converted, not even decoded
        except ConversionError:
            raise
        except msgpack.OutOfData:
            raise ConversionError(f"{path} is a truncated msgpack checkpoint: copy it again.") from None
        except (ValueError, TypeError, MemoryError, RecursionError, msgpack.UnpackException) as error:
            raise ConversionError(f"{path} is not a readable flax msgpack checkpoint ({one_line(error)}).") from None
        if params is None:
            shown = ", ".join(repr(k) for k in found[:5])
            raise ConversionError(
                f"{path} is a msgpack file without parameters (top-level keys {shown}): expected a flax checkpoint of "
                "(params, opt_state, step) as vit_jax's train.py saves it, or of a TrainState."
            )
        if isinstance(self.step, np.integer):
            self.step = int(self.step)
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0):
            raise ConversionError(f"{path}: the step is {self.step!r}, expected a non-negative integer.")
        if not isinstance(params, dict) or not params:
            raise ConversionError(f"{path}: the parameters are a {type(params).__name__}, expected a tree of arrays.")
        self._arrays: dict[str, np.ndarray] = {}
        self._flatten(params, "", 1)

    def _decode_extension(self, code: int, data: bytes):
        if code not in (NDARRAY, NPSCALAR):
            raise ConversionError(f"{self.path}: msgpack extension type {code}, which flax's arrays never use.")
        array = self._decode_array(data)
        return array[()] if code == NPSCALAR else array

    def _decode_array(self, data: bytes) -> np.ndarray:
        """flax `_ndarray_from_bytes`, checked: [shape, dtype name, bytes] with the bytes the shape needs."""
        import msgpack

        try:
            payload = msgpack.unpackb(data, raw=True, max_array_len=64)
        except (ValueError, TypeError, msgpack.UnpackException) as error:
            raise ConversionError(f"{self.path}: an array's header is corrupt ({one_line(error)}).") from None
        valid = isinstance(payload, list) and len(payload) == 3
        shape, name, buffer = payload if valid else (None, None, None)
        valid = valid and isinstance(shape, list) and isinstance(name, bytes) and isinstance(buffer, bytes)
        if not valid or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ConversionError(f"{self.path}: an array is not stored as flax stores one ([shape, dtype, bytes]).")
        name = name.decode("ascii", "replace")
        dtype = FLOAT_DTYPES.get(name) or INT_DTYPES.get(name)
        if dtype is None:
            raise ConversionError(f"{self.path}: an array has dtype {name!r}, which no ViT checkpoint holds.")
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if math.prod(shape) * itemsize != len(buffer):
            raise ConversionError(
                f"{self.path}: an array declares shape {tuple(shape)} of {name} but holds {len(buffer)} bytes: the "
                "checkpoint is corrupt."
            )
        if dtype == "bfloat16":  # NumPy has none: the upper half of a float32, exactly
            bits = np.frombuffer(buffer, np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        return np.frombuffer(bytearray(buffer), dtype).reshape(shape)  # a writable copy, as torch.from_numpy wants

    def _flatten(self, tree: dict, prefix: str, depth: int) -> None:
        """'/'-joined keys, as vit_jax flattens its params for the `.npz` files; empty subtrees (a parameterless
        `pre_logits`) have no arrays."""
        if depth > MAX_DEPTH:
            raise ConversionError(f"{self.path}: the parameters nest deeper than {MAX_DEPTH} levels: not a ViT.")
        for name, value in tree.items():
            key = f"{prefix}{name}"
            if isinstance(value, dict):
                if "__msgpack_chunked_array__" in value:
                    raise ConversionError(f"{self.path}: {key!r} is an array over 1 GiB (chunked): not a ViT's.")
                self._flatten(value, key + "/", depth + 1)
            elif isinstance(value, np.ndarray):
                if value.dtype.kind != "f":
                    raise ConversionError(
                        f"{self.path}: {key!r} has dtype {value.dtype}, expected floating-point weights."
                    )
                self._arrays[pre_linen_name(key)] = value
            else:
                raise ConversionError(f"{self.path}: {key!r} is a {type(value).__name__}, expected an array.")

    def keys(self) -> list[str]:
        return list(self._arrays)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._arrays[key].shape)

    def load(self, key: str) -> np.ndarray:
        return checked_float32(self._arrays[key], key, self.path)

    __getitem__ = load

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def close(self) -> None:
        self._arrays = {}


def pre_linen_name(key: str) -> str:
    """The released `.npz` name of a Linen parameter name (the inverse of what flax's `convert_pre_linen` does)."""
    match = _BLOCK_CHILD.fullmatch(key)
    return key if match is None else match[1] + PRE_LINEN_BLOCK_NAMES[match[2]] + match[3]


__all__ = ["FlaxCheckpoint", "PRE_LINEN_BLOCK_NAMES", "is_msgpack_map", "pre_linen_name"]
