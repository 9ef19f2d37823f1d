"""Speed and memory of `conversion.convert` on a ViT-B/16-sized random .npz (346 MB), against `cp` of the same file.

Targets (issue 3): conversion wall time <= 3x `cp` (reading the npz alone is about 1x, writing safetensors 2x) and
peak RSS growth <= 1.5x the checkpoint size. Each conversion runs in a fresh process that imports everything and
converts a tiny checkpoint first (lazy imports and first calls are not the conversion), then reports the wall time of
one `convert()` call and its peak resident memory (VmHWM) above the resident memory just before the call (VmRSS).
`cp` and the conversion alternate, round after round, on a warm page cache; the table shows medians over rounds.
`cp` runs right after the previous output was deleted: on a VM that returns free memory to its host that is its
fastest case, so the ratios are conservative.
VmHWM counts the pages of the mapped source too (the converter reads the .npz through mmap and lets a member's pages
go once it is converted and checked); they belong to the page cache, which holds the file anyway.
A local file's conversion cannot beat hashing it for the model card, which one core does alone in the
"sha256 of the file alone" row; an official name's download recorded its sha256, so it is not hashed again.

    python benchmarks/bench_conversion.py               # ViT-B/16, 3 rounds, without and with verification
    python benchmarks/bench_conversion.py --tiny        # the tests' tiny model: seconds, measures nothing
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conversion.sources import file_sha256


B16 = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16, image_size=224, num_classes=1000)
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=37, patch_size=8, image_size=32, num_classes=10)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(source: str, output: str, verify: bool, cache_dir: str | None) -> None:
    """Child process: one conversion, measured; prints a JSON line."""
    import torch  # noqa: F401  (imported before the baseline, like every other heavy module)
    import transformers  # noqa: F401

    import hf_vit  # noqa: F401
    from conversion import convert
    from conversion.testing import write_random_npz

    # A tiny conversion first, so that lazy imports and first calls are not counted as the conversion.
    with tempfile.TemporaryDirectory() as warm:
        convert(write_random_npz(f"{warm}/tiny.npz"), f"{warm}/out", verify=verify, log=None, progress=False)
    baseline = _status_kib("VmRSS")
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    convert(source, output, verify=verify, verify_images=1, cache_dir=cache_dir, log=None, progress=False)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": _cpu_since(cpu, resource.RUSAGE_SELF),
                "rss_growth_bytes": (peak - baseline) * 1024,
            }
        )
    )


def _cpu_since(before, who) -> float:
    """User + system CPU seconds (all threads) since `before`: robust to other load on a shared machine."""
    after = resource.getrusage(who)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _run_probe(source: Path | str, output: Path, verify: bool, cache_dir: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--probe", str(source), str(output)] + (["--verify"] if verify else [])
    command += ["--cache-dir", str(cache_dir)] if cache_dir else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    shutil.rmtree(output)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _time_cp(source: Path, destination: Path) -> dict:
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["cp", str(source), str(destination)], check=True)
    seconds = time.perf_counter() - start
    destination.unlink()
    return {"seconds": seconds, "cpu_seconds": _cpu_since(cpu, resource.RUSAGE_CHILDREN)}


def _time_sha256(source: Path) -> dict:
    """The sha256 of the file alone (what the model card records for a local file): the floor of that conversion."""
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    file_sha256(source)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_since(cpu, resource.RUSAGE_SELF)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of ViT-B/16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="where the .npz and outputs go (default: a temporary folder)")
    parser.add_argument("--no-verify-run", action="store_true", help="skip the rounds with verification")
    parser.add_argument("--probe", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe, verify=args.verify, cache_dir=args.cache_dir)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-conversion-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / ("vit-tiny.npz" if args.tiny else "vit-b16-random.npz")
    if not source.exists():  # written by a child process so that its memory never counts
        sizes = TINY if args.tiny else B16
        code = f"from conversion.testing import write_random_npz; write_random_npz({str(source)!r}, **{sizes!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    size = source.stat().st_size
    source.read_bytes()  # warm the page cache for every contender alike
    # The same file as an official checkpoint already in the download cache, whose sha256 the download recorded:
    # only the zip CRCs are then checked beside the conversion, instead of CRCs + sha256 for a local file.
    cache = workdir / "cache"
    cached = cache / "imagenet21k+imagenet2012" / "ViT-B_16-224.npz"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, cached)
        cached.with_name(cached.name + ".sha256").write_text(f"{file_sha256(source)}  {cached.name}\n")

    local, official = "convert (local file)", "convert (cached official name)"
    hashing = "sha256 of the file alone"
    rows = {"cp": [], hashing: [], local: [], official: [], "convert + verify": []}
    for _ in range(args.rounds):
        rows["cp"].append(_time_cp(source, workdir / "copy.npz"))
        rows[hashing].append(_time_sha256(source))
        rows[local].append(_run_probe(source, workdir / "out", verify=False))
        rows[official].append(_run_probe("imagenet21k+imagenet2012/ViT-B_16-224", workdir / "out", False, cache))
        if not args.no_verify_run:
            rows["convert + verify"].append(_run_probe(source, workdir / "out", verify=True))

    cp_seconds = statistics.median(r["seconds"] for r in rows["cp"])
    cp_cpu = statistics.median(r["cpu_seconds"] for r in rows["cp"])
    load = os.getloadavg()[0]
    print(
        f"checkpoint: {source.name}, {size / 1e6:.1f} MB; {args.rounds} rounds, medians; {os.cpu_count()} CPUs, load {load:.1f}"
    )
    print(f"{'':30} {'wall s':>7} {'x cp':>6} {'CPU s':>7} {'x cp':>6} {'peak RSS growth MB':>19} {'x file':>7}")
    for name, runs in rows.items():
        if not runs:
            continue
        seconds = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu_seconds"] for r in runs)
        line = f"{name:30} {seconds:7.2f} {seconds / cp_seconds:6.2f} {cpu:7.2f} {cpu / max(cp_cpu, 1e-3):6.1f}"
        if "rss_growth_bytes" in runs[0]:
            growth = statistics.median(r["rss_growth_bytes"] for r in runs)
            line += f" {growth / 1e6:19.1f} {growth / size:7.2f}"
        print(line)
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
