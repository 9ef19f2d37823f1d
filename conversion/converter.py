"""`convert()`: an original ViT checkpoint -> a Hub-ready hf_vit (or stock transformers ViT) folder, verified.

The pipeline, one function per step: resolve the source -> open the checkpoint -> find its family and detect the
architecture -> decide the target (size, head, labels, config) -> plan every tensor with the family's key table ->
build the state dict -> load it strictly into the model -> save (`save_pretrained`) into a temporary folder beside
OUTPUT_DIR -> verify against the NumPy reference -> model card -> rename into place -> push. Bad input fails before
anything is written, and a failure leaves nothing behind.
"""

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .checkpoint import Architecture, open_checkpoint
from .errors import ConversionError
from .families import Family, find_family
from .keys import Plan, plan_conversion, produce, rename_for_transformers_vit, rename_for_transformers_vit_model
from .labels import resolve_labels
from .model_card import CardInfo, render_model_card
from .output_folder import building, check_output_dir, move_into_place
from .reference import flax_vit_forward
from .sources import Source, file_sha256, resolve_source


EXPORTS = ("hf_vit", "transformers-vit")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Options:
    """What `convert()` and `hf-vit-convert` accept (see `convert` for each)."""

    variant: str | None = None
    image_size: int | Sequence[int] | None = None
    source_image_size: int | Sequence[int] | None = None
    num_heads: int | None = None
    num_labels: int | None = None
    labels: Sequence[str] | str | os.PathLike | None = None
    keep_pre_logits: bool = False
    dtype: str = "float32"
    export: str = "hf_vit"
    verify: bool = True
    verify_images: int = 2
    overwrite: bool = False
    onnx: bool = False
    onnx_quantize: bool = False
    max_shard_size: int | str = "5GB"
    cache_dir: str | os.PathLike | None = None
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    progress: bool = True
    log: Callable[[str], None] | None = print


@dataclasses.dataclass(frozen=True)
class Target:
    """What the converted folder will be."""

    image_size: tuple[int, int]
    grid: tuple[int, int]
    new_head: int | None  # None: the checkpoint's head; 0: none (feature extractor); N: a new zero N-way head
    keep_pre_logits: bool
    num_labels: int
    config: object
    model_class: type
    rename: Callable[[str], str]

    @property
    def feature_extractor(self) -> bool:
        return self.new_head == 0

    @property
    def stock_vit_model(self) -> bool:
        """transformers' ViTModel: a transformers-vit feature extractor with pre_logits (as its pooler)."""
        return self.model_class.__name__ == "ViTModel"


def convert(source: str | os.PathLike, output_dir: str | os.PathLike, **options) -> Path:
    """
    Convert an original ViT checkpoint into a folder that `from_pretrained` loads, with the original's logits.

    Args:
        source: a vit_jax or big_vision `.npz`, a vit_jax training checkpoint (`checkpoint_N`, flax msgpack: its
            params; the step goes into the model card), a seed repo `*_checkpoint.bin` (needs `variant` or
            `num_heads`), or an official name (`"ViT-B_16"`, `"R50+ViT-B_16"`, `"imagenet21k+imagenet2012/ViT-B_16-224"`, an augreg file
            name) to download. R+ViT hybrids (`.npz` or seed `.bin`) are detected from their ResNet tensors.
        output_dir: the folder to create; it must not exist or be empty, unless `overwrite`.
        variant: e.g. `"ViT-B_16"`; cross-checks the detected architecture (required for a `.bin`: it has no heads).
        image_size: N or (H, W): resample the position embeddings as vit_jax does (cls row kept, linear zoom).
        num_labels: replace the head by a new zero-initialised `num_labels`-way one and drop pre_logits. Without it, a
            checkpoint whose head is all zeros (Google's ImageNet-21k releases) becomes a feature extractor.
        labels: class names (a list, a file with one per line, `"imagenet-1k"` or `"imagenet-21k"`) for `id2label`.
        keep_pre_logits: keep the pre_logits layer when `num_labels` replaces the head.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` for the saved weights.
        export: `"hf_vit"`, or `"transformers-vit"` for stock `transformers.ViTForImageClassification` (a feature
            extractor with pre_logits: `ViTModel`, pre_logits as its pooler).
        verify: compare with the NumPy reference of the Flax model in float64 and fail if a weight is misplaced
            (`hf_vit.verification`); the saved dtype's difference to it is reported in the log and the card.
        overwrite: replace a non-empty `output_dir` (only once the new folder is complete).
        onnx: also write `onnx/model.onnx` (float32, any batch size), checked with ONNX Runtime against the PyTorch
            logits (`hf_vit.onnx_export`); `onnx_quantize`: and `onnx/model_quantized.onnx` (int8). Needs hf_vit[onnx].
        push_to_hub: a repo id to create and upload to once verification passed; `private`, `revision` (a branch).
        source_image_size: the pre-training resolution when the position embeddings are not a square grid.
        num_heads: the number of attention heads of a seed `.bin` whose sizes match no named variant.
        verify_images: how many random inputs verification uses.
        max_shard_size: shard `model.safetensors` above this size (bytes or "5GB").
        cache_dir: where official checkpoints are downloaded; `progress`: show the download's progress bar.
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
    options = Options(**options)
    say = options.log or (lambda line: None)
    started = time.perf_counter()
    check_options(options)
    output_dir = Path(output_dir).expanduser().absolute()
    check_output_dir(output_dir, options.overwrite)
    cache = Path(options.cache_dir) if options.cache_dir else None
    resolved: Source = resolve_source(source, cache=cache, progress=options.progress)
    checkpoint = open_checkpoint(resolved.path)
    try:
        family = find_family(checkpoint)
        arch = detect_architecture(family, checkpoint, options)
        say(f"{resolved.name}: {arch.describe()}")
        target = decide_target(family, checkpoint, arch, options, say)
        plan = plan_tensors(family, checkpoint, arch, target, say)
        model = load_strictly(build_state_dict(checkpoint, plan, target, options.dtype), target)
        num_parameters = sum(math.prod(e.shape) for e in plan.entries)
        with building(output_dir) as temporary:
            files = save_folder(model, temporary, target, options)
            del model
            say(
                f"wrote {', '.join(files)}: {num_parameters:,} parameters in {options.dtype} "
                f"({time.perf_counter() - started:.1f} s since the start)"
            )
            verification = None
            if options.verify:
                verification = verify(temporary, family, checkpoint, arch, target, options, say)
            sha256 = resolved.sha256 or file_sha256(resolved.path)
            card = card_info(resolved, family, arch, target, options, sha256, num_parameters, verification, output_dir)
            card.training_step = getattr(checkpoint, "step", None)  # where a vit_jax training checkpoint says it
            (temporary / "README.md").write_text(render_model_card(card), encoding="utf-8")
            if options.onnx or options.onnx_quantize:
                export_onnx_files(temporary, options.onnx_quantize, say)
            move_into_place(temporary, output_dir, options.overwrite)
    finally:
        checkpoint.close()
    say(f"saved {output_dir} ({time.perf_counter() - started:.1f} s)")
    if options.push_to_hub:
        from .hub import push_folder

        url = push_folder(output_dir, options.push_to_hub, private=options.private, revision=options.revision)
        say(f"pushed to {options.push_to_hub}: {url}")
    return output_dir


# --- checks before anything is read ---------------------------------------------------------------------------------


def parse_size(value, name: str) -> tuple[int, int] | None:
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


def check_options(options: Options) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    if options.dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}.")
    if options.export not in EXPORTS:
        raise ConversionError(f"export must be one of {', '.join(EXPORTS)}, got {options.export!r}.")
    labels = options.num_labels
    if labels is not None and (isinstance(labels, bool) or not isinstance(labels, int) or labels <= 0):
        raise ConversionError(f"num_labels must be a positive integer, got {labels!r}.")
    if options.push_to_hub and not options.verify:
        raise ConversionError("--push-to-hub uploads only verified conversions: drop --no-verify.")
    if options.onnx or options.onnx_quantize:
        from hf_vit.onnx_export import OnnxExportError, require_onnx

        try:
            require_onnx()
        except OnnxExportError as error:
            raise ConversionError(f"--onnx: {error}") from None
    if options.verify_images < 1:
        raise ConversionError(f"verify_images must be at least 1, got {options.verify_images}.")
    parse_size(options.image_size, "image_size")
    parse_size(options.source_image_size, "source_image_size")
    try:
        convert_file_size_to_int(options.max_shard_size)
    except (ValueError, TypeError):
        raise ConversionError(f"max_shard_size must be bytes or like '5GB', got {options.max_shard_size!r}.") from None


# --- architecture and target ------------------------------------------------------------------------------------------


def detect_architecture(family: Family, checkpoint, options: Options) -> Architecture:
    """The family's detector, cross-checked with --variant / --num-heads (which also supply a seed's heads)."""
    arch = family.detect(
        checkpoint, parse_size(options.source_image_size, "source_image_size"), parse_size(options.image_size, "")
    )
    heads = options.num_heads
    if options.variant is not None:
        from hf_vit.configuration_hf_vit import VARIANT_FIELDS, VARIANTS, canonical_variant_name

        try:
            name = canonical_variant_name(options.variant)
        except ValueError as error:
            raise ConversionError(str(error)) from None
        row = dict(zip(VARIANT_FIELDS, VARIANTS[name], strict=False))  # a plain ViT's row has no resnet_num_layers
        hidden, layers, variant_heads = row["hidden_size"], row["num_hidden_layers"], row["num_attention_heads"]
        mlp, patch, resnet = row["intermediate_size"], row["patch_size"], row.get("resnet_num_layers")
        known = (arch.num_heads,) if arch.num_heads else ()  # a seed checkpoint's heads are not in its shapes
        expected = (hidden, layers, mlp, (patch, patch), resnet) + ((variant_heads,) if known else ())
        found = (arch.hidden_size, arch.num_layers, arch.mlp_dim, arch.patch_size)
        found += (dict(arch.extra_config).get("resnet_num_layers"),) + known
        if expected != found:
            stem = f", ResNet stem {list(resnet)}" if resnet is not None else ", no ResNet stem"
            raise ConversionError(
                f"--variant {options.variant} means hidden {hidden}, {layers} layers, {variant_heads} heads, MLP {mlp}, "
                f"patch {patch}{stem}, but {checkpoint.path} is {arch.describe()}: drop --variant or pass the "
                "matching one."
            )
        if heads is not None and heads != variant_heads:
            raise ConversionError(
                f"--num-heads {heads} contradicts --variant {options.variant}, which has {variant_heads} heads."
            )
        heads = variant_heads
    if arch.num_heads is not None:
        if heads is not None and heads != arch.num_heads:
            raise ConversionError(f"--num-heads {heads} contradicts the checkpoint, which has {arch.num_heads} heads.")
        return arch
    if heads is None:
        raise ConversionError(
            f"{checkpoint.path} is a {family.name}, which carries no config: pass --variant (e.g. ViT-B_16)."
        )
    if arch.hidden_size % heads:
        raise ConversionError(f"hidden size {arch.hidden_size} is not divisible by {heads} heads: check --num-heads.")
    return dataclasses.replace(arch, num_heads=heads)


def head_is_zero(family: Family, checkpoint) -> bool:
    """Google zeroed the heads of the 2020 ImageNet-21k files before release: such a head classifies nothing."""
    return all(not checkpoint.load(rule.source).any() for rule in family.table if rule.role == "head")


def decide_target(family: Family, checkpoint, arch: Architecture, options: Options, say) -> Target:
    size = parse_size(options.image_size, "image_size") or arch.image_size
    patch = arch.pixels_per_token
    if size[0] % patch[0] or size[1] % patch[1]:
        what = "patch size" if arch.stem_stride == 1 else f"patch size times the stem's stride ({arch.stem_stride})"
        raise ConversionError(
            f"image_size {size[0]}x{size[1]} is not a multiple of the {what} {patch[0]}x{patch[1]}: choose e.g. "
            f"{(size[0] // patch[0] or 1) * patch[0]}."
        )
    new_head = options.num_labels
    if new_head is None and head_is_zero(family, checkpoint):
        if options.labels is not None:
            raise ConversionError(
                f"{checkpoint.path} has an all-zero head (Google zeroed it before release), which has no classes to "
                "name: pass --num-labels N with --labels for a new head, or drop --labels for a feature extractor."
            )
        new_head = 0
        say(
            "the head is all zeros (Google zeroed it before release): writing a feature extractor; pass --num-labels N"
        )
    keep_pre_logits = bool(arch.representation_size) and (options.num_labels is None or options.keep_pre_logits)
    num_labels = arch.num_classes if new_head is None else new_head
    id2label = resolve_labels(options.labels, num_labels, original_head=new_head is None) if num_labels else None
    if options.export == "transformers-vit":
        if arch.stem:
            raise ConversionError(
                f"--export transformers-vit: stock transformers has no hybrid ({arch.stem} before the ViT), which "
                "this checkpoint is: export hf_vit instead (the default)."
            )
        if arch.classifier != "token":
            raise ConversionError(
                "--export transformers-vit: stock ViTForImageClassification pools the class token, but this checkpoint "
                "uses the 'gap' classifier: export hf_vit instead (the default)."
            )
        if keep_pre_logits and new_head != 0:  # a feature extractor keeps pre_logits as ViTModel's pooler
            raise ConversionError(
                "--export transformers-vit: stock ViTForImageClassification has no pre_logits layer, which this "
                "checkpoint has: pass --num-labels N to replace the head (pre_logits is then dropped), or export hf_vit."
            )
    config, model_class = build_config(arch, family, options.export, size, num_labels, id2label, keep_pre_logits)
    stock_names = {
        "ViTForImageClassification": rename_for_transformers_vit,
        "ViTModel": rename_for_transformers_vit_model,
    }
    target = Target(
        image_size=size,
        grid=(size[0] // patch[0], size[1] // patch[1]),
        new_head=new_head,
        keep_pre_logits=keep_pre_logits,
        num_labels=num_labels,
        config=config,
        model_class=model_class,
        rename=stock_names.get(model_class.__name__, lambda key: key),
    )
    if target.stock_vit_model and (options.onnx or options.onnx_quantize):
        raise ConversionError(
            "--onnx: the stock feature extractor (transformers' ViTModel, pre_logits as its pooler) has no logits to "
            "export to ONNX: export hf_vit (the default), whose feature extractor returns the features as logits."
        )
    return target


def build_config(arch: Architecture, family: Family, export, image_size, num_labels, id2label, keep_pre_logits):
    def pair_or_int(pair):
        return pair[0] if pair[0] == pair[1] else tuple(pair)

    labels = {"id2label": dict(enumerate(id2label))} if id2label else {"num_labels": num_labels}
    common = dict(
        image_size=pair_or_int(image_size),
        patch_size=pair_or_int(arch.patch_size),
        num_channels=arch.num_channels,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        intermediate_size=arch.mlp_dim,
        hidden_act=family.hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,  # flax.linen.LayerNorm; transformers' ViTConfig defaults to BERT's 1e-12
        qkv_bias=True,
        **labels,
    )
    extra = dict(arch.extra_config)  # e.g. the hybrids' resnet_num_layers (hf_vit only: refused for transformers-vit)
    try:
        if export == "transformers-vit":
            from transformers import ViTConfig, ViTForImageClassification, ViTModel

            if keep_pre_logits:  # a feature extractor (else refused): pre_logits is ViTModel's pooler, Linear + tanh
                return ViTConfig(**common, pooler_output_size=arch.representation_size, pooler_act="tanh"), ViTModel
            return ViTConfig(**common), ViTForImageClassification
        from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification

        representation_size = arch.representation_size if keep_pre_logits else None
        config = VisionTransformerConfig(
            **common, **extra, classifier=arch.classifier, representation_size=representation_size
        )
    except ValueError as error:
        raise ConversionError(f"Cannot build a config for {arch.describe()}: {error}") from None
    return config, VisionTransformerForImageClassification


# --- tensors ------------------------------------------------------------------------------------------------------


def meta_model(target: Target):
    """A weightless (meta-device) instance of the target model."""
    import torch

    with torch.device("meta"):
        return target.model_class(target.config)


def plan_tensors(family: Family, checkpoint, arch: Architecture, target: Target, say) -> Plan:
    """The family's key table against the checkpoint, then the planned keys and shapes against the model's."""
    plan = plan_conversion(
        checkpoint,
        family.rules(checkpoint, arch),
        arch,
        target_grid=target.grid,
        new_head=target.new_head,
        keep_pre_logits=target.keep_pre_logits,
    )
    planned = {target.rename(e.target): e.shape for e in plan.entries}
    model_keys = {k: tuple(v.shape) for k, v in meta_model(target).state_dict().items()}
    missing = sorted(set(model_keys) - set(planned))
    extra = sorted(set(planned) - set(model_keys))
    wrong = [f"{k}: {v} vs {model_keys[k]}" for k, v in planned.items() if k in model_keys and v != model_keys[k]]
    if missing or extra or wrong:
        raise ConversionError(
            f"Key table and model disagree (missing {missing[:3]}, unexpected {extra[:3]}, shapes {wrong[:3]}): "
            f"this is a bug in the {family.name} key table, please report it."
        )
    if plan.dropped:
        say(f"dropped: {', '.join(plan.dropped)}")
    if target.grid != arch.grid:
        say(
            f"position embeddings resampled from a {arch.grid[0]}x{arch.grid[1]} to a {target.grid[0]}x{target.grid[1]} grid"
        )
    return plan


def build_state_dict(checkpoint, plan: Plan, target: Target, dtype: str) -> dict:
    """Every planned tensor, in the saved dtype (torch rounds to nearest even), under the target model's names."""
    import torch

    torch_dtype = getattr(torch, dtype)
    return {
        target.rename(e.target): torch.from_numpy(produce(checkpoint, e, plan.context)).to(torch_dtype)
        for e in plan.entries
    }


def load_strictly(state_dict: dict, target: Target):
    """The target model holding exactly `state_dict` (assigned, not copied)."""
    model = meta_model(target)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# --- what goes into the folder ---------------------------------------------------------------------------------


def save_folder(model, folder: Path, target: Target, options: Options) -> list[str]:
    """Weights (sharded by `save_pretrained` above max_shard_size), config, remote code, preprocessor config."""
    from hf_vit import image_processor_for

    model.config.dtype = options.dtype
    with quiet_progress_bars():  # "Writing model shards" for a single file is noise
        # save_original_format=False: the key names of the transformers this runs on (5.x), as loaded, not the 4.x ones
        # transformers would otherwise revert ViT's to.
        model.save_pretrained(folder, max_shard_size=options.max_shard_size, save_original_format=False)
    if options.export == "transformers-vit":
        image_processor_for(model.config).save_pretrained(folder)
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():  # safetensors come out 0600 (a temporary file renamed): readable as any other file
        file.chmod(0o666 & ~umask)
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model") and ".safetensors" in p.name)


@contextlib.contextmanager
def quiet_progress_bars():
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def export_onnx_files(folder: Path, quantize: bool, say) -> None:
    """onnx/ files beside the weights, each checked with ONNX Runtime; the card gets their section."""
    from hf_vit.onnx_export import OnnxExportError, export_onnx

    try:
        result = export_onnx(folder, quantize=quantize)
    except OnnxExportError as error:
        raise ConversionError(f"ONNX export: {error}") from None
    figures = (
        f"float32 within {result['drift']:.1e} of the float64 logits (PyTorch float32: {result['pytorch_drift']:.1e})"
    )
    if quantize:
        figures += f", int8 top-1 agreement {result['int8_top1_agreement']:.0%}"
    say(f"wrote {', '.join(result['files'])}, checked with ONNX Runtime: {figures}")


# --- verification -------------------------------------------------------------------------------------------------


def verify(folder: Path, family: Family, checkpoint, arch: Architecture, target: Target, options: Options, say) -> str:
    """Verify `folder` (see `verify_folder`); returns the model card's line, or raises if the mapping is off."""
    from hf_vit.verification import MAPPING_TOLERANCE, VerificationError, check_finite, check_mapping

    result = verify_folder(folder, family, checkpoint, arch, target, options.dtype, options.verify_images)
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[options.dtype]
    say(
        f"verification: float64 max diff {result['mapping']:.1e} of the logits' scale (tolerance "
        f"{MAPPING_TOLERANCE:.0e}); {precision} forward within {result['drift']:.1e} of the float64 reference"
    )
    try:
        check_finite(result["drift"], options.dtype, "The converted model")  # an overflow makes both figures inf
        check_mapping(result["mapping"], "The converted model")
    except VerificationError as error:
        raise ConversionError(f"Verification failed: {error}") from None
    height, width = target.image_size
    what = "seed model (exact GELU)" if family.hidden_act == "gelu" else "tanh-GELU Flax model"
    weights = "" if options.dtype == "float32" else f" with its parameters rounded to {options.dtype} as saved"
    return (
        f"Compared with an independent NumPy implementation of the original {what}, computed in float64 straight "
        f"from the checkpoint{weights}, on {options.verify_images} random {height}x{width} inputs (differences relative to "
        f"the logits' scale, max(1, max |logit|)): the weights upcast to float64 agree with it to "
        f"{result['mapping']:.1e} (tolerance {MAPPING_TOLERANCE:.0e}: every tensor is where it belongs); "
        f"{precision} forward within {result['drift']:.1e} of the float64 reference of the original model (on "
        f"{result['cpu']}; this figure depends on the CPU and its thread count)."
    )


def verify_folder(folder: Path, family: Family, checkpoint, arch, target: Target, dtype: str, num_images: int) -> dict:
    """
    Load `folder` strictly and compare its logits and head input with the NumPy reference of the Flax model: the
    weights upcast to float64 (`mapping`: is every tensor where it belongs) and in the saved `dtype` (`drift`: what
    that precision computes on this CPU), both relative to the reference's scale (see `hf_vit.verification`).

    For bfloat16/float16 folders the reference rounds its parameters the same way, so the float64 comparison is as
    tight as for float32.
    """
    import torch

    from hf_vit.verification import largest_difference, model_outputs, verification_images

    with quiet_progress_bars():
        model, info = target.model_class.from_pretrained(folder, dtype=getattr(torch, dtype), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ConversionError(f"The converted folder does not load strictly: {problems}.")
    images = verification_images(num_images, *target.image_size, channels=arch.num_channels)
    saved = model_outputs(model, images, getattr(torch, dtype))
    exact = model_outputs(model, images, torch.float64)  # upcasting the saved weights is exact
    del model
    with np.errstate(over="ignore", invalid="ignore"):  # weights beyond float16's range: refused, not warned about
        inputs = images if family.reference_stem is None else family.reference_stem(checkpoint, arch, images, dtype)
        reference_features, reference_logits = flax_vit_forward(
            family.reference_params(checkpoint, arch),
            arch,
            inputs,
            gelu="exact" if family.hidden_act == "gelu" else "tanh",
            use_pre_logits=target.keep_pre_logits,
            new_head_classes=target.new_head,
            dtype=dtype,
        )
    if target.stock_vit_model:  # no head: the pooler holds pre_logits
        reference = {"features": reference_features}
    else:
        reference = {"logits": reference_logits, "head input": reference_features}
    return {
        "mapping": largest_difference(exact, reference),
        "drift": largest_difference(saved, reference),
        "cpu": cpu_name(),
    }


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string: the drift figure depends on it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# --- the model card -----------------------------------------------------------------------------------------------


def card_info(
    resolved: Source, family, arch, target: Target, options, sha256, num_parameters, verification, output_dir
):
    size = target.image_size
    resolution = str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"
    name = Path(resolved.name).name.removesuffix(".npz").removesuffix(".bin")
    if target.feature_extractor:
        title, description = f"{name} ({resolution} px, feature extractor)", _describe(arch, target)
    elif options.num_labels is not None:
        title, description = f"{name} ({resolution} px, new {options.num_labels}-class head)", _describe(arch, target)
    else:
        title, description = f"{name} ({resolution} px)", arch.describe()
    return CardInfo(
        title=title,
        source_name=resolved.name,
        source_url=resolved.url,
        source_sha256=sha256,
        export=options.export,
        architecture=description,
        image_size=size,
        source_image_size=arch.image_size,
        num_parameters=num_parameters,
        num_labels=target.num_labels,
        new_head=bool(target.new_head),
        feature_extractor=target.feature_extractor,
        stock_vit_model=target.stock_vit_model,
        pre_logits=("kept" if target.keep_pre_logits else "dropped") if arch.representation_size else "none",
        dtype=options.dtype,
        hidden_act=family.hidden_act,
        datasets=_datasets(resolved, arch, options.num_labels),
        augreg=resolved.augreg,
        verification=verification,
        seed_checkpoint=family.seed,
        repo_id=options.push_to_hub or output_dir.name,
    )


def _describe(arch: Architecture, target: Target) -> str:
    head = "no head (feature extractor)" if target.feature_extractor else f"{target.num_labels} classes (new head)"
    text = arch.describe().replace(f"{arch.num_classes} classes", head)
    if arch.representation_size and not target.keep_pre_logits:
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


__all__ = ["DTYPES", "EXPORTS", "Options", "convert", "verify_folder"]
