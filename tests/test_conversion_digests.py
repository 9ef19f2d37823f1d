"""The converted tensors stay bit-identical: sha256 of every saved tensor, against digests recorded before conversion/
was rewritten (tests/data/conversion_digests.json, written by the code of commit 9324fcd).

Regenerate only on purpose (a deliberate change of the converted values): `HF_VIT_WRITE_DIGESTS=1 pytest <this file>`.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conversion import convert
from conversion.testing import random_vit_arrays, write_random_npz, write_random_seed_checkpoint


DIGESTS = Path(__file__).parent / "data" / "conversion_digests.json"


def _npz(path, arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


# name -> (source factory, convert options)
CASES = {
    "token": (lambda d: write_random_npz(d / "vit.npz"), {}),
    "gap": (lambda d: write_random_npz(d / "vit.npz", classifier="gap", seed=1), {}),
    "pre_logits": (lambda d: write_random_npz(d / "vit.npz", representation_size=24, num_classes=21, seed=2), {}),
    "pre_logits-new-head": (
        lambda d: write_random_npz(d / "vit.npz", representation_size=24, num_classes=21, seed=2),
        {"num_labels": 3},
    ),
    "pre_logits-kept-new-head": (
        lambda d: write_random_npz(d / "vit.npz", representation_size=24, num_classes=21, seed=2),
        {"num_labels": 5, "keep_pre_logits": True},
    ),
    "opt-target-prefix": (
        lambda d: _npz(d / "old.npz", {f"opt/target/{k}": v for k, v in random_vit_arrays(seed=3).items()}),
        {},
    ),
    "float16-npz": (
        lambda d: _npz(d / "f16.npz", {k: v.astype(np.float16) for k, v in random_vit_arrays(seed=4).items()}),
        {},
    ),
    "big-endian-fortran-npz": (
        lambda d: _npz(
            d / "be.npz", {k: np.asfortranarray(v.astype(">f4")) for k, v in random_vit_arrays(seed=9).items()}
        ),
        {},
    ),
    "sharded": (lambda d: write_random_npz(d / "vit.npz", seed=10), {"max_shard_size": 30_000}),
    "resample-48": (lambda d: write_random_npz(d / "vit.npz", seed=5), {"image_size": 48}),
    "resample-48x24-bfloat16": (
        lambda d: write_random_npz(d / "vit.npz", seed=5),
        {"image_size": (48, 24), "dtype": "bfloat16"},
    ),
    "larger-grid-down-float16": (
        lambda d: write_random_npz(d / "vit.npz", image_size=48, seed=6),
        {"image_size": 32, "dtype": "float16"},
    ),
    "transformers-vit": (lambda d: write_random_npz(d / "vit.npz", seed=7), {"export": "transformers-vit"}),
    "seed-bin": (lambda d: write_random_seed_checkpoint(d / "tiny_checkpoint.bin", seed=8), {"num_heads": 4}),
    "seed-bin-resample-new-head": (
        lambda d: write_random_seed_checkpoint(d / "tiny_checkpoint.bin", seed=8),
        {"num_heads": 4, "image_size": 40, "num_labels": 2},
    ),
}


def tensor_digests(folder: Path) -> dict[str, str]:
    """'dtype shape sha256' of every tensor in the folder's safetensors files."""
    digests = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key).contiguous()
                data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                shape = "x".join(map(str, tensor.shape))
                digests[key] = f"{str(tensor.dtype).removeprefix('torch.')} {shape} {hashlib.sha256(data).hexdigest()}"
    return digests


def _convert(name, tmp_path):
    make, options = CASES[name]
    return tensor_digests(convert(make(tmp_path), tmp_path / "out", verify=False, log=None, **options))


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_tensors_are_bit_identical_to_the_recorded_ones(tmp_path, name):
    found = _convert(name, tmp_path)
    if os.environ.get("HF_VIT_WRITE_DIGESTS"):
        recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
        recorded[name] = found
        DIGESTS.write_text(json.dumps(dict(sorted(recorded.items())), indent=1, sort_keys=True) + "\n")
    expected = json.loads(DIGESTS.read_text())[name]
    assert found == expected
