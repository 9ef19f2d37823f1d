"""The data of the example scripts: a DatasetDict with one image and one label column, from the Hub, a save_to_disk
folder, image folders or scikit-learn's digits; split into train / selection / report; decoded to uint8 once when it
fits in memory (unreadable images are found before training), else on the loaders' workers."""

import argparse
import io
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .cli import UsageError, close_matches, one_line, transient_progress


DIGITS = "digits"
IMAGE_COLUMNS = ("image", "img", "picture", "photo")  # tried in this order when no column has the Image feature
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
# The decode pass checks every image before training when the decoded dataset fits in this many bytes.
DECODE_CHECK_LIMIT = 4 << 30
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # what datasets' save_to_disk writes


def add_data_arguments(group, held_out_validation: bool = True) -> None:
    """The data flags of every script; `held_out_validation`: --validation_split_percentage (training scripts)."""
    group.add_argument(
        "--dataset_name",
        default=DIGITS,
        help="A Hub dataset (uoft-cs/cifar10), a save_to_disk folder, or 'digits' (scikit-learn's, offline).",
    )
    group.add_argument("--dataset_config_name", help="The dataset's configuration name, if it has several.")
    group.add_argument("--train_dir", help="An imagefolder of training images (one sub-folder per class).")
    group.add_argument("--validation_dir", help="An imagefolder of evaluation images.")
    group.add_argument("--image_column_name", help="Default: the column with the Image feature, else image/img.")
    group.add_argument("--label_column_name", help="Default: the ClassLabel column, else label/fine_label.")
    if held_out_validation:
        group.add_argument(
            "--validation_split_percentage",
            type=float,
            default=0,
            help="Hold out this percentage of train for model selection; the test split is then only used at the end.",
        )
    group.add_argument("--max_train_samples", type=int, help="Truncate the training set (quick runs).")
    group.add_argument("--max_eval_samples", type=int, help="Truncate the evaluation sets (quick runs).")


@dataclass(frozen=True)
class DataSource:
    """What the user named as the data, and what kind of source it is: 'digits', 'imagefolder', 'saved'
    (a save_to_disk folder), 'local' (another folder datasets reads) or 'hub' (a Hub dataset id)."""

    kind: str
    name: str  # the folder(s) or id as given

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataSource":
        if args.train_dir or args.validation_dir:
            return cls("imagefolder", args.train_dir or args.validation_dir)
        name = args.dataset_name
        if Path(name).is_dir() and any((Path(name) / file).exists() for file in SAVED_DATASET_FILES):
            return cls("saved", name)
        if name == DIGITS:
            return cls("digits", name)
        return cls("local" if Path(name).is_dir() else "hub", name)

    @property
    def hub_id(self) -> str | None:
        return self.name if self.kind == "hub" else None


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


def load_image_dataset(args: argparse.Namespace, show_progress: bool = False) -> datasets.DatasetDict:
    """The dataset the arguments name, as a DatasetDict; a one-line UsageError when it can't be loaded."""
    source = DataSource.from_args(args)
    for flag, folder in (("--train_dir", args.train_dir), ("--validation_dir", args.validation_dir)):
        if folder and not Path(folder).is_dir():  # before datasets caches an empty dataset under its name
            raise UsageError(f"{flag} {folder} is not a folder: give a folder of images, one sub-folder per class.")
    try:
        with transient_progress(f"loading {source.name}", enabled=show_progress):
            if source.kind == "imagefolder":
                data_files = {}
                if args.train_dir:
                    data_files["train"] = os.path.join(args.train_dir, "**")
                if args.validation_dir:
                    data_files["validation"] = os.path.join(args.validation_dir, "**")
                dataset = datasets.load_dataset("imagefolder", data_files=data_files)
            elif source.kind == "saved":
                dataset = datasets.load_from_disk(source.name)
            elif source.kind == "digits":
                dataset = load_digits_dataset()
            else:
                dataset = datasets.load_dataset(source.name, args.dataset_config_name)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise UsageError(f"cannot load dataset {source.name!r}: {type(error).__name__}: {one_line(error)}") from None
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict(train=dataset)
    if not isinstance(dataset, datasets.DatasetDict):
        raise UsageError(
            f"dataset {source.name!r} is a {type(dataset).__name__}; expected a DatasetDict with a train split."
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


@dataclass
class Splits:
    """train; `selection` (validation: monitored during training, may pick a model) or None; `report` (test, else
    validation: the number reported); `labels` the class names. Each split has columns image (undecoded) and label."""

    train: datasets.Dataset
    selection: datasets.Dataset | None
    selection_name: str | None
    report: datasets.Dataset
    report_name: str
    labels: list[str]
    source: DataSource

    @property
    def monitor(self) -> tuple[datasets.Dataset, str]:
        """The split evaluated during training: selection if there is one, else report."""
        return (self.selection, self.selection_name) if self.selection is not None else (self.report, self.report_name)

    def named(self) -> dict[str, datasets.Dataset]:
        named = {"train": self.train, self.report_name: self.report}
        return {**named, self.selection_name: self.selection} if self.selection is not None else named

    def fingerprints(self) -> dict[str, str]:
        return {name.split()[0]: split._fingerprint for name, split in self.named().items()}


def standardise_columns(dataset: datasets.DatasetDict, args: argparse.Namespace, reference: str = "train"):
    """(dataset with columns image (undecoded) and label (ClassLabel) in every split, the class names); the columns
    are detected on the `reference` split, whose distinct values become the classes when labels are plain values."""
    source = DataSource.from_args(args)
    image_column, label_column = detect_columns(dataset[reference], args.image_column_name, args.label_column_name)
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns({image_column: "image", label_column: "label"})
    # Decode ourselves, on the loader's workers, so that an unreadable file is reported with its name.
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if len(dataset[reference]) == 0:
        raise UsageError(f"the {reference} split of {source.name!r} is empty.")
    if isinstance(dataset[reference].features["label"], datasets.ClassLabel):
        return dataset, list(dataset[reference].features["label"].names)
    # plain ints or strings: the distinct values of the reference split, sorted, become the classes of every split
    values = sorted(set(dataset[reference]["label"]))
    labels, index = [str(value) for value in values], {value: i for i, value in enumerate(values)}
    unknown = {value for split in dataset.values() for value in split["label"]} - set(values)
    if unknown:
        raise UsageError(f"labels {sorted(unknown)[:5]} appear in an evaluation split but not in {reference}.")
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=labels)})
    dataset = dataset.map(
        lambda batch: {"label": [index[value] for value in batch["label"]]},
        batched=True,
        features=features,
        keep_in_memory=True,
    )
    return dataset, labels


def default_report_split(dataset: datasets.DatasetDict) -> str | None:
    """The split a number is reported on: test, else validation."""
    return "test" if "test" in dataset else "validation" if "validation" in dataset else None


def prepare_splits(dataset: datasets.DatasetDict, args: argparse.Namespace) -> Splits:
    """The splits of `dataset`: report = test (else validation); selection never touches it."""
    source = DataSource.from_args(args)
    if "train" not in dataset:
        raise UsageError(f"dataset {source.name!r} has no train split (splits: {', '.join(dataset)}).")
    dataset, labels = standardise_columns(dataset, args)
    train = dataset["train"]

    report_name = default_report_split(dataset)
    selection, selection_name = None, None
    if report_name == "test" and "validation" in dataset:
        selection, selection_name = dataset["validation"], "validation"
    if args.validation_split_percentage:
        held_out = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, selection, selection_name = held_out["train"], held_out["test"], "validation (held out from train)"
    if report_name is None:
        if selection is None:
            raise UsageError(
                f"dataset {source.name!r} has no test or validation split (it has {', '.join(dataset)}): pass "
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
            raise UsageError(f"the {name} split of {source.name!r} is empty.")
    return Splits(train, selection, selection_name, report, report_name, labels, source)


def load_splits(args: argparse.Namespace, accelerator: Accelerator) -> Splits:
    """The dataset loaded and split; the main process downloads and caches, the others read its cache."""
    with accelerator.main_process_first():
        dataset = load_image_dataset(args, show_progress=accelerator.is_local_main_process)
        return prepare_splits(dataset, args)


@dataclass
class EvaluationSplits:
    """What an evaluation reads: the evaluated split, the train split (the shots of --fewshot) or None, the class
    names (indices as finetune.py's, from train when there is one) and the source."""

    evaluated: datasets.Dataset
    evaluated_name: str
    train: datasets.Dataset | None
    labels: list[str]
    source: DataSource


def evaluation_splits(dataset: datasets.DatasetDict, args: argparse.Namespace, with_train: bool) -> EvaluationSplits:
    """--split (default: test, else validation) of `dataset`, and its train split when `with_train`."""
    source = DataSource.from_args(args)
    name = args.split or default_report_split(dataset)
    if name is None:
        raise UsageError(
            f"dataset {source.name!r} has no test or validation split (it has {', '.join(dataset)}): pass --split."
        )
    if name not in dataset:
        raise UsageError(
            f"dataset {source.name!r} has no split {name!r}{close_matches(name, list(dataset))}: choose from "
            f"{', '.join(dataset)}."
        )
    if with_train and "train" not in dataset:
        raise UsageError(
            f"--fewshot draws its shots from the train split, and dataset {source.name!r} has none "
            f"(splits: {', '.join(dataset)})."
        )
    dataset, labels = standardise_columns(dataset, args, reference="train" if "train" in dataset else name)
    evaluated, train = dataset[name], dataset["train"] if with_train else None
    if args.max_eval_samples:
        evaluated = evaluated.select(range(min(args.max_eval_samples, len(evaluated))))
    if train is not None and args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if len(evaluated) == 0:
        raise UsageError(f"the {name} split of {source.name!r} is empty.")
    return EvaluationSplits(evaluated, name, train, labels, source)


def load_evaluation_splits(args: argparse.Namespace, accelerator: Accelerator, with_train: bool) -> EvaluationSplits:
    """The dataset loaded, the evaluated split chosen; the main process downloads and caches, the others read it."""
    with accelerator.main_process_first():
        dataset = load_image_dataset(args, show_progress=accelerator.is_local_main_process)
        return evaluation_splits(dataset, args, with_train)


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
    # leave=False: the bar is cleared once done, so that an error line is not preceded by it
    with tqdm(total=total, desc="decoding images", unit="img", disable=not show_progress, leave=False) as progress:
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


def loader_options(num_workers: int | None, source: DataSource, num_processes: int) -> dict:
    """DataLoader options shared by the training and evaluation loaders."""
    if num_workers is None:
        num_workers = 0 if source.kind == "digits" else min(8, (os.cpu_count() or 1) // num_processes)
    return dict(num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def train_dataloader_for(train, train_pixels, image_size, resample, batch_size: int, loader_kwargs, device):
    """Batches of uint8 images: indexed from the decoded tensor (up to 1 GiB of it on the device) when there is one,
    else decoded by worker processes. Either way one batch feeds one forward pass of every process (accelerate splits
    it) and the order is the same function of (seed, epoch)."""
    options = dict(batch_size=batch_size, shuffle=True, drop_last=True)
    if len(train) < batch_size:
        raise UsageError(
            f"the train split has {len(train)} images, fewer than one batch of {batch_size}: lower --total_batch_size."
        )
    if train_pixels is not None:
        if train_pixels.nbytes <= 1 << 30:
            train_pixels = train_pixels.to(device)
        images = InMemoryImages(train_pixels, train["label"])
        return torch.utils.data.DataLoader(images, collate_fn=as_batch, pin_memory=False, **options)
    collate = Collate(image_size, resample, keep_native_size=True)
    return torch.utils.data.DataLoader(
        train.with_transform(decode_images), collate_fn=collate, **options, **loader_kwargs
    )


class Preprocessed:
    """Collate a batch through an evaluation preprocessing (PIL images -> normalised float (B, 3, H, W)), on the
    loader's workers."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, examples: list[dict]) -> dict:
        errors = [example["error"] for example in examples if example["error"]]
        if errors:
            return {"error": errors[0]}
        pixel_values = self.preprocess([example["image"] for example in examples])
        return {"pixel_values": pixel_values, "labels": torch.tensor([e["label"] for e in examples])}


def eval_dataloader_for(split, collate, batch_size: int, loader_kwargs):
    """Batches decoded by worker processes and collated by `collate` (a resize, or a Preprocessed), in the split's
    order."""
    return torch.utils.data.DataLoader(
        split.with_transform(decode_images),
        batch_size=batch_size,
        collate_fn=collate,
        **{**loader_kwargs, "persistent_workers": False},
    )


def training_batches(train_dataloader, accelerator: Accelerator, completed_steps: int, max_train_steps: int):
    """(step, micro_step, batch) for every micro-batch from optimizer step `completed_steps` to `max_train_steps`.

    Accumulation runs across epoch ends, so every optimizer step sees exactly the global batch. The shuffle order is
    a function of (seed, epoch), and a resumed run skips the batches it already trained on in its epoch: it sees
    what an uninterrupted run sees. A batch an image could not be decoded in is one UsageError line.
    """
    accumulation = accelerator.gradient_accumulation_steps
    consumed = completed_steps * accumulation  # micro-batches since the start
    while consumed < max_train_steps * accumulation:
        epoch, skip = divmod(consumed, len(train_dataloader))
        train_dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch in batches:
            if "error" in batch:
                raise UsageError(batch["error"], this_process_only=True)
            step, micro_step = divmod(consumed, accumulation)
            yield step, micro_step, batch
            consumed += 1
            if consumed == max_train_steps * accumulation:
                return
