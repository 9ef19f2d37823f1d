"""Speed and memory of `conversion.convert` on a ViT-B/16-sized random .npz (346 MB), against `cp` and the plain floor.

The plain floor is the conversion written the plain way in ~25 lines (`plain_floor` below): `np.load(allow_pickle=
False)` (zipfile checks every CRC-32), a finiteness check, NumPy transposes, `hashlib.file_digest` for the model card,
`safetensors.numpy.save_file`. Targets (issue 12): the converter <= 1.5x the plain floor, peak RSS growth <= 2.5x the
file, conversion + verification of ViT-B/16 under ~3 s on a 2-core machine.

Each conversion runs in a fresh process that imports everything and converts a tiny checkpoint first (lazy imports
and first calls are not the conversion), then reports the wall time of one call and its peak resident memory (VmHWM)
above the resident memory just before the call (VmRSS). The contenders alternate, round after round, on a warm page
cache; the table shows medians over rounds.

    python benchmarks/bench_conversion.py --rounds 5   # ViT-B/16
    python benchmarks/bench_conversion.py --model R50+ViT-B_16 --image-size 384  # the hybrid, resampled to 384 px
    python benchmarks/bench_conversion.py --tiny        # the tests' tiny model: seconds, measures nothing

Verification (`hf_vit.verification`) runs the converted model in float64 and in its saved dtype and the NumPy
reference in float64 on one image: "convert + verify" minus "convert" is its cost.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


B16 = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16, image_size=224, num_classes=1000)
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=37, patch_size=8, image_size=32, num_classes=10)
# (writer in conversion.testing, its keywords): the released layouts, random weights
MODELS = {
    "ViT-B_16": ("write_random_npz", B16),
    "R50+ViT-B_16": ("write_random_hybrid_npz", {**B16, "patch_size": 1}),  # ResNet (3, 4, 9), width 64, 224 px
    "tiny": ("write_random_npz", TINY),
}
ROWS = ("cp", "plain floor", "convert", "convert + verify")


def plain_floor(source: str, output: str) -> None:
    """The reference loop: what any converter of a vit_jax .npz has to do, with the ecosystem's own tools."""
    from safetensors.numpy import save_file

    with np.load(source, allow_pickle=False) as npz:  # zipfile checks each member's CRC-32 as it is read
        arrays = {key: npz[key] for key in npz.files}
    for key, array in arrays.items():
        if not np.isfinite(array).all():
            raise ValueError(f"{key} is not finite")
    tensors = {}
    for key, array in arrays.items():
        if key == "embedding/kernel":
            array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif key.endswith(("query/kernel", "key/kernel", "value/kernel")):
            array = array.reshape(array.shape[0], -1).T  # (D, H, d) -> (H * d, D)
        elif key.endswith("out/kernel"):
            array = array.reshape(-1, array.shape[-1]).T  # (H, d, D) -> (D, H * d)
        elif key.endswith("kernel"):
            array = array.T  # Dense (in, out) -> Linear (out, in)
        elif key.endswith(("query/bias", "key/bias", "value/bias")):
            array = array.reshape(-1)
        tensors[key] = np.ascontiguousarray(array)
    with open(source, "rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    os.makedirs(output)
    save_file(tensors, os.path.join(output, "model.safetensors"), metadata={"source_sha256": sha256})


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(kind: str, source: str, output: str, image_size: int | None) -> None:
    """Child process: one measured run of `kind`; prints a JSON line."""
    import torch  # noqa: F401  (imported before the baseline, like every other heavy module)
    import transformers  # noqa: F401

    import hf_vit  # noqa: F401
    from conversion import convert
    from conversion.testing import write_random_npz

    def run(source, output, image_size=None):
        if kind == "plain floor":
            plain_floor(source, output)
        else:
            verify = kind == "convert + verify"
            convert(source, output, image_size=image_size, verify=verify, verify_images=1, log=None, progress=False)

    with tempfile.TemporaryDirectory() as warm:  # lazy imports and first calls are not the conversion
        run(str(write_random_npz(f"{warm}/tiny.npz")), f"{warm}/out")
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    run(source, output, image_size)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_growth_bytes": (_status_kib("VmHWM") - baseline) * 1024}))


def _run_probe(kind: str, source: Path, output: Path, image_size: int | None) -> dict:
    command = [sys.executable, __file__, "--probe", kind, str(source), str(output)]
    command += ["--image-size", str(image_size)] if image_size else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    shutil.rmtree(output)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _time_cp(source: Path, destination: Path) -> dict:
    start = time.perf_counter()
    subprocess.run(["cp", str(source), str(destination)], check=True)
    seconds = time.perf_counter() - start
    destination.unlink()
    return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="ViT-B_16", help="the random checkpoint's layout")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model (--model tiny)")
    parser.add_argument("--image-size", type=int, help="convert to this resolution (position embeddings resampled)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="where the .npz and outputs go (default: a temporary folder)")
    parser.add_argument("--probe", nargs=3, metavar=("KIND", "SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe, args.image_size)
        return
    model = "tiny" if args.tiny else args.model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-conversion-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"{model.replace('+', '-')}-random.npz"
    if not source.exists():  # written by a child process so that its memory never counts
        writer, sizes = MODELS[model]
        code = f"from conversion.testing import {writer}; {writer}({str(source)!r}, **{sizes!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    size = source.stat().st_size
    source.read_bytes()  # warm the page cache for every contender alike
    rows = {name: [] for name in ROWS}
    for _ in range(args.rounds):
        rows["cp"].append(_time_cp(source, workdir / "copy.npz"))
        for kind in ROWS[1:]:
            rows[kind].append(_run_probe(kind, source, workdir / "out", args.image_size))

    median = {name: statistics.median(r["seconds"] for r in runs) for name, runs in rows.items()}
    resolution = f", converted to {args.image_size} px" if args.image_size else ""
    print(
        f"checkpoint: {source.name}, {size / 1e6:.1f} MB{resolution}; {args.rounds} rounds, medians; "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'':20} {'wall s':>7} {'x cp':>6} {'x floor':>8} {'peak RSS growth MB':>19} {'x file':>7}")
    for name, runs in rows.items():
        line = f"{name:20} {median[name]:7.2f} {median[name] / median['cp']:6.2f} {median[name] / median['plain floor']:8.2f}"
        if "rss_growth_bytes" in runs[0]:
            growth = statistics.median(r["rss_growth_bytes"] for r in runs)
            line += f" {growth / 1e6:19.1f} {growth / size:7.2f}"
        print(line)
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
