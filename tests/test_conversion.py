"""conversion/: vit_jax .npz and seed .bin -> hf_vit folders, exact to a NumPy implementation of the original Flax model.

Random checkpoints in the exact original layout (conversion.testing) stand in for Google's files: tiny token, gap,
pre_logits, a larger (384-style) grid, square and non-square resampling, one full ViT-B/16, and a seed .bin.
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import verified
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageClassification, ViTForImageClassification, pipeline

import hf_vit
from conversion import convert, imagenet1k_labels
from conversion.checkpoint import open_checkpoint
from conversion.families import vit_jax
from conversion.keys import TRANSFORMS, Context, resample_position_embeddings
from conversion.model_card import CITATION_BIBTEX
from conversion.reference import flax_vit_forward, zoom_linear
from conversion.testing import random_vit_arrays, write_random_npz, write_random_seed_checkpoint
from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification, VisionTransformerModel
from hf_vit.verification import verification_images


def reference(npz, images, **options):
    """(features, logits) of the NumPy Flax reference, straight from the .npz."""
    checkpoint = open_checkpoint(npz)
    return flax_vit_forward(checkpoint, vit_jax.detect(checkpoint), images, **options)


def convert_log(source, output_dir, **options) -> list[str]:
    lines = []
    convert(source, output_dir, log=lines.append, **options)
    return lines


def logits_of(folder, images, model_class=VisionTransformerForImageClassification):
    model = model_class.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.from_numpy(images)).logits.double().numpy()


# --- parity with the reference --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "npz_options, convert_options, size",
    [
        pytest.param({}, {}, (32, 32), id="token"),
        pytest.param({"classifier": "gap"}, {}, (32, 32), id="gap"),
        pytest.param({"representation_size": 24}, {}, (32, 32), id="pre_logits"),
        pytest.param({"image_size": 48}, {}, (48, 48), id="larger-grid"),  # like the 384 px fine-tunes: 6x6 patches
        pytest.param({}, {"image_size": 48}, (48, 48), id="resample-up"),
        pytest.param({"image_size": 48}, {"image_size": 32}, (32, 32), id="resample-down"),
        pytest.param({}, {"image_size": (48, 24)}, (48, 24), id="non-square-resample"),
        pytest.param({"classifier": "gap"}, {"image_size": (32, 56)}, (32, 56), id="non-square-gap"),
    ],
)
def test_converted_logits_match_the_flax_reference(tmp_path, npz_options, convert_options, size):
    npz = write_random_npz(tmp_path / "vit.npz", **npz_options)
    lines = []
    folder = convert(npz, tmp_path / "out", log=lines.append, **convert_options)
    images = verification_images(3, *size, seed=7)  # not the inputs verification used
    features, expected = reference(npz, images)
    assert np.abs(logits_of(folder, images) - expected).max() <= 1e-5
    assert np.abs(expected).max() > 0.1 and np.abs(features).max() > 0.1  # something to compare
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu_pytorch_tanh"
    assert config["image_size"] == (size[0] if size[0] == size[1] else list(size))
    assert config["classifier"] == npz_options.get("classifier", "token")
    assert config["representation_size"] == npz_options.get("representation_size")
    verified(lines)


def test_non_square_pre_training_grid(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz", image_size=(32, 48))  # 4x6 patches: no square has 24
    images = verification_images(2, 32, 48, seed=7)
    folder = convert(npz, tmp_path / "same", image_size=(32, 48), log=None)
    checkpoint = open_checkpoint(npz)
    arch = vit_jax.detect(checkpoint, (32, 48))
    assert np.abs(logits_of(folder, images) - flax_vit_forward(checkpoint, arch, images)[1]).max() <= 1e-5
    folder = convert(npz, tmp_path / "resampled", source_image_size=(32, 48), image_size=40, log=None)
    images = verification_images(2, 40, 40, seed=7)
    assert np.abs(logits_of(folder, images) - flax_vit_forward(checkpoint, arch, images)[1]).max() <= 1e-5


@pytest.mark.parametrize("layout", ["big-endian-fortran", "compressed", "float16"])
def test_other_npz_encodings_convert_the_same(tmp_path, layout):
    arrays = random_vit_arrays()
    if layout == "big-endian-fortran":
        stored = {key: np.asfortranarray(value.astype(">f4")) for key, value in arrays.items()}
    elif layout == "float16":
        arrays = {key: value.astype(np.float16).astype(np.float32) for key, value in arrays.items()}
        stored = {key: value.astype(np.float16) for key, value in arrays.items()}
    else:
        stored = arrays
    with open(tmp_path / "vit.npz", "wb") as file:
        (np.savez_compressed if layout == "compressed" else np.savez)(file, **stored)
    folder = convert(tmp_path / "vit.npz", tmp_path / "out", log=None)
    with open(tmp_path / "plain.npz", "wb") as file:
        np.savez(file, **arrays)
    images = verification_images(2, 32, 32, seed=3)
    assert np.abs(logits_of(folder, images) - reference(tmp_path / "plain.npz", images)[1]).max() <= 1e-5


def test_old_opt_target_prefix_is_understood(tmp_path):
    arrays = {f"opt/target/{key}": value for key, value in random_vit_arrays().items()}
    with open(tmp_path / "old.npz", "wb") as file:
        np.savez(file, **arrays)
    folder = convert(tmp_path / "old.npz", tmp_path / "out", log=None)
    assert (folder / "model.safetensors").is_file()


def test_position_embedding_resampling_equals_scipy_zoom(tmp_path):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    posemb = rng.standard_normal((1, 1 + 4 * 4, 32)).astype(np.float32)
    grid = posemb[0, 1:].reshape(4, 4, 32)
    for new in [(6, 6), (3, 5), (8, 2), (7, 4)]:
        zoomed = ndimage.zoom(grid.astype(np.float64), (new[0] / 4, new[1] / 4, 1), order=1)  # vit_jax / the seed
        assert zoomed.shape == (*new, 32)
        expected = np.concatenate([posemb[:, :1], zoomed.reshape(1, -1, 32)], axis=1)
        converter = resample_position_embeddings(posemb, Context((4, 4), new, 1))
        np.testing.assert_allclose(converter, expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(zoom_linear(grid.astype(np.float64), new), zoomed, atol=1e-12, rtol=0)
        runtime = hf_vit.modeling_hf_vit.resample_position_embeddings(torch.from_numpy(posemb), (4, 4), new, 1)
        np.testing.assert_allclose(runtime.numpy(), expected, atol=1e-6, rtol=0)

    # End to end: the saved position embeddings are scipy's zoom of the .npz ones.
    npz = write_random_npz(tmp_path / "vit.npz")
    folder = convert(npz, tmp_path / "out", image_size=(48, 24), verify=False, log=None)
    original = np.load(npz)["Transformer/posembed_input/pos_embedding"]
    zoomed = ndimage.zoom(original[0, 1:].reshape(4, 4, 32), (6 / 4, 3 / 4, 1), order=1).reshape(1, -1, 32)
    with safe_open(folder / "model.safetensors", "np") as weights:
        saved = weights.get_tensor("transformer.embeddings.position_embeddings")
    np.testing.assert_allclose(saved, np.concatenate([original[:, :1], zoomed], axis=1), atol=1e-6, rtol=0)


def test_named_transforms_agree_with_their_shape_functions():
    context = Context((4, 4), (4, 4), 1)
    arrays = random_vit_arrays()
    for rule in vit_jax.TABLE:
        key = rule.source.format(i=0)
        if key in arrays:
            transform = TRANSFORMS[rule.transform]
            assert transform.array(arrays[key], context).shape == transform.shape(arrays[key].shape, context), key


def test_full_vit_b16_checkpoint(tmp_path):
    sizes = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16, image_size=224)
    npz = write_random_npz(tmp_path / "ViT-B_16.npz", num_classes=1000, **sizes)
    lines = []
    folder = convert(npz, tmp_path / "out", verify_images=1, log=lines.append)
    verified(lines)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    with torch.device("meta"):
        model = VisionTransformerForImageClassification(VisionTransformerConfig.from_variant("B/16", num_labels=1000))
    assert shapes == {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert sum(np.prod(shape) for shape in shapes.values()) == 86_567_656
    assert shapes["transformer.encoder.layer.11.attn.query.weight"] == (768, 768)
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"]["0"] == "tench, Tinca tinca" and len(config["id2label"]) == 1000
    assert "86,567,656" in (folder / "README.md").read_text()


# --- what gets written ---------------------------------------------------------------------------------------------


def test_folder_has_config_code_processor_and_card(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz")
    folder = convert(npz, tmp_path / "out", log=None)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "configuration_hf_vit.py",
        "model.safetensors",
        "modeling_hf_vit.py",
        "modeling_resnet.py",  # imported by modeling_hf_vit.py, copied by custom_object_save
        "preprocessor_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].startswith("modeling_hf_vit.")
    assert config["architectures"] == ["VisionTransformerForImageClassification"]
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["size"] == {"height": 32, "width": 32}
    assert [p.name for p in tmp_path.iterdir()] != [] and not any(".partial" in p.name for p in tmp_path.iterdir())


def test_model_card_front_matter_and_contents(tmp_path):
    name = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz"
    npz = write_random_npz(tmp_path / name)
    card = (convert(npz, tmp_path / "out", log=None) / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-classification" and "augreg" in meta["tags"]
    assert meta["datasets"] == ["imagenet-21k", "imagenet-1k"]
    assert meta["source_sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert "- weight decay: 0.1" in body and "- augmentation (RandAugment / Mixup level): medium1" in body
    assert "- fine-tuning steps: 20k" in body and "Parameters: 20,724" in body
    assert "trust_remote_code=True" in body and "upcast to float64 agree with it to" in body
    assert re.search(r"fp32 forward within \d\.\de-\d\d of the float64 reference of the original model", body)
    assert CITATION_BIBTEX in body and "steiner2021augreg" in body


@pytest.mark.parametrize("dtype, code, short", [("bfloat16", "BF16", "bf16"), ("float16", "F16", "fp16")])
def test_reduced_precision_weights_are_verified_too(tmp_path, dtype, code, short):
    npz = write_random_npz(tmp_path / "vit.npz")
    lines = []
    folder = convert(npz, tmp_path / "out", dtype=dtype, log=lines.append)
    header = (folder / "model.safetensors").read_bytes()[8:2000].decode(errors="ignore")
    assert f'"dtype":"{code}"' in header and '"F32"' not in header
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    card = (folder / "README.md").read_text()
    assert f"parameters rounded to {dtype} as saved" in card and f"{short} forward within" in card
    # float64 on both sides: as tight as float32 weights; computing in the saved precision drifts by far more
    mapping, drift = verified(lines)
    assert drift > 1e-4 > 100 * verified(convert_log(npz, tmp_path / "fp32"))[1]


def test_large_checkpoints_are_sharded_with_an_index(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz")
    folder = convert(npz, tmp_path / "out", max_shard_size=30_000, log=None)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == 20_724 * 4
    images = verification_images(2, 32, 32, seed=3)
    assert np.abs(logits_of(folder, images) - reference(npz, images)[1]).max() <= 1e-5


def test_new_head_is_zero_initialised_and_pre_logits_dropped(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz", representation_size=24, num_classes=21)
    folder = convert(npz, tmp_path / "out", num_labels=3, labels=["cat", "dog", "bird"], log=None)
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "bird"} and config["representation_size"] is None
    with safe_open(folder / "model.safetensors", "np") as weights:
        assert "pre_logits.weight" not in weights.keys()
        assert weights.get_tensor("head.weight").shape == (3, 32) and not weights.get_tensor("head.weight").any()
    model = AutoModelForImageClassification.from_pretrained(folder)
    images = verification_images(2, 32, 32, seed=3)
    with torch.no_grad():
        pooled = model.transformer(torch.from_numpy(images)).pooler_output.double().numpy()
    features, _ = reference(npz, images, use_pre_logits=False, new_head_classes=3)
    assert np.abs(pooled - features).max() <= 1e-5

    kept = convert(npz, tmp_path / "kept", num_labels=3, keep_pre_logits=True, log=None)
    config = json.loads((kept / "config.json").read_text())
    assert config["representation_size"] == 24 and config["id2label"]["0"] == "LABEL_0"


def test_imagenet_1k_labels(tmp_path):
    names = imagenet1k_labels()
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca" and names[999].startswith("toilet tissue")
    from importlib.resources import files

    rows = files("conversion").joinpath("imagenet1k_labels.txt").read_text().splitlines()
    wnids = [row.split(" ", 1)[0] for row in rows]
    assert len(set(rows)) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000

    npz = write_random_npz(tmp_path / "vit.npz", num_classes=1000)
    folder = convert(npz, tmp_path / "out", verify=False, log=None)
    assert json.loads((folder / "config.json").read_text())["id2label"]["282"] == "tiger cat"
    label_file = tmp_path / "labels.txt"
    label_file.write_text("airplane\nautomobile\n\nbird\n")
    folder = convert(npz, tmp_path / "three", num_labels=3, labels=label_file, verify=False, log=None)
    assert json.loads((folder / "config.json").read_text())["id2label"]["2"] == "bird"
    folder = convert(npz, tmp_path / "named", num_labels=1000, labels="imagenet-1k", verify=False, log=None)
    assert json.loads((folder / "config.json").read_text())["id2label"]["1"] == "goldfish, Carassius auratus"
    folder = convert(npz, tmp_path / "new-1000", num_labels=1000, verify=False, log=None)  # a new head: no names
    assert json.loads((folder / "config.json").read_text())["id2label"]["1"] == "LABEL_1"


def test_overwrite_replaces_a_non_empty_output_dir(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz")
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    convert(npz, output, overwrite=True, log=None)
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vit.npz"]


# --- loading the result ----------------------------------------------------------------------------------------------


def test_folder_loads_through_auto_classes_and_the_pipeline(tmp_path):
    from PIL import Image

    npz = write_random_npz(tmp_path / "vit.npz", num_classes=3)
    folder = convert(npz, tmp_path / "out", labels=["cat", "dog", "bird"], log=None)
    assert type(AutoModel.from_pretrained(folder)) is VisionTransformerModel
    assert type(AutoModelForImageClassification.from_pretrained(folder)) is VisionTransformerForImageClassification
    classifier = pipeline("image-classification", model=str(folder))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert sorted(p["label"] for p in predictions) == ["bird", "cat", "dog"]

    # The pipeline's preprocessing is the original one: resize, then (x / 255 - 0.5) / 0.5.
    pixels = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    _, logits = reference(npz, pixels)
    probabilities = np.exp(logits[0] - logits[0].max()) / np.exp(logits[0] - logits[0].max()).sum()
    by_label = {p["label"]: p["score"] for p in predictions}
    assert abs(by_label["cat"] - probabilities[0]) < 1e-2  # resampling filters differ slightly


def test_folder_loads_with_remote_code_when_hf_vit_is_not_importable(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz")
    folder = convert(npz, tmp_path / "out", log=None)
    blocker = tmp_path / "blocker" / "hf_vit"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hf_vit is hidden for this test')\n")
    images = verification_images(2, 32, 32, seed=5)
    np.save(tmp_path / "images.npy", images)
    script = f"""
import json, numpy as np, torch
try:
    import hf_vit
    raise SystemExit("hf_vit is importable")
except ImportError:
    pass
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.from_numpy(np.load({str(tmp_path / "images.npy")!r}))).logits
print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist()}}))
"""
    env = {"PYTHONPATH": str(blocker.parent), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert not output["module"].startswith("hf_vit")
    assert np.abs(np.array(output["logits"]) - reference(npz, images)[1]).max() <= 1e-5


def test_transformers_vit_export_gives_the_same_logits_without_remote_code(tmp_path):
    npz = write_random_npz(tmp_path / "vit.npz")
    folder = convert(npz, tmp_path / "stock", export="transformers-vit", log=None)
    assert not list(folder.glob("*.py"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit" and "auto_map" not in config
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu_pytorch_tanh"
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert type(model) is ViTForImageClassification
    images = verification_images(3, 32, 32, seed=7)
    expected = reference(npz, images)[1]
    assert np.abs(logits_of(folder, images, ViTForImageClassification) - expected).max() <= 1e-5
    assert np.abs(logits_of(convert(npz, tmp_path / "ours", log=None), images) - expected).max() <= 1e-5

    # With pre_logits, --num-labels drops it and the stock model can hold the rest.
    with_pre_logits = write_random_npz(tmp_path / "pl.npz", representation_size=24)
    folder = convert(with_pre_logits, tmp_path / "stock-new-head", export="transformers-vit", num_labels=4, log=None)
    assert len(json.loads((folder / "config.json").read_text())["id2label"]) == 4
    assert ViTForImageClassification.from_pretrained(folder).classifier.weight.shape == (4, 32)


def test_seed_checkpoint_bin_converts_with_exact_gelu(tmp_path):
    checkpoint = write_random_seed_checkpoint(tmp_path / "cifar10_checkpoint.bin", variant="ViT-Ti_16", image_size=32)
    lines = []
    folder = convert(checkpoint, tmp_path / "out", variant="ViT-Ti_16", log=lines.append)
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["num_attention_heads"] == 3 and config["num_hidden_layers"] == 12
    verified(lines)

    # The same logits as the seed model the .bin came from.
    with torch.device("meta"):  # no random init: every weight comes from the .bin
        seed_model = VisionTransformerForImageClassification(
            VisionTransformerConfig.from_variant("Ti/16", image_size=32, num_labels=10, hidden_act="gelu")
        )
    seed_model.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True, assign=True)
    images = verification_images(2, 32, 32, seed=9)
    with torch.no_grad():
        expected = seed_model.eval()(torch.from_numpy(images)).logits.double().numpy()
    assert np.abs(logits_of(folder, images) - expected).max() <= 1e-5

    resampled = convert(checkpoint, tmp_path / "64", variant="ViT-Ti_16", image_size=64, log=None)
    assert json.loads((resampled / "config.json").read_text())["image_size"] == 64


def test_console_script_and_module_entry_point(tmp_path):
    console_script = Path(sys.executable).with_name("hf-vit-convert")
    assert console_script.is_file(), "run `pip install -e .` to install the hf-vit-convert console script"
    result = subprocess.run([str(console_script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--push-to-hub" in result.stdout and "--image-size" in result.stdout
    npz = write_random_npz(tmp_path / "vit.npz")
    command = [sys.executable, "-m", "conversion", str(npz), str(tmp_path / "out"), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and result.stdout == ""


@pytest.mark.parametrize("function", [convert, write_random_npz])
def test_docstring_examples_run(function, tmp_path, monkeypatch):
    import doctest

    monkeypatch.chdir(tmp_path)
    text = "\n".join(line for line in function.__doc__.splitlines() if not line.strip().startswith("```"))
    test = doctest.DocTestParser().get_doctest(text, {}, function.__name__, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and test.examples
