"""A streaming safetensors writer: the header is computed from the planned shapes, then tensors go out one by one.

safetensors' own `save_file` wants every tensor in memory at once; a checkpoint converter only ever needs one. The
format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header length, a JSON header
with each tensor's dtype, shape and byte offsets, then the raw little-endian bytes in that order.
"""

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np


# dtype name -> (safetensors code, bytes per element)
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _to_bytes(array: np.ndarray, dtype: str) -> memoryview:
    """Little-endian bytes of a float32 array cast to `dtype` (round to nearest even, as torch casts)."""
    if dtype == "float32":
        return memoryview(np.ascontiguousarray(array, dtype="<f4")).cast("B")
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(getattr(torch, dtype))
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def shard_layout(
    tensors: list[tuple[str, tuple[int, ...]]], dtype: str, max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the tensors, in order, into shards of at most `max_shard_bytes` (a larger single tensor gets its own)."""
    itemsize = DTYPES[dtype][1]
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors(
    directory: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 10**9,
) -> list[str]:
    """
    Write `tensors` (name, shape) to `model.safetensors`, or to numbered shards plus an index above `max_shard_bytes`.

    `produce(name)` returns the float32 array of one tensor; it is called once per tensor, in order, and the array is
    dropped as soon as it is written, so memory holds one tensor at a time. Returns the file names written.
    """
    code, itemsize = DTYPES[dtype]
    shards = shard_layout(tensors, dtype, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    )
    weight_map, total_size = {}, 0
    for file_name, shard in zip(names, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = math.prod(shape) * itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        total_size += offset
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
        with open(directory / file_name, "wb") as file:
            file.write(struct.pack("<Q", len(header_bytes)))
            file.write(header_bytes)
            for name, shape in shard:
                data = _to_bytes(produce(name), dtype)
                if data.nbytes != math.prod(shape) * itemsize:
                    raise AssertionError(f"{name}: produced {data.nbytes} bytes, planned {shape} of {dtype}")
                file.write(data)
                del data
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX_FILE]
    return names


__all__ = ["DTYPES", "INDEX_FILE", "SINGLE_FILE", "shard_layout", "write_safetensors"]
