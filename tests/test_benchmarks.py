"""The benchmarks run end to end on the tiny config and print their tables (speed is not asserted: CPUs are shared)."""

import json
import os
import subprocess
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import common  # noqa: E402


def run_script(name: str, *args: str) -> str:
    command = [sys.executable, os.path.join(ROOT, "benchmarks", name), "--tiny", "--threads", "1", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_forward_flops_of_vit_b16_match_the_analytic_count():
    assert common.forward_flops(common.our_config()) == pytest.approx(35.13e9, rel=1e-3)


def test_gemm_bound_counts_the_linears_of_both_models_as_gemms():
    from torch.profiler import profile

    config = common.our_config(tiny=True)
    models = common.build_models(config, dtype=common.DTYPES["fp32"])
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    for model in models.values():  # hf_vit's oneDNN linears, transformers' ATen addmm
        with torch.inference_mode(), profile() as profiler:
            model.eval()(pixel_values)
        ops = {event.key for event in profiler.key_averages()}
        assert ops & (common.GEMM_OPS - {"aten::mkldnn_convolution"}), sorted(ops)
    weight, inputs = torch.randn(512, 512), torch.randn(512, 512)
    only_gemm = common.gemm_bound(lambda: torch.nn.functional.linear(inputs, weight), 1.0, 1.0, 1e9)
    no_gemm = common.gemm_bound(lambda: torch.exp(inputs), 1.0, 0.0, 1e9)
    assert only_gemm["% outside GEMMs"] < 50 and no_gemm["% outside GEMMs"] == pytest.approx(100)


def test_weight_mapping_covers_every_transformers_key():
    models = common.build_models(common.our_config(tiny=True), dtype=common.DTYPES["fp32"])
    theirs = models[common.THEIRS].state_dict()
    renamed = common.to_transformers_state_dict(models[common.OURS].state_dict())
    assert sorted(renamed) == sorted(theirs)


def test_bench_inference_prints_its_table(tmp_path):
    results = tmp_path / "inference.json"
    out = run_script("bench_inference.py", "--no-compile", "--no-onnx", "--dtypes", "fp32", "--json", str(results))
    assert "| dtype | batch | transformers eager img/s |" in out
    assert "Peak resident memory" in out
    results = json.loads(results.read_text())
    rows = results["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert all(row["max |logit diff|"] < 1e-4 for row in rows)  # both models hold the same weights
    # The roofline is the fastest of the GEMMs measured (each printed), not one chosen library's.
    peaks = results["matmul_peak_gflops"]["fp32"]
    assert {"ATen matmul", "ATen linear"} <= set(peaks)
    fastest = max(peaks.values()) / results["forward_gflop"]
    assert rows[-1]["roofline img/s"] == pytest.approx(fastest) and f"fp32 {max(peaks.values()):.0f} GFLOP/s (" in out
    # Where the rest goes: the profiler's GEMMs are recognised on both paths (hf_vit's oneDNN linears, transformers'
    # ATen addmm), so each eager forward spends some but not all of its time in them.
    assert "| hf_vit eager % ceiling |" in out
    assert all(0 < row[f"{name} eager % outside GEMMs"] < 100 for row in rows for name in (common.OURS, common.THEIRS))


def test_bench_inference_times_onnx_runtime_beside_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    results = tmp_path / "inference.json"
    out = run_script("bench_inference.py", "--no-compile", "--no-memory", "--dtypes", "fp32", "--json", str(results))
    assert "onnxruntime fp32 img/s | onnxruntime int8 img/s" in out
    results = json.loads(results.read_text())
    assert results["onnx_check"]["max_abs_diff"] < 1e-4
    assert all(row["onnxruntime int8 img/s"] > 0 for row in results["rows"])
    # int8 runs against the int8 GEMM's peak (printed), fp32 contenders against fp32's: no share can pass 100 % because
    # it was divided by another dtype's peak.
    int8_peak = max(results["matmul_peak_gflops"]["int8"].values())
    assert f"int8 {int8_peak:.0f} GOP/s (ATen _int_mm)" in out
    row = results["rows"][-1]  # the peaks are the best over the run: the last row's rooflines are the final ones
    int8_roofline = int8_peak / results["forward_gflop"]
    assert row["onnxruntime int8 % roofline"] == pytest.approx(100 * row["onnxruntime int8 img/s"] / int8_roofline)
    fp32_share = 100 * row["onnxruntime fp32 img/s"] / row["roofline img/s"]
    assert row["onnxruntime fp32 % roofline"] == pytest.approx(fp32_share)


def test_bench_train_prints_its_table(tmp_path):
    results = tmp_path / "train.json"
    out = run_script("bench_train.py", "--precisions", "bf16", "--no-memory", "--json", str(results))
    assert "| px x batch | precision | transformers eager img/s |" in out
    assert json.loads(results.read_text())["rows"][0]["precision"] == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
@pytest.mark.parametrize("script", ["bench_inference.py", "bench_train.py"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_code_2(script):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--tiny", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("torch sees no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    )


def test_h200_check_refuses_an_unknown_part_before_doing_anything(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "h200_check.sh")
    done = subprocess.run(["bash", script, "inference", "nonsense"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown part 'nonsense': choose from inference, train, finetune, configs"
    assert not os.path.exists(os.path.join(ROOT, "gpu-results")) and list(tmp_path.iterdir()) == []


def test_bench_conversion_prints_its_table(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_conversion.py"), "--tiny", "--rounds", "1"]
    done = subprocess.run(
        command + ["--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["wall", "s", "x", "cp", "x", "floor", "peak", "RSS", "growth", "MB", "x", "file"]
    assert [line[:20].strip() for line in lines[2:]] == ["cp", "plain floor", "convert", "convert + verify"]
    assert [len(line[20:].split()) for line in lines[2:]] == [3, 5, 5, 5]  # cp has no memory column
    assert not (tmp_path / "out").exists()  # every probe's output folder is removed


def test_bench_finetune_runs_the_real_script_and_prints_its_table(tmp_path):
    results = tmp_path / "finetune.json"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_finetune.py"), "--tiny", "--compile", "off"]
    done = subprocess.run([*command, "--json", str(results)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| torch_compile | img/s | steps/s | % of peak | loader img/s | loader / step |" in done.stdout
    (row,) = json.loads(results.read_text())["rows"]
    assert row["torch_compile"] is False and row["images_per_second"] > 0 and row["loader_images_per_second"] > 0
    assert row["vit_jax 500 steps (min)"] == pytest.approx(500 * 512 / row["images_per_second"] / 60)


def test_bench_onnx_digits_trains_exports_and_compares_accuracy(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    results = tmp_path / "digits.json"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_onnx_digits.py"), "--max-train-steps", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + ["--json", str(results)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(results.read_text())
    assert results["test images"] == 360
    assert results["onnxruntime fp32 accuracy"] == results["pytorch fp32 accuracy"]  # same logits up to 1e-4
    assert results["fp32 max abs logit diff"] < 1e-4
    assert 0 <= results["onnxruntime int8 accuracy"] <= 1
