"""Inference throughput of hf_vit against transformers' ViT: same ViT-B/16 config, same weights, one process.

Contenders, for each dtype and batch size (weights cast with `.to(dtype)`, as `from_pretrained(dtype=...)` loads them):
  transformers eager    ViTForImageClassification, sdpa attention
  transformers compile  torch.compile(model), default settings
  hf_vit eager          VisionTransformerForImageClassification, sdpa attention: the normal path
  hf_vit fast           model.compile_for_speed(): the one documented extra call

Usage:
    python benchmarks/bench_inference.py                       # fp32 and bf16, batch 1, 8, 32 (about 6 minutes)
    python benchmarks/bench_inference.py --dtypes bf16 --batch-sizes 8 --rounds 5 --json results.json
    python benchmarks/bench_inference.py --device cuda --dtypes bf16 --batch-sizes 8 64 256   # on a GPU
    python benchmarks/bench_inference.py --tiny --no-compile   # the test's smoke run
"""

import argparse
import json
import os
import sys

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
    hardware,
    interleaved,
    machine,
    matmul_peak,
    max_logit_difference,
    memory_lines,
    our_config,
    peak_memory_mib,
    top_ops,
    warm,
    write_json,
)


def contenders(models: dict[str, torch.nn.Module], compile_too: bool) -> dict[str, torch.nn.Module]:
    runs = {f"{THEIRS} eager": models[THEIRS].eval(), f"{OURS} eager": models[OURS].eval()}
    if compile_too:
        runs[f"{THEIRS} compile"] = torch.compile(models[THEIRS])
        runs[f"{OURS} fast"] = models[OURS].compile_for_speed()
    return runs


def forward_call(model: torch.nn.Module, pixel_values: torch.Tensor):
    return lambda: model(pixel_values)


def make_step(spec: dict[str, object]):
    """One contender's forward on a fixed batch (the memory probe builds exactly what the timing loop runs)."""
    config = our_config(tiny=spec["tiny"])
    dtype, device = DTYPES[spec["dtype"]], spec.get("device", "cpu")
    models = build_models(config, dtype, device=device)
    model = contenders(models, compile_too=spec["run"].endswith(("compile", "fast")))[spec["run"]]
    pixel_values = torch.randn(spec["batch"], 3, config.image_size, config.image_size, dtype=dtype, device=device)

    def step():
        with torch.inference_mode():
            return model(pixel_values)

    return step


def run(args: argparse.Namespace) -> dict[str, object]:
    config = our_config(tiny=args.tiny)
    flops = forward_flops(config)
    rows, peaks, device = [], {}, args.device
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        peaks[dtype_name] = matmul_peak(dtype, tiny=args.tiny, device=device)
        models = build_models(config, dtype, device=device)
        for batch in args.batch_sizes:
            pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, dtype=dtype, device=device)
            # Fresh compiled wrappers per batch size, so each one is specialised to its shape.
            runs = contenders(models, compile_too=args.compile)
            calls = {name: forward_call(model, pixel_values) for name, model in runs.items()}
            with torch.inference_mode():
                warm_seconds = {name: warm(call, device) for name, call in calls.items()}
                difference = max_logit_difference(models, pixel_values)
                per_round = calls_per_round(warm_seconds[f"{OURS} eager"][1], args.calls)
                seconds = interleaved(calls, rounds=args.rounds, calls=per_round, device=device)
                if args.profile:
                    for name, call in calls.items():
                        print(f"\n{name}, {dtype_name}, batch {batch}:\n{top_ops(call, device=device)}", flush=True)
            peaks[dtype_name] = max(peaks[dtype_name], matmul_peak(dtype, tiny=args.tiny, repeats=3, device=device))
            row = {
                "dtype": dtype_name,
                "batch": batch,
                **compare(seconds, batch, roofline=peaks[dtype_name] * 1e9 / flops),
                "max |logit diff|": difference,
                "first call s": {name: first for name, (first, _) in warm_seconds.items()},
            }
            rows.append(row)
            print(
                f"  {dtype_name} batch {batch}: " + ", ".join(f"{n} {row[f'{n} img/s']:.2f}" for n in runs),
                f"(row {json.dumps(row)})",
                flush=True,
            )
        del models

    memory = []
    if not args.no_memory:
        batch = 8 if 8 in args.batch_sizes else args.batch_sizes[0]
        for dtype_name in args.dtypes:
            entry = {"dtype": dtype_name, "batch": batch}
            for name in [f"{THEIRS} eager", f"{OURS} eager"] + ([] if not args.compile else [f"{OURS} fast"]):
                spec = {"kind": "inference", "run": name, "dtype": dtype_name, "batch": batch, "tiny": args.tiny}
                result = peak_memory_mib({**spec, "threads": args.threads, "device": device})
                entry[f"{name} MiB"] = result["above_weights"] if result else None
            memory.append(entry)
    return {
        "machine": machine(device),
        "matmul_peak_gflops": peaks,
        "forward_gflop": flops / 1e9,
        "rows": rows,
        "memory": memory,
    }


def report(results: dict[str, object], compiled: bool) -> str:
    columns = [("dtype", "dtype", "{}"), ("batch", "batch", "{}")] + comparison_columns(compiled)
    columns.append(("max |logit diff|", "max abs logit diff", "{:.1e}"))
    meta = results["machine"]
    peaks = ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in results["matmul_peak_gflops"].items())
    lines = [
        f"Inference, {meta['date']}, {hardware(meta)}, "
        f"load {meta['load_average_1min']:.1f}, torch {meta['torch']}, "
        f"transformers {meta['transformers']})",
        f"forward {results['forward_gflop']:.2f} GFLOP/image; matmul peak {peaks}; ratios are paired medians "
        "(> 1: hf_vit faster); best = the faster of eager and compile for each.",
        "",
        format_table(results["rows"], columns),
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
    args = parser.parse_args()
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
