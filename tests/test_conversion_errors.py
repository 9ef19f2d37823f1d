"""Bad input: one line on stderr, exit code 2, no traceback, and nothing written (OUTPUT_DIR left as it was)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import conversion.converter
import hf_vit.modeling_hf_vit
from conversion import ConversionError, convert
from conversion.cli import main
from conversion.testing import big_vision_arrays, random_vit_arrays, write_random_npz, write_random_seed_checkpoint


def snapshot(root):
    """Every file and folder under `root`, with the bytes of the files."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def save_npz(path, arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


def altered(change):
    """A source factory: the tiny random checkpoint after `change(arrays)`."""

    def make(tmp_path):
        arrays = random_vit_arrays()
        change(arrays)
        return save_npz(tmp_path / "bad.npz", arrays)

    return make


def big_vision(change, scanned=False):
    """A source factory: the tiny checkpoint in big_vision's layout after `change(arrays)`."""

    def make(tmp_path):
        arrays = big_vision_arrays(random_vit_arrays(), scanned=scanned)
        change(arrays)
        return save_npz(tmp_path / "bv.npz", arrays)

    return make


def shorter_depth(arrays):
    key = "params/Transformer/encoderblock/MlpBlock_0/Dense_1/bias"
    arrays[key] = arrays[key][:1]


def zero_head(arrays):
    arrays["head/kernel"], arrays["head/bias"] = 0 * arrays["head/kernel"], 0 * arrays["head/bias"]


def truncated(tmp_path):
    path = write_random_npz(tmp_path / "truncated.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def bit_flip(tmp_path):
    """One flipped mantissa bit inside a kernel: still finite, only the zip's CRC-32 can tell."""
    path = write_random_npz(tmp_path / "flipped.npz")
    data = bytearray(path.read_bytes())
    kernel = np.load(path)["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
    offset = bytes(data).find(kernel.tobytes()[:64])
    data[offset + 400] ^= 1
    path.write_bytes(bytes(data))
    return path


def not_a_zip(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"<html>404 Not Found</html>")
    return path


def single_npy(tmp_path):
    path = tmp_path / "kernel.npz"
    with open(path, "wb") as file:
        np.save(file, np.zeros((8, 8, 3, 32), dtype=np.float32))
    return path


def set_value(key, value, index=(0,)):
    def change(arrays):
        arrays[key] = arrays[key].copy()
        arrays[key][index] = value

    return change


LN2 = "Transformer/encoderblock_0/LayerNorm_2/scale"
DENSE1_BIAS = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"
QUERY = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"

BAD_SOURCES = [
    pytest.param(truncated, [], "truncated or corrupt", id="truncated"),
    pytest.param(
        bit_flip,
        [],
        "'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' does not match its recorded CRC-32",
        id="bit-flip",
    ),
    pytest.param(not_a_zip, [], "is not an .npz (zip) archive", id="not-a-zip"),
    pytest.param(single_npy, [], "is a single .npy array", id="npy-not-npz"),
    pytest.param(altered(lambda a: a.pop(DENSE1_BIAS)), [], f"missing key {DENSE1_BIAS!r}", id="missing-key"),
    pytest.param(
        altered(lambda a: a.update({LN2: np.ones(31, np.float32)})),
        [],
        f"{LN2!r} has shape (31,), expected (32,)",
        id="wrong-shape",
    ),
    pytest.param(
        altered(lambda a: a.update({QUERY: np.ones((32, 8, 4), np.float32)})),
        [],
        f"{QUERY!r} has shape (32, 8, 4), expected (32, 4, 8)",
        id="wrong-shape-heads",
    ),
    pytest.param(
        altered(lambda a: a.update({"head/bias": np.array([{"exploit": "os.system"}], dtype=object)})),
        [],
        "holds pickled Python objects",
        id="pickled-object-array",
    ),
    pytest.param(
        altered(lambda a: a.update({"head/bias": np.arange(10, dtype=np.int32)})),
        [],
        "'head/bias' has dtype int32, expected floating-point",
        id="integer-dtype",
    ),
    pytest.param(altered(set_value(DENSE1_BIAS, np.nan)), [], f"{DENSE1_BIAS!r} contains 1 NaN or infinite", id="nan"),
    pytest.param(altered(set_value("head/kernel", np.inf, (3, 4))), [], "contains 1 NaN or infinite", id="inf"),
    pytest.param(
        altered(lambda a: a.update({"Transformer/extra/kernel": np.ones(3, np.float32)})),
        [],
        "1 unexpected key(s) that no rule converts: 'Transformer/extra/kernel'",
        id="unexpected-key",
    ),
    pytest.param(
        altered(lambda a: a.update({"conv_root/kernel": np.ones((7, 7, 3, 64), np.float32)})),
        [],
        "missing key 'gn_root/scale'",
        id="hybrid-without-its-resnet",
    ),
    pytest.param(altered(lambda a: a.pop("cls")), [], "is 'cls' missing?", id="missing-cls"),
    pytest.param(
        lambda tmp_path: write_random_npz(tmp_path / "wide.npz", image_size=(32, 48)),
        [],
        "has 24 patch rows, not a square grid: pass the pre-training resolution as source_image_size",
        id="non-square-grid-without-its-size",
    ),
    pytest.param(lambda tmp_path: "ViT-Z_99", [], "Unknown checkpoint 'ViT-Z_99'", id="unknown-official-name"),
    pytest.param(altered(zero_head), ["--labels", "imagenet-1k"], "has an all-zero head", id="labels-for-zeroed-head"),
    pytest.param(
        big_vision(lambda a: a.pop("params/pos_embedding")), [], "(sincos2d) position embeddings", id="bv-sincos"
    ),
    pytest.param(
        big_vision(lambda a: a.update({"params/MAPHead_0/probe": np.ones((1, 1, 32), np.float32)})),
        [],
        "'map' (attention pooling) classifier",
        id="bv-map-head",
    ),
    pytest.param(
        big_vision(lambda a: a.update({"params/pos_embedding": np.ones((1, 17, 32), np.float32)})),
        [],
        "'pos_embedding' has 17 patch rows, not a square grid",
        id="bv-posemb-with-cls-row",
    ),
    pytest.param(
        big_vision(shorter_depth, scanned=True),
        [],
        "missing key 'Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias'",
        id="bv-scanned-short-depth",
    ),
    pytest.param(
        big_vision(lambda a: a.update({"opt/mu/head/bias": np.ones(10, np.float32)})),
        [],
        "1 unexpected key(s) that no rule converts: 'opt/mu/head/bias'",
        id="bv-optimizer-state",
    ),
    pytest.param(
        big_vision(set_value("params/Transformer/encoderblock/LayerNorm_1/scale", np.nan, (1, 3)), scanned=True),
        [],
        "'Transformer/encoderblock_1/LayerNorm_1/scale' contains 1 NaN",
        id="bv-scanned-nan",
    ),
    pytest.param(lambda tmp_path: tmp_path / "nothere.npz", [], "does not exist", id="missing-file"),
]


BAD_OPTIONS = [
    pytest.param(["--variant", "ViT-B_16"], "--variant ViT-B_16 means hidden 768", id="variant-mismatch"),
    pytest.param(["--variant", "ViT-Q_3"], "Unknown ViT variant 'ViT-Q_3'", id="unknown-variant"),
    pytest.param(["--image-size", "30"], "not a multiple of the patch size 8x8", id="image-size-not-multiple"),
    pytest.param(["--image-size", "0"], "positive", id="image-size-zero"),
    pytest.param(["--labels", "a-file-that-is-not-there.txt"], "labels file", id="missing-labels-file"),
    pytest.param(
        ["--num-labels", "3", "--labels", "imagenet-1k"], "1000 labels given for a 3-class head", id="labels"
    ),
    pytest.param(["--num-labels", "0"], "num_labels must be a positive integer", id="zero-labels"),
    pytest.param(["--push-to-hub", "me/vit", "--no-verify"], "drop --no-verify", id="push-without-verify"),
    pytest.param(["--max-shard-size", "big"], "max_shard_size", id="bad-shard-size"),
    pytest.param(["--num-heads", "8"], "--num-heads 8 contradicts the checkpoint", id="num-heads"),
]


def assert_refused(tmp_path, capsys, argv, message) -> str:
    """Run the CLI: exit 2, one line naming `message`, nothing written; the line."""
    before = snapshot(tmp_path)
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(tmp_path) == before  # nothing created, nothing changed, no temporary folder left
    return lines[0]


@pytest.mark.parametrize("make_source, extra, message", BAD_SOURCES)
def test_bad_source_is_refused_in_one_line(tmp_path, capsys, make_source, extra, message):
    source = make_source(tmp_path)
    assert_refused(tmp_path, capsys, [source, tmp_path / "out", *extra], message)


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_bad_option_is_refused_in_one_line(tmp_path, capsys, options, message):
    npz = write_random_npz(tmp_path / "vit.npz")
    assert_refused(tmp_path, capsys, [npz, tmp_path / "out", *options], message)


def test_non_empty_output_without_overwrite_is_left_exactly_as_it_was(tmp_path, capsys):
    npz = write_random_npz(tmp_path / "vit.npz")
    output = tmp_path / "out"
    (output / "sub").mkdir(parents=True)
    (output / "notes.txt").write_text("mine")
    (output / "sub" / "data.bin").write_bytes(b"\x00\x01")
    assert_refused(tmp_path, capsys, [npz, output], "is not empty: pass --overwrite")


def test_unwritable_output_is_refused(tmp_path, capsys):
    npz = write_random_npz(tmp_path / "vit.npz")
    (tmp_path / "a-file").write_text("x")
    assert_refused(tmp_path, capsys, [npz, tmp_path / "a-file" / "out"], "is a file, not a directory")
    assert_refused(tmp_path, capsys, [npz, tmp_path / "a-file"], "exists and is not a directory")


def test_read_only_parent_is_refused(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    npz = write_random_npz(tmp_path / "vit.npz")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_refused(tmp_path, capsys, [npz, locked / "out"], "is not writable")
    finally:
        locked.chmod(0o755)


def test_failure_while_writing_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    npz = write_random_npz(tmp_path / "vit.npz")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conversion.converter, "save_folder", full_disk)
    assert_refused(tmp_path, capsys, [npz, tmp_path / "deep" / "er" / "out"], "No space left on device")


def test_key_table_that_disagrees_with_the_model_writes_nothing(tmp_path, capsys, monkeypatch):
    """A bug guard, checked before any tensor is written: the planned shapes must be the model's."""
    npz = write_random_npz(tmp_path / "vit.npz")
    original = hf_vit.modeling_hf_vit.Mlp.__init__

    def wider_fc1(self, config):
        original(self, config)
        self.fc1 = torch.nn.Linear(config.hidden_size, config.intermediate_size + 1)

    monkeypatch.setattr(hf_vit.modeling_hf_vit.Mlp, "__init__", wider_fc1)
    message = "Key table and model disagree (missing [], unexpected [], shapes ['transformer.encoder.layer.0.ffn.fc1."
    assert_refused(tmp_path, capsys, [npz, tmp_path / "out"], message)


def test_export_transformers_vit_refuses_what_stock_vit_cannot_hold(tmp_path, capsys):
    gap = write_random_npz(tmp_path / "gap.npz", classifier="gap")
    assert_refused(tmp_path, capsys, [gap, tmp_path / "out", "--export", "transformers-vit"], "'gap' classifier")
    with_pre_logits = write_random_npz(tmp_path / "pl.npz", representation_size=24)
    message = "has no pre_logits layer, which this checkpoint has: pass --num-labels N"
    assert_refused(tmp_path, capsys, [with_pre_logits, tmp_path / "out", "--export", "transformers-vit"], message)


def test_seed_checkpoint_needs_a_variant(tmp_path, capsys):
    checkpoint = write_random_seed_checkpoint(tmp_path / "tiny_checkpoint.bin")
    assert_refused(tmp_path, capsys, [checkpoint, tmp_path / "out"], "carries no config: pass --variant")
    assert_refused(tmp_path, capsys, [checkpoint, tmp_path / "out", "--variant", "ViT-B_16"], "means hidden 768")
    not_torch = tmp_path / "junk_checkpoint.bin"
    not_torch.write_bytes(b"junk")
    assert_refused(tmp_path, capsys, [not_torch, tmp_path / "out", "--variant", "B/16"], "not a loadable PyTorch")


def test_failed_verification_writes_nothing(tmp_path, capsys, monkeypatch):
    npz = write_random_npz(tmp_path / "vit.npz")
    real = conversion.converter.flax_vit_forward

    def off_by_a_bit(*args, **kwargs):
        features, logits = real(*args, **kwargs)
        return features, logits + 1e-3

    monkeypatch.setattr(conversion.converter, "flax_vit_forward", off_by_a_bit)
    assert_refused(
        tmp_path,
        capsys,
        [npz, tmp_path / "out"],
        "Verification failed: The converted model differs from the reference in float64 by",
    )


def test_usage_errors_are_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["only-one-argument"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    with pytest.raises(SystemExit):
        main(["a.npz", "out", "--image-size", "big"])
    assert "invalid int value: 'big'" in capsys.readouterr().err


def test_api_raises_a_value_error_subclass(tmp_path):
    with pytest.raises(ValueError, match="Unknown checkpoint"):
        convert("ViT-Z_99", tmp_path / "out", log=None)
    assert issubclass(ConversionError, ValueError)


def test_python_dash_m_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    result = subprocess.run(
        [sys.executable, "-m", "conversion", str(bad), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
