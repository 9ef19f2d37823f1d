"""Fine-tune a Vision Transformer with Accelerate: the CIFAR-10 recipe of "An Image is Worth 16x16 Words".

    accelerate launch -q --mixed_precision bf16 examples/finetune.py --model_name_or_path ViT-B_16 \
        --dataset_name uoft-cs/cifar10 --horizontal_flip --output_dir vit-b16-cifar10

(`ViT-B_16` is Google's ImageNet-21k checkpoint, downloaded and converted on the fly; a local .npz works too.)
(`-q`: an error ends with the script's one line and exit status 1, without accelerate's traceback; run directly with
`python`, bad input exits with status 2.)

Defaults are the paper's fine-tuning recipe (and the seed repo's): SGD with momentum 0.9, lr 0.03, no weight decay,
cosine decay after 500 linear warm-up steps, 10,000 steps of 512 images, gradient-norm clip 1.0, 224 px,
random-resized crop of 5-100 % of the image area, inputs scaled to [-1, 1]. The global batch and the learning-rate
schedule are the same whatever the number of processes: the script derives gradient accumulation from
`--total_batch_size`.

With no dataset argument it trains on scikit-learn's 8x8 handwritten digits, which needs no network:

    python examples/finetune.py --config_name ViT-Ti_16 --config_overrides "image_size=8,patch_size=2,\
hidden_size=128,num_hidden_layers=2,num_attention_heads=4,intermediate_size=256" --learning_rate 0.1 \
        --total_batch_size 64 --max_train_steps 1000 --num_warmup_steps 100 --crop_scale 0.8 1 --output_dir vit-digits

The output folder holds the model (safetensors, config, code, preprocessor), a model card (README.md),
all_results.json, training_curves.png and confusion_matrix.png; checkpoints/ holds `accelerator.save_state` folders
that `--resume_from_checkpoint latest` continues from, mid-epoch and bit for bit. A run owns its folder: `run.json`
records what defines it, and examples/run_folder.py refuses another run's folder or a resume that changes the run.
"""

import argparse
import ast
import difflib
import io
import json
import logging
import math
import os
import platform
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import datasets
import evaluate
import numpy as np
import PIL.Image
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    LoggerType,
    TorchDynamoPlugin,
    set_seed,
)
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageClassification, get_scheduler

import conversion
import hf_vit  # registers model_type "hf_vit" with the Auto classes
from conversion.model_card import CITATION_BIBTEX
from conversion.sources import COLLECTIONS, official_url
from hf_vit.configuration_hf_vit import VARIANTS, canonical_variant_name, variant_display_name
from hf_vit.modeling_hf_vit import resample_position_embeddings


# The bookkeeping module beside this script, also when the script is loaded from elsewhere (tests, benchmarks).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_folder import (  # noqa: E402
    RunFolderError,
    checkpoint_folders,
    checkpoint_to_resume,
    keep_run_folder,
    plan_output_dir,
    read_training_state,
    run_identity,
    save_checkpoint,
    start_run_folder,
    undo_run_folder,
)


logger = get_logger(__name__)

ACCURACY_METRIC = Path(__file__).resolve().parent / "metrics" / "accuracy"  # evaluate's accuracy, loadable offline
DIGITS = "digits"
IMAGE_COLUMNS = ("image", "img", "picture", "photo")  # tried in this order when no column has the Image feature
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
# The decode pass checks every image before training when the decoded dataset fits in this many bytes.
DECODE_CHECK_LIMIT = 4 << 30
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: only such names are looked up on the Hub


class UsageError(Exception):
    """Bad input (arguments, data, checkpoint): reported as one line, exit status 2.

    `this_process_only`: found in this process's share of the data, so every process that finds it reports it; other
    errors are found the same way by every process and reported once, by the main one."""

    def __init__(self, message: str, this_process_only: bool = False):
        super().__init__(message)
        self.this_process_only = this_process_only


class NonFiniteLossError(Exception):
    """The loss became NaN or infinite: reported as one line, exit status 1; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM (as `accelerate launch` forwards it): one line saying how to resume, exit status 130."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one UsageError line (no usage block), like every other error of the script."""

    def error(self, message: str):
        raise UsageError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        help="An hf_vit folder or Hub id, or an original .npz checkpoint / official checkpoint name (converted on the "
        "fly with a zero-initialised head for the dataset's classes).",
    )
    model.add_argument("--config_name", help="A variant (e.g. ViT-Ti_16) or config path, to train from scratch.")
    model.add_argument(
        "--config_overrides",
        help='Config fields to override, e.g. "image_size=32,num_hidden_layers=4,hidden_dropout_prob=0.1".',
    )
    model.add_argument(
        "--image_size", type=int, help="Training resolution (default: the model's; 224 for a variant or .npz)."
    )
    model.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="Re-initialise weights whose shape differs from the checkpoint's (e.g. a head for other classes).",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        default=DIGITS,
        help="A Hub dataset (uoft-cs/cifar10), a save_to_disk folder, or 'digits' (scikit-learn's, offline).",
    )
    data.add_argument("--dataset_config_name", help="The dataset's configuration name, if it has several.")
    data.add_argument("--train_dir", help="An imagefolder of training images (one sub-folder per class).")
    data.add_argument("--validation_dir", help="An imagefolder of evaluation images.")
    data.add_argument("--image_column_name", help="Default: the column with the Image feature, else image/img.")
    data.add_argument("--label_column_name", help="Default: the ClassLabel column, else label/fine_label.")
    data.add_argument(
        "--validation_split_percentage",
        type=float,
        default=0,
        help="Hold out this percentage of train for model selection; the test split is then only used at the end.",
    )
    data.add_argument("--max_train_samples", type=int, help="Truncate the training set (quick runs).")
    data.add_argument("--max_eval_samples", type=int, help="Truncate the evaluation sets (quick runs).")
    data.add_argument(
        "--crop_scale",
        type=float,
        nargs=2,
        default=(0.05, 1.0),
        metavar=("MIN", "MAX"),
        help="Area range of the random-resized crop; '1 1' turns cropping off.",
    )
    data.add_argument("--horizontal_flip", action="store_true", help="Random horizontal flips (google's pipeline).")
    data.add_argument(
        "--decode_check",
        action=argparse.BooleanOptionalAction,
        help="Decode every image once before training and report all unreadable ones at once (default: on when the "
        f"decoded dataset fits in {DECODE_CHECK_LIMIT >> 30} GiB).",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        help="Decoding processes per training process (default: 0 for digits, else min(8, cpus per process)).",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--total_batch_size", type=int, default=512, help="Images per optimizer step, all processes."
    )
    training.add_argument(
        "--per_device_train_batch_size",
        type=int,
        help="Images per process per forward pass (default: total / processes, no accumulation).",
    )
    training.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        help="Default: total_batch_size / (per_device_train_batch_size x processes).",
    )
    training.add_argument("--per_device_eval_batch_size", type=int, default=128)
    training.add_argument("--learning_rate", type=float, default=0.03)
    training.add_argument("--momentum", type=float, default=0.9, help="SGD momentum.")
    training.add_argument("--weight_decay", type=float, default=0.0)
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clip; 0 turns it off.")
    training.add_argument("--max_train_steps", type=int, default=10_000, help="Optimizer steps.")
    training.add_argument("--num_warmup_steps", type=int, default=500)
    training.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        choices=[t.value for t in transformers.SchedulerType],
        help="A transformers scheduler.",
    )
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: accelerate's config.")
    training.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the model with torch.compile (inductor, fullgraph) for training and evaluation: slower start, "
        "faster steps on a GPU.",
    )
    training.add_argument("--seed", type=int, default=42)

    run = parser.add_argument_group("evaluation, checkpoints, tracking, Hub")
    run.add_argument("--output_dir", required=True, help="A new or empty folder, or the folder of the run resumed.")
    run.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace what OUTPUT_DIR holds (another run's model, checkpoints) with a new run: deleted once the new run "
        "is set up, left as it was if it fails before.",
    )
    run.add_argument("--eval_steps", type=int, default=100, help="Evaluate every N steps (and at the end).")
    run.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read the loss back from the device every N steps (and at evaluations and checkpoints), for the progress "
        "bar, the NaN check, the curves and --with_tracking; in between the device runs ahead of the host.",
    )
    run.add_argument("--checkpointing_steps", type=int, default=500, help="accelerator.save_state every N steps.")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the last N checkpoints (0: all).")
    run.add_argument(
        "--resume_from_checkpoint",
        help="A checkpoint folder, or 'latest' for the newest in OUTPUT_DIR/checkpoints (a fresh start if none). "
        "Only the run that wrote it can resume it.",
    )
    run.add_argument(
        "--allow_changed_arguments",
        action="store_true",
        help="Resume although run-defining arguments (learning rate, steps, data...) differ from the checkpoint's; "
        "the model card lists the changes.",
    )
    run.add_argument("--with_tracking", action="store_true", help="Log loss, lr and accuracy to --report_to.")
    run.add_argument("--report_to", default="tensorboard", help="An accelerate tracker: tensorboard, wandb, all...")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", help="Default: the output folder's name under your account.")
    args = parser.parse_args(argv)

    if not args.model_name_or_path and not args.config_name:
        parser.error("give --model_name_or_path (fine-tune) or --config_name (train from scratch).")
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        parser.error(f"--crop_scale MIN MAX needs 0 < MIN <= MAX <= 1, got {low} {high}.")
    if not 0 <= args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}.")
    # Numbers that would otherwise fail deep inside torch (a DataLoader, SGD) with a traceback, or train nonsense.
    positive = ("max_train_steps", "eval_steps", "logging_steps", "checkpointing_steps", "total_batch_size")
    positive += ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size")
    positive += ("learning_rate", "image_size", "max_train_samples", "max_eval_samples")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    not_negative = ("momentum", "weight_decay", "max_grad_norm", "num_warmup_steps", "checkpoints_total_limit")
    for name in (*not_negative, "dataloader_num_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}.")
    if args.with_tracking:
        # accelerate silently logs nowhere for a tracker it doesn't know or that isn't installed
        known = [tracker.value for tracker in LoggerType]
        installed = [tracker.value for tracker in get_available_trackers()]
        if args.report_to not in known:
            parser.error(
                f"--report_to {args.report_to} is not a tracker accelerate knows"
                f"{close_matches(args.report_to, known)}: choose from {', '.join(known)}."
            )
        if args.report_to != "all" and args.report_to not in installed:
            parser.error(
                f"--report_to {args.report_to}: the {args.report_to} package is not installed: pip install it, or "
                f"report to {' or '.join(installed) or 'nothing (drop --with_tracking)'}."
            )
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: a DatasetDict with one image and one label column; images decoded to RGB on the loader's workers, augmented
# on the device.


def load_digits_dataset() -> datasets.DatasetDict:
    """scikit-learn's 1,797 handwritten 8x8 digits as RGB images, with a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # the scans have 17 grey levels, 0..16
    train_indices, test_indices = train_test_split(
        np.arange(len(pixels)), test_size=0.2, random_state=0, stratify=digits.target
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(indices):
        images = [PIL.Image.fromarray(pixels[i]).convert("RGB") for i in indices]
        return datasets.Dataset.from_dict({"image": images, "label": digits.target[indices].tolist()}, features)

    return datasets.DatasetDict(train=split(train_indices), test=split(test_indices))


def load_image_dataset(args: argparse.Namespace) -> datasets.DatasetDict:
    """The dataset the arguments name, as a DatasetDict; a one-line UsageError when it can't be loaded."""
    source = args.dataset_name
    for flag, folder in (("--train_dir", args.train_dir), ("--validation_dir", args.validation_dir)):
        if folder and not Path(folder).is_dir():  # before datasets caches an empty dataset under its name
            raise UsageError(f"{flag} {folder} is not a folder: give a folder of images, one sub-folder per class.")
    try:
        if args.train_dir or args.validation_dir:
            source = args.train_dir or args.validation_dir
            data_files = {}
            if args.train_dir:
                data_files["train"] = os.path.join(args.train_dir, "**")
            if args.validation_dir:
                data_files["validation"] = os.path.join(args.validation_dir, "**")
            dataset = datasets.load_dataset("imagefolder", data_files=data_files)
        elif Path(source).is_dir() and any((Path(source) / f).exists() for f in ("dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(source)
        elif source == DIGITS:
            dataset = load_digits_dataset()
        else:
            dataset = datasets.load_dataset(source, args.dataset_config_name)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        message = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        raise UsageError(f"cannot load dataset {source!r}: {type(error).__name__}: {message}") from None
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict(train=dataset)
    if not isinstance(dataset, datasets.DatasetDict):
        raise UsageError(
            f"dataset {source!r} is a {type(dataset).__name__}; expected a DatasetDict with a train split."
        )
    return dataset


def detect_columns(dataset: datasets.Dataset, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The image and label columns: the ones asked for, else the Image / ClassLabel features, else common names."""
    columns, features = dataset.column_names, dataset.features
    if image_column is None:
        typed = [c for c in columns if isinstance(features[c], datasets.Image)]
        image_column = typed[0] if typed else next((c for c in IMAGE_COLUMNS if c in columns), None)
    if label_column is None:
        typed = [c for c in LABEL_COLUMNS if c in columns and isinstance(features[c], datasets.ClassLabel)]
        typed += [c for c in columns if isinstance(features[c], datasets.ClassLabel)]
        label_column = typed[0] if typed else next((c for c in LABEL_COLUMNS if c in columns), None)
    for kind, column in (("image", image_column), ("label", label_column)):
        if column not in columns:
            found = ", ".join(f"{c} ({type(features[c]).__name__})" for c in columns)
            raise UsageError(
                f"no {kind} column{f' named {column!r}' if column else ''} in the dataset, whose columns are: "
                f"{found}; pass --{kind}_column_name."
            )
    return image_column, label_column


def dataset_label(args: argparse.Namespace) -> str:
    """What the user named as the data: the image folder(s), else --dataset_name."""
    return args.train_dir or args.validation_dir or args.dataset_name


def prepare_splits(dataset: datasets.DatasetDict, args: argparse.Namespace):
    """(train, selection or None, report, labels): report = test (else validation); selection never touches it."""
    if "train" not in dataset:
        raise UsageError(f"dataset {dataset_label(args)!r} has no train split (splits: {', '.join(dataset)}).")
    image_column, label_column = detect_columns(dataset["train"], args.image_column_name, args.label_column_name)
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns({image_column: "image", label_column: "label"})
    # Decode ourselves, on the loader's workers, so that an unreadable file is reported with its name.
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    train = dataset["train"]
    if len(train) == 0:
        raise UsageError(f"the train split of {args.dataset_name!r} is empty.")

    if isinstance(train.features["label"], datasets.ClassLabel):
        labels = list(train.features["label"].names)
    else:  # plain ints or strings: the distinct values of train, sorted, become the classes of every split
        values = sorted(set(train["label"]))
        labels, index = [str(value) for value in values], {value: i for i, value in enumerate(values)}
        unknown = {value for split in dataset.values() for value in split["label"]} - set(values)
        if unknown:
            raise UsageError(f"labels {sorted(unknown)[:5]} appear in an evaluation split but not in train.")
        features = datasets.Features(
            {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=labels)}
        )
        dataset = dataset.map(
            lambda batch: {"label": [index[value] for value in batch["label"]]},
            batched=True,
            features=features,
            keep_in_memory=True,
        )
        train = dataset["train"]

    report_name = "test" if "test" in dataset else "validation" if "validation" in dataset else None
    selection, selection_name = None, None
    if report_name == "test" and "validation" in dataset:
        selection, selection_name = dataset["validation"], "validation"
    if args.validation_split_percentage:
        held_out = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, selection, selection_name = held_out["train"], held_out["test"], "validation (held out from train)"
    if report_name is None:
        if selection is None:
            raise UsageError(
                f"dataset {dataset_label(args)!r} has no test or validation split (it has {', '.join(dataset)}): pass "
                "--validation_split_percentage or --validation_dir."
            )
        report, report_name, selection, selection_name = selection, selection_name, None, None
    else:
        report = dataset[report_name]

    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        report = report.select(range(min(args.max_eval_samples, len(report))))
        if selection is not None:
            selection = selection.select(range(min(args.max_eval_samples, len(selection))))
    for name, split in ((report_name, report), (selection_name, selection)):
        if split is not None and len(split) == 0:
            raise UsageError(f"the {name} split of {args.dataset_name!r} is empty.")
    return train, (selection, selection_name), (report, report_name), labels


def decode_image(image: dict) -> tuple[PIL.Image.Image | None, str | None]:
    """(RGB image, None), or (None, 'cannot read image NAME: why') for an unreadable one."""
    try:
        with PIL.Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as opened:
            return opened.convert("RGB"), None  # grayscale, palette and RGBA images become RGB
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for corrupt or truncated files
        return None, f"cannot read image {image.get('path') or 'stored in the dataset'}: {error}"


def decode_images(examples: dict) -> dict:
    """Decode a batch to RGB PIL images; an unreadable one becomes None with its error beside it."""
    images, errors = zip(*map(decode_image, examples["image"]), strict=True) if examples["image"] else ((), ())
    return {"image": list(images), "label": examples["label"], "error": list(errors)}


def decode_splits(splits: dict[str, datasets.Dataset], enabled: bool | None, show_progress: bool):
    """Decode every image once, before training: all the unreadable ones are reported in one UsageError.

    enabled None: only when the decoded images fit in DECODE_CHECK_LIMIT bytes (estimated from the first), as
    CIFAR-size datasets do; for larger ones an unreadable image is reported when its batch comes up.
    Returns the train split's images as one uint8 tensor (N, 3, H, W) when the pass ran and they share one size
    (CIFAR, digits): training then indexes it instead of decoding every image again in every epoch. Else None.
    """
    total = sum(len(split) for split in splits.values())
    if enabled is None:
        first, _ = decode_image(next(iter(splits.values()))[0]["image"])
        enabled = first is None or total * np.asarray(first).nbytes <= DECODE_CHECK_LIMIT
    if not enabled:
        return None
    unreadable, names, train_pixels = [], [], []
    with tqdm(total=total, desc="decoding images", unit="img", disable=not show_progress) as progress:
        for split_name, split in splits.items():
            for start in range(0, len(split), 512):
                for image in split[start : start + 512]["image"]:
                    decoded, error = decode_image(image)
                    if error:
                        unreadable.append(error)
                        names.append(image.get("path") or "an image stored in the dataset")
                    elif split_name == "train" and train_pixels is not None:
                        pixels = np.asarray(decoded)
                        if train_pixels and pixels.shape != train_pixels[0].shape:
                            train_pixels = None  # mixed sizes: the worker path resizes them per batch
                        else:
                            train_pixels.append(pixels)
                progress.update(min(512, len(split) - start))
    if unreadable:
        raise UsageError(
            f"{len(unreadable)} of {total} images cannot be decoded: {', '.join(names)} (first: {unreadable[0]}). "
            "Fix or remove them, then run again."
        )
    return torch.from_numpy(np.stack(train_pixels)).permute(0, 3, 1, 2).contiguous() if train_pixels else None


class InMemoryImages(torch.utils.data.Dataset):
    """Decoded training images in one uint8 tensor (N, 3, H, W), ideally on the device: a batch is one indexing
    operation, as the DataLoader fetches batches through `__getitems__` when a dataset has it."""

    def __init__(self, pixels: torch.Tensor, labels: list[int]):
        self.pixels = pixels
        self.labels = torch.tensor(labels, device=pixels.device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> dict:
        index = torch.tensor(indices, device=self.pixels.device)
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def as_batch(batch: dict) -> dict:
    """The collate function of InMemoryImages, whose __getitems__ already returns a batch."""
    return batch


class Collate:
    """Stack a batch as uint8 (B, 3, H, W). Training keeps images of one common size at most `image_size` as they
    are (the random-resized crop on the device then resamples each image once, as torchvision does on the CPU);
    anything else is resized to `image_size` with the image processor's filter."""

    def __init__(self, image_size: tuple[int, int], resample: int, keep_native_size: bool):
        self.image_size = image_size
        self.resample = PIL.Image.Resampling(resample)
        self.keep_native_size = keep_native_size

    def __call__(self, examples: list[dict]) -> dict:
        errors = [example["error"] for example in examples if example["error"]]
        if errors:  # raised by the training loop, outside the worker, as one clean line
            return {"error": errors[0]}
        images = [example["image"] for example in examples]
        height, width = self.image_size
        sizes = {image.size for image in images}
        native = self.keep_native_size and len(sizes) == 1 and all(w <= width and h <= height for w, h in sizes)
        if not native:
            images = [image.resize((width, height), self.resample) for image in images]
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
        return {"pixel_values": pixels.contiguous(), "labels": torch.tensor([e["label"] for e in examples])}


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 or float 0..255 (B, 3, H, W) -> float32 scaled as the original models expect (hf_vit.IMAGE_MEAN/STD)."""
    mean = torch.tensor(hf_vit.IMAGE_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(hf_vit.IMAGE_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def random_resized_crop(
    pixels: torch.Tensor,
    uniforms: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float],
    horizontal_flip: bool,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Batched random-resized crop (+ flip) on the device, one bilinear resampling per image.

    torchvision's RandomResizedCrop: a box of `scale` x the image area with aspect ratio (w/h) log-uniform in `ratio`
    at a uniform position, resized to `size`. Here the box is continuous and clipped to the image instead of re-drawn
    (torchvision re-draws up to 10 times), and the crop is an affine `grid_sample`. `uniforms` (B, 5) in [0, 1) are
    the random numbers, drawn by the caller so that they depend on the step and not on the process count.
    """
    batch, _, height, width = pixels.shape
    u = uniforms.to(pixels.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_ratio) * height / width  # w/h of the box in units of the image's own sides
    box_width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image width / height
    box_height = torch.sqrt(area / aspect).clamp(max=1.0)
    if scale == (1.0, 1.0):  # cropping off: the whole image, whatever its aspect ratio
        box_width, box_height = torch.ones_like(area), torch.ones_like(area)
    left, top = (1 - box_width) * u[:, 2], (1 - box_height) * u[:, 3]
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if horizontal_flip else torch.ones_like(area)
    theta = torch.zeros(batch, 2, 3, device=pixels.device)  # output [-1, 1] -> input [-1, 1] (affine_grid convention)
    theta[:, 0, 0] = box_width * sign
    theta[:, 0, 2] = 2 * left + box_width - 1
    theta[:, 1, 1] = box_height
    theta[:, 1, 2] = 2 * top + box_height - 1
    grid = F.affine_grid(theta, [batch, 3, *size], align_corners=False)
    crops = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalize(crops)


def step_uniforms(seed: int, step: int, total_batch_size: int) -> torch.Tensor:
    """The augmentation's random numbers for every image of one optimizer step: a function of (seed, step) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(total_batch_size, 5, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# Model


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


def close_matches(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.8)
    return f" (did you mean {' or '.join(map(repr, matches))}?)" if matches else ""


def official_names() -> list[str]:
    return [*COLLECTIONS["imagenet21k"], *(f"{c}/{m}" for c, models in COLLECTIONS.items() for m in models)]


def variant_names() -> list[str]:
    return [variant_display_name(variant) for variant in VARIANTS]


def looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith((".npz", ".bin", ".json")) or name.count("/") > 1


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


def is_original_checkpoint(source: str) -> bool:
    """An original checkpoint (vit_jax .npz, seed *_checkpoint.bin, official name) rather than a folder or Hub id."""
    if Path(source).is_file():
        return source.endswith((".npz", ".bin"))
    return not Path(source).exists() and official_url(source) is not None


def is_variant_name(name: str) -> bool:
    try:
        canonical_variant_name(name)
        return True
    except ValueError:
        return False


def load_model(args: argparse.Namespace, overrides: dict, labels: list[str], accelerator: Accelerator):
    """(model, provenance): from scratch (--config_name), converted from an .npz, or loaded from a folder / Hub id."""
    label_kwargs = dict(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    overrides = dict(overrides)
    if args.image_size:
        overrides.setdefault("image_size", args.image_size)
    try:
        if not args.model_name_or_path:
            if is_variant_name(args.config_name):
                config = hf_vit.VisionTransformerConfig.from_variant(args.config_name, **overrides, **label_kwargs)
            else:
                config = AutoConfig.from_pretrained(args.config_name, **overrides, **label_kwargs)
            model = AutoModelForImageClassification.from_config(config)
            return model, {"kind": "scratch", "name": args.config_name, "overrides": args.config_overrides}

        source, provenance = args.model_name_or_path, {"kind": "pretrained", "name": args.model_name_or_path}
        image_size = overrides.pop("image_size", None)
        if is_original_checkpoint(source):
            converted = Path(args.output_dir) / ".converted"
            # The main process converts (and downloads) once; the others, and resumed runs, load its folder.
            with accelerator.main_process_first():
                if not (converted / "config.json").exists():
                    conversion.convert(
                        source,
                        converted,
                        num_labels=len(labels),  # a new zero-initialised head, pre_logits dropped (the paper's)
                        labels=labels,
                        image_size=image_size or 224,
                        variant=args.config_name,  # a seed *_checkpoint.bin has no sizes of its own
                        overwrite=True,
                        log=lambda line: logger.info(line),
                    )
            official = official_url(source)
            provenance = {"kind": "converted", "name": source, "url": official[2] if official else None}
            source = str(converted)
        if known_config_fields(args) is None:  # a Hub model: its config class is known once downloaded
            check_config_overrides(overrides, set(type(AutoConfig.from_pretrained(source))().to_dict()))
        model = AutoModelForImageClassification.from_pretrained(
            source, ignore_mismatched_sizes=args.ignore_mismatched_sizes, **overrides, **label_kwargs
        )
        if image_size and tuple(np.broadcast_to(image_size, 2)) != tuple(np.broadcast_to(model.config.image_size, 2)):
            model = resize_position_embeddings(model, image_size)
        return model, provenance
    except UsageError:
        raise
    except Exception as error:  # bad config values, missing files, size mismatches, conversion.ConversionError
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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


def log_losses(unlogged: list, accelerator: Accelerator, history: dict, output_dir: Path) -> dict:
    """Read the losses of the steps in `unlogged` (one host sync, one all-reduce), append them to `history`, and
    return the last step's logs; a NonFiniteLossError at the first non-finite one. No checkpoint is written between
    two reads, so the last checkpoint is always from before it."""
    losses = accelerator.reduce(torch.stack([loss for _, _, loss in unlogged]), "mean").tolist()
    for (step, lr, _), loss in zip(unlogged, losses, strict=True):
        if not math.isfinite(loss):
            found = checkpoint_folders(output_dir)
            raise NonFiniteLossError(
                f"the training loss became {loss} at step {step} (lr {lr:.3g}); stopped. "
                f"Last good checkpoint: {found[-1] if found else 'none'}. Lower --learning_rate or check the data."
            )
        history["step"].append(step)
        history["loss"].append(loss)
        history["lr"].append(lr)
    unlogged.clear()
    return {"train_loss": history["loss"][-1], "lr": history["lr"][-1]}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and reports


def evaluate_split(model, dataloader, accelerator: Accelerator, metric) -> tuple[float, np.ndarray, np.ndarray]:
    """(accuracy, predictions, references) over the whole split, gathered from every process."""
    model.eval()
    all_predictions, all_references = [], []
    for batch in dataloader:
        if "error" in batch:
            raise UsageError(batch["error"])
        with torch.no_grad():
            logits = model(pixel_values=normalize(batch["pixel_values"])).logits
        # gather_for_metrics drops the samples accelerate repeated to give every process a full last batch.
        predictions, references = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"]))
        metric.add_batch(predictions=predictions, references=references)
        all_predictions.append(predictions.cpu().numpy())
        all_references.append(references.cpu().numpy())
    model.train()
    accuracy = metric.compute()["accuracy"]
    return accuracy, np.concatenate(all_predictions), np.concatenate(all_references)


def plot_training_curves(history: dict, monitor_split: str, path: Path) -> None:
    """training_curves.png, 1500 x 400 px: train loss, learning rate and evaluation accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, lr_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    loss_axis.plot(history["step"], history["loss"], linewidth=1)
    loss_axis.set(title="train loss", xlabel="step", yscale="log" if min(history["loss"], default=1) > 0 else "linear")
    lr_axis.plot(history["step"], history["lr"], linewidth=1, color="tab:orange")
    lr_axis.set(title="learning rate", xlabel="step")
    accuracy_axis.plot(history["eval_step"], history["eval_accuracy"], marker="o", color="tab:green")
    accuracy_axis.set(title=f"accuracy ({monitor_split})", xlabel="step", ylim=(0, 1))
    for axis in (loss_axis, lr_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion_matrix(references: np.ndarray, predictions: np.ndarray, labels: list[str], title: str, path: Path):
    """confusion_matrix.png with the class names on both axes; 600 x 600 px up to 12 classes, larger beyond."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(references, predictions, labels=list(range(len(labels))))
    side = 6 if len(labels) <= 12 else min(30, 0.3 * len(labels) + 2)
    figure, axis = plt.subplots(figsize=(side, side), dpi=100)
    axis.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(labels))
    axis.set_xticks(ticks, labels, rotation=90 if max(map(len, labels)) > 3 else 0)
    axis.set_yticks(ticks, labels)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    if len(labels) <= 20:
        for (row, column), count in np.ndenumerate(matrix):
            color = "white" if count > matrix.max() / 2 else "black"
            axis.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_model_card(output_dir: Path, args: argparse.Namespace, results: dict, facts: dict) -> None:
    """README.md: what the model is, what it was trained on, how, and what it scored on which split."""
    provenance = facts["provenance"]
    base_model = {
        "scratch": f"none: trained from scratch, config `{provenance['name']}`"
        + (f" with overrides `{provenance['overrides']}`" if provenance.get("overrides") else ""),
        "converted": f"`{provenance['name']}`"
        + (f" ({provenance['url']})" if provenance.get("url") else "")
        + ", an original Flax checkpoint of Google's vision_transformer, converted with hf_vit's "
        f"`conversion.convert` (new zero-initialised head, position embeddings resampled to {facts['image_size']} px)",
        "pretrained": f"`{provenance['name']}`",
    }[provenance["kind"]]
    dataset = args.dataset_name if not (args.train_dir or args.validation_dir) else "local imagefolder"
    if dataset == DIGITS:
        dataset = "scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 8x8, fixed 80/20 split)"
    hub_dataset = "/" in args.dataset_name and not Path(args.dataset_name).exists()
    card_data = ModelCardData(
        model_name=output_dir.name,
        eval_results=[
            EvalResult(
                task_type="image-classification",
                dataset_type=args.dataset_name if hub_dataset else "imagefolder" if args.train_dir else DIGITS,
                dataset_name=dataset.split(" (")[0],
                dataset_split=results["eval_split"],
                metric_type="accuracy",
                metric_value=round(results["eval_accuracy"], 4),
            )
        ],
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["image-classification", "vision", "vit", "hf_vit"],
        datasets=[args.dataset_name] if hub_dataset else None,
        metrics=["accuracy"],
        base_model=provenance["name"] if provenance["kind"] == "pretrained" and "/" in provenance["name"] else None,
    )
    report, monitor = results["eval_split"], facts["monitor_split"]
    lines = [
        f"# {output_dir.name}",
        "",
        "A Vision Transformer ([Dosovitskiy et al., 2020](https://arxiv.org/abs/2010.11929)) fine-tuned for image "
        "classification with hf_vit's `examples/finetune.py`.",
        "",
        f"- **Base model:** {base_model}",
        f"- **Dataset:** {dataset}: {facts['train_samples']} training images, {len(facts['labels'])} classes "
        f"({', '.join(facts['labels'][:20])}{', ...' if len(facts['labels']) > 20 else ''})",
        f"- **Architecture:** {facts['architecture']}",
        "",
        "## Results",
        "",
        "| number | value | split | examples |",
        "|---|---|---|---|",
        f"| accuracy of the final model (step {results['train_steps']}) | **{results['eval_accuracy']:.4f}** | "
        f"{report} | {results['eval_samples']} |",
    ]
    if results.get("selection_accuracy") is not None:
        lines.append(
            f"| accuracy of the final model | {results['selection_accuracy']:.4f} | {monitor} | "
            f"{results['selection_samples']} |"
        )
    lines += [
        f"| best accuracy during training (step {results['best_eval_step']}) | {results['best_eval_accuracy']:.4f} | "
        f"{monitor} | {results['monitor_samples']} |",
        "",
        f"The published model is the one of the last step: no checkpoint was picked by its score. The {report} "
        + (
            f"split was only used once, at the end; evaluations during training used the {monitor} split."
            if monitor != report
            else "split was also evaluated during training (every "
            f"{args.eval_steps} steps) to draw the curve below, as a monitor only; for model selection hold out part "
            "of train with `--validation_split_percentage`."
        ),
        "",
    ]
    for image, title in (("training_curves.png", "Training curves"), ("confusion_matrix.png", "Confusion matrix")):
        if (output_dir / image).exists():
            lines += [f"![{title}]({image})", ""]
    hyperparameters = {
        "optimizer": f"SGD, momentum {args.momentum}",
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": args.lr_scheduler_type,
        "num_warmup_steps": args.num_warmup_steps,
        "max_train_steps": args.max_train_steps,
        "total_batch_size": facts["total_batch_size"],
        "per_device_train_batch_size": facts["per_device_train_batch_size"],
        "gradient_accumulation_steps": facts["gradient_accumulation_steps"],
        "num_processes": facts["num_processes"],
        "max_grad_norm": args.max_grad_norm,
        "image_size": facts["image_size"],
        "crop_scale": list(args.crop_scale),
        "horizontal_flip": args.horizontal_flip,
        "normalisation": f"mean {list(hf_vit.IMAGE_MEAN)}, std {list(hf_vit.IMAGE_STD)}",
        "mixed_precision": facts["mixed_precision"],
        "seed": args.seed,
        "epochs": round(results["epochs"], 2),
    }
    lines += [
        "## Training",
        "",
        "| hyper-parameter | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in hyperparameters.items()),
        "",
    ]
    if facts["changes"]:
        lines += [
            "The run was resumed with changed run-defining arguments (`--allow_changed_arguments`); the table shows "
            "the values of the last session:",
            "",
            *(f"- at step {change['step']}: {'; '.join(change['changes'])}" for change in facts["changes"]),
            "",
        ]
    lines += [
        f"Hardware: {facts['hardware']}. Wall time: {results['train_runtime'] / 60:.1f} min "
        f"({results['train_samples_per_second']:.0f} images/s). Software: hf_vit {hf_vit.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}.",
        "",
        "Command:",
        "",
        "```bash",
        "accelerate launch examples/finetune.py " + shlex.join(facts["argv"]),
        "```",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classify = pipeline("image-classification", model="{args.hub_model_id or output_dir.name}", '
        "trust_remote_code=True)",
        'print(classify("image.png"))',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION_BIBTEX.strip(),
        "```",
        "",
    ]
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)).save(output_dir / "README.md")


def hardware_description(accelerator: Accelerator) -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores visible)"
    return f"{accelerator.num_processes} process(es) on {name}"


# ----------------------------------------------------------------------------------------------------------------


def train_dataloader_for(train, train_pixels, image_size, resample, batch_size: int, loader_kwargs, device):
    """Batches of uint8 images: indexed from the decoded tensor (up to 1 GiB of it on the device) when there is one,
    else decoded by worker processes. Either way one batch feeds one forward pass of every process (accelerate splits
    it) and the order is the same function of (seed, epoch)."""
    options = dict(batch_size=batch_size, shuffle=True, drop_last=True)
    if train_pixels is not None:
        if train_pixels.nbytes <= 1 << 30:
            train_pixels = train_pixels.to(device)
        images = InMemoryImages(train_pixels, train["label"])
        return torch.utils.data.DataLoader(images, collate_fn=as_batch, pin_memory=False, **options)
    collate = Collate(image_size, resample, keep_native_size=True)
    return torch.utils.data.DataLoader(
        train.with_transform(decode_images), collate_fn=collate, **options, **loader_kwargs
    )


def set_up_training(args, accelerator: Accelerator, overrides: dict, labels, train, eval_splits, per_device: int):
    """(model, provenance, optimizer, scheduler, (train, monitor, report) loaders, image size), all prepared.

    `train` is (split, its decoded pixels or None)."""
    num_processes = accelerator.num_processes
    train, train_pixels = train
    model, provenance = load_model(args, overrides, labels, accelerator)
    image_size = tuple(np.broadcast_to(model.config.image_size, 2).tolist())
    resample = hf_vit.image_processor_for(model.config).resample
    num_workers = args.dataloader_num_workers
    if num_workers is None:
        num_workers = 0 if args.dataset_name == DIGITS else min(8, (os.cpu_count() or 1) // num_processes)
    loader_kwargs = dict(
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available()
    )
    train_dataloader = train_dataloader_for(
        train, train_pixels, image_size, resample, per_device * num_processes, loader_kwargs, accelerator.device
    )
    if len(train_dataloader) == 0:
        raise UsageError(
            f"the train split has {len(train)} images, fewer than one batch of {per_device * num_processes}: "
            "lower --total_batch_size."
        )

    def eval_dataloader(split):
        return torch.utils.data.DataLoader(
            split.with_transform(decode_images),
            batch_size=args.per_device_eval_batch_size * num_processes,
            collate_fn=Collate(image_size, resample, keep_native_size=False),
            **{**loader_kwargs, "persistent_workers": False},
        )

    selection, report = eval_splits
    monitor_dataloader = eval_dataloader(selection if selection is not None else report)
    report_dataloader = eval_dataloader(report)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.learning_rate,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        fused=True if accelerator.device.type == "cuda" else None,  # one kernel for all parameters on a GPU
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    model, optimizer, train_dataloader, monitor_dataloader, report_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, monitor_dataloader, report_dataloader, lr_scheduler
    )
    loaders = (train_dataloader, monitor_dataloader, report_dataloader)
    return model, provenance, optimizer, lr_scheduler, loaders, image_size


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    # Everything is checked before anything is written: names, config overrides, the output folder...
    check_model_names(args)
    overrides = parse_overrides(args.config_overrides)
    check_config_overrides(overrides, known_config_fields(args))
    folder_plan = plan_output_dir(args)

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # Without a GPU, say so: accelerate then makes N launched CPU processes one gloo group, not N separate runs.
        cpu=not has_accelerator,
        # Each batch the loader yields is split across the processes, so its size (and the global batch) doesn't
        # depend on the process count, and the scheduler steps once per optimizer step.
        dataloader_config=DataLoaderConfiguration(
            split_batches=True,
            use_seedable_sampler=True,
            data_seed=args.seed,
            non_blocking=torch.cuda.is_available(),  # batches come from pinned memory: copies don't stall the host
        ),
        # torch.compile through accelerate's own plugin: prepare() compiles the model, unwrap_model undoes it.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", fullgraph=True) if args.torch_compile else None,
        # Accumulation runs across epoch ends: every optimizer step sees exactly total_batch_size images.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        log_with=args.report_to if args.with_tracking else None,
        project_dir=str(output_dir),
    )
    num_processes = accelerator.num_processes
    per_device = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    if per_device is None:
        per_device = args.total_batch_size // (num_processes * (accumulation or 1))
    if accumulation is None:
        accumulation = max(1, args.total_batch_size // (num_processes * per_device))
    if per_device * num_processes * accumulation != args.total_batch_size:
        raise UsageError(
            f"--total_batch_size {args.total_batch_size} must equal per_device_train_batch_size ({per_device}) x "
            f"processes ({num_processes}) x gradient_accumulation_steps ({accumulation}): change one of them."
        )
    accelerator.gradient_accumulation_steps = accumulation  # derived from the process count, known only now
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file at each checkpoint is noise
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    # ---- data: loaded, split and (when it fits in memory) decoded once, so that bad images are found now
    with accelerator.main_process_first():  # the main process downloads and caches, the others read the cache
        dataset = load_image_dataset(args)
        train, (selection, selection_name), (report, report_name), labels = prepare_splits(dataset, args)
    splits = {"train": train, report_name: report, **({selection_name: selection} if selection is not None else {})}
    # Every process decodes (each needs the images in memory); an error is the same everywhere, printed once.
    train_pixels = decode_splits(splits, args.decode_check, show_progress=accelerator.is_local_main_process)

    # ---- the run's folder: only the run that owns it resumes in it
    fingerprints = {name.split()[0]: split._fingerprint for name, split in splits.items()}
    identity = run_identity(args, fingerprints, accelerator.mixed_precision)
    checkpoint, changes = checkpoint_to_resume(args, identity)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        # Create the repo first: a bad token or name fails now, not after hours of training.
        repo_id = HfApi().create_repo(args.hub_model_id or output_dir.name, exist_ok=True).repo_id
    created, set_aside = False, None
    if accelerator.is_main_process:
        created, set_aside = start_run_folder(output_dir, folder_plan)
    try:
        accelerator.wait_for_everyone()
        setup = set_up_training(
            args, accelerator, overrides, labels, (train, train_pixels), (selection, report), per_device
        )
        state = load_checkpoint(accelerator, checkpoint, args.max_train_steps) if checkpoint else None
        # Every process is set up before the old contents go: a process that failed has left this barrier to
        # torchrun, which stops the others (a KeyboardInterrupt here), so the folder is put back.
        accelerator.wait_for_everyone()
    except BaseException:  # nothing trained yet: the folder goes back to what it was (or away, if this run made it)
        if accelerator.is_main_process:
            undo_run_folder(output_dir, folder_plan, created, set_aside)
        raise
    if accelerator.is_main_process:
        keep_run_folder(output_dir, set_aside, identity)
    model, provenance, optimizer, lr_scheduler, loaders, image_size = setup
    train_dataloader, monitor_dataloader, report_dataloader = loaders
    monitor_split, monitor_name = (selection, selection_name) if selection is not None else (report, report_name)
    metric = evaluate.load(str(ACCURACY_METRIC))  # evaluate's "accuracy", from a local script: works offline
    if args.with_tracking:
        hyperparameters = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("finetune", config=hyperparameters)

    # ---- resume
    completed_steps = 0
    history = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_accuracy": []}
    elapsed_before, recorded_changes = 0.0, []
    if args.resume_from_checkpoint == "latest" and checkpoint is None:
        logger.info(f"No checkpoint in {output_dir / 'checkpoints'}: starting from scratch.")
    if state:
        completed_steps, history, elapsed_before = state["completed_steps"], state["history"], state["elapsed"]
        recorded_changes = state.get("changes", [])
        if changes:
            recorded_changes = [*recorded_changes, {"step": completed_steps, "changes": changes}]
            logger.warning(f"Resumed with changed arguments (--allow_changed_arguments): {'; '.join(changes)}.")
        logger.info(f"Resumed from {checkpoint} at step {completed_steps}.")

    micro_batches_per_epoch = len(train_dataloader)
    logger.info(
        f"{len(train)} training images, {len(labels)} classes; {args.max_train_steps} steps of {args.total_batch_size} "
        f"images = {num_processes} process(es) x {per_device} x {accumulation} accumulation; "
        f"evaluating on {monitor_name} every {args.eval_steps} steps, reporting on {report_name}.",
        main_process_only=True,
    )

    # ---- train
    # A progress bar on the main process with loss, lr and img/s; closed before any error message is printed.
    progress_bar = tqdm(
        total=args.max_train_steps,
        initial=completed_steps,
        disable=not accelerator.is_local_main_process,
        desc="train",
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not one per step
    )
    micro_batch = per_device * num_processes
    model.train()
    session_start, session_steps = time.time(), 0
    first_read = None  # (time, steps) at the session's first loss read: the steady rate excludes the warm-up before it
    steady_images_per_second = None
    unlogged = []  # (step, lr, loss on the device) of the steps since the losses were last read
    try:
        with progress_bar as progress:
            while completed_steps < args.max_train_steps:
                consumed = completed_steps * accumulation  # micro-batches since the start
                epoch, skip = divmod(consumed, micro_batches_per_epoch)
                train_dataloader.set_epoch(epoch)  # the shuffle order is a function of (seed, epoch)
                # On resume, skip the batches the interrupted run already trained on in this epoch.
                batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
                micro_step, step_loss = 0, torch.zeros((), device=accelerator.device)
                for batch in batches:
                    if "error" in batch:
                        raise UsageError(batch["error"], this_process_only=True)
                    if micro_step == 0:
                        # Each step's randomness comes from (seed, step), not from wherever the RNG happens to be: a resumed
                        # run then draws what an uninterrupted one draws, though its loaders restarted.
                        set_seed(args.seed + completed_steps, device_specific=True)
                        uniforms = step_uniforms(args.seed, completed_steps, args.total_batch_size)
                        if uniforms.device != accelerator.device and torch.cuda.is_available():
                            uniforms = uniforms.pin_memory().to(accelerator.device, non_blocking=True)  # no sync
                    start = micro_step * micro_batch + accelerator.process_index * per_device  # this process's images
                    with accelerator.accumulate(model):
                        pixel_values = random_resized_crop(
                            batch["pixel_values"],
                            uniforms[start : start + len(batch["labels"])],
                            image_size,
                            tuple(args.crop_scale),
                            args.horizontal_flip,
                        )
                        loss = model(pixel_values=pixel_values, labels=batch["labels"]).loss
                        step_loss += loss.detach() / accumulation
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                    micro_step += 1
                    if not accelerator.sync_gradients:
                        continue

                    completed_steps += 1
                    session_steps += 1
                    unlogged.append((completed_steps, lr_scheduler.get_last_lr()[0], step_loss))
                    micro_step, step_loss = 0, torch.zeros((), device=accelerator.device)
                    progress.update(1)
                    evaluating = completed_steps % args.eval_steps == 0 or completed_steps == args.max_train_steps
                    checkpointing = (
                        completed_steps % args.checkpointing_steps == 0 and completed_steps < args.max_train_steps
                    )
                    if not (evaluating or checkpointing or completed_steps % args.logging_steps == 0):
                        continue  # the device runs ahead: the losses are read once per logging interval

                    logs = log_losses(unlogged, accelerator, history, output_dir)  # the one host sync
                    images_per_second = session_steps * args.total_batch_size / (time.time() - session_start)
                    if first_read is None:
                        first_read = (time.time(), session_steps)
                    elif session_steps > first_read[1]:  # the host just synced: the device did all these steps
                        steps_since, seconds_since = session_steps - first_read[1], time.time() - first_read[0]
                        steady_images_per_second = steps_since * args.total_batch_size / seconds_since
                    progress.set_postfix(
                        loss=f"{logs['train_loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.0f}"
                    )
                    logs["images_per_second"] = images_per_second
                    if evaluating:
                        accuracy, _, _ = evaluate_split(model, monitor_dataloader, accelerator, metric)
                        history["eval_step"].append(completed_steps)
                        history["eval_accuracy"].append(accuracy)
                        logs[f"eval_accuracy_{monitor_name.split()[0]}"] = accuracy
                        logger.info(f"step {completed_steps}: {monitor_name} accuracy {accuracy:.4f}")
                    if args.with_tracking:
                        accelerator.log(logs, step=completed_steps)
                    if checkpointing:
                        elapsed = elapsed_before + time.time() - started
                        training_state = {
                            "completed_steps": completed_steps,
                            "history": history,
                            "elapsed": elapsed,
                            "run": identity,
                            "changes": recorded_changes,
                        }
                        save_checkpoint(
                            accelerator, output_dir, completed_steps, training_state, args.checkpoints_total_limit
                        )
                    if completed_steps >= args.max_train_steps:
                        break

        train_runtime = elapsed_before + time.time() - started  # wall time, all sessions, loading included

        # ---- final evaluation, model, card, results
        report_accuracy, predictions, references = evaluate_split(model, report_dataloader, accelerator, metric)
        selection_accuracy = history["eval_accuracy"][-1] if selection is not None else None
        best = int(np.argmax(history["eval_accuracy"]))
        results = {
            "eval_accuracy": report_accuracy,
            "eval_split": report_name,
            "eval_samples": len(report),
            "selection_accuracy": selection_accuracy,
            "selection_split": selection_name,
            "selection_samples": len(selection) if selection is not None else None,
            "best_eval_accuracy": history["eval_accuracy"][best],
            "best_eval_step": history["eval_step"][best],
            "best_eval_split": monitor_name,
            "monitor_samples": len(monitor_split),
            "train_loss": history["loss"][-1],
            "train_steps": completed_steps,
            "train_samples": len(train),
            "epochs": completed_steps * args.total_batch_size / len(train),
            "train_runtime": train_runtime,
            "train_samples_per_second": completed_steps * args.total_batch_size / max(train_runtime, 1e-9),
            # after the first --logging_steps of the last session (start-up, compilation), evaluations included
            "steady_train_samples_per_second": steady_images_per_second,
            "total_batch_size": args.total_batch_size,
            "num_processes": num_processes,
        }
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(
            output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(model),
        )
        if accelerator.is_main_process:
            plot_training_curves(history, monitor_name, output_dir / "training_curves.png")
            plot_confusion_matrix(
                references,
                predictions,
                labels,
                f"{report_name}: accuracy {report_accuracy:.4f}",
                output_dir / "confusion_matrix.png",
            )
            config = unwrapped.config
            facts = {
                "provenance": provenance,
                "labels": labels,
                "train_samples": len(train),
                "monitor_split": monitor_name,
                "image_size": image_size[0] if image_size[0] == image_size[1] else f"{image_size[0]}x{image_size[1]}",
                "architecture": f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{config.num_attention_heads} heads, MLP {config.intermediate_size}, patch {config.patch_size}, "
                f"classifier {config.classifier}, {unwrapped.num_parameters():,} parameters",
                "total_batch_size": args.total_batch_size,
                "per_device_train_batch_size": per_device,
                "gradient_accumulation_steps": accumulation,
                "num_processes": num_processes,
                "mixed_precision": accelerator.mixed_precision,
                "hardware": hardware_description(accelerator),
                "argv": sys.argv[1:] if argv is None else argv,
                "changes": recorded_changes,
            }
            write_model_card(output_dir, args, results, facts)
            (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
            print(f"{report_name} accuracy: {report_accuracy:.4f} ({len(report)} images) -> {output_dir}")
            if args.push_to_hub:
                HfApi().upload_folder(
                    repo_id=repo_id,
                    folder_path=str(output_dir),
                    commit_message=f"examples/finetune.py: {report_name} accuracy {report_accuracy:.4f}",
                    ignore_patterns=["checkpoints/**", ".converted/**", "*.partial/**", "run.json"],
                )
        if args.with_tracking:
            accelerator.end_training()
        accelerator.wait_for_everyone()
    except KeyboardInterrupt:  # Ctrl-C, or the SIGTERM with which `accelerate launch` stops its child
        found = checkpoint_folders(output_dir)
        where = f"the last checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        when = "while writing the final model, after" if completed_steps == args.max_train_steps else "at"
        raise Interrupted(
            f"interrupted {when} step {completed_steps} of {args.max_train_steps}; {where}. Continue with the same "
            "command and --resume_from_checkpoint latest."
        ) from None

    return results


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, max_train_steps: int) -> dict:
    """Load `checkpoint` into the prepared model, optimizer, scheduler and RNGs; its training_state.json."""
    state = read_training_state(checkpoint)
    if state["completed_steps"] >= max_train_steps:
        raise UsageError(
            f"{checkpoint} is at step {state['completed_steps']}, not before --max_train_steps {max_train_steps}: "
            "raise --max_train_steps (with --allow_changed_arguments) to train on."
        )
    try:
        accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler, scaler, RNG states
    except Exception as error:  # a checkpoint of another model, or a damaged one
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        # load_state_dict's first line only says "Error(s) in loading state_dict for X:"; the next one says what.
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise UsageError(
            f"cannot resume from {checkpoint}: it does not fit the model this command builds ({detail.rstrip(':.')}); "
            "resume with the model arguments of the run that wrote it."
        ) from None
    return state


def exit_with(line: str, status: int, every_process: bool = False) -> None:
    """End the process with one line on stderr, printed by the main process unless every process found it itself.

    Under a multi-process `accelerate launch` (torchrun) the same line goes into torch's error file, so that the
    failure summary torchrun prints after it names this line as the root cause instead of a blank traceback.
    """
    if os.environ.get("RANK", "0") == "0" or every_process:
        print(line, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # the file format of torch.distributed.elastic's @record
        message = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
        Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps({"message": message}))
    sys.exit(status)


def stop(signum, frame):
    """SIGINT and SIGTERM: stop once, as KeyboardInterrupt; the signals that follow (the launcher's SIGTERM after
    the terminal's SIGINT) do nothing, so that the one line is printed. (Switching to SIG_IGN here instead would
    make CPython raise 'Signal 15 ignored due to race condition' for a SIGTERM already pending.)"""
    if not stop.stopping:
        stop.stopping = True
        raise KeyboardInterrupt


stop.stopping = False


if __name__ == "__main__":
    # accelerate's launcher stops its child with SIGTERM when the user presses Ctrl-C: treat both alike.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        main()
    except (UsageError, RunFolderError) as error:
        exit_with(f"finetune.py: error: {error}", 2, every_process=getattr(error, "this_process_only", False))
    except NonFiniteLossError as error:
        exit_with(f"finetune.py: error: {error}", 1)
    except Interrupted as error:
        exit_with(f"finetune.py: {error}", 130)
    except KeyboardInterrupt:
        exit_with("finetune.py: interrupted before training started; nothing was trained.", 130)
