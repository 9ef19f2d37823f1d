"""Which one bounds fine-tuning: the input pipeline or the model step?

Times, separately and with the code of examples/finetune.py:
  1. the loader alone: decode (PIL) + collate to uint8 on the CPU workers, for CIFAR-like 32x32 PNGs (kept at their
     size, as finetune.py does) and for 320x240 JPEG photos (resized to --image_size on the CPU);
  2. the augmentation on the device: batched random-resized crop + flip + normalise to --image_size;
  3. the model step: forward + backward + SGD step of --variant at --image_size (bf16 autocast on a GPU).

    python benchmarks/bench_input_pipeline.py                       # CPU: small defaults, a few seconds
    python benchmarks/bench_input_pipeline.py --variant ViT-B_16 --batch_size 256 --num_workers 8   # on a GPU

The run is bound by the smallest of (1) and (2)+(3) combined; the loader runs on other cores, in parallel.
"""

import argparse
import io
import os
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch

import hf_vit


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from hf_vit_examples import augmentation, data, models  # noqa: E402


NORMALIZE = models.Normalize(hf_vit.image_processor_for(hf_vit.VisionTransformerConfig()))


def synthetic_dataset(count: int, size: tuple[int, int], image_format: str, seed: int = 0) -> datasets.Dataset:
    """`count` smooth random images (gradients + noise, so PNG/JPEG compress as photos do) in the Image feature."""
    rng = np.random.default_rng(seed)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    encoded = []
    for _ in range(count):
        base = np.stack([np.sin(x * rng.uniform(1, 8) + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
        pixels = np.clip((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format=image_format, quality=90)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    labels = rng.integers(0, 10, count).tolist()
    dataset = datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features)
    return dataset.cast_column("image", datasets.Image(decode=False))


def images_per_second(run, batch_size: int, repeats: int, device: torch.device) -> float:
    run()  # warm-up (workers, kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * batch_size / (time.perf_counter() - start)


def bench_loader(dataset, image_size, batch_size: int, num_workers: int, batches: int) -> float:
    """Images/s of decode + collate alone, through a DataLoader as finetune.py builds it."""
    resample = hf_vit.image_processor_for(hf_vit.VisionTransformerConfig(image_size=image_size)).resample
    loader = torch.utils.data.DataLoader(
        dataset.with_transform(data.decode_images),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=data.Collate((image_size, image_size), resample, keep_native_size=True),
    )
    iterator = iter(loader)
    next(iterator)  # start the workers
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        seen += len(batch["labels"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default=None, help="Default: ViT-B_16 on a GPU, ViT-Ti_16 on the CPU.")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=None, help="Default: 256 on a GPU, 8 on the CPU.")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--images", type=int, default=2048, help="Synthetic images per dataset.")
    parser.add_argument("--steps", type=int, default=None, help="Timed model steps (default: 20 GPU, 3 CPU).")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    variant = args.variant or ("ViT-B_16" if on_gpu else "ViT-Ti_16")
    batch_size = args.batch_size or (256 if on_gpu else 8)
    steps = args.steps or (20 if on_gpu else 3)
    size = (args.image_size, args.image_size)
    print(
        f"device {device} ({torch.cuda.get_device_name() if on_gpu else f'{os.cpu_count()} CPUs'}), {variant}, "
        f"{args.image_size} px, batch {batch_size}, {args.num_workers} loader workers"
    )

    loader_batches = max(4, args.images // batch_size)
    cifar = synthetic_dataset(args.images, (32, 32), "PNG")
    photos = synthetic_dataset(max(batch_size * 2, args.images // 4), (320, 240), "JPEG")
    results = {
        "loader, 32x32 PNG (kept at 32 px)": bench_loader(
            cifar, args.image_size, batch_size, args.num_workers, loader_batches
        ),
        f"loader, 320x240 JPEG (resized to {args.image_size} px)": bench_loader(
            photos, args.image_size, batch_size, args.num_workers, loader_batches
        ),
    }

    uint8_batch = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    uniforms = torch.rand(batch_size, 5)
    results[f"device crop+flip+normalise 32 -> {args.image_size} px"] = images_per_second(
        lambda: NORMALIZE(augmentation.random_resized_crop(uint8_batch, uniforms, size, (0.05, 1.0), True)),
        batch_size,
        max(steps, 10),
        device,
    )

    config = hf_vit.VisionTransformerConfig.from_variant(variant, image_size=args.image_size, num_labels=10)
    model = hf_vit.VisionTransformerForImageClassification(config).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pixel_values = torch.randn(batch_size, 3, *size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def model_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results[f"model step {variant} ({'bf16' if on_gpu else 'fp32'})"] = images_per_second(
        model_step, batch_size, steps, device
    )

    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:10.0f} img/s")
    model_rate = list(results.values())[-1]
    slowest_loader = min(list(results.values())[:2])
    bound = "the model step" if model_rate < slowest_loader else "the input pipeline (loader)"
    print(
        f"bound by {bound}: model {model_rate:.0f} img/s vs slowest loader {slowest_loader:.0f} img/s "
        f"({slowest_loader / model_rate:.1f}x headroom)"
    )


if __name__ == "__main__":
    main()
