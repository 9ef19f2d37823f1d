"""Training-step throughput of hf_vit against transformers' ViT: forward + backward + SGD, same weights, one process.

Shapes: ViT-B/16 at 224 px batch 8 (matmul bound) and at 32 px batch 64 (5 tokens per image: bound by everything else,
e.g. the optimizer over 86 M parameters). Precisions:
  fp32      fp32 weights
  bf16      weights cast with `.to(torch.bfloat16)`, as transformers' users run bf16 (SGD on bf16 weights)
  autocast  fp32 weights, forward under torch.autocast("cpu", bfloat16) (not run by default)
Contenders: transformers eager and hf_vit eager; with --compile also `torch.compile(model)` of each (compiling forward
and backward of ViT-B takes minutes on 2 cores).

Usage:
    python benchmarks/bench_train.py                                   # both shapes, fp32 and bf16 (a few minutes)
    python benchmarks/bench_train.py --precisions bf16 autocast --shapes 224x8 --compile --json train.json
    python benchmarks/bench_train.py --device cuda --shapes 224x128 --precisions bf16 --compile   # on a GPU
    python benchmarks/bench_train.py --tiny                            # the test's smoke run
"""

import argparse
import contextlib
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
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
    gemm_peaks,
    hardware,
    interleaved,
    machine,
    memory_lines,
    merge_peaks,
    our_config,
    peak_memory_mib,
    peak_text,
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
        autocast = (
            torch.autocast(pixel_values.device.type, dtype=torch.bfloat16)
            if precision == "autocast"
            else contextlib.nullcontext()
        )
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
        runs[f"{OURS} compile"] = torch.compile(models[OURS])
    return runs


def batch_for(config, image_size: int, batch: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device=device, dtype=dtype)
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator).to(device)
    return pixel_values, labels


def make_step(spec: dict[str, object]):
    """One contender's training step (the memory probe builds exactly what the timing loop runs)."""
    config = our_config(tiny=spec["tiny"], image_size=spec["image_size"])
    device = spec.get("device", "cpu")
    models = build_models(config, PRECISIONS[spec["precision"]], device=device)
    model = contenders(models, compile_too=spec["run"].endswith("compile"))[spec["run"]]
    pixel_values, labels = batch_for(config, spec["image_size"], spec["batch"], PRECISIONS[spec["precision"]], device)
    return training_step(model, spec["precision"], pixel_values, labels)


def run(args: argparse.Namespace) -> dict[str, object]:
    rows, peaks, memory, device = [], {}, [], args.device
    for image_size, batch in args.shapes:
        config = our_config(tiny=args.tiny, image_size=image_size)
        step_flops = 3 * batch * forward_flops(config)  # backward = twice the forward
        for precision in args.precisions:
            matmul_dtype = MATMUL_DTYPE[precision]
            peak_key = str(matmul_dtype).removeprefix("torch.")
            peaks[peak_key] = merge_peaks(peaks.get(peak_key, {}), gemm_peaks(matmul_dtype, args.tiny, device=device))
            models = build_models(config, PRECISIONS[precision], device=device)
            pixel_values, labels = batch_for(config, image_size, batch, PRECISIONS[precision], device)
            runs = contenders(models, compile_too=args.compile)
            steps = {name: training_step(model, precision, pixel_values, labels) for name, model in runs.items()}
            warm_seconds = {name: warm(step, device) for name, step in steps.items()}
            per_round = calls_per_round(warm_seconds[f"{OURS} eager"][1], args.calls)
            seconds = interleaved(steps, rounds=args.rounds, calls=per_round, device=device)
            if args.profile:
                for name, step in steps.items():
                    print(f"\n{name}, {precision}, {image_size}x{batch}:\n{top_ops(step, device=device)}", flush=True)
            rows.append(
                {
                    "shape": f"{image_size}x{batch}",
                    "precision": precision,
                    **compare(seconds, batch, roofline=max(peaks[peak_key].values()) * 1e9 / (step_flops / batch)),
                    "first call s": {name: first for name, (first, _) in warm_seconds.items()},
                }
            )
            print(
                f"  {image_size}x{batch} {precision}: " + ", ".join(f"{n} {rows[-1][f'{n} img/s']:.2f}" for n in runs),
                f"(row {json.dumps(rows[-1])})",
                flush=True,
            )
            del models, runs, steps
            if not args.no_memory and image_size == args.shapes[0][0]:
                entry = {"shape": f"{image_size}x{batch}", "precision": precision}
                names = [f"{THEIRS} eager", f"{OURS} eager"] + ([] if not args.compile else [f"{OURS} compile"])
                for name in names:
                    spec = {"kind": "train", "run": name, "precision": precision, "tiny": args.tiny}
                    spec.update(image_size=image_size, batch=batch, threads=args.threads, device=device)
                    result = peak_memory_mib(spec)
                    entry[f"{name} MiB"] = result["above_weights"] if result else None
                memory.append(entry)
    return {"machine": machine(device), "matmul_peak_gflops": peaks, "rows": rows, "memory": memory}


def report(results: dict[str, object], compiled: bool) -> str:
    columns = [("shape", "px x batch", "{}"), ("precision", "precision", "{}")] + comparison_columns(compiled)
    meta = results["machine"]
    lines = [
        f"Training step (forward + backward + SGD), {meta['date']}, {hardware(meta)}, "
        f"load {meta['load_average_1min']:.1f}, "
        f"torch {meta['torch']}, transformers {meta['transformers']})",
        f"matmul peak (the fastest GEMM) {peak_text(results['matmul_peak_gflops'])}; roofline = peak / (3 x forward FLOPs); ratios are paired medians (> 1: hf_vit faster).",
        "",
        format_table(results["rows"], columns),
    ]
    lines += memory_lines(
        results["memory"],
        [("shape", "px x batch", "{}"), ("precision", "precision", "{}")],
        f"Peak {'GPU' if meta.get('gpu') else 'resident'} memory above the loaded model during a step, MiB "
        "(fresh process each):",
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, compile_default=False)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="PXxBATCH, default 224x8 32x64")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=None)
    args = parser.parse_args()
    check_device(parser, args.device)
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
