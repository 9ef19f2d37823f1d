"""hf-vit-export: hf_vit folders back to vit_jax / big_vision `.npz` files, verified, and the round trip bit for bit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import randomize_
from test_conversion_layouts import big_vision_logits, logits_of, save_npz

import hf_vit
from conversion import convert, export_npz
from conversion.cli import export_main
from conversion.keys import TRANSFORMS, Context
from conversion.testing import (
    big_vision_arrays,
    random_vit_arrays,
    write_random_hybrid_npz,
    write_random_npz,
    write_random_seed_checkpoint,
)
from hf_vit.verification import verification_images


def assert_same_npz(expected, found):
    """The same keys, and per key the same dtype, shape and bytes."""
    with np.load(expected) as a, np.load(found) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
            assert a[key].tobytes() == b[key].tobytes(), key


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


@pytest.mark.parametrize(
    "architecture",
    [{}, {"classifier": "gap"}, {"representation_size": 24}, {"image_size": (32, 48), "classifier": "gap"}],
    ids=["token", "gap", "pre_logits", "non-square"],
)
def test_vit_jax_npz_round_trips_bit_for_bit(tmp_path, architecture):
    npz = write_random_npz(tmp_path / "original.npz", **architecture)
    size = architecture.get("image_size")
    folder = convert(npz, tmp_path / "hf", source_image_size=size, log=None)
    lines = []
    exported = export_npz(folder, tmp_path / "back.npz", log=lines.append)
    assert_same_npz(npz, exported)
    difference = float(next(line for line in lines if line.startswith("verification")).split(" to ")[1].split()[0])
    assert difference < 1e-12


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_big_vision_npz_round_trips_bit_for_bit(tmp_path, classifier):
    npz = save_npz(tmp_path / "bv.npz", big_vision_arrays(random_vit_arrays(classifier=classifier)))
    folder = convert(npz, tmp_path / "hf", log=None)
    assert_same_npz(npz, export_npz(folder, tmp_path / "back.npz", layout="big_vision", log=None))


def test_hybrid_npz_round_trips_bit_for_bit_with_official_group_norms(tmp_path):
    npz = write_random_hybrid_npz(tmp_path / "r.npz", resnet_num_layers=(1, 1), width=32, image_size=32)
    folder = convert(npz, tmp_path / "hf", log=None)
    assert_same_npz(npz, export_npz(folder, tmp_path / "back.npz", log=None))


def test_hybrid_with_flat_group_norms_is_exported_as_the_official_files(tmp_path):
    """(C,) GroupNorms (Linen's) come out (1, 1, 1, C), as in the released hybrids; vit_jax's loader squeezes them."""
    npz = write_random_hybrid_npz(tmp_path / "r.npz", resnet_num_layers=(2,), width=32, gn_shape="C", image_size=32)
    folder = convert(npz, tmp_path / "hf", log=None)
    exported = export_npz(folder, tmp_path / "back.npz", log=None)
    with np.load(npz) as original, np.load(exported) as back:
        assert sorted(original.files) == sorted(back.files)
        assert original["gn_root/scale"].shape == (32,) and back["gn_root/scale"].shape == (1, 1, 1, 32)
        for key in original.files:
            np.testing.assert_array_equal(back[key].reshape(original[key].shape), original[key])


def test_fine_tuned_folder_is_exported_and_converts_back_to_the_same_logits(tmp_path):
    """A folder as fine-tuning leaves it (new head, every weight moved, another resolution) -> .npz -> folder."""
    npz = write_random_npz(tmp_path / "pretrained.npz", representation_size=24, num_classes=21)
    start = convert(npz, tmp_path / "start", num_labels=3, labels=["a", "b", "c"], image_size=48, log=None)
    model = randomize_(hf_vit.VisionTransformerForImageClassification.from_pretrained(start), seed=3)
    model.save_pretrained(tmp_path / "fine-tuned")
    exported = export_npz(tmp_path / "fine-tuned", tmp_path / "fine-tuned.npz", log=None)
    with np.load(exported) as arrays:
        assert arrays["head/kernel"].shape == (32, 3) and "pre_logits/kernel" not in arrays.files
        assert arrays["Transformer/posembed_input/pos_embedding"].shape == (1, 37, 32)  # 48 px: 6x6 + cls
    again = convert(exported, tmp_path / "again", log=None)
    images = verification_images(3, 48, 48, seed=5)
    expected = logits_of(tmp_path / "fine-tuned", images)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_array_equal(logits_of(again, images), expected)


def test_big_vision_export_of_a_vit_jax_model_gives_big_vision_logits(tmp_path):
    """The class token's position row goes into `cls` (big_vision adds pos_embedding before prepending it)."""
    folder = convert(write_random_npz(tmp_path / "vj.npz"), tmp_path / "hf", log=None)
    exported = export_npz(folder, tmp_path / "bv.npz", layout="big_vision", log=None)
    with np.load(exported) as file:
        arrays = dict(file)
    assert all(key.startswith("params/") for key in arrays) and arrays["params/pos_embedding"].shape == (1, 16, 32)
    images = verification_images(3, 32, 32, seed=7)
    expected = logits_of(folder, images)
    assert np.abs(big_vision_logits(arrays, images) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_feature_extractor_gets_an_empty_head_and_converts_back_to_one(tmp_path):
    arrays = random_vit_arrays(representation_size=24)
    arrays["head/kernel"][:], arrays["head/bias"][:] = 0, 0  # Google's zeroed ImageNet-21k heads
    folder = convert(save_npz(tmp_path / "i21k.npz", arrays), tmp_path / "hf", log=None)
    exported = export_npz(folder, tmp_path / "back.npz", log=None)
    with np.load(exported) as back:
        assert back["head/kernel"].shape == (24, 0) and back["head/bias"].shape == (0,)
        np.testing.assert_array_equal(back["pre_logits/kernel"], arrays["pre_logits/kernel"])
    again = convert(exported, tmp_path / "again", log=None)
    assert json.loads((again / "config.json").read_text())["id2label"] == {}  # no classes
    images = verification_images(2, 32, 32)
    np.testing.assert_array_equal(logits_of(again, images), logits_of(folder, images))


def test_float16_export_is_verified_on_its_rounded_values(tmp_path):
    folder = convert(write_random_npz(tmp_path / "a.npz"), tmp_path / "hf", log=None)
    lines = []
    exported = export_npz(folder, tmp_path / "half.npz", dtype="float16", log=lines.append)
    with np.load(exported) as half:
        assert {half[key].dtype for key in half.files} == {np.dtype(np.float16)}
    assert any(line.startswith("verification") for line in lines)


def test_exact_gelu_model_is_exported_with_the_difference_the_tanh_gelu_makes(tmp_path):
    seed = write_random_seed_checkpoint(tmp_path / "seed_checkpoint.bin")
    folder = convert(seed, tmp_path / "hf", variant=None, num_heads=4, log=None)
    lines = []
    export_npz(folder, tmp_path / "seed.npz", log=lines.append)
    note = next(line for line in lines if line.startswith("note: this model uses exact GELU"))
    assert 1e-6 < float(note.rsplit(" by ", 1)[1].split()[0]) < 0.1


def test_every_named_transform_has_its_inverse_beside_it():
    rng = np.random.default_rng(0)
    context = Context((2, 2), (2, 2), 1)
    shapes = {
        "identity": (3, 5),
        "conv_hwio_to_oihw": (2, 3, 5, 7),
        "dense": (5, 7),
        "heads_in": (8, 2, 4),
        "heads_out": (2, 4, 8),
        "heads_bias": (2, 4),
        "flatten": (1, 1, 1, 6),
        "posemb": (1, 5, 8),
        "posemb_before_cls": (1, 4, 8),
    }
    assert set(shapes) == set(TRANSFORMS)
    for name, shape in shapes.items():
        array = rng.standard_normal(shape).astype(np.float32)
        transform = TRANSFORMS[name]
        forward = transform.array(array, context)
        assert forward.shape == transform.shape(shape, context), name
        np.testing.assert_array_equal(transform.inverse(forward, shape, context), array, err_msg=name)


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    return convert(write_random_npz(work / "a.npz"), work / "hf", log=None)


def run_export(capsys, *argv):
    capsys.readouterr()  # what setting up the test printed (save_pretrained's progress bar)
    code = export_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def make_not_a_folder(tmp_path):
    return tmp_path / "missing", "is not a folder"


def make_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "has no config.json"


def make_stock_vit(tmp_path):
    folder = convert(write_random_npz(tmp_path / "a.npz"), tmp_path / "stock", export="transformers-vit", log=None)
    return folder, "model_type 'vit', expected 'hf_vit' (stock transformers ViT"


def make_seed_hybrid(tmp_path):
    config = hf_vit.VisionTransformerConfig(
        image_size=32, patch_size=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37, num_labels=3, resnet_num_layers=(1, 1, 1), resnet_width_factor=0.5,
        resnet_flavour="seed",
    )  # fmt: skip
    hf_vit.VisionTransformerForImageClassification(config).save_pretrained(tmp_path / "seed-hybrid")
    return tmp_path / "seed-hybrid", "seed-repo hybrid (resnet_flavour 'seed')"


def make_no_weights(tmp_path):
    hf_vit.VisionTransformerConfig(image_size=32, patch_size=8).save_pretrained(tmp_path / "config-only")
    return tmp_path / "config-only", "Cannot load the weights of"


@pytest.mark.parametrize(
    "make_folder", [make_not_a_folder, make_no_config, make_stock_vit, make_seed_hybrid, make_no_weights]
)
def test_a_folder_that_is_not_an_exportable_hf_vit_model_is_refused_in_one_line(tmp_path, capsys, make_folder):
    model_dir, message = make_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_export(capsys, model_dir, out / "x.npz")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert list(out.iterdir()) == []


def test_a_hybrid_in_the_big_vision_layout_is_refused(tmp_path, capsys):
    npz = write_random_hybrid_npz(tmp_path / "r.npz", resnet_num_layers=(1,), width=32, image_size=16)
    folder = convert(npz, tmp_path / "hf", log=None)
    code, err = run_export(capsys, folder, tmp_path / "x.npz", "--layout", "big_vision")
    assert code == 2 and "big_vision's ViT has no ResNet stem" in err and not (tmp_path / "x.npz").exists()


def test_existing_output_needs_overwrite(folder, tmp_path, capsys):
    existing = tmp_path / "x.npz"
    existing.write_bytes(b"keep me")
    code, err = run_export(capsys, folder, existing)
    assert code == 2 and "exists: pass --overwrite" in err and existing.read_bytes() == b"keep me"
    assert run_export(capsys, folder, existing, "--overwrite", "--quiet") == (0, "")
    with np.load(existing) as replaced:
        assert "embedding/kernel" in replaced.files
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "output, message",
    [("missing/x.npz", "does not exist"), (".", "is a directory")],
    ids=["missing-folder", "directory"],
)
def test_unusable_output_is_refused_in_one_line(folder, tmp_path, capsys, output, message):
    code, err = run_export(capsys, folder, tmp_path / output)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused(folder, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = run_export(capsys, folder, locked / "x.npz")
    assert code == 2 and "is not writable" in err


def test_a_failing_write_leaves_nothing(folder, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    code, err = run_export(capsys, folder, tmp_path / "x.npz")
    assert code == 2 and "No space left on device; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_a_misplaced_weight_fails_verification_and_leaves_nothing(folder, tmp_path, capsys, monkeypatch):
    """Two heads of a query kernel swapped on the way out: same shapes, other logits; the check refuses the file."""
    import conversion.export

    arrays_of = conversion.export.npz_arrays

    def swapped_heads(*args):
        arrays = arrays_of(*args)
        kernel = arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"]
        kernel[:, [0, 1]] = kernel[:, [1, 0]]
        return arrays

    monkeypatch.setattr(conversion.export, "npz_arrays", swapped_heads)
    code, err = run_export(capsys, folder, tmp_path / "x.npz")
    assert code == 2 and "Verification failed" in err and "a weight is misplaced" in err
    assert list(tmp_path.iterdir()) == []


def test_console_script_is_installed(folder, tmp_path):
    exported = tmp_path / "x.npz"
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "hf-vit-export"), str(folder), str(exported)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "verification: the NumPy Flax reference" in result.stdout and exported.is_file()
    with np.load(exported) as arrays:
        assert arrays["cls"].shape == (1, 1, 32)


def test_the_partial_file_of_a_killed_export_is_removed_by_the_next_one(folder, tmp_path, capsys):
    output = tmp_path / "vit.npz"
    stale = tmp_path / ".vit.npz.partial-999999999-abcdef"  # no such process: an export killed before its rename
    stale.write_bytes(b"half an npz")
    code, err = run_export(capsys, str(folder), str(output))
    assert code == 0 and output.is_file() and not stale.exists()
    assert f"removed {stale}, left by an interrupted conversion" in err
