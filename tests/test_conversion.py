"""conversion/: vit_jax .npz -> hf_vit folders, exact to a NumPy implementation of the original Flax model."""

import json

import numpy as np
import pytest
import torch

from conversion import ConversionError, convert
from conversion.reference import flax_vit_forward, verification_images
from conversion.testing import write_random_npz


TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=37, patch_size=8, image_size=32)


def test_random_npz_has_the_vit_jax_layout(tmp_path):
    arrays = np.load(write_random_npz(tmp_path / "tiny.npz", num_classes=10))
    assert arrays["embedding/kernel"].shape == (8, 8, 3, 32)
    assert arrays["cls"].shape == (1, 1, 32)
    assert arrays["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)
    assert arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (32, 4, 8)
    assert arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"].shape == (4, 8, 32)
    assert arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape == (32, 37)
    assert arrays["head/kernel"].shape == (32, 10)
    assert all(arrays[k].dtype == np.float32 for k in arrays.files)
    gap = np.load(write_random_npz(tmp_path / "gap.npz", classifier="gap", image_size=(32, 48)))
    assert "cls" not in gap.files
    assert gap["Transformer/posembed_input/pos_embedding"].shape == (1, 24, 32)


def test_tiny_token_checkpoint_matches_the_flax_reference(tmp_path):
    npz = write_random_npz(tmp_path / "tiny.npz")
    folder = convert(npz, tmp_path / "out", log=None)
    from hf_vit import VisionTransformerForImageClassification

    model = VisionTransformerForImageClassification.from_pretrained(folder).eval()
    images = verification_images(3, 32, 32, seed=7)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).logits.double().numpy()
    from conversion.checkpoint import NpzCheckpoint, detect_npz_architecture

    checkpoint = NpzCheckpoint(npz)
    _, reference = flax_vit_forward(checkpoint, detect_npz_architecture(checkpoint), images)
    assert np.abs(logits - reference).max() <= 1e-5
    assert np.abs(reference).max() > 0.1  # the comparison has something to compare
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu_pytorch_tanh"


def test_new_head_is_zero_and_labels_are_stored(tmp_path):
    npz = write_random_npz(tmp_path / "tiny.npz", representation_size=24)
    folder = convert(npz, tmp_path / "out", num_labels=3, labels=["cat", "dog", "bird"], log=None)
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}
    assert config["representation_size"] is None


def test_bad_input_raises_conversion_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ConversionError, match="not an .npz"):
        convert(bad, tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists()
