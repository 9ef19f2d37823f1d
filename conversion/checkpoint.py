"""Reading checkpoints one tensor at a time, and detecting the architecture from the tensors alone.

Two sources: Google's vit_jax `.npz` files (the Flax parameter tree flattened with '/') and the seed repo's
`*_checkpoint.bin` (`torch.save(model.state_dict())`, keys already in hf_vit's names). Both are read through the same
small interface: `keys()`, `shape(key)`, `load(key) -> float32 np.ndarray`, `release(key)` once done with it, and
`scan()` (integrity and sha256, in a thread beside the conversion). Headers are read without the data, so the
architecture, the key table and the output layout are all settled before the first tensor is loaded.
"""

import functools
import hashlib
import io
import math
import mmap
import os
import re
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConversionError


try:  # zlib-ng's CRC-32 (carry-less multiply) is about 8x faster than zlib's; same polynomial, same values
    from zlib_ng.zlib_ng import crc32
except ImportError:
    from zlib import crc32


ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
NPY_MAGIC = b"\x93NUMPY"

# Some old vit_jax files store the parameters under the optimizer's target.
OLD_PREFIXES = ("opt/target/",)
SCAN_BATCH_BYTES = 4 << 20  # see NpzCheckpoint._scan_batches


@dataclass(frozen=True)
class Architecture:
    """Everything about a ViT that its tensors determine (and the heads, which a seed checkpoint cannot)."""

    hidden_size: int
    num_layers: int
    num_heads: int | None
    mlp_dim: int
    patch_size: tuple[int, int]
    num_channels: int
    grid: tuple[int, int]  # the patch grid the position embeddings are laid out for
    num_classes: int
    classifier: str  # "token" or "gap"
    representation_size: int | None  # pre_logits width, None without pre_logits

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.classifier == "token" else 0

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]

    def describe(self) -> str:
        patch = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else "x".join(map(str, self.patch_size))
        height, width = self.image_size
        parts = [
            f"hidden {self.hidden_size}",
            f"{self.num_layers} layers",
            f"{self.num_heads} heads" if self.num_heads else "heads unknown",
            f"MLP {self.mlp_dim}",
            f"patch {patch}",
            f"{height}x{width} px",
            f"{self.num_classes} classes",
            f"classifier {self.classifier}",
        ]
        if self.representation_size:
            parts.append(f"pre_logits {self.representation_size}")
        return ", ".join(parts)


def _format_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


class NpzCheckpoint:
    """A vit_jax `.npz`: headers read up front, arrays loaded one at a time with `allow_pickle=False`."""

    kind = "npz"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            magic = file.read(6)
        if magic.startswith(NPY_MAGIC):
            raise ConversionError(
                f"{self.path} is a single .npy array, not an .npz archive of ViT parameters: pass the original .npz."
            )
        if not magic.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)):
            raise ConversionError(
                f"{self.path} is not an .npz (zip) archive (it starts with {magic[:4]!r}): pass a vit_jax .npz or a "
                "seed *_checkpoint.bin."
            )
        try:
            # allow_pickle=False: an .npz from the internet must never execute code when it is read.
            self._npz = np.load(self.path, allow_pickle=False)
            members = self._npz.zip.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise ConversionError(
                f"{self.path} is truncated or corrupt ({_one_line(error)}): download it again."
            ) from None
        try:
            with open(self.path, "rb") as file:  # `load` returns views of this map: the page cache, no read, no copy
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as error:
            self._npz.close()
            raise ConversionError(
                f"{self.path} cannot be memory-mapped ({_one_line(error)}): copy it to a local disk first."
            ) from None
        self._names: dict[str, str] = {}  # parameter key -> member name inside the zip
        # Uncompressed members (np.savez writes them so): key -> (byte offset of the member's data, its size, its
        # CRC-32). They come from the zip directory alone, so `scan` can start before any .npy header is parsed; it
        # checks their CRC-32s in one sequential pass beside the conversion. Compressed members (savez_compressed) are
        # read, and their CRC-32s checked, by np.load.
        self._members: dict[str, tuple[int, int, int]] = {}
        for member in members:
            key = member[: -len(".npy")] if member.endswith(".npy") else member
            for prefix in OLD_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
            self._names[key] = member
            info = self._npz.zip.getinfo(member)
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            local = self._map[info.header_offset : info.header_offset + 30]  # its name and extra lengths vary
            if len(local) < 30 or local[:4] != ZIP_MAGIC:
                raise ConversionError(f"{self.path}: the zip entry of {key!r} is corrupt: download it again.")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            data_offset = info.header_offset + 30 + name_length + extra_length
            if data_offset + info.file_size > len(self._map):
                raise ConversionError(
                    f"{self.path}: {key!r} ends past the end of the file: the file is truncated or corrupt, download it "
                    "again."
                )
            self._members[key] = (data_offset, info.file_size, info.CRC)
        # A member's mapped pages leave this process's resident set once both `scan` and the tensor's reader have
        # released it (the page cache keeps them): without that, RSS would grow by the whole file.
        self._readers_left = {key: 2 for key in self._members}
        self._readers_lock = threading.Lock()
        if not self._names:
            raise ConversionError(f"{self.path} is an empty archive: it holds no ViT parameters.")

    @functools.cached_property
    def _headers(self) -> dict[str, tuple[tuple[int, ...], np.dtype, bool, int]]:
        """key -> (shape, dtype, fortran_order, .npy header length) of every member, read on first use."""
        headers = {}
        for key, member in self._names.items():
            if key not in self._members:
                headers[key] = self._read_header(key, functools.partial(self._npz.zip.open, member))
                continue
            data_offset, size, _ = self._members[key]
            member_bytes = memoryview(self._map)[data_offset : data_offset + min(size, 1 << 16)]
            try:
                headers[key] = self._read_header(key, functools.partial(io.BytesIO, member_bytes))
            finally:
                member_bytes.release()
            shape, dtype, _, header_length = headers[key]
            if size != header_length + math.prod(shape) * dtype.itemsize:
                raise ConversionError(
                    f"{self.path}: {key!r} holds {size - header_length} data bytes for shape "
                    f"{_format_shape(shape)} of {dtype}: the file is truncated or corrupt."
                )
        return headers

    def _read_header(self, key: str, open_member) -> tuple[tuple[int, ...], np.dtype, bool, int]:
        """(shape, dtype, fortran_order, header length) of one member, from its .npy header alone."""
        try:
            with open_member() as file:
                version = np.lib.format.read_magic(file)
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
                else:
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
                header_length = file.tell()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as error:
            raise ConversionError(
                f"{self.path}: {key!r} is not a readable NumPy array ({_one_line(error)}): the file is truncated, "
                "corrupt or not a vit_jax checkpoint."
            ) from None
        if dtype.hasobject:
            raise ConversionError(
                f"{self.path}: {key!r} holds pickled Python objects (dtype {dtype}), which are never loaded "
                "(allow_pickle=False): a ViT checkpoint holds only float arrays."
            )
        if dtype.kind != "f":
            raise ConversionError(
                f"{self.path}: {key!r} has dtype {dtype}, expected floating-point weights (float16/32/64)."
            )
        return tuple(int(s) for s in shape), dtype, bool(fortran_order), header_length

    def scan(self, sha256: bool = True, stop: threading.Event | None = None) -> str | None:
        """
        One sequential pass over the file, meant for a thread beside the conversion: every uncompressed member's
        CRC-32 is checked (raising ConversionError on a mismatch), and the file's sha256 is returned if asked.
        Setting `stop` ends the pass early (returning None).
        """
        digest = hashlib.sha256() if sha256 else None
        view, done = memoryview(self._map), 0
        try:
            for batch in self._scan_batches():
                if stop is not None and stop.is_set():
                    return None
                end = batch[-1][1] + batch[-1][2]
                if digest is not None:
                    digest.update(view[done:end])
                    done = end
                for key, offset, size, member_crc in batch:
                    if crc32(view[offset : offset + size]) != member_crc:  # what zipfile would have checked
                        raise ConversionError(
                            f"{self.path}: {key!r} does not match its recorded CRC-32: the checkpoint is corrupt, "
                            "download it again."
                        )
                    self.release(key)
            if digest is None:
                return None
            digest.update(view[done:])
            return digest.hexdigest()
        finally:
            view.release()

    def _scan_batches(self) -> list[list[tuple[str, int, int, int]]]:
        """
        The uncompressed members in file order, as runs of at least SCAN_BATCH_BYTES (key, offset, size, CRC-32).

        Hashing a run at once gives up the GIL once instead of once per member: each time the scan takes it back it
        may wait up to `sys.getswitchinterval()` (5 ms) behind the conversion's Python code, and a checkpoint has
        hundreds of small members (biases, norms).
        """
        batches, current, size = [], [], 0
        for key, (offset, length, crc) in sorted(self._members.items(), key=lambda item: item[1][0]):
            current.append((key, offset, length, crc))
            size += length
            if size >= SCAN_BATCH_BYTES:
                batches.append(current)
                current, size = [], 0
        return batches + [current] if current else batches

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._headers[key][0]

    def load(self, key: str, check_finite: bool = True) -> np.ndarray:
        """
        The array under `key` as float32 (native byte order), checked to be finite unless the caller checks (see
        `sum_is_finite`). An uncompressed float32 member is a read-only view of the mapped file; its CRC-32 is `scan`'s
        to check.
        """
        shape, dtype, fortran_order, header_length = self._headers[key]
        if key in self._members:
            offset = self._members[key][0] + header_length
            array = np.frombuffer(self._map, dtype, math.prod(shape), offset)
            array = array.reshape(shape, order="F" if fortran_order else "C")
        else:
            try:
                array = self._npz[self._names[key]]
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
                raise ConversionError(
                    f"{self.path}: reading {key!r} failed ({_one_line(error)}): the file is truncated or corrupt."
                ) from None
        return _checked_float32(array, key, self.path, check_finite)

    def release(self, key: str) -> None:
        """The caller is done with the view `load(key)` returned (reading it again stays correct, only slower)."""
        if key not in self._members:
            return
        with self._readers_lock:
            self._readers_left[key] -= 1
            if self._readers_left[key] > 0:
                return
        offset, size, _ = self._members[key]
        page = mmap.PAGESIZE
        start, end = -(-offset // page) * page, (offset + size) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)  # a shared file mapping refaults from the file

    def __getitem__(self, key: str) -> np.ndarray:
        """A copy of `load(key)`, for the NumPy reference, which reads parameters by their vit_jax names."""
        array = np.array(self.load(key))
        self.release(key)
        return array

    def close(self) -> None:
        self._npz.close()
        try:
            self._map.close()
        except BufferError:  # arrays loaded from it are still alive: the mapping goes when the last one does
            pass


class SeedCheckpoint:
    """A seed repo `*_checkpoint.bin`: a state dict of tensors in hf_vit's names, read with `weights_only=True`."""

    kind = "seed"

    def __init__(self, path: str | os.PathLike):
        import torch

        self.path = Path(path)
        try:
            # weights_only=True: only tensors and plain containers are unpickled, never arbitrary objects.
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=_is_zip(self.path))
        except Exception as error:  # torch.load fails in many ways (UnpicklingError, struct.error, RuntimeError...)
            raise ConversionError(
                f"{self.path} is not a loadable PyTorch state dict ({_one_line(error)}): pass a seed "
                "*_checkpoint.bin saved with torch.save(model.state_dict())."
            ) from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(
                f"{self.path} does not hold a state dict of tensors (found {type(state).__name__}): pass a seed "
                "*_checkpoint.bin saved with torch.save(model.state_dict())."
            )
        # DataParallel / DistributedDataParallel prefix every key with "module.".
        self._tensors = {k.removeprefix("module."): v for k, v in state.items()}
        for key, tensor in self._tensors.items():
            if not tensor.is_floating_point():
                raise ConversionError(
                    f"{self.path}: {key!r} has dtype {tensor.dtype}, expected floating-point weights."
                )

    def scan(self, sha256: bool = True, stop: threading.Event | None = None) -> str | None:
        """The file's sha256 (torch.load has checked the file already); `stop` is not needed for a file this small."""
        if not sha256:
            return None
        with open(self.path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def load(self, key: str, check_finite: bool = True) -> np.ndarray:
        """The tensor under `key` as a float32 array, checked to be finite unless the caller checks."""
        return _checked_float32(self._tensors[key].detach().float().numpy(), key, self.path, check_finite)

    def release(self, key: str) -> None:
        """Nothing to release: the tensors are in memory."""

    def close(self) -> None:
        self._tensors = {}


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == ZIP_MAGIC


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 200 else text[:197] + "..."


def sum_is_finite(array: np.ndarray) -> bool:
    """
    One fast pass: a finite float32 sum proves every element finite (NaN and inf propagate). False only means "maybe":
    the sum of huge finite weights overflows too, and then an element-wise check decides.
    """
    return bool(np.isfinite(array.sum()))


def _checked_float32(array: np.ndarray, key: str, path: Path, check_finite: bool = True) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind != "f":
        raise ConversionError(f"{path}: {key!r} has dtype {array.dtype}, expected floating-point weights.")
    array = array.astype(np.float32, copy=False)  # a no-op for native float32; a copy otherwise
    if check_finite and not sum_is_finite(array) and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ConversionError(
            f"{path}: {key!r} contains {bad} NaN or infinite values of {array.size}: the checkpoint is corrupt."
        )
    return array


def open_checkpoint(path: str | os.PathLike) -> NpzCheckpoint | SeedCheckpoint:
    """An `.npz` (by its zip content) or a seed `.bin`/`.pt`/`.pth` (by its name)."""
    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return SeedCheckpoint(path)
    return NpzCheckpoint(path)


# --- architecture detection ---------------------------------------------------------------------------------------

NPZ_PATCH_KERNEL = "embedding/kernel"
NPZ_POSEMB = "Transformer/posembed_input/pos_embedding"
NPZ_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")
SEED_PATCH_WEIGHT = "transformer.embeddings.patch_embeddings.weight"
SEED_POSEMB = "transformer.embeddings.position_embeddings"
SEED_BLOCK = re.compile(r"transformer\.encoder\.layer\.(\d+)\.")


def _require(checkpoint, key: str, ndim: int, meaning: str) -> tuple[int, ...]:
    if key not in checkpoint.keys():
        raise ConversionError(f"{checkpoint.path}: missing key {key!r} ({meaning}): not a complete ViT checkpoint.")
    shape = checkpoint.shape(key)
    if len(shape) != ndim:
        raise ConversionError(
            f"{checkpoint.path}: {key!r} has shape {_format_shape(shape)}, expected {ndim} dimensions ({meaning})."
        )
    return shape


def _count_layers(checkpoint, pattern: re.Pattern) -> int:
    indices = {int(m[1]) for key in checkpoint.keys() if (m := pattern.match(key))}
    if not indices:
        raise ConversionError(f"{checkpoint.path}: no encoder blocks found: not a ViT checkpoint.")
    return max(indices) + 1  # a gap in the indices shows up as missing keys of that block


def _grid(
    num_patches: int, key: str, checkpoint, source_grid: tuple[int, int] | None, target_grid, hint: str
) -> tuple[int, int]:
    """
    The position-embedding grid: as given; else square, as vit_jax assumes (`checkpoint.interpolate_posembed`); else,
    for a patch count that no square has, the target grid when it has exactly that many patches.
    """
    if source_grid is not None:
        if source_grid[0] * source_grid[1] != num_patches:
            raise ConversionError(
                f"{checkpoint.path}: {key!r} has {num_patches} patch rows, which is not a "
                f"{source_grid[0]}x{source_grid[1]} grid: check the source image size."
            )
        return source_grid
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    if target_grid is not None and target_grid[0] * target_grid[1] == num_patches:
        return tuple(target_grid)
    raise ConversionError(
        f"{checkpoint.path}: {key!r} has {num_patches} patch rows, not a square grid{hint}: pass the "
        "pre-training resolution as source_image_size (--source-image-size H W)."
    )


def detect_npz_architecture(
    checkpoint: NpzCheckpoint, source_grid: tuple[int, int] | None = None, target_grid: tuple[int, int] | None = None
) -> Architecture:
    """Read the architecture off the shapes of a vit_jax checkpoint; no table of variants is needed."""
    keys = set(checkpoint.keys())
    if any(k.startswith(("conv_root/", "block1/", "gn_root/")) for k in keys):
        raise ConversionError(
            f"{checkpoint.path} is a hybrid ResNet+ViT (R50+ViT) checkpoint: hf_vit converts plain ViTs only."
        )
    if any(k.startswith(("params/", "img/")) for k in keys) or any("MlpBlock_0" in k for k in keys):
        raise ConversionError(
            f"{checkpoint.path} uses the big_vision key layout (params/..., MlpBlock_0): only the vit_jax layout "
            "(Transformer/encoderblock_i/...) is supported."
        )
    patch_h, patch_w, channels, hidden = _require(checkpoint, NPZ_PATCH_KERNEL, 4, "patch embedding, (P, P, 3, D)")
    classifier = "token" if "cls" in keys else "gap"
    _, tokens, _ = _require(checkpoint, NPZ_POSEMB, 3, "position embeddings, (1, N + 1, D)")
    prefix = 1 if classifier == "token" else 0
    hint = "" if classifier == "token" else " (no 'cls' key, so no class-token row is expected: is 'cls' missing?)"
    grid = _grid(tokens - prefix, NPZ_POSEMB, checkpoint, source_grid, target_grid, hint)
    num_layers = _count_layers(checkpoint, NPZ_BLOCK)
    query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    _, num_heads, _ = _require(checkpoint, query, 3, "query kernel, (D, heads, D / heads)")
    _, mlp_dim = _require(checkpoint, "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", 2, "MLP kernel, (D, M)")
    representation_size = None
    if "pre_logits/kernel" in keys:
        representation_size = _require(checkpoint, "pre_logits/kernel", 2, "pre_logits kernel, (D, R)")[1]
    _, num_classes = _require(checkpoint, "head/kernel", 2, "classifier kernel, (D or R, classes)")
    return Architecture(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        patch_size=(patch_h, patch_w),
        num_channels=channels,
        grid=grid,
        num_classes=num_classes,
        classifier=classifier,
        representation_size=representation_size,
    )


def detect_seed_architecture(
    checkpoint: SeedCheckpoint,
    num_heads: int | None,
    source_grid: tuple[int, int] | None = None,
    target_grid: tuple[int, int] | None = None,
) -> Architecture:
    """Read the architecture off a seed state dict; the heads are not in the shapes and come from `--variant`."""
    keys = set(checkpoint.keys())
    if any(".hybrid_model." in k for k in keys):
        raise ConversionError(
            f"{checkpoint.path} is a hybrid ResNet+ViT (R50-ViT) checkpoint: hf_vit converts plain ViTs only."
        )
    hidden, channels, patch_h, patch_w = _require(checkpoint, SEED_PATCH_WEIGHT, 4, "patch embedding, (D, 3, P, P)")
    _, tokens, _ = _require(checkpoint, SEED_POSEMB, 3, "position embeddings, (1, N + 1, D)")
    classifier = "token" if "transformer.embeddings.cls_token" in keys else "gap"
    grid = _grid(tokens - (classifier == "token"), SEED_POSEMB, checkpoint, source_grid, target_grid, "")
    num_layers = _count_layers(checkpoint, SEED_BLOCK)
    mlp_dim, _ = _require(checkpoint, "transformer.encoder.layer.0.ffn.fc1.weight", 2, "MLP weight, (M, D)")
    num_classes, _ = _require(checkpoint, "head.weight", 2, "classifier weight, (classes, D)")
    representation_size = None
    if "pre_logits.weight" in keys:
        representation_size = _require(checkpoint, "pre_logits.weight", 2, "pre_logits weight, (R, D)")[0]
    return Architecture(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        patch_size=(patch_h, patch_w),
        num_channels=channels,
        grid=grid,
        num_classes=num_classes,
        classifier=classifier,
        representation_size=representation_size,
    )


__all__ = [
    "Architecture",
    "NpzCheckpoint",
    "SeedCheckpoint",
    "detect_npz_architecture",
    "detect_seed_architecture",
    "open_checkpoint",
]
