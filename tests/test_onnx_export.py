"""hf_vit.onnx_export: onnx/model.onnx (+ model_quantized.onnx) in the folder, checked with ONNX Runtime, in the card."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch


onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from conftest import randomize_, tiny_config  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

from hf_vit import VisionTransformerForImageClassification, VisionTransformerModel, onnx_export  # noqa: E402
from hf_vit.onnx_export import OnnxExportError, export_onnx  # noqa: E402
from hf_vit.verification import verification_images  # noqa: E402


def onnx_logits(path, pixel_values: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0]


def torch_logits(model, pixel_values: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.eval()(pixel_values).logits.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny hf_vit folder exported with --quantize (exporting takes ~10 s)."""
    folder = tmp_path_factory.mktemp("onnx") / "vit-tiny"
    model = randomize_(VisionTransformerForImageClassification(tiny_config()))
    model.save_pretrained(folder)
    return folder, model, export_onnx(folder, quantize=True)


def test_hf_vit_folder_gets_the_optimum_layout_and_matches_pytorch_at_any_batch_size(exported):
    folder, model, result = exported
    assert sorted(path.name for path in (folder / "onnx").iterdir()) == ["model.onnx", "model_quantized.onnx"]
    assert result["files"] == ["onnx/model.onnx", "onnx/model_quantized.onnx"]
    assert not [path for path in folder.iterdir() if path.name.startswith(".onnx-export-")]  # no work files left
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # not the export's batch
    np.testing.assert_allclose(onnx_logits(folder / "onnx/model.onnx", pixel_values), torch_logits(model, pixel_values), atol=1e-4, rtol=0)  # fmt: skip
    assert result["max_abs_diff"] <= 1e-4


def test_int8_model_is_close_but_not_exact_and_its_figures_are_reported(exported):
    folder, model, result = exported
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    change = np.abs(
        onnx_logits(folder / "onnx/model_quantized.onnx", pixel_values) - torch_logits(model, pixel_values)
    )
    assert 0 < change.max() < 0.1 * result["logit_range"]
    assert 0 <= result["int8_top1_agreement"] <= 1 and result["int8_max_abs_diff"] > 0
    assert (folder / "onnx/model_quantized.onnx").stat().st_size < (folder / "onnx/model.onnx").stat().st_size


def test_card_says_what_the_files_are_and_how_they_were_checked(exported):
    folder, _, result = exported
    card = (folder / "README.md").read_text()
    assert card.count("## ONNX") == 1
    assert "`onnx/model.onnx`" in card and "`onnx/model_quantized.onnx`" in card
    assert f"float32 logits are within **{result['drift']:.1e}** of the logits' scale" in card
    assert f"(PyTorch's own float32 forward: {result['pytorch_drift']:.1e}; bound {result['bound']:.1e})" in card
    assert f"max abs logit change **{result['int8_max_abs_diff']:.1e}**" in card


def test_export_again_replaces_the_files_and_the_card_section(tmp_path):
    folder = tmp_path / "vit"
    randomize_(VisionTransformerForImageClassification(tiny_config())).save_pretrained(folder)
    (folder / "README.md").write_text("# my model\n\n## ONNX\n\nold text\n\n## Training\n\nkept\n")
    export_onnx(folder, quantize=True)
    export_onnx(folder)  # without --quantize: the int8 file of the first export no longer matches the card
    assert sorted(path.name for path in (folder / "onnx").iterdir()) == ["model.onnx"]
    card = (folder / "README.md").read_text()
    assert card.startswith("# my model\n") and card.count("## ONNX") == 1 and "old text" not in card
    assert "## Training\n\nkept\n" in card and "model_quantized" not in card


def test_stock_transformers_vit_folder_exports_too(tmp_path):
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, num_labels=10, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )  # fmt: skip
    model = randomize_(ViTForImageClassification(config))
    model.save_pretrained(tmp_path)
    result = export_onnx(tmp_path, quantize=True)
    assert result["files"] == ["onnx/model.onnx", "onnx/model_quantized.onnx"]
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(onnx_logits(tmp_path / "onnx/model.onnx", pixel_values), torch_logits(model, pixel_values), atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("base", ["ViTModel", "hf_vit-base"])
def test_a_folder_without_a_classifier_is_refused_not_exported_headless(tmp_path, base):
    """A base model (transformers' ViTModel with its pooler, hf_vit's VisionTransformerModel) loaded as a classifier
    would get a random or missing head and lose weights it has: the export would not be the folder's model."""
    if base == "ViTModel":
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, num_labels=0)  # fmt: skip
        ViTModel(config).save_pretrained(tmp_path)
    else:
        VisionTransformerModel(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(OnnxExportError, match="is not a complete image classifier: .* export the classifier folder"):
        export_onnx(tmp_path)
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "README.md").exists()


def test_a_loaded_model_exports_into_output_dir_and_keeps_its_dtype(tmp_path):
    model = randomize_(VisionTransformerForImageClassification(tiny_config())).to(torch.bfloat16).train()
    result = export_onnx(model, tmp_path / "out")
    assert result["files"] == ["onnx/model.onnx"] and (tmp_path / "out/README.md").exists()
    assert model.dtype == torch.bfloat16 and model.training
    with pytest.raises(OnnxExportError, match="needs output_dir"):
        export_onnx(model)


def test_an_export_that_differs_from_pytorch_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "vit"
    randomize_(VisionTransformerForImageClassification(tiny_config())).save_pretrained(folder)
    before = sorted(path.name for path in folder.iterdir())
    forward = onnx_export._Logits.forward
    monkeypatch.setattr(onnx_export._Logits, "forward", lambda self, pixel_values: forward(self, pixel_values) + 1e-3)
    with pytest.raises(
        OnnxExportError,
        match=r"float32 output differs from the float64 reference by \d\.\de-0[34] .* more than 100x PyTorch's own",
    ):
        export_onnx(folder, quantize=True)
    assert sorted(path.name for path in folder.iterdir()) == before  # no onnx/, no card, no work files


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hf_vit.onnx_export", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("what", ["missing", "no-config", "not-a-model", "base-model"])
def test_cli_bad_folder_is_one_line_exit_2_and_writes_nothing(tmp_path, what):
    folder = tmp_path / "model"
    if what != "missing":
        folder.mkdir()
    if what == "not-a-model":
        (folder / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    if what == "base-model":  # no classifier: transformers' loading report must not come before the line
        VisionTransformerModel(tiny_config()).save_pretrained(folder)
    done = run_cli(str(folder))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert not (folder / "onnx").exists() and not (folder / "README.md").exists()


def test_cli_exports_and_reports_the_check(tmp_path):
    randomize_(VisionTransformerForImageClassification(tiny_config())).save_pretrained(tmp_path)
    done = run_cli(str(tmp_path), "--quantize")
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote onnx/model.onnx, onnx/model_quantized.onnx into {tmp_path}: float32 within")
    assert "int8 top-1 agreement" in last
    # The result is the only thing said: not after torch.onnx's skipped torchvision operators, a FutureWarning from
    # inside the exporter and ONNX Runtime's pre-processing advice (7 lines before).
    assert done.stdout.strip() == last and done.stderr == ""


@pytest.mark.parametrize("export", ["hf_vit", "transformers-vit"])
def test_hf_vit_convert_onnx_writes_checked_files_into_the_converted_folder(export, tmp_path):
    from conversion.cli import main as convert_cli
    from conversion.testing import write_random_npz

    npz = write_random_npz(tmp_path / "tiny.npz", num_classes=5)
    output = tmp_path / "out"
    arguments = [str(npz), str(output), "--export", export, "--onnx", "--onnx-quantize", "--quiet"]
    assert convert_cli(arguments) == 0
    assert sorted(p.name for p in (output / "onnx").iterdir()) == ["model.onnx", "model_quantized.onnx"]
    model = ViTForImageClassification if export == "transformers-vit" else VisionTransformerForImageClassification
    model = model.from_pretrained(output)
    pixel_values = torch.from_numpy(verification_images(3, 32, 32))
    np.testing.assert_allclose(
        onnx_logits(output / "onnx" / "model.onnx", pixel_values), torch_logits(model, pixel_values), atol=1e-4
    )
    assert "onnx/model_quantized.onnx" in (output / "README.md").read_text()
    assert not list(tmp_path.glob(".out.partial-*"))
