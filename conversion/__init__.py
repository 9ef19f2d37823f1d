"""Google's original ViT checkpoints (vit_jax and big_vision `.npz`, vit_jax training checkpoints, seed
`*_checkpoint.bin`) -> Hub-ready hf_vit folders, and back.

`convert(source, output_dir, **options)` is the API, `hf-vit-convert` / `python -m conversion` the CLI over it;
`export_npz(model_dir, output, ...)` and `hf-vit-export` write a folder back as a vit_jax or big_vision `.npz`.
"""

from .converter import EXPORTS, Options, convert
from .errors import ConversionError
from .export import export_npz
from .labels import imagenet1k_labels, imagenet21k_labels


__all__ = [
    "EXPORTS",
    "ConversionError",
    "Options",
    "convert",
    "export_npz",
    "imagenet1k_labels",
    "imagenet21k_labels",
]
