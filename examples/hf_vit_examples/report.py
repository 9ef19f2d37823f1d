"""What a run leaves for people: all_results.json, the model card (huggingface_hub's ModelCard, with validated
metadata), the training curves and confusion matrix, and the push to the Hub."""

import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import transformers
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

import hf_vit
from conversion.model_card import CITATION_BIBTEX

from .data import DataSource
from .metrics import MAIN_METRIC, METRICS
from .models import Provenance
from .optimizer import describe_optimizer


# Google's original checkpoints are released under Apache 2.0 (github.com/google-research/vision_transformer); so is
# hf_vit, the code a model trained from scratch comes from. Change it in the card if the data's terms ask for another.
DEFAULT_LICENSE = "apache-2.0"


def process_start_time() -> float:
    """When this process started (imports included): the wall time a user waited for, from the shell's prompt."""
    return psutil.Process().create_time()


def launch_command(script: str, argv: list[str]) -> str:
    """The command that started this run, the launcher's flags included: `accelerate launch` (and torchrun) start
    the script as a child process, so the parent's command line holds them, up to the script's path."""
    try:
        parent = psutil.Process().parent().cmdline()
    except (psutil.Error, AttributeError):  # no parent visible
        parent = []
    if script in parent[1:]:
        launcher = parent[: parent.index(script)]
        if len(launcher) > 1 and Path(launcher[0]).name.startswith("python"):  # `python .../accelerate launch ...`
            launcher = launcher[1:]
        launcher = [Path(launcher[0]).name, *launcher[1:]]
    else:
        launcher = ["python"]
    return shlex.join([*launcher, script, *argv])


def format_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def hardware_description(accelerator) -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores visible)"
    return f"{accelerator.num_processes} process(es) on {name}"


def base_model_license(provenance: Provenance) -> str | None:
    """The license of the weights a run started from: its card's, Google's for a converted original."""
    if provenance.kind != "pretrained":
        return DEFAULT_LICENSE
    card = Path(provenance.name) / "README.md"
    try:
        return ModelCard.load(card if card.exists() else provenance.name).data.license or None
    except Exception:  # no card, or the Hub unreachable: the card says nothing rather than something wrong
        return None


def dataset_description(source: DataSource) -> tuple[str, str]:
    """(dataset_type for the card's metadata: a Hub id where there is one, the prose name)."""
    if source.kind == "digits":
        return "digits", "scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 8x8, fixed 80/20 split)"
    if source.kind == "imagefolder":
        return "imagefolder", "local imagefolder"
    if source.kind in ("saved", "local"):
        return Path(source.name).name, f"local dataset `{source.name}`"
    return source.name, source.name


@dataclass
class RunDescription:
    """What the model card says about how the model was made, gathered by the script."""

    provenance: Provenance
    source: DataSource
    labels: list[str]
    train_samples: int
    monitor_split: str
    architecture: str
    hyperparameters: dict[str, object]  # the card's hyper-parameter table, in order
    hardware: str
    command: str
    changes: list  # --allow_changed_arguments changes, by step
    eval_steps: int
    hub_model_id: str | None


def hyperparameter_table(args, run_defining_groups: dict[str, list[str]], optimizer_rows: dict, facts: dict) -> dict:
    """The card's table: every run-defining argument of the training groups (the model and data have their own
    lines), the optimizer's group described by the optimizer object, then what the run derived (`facts`)."""
    rows = {}
    for title, names in run_defining_groups.items():
        if title == "optimizer":
            rows.update(optimizer_rows)
        elif title not in ("model", "data"):
            rows.update({name: getattr(args, name) for name in names})
    rows = {name: list(value) if isinstance(value, tuple) else value for name, value in rows.items()}  # as in JSON
    return {**rows, **facts}


def training_results(state, splits, final, steady_images_per_second, args, accelerator) -> dict:
    """all_results.json: the final model's numbers on the report split (and the selection split's last evaluation),
    the best evaluation during training (by the main metric), and how long it took."""
    history = state.history
    best = int(np.argmax(history[f"eval_{MAIN_METRIC}"]))
    monitor, monitor_name = splits.monitor
    runtime = state.elapsed()
    results = {f"eval_{name}": value for name, value in final.metrics.items()}
    results |= {"eval_split": splits.report_name, "eval_samples": len(splits.report)}
    for name in METRICS:
        results[f"selection_{name}"] = history[f"eval_{name}"][-1] if splits.selection is not None else None
    results |= {
        "selection_split": splits.selection_name,
        "selection_samples": len(splits.selection) if splits.selection is not None else None,
    }
    results |= {f"best_eval_{name}": history[f"eval_{name}"][best] for name in METRICS}
    results |= {
        "best_eval_step": history["eval_step"][best],
        "best_eval_split": monitor_name,
        "monitor_samples": len(monitor),
        "train_loss": history["loss"][-1],
        "train_steps": state.completed_steps,
        "train_samples": len(splits.train),
        "epochs": state.completed_steps * args.total_batch_size / len(splits.train),
        "train_runtime": runtime,
        "train_samples_per_second": state.completed_steps * args.total_batch_size / max(runtime, 1e-9),
        # after the first --logging_steps of the last session (start-up, compilation), evaluations included
        "steady_train_samples_per_second": steady_images_per_second,
        "total_batch_size": args.total_batch_size,
        "num_processes": accelerator.num_processes,
    }
    return results


def plot_training_curves(history: dict, monitor_split: str, path: Path) -> None:
    """training_curves.png, 500 x 400 px a panel: train loss, learning rate, then each metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2 + len(METRICS), figsize=(5 * (2 + len(METRICS)), 4), dpi=100)
    loss_axis, lr_axis, *metric_axes = axes
    loss_axis.plot(history["step"], history["loss"], linewidth=1)
    loss_axis.set(title="train loss", xlabel="step", yscale="log" if min(history["loss"], default=1) > 0 else "linear")
    lr_axis.plot(history["step"], history["lr"], linewidth=1, color="tab:orange")
    lr_axis.set(title="learning rate", xlabel="step")
    for axis, name in zip(metric_axes, METRICS, strict=True):
        values = history[f"eval_{name}"]
        axis.plot(history["eval_step"], values, marker="o", color="tab:green")
        axis.set(title=f"{name} ({monitor_split})", xlabel="step")
        if all(0 <= value <= 1 for value in values):  # a rate: on its whole range, so that curves compare
            axis.set_ylim(0, 1)
    for axis in axes:
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


def base_model_line(provenance: Provenance, image_size: object) -> str:
    if provenance.kind == "scratch":
        overrides = f" with overrides `{provenance.overrides}`" if provenance.overrides else ""
        return f"none: trained from scratch, config `{provenance.name}`{overrides}"
    if provenance.kind == "converted":
        return (
            f"`{provenance.name}`"
            + (f" ({provenance.url})" if provenance.url else "")
            + ", an original Flax checkpoint of Google's vision_transformer, converted with hf_vit's "
            f"`conversion.convert` (new zero-initialised head, position embeddings resampled to {image_size} px)"
        )
    return f"`{provenance.name}`"


def write_model_card(output_dir: Path, run: RunDescription, results: dict) -> None:
    """README.md: what the model is, what it was trained on, how, and what it scored on which split."""
    dataset_type, dataset = dataset_description(run.source)
    report, monitor = results["eval_split"], run.monitor_split
    card_data = ModelCardData(
        model_name=output_dir.name,
        license=base_model_license(run.provenance),
        eval_results=[
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset_type,
                dataset_name=dataset.split(" (")[0],
                dataset_split=report,
                metric_type=name,
                metric_value=round(results[f"eval_{name}"], 4),
            )
            for name in METRICS
        ],
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["image-classification", "vision", "vit", "hf_vit"],
        datasets=[run.source.hub_id] if run.source.hub_id else None,
        metrics=list(METRICS),
        base_model=run.provenance.hub_id,
    )
    trained = "trained from scratch" if run.provenance.kind == "scratch" else "fine-tuned"
    lines = [
        f"# {output_dir.name}",
        "",
        f"A Vision Transformer ([Dosovitskiy et al., 2020](https://arxiv.org/abs/2010.11929)) {trained} for image "
        "classification with hf_vit's `examples/finetune.py`.",
        "",
        f"- **Base model:** {base_model_line(run.provenance, run.hyperparameters['image_size'])}",
        f"- **Dataset:** {dataset}: {run.train_samples} training images, {len(run.labels)} classes "
        f"({', '.join(run.labels[:20])}{', ...' if len(run.labels) > 20 else ''})",
        f"- **Architecture:** {run.architecture}",
        "",
        "## Results",
        "",
        "| number | value | split | examples |",
        "|---|---|---|---|",
    ]
    for name in METRICS:
        lines.append(
            f"| {name} of the final model (step {results['train_steps']}) | **{results[f'eval_{name}']:.4f}** | "
            f"{report} | {results['eval_samples']} |"
        )
        if results.get(f"selection_{name}") is not None:
            lines.append(
                f"| {name} of the final model | {results[f'selection_{name}']:.4f} | {monitor} | "
                f"{results['selection_samples']} |"
            )
        lines.append(
            f"| best {name} during training (step {results['best_eval_step']}) | "
            f"{results[f'best_eval_{name}']:.4f} | {monitor} | {results['monitor_samples']} |"
        )
    lines += [
        "",
        f"The published model is the one of the last step: no checkpoint was picked by its score. The {report} "
        + (
            f"split was only used once, at the end; evaluations during training used the {monitor} split."
            if monitor != report
            else "split was also evaluated during training (every "
            f"{run.eval_steps} steps) to draw the curve below, as a monitor only; for model selection hold out part "
            "of train with `--validation_split_percentage`."
        ),
        "",
    ]
    for image, title in (("training_curves.png", "Training curves"), ("confusion_matrix.png", "Confusion matrix")):
        if (output_dir / image).exists():
            lines += [f"![{title}]({image})", ""]
    lines += [
        "## Training",
        "",
        "| hyper-parameter | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in run.hyperparameters.items()),
        "",
    ]
    if run.changes:
        lines += [
            "The run was resumed with changed run-defining arguments (`--allow_changed_arguments`); the table shows "
            "the values of the last session:",
            "",
            *(f"- at step {change['step']}: {'; '.join(change['changes'])}" for change in run.changes),
            "",
        ]
    lines += [
        f"Hardware: {run.hardware}. Wall time: {format_duration(results['train_runtime'])} "
        f"({results['train_samples_per_second']:.0f} images/s). Software: hf_vit {hf_vit.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}.",
        "",
        "Command:",
        "",
        "```bash",
        run.command,
        "```",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classify = pipeline("image-classification", model="{run.hub_model_id or output_dir.name}", '
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


def describe_run(args, parser, argv, splits, model, provenance, optimizer, normalize, accelerator, state):
    """What the card says about the run (a RunDescription), from the objects the run used: the parser's run-defining
    groups, the optimizer, the model's config, the normalisation, the accelerator, the launcher's command line."""
    config = model.config
    height, width = np.broadcast_to(config.image_size, 2).tolist()
    accumulation = accelerator.gradient_accumulation_steps
    facts = {
        "per_device_train_batch_size": args.total_batch_size // (accelerator.num_processes * accumulation),
        "gradient_accumulation_steps": accumulation,
        "num_processes": accelerator.num_processes,
        "image_size": height if height == width else f"{height}x{width}",
        "normalisation": normalize.description,
        "mixed_precision": accelerator.mixed_precision,
        "epochs": round(state.completed_steps * args.total_batch_size / len(splits.train), 2),
    }
    architecture = (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, MLP "
        f"{config.intermediate_size}, patch {config.patch_size}, classifier {config.classifier}, "
        f"{model.num_parameters():,} parameters"
    )
    return RunDescription(
        provenance=provenance,
        source=splits.source,
        labels=splits.labels,
        train_samples=len(splits.train),
        monitor_split=splits.monitor[1],
        architecture=architecture,
        hyperparameters=hyperparameter_table(args, parser.run_defining_groups(), describe_optimizer(optimizer), facts),
        hardware=hardware_description(accelerator),
        command=launch_command(*script_argv(argv)),
        changes=state.changes,
        eval_steps=args.eval_steps,
        hub_model_id=args.hub_model_id,
    )


def write_report(output_dir: str | Path, run: RunDescription, results: dict, history: dict, final) -> None:
    """The pictures, the card that links them, all_results.json (written last: it marks the run finished), and the
    result on stdout."""
    output_dir = Path(output_dir)
    plot_training_curves(history, run.monitor_split, output_dir / "training_curves.png")
    title = f"{results['eval_split']}: {MAIN_METRIC} {results[f'eval_{MAIN_METRIC}']:.4f}"
    plot_confusion_matrix(final.references, final.predictions, run.labels, title, output_dir / "confusion_matrix.png")
    write_model_card(output_dir, run, results)
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
    value = results[f"eval_{MAIN_METRIC}"]
    print(f"{results['eval_split']} {MAIN_METRIC}: {value:.4f} ({results['eval_samples']} images) -> {output_dir}")


def create_hub_repo(args) -> str | None:
    """Create the repo before training, so that a bad token or name fails now, not after hours of training."""
    return HfApi().create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id


def push_to_hub(repo_id: str, output_dir: str | Path, results: dict) -> None:
    HfApi().upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=f"examples/finetune.py: {results['eval_split']} {MAIN_METRIC} {results[f'eval_{MAIN_METRIC}']:.4f}",
        ignore_patterns=["checkpoints/**", ".converted/**", "*.partial/**", "run.json"],
    )


def script_argv(argv: list[str] | None) -> tuple[str, list[str]]:
    """(the script's path as typed, its arguments): sys.argv's, or `argv` for a script called as a function."""
    return (sys.argv[0], sys.argv[1:]) if argv is None else ("examples/finetune.py", list(argv))


# ---- what examples/evaluate.py leaves


def write_evaluation(output_dir: str | Path, results: dict, references, predictions, labels: list[str]) -> None:
    """confusion_matrix.png (when the model has a head), then eval_results.json, and the result on stdout."""
    output_dir = Path(output_dir)
    (output_dir / "confusion_matrix.png").unlink(missing_ok=True)  # an earlier evaluation's, replaced or not made
    if results["eval_accuracy"] is not None:
        if predictions.max(initial=0) == len(labels):  # the model's classes outside the dataset's
            labels = [*labels, "(other)"]
        title = f"{results['eval_split']}: top-1 {results['eval_accuracy']:.4f} ({results['preprocessing']})"
        plot_confusion_matrix(references, predictions, labels, title, output_dir / "confusion_matrix.png")
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    numbers = []
    if results["eval_accuracy"] is not None:
        numbers += [f"top-1 {results['eval_accuracy']:.4f}", f"top-5 {results['eval_top5_accuracy']:.4f}"]
    numbers += [f"{shots}-shot {value:.4f}" for shots, value in (results["fewshot_accuracy"] or {}).items()]
    print(f"{results['eval_split']} ({results['eval_samples']} images): {', '.join(numbers)} -> {output_dir}")


def evaluation_card_results(results: dict, source: DataSource) -> list[EvalResult]:
    """The model-index entries of an evaluation: top-1, top-5 and each few-shot accuracy, the preprocessing as the
    metric's config."""
    dataset_type, dataset = dataset_description(source)
    common = dict(
        task_type="image-classification",
        dataset_type=dataset_type,
        dataset_name=dataset.split(" (")[0],
        dataset_split=results["eval_split"],
        metric_config=results["preprocessing"],
    )
    entries = []
    if results["eval_accuracy"] is not None:
        entries.append(EvalResult(**common, metric_type="accuracy", metric_name="top-1 accuracy",
                                  metric_value=round(results["eval_accuracy"], 4)))  # fmt: skip
        entries.append(EvalResult(**common, metric_type="top_5_accuracy", metric_name="top-5 accuracy",
                                  metric_value=round(results["eval_top5_accuracy"], 4)))  # fmt: skip
    for shots, value in (results["fewshot_accuracy"] or {}).items():
        entries.append(
            EvalResult(**common, metric_type=f"{shots}_shot_accuracy",
                       metric_name=f"{shots}-shot linear accuracy (shots from train)", metric_value=round(value, 4))
        )  # fmt: skip
    return entries


def card_update_problem(folder: str | Path) -> str | None:
    """Why `update_model_card(folder, ...)` would fail (checked before the evaluation runs), or None."""
    path = Path(folder) / "README.md"
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path} cannot be written: evaluate a copy you can write to, or drop --update_card."
    if path.exists():
        try:
            ModelCard.load(path)
        except Exception as error:  # huggingface_hub raises ValueError for bad YAML, yaml errors for others
            return f"{path} is not a model card huggingface_hub can read ({str(error).splitlines()[0]}): fix its metadata."
    return None


def update_model_card(folder: str | Path, entries: list[EvalResult]) -> None:
    """Add `entries` to the card's model-index (replacing a result of the same dataset, split, metric and
    preprocessing); the rest of the card, text and metadata, stays as it was. A folder without a card gets one."""
    path = Path(folder) / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard(f"---\n---\n\n# {Path(folder).resolve().name}\n")
    card.data.model_name = card.data.model_name or Path(folder).resolve().name  # model-index needs a name

    def key(entry: EvalResult) -> tuple:
        return (entry.dataset_type, entry.dataset_config, entry.dataset_split, entry.metric_type, entry.metric_config)

    new = {key(entry) for entry in entries}
    card.data.eval_results = [e for e in card.data.eval_results or [] if key(e) not in new] + entries
    card.save(path)
