"""Where a checkpoint comes from: a local file, or an official name resolved to Google's public URL and downloaded.

Official names (google-research/vision_transformer README):
  ViT-B_16                                  -> imagenet21k/ViT-B_16.npz (ImageNet-21k pre-training, 224 px)
  imagenet21k/ViT-L_16                      -> the same collection, explicitly
  imagenet21k+imagenet2012/ViT-B_16-224     -> fine-tuned on ImageNet-1k (the names without -224 are at 384 px)
  B_16-i21k-300ep-lr_0.001-aug_medium1-...  -> augreg/<name>.npz ("How to train your ViT", arXiv 2106.10270)
Downloads land in a cache (`$HF_VIT_CACHE`, else `$XDG_CACHE_HOME/hf_vit`, else `~/.cache/hf_vit`) with their sha256
beside them, so a second conversion reads the file from disk.
"""

import hashlib
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError


BASE_URL = "https://storage.googleapis.com/vit_models"
COLLECTIONS = {
    "imagenet21k": ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50+ViT-B_16"),
    "imagenet21k+imagenet2012": (
        "ViT-B_16",
        "ViT-B_16-224",
        "ViT-B_32",
        "ViT-L_16",
        "ViT-L_16-224",
        "ViT-L_32",
        "R50+ViT-B_16",
    ),
}
# e.g. B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224
AUGREG_NAME = re.compile(
    r"(?P<model>(?:R_Ti|R\d+_(?:Ti|S|B|L|H)|Ti|S|B|L|H)_\d+)"
    r"-(?P<pretrain_dataset>i1k|i21k)-(?P<epochs>\d+)ep-lr_(?P<lr>[\d.e-]+)-aug_(?P<aug>[a-z]+\d*)"
    r"-wd_(?P<wd>[\d.e-]+)-do_(?P<dropout>[\d.]+)-sd_(?P<stochastic_depth>[\d.]+)"
    r"(?:--(?P<finetune_dataset>[a-z0-9_]+)-steps_(?P<finetune_steps>\d+k?)-lr_(?P<finetune_lr>[\d.e-]+)"
    r"-res_(?P<finetune_resolution>\d+))?"
)
DATASET_NAMES = {"i21k": "imagenet-21k", "i1k": "imagenet-1k", "imagenet2012": "imagenet-1k", "cifar100": "cifar100"}


@dataclass
class Source:
    """A checkpoint on disk, plus what is known about where it came from (for the model card)."""

    path: Path
    name: str  # as the user gave it, or the official name
    url: str | None = None
    collection: str | None = None  # "imagenet21k", "imagenet21k+imagenet2012", "augreg"; None for a local file
    augreg: dict | None = None  # hyper-parameters parsed from an augreg file name
    sha256: str | None = None  # recorded at download; for a local file the conversion computes it


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def parse_augreg_name(name: str) -> dict | None:
    """The hyper-parameters in an augreg file name, or None if `name` is not one."""
    match = AUGREG_NAME.fullmatch(Path(name).name.removesuffix(".npz"))
    if not match:
        return None
    fields = {k: v for k, v in match.groupdict().items() if v is not None}
    fields["pretrain_dataset"] = DATASET_NAMES.get(fields["pretrain_dataset"], fields["pretrain_dataset"])
    if "finetune_dataset" in fields:
        fields["finetune_dataset"] = DATASET_NAMES.get(fields["finetune_dataset"], fields["finetune_dataset"])
    return fields


def cache_dir() -> Path:
    if os.environ.get("HF_VIT_CACHE"):
        return Path(os.environ["HF_VIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_vit"


def official_url(name: str) -> tuple[str, str, str] | None:
    """(collection, file name, URL) for an official checkpoint name, or None if `name` is not one."""
    name = name.strip()
    for prefix in (BASE_URL + "/", "gs://vit_models/"):
        name = name.removeprefix(prefix)
    name = name.replace("%2B", "+").removesuffix(".npz")
    collection, _, model = name.rpartition("/")
    if collection in ("", "augreg") and AUGREG_NAME.fullmatch(model):
        collection = "augreg"
    elif collection == "" and model in COLLECTIONS["imagenet21k"]:
        collection = "imagenet21k"  # a bare name is the pre-trained checkpoint, as in vit_jax's README
    elif model not in COLLECTIONS.get(collection, ()):
        return None
    file_name = f"{model}.npz"
    return collection, file_name, f"{BASE_URL}/{collection.replace('+', '%2B')}/{file_name}"


def _known_names() -> str:
    return (
        "ViT-B_16, imagenet21k/ViT-L_16, imagenet21k+imagenet2012/ViT-B_16-224, or an augreg file name such as "
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224"
    )


def resolve_source(source: str | os.PathLike, *, cache: Path | None = None, progress: bool = True) -> Source:
    """A local checkpoint, or an official name downloaded into the cache; a ConversionError otherwise."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return Source(path=path, name=path.name, augreg=parse_augreg_name(path.name))
    if path.exists():
        raise ConversionError(
            f"SOURCE {text} is not a regular file: pass a .npz file, a *_checkpoint.bin or an official name."
        )
    official = official_url(text)
    if official is None:
        if path.suffix in (".npz", ".bin", ".pt", ".pth") or os.sep in text and not text.startswith("imagenet21k"):
            raise ConversionError(f"SOURCE {text} does not exist: check the path.")
        raise ConversionError(f"Unknown checkpoint {text!r}: not a file, and not an official name ({_known_names()}).")
    collection, file_name, url = official
    model = file_name.removesuffix(".npz")
    destination = (cache or cache_dir()) / collection / file_name
    if not destination.is_file():
        download(url, destination, progress=progress)
    result = Source(
        path=destination,
        name=f"{collection}/{model}" if collection != "augreg" else model,
        url=url,
        collection=collection,
        augreg=parse_augreg_name(model) if collection == "augreg" else None,
    )
    recorded = destination.with_name(destination.name + ".sha256")
    if recorded.is_file():
        result.sha256 = recorded.read_text().split()[0]
    return result


def download(url: str, destination: Path, *, progress: bool = True, timeout: float = 30.0) -> str:
    """Download `url` to `destination` (atomically, with a progress bar); record and return its sha256."""
    partial = destination.with_name(destination.name + ".partial")
    by_hand = f"fetch it by hand (curl -L -o '{destination}' '{url}') or pass a local .npz as SOURCE"
    try:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            destination.parent.mkdir(parents=True, exist_ok=True)  # only once the server answers: offline, no trace
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(total, destination.name, progress)
            with open(partial, "wb") as file:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            bar.close()
        if total is not None and partial.stat().st_size != total:
            raise OSError(f"received {partial.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise ConversionError(f"Cannot download {url} ({' '.join(str(reason).split())}): {by_hand}.") from None
    shutil.move(partial, destination)
    sha256 = digest.hexdigest()
    destination.with_name(destination.name + ".sha256").write_text(f"{sha256}  {destination.name}\n")
    return sha256


def _progress_bar(total: int | None, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not enabled)


__all__ = [
    "BASE_URL",
    "COLLECTIONS",
    "Source",
    "cache_dir",
    "download",
    "file_sha256",
    "official_url",
    "parse_augreg_name",
    "resolve_source",
]
