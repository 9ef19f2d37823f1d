"""Every original layout through the same pipeline: big_vision (params/ prefix, Linen names, pos_embedding added before
the class token, scanned encoder), zeroed ImageNet-21k heads (a feature extractor), augreg ImageNet-21k heads (class
names), and what a conversion leaves on disk (permissions, folders of killed conversions)."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import verified
from PIL import Image
from safetensors import safe_open
from test_conversion_digests import tensor_digests
from transformers import AutoModel, AutoModelForImageClassification

import hf_vit  # noqa: F401
from conversion import convert, imagenet21k_labels
from conversion.testing import big_vision_arrays, random_vit_arrays, write_random_npz
from hf_vit.verification import verification_images


def save_npz(path, arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


def big_vision_logits(arrays, images):
    """big_vision's ViT forward, written here from its definition: pos_embedding added before the class token."""
    from conversion.reference import gelu_tanh, layer_norm

    p = {k.removeprefix("params/"): v.astype(np.float64) for k, v in arrays.items()}
    x = images.astype(np.float64).transpose(0, 2, 3, 1)  # (B, H, W, C)
    kernel = p["embedding/kernel"]
    size, hidden = kernel.shape[0], kernel.shape[-1]
    batch, height, width, _ = x.shape
    x = x.reshape(batch, height // size, size, width // size, size, -1).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, -1, size * size * x.shape[-1]) @ kernel.reshape(-1, hidden) + p["embedding/bias"]
    x = x + p["pos_embedding"]
    if "cls" in p:
        x = np.concatenate([np.broadcast_to(p["cls"], (batch, 1, hidden)), x], axis=1)
    layers = 1 + max(int(k.split("/")[1].removeprefix("encoderblock_")) for k in p if "encoderblock_" in k)
    for i in range(layers):
        b = f"Transformer/encoderblock_{i}"
        a = f"{b}/MultiHeadDotProductAttention_0"
        y = layer_norm(x, p[f"{b}/LayerNorm_0/scale"], p[f"{b}/LayerNorm_0/bias"])
        q, k, v = (
            np.einsum("bsd,dhe->bhse", y, p[f"{a}/{n}/kernel"]) + p[f"{a}/{n}/bias"][:, None]
            for n in ("query", "key", "value")
        )
        w = np.einsum("bhse,bhte->bhst", q, k) / np.sqrt(q.shape[-1])
        w = np.exp(w - w.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        x = x + np.einsum("bhst,bhte,hed->bsd", w, v, p[f"{a}/out/kernel"]) + p[f"{a}/out/bias"]
        y = layer_norm(x, p[f"{b}/LayerNorm_1/scale"], p[f"{b}/LayerNorm_1/bias"])
        y = gelu_tanh(y @ p[f"{b}/MlpBlock_0/Dense_0/kernel"] + p[f"{b}/MlpBlock_0/Dense_0/bias"])
        x = x + y @ p[f"{b}/MlpBlock_0/Dense_1/kernel"] + p[f"{b}/MlpBlock_0/Dense_1/bias"]
    x = layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
    pooled = x[:, 0] if "cls" in p else x.mean(1)
    return pooled @ p["head/kernel"] + p["head/bias"]


def unstack(arrays):
    """A scanned tree as the per-layer one (for the direct forward above)."""
    result = {}
    for key, value in arrays.items():
        if "/encoderblock/" in key:
            for i, layer in enumerate(value):
                result[key.replace("/encoderblock/", f"/encoderblock_{i}/")] = layer
        else:
            result[key] = value
    return result


def logits_of(folder, images):
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.from_numpy(images)).logits.double().numpy()


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_big_vision_layouts_give_big_vision_logits(tmp_path, scanned, classifier):
    arrays = big_vision_arrays(random_vit_arrays(classifier=classifier), scanned=scanned)
    npz = save_npz(tmp_path / "bv.npz", arrays)
    lines = []
    folder = convert(npz, tmp_path / "out", log=lines.append)
    verified(lines)
    images = verification_images(3, 32, 32, seed=7)
    expected = big_vision_logits(unstack(arrays), images)
    assert np.abs(expected).max() > 0.1 and np.abs(logits_of(folder, images) - expected).max() <= 1e-5
    with safe_open(folder / "model.safetensors", "np") as weights:
        posemb = weights.get_tensor("transformer.embeddings.position_embeddings")
    if classifier == "token":  # the class token carries no position embedding: a zero row, the cls token as it was
        assert not posemb[0, 0].any()
    np.testing.assert_array_equal(posemb[:, -16:], arrays["params/pos_embedding"])


def test_scanned_and_unscanned_big_vision_files_convert_to_the_same_tensors(tmp_path):
    arrays = random_vit_arrays(representation_size=24)
    one = convert(save_npz(tmp_path / "a.npz", big_vision_arrays(arrays)), tmp_path / "a", log=None)
    scanned = save_npz(tmp_path / "b.npz", big_vision_arrays(arrays, scanned=True))
    assert tensor_digests(one) == tensor_digests(convert(scanned, tmp_path / "b", log=None))


def test_big_vision_resampled_position_embeddings_match_the_reference(tmp_path):
    npz = save_npz(tmp_path / "bv.npz", big_vision_arrays(random_vit_arrays(), scanned=True))
    lines = []
    folder = convert(npz, tmp_path / "out", image_size=48, log=lines.append)
    verified(lines)
    assert json.loads((folder / "config.json").read_text())["image_size"] == 48


def zero_head(arrays):
    arrays["head/kernel"] = np.zeros_like(arrays["head/kernel"])
    arrays["head/bias"] = np.zeros_like(arrays["head/bias"])
    return arrays


@pytest.mark.parametrize("representation_size", [24, None], ids=["pre_logits", "no-pre_logits"])
def test_zeroed_head_becomes_a_feature_extractor(tmp_path, representation_size):
    arrays = zero_head(random_vit_arrays(representation_size=representation_size, num_classes=21843))
    npz = save_npz(tmp_path / "ViT-B_16.npz", arrays)
    lines = []
    folder = convert(npz, tmp_path / "out", log=lines.append)
    assert any("head is all zeros" in line for line in lines)
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {} and config["representation_size"] == representation_size
    front, body = (folder / "README.md").read_text().split("---\n")[1:3]
    assert yaml.safe_load(front)["pipeline_tag"] == "image-feature-extraction"
    assert "Google zeroed the ImageNet-21k heads" in body and "--num-labels N" in body
    with safe_open(folder / "model.safetensors", "np") as weights:
        assert "head.weight" not in weights.keys()
        assert ("pre_logits.weight" in weights.keys()) == bool(representation_size)

    images = verification_images(2, 32, 32, seed=3)
    features = logits_of(
        folder, images
    )  # the head's input: pre_logits (Linear + tanh) of the class token, or the token
    assert features.shape == (2, representation_size or 32) and np.abs(features).max() > 0.1
    base = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pooled = base(torch.from_numpy(images)).pooler_output.double().numpy()
    if representation_size:
        pre_logits = arrays["pre_logits/kernel"].astype(np.float64), arrays["pre_logits/bias"]
        np.testing.assert_allclose(features, np.tanh(pooled @ pre_logits[0] + pre_logits[1]), atol=1e-5)
    else:
        np.testing.assert_allclose(features, pooled, atol=1e-6)

    classifier = convert(npz, tmp_path / "five", num_labels=5, log=None)  # asked for: a new head, no feature extractor
    assert len(json.loads((classifier / "config.json").read_text())["id2label"]) == 5


def test_zeroed_head_with_pre_logits_exports_a_stock_vit_model_whose_pooler_is_pre_logits(tmp_path):
    """`--export transformers-vit` of a 2020 ImageNet-21k file: transformers' own ViTModel, as on the Hub
    (google/vit-base-patch16-224-in21k), its pooler (Linear + tanh of the class token) holding pre_logits."""
    from transformers import ViTModel, pipeline

    arrays = zero_head(random_vit_arrays(representation_size=24, num_classes=21843))
    npz = save_npz(tmp_path / "ViT-B_16.npz", arrays)
    lines = []
    folder = convert(npz, tmp_path / "stock", export="transformers-vit", log=lines.append)
    verified(lines)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ViTModel"] and config["pooler_output_size"] == 24 and "auto_map" not in config
    assert not list(folder.glob("*.py"))  # stock transformers: no remote code
    front, body = (folder / "README.md").read_text().split("---\n")[1:3]
    assert yaml.safe_load(front)["pipeline_tag"] == "image-feature-extraction" and "`pooler_output`" in body
    assert "stock `transformers.ViTModel`" in body

    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(model) is ViTModel and not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    images = verification_images(2, 32, 32, seed=3)
    with torch.no_grad():
        pooled = model.eval()(torch.from_numpy(images)).pooler_output.double().numpy()
    # the same features as hf_vit's feature extractor of the same file (its "logits" are pre_logits' output)
    np.testing.assert_allclose(pooled, logits_of(convert(npz, tmp_path / "hf_vit", log=None), images), atol=1e-5)
    tokens = pipeline("image-feature-extraction", model=str(folder))(Image.new("RGB", (40, 30), "white"))
    assert np.asarray(tokens).shape == (1, 17, 32)


def test_stock_vit_model_has_no_logits_for_onnx(tmp_path, capsys):
    npz = save_npz(tmp_path / "ViT-B_16.npz", zero_head(random_vit_arrays(representation_size=24)))
    with pytest.raises(ValueError, match="has no logits to export to ONNX: .*export hf_vit"):
        convert(npz, tmp_path / "stock", export="transformers-vit", onnx=True, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ViT-B_16.npz"]


def test_augreg_imagenet21k_head_keeps_its_21843_class_names(tmp_path):
    name = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
    npz = write_random_npz(tmp_path / name, num_classes=21843)
    folder = convert(npz, tmp_path / "out", log=None)
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    assert (
        len(id2label) == 21843 and id2label["0"] == "organism, being" and id2label["21842"] == imagenet21k_labels()[-1]
    )
    assert sum(label == "tench, Tinca tinca" for label in id2label.values()) == 1
    assert (
        yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])["pipeline_tag"] == "image-classification"
    )


def test_imagenet21k_label_file_is_complete_and_unique():
    from importlib.resources import files

    rows = files("conversion").joinpath("imagenet21k_labels.txt").read_text().splitlines()
    wnids = [row.split(" ", 1)[0] for row in rows]
    assert len(rows) == 21843 and len(set(wnids)) == 21843 and all(w.startswith("n") and len(w) == 9 for w in wnids)


# --- what a conversion leaves on disk ----------------------------------------------------------------------------


def test_converted_folder_has_the_permissions_the_umask_gives(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz")
    old = os.umask(0o022)
    try:
        folder = convert(npz, tmp_path / "out", verify=False, log=None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # as os.makedirs creates it, not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def test_next_conversion_removes_the_partial_folder_of_a_killed_one(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz")
    script = (
        "import os, signal, conversion.converter as c\n"
        "def killed(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.flax_vit_forward = killed  # during verification: the folder is written, not yet in place\n"
        f"c.convert({str(npz)!r}, {str(tmp_path / 'out')!r}, log=None)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(stale) == 1 and (tmp_path / stale[0] / "model.safetensors").is_file()
    running = tmp_path / f".out.partial-{os.getppid()}-abcdef"  # another conversion, still under way: left alone
    running.mkdir()

    command = [sys.executable, "-m", "conversion", str(npz), str(tmp_path / "out"), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"removed {tmp_path / stale[0]}, left by an interrupted conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "out", "vit.npz"])
