"""What int8 costs in accuracy: train a small ViT on scikit-learn's digits, export it to ONNX, compare test accuracy.

Trains with `examples/finetune.py` (the README's main-job command: digits from scratch, 8x8 px, patch 2, width 128,
2 layers), exports the folder with `hf_vit.onnx_export` (fp32 and int8), then classifies the 360 test digits with
PyTorch, ONNX Runtime fp32 and ONNX Runtime int8, preprocessed by the folder's own image processor.

Usage:
    python benchmarks/bench_onnx_digits.py                        # 1000 steps, about 2 minutes on 2 cores
    python benchmarks/bench_onnx_digits.py --max-train-steps 30   # the test's smoke run
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import hf_vit  # noqa: F401  (registers hf_vit with the Auto classes)
from hf_vit.onnx_export import export_onnx


ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "finetune.py"
MODEL = "image_size=8,patch_size=2,hidden_size=128,num_hidden_layers=2,num_attention_heads=4,intermediate_size=256"


def train(output_dir: Path, steps: int) -> None:
    args = [
        "--config_name", "ViT-Ti_16", "--config_overrides", MODEL, "--learning_rate", "0.1",
        "--total_batch_size", "64", "--max_train_steps", str(steps), "--num_warmup_steps", str(max(1, steps // 10)),
        "--crop_scale", "0.8", "1", "--seed", "0", "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(FINETUNE), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")


def test_digits() -> tuple[list, np.ndarray]:
    sys.path.insert(0, str(ROOT / "examples"))
    from hf_vit_examples.data import load_digits_dataset  # noqa: PLC0415

    test = load_digits_dataset()["test"]
    return list(test["image"]), np.array(test["label"])


def evaluate(folder: Path) -> dict[str, object]:
    import onnxruntime  # noqa: PLC0415

    images, labels = test_digits()
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images, return_tensors="np")["pixel_values"]
    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = {"pytorch fp32": model(torch.from_numpy(pixel_values)).logits.numpy()}
    for name, file in (("onnxruntime fp32", "model.onnx"), ("onnxruntime int8", "model_quantized.onnx")):
        session = onnxruntime.InferenceSession(str(folder / "onnx" / file), providers=["CPUExecutionProvider"])
        logits[name] = session.run(["logits"], {"pixel_values": pixel_values.astype(np.float32)})[0]
    reference = logits["pytorch fp32"]
    return {
        "test images": len(labels),
        **{f"{name} accuracy": float((values.argmax(-1) == labels).mean()) for name, values in logits.items()},
        "int8 top-1 agreement with pytorch": float(
            (logits["onnxruntime int8"].argmax(-1) == reference.argmax(-1)).mean()
        ),
        "int8 max abs logit change": float(np.abs(logits["onnxruntime int8"] - reference).max()),
        "fp32 max abs logit diff": float(np.abs(logits["onnxruntime fp32"] - reference).max()),
        "logit range": float(reference.max() - reference.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-train-steps", type=int, default=1000)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if args.max_train_steps < 1:
        parser.error(f"--max-train-steps must be at least 1, got {args.max_train_steps}")
    with tempfile.TemporaryDirectory(prefix="onnx-digits-") as work:
        folder = Path(work) / "vit-digits"
        train(folder, args.max_train_steps)
        export_onnx(folder, quantize=True)
        results = {"train steps": args.max_train_steps, **evaluate(folder)}
    for key, value in results.items():
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
