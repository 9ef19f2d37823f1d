"""The evaluation metrics: METRICS maps a name to a function of (predictions, references). Everything that reports
a metric (the training log, history, trackers, all_results.json, the curves, the model card) loops over this dict,
so a new metric is one entry; the first one is the one the best evaluation is chosen by."""

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from .cli import UsageError


EXAMPLES = Path(__file__).resolve().parents[1]


def import_evaluate_library():
    """The `evaluate` library: examples/evaluate.py has its name, and the scripts' folder comes first on sys.path
    (it is how they find this package), so the library is imported with that folder out of the path."""
    if "evaluate" in sys.modules and Path(getattr(sys.modules["evaluate"], "__file__", "")).parent != EXAMPLES:
        return sys.modules["evaluate"]
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != EXAMPLES]
    sys.modules.pop("evaluate", None)
    try:
        return importlib.import_module("evaluate")
    finally:
        sys.path[:] = saved


evaluate = import_evaluate_library()


class EvaluateMetric:
    """A metric of the `evaluate` library, loaded on first use: (predictions, references) -> its `key` value."""

    def __init__(self, path: str, key: str, **compute_options):
        self.path, self.key, self.compute_options = path, key, compute_options
        self.module = None

    def __call__(self, predictions: np.ndarray, references: np.ndarray) -> float:
        if self.module is None:
            self.module = evaluate.load(self.path)
        return self.module.compute(predictions=predictions, references=references, **self.compute_options)[self.key]


# evaluate's "accuracy", from a copy of its script beside the examples: works offline
ACCURACY_SCRIPT = str(Path(__file__).resolve().parents[1] / "metrics" / "accuracy")

METRICS = {
    "accuracy": EvaluateMetric(ACCURACY_SCRIPT, "accuracy"),
    # e.g. "macro_f1": EvaluateMetric("f1", "f1", average="macro"),  (downloads evaluate's f1 script once)
}
MAIN_METRIC = next(iter(METRICS))


@dataclass
class Evaluation:
    metrics: dict[str, float]  # name -> value, in the order of METRICS
    predictions: np.ndarray
    references: np.ndarray


@dataclass
class Predictions:
    """What a model said about every image of a split, in the split's order, gathered from every process."""

    top: np.ndarray  # (N, k) class indices, the most likely first
    references: np.ndarray  # (N,) the true classes
    losses: np.ndarray | None = None  # (N,) float64 cross-entropy of each image
    features: np.ndarray | None = None  # (N, D) float32 representation: the input of the classification head


def classification_head(model) -> torch.nn.Module:
    """The layer that turns the representation into logits: hf_vit's `head`, transformers' `classifier`."""
    for name in ("head", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise UsageError(f"{type(model).__name__} has neither a `head` nor a `classifier` layer to read features from.")


def predict(
    model,
    dataloader,
    accelerator: Accelerator,
    normalize=None,
    *,
    top_k=1,
    losses=False,
    label_map=None,
    features=False,
    progress=None,
) -> Predictions:
    """Every image of the split through the model, batch by batch on every process; run it under no_grad or
    inference_mode. The losses are against `label_map[label]`, the model's index of each dataset class (default: the
    same index). `features` records the head's input (pre_logits where the model has them, else the pooled
    token) with a forward pre-hook, so any model with a `head` or `classifier` gives its representation."""
    model.eval()
    recorded, gathered = [], {"top": [], "references": [], "losses": [], "features": []}
    hook = None
    if features:
        head = classification_head(accelerator.unwrap_model(model))
        hook = head.register_forward_pre_hook(lambda module, inputs: recorded.append(inputs[0]))
    try:
        for batch in dataloader:
            if "error" in batch:
                raise UsageError(batch["error"], this_process_only=True)
            pixel_values = batch["pixel_values"] if normalize is None else normalize(batch["pixel_values"])
            logits = model(pixel_values=pixel_values).logits.float()
            outputs = {"top": logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices, "references": batch["labels"]}
            if losses:
                targets = batch["labels"] if label_map is None else label_map.to(logits.device)[batch["labels"]]
                outputs["losses"] = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            if features:
                outputs["features"] = recorded[-1].float()
            recorded.clear()
            # gather_for_metrics drops the samples accelerate repeated to give every process a full last batch.
            outputs = accelerator.gather_for_metrics(outputs)
            for name, value in outputs.items():
                gathered[name].append(value.cpu().numpy())
            if progress is not None:
                progress.update(len(outputs["references"]))
    finally:
        if hook is not None:
            hook.remove()
    arrays = {name: np.concatenate(values) if values else None for name, values in gathered.items()}
    if arrays["losses"] is not None:
        arrays["losses"] = arrays["losses"].astype(np.float64)
    return Predictions(**arrays)


def evaluate_split(model, dataloader, accelerator: Accelerator, normalize) -> Evaluation:
    """Every metric over the whole split, from the predictions of every process."""
    with torch.no_grad():
        predictions = predict(model, dataloader, accelerator, normalize)
    model.train()
    top1 = predictions.top[:, 0]
    values = {name: float(metric(top1, predictions.references)) for name, metric in METRICS.items()}
    return Evaluation(values, top1, predictions.references)


def classification_metrics(predictions: Predictions, label_map: np.ndarray, labels: list[str]) -> dict:
    """eval_accuracy (every metric of METRICS) over the model's whole head, eval_top5_accuracy, eval_loss and the
    accuracy of each of the dataset's classes; `label_map[i]` is the model's index of the dataset's class i."""
    targets = label_map[predictions.references]
    top1 = predictions.top[:, 0]
    results = {f"eval_{name}": float(metric(top1, targets)) for name, metric in METRICS.items()}
    results["eval_top5_accuracy"] = float((predictions.top[:, :5] == targets[:, None]).any(axis=1).mean())
    results["eval_loss"] = float(predictions.losses.mean())
    correct = top1 == targets
    results["eval_per_class_accuracy"] = {
        label: float(correct[predictions.references == index].mean())
        if (predictions.references == index).any()
        else None
        for index, label in enumerate(labels)
    }
    return results


def dataset_class_predictions(predictions: Predictions, label_map: np.ndarray) -> np.ndarray:
    """The top-1 predictions as the dataset's class indices; a class of the model outside them is len(label_map)."""
    to_dataset = {int(model_index): index for index, model_index in enumerate(label_map)}
    return np.array([to_dataset.get(int(p), len(label_map)) for p in predictions.top[:, 0]])
