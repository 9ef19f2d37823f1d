"""Class names for `id2label`: the released heads' own (ImageNet-1k, ImageNet-21k), a list, or a file.

imagenet1k_labels.txt: the 1000 WordNet ids in sorted order (the order of the released 1000-class heads) with their
names. imagenet21k_labels.txt: the 21843 WordNet ids in the order of Google's ImageNet-21k heads, with their lemmas;
generated once from timm's public lists (github.com/huggingface/pytorch-image-models, commit aa4b585,
`timm/data/_info/imagenet21k_goog_synsets.txt` for the order and `imagenet_synset_to_lemma.txt` for the names).
"""

import functools
import importlib.resources
import os
from pathlib import Path

from .errors import ConversionError


@functools.cache
def _read(file_name: str) -> tuple[str, ...]:
    text = importlib.resources.files("conversion").joinpath(file_name).read_text(encoding="utf-8")
    return tuple(line.split(" ", 1)[1] for line in text.splitlines() if line.strip())


def imagenet1k_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard (sorted WordNet id) order of the released heads."""
    return list(_read("imagenet1k_labels.txt"))


def imagenet21k_labels() -> list[str]:
    """The 21843 ImageNet-21k class names in the order of Google's ImageNet-21k heads (e.g. the augreg files)."""
    return list(_read("imagenet21k_labels.txt"))


KNOWN = {"imagenet-1k": imagenet1k_labels, "imagenet1k": imagenet1k_labels, "imagenet2012": imagenet1k_labels}
KNOWN.update({"imagenet-21k": imagenet21k_labels, "imagenet21k": imagenet21k_labels})
BY_SIZE = {1000: imagenet1k_labels, 21843: imagenet21k_labels}


def resolve_labels(labels, num_classes: int, original_head: bool) -> list[str] | None:
    """
    The class names of a `num_classes`-way head: as given (a list, a file, 'imagenet-1k' or 'imagenet-21k'), else the
    ImageNet names for a checkpoint's own 1000- or 21843-class head, else None (transformers' LABEL_i).
    """
    if labels is None:
        return BY_SIZE[num_classes]() if original_head and num_classes in BY_SIZE else None
    if isinstance(labels, str) and labels.lower() in KNOWN:
        names = KNOWN[labels.lower()]()
    elif isinstance(labels, str | os.PathLike):
        path = Path(labels)
        if not path.is_file():
            raise ConversionError(
                f"labels file {path} does not exist: pass one class name per line, 'imagenet-1k' or 'imagenet-21k'."
            )
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [str(name) for name in labels]
    if len(names) != num_classes:
        raise ConversionError(f"{len(names)} labels given for a {num_classes}-class head: give exactly {num_classes}.")
    return names


__all__ = ["imagenet1k_labels", "imagenet21k_labels", "resolve_labels"]
