"""A streaming safetensors writer: the header is computed from the planned shapes, then tensors go out one by one.

safetensors' own `save_file` wants every tensor in memory at once; a checkpoint converter only ever needs one. The
format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header length, a JSON header
with each tensor's dtype, shape and byte offsets, then the raw little-endian bytes in that order.
"""

import collections
import json
import math
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


# dtype name -> (safetensors code, bytes per element)
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
SINGLE_FILE = "model.safetensors"
# Tensors go to the file in slices of this size. One write() of a whole multi-MB tensor lets the kernel back it with
# 2 MiB page-cache folios; on a VM whose free memory is returned to the host (free page reporting) each such folio is
# then refaulted from the host, and writing ViT-B/16 took 0.8 s instead of 0.08 s (benchmarks/bench_conversion.py).
WRITE_SLICE_BYTES = 1 << 19
PRODUCED_AHEAD = 2  # tensors made ahead of the one being written
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

    `produce(name)` returns the float32 array of one tensor; it is called once per tensor, in order, in a worker thread
    up to `PRODUCED_AHEAD` tensors ahead of the writing (I/O, NumPy and torch release the GIL, so producing and writing
    overlap), and each array is dropped once written: memory holds `PRODUCED_AHEAD + 1` tensors at a time. Returns the
    file names written.
    """
    code, itemsize = DTYPES[dtype]
    shards = shard_layout(tensors, dtype, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    )
    stream = _prefetched([name for name, _ in tensors], lambda name: _to_bytes(produce(name), dtype), PRODUCED_AHEAD)
    weight_map, total_size = {}, 0
    try:
        for file_name, shard in zip(names, shards, strict=True):
            total_size += _write_shard(directory / file_name, shard, stream, code, itemsize)
            weight_map.update({name: file_name for name, _ in shard})
    finally:
        stream.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX_FILE]
    return names


def _prefetched(names: list[str], make: Callable[[str], memoryview], ahead: int) -> Iterator[memoryview]:
    """
    `make(name)` for each name in order, made in a worker thread up to `ahead` tensors before the caller writes them:
    tensor sizes vary 4000-fold, and one tensor ahead left the writer waiting behind every large one.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = collections.deque(pool.submit(make, name) for name in names[:ahead])
        for position in range(len(names)):
            current = pending.popleft().result()
            if position + ahead < len(names):
                pending.append(pool.submit(make, names[position + ahead]))
            yield current
            del current


def _write_shard(path: Path, shard, stream: Iterator[memoryview], code: str, itemsize: int) -> int:
    """One safetensors file: header with every offset, then the tensors in order. Returns the data size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for name, shape in shard:
            data = next(stream)
            if data.nbytes != math.prod(shape) * itemsize:
                raise AssertionError(f"{name}: produced {data.nbytes} bytes, planned {shape}")
            for start in range(0, data.nbytes, WRITE_SLICE_BYTES):
                file.write(data[start : start + WRITE_SLICE_BYTES])
            del data
    return offset


__all__ = ["DTYPES", "INDEX_FILE", "PRODUCED_AHEAD", "SINGLE_FILE", "shard_layout", "write_safetensors"]
