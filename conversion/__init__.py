"""Google's original ViT checkpoints (vit_jax `.npz`, seed `*_checkpoint.bin`) -> Hub-ready hf_vit folders.

`convert(source, output_dir, **options)` is the API; `hf-vit-convert` / `python -m conversion` the CLI over it.
"""

from .converter import EXPORTS, VERIFY_TOLERANCE, convert, imagenet1k_labels
from .errors import ConversionError


__all__ = ["EXPORTS", "VERIFY_TOLERANCE", "ConversionError", "convert", "imagenet1k_labels"]
