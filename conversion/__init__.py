"""Google's original ViT checkpoints (vit_jax and big_vision `.npz`, seed `*_checkpoint.bin`) -> Hub-ready hf_vit folders.

`convert(source, output_dir, **options)` is the API; `hf-vit-convert` / `python -m conversion` the CLI over it.
"""

from .converter import EXPORTS, Options, convert
from .errors import ConversionError
from .labels import imagenet1k_labels, imagenet21k_labels


__all__ = [
    "EXPORTS",
    "ConversionError",
    "Options",
    "convert",
    "imagenet1k_labels",
    "imagenet21k_labels",
]
