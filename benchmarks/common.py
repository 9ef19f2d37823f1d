"""Shared pieces of the benchmarks: both models with the same weights, the matmul peak, interleaved timing, tables.

hf_vit is measured against `transformers.ViTForImageClassification` built from the same sizes, the same
LayerNorm epsilon and the same (tanh) GELU, holding the same weights. Timings interleave every contender in one
process, round after round, because the CPU is shared and its speed drifts: each round keeps the fastest call of each
contender, a row reports the median over rounds, and ratios are the median of the per-round ratios (paired).

Run as a script, this file is the peak-memory probe the benchmarks start in a fresh process per measurement.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

import hf_vit
from conversion.keys import rename_for_transformers_vit
from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda")
OURS, THEIRS = "hf_vit", "transformers"

# The tests' tiny shape (hidden 32, 2 layers, 4 heads, MLP 37): runs in seconds, measures nothing.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=8)


def our_config(tiny: bool = False, image_size: int = 224, num_labels: int = 1000) -> VisionTransformerConfig:
    """ViT-B/16 (or the tiny test shape) with the original semantics: LayerNorm eps 1e-6, tanh GELU."""
    sizes = TINY if tiny else {}
    return VisionTransformerConfig(image_size=image_size, num_labels=num_labels, **sizes)


def their_config(config: VisionTransformerConfig) -> ViTConfig:
    """The same model as a transformers `ViTConfig` (whose own defaults, eps 1e-12 and exact GELU, would differ)."""
    return ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=config.num_labels,
    )


def to_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an hf_vit classifier state dict to `ViTForImageClassification` keys (the converter's own key map)."""
    return {rename_for_transformers_vit(key): value for key, value in state_dict.items()}


def build_models(
    config: VisionTransformerConfig, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.nn.Module]:
    """Both models in `dtype` on `device`, holding the same random weights (loaded strictly, so every key is mapped)."""
    torch.manual_seed(seed)
    ours = VisionTransformerForImageClassification(config)
    with torch.no_grad():  # fresh models have a zero head and class token: random ones make the parity check real
        for parameter in ours.parameters():
            parameter.normal_(0.0, 0.02)
    theirs = ViTForImageClassification(their_config(config))
    theirs.load_state_dict(to_transformers_state_dict(ours.state_dict()), strict=True)
    return {OURS: ours.to(device=device, dtype=dtype), THEIRS: theirs.to(device=device, dtype=dtype)}


def max_logit_difference(models: dict[str, torch.nn.Module], pixel_values: torch.Tensor) -> float:
    """Largest |logit difference| between the two models on the same input: a wrong weight mapping shows here."""
    with torch.inference_mode():
        logits = [model(pixel_values).logits.float() for model in models.values()]
    return (logits[0] - logits[1]).abs().max().item()


def forward_flops(config: VisionTransformerConfig, image_size: int | None = None, attention: bool = True) -> float:
    """
    Analytic FLOPs (2 per multiply-add) of one image's forward: 35.13e9 for ViT-B/16 at 224; `attention=False` leaves
    out the products inside attention (q k^T, probabilities @ v), leaving what the linears and the patch convolution do.
    """
    image_size = image_size or config.image_size
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    num_patches = (image_size // patch) ** 2
    tokens = num_patches + (1 if config.classifier == "token" else 0)
    hidden, mlp = config.hidden_size, config.intermediate_size
    embedding = 2 * num_patches * config.num_channels * patch * patch * hidden
    per_layer = (
        2 * tokens * hidden * 3 * hidden  # query, key, value
        + (2 * 2 * tokens * tokens * hidden if attention else 0)  # q k^T and probabilities @ v
        + 2 * tokens * hidden * hidden  # out
        + 2 * 2 * tokens * hidden * mlp  # fc1, fc2
    )
    head_in = config.representation_size or hidden
    head = 2 * hidden * (config.representation_size or 0) + 2 * head_in * config.num_labels
    return embedding + config.num_hidden_layers * per_layer + head


def synchronize(device: str) -> None:
    """Wait for the queued GPU work, so that a timer read after it counts it (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def _gemm_candidates(inputs: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[[], object]]:
    """`inputs @ weight.T` through every GEMM the installed torch offers on CPU (oneDNN's are private ops)."""
    if inputs.dtype == torch.int8:  # int8 x int8 -> int32 (oneDNN: VNNI or AMX-INT8), the peak of int8 contenders
        return {"ATen _int_mm": lambda: torch._int_mm(inputs, weight.t())}
    candidates = {
        "ATen matmul": lambda: torch.matmul(inputs, weight.t()),  # MKL's sgemm for fp32 where torch has MKL
        "ATen linear": lambda: torch.nn.functional.linear(inputs, weight),
    }
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")):
        return candidates
    candidates["oneDNN linear"] = lambda: mkldnn._linear_pointwise(inputs, weight, None, "none", [], "")
    try:  # the pre-packed weights inductor's freezing uses; bf16 needs AVX-512 (or AVX-NE-CONVERT) here
        packed = mkldnn._reorder_linear_weight(weight, inputs.shape[0])
        candidates["oneDNN packed"] = lambda: mkldnn._linear_pointwise(inputs, packed, None, "none", [], "")
        dense_inputs, dense_weight = inputs.to_mkldnn(), weight.to_mkldnn()
        candidates["oneDNN mkldnn tensors"] = lambda: torch._C._nn.mkldnn_linear(dense_inputs, dense_weight, None)
    except RuntimeError:
        pass
    return candidates


def gemm_peaks(dtype: torch.dtype, tiny: bool = False, repeats: int = 7, device: str = "cpu") -> dict[str, float]:
    """
    Best GFLOP/s of each GEMM torch offers in `dtype` (ATen/MKL and oneDNN on CPU, `F.linear` on a GPU): on CPU on the
    ViT-B MLP matmuls (batch 8 at 224), on a GPU an 8192-cube product (ViT-B's own matmuls are too small to reach a
    GPU's dense peak). A GEMM this CPU cannot run in `dtype` (oneDNN bf16 without AVX512-BF16) is left out. `torch.int8`
    gives the int8 peak (`torch._int_mm`, GOP/s), the roofline of int8-quantized contenders.
    """
    if tiny:
        rows, hidden, mlp = 64, 64, 128
    else:
        rows, hidden, mlp = (8 * 197, 768, 3072) if device == "cpu" else (8192, 8192, 8192)
    best: dict[str, float] = {}
    with torch.inference_mode():
        for fan_in, fan_out in ((hidden, mlp), (mlp, hidden)):
            if dtype == torch.int8:
                inputs = torch.randint(-128, 128, (rows, fan_in), dtype=dtype, device=device)
                weight = torch.randint(-128, 128, (fan_out, fan_in), dtype=dtype, device=device)
            else:
                inputs = torch.randn(rows, fan_in, dtype=dtype, device=device)
                weight = torch.randn(fan_out, fan_in, dtype=dtype, device=device)
            if device == "cpu":
                candidates = _gemm_candidates(inputs, weight)
            else:
                candidates = {"F.linear": lambda: torch.nn.functional.linear(inputs, weight)}  # noqa: B023
            for name, gemm in candidates.items():
                try:
                    for _ in range(2):
                        gemm()
                except RuntimeError:  # e.g. "could not create a primitive descriptor": not on this CPU
                    continue
                for _ in range(repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    gemm()
                    synchronize(device)
                    gflops = 2 * rows * fan_in * fan_out / (time.perf_counter() - start) / 1e9
                    best[name] = max(best.get(name, 0.0), gflops)
    return best


def merge_peaks(old: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Each GEMM's best of two measurements."""
    return {name: max(old.get(name, 0.0), new.get(name, 0.0)) for name in {**old, **new}}


def peak_text(peaks: dict[str, dict[str, float]]) -> str:
    """'fp32 166 GFLOP/s (oneDNN packed; ATen matmul 155, ...)': the roofline of each dtype and what it came from."""
    parts = []
    for dtype, gemms in peaks.items():
        fastest = max(gemms, key=gemms.get)
        others = ", ".join(f"{name} {gflops:.0f}" for name, gflops in gemms.items() if name != fastest)
        unit = "GOP/s" if dtype == "int8" else "GFLOP/s"
        parts.append(f"{dtype} {gemms[fastest]:.0f} {unit} ({fastest}" + (f"; {others})" if others else ")"))
    return "; ".join(parts)


def interleaved(
    contenders: dict[str, Callable[[], object]], rounds: int, calls: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each contender: per round the fastest of `calls` calls; the order rotates every round."""
    seconds = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            best = float("inf")
            for _ in range(calls):
                synchronize(device)
                start = time.perf_counter()
                contenders[name]()
                synchronize(device)
                best = min(best, time.perf_counter() - start)
            seconds[name].append(best)
    return seconds


def paired_ratio(slower: list[float], faster: list[float]) -> float:
    """Median over rounds of time(slower) / time(faster): > 1 means `faster` wins."""
    return statistics.median(s / f for s, f in zip(slower, faster, strict=True))


def warm(function: Callable[[], object], device: str = "cpu") -> tuple[float, float]:
    """Call `function` twice (compiling it if it is compiled): the seconds of the first and of the second call."""
    seconds = []
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def calls_per_round(seconds_per_call: float, requested: int | None, target: float = 1.0) -> int:
    """`requested`, or enough calls for about `target` seconds per contender and round (1 to 10)."""
    return requested or max(1, min(10, round(target / seconds_per_call)))


def top_ops(function: Callable[[], object], row_limit: int = 12, device: str = "cpu") -> str:
    """torch.profiler's table of the operators `function` spends its time in, by self CPU (or GPU) time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        function()
        synchronize(device)
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=row_limit)


# What the profiler calls the GEMMs of a forward outside attention: the linears (oneDNN's, with the GELU where it is
# fused into them, or ATen's addmm/mm/bmm) and the patch convolution. Everything else - attention (its products are 4 %
# of ViT-B's FLOPs, its softmax is the cost), LayerNorm, residual adds, copies - is "outside the GEMMs".
GEMM_OPS = frozenset({"mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution"})


def gemm_bound(function: Callable[[], object], flops: float, gemm_flops: float, peak: float) -> dict[str, float]:
    """
    Profile one CPU call of `function` (a forward of `flops`, `gemm_flops` of them in `GEMM_OPS`): the share of its
    operator time spent outside the GEMMs, and the share of the roofline (`peak` FLOP/s) the forward would reach if
    its GEMMs ran at the peak while the rest took what it took - what a faster GEMM alone could give.
    """
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) / 1e6
    outside = total - sum(event.self_cpu_time_total for event in events if event.key in GEMM_OPS) / 1e6
    return {
        "% outside GEMMs": 100 * outside / total,
        "% ceiling": 100 * (flops / peak) / (gemm_flops / peak + outside),
    }


def machine(device: str = "cpu") -> dict[str, object]:
    """What a result needs to be read against: date, CPU (and GPU), threads, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next(line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags"))
        isa = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    except (OSError, StopIteration):
        isa = []
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes on the same cores slow every contender
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_vit": getattr(hf_vit, "__version__", "dev"),
        "python": platform.python_version(),
    }


def compare(
    seconds: dict[str, list[float]], batch: int, roofline: float, rooflines: dict[str, float] | None = None
) -> dict[str, object]:
    """
    img/s and share of the roofline (img/s) of every contender, the faster run of each side, paired ratios:
    `roofline` is the models' dtype's, `rooflines` overrides it for a contender computing in another (int8).
    """
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    rooflines = {name: roofline for name in seconds} | (rooflines or {})
    best_theirs = min((name for name in seconds if name.startswith(THEIRS)), key=medians.get)
    best_ours = min((name for name in seconds if name.startswith(OURS)), key=medians.get)
    return {
        **{f"{name} img/s": batch / medians[name] for name in seconds},
        **{f"{name} % roofline": 100 * batch / medians[name] / rooflines[name] for name in seconds},
        "transformers best": best_theirs.split(" ", 1)[1],
        "hf_vit best": best_ours.split(" ", 1)[1],
        "ratio eager": paired_ratio(seconds[f"{THEIRS} eager"], seconds[f"{OURS} eager"]),
        "ratio best": paired_ratio(seconds[best_theirs], seconds[best_ours]),
        "roofline img/s": roofline,
        "hf_vit % roofline": 100 * batch / medians[best_ours] / roofline,
        "transformers % roofline": 100 * batch / medians[best_theirs] / roofline,
    }


def comparison_columns(compiled: bool, extra: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """The table columns of `compare`'s rows: each contender's img/s, the ratios, the roofline shares."""
    names = [f"{THEIRS} eager"] + ([f"{THEIRS} compile"] if compiled else []) + [f"{OURS} eager"]
    names += [f"{OURS} compile"] if compiled else []
    names += list(extra)
    return (
        [(f"{name} img/s", f"{name} img/s", "{:.2f}") for name in names]
        + [
            ("ratio eager", "eager / eager", "{:.2f}x"),
            ("ratio best", "best / best", "{:.2f}x"),
            ("hf_vit % roofline", "hf_vit % roofline", "{:.0f}%"),
            ("transformers % roofline", "transformers % roofline", "{:.0f}%"),
        ]
        + [(f"{name} % roofline", f"{name} % roofline", "{:.0f}%") for name in extra]
    )


def memory_lines(memory: list[dict[str, object]], key_columns: list[tuple[str, str, str]], title: str) -> list[str]:
    """The peak-memory table (one `<contender> MiB` column each) under `title`, or nothing without measurements."""
    if not memory:
        return []
    names = [key[: -len(" MiB")] for key in memory[0] if key.endswith(" MiB")]
    columns = key_columns + [(f"{name} MiB", f"{name} MiB", "{:.0f}") for name in names]
    return ["", title, "", format_table(memory, columns)]


def format_table(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of `rows` with (key, header, format) columns; missing values print as '-'."""
    header = [title for _, title, _ in columns]
    lines = [[(fmt.format(row[key]) if row.get(key) is not None else "-") for key, _, fmt in columns] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=False)]
    out = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    out += [
        "| " + " | ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) + " |" for line in lines
    ]
    return "\n".join(out)


def add_common_arguments(parser: argparse.ArgumentParser, compile_default: bool) -> None:
    parser.add_argument(
        "--tiny", action="store_true", help="the tests' tiny model: checks the script, measures nothing"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (median over rounds)")
    parser.add_argument(
        "--calls", type=int, default=None, help="calls per contender per round, fastest kept (default: ~1 s worth)"
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the models run (default: cpu)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=compile_default,
        help=f"time the torch.compile contenders too; compiling takes minutes (default: {compile_default})",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--profile", action="store_true", help="print the top operators of each contender too")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse `--device cuda` in one line (exit code 2) where torch sees no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); use --device cpu"
        )


def hardware(meta: dict[str, object]) -> str:
    """'GPU name' on a GPU, else 'CPU (N threads'...: the start of a table's caption."""
    return f"{meta['gpu']} (host {meta['cpu']}" if meta.get("gpu") else f"{meta['cpu']} ({meta['threads']} threads"


def write_json(path: str | None, payload: dict[str, object]) -> None:
    if path == "-":
        print(json.dumps(payload, indent=2))
    elif path:
        with open(path, "w") as file:
            json.dump(payload, file, indent=2)


# ---- peak memory -------------------------------------------------------------------------------------------------
# CPU tensors have no allocator statistics, so the probe reads the kernel's high-water mark of resident memory
# (VmHWM), reset through /proc/self/clear_refs just before the measured calls, in a fresh process per contender:
# in one process, memory the first model's run freed but kept would make the second one look smaller.


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(field + ":"))


def peak_memory_mib(spec: dict[str, object]) -> dict[str, float] | None:
    """
    Run the probe for `spec` in a fresh process: {'peak': peak, 'above_weights': peak - before}, MiB: resident memory on
    CPU, the caching allocator's allocated bytes on a GPU (`spec["device"]`).
    """
    if spec.get("device", "cpu") == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        return None
    command = [sys.executable, os.path.abspath(__file__), json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 2))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(f"memory probe failed for {spec}:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(spec: dict[str, object]) -> dict[str, float]:
    """Build one contender as the benchmarks do, then measure the high-water mark of its first three calls.

    The first calls count: after them the allocator keeps the freed memory resident, so later calls would show none.
    A compiled contender is warmed up first (compiling takes far more memory than running), then the memory compiling
    freed is handed back to the system, so that its calls allocate theirs anew as the eager contenders' do.
    """
    import importlib  # noqa: PLC0415 - the probe runs as a script next to the benchmarks

    torch.set_num_threads(int(spec.get("threads", 2)))
    step = importlib.import_module(f"bench_{spec['kind']}").make_step(spec)
    if spec["run"].endswith("compile"):
        warm(step, spec.get("device", "cpu"))
        libc = ctypes.CDLL(ctypes.util.find_library("c")) if spec.get("device", "cpu") == "cpu" else None
        if hasattr(libc, "malloc_trim"):  # glibc
            libc.malloc_trim(0)  # give back what compiling freed: the calls would reuse it and show 0 MiB
    if spec.get("device", "cpu") == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak": peak / 2**20, "above_weights": (peak - before) / 2**20}
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current resident size
    for _ in range(3):
        step()
    peak = _status_kib("VmHWM")
    return {"peak": peak / 1024, "above_weights": (peak - before) / 1024}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
