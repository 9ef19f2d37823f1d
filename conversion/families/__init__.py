"""Checkpoint families: each is a key table, a detector and its part of the reference, in a module of its own.

A new family (e.g. the ResNet+ViT hybrids) is a new module defining a `Family`, listed in `FAMILIES` before any family
that would claim its files; the pipeline (`conversion.converter`) does not change. A family whose models have a stem
before the patch embedding (`hybrid`: the R+ViT ResNet) adds its rules (`stem_rules`), its part of the reference
(`reference_stem`) and its config fields and strides (`Architecture.stem*`, `extra_config`).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..checkpoint import Architecture
from ..errors import ConversionError
from ..keys import Rule


@dataclass(frozen=True)
class Family:
    name: str  # e.g. "vit_jax .npz", shown in the log
    table: tuple[Rule, ...]  # checkpoint key -> hf_vit key (see conversion.keys)
    matches: Callable[[object], bool]  # does an opened checkpoint belong to this family?
    # (checkpoint, pre-training (H, W) or None, target (H, W) or None) -> Architecture; num_heads None if unknown
    detect: Callable[[object, tuple[int, int] | None, tuple[int, int] | None], Architecture]
    # (checkpoint, architecture) -> the parameters by vit_jax name, for conversion.reference.flax_vit_forward
    reference_params: Callable[[object, Architecture], Mapping[str, np.ndarray]]
    hidden_act: str = "gelu_pytorch_tanh"  # Flax nn.gelu is the tanh approximation
    seed: bool = False  # a seed-repo fine-tune (the model card says so)
    # Optional, for a family with a stem before the patch embedding (the R+ViT hybrids' ResNet):
    # (checkpoint, architecture) -> the stem's rules, planned before `table`
    stem_rules: Callable[[object, Architecture], tuple[Rule, ...]] | None = None
    # (checkpoint, architecture, images (B, C, H, W), dtype) -> the stem's feature map (B, C', H', W') in the
    # reference, which `conversion.reference.flax_vit_forward` then takes as its images
    reference_stem: Callable[[object, Architecture, np.ndarray, str], np.ndarray] | None = None

    def rules(self, checkpoint, arch: Architecture) -> tuple[Rule, ...]:
        """Every rule of a checkpoint of this family: the stem's (checked first, as its input comes first), the table."""
        return (self.stem_rules(checkpoint, arch) if self.stem_rules else ()) + self.table


class RenamedParams:
    """A checkpoint seen under the reference's (vit_jax) names: `checkpoint_key(name)`, then `to_flax(name, array)`."""

    def __init__(self, checkpoint, checkpoint_key: Callable[[str], str], to_flax=lambda name, array: array):
        self.checkpoint, self.checkpoint_key, self.to_flax = checkpoint, checkpoint_key, to_flax

    def __contains__(self, name: str) -> bool:
        return self.checkpoint_key(name) in self.checkpoint.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        return self.to_flax(name, self.checkpoint.load(self.checkpoint_key(name)))


from . import big_vision, hybrid, seed, vit_jax  # noqa: E402  (the modules import Family from here)


FAMILIES: tuple[Family, ...] = (hybrid.SEED_FAMILY, seed.FAMILY, hybrid.FAMILY, big_vision.FAMILY, vit_jax.FAMILY)


def find_family(checkpoint) -> Family:
    for family in FAMILIES:
        if family.matches(checkpoint):
            return family
    raise ConversionError(
        f"{checkpoint.path} matches no known checkpoint layout ({', '.join(f.name for f in FAMILIES)})."
    )


__all__ = ["FAMILIES", "Family", "RenamedParams", "find_family"]
