"""Few-shot linear evaluation, the paper's second protocol (Section 4.1), as big_vision's
`evaluators/fewshot_lsr.py` computes it: a closed-form ridge regression from the frozen representation of `shots`
training images per class to {-1, 1} targets, then the top-1 accuracy of its argmax on the evaluated split.

What is reproduced:
- the representation is the model's pre-logits: the head's input (`pre_logits` where the model has them, else the
  pooled token), big_vision's `representation_layer="pre_logits"`;
- the shots' features are standardised with their own mean and standard deviation (+1e-5), the test features with
  the same statistics; a constant feature of 100 is appended, so that the bias is almost unregularised;
- targets are one-hot vectors rescaled to {-1, 1}; the L2 strength is fixed (big_vision's configs: 2 ** 10), with no
  selection on held-out data;
- for seed s, each class's training images are permuted with `np.random.default_rng(s)` (class by class, in class
  order) and the first `shots` taken, so the 1-shot images are among the 5-shot ones; seeds 0, 1, 2 by default
  (big_vision's `num_seeds=3`). big_vision reports each seed as its own metric; here their mean, and each seed.

Where it differs: big_vision takes fewer images without a word when a class has fewer than `shots`; here that is an
error. It solves in float32 through an eigendecomposition cached for several L2 strengths; with one strength,
`numpy.linalg.solve` in float64 on the smaller of the primal (D x D) and dual (N x N) systems gives the same solution,
to float32 rounding. big_vision preprocesses with its few-shot configs' resize and central crop; here the
evaluation's `--preprocessing`, for the shots (the train split) and the test images (the evaluated split) alike.
"""

import numpy as np

from .cli import UsageError


L2_REG = 2.0**10  # big_vision's configs: config.evals.fewshot.l2_reg
BIAS_CONSTANT = 100.0  # big_vision's constant feature: large, so that the bias is barely regularised
NUM_SEEDS = 3  # big_vision's num_seeds


def check_shots(train_labels: np.ndarray, class_names: list[str], shots: list[int]) -> None:
    """More shots than a class has training images is a UsageError naming the class."""
    counts = np.bincount(train_labels, minlength=len(class_names))
    fewest = int(counts.argmin())
    if max(shots) > counts[fewest]:
        raise UsageError(
            f"--fewshot {max(shots)} needs {max(shots)} training images of every class, but class "
            f"{class_names[fewest]!r} has {counts[fewest]}: choose at most {counts[fewest]} shots."
        )


def shot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """The training images of one few-shot task: the first `shots` of each class after the seed's permutation."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)])


def ridge_accuracy(x_train, y_train, x_test, y_test, num_classes: int, l2_reg: float = L2_REG) -> float:
    """Top-1 accuracy on (x_test, y_test) of the ridge regression fitted on (x_train, y_train)."""
    x = x_train.astype(np.float64)
    mean, std = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + 1e-5

    def design(features):
        standardised = (features.astype(np.float64) - mean) / std
        return np.pad(standardised, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)

    x = design(x)
    y = 2.0 * np.eye(num_classes)[y_train] - 1.0
    num_points, dim = x.shape
    if num_points >= dim:  # (X^T X + l2 I)^-1 X^T Y
        weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(dim), x.T @ y)
    else:  # the same solution through the smaller system: X^T (X X^T + l2 I)^-1 Y
        weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(num_points), y)
    predictions = (design(x_test) @ weights).argmax(axis=1)
    return float((predictions == y_test).mean())


def fewshot_accuracy(
    x_train, y_train, x_test, y_test, num_classes: int, shots: list[int], seeds: list[int], l2_reg: float = L2_REG
) -> dict[int, dict]:
    """`{shots: {"accuracy": mean over the seeds, "per_seed": [accuracy of each seed]}}`."""
    results = {}
    for count in shots:
        per_seed = [
            ridge_accuracy(x_train[chosen], y_train[chosen], x_test, y_test, num_classes, l2_reg)
            for chosen in (shot_indices(y_train, num_classes, count, seed) for seed in seeds)
        ]
        results[count] = {"accuracy": float(np.mean(per_seed)), "per_seed": per_seed}
    return results
