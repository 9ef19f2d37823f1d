"""Fine-tuning throughput of the real `examples/finetune.py`: its input pipeline, optimizer and step, end to end.

For each setting (torch.compile off / on) the script runs under `accelerate launch` for a few steps on a synthetic
CIFAR-like dataset (random 32x32 PNGs, decoded once into memory and cropped up to the training resolution on the
device, as for CIFAR-10) and reports its steady rate (after the first --logging-steps, which hold start-up and
compilation). Beside it: the loader alone (batches of the same pipeline, moved to the device and augmented, no model)
and their ratio (above 1: the step, not the data, bounds the run), % of the device's measured matmul peak (training =
3x the analytic forward FLOPs), and the projected time of the paper's 500-step recipe and the seed's 10,000 steps at
512 images a step.

    python benchmarks/bench_finetune.py --device cuda            # ViT-B/16 at 224, 512 images a step, bf16
    python benchmarks/bench_finetune.py                          # CPU: ViT-Ti/16 at 64 px, 64 a step, fp32
    python benchmarks/bench_finetune.py --tiny                   # the test's smoke run
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import finetune  # noqa: E402
from common import forward_flops, gemm_peaks  # noqa: E402

import hf_vit  # noqa: E402
from hf_vit_examples import augmentation, models  # noqa: E402
from hf_vit_examples.data import decode_splits, load_image_dataset, prepare_splits, train_dataloader_for  # noqa: E402


TINY_OVERRIDES = "patch_size=8,hidden_size=32,num_hidden_layers=1,num_attention_heads=4"
RECIPES = {"vit_jax 500 steps": 500, "seed 10,000 steps": 10_000}  # of 512 images
PUBLISHED = "vit_jax: 500 steps in 17 min on 8 V100s; seed repo: 10,000 steps in 3 h 13 min"


def synthetic_cifar(folder: Path, count: int) -> Path:
    """A save_to_disk DatasetDict of random 32x32 RGB PNGs with 10 labels, train and test."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

    def split(size):
        images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(size)]
        return datasets.Dataset.from_dict({"img": images, "label": (np.arange(size) % 10).tolist()}, features)

    datasets.DatasetDict(train=split(count), test=split(64)).save_to_disk(str(folder))
    return folder


def loader_rate(data: Path, args: argparse.Namespace, image_size: int) -> float:
    """Images/s of the script's training loader alone: batches indexed, moved to the device, cropped, normalised."""
    options = finetune.parse_args(["--config_name", "ViT-Ti_16", "--dataset_name", str(data), "--output_dir", "-"])
    train = prepare_splits(load_image_dataset(options), options).train
    pixels = decode_splits({"train": train}, True, show_progress=False)
    resample = PIL.Image.Resampling.BILINEAR
    loader = train_dataloader_for(
        train, pixels, (image_size, image_size), resample, args.per_device_batch, {}, torch.device(args.device)
    )
    normalize = models.Normalize(hf_vit.image_processor_for(hf_vit.VisionTransformerConfig()))
    images, start = 0, None
    for index, batch in enumerate(loader):
        if index == 1:  # the first batch pays for the copy to the device
            torch.cuda.synchronize() if args.device == "cuda" else None
            start = time.perf_counter()
        uniforms = augmentation.step_numbers(0, index, len(batch["labels"]), 5).to(args.device)
        crops = normalize(
            augmentation.random_resized_crop(
                batch["pixel_values"].to(args.device), uniforms, (image_size, image_size), (0.05, 1.0), True
            )
        )
        images += len(crops) if index else 0
        if index == 20:
            break
    torch.cuda.synchronize() if args.device == "cuda" else None
    return images / (time.perf_counter() - start)


def script_rate(data: Path, args: argparse.Namespace, compile_: bool, work: Path) -> dict:
    """The steady images/s of examples/finetune.py itself, under accelerate launch."""
    output = work / f"run-compile-{compile_}"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", args.mixed_precision, "--dynamo_backend", "no"]
    launch += ["--cpu"] if args.device == "cpu" else []
    command = [*launch, str(ROOT / "examples" / "finetune.py"), "--config_name", args.config]
    command += ["--config_overrides", args.config_overrides] if args.config_overrides else []
    command += ["--image_size", str(args.image_size), "--dataset_name", str(data)]
    command += [
        "--total_batch_size",
        str(args.total_batch_size),
        "--per_device_train_batch_size",
        str(args.per_device_batch),
    ]
    command += ["--max_train_steps", str(args.steps), "--logging_steps", str(args.logging_steps)]
    command += ["--eval_steps", str(args.steps), "--checkpointing_steps", str(args.steps), "--max_eval_samples", "64"]
    command += ["--num_warmup_steps", "1", "--output_dir", str(output)] + (["--torch_compile"] if compile_ else [])
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"bench_finetune.py: the script failed:\n{result.stderr[-3000:]}")
    results = json.loads((output / "all_results.json").read_text())
    return {"steady": results["steady_train_samples_per_second"], "wall_s": time.perf_counter() - started}


def run(args: argparse.Namespace) -> dict:
    config = hf_vit.VisionTransformerConfig.from_variant(
        args.config, image_size=args.image_size, num_labels=10, **models.parse_overrides(args.config_overrides)
    )
    train_flops = 3 * forward_flops(config)
    # the fastest GEMM torch offers in the training dtype (bf16 autocast on a GPU): the roofline of "% of peak"
    peak = max(
        gemm_peaks(torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32, device=args.device).values()
    )
    rows = []
    with tempfile.TemporaryDirectory() as work:
        data = synthetic_cifar(Path(work) / "data", max(2 * args.total_batch_size, 256))
        loader = loader_rate(data, args, args.image_size)
        for compile_ in args.compile:
            rate = script_rate(data, args, compile_, Path(work))
            steady = rate["steady"]
            rows.append(
                {
                    "torch_compile": compile_,
                    "images_per_second": steady,
                    "steps_per_second": steady / args.total_batch_size,
                    "percent_of_peak": 100 * steady * train_flops / 1e9 / peak,
                    "loader_images_per_second": loader,
                    "loader_over_step": loader / steady,
                    "run_wall_s": rate["wall_s"],
                    **{f"{name} (min)": steps * 512 / steady / 60 for name, steps in RECIPES.items()},
                }
            )
    return {"config": config.to_dict(), "args": vars(args), "matmul_peak_gflops": peak, "rows": rows}


def report(results: dict) -> str:
    args = results["args"]
    lines = [
        f"examples/finetune.py, {args['config']} {args['config_overrides'] or ''} at {args['image_size']} px, "
        f"{args['total_batch_size']} images a step ({args['per_device_batch']} per pass), {args['mixed_precision']}, "
        f"{args['device']}; fastest GEMM {results['matmul_peak_gflops']:.0f} GFLOP/s",
        "",
        "| torch_compile | img/s | steps/s | % of peak | loader img/s | loader / step | "
        + " | ".join(f"{name} (min)" for name in RECIPES)
        + " |",
        "|---" * (6 + len(RECIPES)) + "|",
    ]
    for row in results["rows"]:
        recipes = " | ".join(f"{row[f'{name} (min)']:.1f}" for name in RECIPES)
        lines.append(
            f"| {row['torch_compile']} | {row['images_per_second']:.1f} | {row['steps_per_second']:.3f} | "
            f"{row['percent_of_peak']:.1f} | {row['loader_images_per_second']:.0f} | {row['loader_over_step']:.1f} | "
            f"{recipes} |"
        )
    lines += ["", f"Published: {PUBLISHED}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", help="a variant (default: ViT-B_16 on cuda, ViT-Ti_16 on cpu)")
    parser.add_argument("--config-overrides", default="")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--total-batch-size", type=int)
    parser.add_argument("--per-device-batch", type=int, help="images per forward pass (default: the whole step)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--logging-steps", type=int, default=10, help="the steady rate starts after these")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], help="default: bf16 on cuda, no on cpu")
    parser.add_argument("--compile", choices=["off", "on"], nargs="+", default=["off", "on"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 6 steps: the test's smoke run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible")
    gpu = args.device == "cuda"
    if args.tiny:
        args.config, args.config_overrides, args.image_size, args.total_batch_size = (
            "ViT-Ti_16",
            TINY_OVERRIDES,
            16,
            16,
        )
        args.steps, args.logging_steps = 6, 2
    args.config = args.config or ("ViT-B_16" if gpu else "ViT-Ti_16")
    args.image_size = args.image_size or (224 if gpu or args.config != "ViT-Ti_16" else 64)
    args.total_batch_size = args.total_batch_size or (512 if gpu else 64)
    args.per_device_batch = args.per_device_batch or args.total_batch_size
    args.mixed_precision = args.mixed_precision or ("bf16" if gpu else "no")
    args.compile = [choice == "on" for choice in args.compile]
    results = run(args)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
