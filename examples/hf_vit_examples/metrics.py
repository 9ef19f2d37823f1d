"""The evaluation metrics: METRICS maps a name to a function of (predictions, references). Everything that reports
a metric (the training log, history, trackers, all_results.json, the curves, the model card) loops over this dict,
so a new metric is one entry; the first one is the one the best evaluation is chosen by."""

from dataclasses import dataclass
from pathlib import Path

import evaluate
import numpy as np
import torch
from accelerate import Accelerator

from .cli import UsageError


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


def evaluate_split(model, dataloader, accelerator: Accelerator, normalize) -> Evaluation:
    """Every metric over the whole split, from the predictions of every process."""
    model.eval()
    all_predictions, all_references = [], []
    for batch in dataloader:
        if "error" in batch:
            raise UsageError(batch["error"])
        with torch.no_grad():
            logits = model(pixel_values=normalize(batch["pixel_values"])).logits
        # gather_for_metrics drops the samples accelerate repeated to give every process a full last batch.
        predictions, references = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"]))
        all_predictions.append(predictions.cpu().numpy())
        all_references.append(references.cpu().numpy())
    model.train()
    predictions, references = np.concatenate(all_predictions), np.concatenate(all_references)
    values = {name: float(metric(predictions, references)) for name, metric in METRICS.items()}
    return Evaluation(values, predictions, references)
