"""Opening a checkpoint: its arrays by key, their shapes from the headers alone, and what a ViT's tensors determine.

An `.npz` is read with NumPy (`allow_pickle=False`; zipfile checks each member's CRC-32 as it is read). Keys are
normalised once, here, so that every family's key table sees the plain parameter tree:
- the prefixes of other tools are dropped (`opt/target/` of some old vit_jax files, big_vision's `params/`);
- a scanned encoder (big_vision `Transformer/encoderblock/...`, one array with a leading depth axis) is presented as
  the per-layer keys `Transformer/encoderblock_{i}/...` of an unscanned one.
A seed `*_checkpoint.bin` (`torch.save(model.state_dict())`) is read with `torch.load(weights_only=True)`, a vit_jax
training checkpoint (flax msgpack) by `conversion.flax_checkpoint`.
"""

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConversionError


PREFIXES = ("opt/target/", "params/img/", "params/")
SCANNED = re.compile(r"Transformer/encoderblock/(.+)")


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
    # A stem before the patch embedding (the ResNet of the R+ViT hybrids), described by its family; none by default:
    stem: str = ""  # for describe(), e.g. "ResNet (3, 4, 9) width 64"
    stem_stride: int = 1  # input pixels per feature-map pixel the patch embedding sees
    stem_channels: int | None = None  # channels of the feature map the patch embedding sees (None: num_channels)
    extra_config: tuple[tuple[str, object], ...] = ()  # config fields the stem adds, as (name, value) pairs

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.classifier == "token" else 0

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid[0] * self.pixels_per_token[0], self.grid[1] * self.pixels_per_token[1]

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        """Input pixels per position-embedding cell: the patch, times the stem's stride."""
        return self.patch_size[0] * self.stem_stride, self.patch_size[1] * self.stem_stride

    def describe(self) -> str:
        patch = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else "x".join(map(str, self.patch_size))
        height, width = self.image_size
        parts = [self.stem] if self.stem else []
        parts += [
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


def format_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 200 else text[:197] + "..."


class Checkpoint:
    """Arrays by key: `keys()`, `shape(key)`, `load(key)` or `[key]` (float32, checked finite), `close()`."""

    kind = "npz"

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as file:
            magic = file.read(6)
        if magic.startswith(b"\x93NUMPY"):
            raise ConversionError(
                f"{path} is a single .npy array, not an .npz archive of ViT parameters: pass the original .npz."
            )
        if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise ConversionError(
                f"{path} is not an .npz (zip) archive (it starts with {magic[:4]!r}): pass a vit_jax .npz, a vit_jax "
                "training checkpoint_N (flax msgpack) or a seed *_checkpoint.bin."
            )
        try:
            # allow_pickle=False: an .npz from the internet must never execute code when it is read.
            self._npz = np.load(path, allow_pickle=False)
            members = {self._key(name.removesuffix(".npy")): name for name in self._npz.zip.namelist()}
            headers = {key: self._header(name) for key, name in members.items()}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise ConversionError(f"{path} is truncated or corrupt ({one_line(error)}): download it again.") from None
        if not members:
            raise ConversionError(f"{path} is an empty archive: it holds no ViT parameters.")
        self._members, self._shapes, self._layer = {}, {}, {}
        for key, (shape, dtype) in headers.items():
            if dtype.hasobject:
                raise ConversionError(
                    f"{path}: {key!r} holds pickled Python objects (dtype {dtype}), which are never loaded "
                    "(allow_pickle=False): a ViT checkpoint holds only float arrays."
                )
            if dtype.kind != "f":
                raise ConversionError(f"{path}: {key!r} has dtype {dtype}, expected floating-point weights.")
            scanned = SCANNED.fullmatch(key)
            for i in range(shape[0]) if scanned and shape else [None]:
                name = key if i is None else f"Transformer/encoderblock_{i}/{scanned[1]}"
                self._members[name], self._layer[name] = members[key], i
                self._shapes[name] = shape if i is None else shape[1:]
        self._stacked: dict[str, np.ndarray] = {}  # a scanned array, read once for all its layers

    @staticmethod
    def _key(name: str) -> str:
        for prefix in PREFIXES:
            if name.startswith(prefix):
                return name[len(prefix) :]
        return name

    def _header(self, member: str) -> tuple[tuple[int, ...], np.dtype]:
        with self._npz.zip.open(member) as file:
            version = np.lib.format.read_magic(file)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(file)
        return tuple(int(s) for s in shape), dtype

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def load(self, key: str) -> np.ndarray:
        member, layer = self._members[key], self._layer[key]
        try:
            if layer is None:
                array = self._npz[member]
            else:
                if member not in self._stacked:
                    self._stacked[member] = self._npz[member]
                array = self._stacked[member][layer]
        except zipfile.BadZipFile as error:
            if "CRC" in str(error):
                raise ConversionError(
                    f"{self.path}: {key!r} does not match its recorded CRC-32: the checkpoint is corrupt, download it "
                    "again."
                ) from None
            raise ConversionError(
                f"{self.path}: reading {key!r} failed ({one_line(error)}): download it again."
            ) from None
        except (OSError, ValueError, EOFError) as error:
            raise ConversionError(
                f"{self.path}: reading {key!r} failed ({one_line(error)}): the file is truncated or corrupt."
            ) from None
        return checked_float32(array, key, self.path)

    __getitem__ = load

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def close(self) -> None:
        self._stacked.clear()
        self._npz.close()


class SeedCheckpoint:
    """A seed repo `*_checkpoint.bin`: a state dict of tensors in hf_vit's names, read with `weights_only=True`."""

    kind = "seed"

    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            with open(path, "rb") as file:
                is_zip = file.read(4) == b"PK\x03\x04"
            # weights_only=True: only tensors and plain containers are unpickled, never arbitrary objects.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as error:  # torch.load fails in many ways (UnpicklingError, struct.error, RuntimeError...)
            raise ConversionError(
                f"{path} is not a loadable PyTorch state dict ({one_line(error)}): pass a seed "
                "*_checkpoint.bin saved with torch.save(model.state_dict())."
            ) from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(
                f"{path} does not hold a state dict of tensors (found {type(state).__name__}): pass a seed "
                "*_checkpoint.bin saved with torch.save(model.state_dict())."
            )
        # DataParallel / DistributedDataParallel prefix every key with "module.".
        self._tensors = {k.removeprefix("module."): v for k, v in state.items()}
        for key, tensor in self._tensors.items():
            if not tensor.is_floating_point():
                raise ConversionError(f"{path}: {key!r} has dtype {tensor.dtype}, expected floating-point weights.")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def load(self, key: str) -> np.ndarray:
        return checked_float32(self._tensors[key].detach().float().numpy(), key, self.path)

    __getitem__ = load

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def close(self) -> None:
        self._tensors = {}


def checked_float32(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    """`array` as native float32 (a no-op when it is already), refusing NaN and infinite values."""
    array = np.asarray(array).astype(np.float32, copy=False)
    if not np.isfinite(array.sum()) and not np.isfinite(array).all():  # a finite sum proves every element finite
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ConversionError(
            f"{path}: {key!r} contains {bad} NaN or infinite values of {array.size}: the checkpoint is corrupt."
        )
    return array


def open_checkpoint(path: str | Path):
    """A vit_jax training checkpoint (by its msgpack content, whatever its name), a seed `.bin`/`.pt`/`.pth` (by its
    name: a torch.save file is a zip too), else an `.npz` (checked by its zip content)."""
    from .flax_checkpoint import FlaxCheckpoint, is_msgpack_map

    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(1)
    except OSError as error:
        raise ConversionError(f"Cannot read {path}: {error.strerror or error}.") from None
    if is_msgpack_map(head):
        return FlaxCheckpoint(path)
    return SeedCheckpoint(path) if path.suffix in (".bin", ".pt", ".pth") else Checkpoint(path)


# --- helpers for the families' detectors ----------------------------------------------------------------------------


def require(checkpoint, key: str, ndim: int, meaning: str) -> tuple[int, ...]:
    """The shape of `key`, which must be there with `ndim` dimensions."""
    if key not in checkpoint.keys():
        raise ConversionError(f"{checkpoint.path}: missing key {key!r} ({meaning}): not a complete ViT checkpoint.")
    shape = checkpoint.shape(key)
    if len(shape) != ndim:
        raise ConversionError(
            f"{checkpoint.path}: {key!r} has shape {format_shape(shape)}, expected {ndim} dimensions ({meaning})."
        )
    return shape


def count_layers(checkpoint, pattern: str) -> int:
    """1 + the largest block index in the keys (a gap in the indices shows up as missing keys of that block)."""
    indices = {int(m[1]) for key in checkpoint.keys() if (m := re.match(pattern, key))}
    if not indices:
        raise ConversionError(f"{checkpoint.path}: no encoder blocks found: not a ViT checkpoint.")
    return max(indices) + 1


def position_grid(checkpoint, key: str, num_patches: int, patch, source_size, target_size, hint="") -> tuple[int, int]:
    """
    The position-embedding grid: of the pre-training resolution `source_size` if given; else square, as vit_jax
    assumes (`checkpoint.interpolate_posembed`); else, for a patch count that no square has, the grid of the target
    resolution when it has exactly that many patches.
    """
    source_grid = target_grid = None
    if source_size is not None:
        source_grid = (source_size[0] // patch[0], source_size[1] // patch[1])
    if target_size is not None:
        target_grid = (target_size[0] // patch[0], target_size[1] // patch[1])
    if source_grid is not None:
        if source_grid[0] * source_grid[1] != num_patches:
            raise ConversionError(
                f"{checkpoint.path}: {key!r} has {num_patches} patch rows, which is not a "
                f"{source_grid[0]}x{source_grid[1]} grid: check the source image size."
            )
        return tuple(source_grid)
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    if target_grid is not None and target_grid[0] * target_grid[1] == num_patches:
        return tuple(target_grid)
    raise ConversionError(
        f"{checkpoint.path}: {key!r} has {num_patches} patch rows, not a square grid{hint}: pass the "
        "pre-training resolution as source_image_size (--source-image-size H W)."
    )


__all__ = [
    "Architecture",
    "Checkpoint",
    "SeedCheckpoint",
    "checked_float32",
    "count_layers",
    "open_checkpoint",
    "position_grid",
    "require",
]
