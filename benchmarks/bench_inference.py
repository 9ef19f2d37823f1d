"""Inference throughput of hf_vit against transformers' ViT: same ViT-B/16 config, same weights, one process.

Contenders, for each dtype and batch size (weights cast with `.to(dtype)`, as `from_pretrained(dtype=...)` loads them):
  transformers eager    ViTForImageClassification, sdpa attention
  transformers compile  torch.compile(model), default settings
  hf_vit eager          VisionTransformerForImageClassification, sdpa attention: the normal path
  hf_vit compile        torch.compile(model), default settings
  hf_vit frozen         model.freeze_for_cpu_inference(): the same forward with oneDNN's pre-packed weights (CPU)
  onnxruntime fp32      hf_vit exported by `hf_vit.onnx_export` (onnx/model.onnx), ONNX Runtime's CPU provider
  onnxruntime int8      the same export quantized (onnx/model_quantized.onnx: int8 weights, dynamic quantization)
  openvino              the same onnx/model.onnx under OpenVINO's CPU plugin, in the row's precision
                        (INFERENCE_PRECISION_HINT f32 in the fp32 rows, bf16 in the bf16 rows; its logits are checked
                        against hf_vit's eager ones of the row)
The ONNX Runtime rows run in the fp32 pass (the export is float32), on CPU, with the hf_vit model's weights, and need
the `onnx` extra; `--no-onnx` leaves them out. The OpenVINO rows need the `openvino` extra (they are left out, saying
so, where it is not installed; `--no-openvino` leaves them out too); `--profile` prints OpenVINO's per-layer times.
Percentages are of the roofline: the fastest GEMM torch offers in the dtype (ATen/MKL or oneDNN, plain or pre-packed
weights; each is printed), times the model's analytic FLOPs; the int8 row's is the int8 GEMM's (`torch._int_mm`), so
no contender can pass 100 %. On CPU a second table says how much of each
eager forward is outside the GEMMs, and so how close to the roofline a faster GEMM alone could bring it.

Usage:
    python benchmarks/bench_inference.py                       # fp32 and bf16, batch 1, 8, 32 (about 6 minutes)
    python benchmarks/bench_inference.py --dtypes bf16 --batch-sizes 8 --rounds 5 --json results.json
    python benchmarks/bench_inference.py --device cuda --dtypes bf16 --batch-sizes 8 64 256   # on a GPU
    python benchmarks/bench_inference.py --tiny --no-compile   # the test's smoke run
"""

import argparse
import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DTYPES,
    OURS,
    THEIRS,
    add_common_arguments,
    build_models,
    calls_per_round,
    check_device,
    compare,
    comparison_columns,
    format_table,
    forward_flops,
    gemm_bound,
    gemm_peaks,
    hardware,
    interleaved,
    machine,
    max_logit_difference,
    memory_lines,
    merge_peaks,
    our_config,
    paired_ratio,
    peak_memory_mib,
    peak_text,
    top_ops,
    warm,
    write_json,
)


def contenders(
    models: dict[str, torch.nn.Module], compile_too: bool, frozen_too: bool = True
) -> dict[str, torch.nn.Module]:
    runs = {f"{THEIRS} eager": models[THEIRS].eval(), f"{OURS} eager": models[OURS].eval()}
    try:  # a copy: the eager contender keeps its plain weights
        if frozen_too:
            runs[f"{OURS} frozen"] = copy.deepcopy(models[OURS]).freeze_for_cpu_inference()
    except ValueError:  # on a GPU, or bf16 where oneDNN has no bf16 kernels
        pass
    if compile_too:
        runs[f"{THEIRS} compile"] = torch.compile(models[THEIRS])
        runs[f"{OURS} compile"] = torch.compile(models[OURS])
    return runs


def forward_call(model: torch.nn.Module, pixel_values: torch.Tensor):
    return lambda: model(pixel_values)


ORT = ("onnxruntime fp32", "onnxruntime int8")
OPENVINO = "openvino"  # one column: OpenVINO in the row's precision
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def export(config, workdir: str, quantize: bool) -> dict[str, object]:
    """hf_vit's fp32 export into `workdir`, with the weights every pass's models hold (written and checked by
    `hf_vit.onnx_export`, under OpenVINO too where it is installed): the check's figures."""
    from hf_vit.onnx_export import export_onnx  # noqa: PLC0415

    return export_onnx(build_models(config, torch.float32)[OURS], workdir, quantize=quantize)


def onnx_path(workdir: str) -> str:
    from hf_vit.onnx_export import FP32_FILE, ONNX_DIR  # noqa: PLC0415

    return os.path.join(workdir, ONNX_DIR, FP32_FILE)


def openvino_model(workdir: str, dtype_name: str, threads: int, profile: bool = False):
    """The export compiled by OpenVINO for the CPU in `dtype_name`'s precision, on `threads` threads."""
    from hf_vit.onnx_export import compile_openvino  # noqa: PLC0415

    return compile_openvino(onnx_path(workdir), OPENVINO_PRECISIONS[dtype_name], threads, profile=profile)


def openvino_call(compiled, pixel_values: torch.Tensor):
    """One inference on a fixed batch (bf16 pixels go in as the same values in float32, the graph's input type)."""
    request, inputs = compiled.create_infer_request(), pixel_values.float().numpy()
    return lambda: request.infer({0: inputs})


def openvino_layers(workdir: str, dtype_name: str, threads: int, pixel_values: torch.Tensor) -> str:
    """OpenVINO's per-layer profile (`PERF_COUNT`) of one call, summed by layer type: time, share, kernel."""
    compiled = openvino_model(workdir, dtype_name, threads, profile=True)
    request, inputs = compiled.create_infer_request(), pixel_values.float().numpy()
    request.infer({0: inputs})
    request.infer({0: inputs})
    layers: dict[str, list] = {}
    for info in request.profiling_info:
        if info.status == info.Status.EXECUTED:
            entry = layers.setdefault(info.node_type, [0.0, 0, set()])
            entry[0] += info.real_time.total_seconds() * 1e3
            entry[1] += 1
            entry[2].add(info.exec_type)
    total = sum(entry[0] for entry in layers.values())
    rows = [
        {"layer": name, "ms": ms, "%": 100 * ms / total, "calls": calls, "kernels": ", ".join(sorted(kernels))}
        for name, (ms, calls, kernels) in sorted(layers.items(), key=lambda item: -item[1][0])
        if ms >= 0.005 * total
    ]
    columns = [("layer", "layer type", "{}"), ("ms", "ms", "{:.2f}"), ("%", "%", "{:.1f}"), ("calls", "calls", "{}")]
    return format_table(rows, columns + [("kernels", "kernels", "{}")])


def onnx_sessions(workdir: str, threads: int) -> dict[str, object]:
    """ONNX Runtime sessions of the fp32 and int8 exports in `workdir`."""
    import onnxruntime  # noqa: PLC0415

    from hf_vit.onnx_export import FP32_FILE, INT8_FILE, ONNX_DIR  # noqa: PLC0415

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Idle ORT threads would otherwise spin on the cores the next contender runs on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        name: onnxruntime.InferenceSession(
            os.path.join(workdir, ONNX_DIR, file), options, providers=["CPUExecutionProvider"]
        )
        for name, file in zip(ORT, (FP32_FILE, INT8_FILE), strict=True)
    }
    return sessions


def openvino_logit_difference(models: dict[str, torch.nn.Module], compiled, pixel_values: torch.Tensor) -> float:
    """Largest |logit difference| between OpenVINO and hf_vit's eager forward in the row's dtype, on its batch."""
    with torch.inference_mode():
        reference = models[OURS](pixel_values).logits.float().numpy()
    return float(abs(compiled(pixel_values.float().numpy())[0] - reference).max())


def session_call(session, pixel_values: torch.Tensor):
    inputs = {"pixel_values": pixel_values.numpy()}
    return lambda: session.run(["logits"], inputs)


def make_step(spec: dict[str, object]):
    """One contender's forward on a fixed batch (the memory probe builds exactly what the timing loop runs)."""
    config = our_config(tiny=spec["tiny"])
    dtype, device = DTYPES[spec["dtype"]], spec.get("device", "cpu")
    models = build_models(config, dtype, device=device)
    run = spec["run"]
    model = contenders(models, compile_too=run.endswith("compile"), frozen_too=run.endswith("frozen"))[run]
    pixel_values = torch.randn(spec["batch"], 3, config.image_size, config.image_size, dtype=dtype, device=device)

    def step():
        with torch.inference_mode():
            return model(pixel_values)

    return step


def run(args: argparse.Namespace) -> dict[str, object]:
    config = our_config(tiny=args.tiny)
    flops, gemm_flops = forward_flops(config), forward_flops(config, attention=False)
    rows, peaks, device, onnx_checks = [], {}, args.device, {}
    workdir = tempfile.mkdtemp(prefix="bench-onnx-")
    if args.onnx or args.openvino:
        onnx_checks = export(config, workdir, quantize=args.onnx)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        peaks[dtype_name] = gemm_peaks(dtype, tiny=args.tiny, device=device)
        models = build_models(config, dtype, device=device)
        sessions = {}
        if args.onnx and dtype_name == "fp32":
            sessions = onnx_sessions(workdir, args.threads)
            peaks["int8"] = gemm_peaks(torch.int8, tiny=args.tiny, device=device)
        compiled = openvino_model(workdir, dtype_name, args.threads) if args.openvino else None
        for batch in args.batch_sizes:
            pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, dtype=dtype, device=device)
            # Fresh compiled wrappers per batch size, so each one is specialised to its shape.
            runs = contenders(models, compile_too=args.compile)
            calls = {name: forward_call(model, pixel_values) for name, model in runs.items()}
            calls.update({name: session_call(session, pixel_values) for name, session in sessions.items()})
            openvino_difference = {}
            if compiled is not None:
                calls[OPENVINO] = openvino_call(compiled, pixel_values)
                openvino_difference = {
                    "openvino max |logit diff|": openvino_logit_difference(models, compiled, pixel_values)
                }
            with torch.inference_mode():
                warm_seconds = {name: warm(call, device) for name, call in calls.items()}
                difference = max_logit_difference(models, pixel_values)
                per_round = calls_per_round(warm_seconds[f"{OURS} eager"][1], args.calls)
                seconds = interleaved(calls, rounds=args.rounds, calls=per_round, device=device)
                if args.profile:
                    for name, call in calls.items():
                        if name not in (*ORT, OPENVINO):
                            print(
                                f"\n{name}, {dtype_name}, batch {batch}:\n{top_ops(call, device=device)}", flush=True
                            )
                    if compiled is not None:
                        layers = openvino_layers(workdir, dtype_name, args.threads, pixel_values)
                        print(f"\n{OPENVINO}, {dtype_name}, batch {batch} (PERF_COUNT):\n{layers}", flush=True)
            peaks[dtype_name] = merge_peaks(peaks[dtype_name], gemm_peaks(dtype, args.tiny, repeats=3, device=device))
            int8_roofline = {}
            if sessions:  # int8 weights and activations: measured against the int8 GEMM peak, not the fp32 one
                peaks["int8"] = merge_peaks(peaks["int8"], gemm_peaks(torch.int8, args.tiny, repeats=3, device=device))
                int8_roofline = {ORT[1]: max(peaks["int8"].values()) * 1e9 / flops}
            peak = max(peaks[dtype_name].values()) * 1e9
            bounds = {}
            if device == "cpu":  # where the rest of the time goes, for the eager forwards (one profiled call each)
                with torch.inference_mode():
                    for name in (f"{THEIRS} eager", f"{OURS} eager"):
                        bound = gemm_bound(calls[name], batch * flops, batch * gemm_flops, peak)
                        bounds.update({f"{name} {key}": value for key, value in bound.items()})
            row = {
                "dtype": dtype_name,
                "batch": batch,
                **compare(seconds, batch, peak / flops, int8_roofline),
                **bounds,
                "max |logit diff|": difference,
                **openvino_difference,
                "first call s": {name: first for name, (first, _) in warm_seconds.items()},
            }
            if compiled is not None:  # > 1: hf_vit (the faster of its runs) faster than OpenVINO, paired by round
                row["hf_vit / openvino"] = paired_ratio(seconds[OPENVINO], seconds[f"{OURS} {row['hf_vit best']}"])
            rows.append(row)
            print(
                f"  {dtype_name} batch {batch}: " + ", ".join(f"{n} {row[f'{n} img/s']:.2f}" for n in calls),
                f"(row {json.dumps(row)})",
                flush=True,
            )
        del models, sessions, compiled
    shutil.rmtree(workdir, ignore_errors=True)

    memory = []
    if not args.no_memory:
        batch = 8 if 8 in args.batch_sizes else args.batch_sizes[0]
        for dtype_name in args.dtypes:
            entry = {"dtype": dtype_name, "batch": batch}
            for name in [f"{THEIRS} eager", f"{OURS} eager"] + ([] if not args.compile else [f"{OURS} compile"]):
                spec = {"kind": "inference", "run": name, "dtype": dtype_name, "batch": batch, "tiny": args.tiny}
                result = peak_memory_mib({**spec, "threads": args.threads, "device": device})
                entry[f"{name} MiB"] = result["above_weights"] if result else None
            memory.append(entry)
    return {
        "machine": machine(device),
        "matmul_peak_gflops": peaks,
        "forward_gflop": flops / 1e9,
        "onnx_check": onnx_checks,
        "openvino": args.openvino,
        "openvino_skipped": args.openvino_skipped,
        "rows": rows,
        "memory": memory,
    }


def report(results: dict[str, object], compiled: bool) -> str:
    timed = {key for row in results["rows"] for key in row}
    extra = tuple(name for name in (f"{OURS} frozen", *ORT) if f"{name} img/s" in timed)
    extra += (OPENVINO,) if results["openvino"] else ()
    columns = [("dtype", "dtype", "{}"), ("batch", "batch", "{}")] + comparison_columns(compiled, extra)
    if results["openvino"]:
        columns.append(("hf_vit / openvino", "hf_vit best / openvino", "{:.2f}x"))
    columns.append(("max |logit diff|", "max abs logit diff", "{:.1e}"))
    if results["openvino"]:
        columns.append(("openvino max |logit diff|", "openvino max abs logit diff", "{:.1e}"))
    meta = results["machine"]
    peaks = peak_text(results["matmul_peak_gflops"])
    lines = [
        f"Inference, {meta['date']}, {hardware(meta)}, "
        f"load {meta['load_average_1min']:.1f}, torch {meta['torch']}, "
        f"transformers {meta['transformers']})",
        f"forward {results['forward_gflop']:.2f} GFLOP/image; matmul peak (the fastest GEMM) {peaks}; ratios are "
        "paired medians (> 1: hf_vit faster); best = the fastest of each side's PyTorch runs (eager, compile, "
        "frozen).",
        "",
        format_table(results["rows"], columns),
    ]
    if f"{OURS} eager % ceiling" in results["rows"][0]:
        lines += [
            "",
            "Outside the GEMMs (one profiled eager call each): the share of the forward's operator time spent outside "
            "the linears and the patch convolution (attention, LayerNorm, adds, and GELU where it is not fused into "
            "the linear), and the most of the roofline the forward could reach if every GEMM ran at the peak and the "
            "rest took what it took:",
            "",
            format_table(
                results["rows"],
                [("dtype", "dtype", "{}"), ("batch", "batch", "{}")]
                + [
                    (f"{name} eager {key}", f"{name} eager {key}", "{:.0f}%")
                    for name in (THEIRS, OURS)
                    for key in ("% outside GEMMs", "% ceiling")
                ],
            ),
        ]
    check = results["onnx_check"]
    if check.get("openvino"):
        lines += [
            "",
            f"OpenVINO {check['openvino']} reads the same onnx/model.onnx: its f32 rows run as "
            f"{check['openvino_f32_ran_as']}, its bf16 rows as {check['openvino_bf16_ran_as']} (a CPU without BF16 "
            f"runs the bf16 hint in f32); the export's check: f32 max abs logit diff to PyTorch fp32 "
            f"{check['openvino_f32_max_abs_diff']:.1e}, bf16 {check['openvino_bf16_max_abs_diff']:.1e}. The openvino "
            "logit diff column is to hf_vit's eager forward in the row's dtype.",
        ]
    if results["openvino_skipped"]:
        lines += ["", f"No OpenVINO rows: {results['openvino_skipped']}."]
    if check.get("int8_top1_agreement") is not None:
        lines += [
            "",
            f"ONNX Runtime {check['onnxruntime']}, opset {check['opset']}: fp32 max abs logit diff to PyTorch "
            f"{check['max_abs_diff']:.1e}; int8 top-1 agreement {check['int8_top1_agreement']:.0%}, max logit change "
            f"{check['int8_max_abs_diff']:.1e} (logits span {check['logit_range']:.2g}; {check['num_images']} random "
            "images).",
        ]
    lines += memory_lines(
        results["memory"],
        [("dtype", "dtype", "{}"), ("batch", "batch", "{}")],
        f"Peak {'GPU' if meta.get('gpu') else 'resident'} memory above the loaded model, MiB (fresh process each):",
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, compile_default=True)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 8 32 (tiny: 1 2)")
    parser.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the ONNX Runtime fp32 and int8 exports too (CPU, fp32 pass; default: where onnxruntime is installed)",
    )
    parser.add_argument(
        "--openvino",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time OpenVINO on the same export too (CPU; default: where openvino and the onnx extra are installed)",
    )
    args = parser.parse_args()
    installed = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime", "onnxscript"))
    if args.onnx and not installed:
        parser.error("--onnx needs onnx, onnxruntime and onnxscript: pip install 'hf_vit[onnx]', or pass --no-onnx")
    # The export is float32 and runs on ONNX Runtime's CPU provider.
    args.onnx = (installed if args.onnx is None else args.onnx) and args.device == "cpu" and "fp32" in args.dtypes
    openvino_installed = installed and importlib.util.find_spec("openvino") is not None
    if args.openvino and not openvino_installed:
        parser.error(
            "--openvino needs openvino and the onnx extra: pip install 'hf_vit[openvino]', or pass --no-openvino"
        )
    args.openvino_skipped = None
    if args.openvino is None and not openvino_installed:
        args.openvino_skipped = (
            "openvino (or the onnx extra the export needs) is not installed: pip install 'hf_vit[openvino]'"
        )
    elif args.openvino is not False and args.device != "cpu":
        args.openvino_skipped = "OpenVINO runs here on the CPU only, and this run is on the GPU"
    args.openvino = args.openvino is not False and openvino_installed and args.device == "cpu"
    check_device(parser, args.device)
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.tiny else [1, 8, 32])
    args.rounds = args.rounds or (1 if args.tiny else 3)
    args.calls = args.calls or (1 if args.tiny else None)
    torch.set_num_threads(args.threads)
    results = run(args)
    print()
    print(report(results, compiled=args.compile))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
