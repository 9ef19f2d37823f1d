"""vit_jax training checkpoints (flax msgpack `checkpoint_N`) in: written here byte for byte as flax writes them
(conversion.testing, from flax/serialization.py), read without flax or jax; hostile files are one line, exit 2."""

import msgpack
import numpy as np
import pytest
from test_conversion_digests import tensor_digests
from test_conversion_layouts import logits_of, save_npz

from conversion import convert, export_npz
from conversion.cli import main
from conversion.flax_checkpoint import FlaxCheckpoint, pre_linen_name
from conversion.testing import (
    BFloat16,
    flax_msgpack_bytes,
    linen_params,
    random_hybrid_arrays,
    random_vit_arrays,
    write_random_flax_checkpoint,
)
from hf_vit.verification import verification_images


def test_the_test_writer_produces_flax_bytes():
    """Pinned bytes, derived by hand from flax/serialization.py: a map; an array is ext type 1 (ext8: 0xc7, length,
    type) around packb([shape, dtype name, C-order bytes]) with bin types; a NumPy scalar is ext type 3."""
    data = flax_msgpack_bytes({"0": {"a": np.array([1.0, 2.0], np.float32)}, "2": np.int64(3)})
    array = b"\x93\x91\x02\xa7float32\xc4\x08" + np.array([1.0, 2.0], np.float32).tobytes()
    scalar = b"\x93\x90\xa5int64\xc4\x08" + np.int64(3).tobytes()
    expected = b"\x82\xa10\x81\xa1a\xc7" + bytes([len(array), 1]) + array + b"\xa12\xc7" + bytes([len(scalar), 3])
    assert data == expected + scalar


def test_training_checkpoint_converts_to_the_tensors_of_the_same_npz(tmp_path):
    path = write_random_flax_checkpoint(tmp_path, step=1234, representation_size=24, classifier="gap")
    lines = []
    folder = convert(path, tmp_path / "from-msgpack", log=lines.append)
    assert any(line.startswith("verification: float64 max diff") for line in lines)
    npz = save_npz(tmp_path / "same.npz", random_vit_arrays(representation_size=24, classifier="gap"))
    assert tensor_digests(folder) == tensor_digests(convert(npz, tmp_path / "from-npz", log=None))
    card = (folder / "README.md").read_text()
    assert "- Training step: 1234" in card and "optimizer state is not converted" in card


def test_hybrid_training_checkpoint_with_linen_group_norms_converts_and_exports(tmp_path):
    architecture = dict(resnet_num_layers=(1, 1), width=32, image_size=32)
    path = write_random_flax_checkpoint(tmp_path, step=10, hybrid=True, **architecture)
    folder = convert(path, tmp_path / "hf", log=None)
    exported = export_npz(folder, tmp_path / "hybrid.npz", log=None)
    arrays = random_hybrid_arrays(gn_shape="C", **architecture)
    with np.load(exported) as back:
        assert sorted(back.files) == sorted(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(back[key].reshape(value.shape), value)


def test_detected_by_content_whatever_the_name(tmp_path):
    data = write_random_flax_checkpoint(tmp_path).read_bytes()
    (tmp_path / "model.bin").write_bytes(data)  # a seed name: still read as msgpack
    folder = convert(tmp_path / "model.bin", tmp_path / "hf", log=None)
    images = verification_images(2, 32, 32)
    np.testing.assert_array_equal(
        logits_of(folder, images), logits_of(convert(tmp_path / "checkpoint_500", tmp_path / "b", log=None), images)
    )


def test_train_state_layout_and_bfloat16_params(tmp_path):
    """flax TrainState ({"step", "params", "opt_state"}); bfloat16 params read exactly (the upper float32 half)."""
    arrays = random_vit_arrays()
    params = linen_params({key: BFloat16(value) for key, value in arrays.items()})
    path = tmp_path / "checkpoint_3"
    path.write_bytes(flax_msgpack_bytes({"step": 3, "params": params, "opt_state": {"0": {}}}))
    checkpoint = FlaxCheckpoint(path)
    assert checkpoint.step == 3
    kernel = checkpoint.load("Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel")
    truncated = (arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"].view(np.uint32) & 0xFFFF0000).view(
        np.float32
    )
    np.testing.assert_array_equal(kernel, truncated)
    convert(path, tmp_path / "hf", log=None)


def test_linen_block_names_are_the_npz_names():
    assert pre_linen_name("Transformer/encoderblock_11/MlpBlock_0/Dense_1/bias") == (
        "Transformer/encoderblock_11/MlpBlock_3/Dense_1/bias"
    )
    assert (
        pre_linen_name("Transformer/encoderblock_0/LayerNorm_1/scale")
        == "Transformer/encoderblock_0/LayerNorm_2/scale"
    )
    assert (
        pre_linen_name("Transformer/encoderblock_0/LayerNorm_0/scale")
        == "Transformer/encoderblock_0/LayerNorm_0/scale"
    )
    assert pre_linen_name("Transformer/encoder_norm/scale") == "Transformer/encoder_norm/scale"


# --- truncated or hostile files: one line, exit 2, nothing written ------------------------------------------------


def ext(code, payload):
    return msgpack.ExtType(code, payload)


def array_payload(shape, name, data):
    return msgpack.packb((shape, name, data), use_bin_type=True)


def valid_params():
    return linen_params(random_vit_arrays())


def nested(depth):
    tree = {"kernel": np.zeros(1, np.float32)}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


def params_with(key, value):
    params = valid_params()
    params["Transformer"]["encoder_norm"][key] = value
    return params


def without_a_bias():
    params = valid_params()
    del params["Transformer"]["encoderblock_1"]["LayerNorm_0"]["bias"]
    return params


def hostile(name):
    """The bytes of each hostile or broken file."""
    good = flax_msgpack_bytes({"0": valid_params(), "1": {}, "2": 5})
    files = {
        "truncated": lambda: good[: len(good) // 2],
        "huge-map": lambda: b"\x83\xa10\xdf\xff\xff\xff\xff",
        "huge-bin": lambda: b"\x83\xa10\x81\xa1a\xc6\x7f\xff\xff\xff",
        "huge-shape": lambda: flax_msgpack_bytes(
            {"0": params_with("scale", ext(1, array_payload((10**9, 10**9), "float32", b"1234")))}
        ),
        "object-dtype": lambda: flax_msgpack_bytes(
            {"0": params_with("scale", ext(1, array_payload((1,), "object", b"12345678")))}
        ),
        "int-params": lambda: flax_msgpack_bytes({"0": params_with("scale", np.arange(32, dtype=np.int32)), "2": 1}),
        "bad-payload": lambda: flax_msgpack_bytes({"0": params_with("scale", ext(1, msgpack.packb([1, 2])))}),
        "unknown-ext": lambda: flax_msgpack_bytes({"0": params_with("scale", ext(42, b"x"))}),
        "string-leaf": lambda: flax_msgpack_bytes({"0": params_with("scale", "not an array")}),
        "params-a-list": lambda: flax_msgpack_bytes({"0": [1, 2, 3], "2": 1}),
        "no-params": lambda: flax_msgpack_bytes({"1": {}, "2": 1}),
        "bad-step": lambda: flax_msgpack_bytes({"0": valid_params(), "2": "five"}),
        "deep": lambda: flax_msgpack_bytes({"0": nested(40)}),
        "very-deep": lambda: b"\x81\xa10" + b"\x81\xa1a" * 5000 + b"\xc0",
        "chunked": lambda: flax_msgpack_bytes(
            {"0": params_with("scale", {"__msgpack_chunked_array__": True, "shape": {}})}
        ),
        "missing-tensor": lambda: flax_msgpack_bytes({"0": without_a_bias(), "2": 1}),
    }
    return files[name]()


@pytest.mark.parametrize(
    "name, message",
    [
        ("truncated", "truncated msgpack checkpoint"),
        ("huge-map", "exceeds max_map_len"),
        ("huge-bin", "truncated msgpack checkpoint"),
        ("huge-shape", "declares shape (1000000000, 1000000000) of float32 but holds 4 bytes"),
        ("object-dtype", "dtype 'object', which no ViT checkpoint holds"),
        ("int-params", "has dtype int32, expected floating-point weights"),
        ("bad-payload", "not stored as flax stores one"),
        ("unknown-ext", "extension type 42"),
        ("string-leaf", "is a str, expected an array"),
        ("params-a-list", "the parameters are a list"),
        ("no-params", "without parameters (top-level keys '1', '2')"),
        ("bad-step", "the step is 'five'"),
        ("deep", "nest deeper than 32 levels"),
        ("very-deep", "not a readable flax msgpack checkpoint"),
        ("chunked", "an array over 1 GiB (chunked)"),
        ("missing-tensor", "missing key 'Transformer/encoderblock_1/LayerNorm_0/bias'"),
    ],
)
def test_a_broken_or_hostile_training_checkpoint_is_one_line(tmp_path, capsys, name, message):
    path = tmp_path / "checkpoint_5"
    path.write_bytes(hostile(name))
    assert main([str(path), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
