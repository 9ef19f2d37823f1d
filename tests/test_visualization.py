"""Attention maps: rollout maths against the seed's notebook, uniform attention, the last layer, the CLI and its errors."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, randomize_, tiny_config
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from hf_vit import VisionTransformerForImageClassification, VisionTransformerModel, image_processor_for
from hf_vit.visualization import (
    CAPTION_INCHES,
    FIGURE_DPI,
    PANEL_INCHES,
    attention_map,
    attention_rollout,
    fuse_heads,
    last_layer_attention,
    rollout_matrices,
)


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "visualize_attention.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("visualize_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classifier(seed: int = 0, **overrides) -> VisionTransformerForImageClassification:
    return randomize_(VisionTransformerForImageClassification(tiny_config(**overrides)), seed).eval()


def random_attentions(layers=2, batch=2, heads=4, tokens=17, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=generator).mul(3).softmax(-1) for _ in range(layers)]


def picture(width=40, height=30, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def seed_notebook_rollout(attentions: list[torch.Tensor]) -> np.ndarray:
    """The seed's visualize_attention_map.ipynb, in NumPy: mean over heads, + I, renormalise, multiply, cls row."""
    joint = None
    for layer in attentions:
        matrix = layer[0].numpy().astype(np.float64).mean(axis=0) + np.eye(layer.shape[-1])
        matrix /= matrix.sum(axis=-1, keepdims=True)
        joint = matrix if joint is None else matrix @ joint
    side = int(np.sqrt(joint.shape[-1]))
    return joint[0, 1:].reshape(side, side)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    classifier(seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "input.png"
    picture(56, 40).save(path)
    return path


# -- rollout maths ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("num_prefix_tokens", [1, 0])
def test_every_rollout_matrix_is_row_stochastic_and_the_map_non_negative(
    head_fusion, discard_ratio, num_prefix_tokens
):
    tokens = 16 + num_prefix_tokens
    attentions = random_attentions(layers=3, tokens=tokens)
    joint = rollout_matrices(
        attentions, head_fusion=head_fusion, discard_ratio=discard_ratio, num_prefix_tokens=num_prefix_tokens
    )
    assert joint.shape == (3, 2, tokens, tokens)
    assert (joint >= 0).all()
    torch.testing.assert_close(joint.sum(-1), torch.ones(3, 2, tokens), atol=1e-5, rtol=0)
    attention = attention_rollout(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio)
    assert attention.shape == (2, 4, 4) and (attention >= 0).all() and attention.max() > 0


def test_rollout_of_a_model_matches_the_seed_notebook():
    with torch.no_grad():
        outputs = classifier()(torch.randn(1, 3, 32, 32), output_attentions=True)
    expected = seed_notebook_rollout(list(outputs.attentions))
    np.testing.assert_allclose(attention_rollout(outputs.attentions)[0], expected, rtol=1e-5, atol=1e-7)


def test_discarding_keeps_the_class_column_and_drops_the_lowest_weights():
    attention = random_attentions(layers=1, batch=1)[0]
    mean = attention.mean(dim=1)[0]
    fused = fuse_heads(attention, discard_ratio=0.5)[0]
    torch.testing.assert_close(fused[:, 0], mean[:, 0], rtol=0, atol=0)
    dropped = (fused == 0) & (mean != 0)
    assert int(dropped.sum()) == int(17 * 16 * 0.5)
    assert mean[dropped].max() <= mean[1:, 1:][~dropped[1:, 1:]].min()
    torch.testing.assert_close(fused[~dropped], mean[~dropped], rtol=0, atol=0)


@pytest.mark.parametrize("head_fusion, reference", [("max", torch.amax), ("min", torch.amin)])
def test_head_fusion_max_and_min(head_fusion, reference):
    attention = random_attentions(layers=1)[0]
    torch.testing.assert_close(fuse_heads(attention, head_fusion=head_fusion), reference(attention, dim=1))


def test_a_non_square_grid_needs_grid_size():
    attentions = random_attentions(tokens=1 + 2 * 5)
    assert attention_rollout(attentions, grid_size=(2, 5)).shape == (2, 2, 5)
    assert last_layer_attention(attentions, grid_size=(2, 5)).shape == (2, 2, 5)
    with pytest.raises(ValueError, match="square grid"):
        attention_rollout(attentions)


# -- maps of a model -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classifier_type", ["token", "gap"])
@pytest.mark.parametrize("method", ["rollout", "last_layer"])
def test_exactly_uniform_attention_gives_a_uniform_map(classifier_type, method):
    model = classifier(classifier=classifier_type)
    with torch.no_grad():
        for block in model.transformer.encoder.layer:
            for projection in (block.attn.query, block.attn.key):  # every score q.k is 0: softmax is uniform
                projection.weight.zero_()
                projection.bias.zero_()
    for size in [None, (48, 64)]:
        attention = attention_map(model, picture(), method=method, image_size=size)
        assert attention.shape == ((4, 4) if size is None else (6, 8))
        np.testing.assert_allclose(attention, np.full_like(attention, attention.mean()), rtol=1e-5)
        assert attention.mean() > 0


@pytest.mark.parametrize("classifier_type", ["token", "gap"])
def test_the_last_layer_map_is_the_mean_attention_of_the_class_row(classifier_type):
    model, image = classifier(classifier=classifier_type), picture()
    pixel_values = image_processor_for(model.config)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        last = model(pixel_values, output_attentions=True).attentions[-1][0].mean(dim=0)  # (S, S)
    expected = last[0, 1:] if classifier_type == "token" else last.mean(dim=0)  # gap: no class token, mean row
    np.testing.assert_allclose(
        attention_map(model, image, method="last_layer"), expected.reshape(4, 4).numpy(), rtol=1e-5, atol=1e-7
    )


def test_sdpa_and_eager_models_give_the_same_map(saved_model):
    image = picture()
    sdpa = VisionTransformerForImageClassification.from_pretrained(saved_model).eval()
    eager = VisionTransformerForImageClassification.from_pretrained(saved_model, attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa"
    np.testing.assert_allclose(
        attention_map(sdpa, image, discard_ratio=0.3), attention_map(eager, image, discard_ratio=0.3), rtol=1e-5
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"head_fusion": "median"}, "head_fusion"),
        ({"discard_ratio": 1.0}, "discard_ratio"),
        ({"discard_ratio": -0.1}, "discard_ratio"),
        ({"method": "gradcam"}, "method"),
        ({"method": "last_layer", "discard_ratio": 0.5}, "'rollout' only"),
        ({"image_size": (30, 30)}, "divisible by the patch size"),
        (
            {"image_size": (0, 32)},
            r"image_size must be positive \(height, width\), got \(0, 32\)",
        ),  # was transformers'
    ],
)
def test_bad_options_raise_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        attention_map(classifier(), picture(), **options)


def test_an_int_image_size_is_a_square():
    # It was "TypeError: 'int' object is not subscriptable".
    np.testing.assert_array_equal(
        attention_map(classifier(), picture(), image_size=48),
        attention_map(classifier(), picture(), image_size=(48, 48)),
    )


def test_attentions_must_be_returned():
    with pytest.raises(ValueError, match="output_attentions=True"):
        attention_rollout(None)
    with pytest.raises(TypeError, match="PIL"):
        attention_map(classifier(), np.zeros((32, 32, 3)))


# -- the command line ------------------------------------------------------------------------------------------------
def test_the_cli_writes_the_figure(saved_model, image_file, tmp_path):
    output = tmp_path / "map.png"
    command = [sys.executable, str(SCRIPT), "--model", str(saved_model), "--image", str(image_file)]
    command += ["--output", str(output), "--image-size", "48", "64", "--discard-ratio", "0.5", "--head-fusion", "max"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    with Image.open(output) as png:
        assert png.format == "PNG"
        assert png.size == (round(3 * PANEL_INCHES * FIGURE_DPI), round((PANEL_INCHES + CAPTION_INCHES) * FIGURE_DPI))
        pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank canvas
    assert sorted(path.name for path in tmp_path.iterdir()) == ["map.png"]


def test_the_cli_reports_an_unreachable_hub_model_in_one_line(image_file, tmp_path):
    output = tmp_path / "map.png"
    command = [sys.executable, str(SCRIPT), "--model", "no-such-user/no-such-vit", "--image", str(image_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(command + ["--output", str(output)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr
    assert "could not load model 'no-such-user/no-such-vit'" in result.stderr and not output.exists()


def save_other_model(kind: str, folder: Path) -> None:
    tiny = {key: value for key, value in TINY.items() if key != "num_labels"}
    if kind == "base":
        VisionTransformerModel(tiny_config()).save_pretrained(folder)
    elif kind == "gap":
        classifier(classifier="gap", num_labels=3).save_pretrained(folder)
    else:  # transformers' own ViT: its sdpa path returns no probabilities, so the CLI loads it eagerly
        ViTForImageClassification(ViTConfig(**tiny, num_labels=4)).save_pretrained(folder)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["base", "gap", "transformers_vit"])
def test_the_cli_draws_base_models_gap_models_and_transformers_vit(kind, image_file, tmp_path, capsys):
    save_other_model(kind, tmp_path / "model")
    output = tmp_path / "map.png"
    arguments = ["--model", str(tmp_path / "model"), "--image", str(image_file), "--output", str(output)]
    assert load_cli().main(arguments + ["--image-size", "40", "24", "--method", "last_layer"]) == 0, (
        capsys.readouterr()
    )
    with Image.open(output) as png:
        assert np.asarray(png.convert("L")).std() > 10


@pytest.fixture
def bad_inputs(saved_model, image_file, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "folder.png").mkdir()
    return {
        "model": str(saved_model),
        "image": str(image_file),
        "output": str(tmp_path / "out" / "map.png"),
        "not_an_image": str(tmp_path / "notes.png"),
        "empty_model": str(tmp_path / "empty_model"),
        "folder": str(tmp_path / "folder.png"),
        "tmp": tmp_path,
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--image": "{tmp}/missing.jpg"}, "does not exist"),
        ({"--image": "{not_an_image}"}, "could not read an image"),
        ({"--image": "http://127.0.0.1:9/cat.jpg"}, "could not read an image"),  # nothing listens on port 9
        ({"--model": "{tmp}/no_such_model"}, "does not exist"),
        ({"--model": "{empty_model}"}, "could not load model"),
        ({"--model": "{image}"}, "is a file"),
        ({"--discard-ratio": "1.5"}, "--discard-ratio must be in"),
        ({"--discard-ratio": "lots"}, "invalid float"),
        ({"--method": "gradcam"}, "invalid choice"),
        ({"--image-size": "30"}, "divisible by the patch size"),
        ({"--output": "{tmp}/no_such_folder/map.png"}, "not a writable folder"),
        ({"--output": "{folder}"}, "is a folder"),
        ({"--output": "{tmp}/out/map.jpg"}, "must be a .png"),
    ],
)
def test_each_bad_input_exits_2_with_one_error_line(bad_inputs, change, message, capsys):
    (bad_inputs["tmp"] / "out").mkdir()
    arguments = {"--model": bad_inputs["model"], "--image": bad_inputs["image"], "--output": bad_inputs["output"]}
    arguments.update({flag: value.format(**bad_inputs) for flag, value in change.items()})
    assert load_cli().main([word for pair in arguments.items() for word in pair]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], errors
    assert list((bad_inputs["tmp"] / "out").iterdir()) == []


def test_a_failed_write_leaves_no_file(tmp_path):
    class BrokenFigure:
        def savefig(self, file, format):
            file.write(b"\x89PNG half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        load_cli().save_png(BrokenFigure(), str(tmp_path / "map.png"))
    assert list(tmp_path.iterdir()) == []


def test_the_readme_figure_is_committed_small_and_made_by_this_tool():
    docs = SCRIPT.parents[1] / "docs"
    assert (docs / "attention_map.png").stat().st_size < 150_000
    with Image.open(docs / "attention_map.png") as png, Image.open(docs / "digit_8.png") as digit:
        assert png.size == (round(3 * PANEL_INCHES * FIGURE_DPI), round((PANEL_INCHES + CAPTION_INCHES) * FIGURE_DPI))
        assert digit.size == (32, 32)


@pytest.mark.parametrize("where", ["weights", "logits"])
def test_non_finite_weights_or_logits_are_refused_in_one_line(where, image_file, tmp_path, capsys):
    model = classifier(seed=3)
    with torch.no_grad():
        if where == "weights":
            model.head.weight[0, 0] = float("nan")
        else:  # finite weights whose logits overflow float32
            model.head.bias.fill_(3e38)
            model.head.weight.fill_(3e38)
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "out" / "map.png"
    output.parent.mkdir()
    arguments = ["--model", str(tmp_path / "model"), "--image", str(image_file), "--output", str(output)]
    assert load_cli().main(arguments) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "non-finite" in errors[0], errors
    assert list(output.parent.iterdir()) == []


def test_the_caption_counts_the_predictions_it_lists(image_file, tmp_path, monkeypatch):
    # A 3-class model's caption said "top-5:" above its 3 predictions.
    classifier(classifier="gap", num_labels=3).save_pretrained(tmp_path / "model")
    cli, captions = load_cli(), []
    plot = cli.plot_attention

    def record(*args, caption, **kwargs):
        captions.append(caption)
        return plot(*args, caption=caption, **kwargs)

    monkeypatch.setattr(cli, "plot_attention", record)
    arguments = ["--model", str(tmp_path / "model"), "--image", str(image_file), "--output", str(tmp_path / "m.png")]
    assert cli.main(arguments) == 0
    (caption,) = captions
    header, *predictions = caption.splitlines()
    assert header.endswith(", top-3:") and len(predictions) == 3
