"""OpenVINO beside ONNX Runtime: the export checked under it, its card section, the benchmark's OpenVINO rows, and both
left out, saying why, where OpenVINO is not installed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch


pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from conftest import randomize_, tiny_config  # noqa: E402

from hf_vit import VisionTransformerForImageClassification, onnx_export  # noqa: E402
from hf_vit.onnx_export import OnnxExportError, export_onnx  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_inference.py")
needs_openvino = pytest.mark.skipif(onnx_export.openvino_or_none() is None, reason="openvino is not installed")
# Runs the benchmark as if openvino were not installed (its find_spec says so, as for a missing package).
WITHOUT_OPENVINO = (
    "import importlib.util, runpy, sys; find_spec = importlib.util.find_spec; "
    "importlib.util.find_spec = lambda name, *args: None if name == 'openvino' else find_spec(name, *args); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def tiny_folder(path):
    model = randomize_(VisionTransformerForImageClassification(tiny_config()))
    model.save_pretrained(path)
    return model


@needs_openvino
def test_export_is_checked_under_openvino_and_the_card_says_how_to_run_it(tmp_path):
    model = tiny_folder(tmp_path)
    result = export_onnx(tmp_path)
    assert result["openvino_f32_drift"] <= result["bound"] and result["openvino_f32_ran_as"] == "f32"
    assert result["openvino_f32_max_abs_diff"] <= 1e-4
    assert result["openvino_bf16_ran_as"] in ("bf16", "f32")  # f32 on a CPU without BF16
    assert 0 < result["openvino_bf16_max_abs_diff"] < 0.05 or result["openvino_bf16_ran_as"] == "f32"
    compiled = onnx_export.compile_openvino(tmp_path / "onnx/model.onnx", "f32", threads=1)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # not the check's batch
    with torch.inference_mode():
        reference = model.eval()(pixel_values).logits.numpy()
    np.testing.assert_allclose(compiled(pixel_values.numpy())[0], reference, atol=1e-4, rtol=0)
    card = (tmp_path / "README.md").read_text()
    assert f"f32 within **{result['openvino_f32_drift']:.1e}** of the logits' scale" in card
    assert 'compile_model("onnx/model.onnx", "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})' in card


@needs_openvino
def test_an_export_openvino_runs_differently_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    tiny_folder(tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())
    compile_openvino = onnx_export.compile_openvino

    def off_by_1e3(*args, **kwargs):
        compiled = compile_openvino(*args, **kwargs)
        wrapper = lambda inputs: [compiled(inputs)[0] + 1e-3]  # noqa: E731
        wrapper.get_property = compiled.get_property
        return wrapper

    monkeypatch.setattr(onnx_export, "compile_openvino", off_by_1e3)
    with pytest.raises(
        OnnxExportError, match=r"OpenVINO's f32 output differs from the float64 reference by .* more than 100x"
    ):
        export_onnx(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_without_openvino_the_card_says_the_file_was_not_checked_under_it(tmp_path, monkeypatch):
    tiny_folder(tmp_path)
    monkeypatch.setattr(onnx_export, "openvino_or_none", lambda: None)
    result = export_onnx(tmp_path)
    assert "openvino" not in result
    card = (tmp_path / "README.md").read_text()
    assert "OpenVINO was not installed at export, so the file was not checked under it" in card
    assert "import openvino" in card  # how to run it is said either way


def run_bench(*args: str, without_openvino: bool = False) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", WITHOUT_OPENVINO] if without_openvino else [sys.executable]
    command = [*prefix, BENCH, "--tiny", "--threads", "1", "--no-compile", "--no-memory", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


@needs_openvino
def test_bench_inference_times_openvino_in_each_dtype_and_checks_its_logits(tmp_path):
    results = tmp_path / "inference.json"
    done = run_bench("--no-onnx", "--dtypes", "fp32", "bf16", "--profile", "--json", str(results))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| openvino img/s |" in done.stdout and "| hf_vit best / openvino |" in done.stdout
    assert "openvino, bf16, batch 2 (PERF_COUNT):\n| layer type" in done.stdout  # --profile: OpenVINO's layers too
    results = json.loads(results.read_text())
    assert "onnxruntime fp32 img/s" not in results["rows"][0]  # --no-onnx: the export is made, ORT is not timed
    for row in results["rows"]:
        assert row["openvino img/s"] > 0
        assert row["openvino % roofline"] == pytest.approx(100 * row["openvino img/s"] / row["roofline img/s"])
        hf_vit = row[f"hf_vit {row['hf_vit best']} img/s"]
        assert row["hf_vit / openvino"] == pytest.approx(hf_vit / row["openvino img/s"])  # one round: the ratio
        assert row["openvino max |logit diff|"] < (1e-4 if row["dtype"] == "fp32" else 0.05)
    assert results["onnx_check"]["openvino_f32_max_abs_diff"] < 1e-4


def test_bench_inference_without_openvino_says_why_it_has_no_openvino_rows(tmp_path):
    results = tmp_path / "inference.json"
    done = run_bench("--no-onnx", "--dtypes", "fp32", "--json", str(results), without_openvino=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "No OpenVINO rows: openvino (or the onnx extra the export needs) is not installed" in done.stdout
    assert "openvino img/s" not in json.loads(results.read_text())["rows"][0]
    asked = run_bench("--openvino", without_openvino=True)
    assert asked.returncode == 2 and "Traceback" not in asked.stderr
    assert asked.stderr.strip().splitlines()[-1].endswith("--openvino needs openvino and the onnx extra: pip install "
                                                          "'hf_vit[openvino]', or pass --no-openvino")  # fmt: skip


@needs_openvino
def test_an_export_openvino_cannot_compile_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    tiny_folder(tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())

    def cannot_compile(*args, **kwargs):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\nunsupported operation")

    monkeypatch.setattr(onnx_export, "compile_openvino", cannot_compile)
    with pytest.raises(OnnxExportError, match=r"cannot run the export in f32 \(Exception from .*core.cpp:112:\)"):
        export_onnx(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == before
