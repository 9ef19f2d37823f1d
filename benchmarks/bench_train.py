"""Training-step throughput of hf_vit against transformers' ViT: forward + backward + SGD, same weights, one process.

Shapes: ViT-B/16 at 224 px batch 8 (matmul bound) and at 32 px batch 64 (5 tokens per image: bound by everything else,
e.g. the optimizer over 86 M parameters). Precisions:
  fp32      fp32 weights
  bf16      weights cast with `.to(torch.bfloat16)`, as transformers' users run bf16 (SGD on bf16 weights)
  autocast  fp32 weights, forward under torch.autocast("cpu", bfloat16) (not run by default)
Contenders: transformers eager and hf_vit eager; with --compile also transformers `torch.compile(model)` and hf_vit
`model.compile_for_speed()` (compiling forward and backward of ViT-B takes minutes on 2 cores).

Usage:
    python benchmarks/bench_train.py                                   # both shapes, fp32 and bf16 (a few minutes)
    python benchmarks/bench_train.py --precisions bf16 autocast --shapes 224x8 --compile --json train.json
    python benchmarks/bench_train.py --tiny                            # the test's smoke run
"""

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
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
    our_config,
    paired_ratio,
    peak_memory_mib,
    top_ops,
    warm,
    write_json,
)


PRECISIONS = {"fp32": torch.float32, "autocast": torch.float32, "bf16": torch.bfloat16}
MATMUL_DTYPE = {"fp32": torch.float32, "autocast": torch.bfloat16, "bf16": torch.bfloat16}


def parse_shape(text: str) -> tuple[int, int]:
    """'224x8' -> (image size 224, batch 8)."""
    image_size, batch = text.lower().split("x")
    return int(image_size), int(batch)


def training_step(model, precision: str, pixel_values: torch.Tensor, labels: torch.Tensor, learning_rate=1e-3):
    """A closure doing one SGD step on `model` (a module or its compiled wrapper) with a fixed batch."""
    parameters = [parameter for parameter in getattr(model, "_orig_mod", model).parameters()]
    optimizer = torch.optim.SGD(parameters, lr=learning_rate)

    def step():
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
        with autocast:
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def contenders(models: dict[str, torch.nn.Module], compile_too: bool) -> dict[str, torch.nn.Module]:
    runs = {f"{THEIRS} eager": models[THEIRS].train(), f"{OURS} eager": models[OURS].train()}
    if compile_too:
        runs[f"{THEIRS} compile"] = torch.compile(models[THEIRS])
        runs[f"{OURS} fast"] = models[OURS].compile_for_speed()
    return runs


def batch_for(config, image_size: int, batch: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator).to(dtype)
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator)
    return pixel_values, labels


def make_step(spec: dict[str, object]):
    """One contender's training step (the memory probe builds exactly what the timing loop runs)."""
    config = our_config(tiny=spec["tiny"], image_size=spec["image_size"])
    models = build_models(config, PRECISIONS[spec["precision"]])
    model = contenders(models, compile_too=spec["run"].endswith(("compile", "fast")))[spec["run"]]
    pixel_values, labels = batch_for(config, spec["image_size"], spec["batch"], PRECISIONS[spec["precision"]])
    return training_step(model, spec["precision"], pixel_values, labels)


def run(args: argparse.Namespace) -> dict[str, object]:
    rows, peaks, memory = [], {}, []
    for image_size, batch in args.shapes:
        config = our_config(tiny=args.tiny, image_size=image_size)
        step_flops = 3 * batch * forward_flops(config)  # backward = twice the forward
        for precision in args.precisions:
            matmul_dtype = MATMUL_DTYPE[precision]
            peak_key = str(matmul_dtype).removeprefix("torch.")
            peaks[peak_key] = max(peaks.get(peak_key, 0.0), matmul_peak(matmul_dtype, tiny=args.tiny))
            models = build_models(config, PRECISIONS[precision])
            pixel_values, labels = batch_for(config, image_size, batch, PRECISIONS[precision])
            runs = contenders(models, compile_too=args.compile)
            steps = {name: training_step(model, precision, pixel_values, labels) for name, model in runs.items()}
            warm_seconds = {name: warm(step) for name, step in steps.items()}
            per_round = calls_per_round(warm_seconds[f"{OURS} eager"][1], args.calls)
            seconds = interleaved(steps, rounds=args.rounds, calls=per_round)
            if args.profile:
                for name, step in steps.items():
                    print(f"\n{name}, {precision}, {image_size}x{batch}:\n{top_ops(step)}", flush=True)
            medians = {name: statistics.median(times) for name, times in seconds.items()}
            best_theirs = min((name for name in runs if name.startswith(THEIRS)), key=medians.get)
            best_ours = min((name for name in runs if name.startswith(OURS)), key=medians.get)
            roofline = peaks[peak_key] * 1e9 / (step_flops / batch)
            rows.append(
                {
                    "shape": f"{image_size}x{batch}",
                    "precision": precision,
                    **{f"{name} img/s": batch / medians[name] for name in runs},
                    "transformers best": best_theirs.split(" ", 1)[1],
                    "hf_vit best": best_ours.split(" ", 1)[1],
                    "ratio eager": paired_ratio(seconds[f"{THEIRS} eager"], seconds[f"{OURS} eager"]),
                    "ratio best": paired_ratio(seconds[best_theirs], seconds[best_ours]),
                    "roofline img/s": roofline,
                    "hf_vit % roofline": 100 * batch / medians[best_ours] / roofline,
                    "transformers % roofline": 100 * batch / medians[best_theirs] / roofline,
                    "first call s": {name: first for name, (first, _) in warm_seconds.items()},
                }
            )
            print(
                f"  {image_size}x{batch} {precision}: " + ", ".join(f"{n} {batch / medians[n]:.2f}" for n in runs),
                f"(row {json.dumps(rows[-1])})",
                flush=True,
            )
            del models, runs, steps
            if not args.no_memory and image_size == args.shapes[0][0]:
                entry = {"shape": f"{image_size}x{batch}", "precision": precision}
                names = [f"{THEIRS} eager", f"{OURS} eager"] + ([] if not args.compile else [f"{OURS} fast"])
                for name in names:
                    spec = {"kind": "train", "run": name, "precision": precision, "tiny": args.tiny}
                    spec.update(image_size=image_size, batch=batch, threads=args.threads)
                    result = peak_memory_mib(spec)
                    entry[f"{name} MiB"] = result["above_weights"] if result else None
                memory.append(entry)
    return {"machine": machine(), "matmul_peak_gflops": peaks, "rows": rows, "memory": memory}


def report(results: dict[str, object], compiled: bool) -> str:
    names = [f"{THEIRS} eager"] + ([f"{THEIRS} compile"] if compiled else []) + [f"{OURS} eager"]
    names += [f"{OURS} fast"] if compiled else []
    columns = [("shape", "px x batch", "{}"), ("precision", "precision", "{}")]
    columns += [(f"{name} img/s", f"{name} img/s", "{:.2f}") for name in names]
    columns += [
        ("ratio eager", "eager / eager", "{:.2f}x"),
        ("ratio best", "best / best", "{:.2f}x"),
        ("hf_vit % roofline", "hf_vit % roofline", "{:.0f}%"),
        ("transformers % roofline", "transformers % roofline", "{:.0f}%"),
    ]
    meta = results["machine"]
    peaks = ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in results["matmul_peak_gflops"].items())
    lines = [
        f"Training step (forward + backward + SGD), {meta['date']}, {meta['cpu']} ({meta['threads']} threads, "
        f"load {meta['load_average_1min']:.1f}, "
        f"torch {meta['torch']}, transformers {meta['transformers']})",
        f"matmul peak {peaks}; roofline = peak / (3 x forward FLOPs); ratios are paired medians (> 1: hf_vit faster).",
        "",
        format_table(results["rows"], columns),
    ]
    if results["memory"]:
        memory_names = [key[: -len(" MiB")] for key in results["memory"][0] if key.endswith(" MiB")]
        memory_columns = [("shape", "px x batch", "{}"), ("precision", "precision", "{}")]
        memory_columns += [(f"{name} MiB", f"{name} MiB", "{:.0f}") for name in memory_names]
        lines += ["", "Peak resident memory above the loaded model during a step, MiB (fresh process each):", ""]
        lines.append(format_table(results["memory"], memory_columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, compile_default=False)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="PXxBATCH, default 224x8 32x64")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=None)
    args = parser.parse_args()
    args.shapes = args.shapes or ([(32, 2)] if args.tiny else [(224, 8), (32, 64)])
    args.precisions = args.precisions or ["fp32", "bf16"]
    args.rounds = args.rounds or (1 if args.tiny else 3)
    args.calls = args.calls or (1 if args.tiny else None)
    torch.set_num_threads(args.threads)
    results = run(args)
    print()
    print(report(results, compiled=args.compile))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
