"""The model of the example scripts: names and config overrides checked offline before anything is written, then a
model built from a variant (from scratch), converted from an original checkpoint, or loaded from a folder or Hub id;
and its preprocessing, read from its own image processor."""

import argparse
import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

import conversion
import hf_vit  # registers model_type "hf_vit" with the Auto classes
from conversion.sources import COLLECTIONS, official_url
from hf_vit.configuration_hf_vit import VARIANTS, canonical_variant_name, variant_display_name
from hf_vit.modeling_hf_vit import resample_position_embeddings

from .cli import UsageError, close_matches, one_line
from .run_folder import CONVERTED


logger = get_logger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: only such names are looked up on the Hub


def add_model_arguments(group) -> None:
    group.add_argument(
        "--model_name_or_path",
        help="An hf_vit folder or Hub id, or an original .npz checkpoint / official checkpoint name (converted on the "
        "fly with a zero-initialised head for the dataset's classes).",
    )
    group.add_argument("--config_name", help="A variant (e.g. ViT-Ti_16) or config path, to train from scratch.")
    group.add_argument(
        "--config_overrides",
        help='Config fields to override, e.g. "image_size=32,num_hidden_layers=4,hidden_dropout_prob=0.1".',
    )
    group.add_argument(
        "--image_size", type=int, help="Training resolution (default: the model's; 224 for a variant or .npz)."
    )
    group.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="Re-initialise weights whose shape differs from the checkpoint's (e.g. a head for other classes).",
    )


def parse_overrides(text: str | None) -> dict:
    """'image_size=32,hidden_act=gelu,representation_size=None' -> {'image_size': 32, 'hidden_act': 'gelu', ...}."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"--config_overrides expects key=value pairs separated by commas, got {item!r}.")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return overrides


def official_names() -> list[str]:
    return [*COLLECTIONS["imagenet21k"], *(f"{c}/{m}" for c, models in COLLECTIONS.items() for m in models)]


def variant_names() -> list[str]:
    return [variant_display_name(variant) for variant in VARIANTS]


def looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith((".npz", ".bin", ".json")) or name.count("/") > 1


def is_variant_name(name: str) -> bool:
    try:
        canonical_variant_name(name)
        return True
    except ValueError:
        return False


def is_original_checkpoint(source: str) -> bool:
    """An original checkpoint (vit_jax .npz, seed *_checkpoint.bin, official name) rather than a folder or Hub id."""
    if Path(source).is_file():
        return source.endswith((".npz", ".bin"))
    return not Path(source).exists() and official_url(source) is not None


def check_model_names(args: argparse.Namespace) -> None:
    """An unknown variant or checkpoint name fails now, offline, with the known names: only owner/name ids (not
    official collections such as imagenet21k/...) are Hub ids, looked up on the Hub when the model is loaded."""
    for flag, name, known, kind in (
        ("--model_name_or_path", args.model_name_or_path, official_names(), "official checkpoint name"),
        ("--config_name", args.config_name, variant_names(), "variant"),
    ):
        if not name or Path(name).expanduser().exists():
            continue
        if looks_like_a_path(name):
            raise UsageError(f"{flag} {name}: no such file or folder.")
        if official_url(name) if kind != "variant" else is_variant_name(name):
            continue
        if HUB_ID.fullmatch(name) and name.split("/")[0] not in (*COLLECTIONS, "augreg"):
            continue
        raise UsageError(
            f"{flag} {name!r} is not a local path, a Hub id (owner/name) or a known {kind}{close_matches(name, known)}; "
            f"known: {', '.join(known)}."
        )


def known_config_fields(args: argparse.Namespace) -> set[str] | None:
    """The fields --config_overrides may set, from the model's config class; None for a Hub model (checked later)."""
    source = args.model_name_or_path or args.config_name
    path = Path(source).expanduser()
    config_file = path / "config.json" if path.is_dir() else path if path.suffix == ".json" else None
    if config_file is None:  # a variant, an .npz, a seed .bin, an official name: an hf_vit model
        return (
            set(hf_vit.VisionTransformerConfig().to_dict()) if not HUB_ID.fullmatch(source) or path.exists() else None
        )
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
        return set(transformers.AutoConfig.for_model(model_type).to_dict())
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot read the model type from {config_file}: {error}.") from None


def check_config_overrides(overrides: dict, known: set[str] | None) -> None:
    for key in overrides:
        if key in ("num_labels", "id2label", "label2id"):
            raise UsageError(f"--config_overrides: {key} is set from the dataset's classes: leave it out.")
        if known is not None and key not in known:
            raise UsageError(
                f"--config_overrides: {key!r} is not a field of the model's config{close_matches(key, sorted(known))}."
            )


def check_model_arguments(args: argparse.Namespace) -> None:
    """Everything about the model that can be checked offline and before anything is written."""
    check_model_names(args)
    check_config_overrides(parse_overrides(args.config_overrides), known_config_fields(args))


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from: 'scratch' (a variant or config), 'converted' (an original checkpoint) or
    'pretrained' (an hf_vit or transformers folder, or a Hub id)."""

    kind: str
    name: str
    overrides: str | None = None  # --config_overrides, for 'scratch'
    url: str | None = None  # the original checkpoint's download address, for 'converted'

    @property
    def hub_id(self) -> str | None:
        """The base model's Hub id, when it is one (for the card's base_model)."""
        return self.name if self.kind == "pretrained" and not Path(self.name).exists() else None


def load_model(args: argparse.Namespace, labels: list[str], accelerator: Accelerator, keep_head: bool = False):
    """(model, Provenance): from scratch (--config_name), converted from an .npz, or loaded from a folder / Hub id.

    A model built from scratch gets a head for `labels`; a checkpoint's head is replaced by one for `labels`, unless
    `keep_head` (evaluation): then the model keeps its own head and id2label."""
    label_kwargs = dict(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    head_kwargs = {} if keep_head else label_kwargs
    overrides = parse_overrides(args.config_overrides)
    if args.image_size:
        overrides.setdefault("image_size", args.image_size)
    try:
        if not args.model_name_or_path:
            if is_variant_name(args.config_name):
                config = hf_vit.VisionTransformerConfig.from_variant(args.config_name, **overrides, **label_kwargs)
            else:
                config = AutoConfig.from_pretrained(args.config_name, **overrides, **label_kwargs)
            model = AutoModelForImageClassification.from_config(config)
            return model, Provenance("scratch", args.config_name, overrides=args.config_overrides)

        source, provenance = args.model_name_or_path, Provenance("pretrained", args.model_name_or_path)
        image_size = overrides.pop("image_size", None)
        if is_original_checkpoint(source):
            converted = Path(args.output_dir) / CONVERTED
            # The main process converts (and downloads) once; the others, and resumed runs, load its folder.
            with accelerator.main_process_first():
                if not (converted / "config.json").exists():
                    # a new zero-initialised head, pre_logits dropped (the paper's); or the checkpoint's own head
                    new_head = {} if keep_head else dict(num_labels=len(labels), labels=labels)
                    conversion.convert(
                        source,
                        converted,
                        **new_head,
                        image_size=image_size or (None if keep_head else 224),  # evaluation: its own
                        variant=args.config_name,  # a seed *_checkpoint.bin has no sizes of its own
                        overwrite=True,
                        log=lambda line: logger.info(line),
                    )
            official = official_url(source)
            provenance = Provenance("converted", source, url=official[2] if official else None)
            source = str(converted)
        if known_config_fields(args) is None:  # a Hub model: its config class is known once downloaded
            check_config_overrides(overrides, set(type(AutoConfig.from_pretrained(source))().to_dict()))
        model = AutoModelForImageClassification.from_pretrained(
            source, ignore_mismatched_sizes=args.ignore_mismatched_sizes, **overrides, **head_kwargs
        )
        if image_size and tuple(np.broadcast_to(image_size, 2)) != tuple(np.broadcast_to(model.config.image_size, 2)):
            model = resize_position_embeddings(model, image_size)
        return model, provenance
    except UsageError:
        raise
    except Exception as error:  # bad config values, missing files, size mismatches, conversion.ConversionError
        message = one_line(error)
        if "mismatch" in message.lower():
            message = (
                f"weights of {args.model_name_or_path} have other shapes than a model for {len(labels)} classes at "
                "this resolution: pass --ignore_mismatched_sizes to re-initialise them (e.g. the head)"
            )
        raise UsageError(f"cannot build the model: {message.rstrip('.')}.") from None


def resize_position_embeddings(model, image_size: int):
    """The same model at another resolution, its position embeddings resampled as the original code does."""
    config = model.config
    old_grid = config.grid_size
    new_config = config.__class__.from_dict({**config.to_dict(), "image_size": image_size})
    state = model.state_dict()
    key = "transformer.embeddings.position_embeddings"
    prefix = 1 if config.classifier == "token" else 0
    state[key] = resample_position_embeddings(state[key], old_grid, new_config.grid_size, prefix)
    resized = model.__class__(new_config)
    resized.load_state_dict(state, strict=True)
    return resized


def image_size_of(model) -> tuple[int, int]:
    return tuple(np.broadcast_to(model.config.image_size, 2).tolist())


def image_processor_of(model, source: str | None = None):
    """The model's own image processor: the one saved beside `source` if there is one, else hf_vit's (the original
    models' preprocessing, which save_pretrained also writes)."""
    if source is not None and not is_original_checkpoint(source):
        try:
            return AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError):  # no preprocessor_config.json: the model's own defaults
            pass
    return hf_vit.image_processor_for(model.config)


class Normalize:
    """uint8 or float 0..255 (B, 3, H, W) -> float32 scaled with the image processor's mean and std, on the device."""

    def __init__(self, image_processor):
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.description = f"mean {list(image_processor.image_mean)}, std {list(image_processor.image_std)}"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mean.device != pixels.device:  # moved once, not at every batch
            self.mean, self.std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels.float() / 255 - self.mean) / self.std


def save_model(accelerator: Accelerator, model, output_dir: str | Path) -> None:
    """save_pretrained from the main process, with the state dict gathered from every process (FSDP, DeepSpeed)."""
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )


def preview(names: list[str], count: int = 5) -> str:
    return ", ".join(map(repr, names[:count])) + (f", ... ({len(names)} in all)" if len(names) > count else "")


def parse_label_mapping(text: str) -> dict:
    """--label_mapping: a JSON object {dataset label: model label or index}, inline or in a file."""
    try:
        mapping = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"--label_mapping {text!r} is neither 'index' nor a JSON object (or file) of dataset label -> model "
            f"label: {one_line(error)}."
        ) from None
    if not isinstance(mapping, dict):
        raise UsageError(f"--label_mapping must be a JSON object of dataset label -> model label, got {text!r}.")
    return {str(key): value for key, value in mapping.items()}


def match_labels(id2label: dict, labels: list[str], mapping: str | None = None) -> np.ndarray:
    """For each of the dataset's classes, the index of the model's class it is: by name (case and surrounding
    spaces ignored), or by --label_mapping ('index': dataset class i is the model's class i; or a JSON object of
    dataset label -> model label or index, the classes it leaves out matched by name)."""
    model_labels = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if mapping == "index":
        if len(labels) > len(model_labels):
            raise UsageError(
                f"--label_mapping index: the dataset has {len(labels)} classes, the model only {len(model_labels)}."
            )
        return np.arange(len(labels))
    explicit = parse_label_mapping(mapping) if mapping else {}
    unknown = sorted(set(explicit) - set(labels))
    if unknown:
        raise UsageError(f"--label_mapping names labels the dataset doesn't have: {preview(unknown)}.")
    by_name = {}
    for index, name in enumerate(model_labels):
        by_name.setdefault(name.strip().lower(), []).append(index)
    matched, missing = [], []
    for label in labels:
        target = explicit.get(label, label)
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(model_labels):
            matched.append(target)
            continue
        found = by_name.get(str(target).strip().lower(), [])
        if len(found) > 1:
            raise UsageError(
                f"dataset label {label!r} matches {len(found)} of the model's classes ({found}): say which with "
                "--label_mapping."
            )
        matched.append(found[0]) if found else missing.append(label)
    if missing:
        raise UsageError(
            f"the model's {len(model_labels)} labels ({preview(model_labels)}) don't cover the dataset's: "
            f"{preview(missing)} {'is' if len(missing) == 1 else 'are'} not among them. Pass --label_mapping index "
            "(dataset class i is the model's class i) or a JSON object of dataset label -> model label."
        )
    if len(set(matched)) < len(matched):
        raise UsageError("--label_mapping maps two of the dataset's classes to the same model class.")
    return np.array(matched)
