"""`convert()`: an original ViT checkpoint -> a Hub-ready hf_vit (or stock transformers ViT) folder, verified.

Order of work, so that bad input fails before anything is written and a failure leaves nothing behind:
resolve the source -> read headers -> detect the architecture -> plan every tensor (keys and shapes checked against
the model) -> build in a temporary folder beside OUTPUT_DIR (stream tensors, config, code, preprocessor) -> verify
against the NumPy reference of the Flax model -> model card -> rename into place -> push.
"""

import dataclasses
import importlib.resources
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .checkpoint import (
    NPZ_PATCH_KERNEL,
    SEED_PATCH_WEIGHT,
    Architecture,
    NpzCheckpoint,
    detect_npz_architecture,
    detect_seed_architecture,
    open_checkpoint,
)
from .errors import ConversionError
from .keys import (
    NPZ_KEY_TABLE,
    SEED_KEY_TABLE,
    Plan,
    ScratchRing,
    plan_conversion,
    produce,
    rename_for_transformers_vit,
)
from .model_card import CardInfo, render_model_card
from .reference import SeedAsFlax, flax_vit_forward, verification_images
from .safetensors_writer import DTYPES, PRODUCED_AHEAD, write_safetensors
from .sources import Source, resolve_source


EXPORTS = ("hf_vit", "transformers-vit")
VERIFY_TOLERANCE = 1e-4  # max |logits - reference| allowed; a correct fp32 conversion is around 1e-6
IMAGENET_1K = "imagenet-1k"


def imagenet1k_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard (sorted WordNet id) order of the released heads."""
    text = importlib.resources.files("conversion").joinpath("imagenet1k_labels.txt").read_text(encoding="utf-8")
    return [line.split(" ", 1)[1] for line in text.splitlines() if line.strip()]


def _parse_size(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int | str) else list(value)
    try:
        values = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ConversionError(f"{name} must be N or (H, W) in pixels, got {value!r}.") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ConversionError(f"{name} must be N or (H, W) positive pixels, got {value!r}.")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _parse_shard_size(value: int | str) -> int:
    if isinstance(value, int) or str(value).strip().isdigit():
        return int(value)
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = value.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise ConversionError(f"max_shard_size must be bytes or like '5GB', got {value!r}.")


def _resolve_labels(labels, num_classes: int, original_head: bool) -> list[str] | None:
    """
    The class names of a `num_classes`-way head: as given (a list, a file or 'imagenet-1k'), else ImageNet-1k's for
    a checkpoint's own 1000-class head (the released fine-tunes), else None (transformers' LABEL_i).
    """
    if labels is None:
        return imagenet1k_labels() if original_head and num_classes == 1000 else None
    if isinstance(labels, str) and labels.lower() in (IMAGENET_1K, "imagenet1k", "imagenet2012"):
        names = imagenet1k_labels()
    elif isinstance(labels, str | os.PathLike):
        path = Path(labels)
        if not path.is_file():
            raise ConversionError(
                f"labels file {path} does not exist: pass one class name per line, or 'imagenet-1k'."
            )
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [str(name) for name in labels]
    if len(names) != num_classes:
        raise ConversionError(f"{len(names)} labels given for a {num_classes}-class head: give exactly {num_classes}.")
    return names


def _check_variant(variant: str | None, arch: Architecture, path) -> int | None:
    """Cross-check the detected sizes against a named variant; returns the variant's number of heads."""
    if variant is None:
        return None
    from hf_vit.configuration_hf_vit import VARIANTS, canonical_variant_name

    try:
        name = canonical_variant_name(variant)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    hidden, layers, heads, mlp, patch, _ = VARIANTS[name]
    expected = (hidden, layers, mlp, (patch, patch)) + ((heads,) if arch.num_heads else ())
    found = (arch.hidden_size, arch.num_layers, arch.mlp_dim, arch.patch_size) + (
        (arch.num_heads,) if arch.num_heads else ()
    )
    if expected != found:
        raise ConversionError(
            f"--variant {variant} means hidden {hidden}, {layers} layers, {heads} heads, MLP {mlp}, patch {patch}, but "
            f"{path} is {arch.describe()}: drop --variant or pass the matching one."
        )
    return heads


def _prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """Check OUTPUT_DIR can be (re)placed; returns the existing folder it will be created in. Touches nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"OUTPUT_DIR {output_dir} exists and is not a directory: choose another path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"OUTPUT_DIR {output_dir} is not empty: pass --overwrite to replace it.")
    parent = output_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"Cannot create OUTPUT_DIR {output_dir}: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"Cannot write OUTPUT_DIR {output_dir}: {parent} is not writable.")
    return parent


def _build_config(arch: Architecture, *, export, image_size, num_labels, id2label, hidden_act, keeps_pre_logits):
    def pair_or_int(pair):
        return pair[0] if pair[0] == pair[1] else tuple(pair)

    labels = (
        {"id2label": dict(enumerate(id2label)), "label2id": {n: i for i, n in enumerate(id2label)}}
        if id2label
        else {"num_labels": num_labels}
    )
    common = dict(
        image_size=pair_or_int(image_size),
        patch_size=pair_or_int(arch.patch_size),
        num_channels=arch.num_channels,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        intermediate_size=arch.mlp_dim,
        hidden_act=hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,  # flax.linen.LayerNorm; transformers' ViTConfig defaults to BERT's 1e-12
        qkv_bias=True,
        **labels,
    )
    if export == "transformers-vit":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTConfig(**common), ViTForImageClassification
    from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification

    representation_size = arch.representation_size if keeps_pre_logits else None
    config = VisionTransformerConfig(**common, classifier=arch.classifier, representation_size=representation_size)
    return config, VisionTransformerForImageClassification


def _meta_model(model_class, config):
    """A weightless (meta-device) instance of the target model: its keys and shapes, and its code for the folder."""
    import torch

    with torch.device("meta"):
        return model_class(config)


class _SideWork:
    """
    Threads beside the tensor stream: the source's scan (the zip's CRC-32s, and its sha256 for the model card unless
    the download recorded it), started as soon as the source is open, and the small files of the output folder.
    """

    def __init__(self, checkpoint, sha256: bool):
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="conversion")
        self._stop = threading.Event()
        self.scan = self._pool.submit(checkpoint.scan, sha256=sha256, stop=self._stop)

    def submit(self, function, *args):
        return self._pool.submit(function, *args)

    def stop(self) -> None:
        """Cut the scan short (a finished conversion has its result already) and wait until every thread is done."""
        self._stop.set()
        self._pool.shutdown(wait=True)


def _check_plan_against_model(plan: Plan, model_keys: dict[str, tuple[int, ...]], rename: Callable[[str], str]):
    planned = {rename(e.target): e.shape for e in plan.entries}
    missing = sorted(set(model_keys) - set(planned))
    extra = sorted(set(planned) - set(model_keys))
    wrong = [
        f"{k}: {planned[k]} vs {model_keys[k]}" for k in planned if k in model_keys and planned[k] != model_keys[k]
    ]
    if missing or extra or wrong:
        raise ConversionError(
            f"Key table and model disagree (missing {missing[:3]}, unexpected {extra[:3]}, shapes {wrong[:3]}): "
            "this is a bug in conversion/keys.py, please report it."
        )


def _write_support_files(directory: Path, config, meta_model, export: str, dtype: str) -> None:
    """config.json (+ auto_map and the remote-code files for hf_vit) and preprocessor_config.json."""
    from hf_vit import image_processor_for

    config.architectures = [type(meta_model).__name__]
    config.dtype = dtype
    config.save_pretrained(directory)
    if export == "hf_vit":
        from transformers.dynamic_module_utils import custom_object_save

        # modeling_hf_vit.py (configuration_hf_vit.py is there)
        custom_object_save(meta_model, directory, config=config)
    image_processor_for(config).save_pretrained(directory)


def verify_folder(
    folder: Path,
    model_class,
    checkpoint,
    arch: Architecture,
    *,
    image_size: tuple[int, int],
    gelu: str,
    use_pre_logits: bool,
    new_head_classes: int | None,
    dtype: str,
    num_images: int = 2,
    tolerance: float = VERIFY_TOLERANCE,
) -> dict:
    """
    Load `folder` strictly and compare its head input and logits with the NumPy reference of the Flax model.

    The model runs in float32; for bfloat16/float16 folders the reference rounds its parameters the same way, so the
    same tolerance applies. Returns the max abs differences and `passed` (all within `tolerance`); raises
    ConversionError only if the folder does not load strictly.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per conversion is noise
    try:
        model, info = model_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ConversionError(f"The converted folder does not load strictly: {problems}.")
    model.eval()
    head = model.classifier if hasattr(model, "classifier") else model.head
    captured = {}
    hook = head.register_forward_pre_hook(lambda module, inputs: captured.__setitem__("features", inputs[0]))
    images = verification_images(num_images, *image_size, channels=arch.num_channels)
    with torch.inference_mode():
        logits = model(pixel_values=torch.from_numpy(images)).logits.double().numpy()
    hook.remove()
    features = captured["features"].double().numpy()
    del model

    params = checkpoint if isinstance(checkpoint, NpzCheckpoint) else SeedAsFlax(checkpoint, arch.num_heads)
    reference_features, reference_logits = flax_vit_forward(
        params,
        arch,
        images,
        gelu=gelu,
        use_pre_logits=use_pre_logits,
        new_head_classes=new_head_classes,
        dtype=dtype,
    )
    result = {
        "max_abs_diff_logits": float(np.abs(logits - reference_logits).max()),
        "max_abs_diff_features": float(np.abs(features - reference_features).max()),
        "num_images": num_images,
        "image_size": tuple(image_size),
        "tolerance": tolerance,
    }
    result["max_abs_diff"] = max(result["max_abs_diff_logits"], result["max_abs_diff_features"])
    result["passed"] = bool(result["max_abs_diff"] <= tolerance)
    return result


def _verification_line(result: dict, dtype: str, gelu: str) -> str:
    height, width = result["image_size"]
    weights = "" if dtype == "float32" else f" with the weights rounded to {dtype} on both sides"
    what = "tanh-GELU Flax model" if gelu == "tanh" else "seed model (exact GELU)"
    return (
        f"Max abs difference to an independent NumPy implementation of the original {what}, computed straight "
        f"from the checkpoint, on {result['num_images']} random {height}x{width} inputs in float32{weights}: "
        f"logits {result['max_abs_diff_logits']:.2e}, head input {result['max_abs_diff_features']:.2e} "
        f"(tolerance {result['tolerance']:.0e})."
    )


def convert(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    variant: str | None = None,
    image_size: int | Sequence[int] | None = None,
    num_labels: int | None = None,
    labels: Sequence[str] | str | os.PathLike | None = None,
    keep_pre_logits: bool = False,
    dtype: str = "float32",
    export: str = "hf_vit",
    verify: bool = True,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    source_image_size: int | Sequence[int] | None = None,
    num_heads: int | None = None,
    verify_images: int = 2,
    max_shard_size: int | str = "5GB",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """
    Convert an original ViT checkpoint into a folder that `from_pretrained` loads, with the original's logits.

    Args:
        source: a vit_jax `.npz`, a seed repo `*_checkpoint.bin` (needs `variant`), or an official name
            (`"ViT-B_16"`, `"imagenet21k+imagenet2012/ViT-B_16-224"`, an augreg file name) to download.
        output_dir: the folder to create; it must not exist or be empty, unless `overwrite`.
        variant: e.g. `"ViT-B_16"`; cross-checks the detected architecture (required for a `.bin`: it has no heads).
        image_size: N or (H, W): resample the position embeddings as vit_jax does (cls row kept, linear zoom).
        num_labels: replace the head by a new zero-initialised `num_labels`-way one and drop pre_logits.
        labels: class names (a list, a file with one per line, or `"imagenet-1k"`) stored as `id2label`.
        keep_pre_logits: keep the pre_logits layer when `num_labels` replaces the head.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` for the saved weights.
        export: `"hf_vit"`, or `"transformers-vit"` for stock `transformers.ViTForImageClassification`.
        verify: compare with the NumPy reference of the Flax model and fail above 1e-4 (float32 compute).
        overwrite: replace a non-empty `output_dir` (only once the new folder is complete).
        push_to_hub: a repo id to create and upload to once verification passed; `private`, `revision` (a branch).
        source_image_size: the pre-training resolution when the position embeddings are not a square grid.
        num_heads: the number of attention heads of a seed `.bin` whose sizes match no named variant.
        verify_images: how many random inputs verification uses.
        max_shard_size: shard `model.safetensors` above this size (bytes or "5GB").
        log: where progress lines go (`None` for silence).

    Returns the output folder. Raises `ConversionError` (a `ValueError`) with a one-line message on bad input.

    Example:

    ```python
    >>> import tempfile
    >>> from conversion import convert
    >>> from conversion.testing import write_random_npz
    >>> work = tempfile.mkdtemp()
    >>> npz = write_random_npz(f"{work}/tiny.npz", num_classes=5)
    >>> folder = convert(npz, f"{work}/tiny-hf", num_labels=3, labels=["cat", "dog", "bird"], log=None)
    >>> sorted(p.name for p in folder.iterdir())[:3]
    ['README.md', 'config.json', 'configuration_hf_vit.py']
    ```
    """
    say = log or (lambda line: None)
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if export not in EXPORTS:
        raise ConversionError(f"export must be one of {', '.join(EXPORTS)}, got {export!r}.")
    if num_labels is not None and (isinstance(num_labels, bool) or int(num_labels) <= 0):
        raise ConversionError(f"num_labels must be a positive integer, got {num_labels!r}.")
    if push_to_hub and not verify:
        raise ConversionError("--push-to-hub uploads only verified conversions: drop --no-verify.")
    if verify_images < 1:
        raise ConversionError(f"verify_images must be at least 1, got {verify_images}.")
    target_size = _parse_size(image_size, "image_size")
    shard_bytes = _parse_shard_size(max_shard_size)
    output_dir = Path(output_dir).expanduser().absolute()
    parent = _prepare_output(output_dir, overwrite)

    resolved: Source = resolve_source(source, cache=Path(cache_dir) if cache_dir else None, progress=progress)
    checkpoint = open_checkpoint(resolved.path)
    side = _SideWork(checkpoint, sha256=resolved.sha256 is None)
    try:
        return _convert_checkpoint(
            checkpoint,
            side,
            resolved,
            output_dir,
            parent,
            variant=variant,
            num_heads=num_heads,
            target_size=target_size,
            num_labels=None if num_labels is None else int(num_labels),
            labels=labels,
            keep_pre_logits=keep_pre_logits,
            dtype=dtype,
            export=export,
            verify=verify,
            overwrite=overwrite,
            push_to_hub=push_to_hub,
            private=private,
            revision=revision,
            source_grid_size=_parse_size(source_image_size, "source_image_size"),
            verify_images=verify_images,
            shard_bytes=shard_bytes,
            say=say,
            started=started,
        )
    finally:
        side.stop()
        checkpoint.close()


def _convert_checkpoint(
    checkpoint,
    side: _SideWork,
    resolved: Source,
    output_dir: Path,
    parent: Path,
    *,
    variant,
    num_heads,
    target_size,
    num_labels,
    labels,
    keep_pre_logits,
    dtype,
    export,
    verify,
    overwrite,
    push_to_hub,
    private,
    revision,
    source_grid_size,
    verify_images,
    shard_bytes,
    say,
    started,
) -> Path:
    # 1. The architecture, from the tensors.
    is_seed = checkpoint.kind == "seed"
    source_grid = candidate_grid = None  # pixel sizes -> patch grids, once the patch size is known
    patch_key = SEED_PATCH_WEIGHT if is_seed else NPZ_PATCH_KERNEL
    if patch_key in checkpoint.keys() and len(checkpoint.shape(patch_key)) == 4:
        shape = checkpoint.shape(patch_key)
        patch = shape[2:] if is_seed else shape[:2]
        if source_grid_size is not None:
            source_grid = (source_grid_size[0] // patch[0], source_grid_size[1] // patch[1])
        if target_size is not None:
            candidate_grid = (target_size[0] // patch[0], target_size[1] // patch[1])
    if is_seed:
        if variant is None and num_heads is None:
            raise ConversionError(
                f"{resolved.path} is a seed *_checkpoint.bin, which carries no config: pass --variant (e.g. ViT-B_16)."
            )
        arch = detect_seed_architecture(checkpoint, None, source_grid, candidate_grid)
        heads = _check_variant(variant, arch, resolved.path) or num_heads
        if num_heads is not None and heads != num_heads:
            raise ConversionError(f"--num-heads {num_heads} contradicts --variant {variant}, which has {heads} heads.")
        if arch.hidden_size % heads:
            raise ConversionError(
                f"hidden size {arch.hidden_size} is not divisible by {heads} heads: check --num-heads."
            )
        arch = dataclasses.replace(arch, num_heads=heads)
    else:
        arch = detect_npz_architecture(checkpoint, source_grid, candidate_grid)
        _check_variant(variant, arch, resolved.path)
        if num_heads is not None and num_heads != arch.num_heads:
            raise ConversionError(
                f"--num-heads {num_heads} contradicts the checkpoint, which has {arch.num_heads} heads."
            )
    say(f"{resolved.name}: {arch.describe()}")

    # 2. Output geometry, labels and the target config.
    target_size = target_size or arch.image_size
    if target_size[0] % arch.patch_size[0] or target_size[1] % arch.patch_size[1]:
        raise ConversionError(
            f"image_size {target_size[0]}x{target_size[1]} is not a multiple of the patch size "
            f"{arch.patch_size[0]}x{arch.patch_size[1]}: choose e.g. "
            f"{(target_size[0] // arch.patch_size[0] or 1) * arch.patch_size[0]}."
        )
    target_grid = (target_size[0] // arch.patch_size[0], target_size[1] // arch.patch_size[1])
    classes = num_labels if num_labels is not None else arch.num_classes
    id2label = _resolve_labels(labels, classes, original_head=num_labels is None)
    keeps_pre_logits = bool(arch.representation_size) and (num_labels is None or keep_pre_logits)
    if export == "transformers-vit":
        if arch.classifier != "token":
            raise ConversionError(
                "--export transformers-vit: stock ViTForImageClassification pools the class token, but this checkpoint "
                "uses the 'gap' classifier: export hf_vit instead (the default)."
            )
        if keeps_pre_logits:
            raise ConversionError(
                "--export transformers-vit: stock ViTForImageClassification has no pre_logits layer, which this "
                "checkpoint has: pass --num-labels N to replace the head (pre_logits is then dropped), or export hf_vit."
            )
    hidden_act = "gelu" if is_seed else "gelu_pytorch_tanh"
    try:
        config, model_class = _build_config(
            arch,
            export=export,
            image_size=target_size,
            num_labels=classes,
            id2label=id2label,
            hidden_act=hidden_act,
            keeps_pre_logits=keeps_pre_logits,
        )
    except ValueError as error:
        raise ConversionError(f"Cannot build a config for {arch.describe()}: {error}") from None

    # 3. Every tensor planned and checked against the model before anything is written.
    table = SEED_KEY_TABLE if is_seed else NPZ_KEY_TABLE
    plan = plan_conversion(
        checkpoint, table, arch, target_grid=target_grid, num_labels=num_labels, keep_pre_logits=keep_pre_logits
    )
    rename = rename_for_transformers_vit if export == "transformers-vit" else (lambda key: key)
    meta_model = _meta_model(model_class, config)
    _check_plan_against_model(plan, {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}, rename)
    if plan.dropped:
        say(f"dropped (replaced by a new {classes}-class head): {', '.join(plan.dropped)}")
    if target_grid != arch.grid:
        say(
            f"position embeddings resampled from a {arch.grid[0]}x{arch.grid[1]} to a {target_grid[0]}x{target_grid[1]} grid"
        )
    # 4. Build in a temporary folder next to OUTPUT_DIR; only a complete, verified folder gets renamed into place.
    created_parents = _missing_parents(output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    except OSError as error:
        _remove_created(created_parents)
        raise ConversionError(f"Cannot create OUTPUT_DIR {output_dir}: {error.strerror or error}.") from None
    try:
        import torch

        support_files = side.submit(_write_support_files, temporary, config, meta_model, export, dtype)
        entries = {rename(e.target): e for e in plan.entries}
        threads = torch.get_num_threads()
        # The transposes are memory-bound: one thread is as fast, and leaves a core to the scan.
        torch.set_num_threads(1)
        try:
            scratch = ScratchRing(slots=PRODUCED_AHEAD + 2)  # more than write_safetensors keeps alive
            files = write_safetensors(
                temporary,
                [(name, entry.shape) for name, entry in entries.items()],
                lambda name: produce(checkpoint, entries[name], plan.context, scratch),
                dtype=dtype,
                max_shard_bytes=shard_bytes,
            )
        finally:
            torch.set_num_threads(threads)
        support_files.result()
        sha256 = side.scan.result() or resolved.sha256  # raises if a CRC-32 did not match
        num_parameters = sum(math.prod(e.shape) for e in plan.entries)
        say(
            f"wrote {', '.join(files)}: {num_parameters:,} parameters in {dtype} ({time.perf_counter() - started:.1f} s)"
        )

        verification = None
        if verify:
            result = verify_folder(
                temporary,
                model_class,
                checkpoint,
                arch,
                image_size=target_size,
                gelu="exact" if is_seed else "tanh",
                use_pre_logits=keeps_pre_logits,
                new_head_classes=num_labels,
                dtype=dtype,
                num_images=verify_images,
            )
            verification = _verification_line(result, dtype, "exact" if is_seed else "tanh")
            say(f"verification: max abs diff {result['max_abs_diff']:.2e} (tolerance {VERIFY_TOLERANCE:.0e})")
            if not result["passed"]:
                raise ConversionError(
                    f"Verification failed: max abs difference {result['max_abs_diff']:.2e} to the NumPy reference of "
                    f"the Flax model exceeds {VERIFY_TOLERANCE:.0e}; nothing was written."
                )

        datasets = _datasets(resolved, arch, num_labels)
        card = CardInfo(
            title=_title(resolved, arch, target_size, num_labels),
            source_name=resolved.name,
            source_url=resolved.url,
            source_sha256=sha256,
            export=export,
            architecture=arch.describe() if num_labels is None else _describe_new(arch, classes, keeps_pre_logits),
            image_size=target_size,
            source_image_size=arch.image_size,
            num_parameters=num_parameters,
            num_labels=classes,
            new_head=num_labels is not None,
            pre_logits=("kept" if keeps_pre_logits else "dropped") if arch.representation_size else "none",
            dtype=dtype,
            hidden_act=hidden_act,
            datasets=datasets,
            augreg=resolved.augreg,
            verification=verification,
            seed_checkpoint=is_seed,
            repo_id=push_to_hub or output_dir.name,
        )
        (temporary / "README.md").write_text(render_model_card(card), encoding="utf-8")
        _move_into_place(temporary, output_dir, overwrite)
    except BaseException as error:
        side.stop()  # the support files go into the temporary folder: let them finish before it is removed
        shutil.rmtree(temporary, ignore_errors=True)
        _remove_created(created_parents)
        if isinstance(error, OSError):  # disk full, permissions...: the user's problem, told in one line
            raise ConversionError(
                f"Writing {output_dir} failed: {error.strerror or error}; nothing was written."
            ) from None
        raise
    say(f"saved {output_dir} ({time.perf_counter() - started:.1f} s)")

    if push_to_hub:
        from .hub import push_folder

        url = push_folder(output_dir, push_to_hub, private=private, revision=revision)
        say(f"pushed to {push_to_hub}: {url}")
    return output_dir


def _missing_parents(output_dir: Path) -> list[Path]:
    missing, parent = [], output_dir.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return list(reversed(missing))  # outermost first


def _remove_created(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            break


def _move_into_place(temporary: Path, output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists():
        if any(output_dir.iterdir()) and not overwrite:  # appeared while converting
            raise ConversionError(f"OUTPUT_DIR {output_dir} is not empty: pass --overwrite to replace it.")
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        old.rmdir()
        output_dir.rename(old)
        try:
            temporary.rename(output_dir)
        except BaseException:
            old.rename(output_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(output_dir)


def _describe_new(arch: Architecture, classes: int, keeps_pre_logits: bool) -> str:
    text = arch.describe().replace(f"{arch.num_classes} classes", f"{classes} classes (new head)")
    if arch.representation_size and not keeps_pre_logits:
        text = text.replace(f", pre_logits {arch.representation_size}", "")
    return text


def _datasets(resolved: Source, arch: Architecture, num_labels: int | None) -> list[str]:
    if resolved.augreg:
        found = [resolved.augreg["pretrain_dataset"], resolved.augreg.get("finetune_dataset")]
        return list(dict.fromkeys(d for d in found if d))
    if resolved.collection == "imagenet21k":
        return ["imagenet-21k"]
    if resolved.collection == "imagenet21k+imagenet2012":
        return ["imagenet-21k", "imagenet-1k"]
    return ["imagenet-1k"] if arch.num_classes == 1000 and num_labels is None else []


def _title(resolved: Source, arch: Architecture, size: tuple[int, int], num_labels: int | None) -> str:
    resolution = str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"
    name = Path(resolved.name).name.removesuffix(".npz").removesuffix(".bin")
    return f"{name} ({resolution} px" + (f", new {num_labels}-class head)" if num_labels is not None else ")")


__all__ = ["EXPORTS", "VERIFY_TOLERANCE", "convert", "imagenet1k_labels", "verify_folder"]
