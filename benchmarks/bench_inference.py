"""Inference throughput of hf_vit against transformers' ViT: same ViT-B/16 config, same weights, one process.

Contenders, for each dtype and batch size (weights cast with `.to(dtype)`, as `from_pretrained(dtype=...)` loads them):
  transformers eager    ViTForImageClassification, sdpa attention
  transformers compile  torch.compile(model), default settings
  hf_vit eager          VisionTransformerForImageClassification, sdpa attention: the normal path
  hf_vit fast           model.compile_for_speed(): the one documented extra call

Usage:
    python benchmarks/bench_inference.py                       # fp32 and bf16, batch 1, 8, 32 (about 6 minutes)
    python benchmarks/bench_inference.py --dtypes bf16 --batch-sizes 8 --rounds 5 --json results.json
    python benchmarks/bench_inference.py --tiny --no-compile   # the test's smoke run
"""

import argparse
import json
import os
import statistics
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
    format_table,
    forward_flops,
    interleaved,
    machine,
    matmul_peak,
    max_logit_difference,
    our_config,
    paired_ratio,
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
    dtype = DTYPES[spec["dtype"]]
    models = build_models(config, dtype)
    model = contenders(models, compile_too=spec["run"].endswith(("compile", "fast")))[spec["run"]]
    pixel_values = torch.randn(spec["batch"], 3, config.image_size, config.image_size, dtype=dtype)

    def step():
        with torch.inference_mode():
            return model(pixel_values)

    return step


def run(args: argparse.Namespace) -> dict[str, object]:
    config = our_config(tiny=args.tiny)
    flops = forward_flops(config)
    rows, peaks = [], {}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        peaks[dtype_name] = matmul_peak(dtype, tiny=args.tiny)
        models = build_models(config, dtype)
        for batch in args.batch_sizes:
            pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, dtype=dtype)
            # Fresh compiled wrappers per batch size, so each one is specialised to its shape.
            runs = contenders(models, compile_too=args.compile)
            calls = {name: forward_call(model, pixel_values) for name, model in runs.items()}
            with torch.inference_mode():
                warm_seconds = {name: warm(call) for name, call in calls.items()}
                difference = max_logit_difference(models, pixel_values)
                per_round = calls_per_round(warm_seconds[f"{OURS} eager"][1], args.calls)
                seconds = interleaved(calls, rounds=args.rounds, calls=per_round)
                if args.profile:
                    for name, call in calls.items():
                        print(f"\n{name}, {dtype_name}, batch {batch}:\n{top_ops(call)}", flush=True)
            peaks[dtype_name] = max(peaks[dtype_name], matmul_peak(dtype, tiny=args.tiny, repeats=3))
            medians = {name: statistics.median(times) for name, times in seconds.items()}
            best_theirs = min((name for name in runs if name.startswith(THEIRS)), key=medians.get)
            best_ours = min((name for name in runs if name.startswith(OURS)), key=medians.get)
            roofline = peaks[dtype_name] * 1e9 / flops
            row = {
                "dtype": dtype_name,
                "batch": batch,
                **{f"{name} img/s": batch / medians[name] for name in runs},
                "transformers best": best_theirs.split(" ", 1)[1],
                "hf_vit best": best_ours.split(" ", 1)[1],
                "ratio eager": paired_ratio(seconds[f"{THEIRS} eager"], seconds[f"{OURS} eager"]),
                "ratio best": paired_ratio(seconds[best_theirs], seconds[best_ours]),
                "roofline img/s": roofline,
                "hf_vit % roofline": 100 * batch / medians[best_ours] / roofline,
                "transformers % roofline": 100 * batch / medians[best_theirs] / roofline,
                "max |logit diff|": difference,
                "first call s": {name: first for name, (first, _) in warm_seconds.items()},
            }
            rows.append(row)
            print(
                f"  {dtype_name} batch {batch}: " + ", ".join(f"{n} {batch / medians[n]:.2f}" for n in runs),
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
                result = peak_memory_mib({**spec, "threads": args.threads})
                entry[f"{name} MiB"] = result["above_weights"] if result else None
            memory.append(entry)
    return {
        "machine": machine(),
        "matmul_peak_gflops": peaks,
        "forward_gflop": flops / 1e9,
        "rows": rows,
        "memory": memory,
    }


def report(results: dict[str, object], compiled: bool) -> str:
    names = [f"{THEIRS} eager"] + ([f"{THEIRS} compile"] if compiled else []) + [f"{OURS} eager"]
    names += [f"{OURS} fast"] if compiled else []
    columns = [("dtype", "dtype", "{}"), ("batch", "batch", "{}")]
    columns += [(f"{name} img/s", f"{name} img/s", "{:.2f}") for name in names]
    columns += [
        ("ratio eager", "eager / eager", "{:.2f}x"),
        ("ratio best", "best / best", "{:.2f}x"),
        ("hf_vit % roofline", "hf_vit % roofline", "{:.0f}%"),
        ("transformers % roofline", "transformers % roofline", "{:.0f}%"),
        ("max |logit diff|", "max abs logit diff", "{:.1e}"),
    ]
    meta = results["machine"]
    peaks = ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in results["matmul_peak_gflops"].items())
    lines = [
        f"Inference, {meta['date']}, {meta['cpu']} ({meta['threads']} threads, "
        f"load {meta['load_average_1min']:.1f}, torch {meta['torch']}, "
        f"transformers {meta['transformers']})",
        f"forward {results['forward_gflop']:.2f} GFLOP/image; matmul peak {peaks}; ratios are paired medians "
        "(> 1: hf_vit faster); best = the faster of eager and compile for each.",
        "",
        format_table(results["rows"], columns),
    ]
    if results["memory"]:
        memory_names = [key[: -len(" MiB")] for key in results["memory"][0] if key.endswith(" MiB")]
        memory_columns = [("dtype", "dtype", "{}"), ("batch", "batch", "{}")]
        memory_columns += [(f"{name} MiB", f"{name} MiB", "{:.0f}") for name in memory_names]
        lines += ["", "Peak resident memory above the loaded model, MiB (fresh process each):", ""]
        lines.append(format_table(results["memory"], memory_columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, compile_default=True)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 8 32 (tiny: 1 2)")
    args = parser.parse_args()
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
