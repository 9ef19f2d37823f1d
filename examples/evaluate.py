"""Evaluate a Vision Transformer without training it: top-1, top-5, loss, per-class and few-shot linear accuracy.

    python examples/evaluate.py --model_name_or_path vit-digits --fewshot 1 5 10 --output_dir eval-digits
    accelerate launch -q --multi_gpu --num_processes 2 examples/evaluate.py --model_name_or_path vit-digits \
        --preprocessing vit_jax --output_dir eval-digits-vit_jax

The model is a folder or Hub id, an official checkpoint name or a local .npz/.bin (converted with its own head), or
`--config_name` (a randomly initialised model); the data is any dataset finetune.py reads (digits by default), its
`--split` (default: test, else validation). The model's id2label is matched to the dataset's class names by name, or
by `--label_mapping`; a model without a head (a feature extractor, e.g. Google's ImageNet-21k releases) gives only
`--fewshot`.

Preprocessing (`--preprocessing`): by default the model's own image processor, so that the predictions are those of
`pipeline("image-classification")`; `vit_jax` and `crop` (with `--crop_pct`) are the original recipes
(hf_vit_examples/preprocessing.py says what each does). `--fewshot 1 5 10 25` fits big_vision's closed-form ridge
regression on the representation of that many train images per class, averaged over `--fewshot_seeds` seeds, and tests
it on the evaluated split (hf_vit_examples/fewshot.py says what is reproduced and where it differs).

The numbers are the same for any process count: every process evaluates its share and `gather_for_metrics` puts the
images back in order, without the padding of the last batch. `--bf16` runs the forward in bfloat16 autocast (fast on
GPUs and on CPUs with AVX512-BF16 or AMX); its top-1 may differ from float32's by an image or two.

OUTPUT_DIR gets eval_results.json and confusion_matrix.png; `--update_card` adds the results to the model folder's
card (model-index). Bad input is one `evaluate.py: error:` line, exit status 2 (1 under `accelerate launch -q`), and
nothing written.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from hf_vit_examples import fewshot, report
from hf_vit_examples.cli import ArgumentParser, UsageError, check_numbers, run_script, set_up_logging
from hf_vit_examples.data import (
    Preprocessed,
    add_data_arguments,
    eval_dataloader_for,
    load_evaluation_splits,
    loader_options,
)
from hf_vit_examples.metrics import classification_metrics, dataset_class_predictions, predict
from hf_vit_examples.models import (
    add_model_arguments,
    check_model_arguments,
    image_processor_of,
    image_size_of,
    load_model,
    match_labels,
)
from hf_vit_examples.preprocessing import add_preprocessing_arguments, describe, make_preprocess
from hf_vit_examples.run_folder import RunFolderError, check_evaluation_dir, evaluation_folder


def argument_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument(
        "--label_mapping",
        help="'index' (the dataset's class i is the model's class i), or a JSON object or file of dataset label -> "
        "model label (or index); default: the model's id2label matched to the dataset's names.",
    )
    data = parser.add_argument_group("data")
    add_data_arguments(data, held_out_validation=False)
    data.add_argument("--split", help="The split evaluated (default: test, else validation).")
    add_preprocessing_arguments(parser.add_argument_group("preprocessing"))
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--fewshot", type=int, nargs="+", default=[], help="Few-shot linear accuracy with these shots per class."
    )
    evaluation.add_argument(
        "--fewshot_seeds", type=int, default=fewshot.NUM_SEEDS, help="Seeds averaged, seed .. seed + N - 1."
    )
    evaluation.add_argument("--fewshot_l2_reg", type=float, default=fewshot.L2_REG, help="The ridge's L2 strength.")
    evaluation.add_argument("--seed", type=int, default=0, help="The first few-shot seed (and --config_name's init).")
    evaluation.add_argument("--per_device_eval_batch_size", type=int, default=128)
    evaluation.add_argument("--dataloader_num_workers", type=int, help="Default: 0 for digits, else min(8, cpus).")
    evaluation.add_argument("--bf16", action="store_true", help="bfloat16 autocast: faster, numbers may differ a bit.")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", required=True, help="A new or empty folder for eval_results.json.")
    output.add_argument("--overwrite_output_dir", action="store_true", help="Replace an earlier evaluation in it.")
    output.add_argument("--update_card", action="store_true", help="Add the results to the model folder's card.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if not args.model_name_or_path and not args.config_name:
        parser.error("give --model_name_or_path (a model to evaluate) or --config_name (a randomly initialised one).")
    positive = ("per_device_eval_batch_size", "fewshot_seeds", "fewshot_l2_reg", "max_eval_samples", "image_size")
    check_numbers(parser, args, positive, ("dataloader_num_workers",))
    if any(shots <= 0 for shots in args.fewshot):
        parser.error(f"--fewshot takes positive numbers of shots, got {' '.join(map(str, args.fewshot))}.")
    if args.update_card and not (args.model_name_or_path and Path(args.model_name_or_path).is_dir()):
        parser.error(
            "--update_card writes into the evaluated model's folder: give a local --model_name_or_path folder."
        )
    if args.update_card and (problem := report.card_update_problem(args.model_name_or_path)):
        parser.error(f"--update_card: {problem}")
    if args.preprocessing == "crop" and not 0 < args.crop_pct <= 1:
        parser.error(f"--crop_pct must be in (0, 1], got {args.crop_pct}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Everything that can be checked before anything is written: names, overrides, the output folder.
    check_model_arguments(args)
    output_dir = Path(args.output_dir)
    check_evaluation_dir(output_dir, args.overwrite_output_dir)
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    # No prepare(model): nothing is trained, so no DDP wrapper; autocast comes from mixed_precision.
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not has_accelerator)
    set_up_logging(accelerator)
    set_seed(args.seed)

    # ---- data: the evaluated split, and train for the shots; all checked before the model runs
    splits = load_evaluation_splits(args, accelerator, with_train=bool(args.fewshot))
    if args.fewshot:
        fewshot.check_shots(np.array(splits.train["label"]), splits.labels, args.fewshot)

    with evaluation_folder(accelerator, output_dir):
        # ---- model: its own head and labels, matched to the dataset's classes
        model, provenance = load_model(args, splits.labels, accelerator, keep_head=True)
        has_head = model.config.num_labels > 0
        if not has_head and not args.fewshot:
            raise UsageError(
                f"{args.model_name_or_path} has no classification head (a feature extractor): pass --fewshot."
            )
        label_map = match_labels(model.config.id2label, splits.labels, args.label_mapping) if has_head else None
        model.to(accelerator.device).eval()

        # ---- preprocessing and loaders: each process gets every N-th batch of the split, in order
        processor = image_processor_of(model, args.model_name_or_path)
        collate = Preprocessed(make_preprocess(args.preprocessing, processor, image_size_of(model), args.crop_pct))
        loader_kwargs = loader_options(args.dataloader_num_workers, splits.source, accelerator.num_processes)
        batch = args.per_device_eval_batch_size
        evaluated_loader = accelerator.prepare(eval_dataloader_for(splits.evaluated, collate, batch, loader_kwargs))
        if args.fewshot:
            train_loader = accelerator.prepare(eval_dataloader_for(splits.train, collate, batch, loader_kwargs))

        # ---- every image through the model once: top-5 classes, loss, and the representation for the few-shot
        started = time.perf_counter()
        total = len(splits.evaluated) + (len(splits.train) if args.fewshot else 0)
        with tqdm(total=total, unit="img", desc="evaluating", disable=not accelerator.is_local_main_process) as bar:
            with torch.inference_mode(), accelerator.autocast():
                evaluated = predict(
                    model,
                    evaluated_loader,
                    accelerator,
                    top_k=5,
                    losses=has_head,
                    label_map=torch.from_numpy(label_map) if has_head else None,
                    features=bool(args.fewshot),
                    progress=bar,
                )
                if args.fewshot:
                    shots = predict(model, train_loader, accelerator, features=True, progress=bar)
        runtime = time.perf_counter() - started

        # ---- the numbers
        if has_head:  # every metric of METRICS, top-5, loss, per class
            metrics = classification_metrics(evaluated, label_map, splits.labels)
        else:
            metrics = dict.fromkeys(("eval_accuracy", "eval_top5_accuracy", "eval_loss", "eval_per_class_accuracy"))
        fewshot_results = {}
        if args.fewshot:
            seeds = list(range(args.seed, args.seed + args.fewshot_seeds))
            fewshot_results = fewshot.fewshot_accuracy(
                shots.features, shots.references, evaluated.features, evaluated.references,
                len(splits.labels), args.fewshot, seeds, args.fewshot_l2_reg,
            )  # fmt: skip
        results = {
            **metrics,
            "eval_samples": len(splits.evaluated),
            "eval_split": splits.evaluated_name,
            "fewshot_accuracy": {shots: value["accuracy"] for shots, value in fewshot_results.items()} or None,
            "fewshot_per_seed": {shots: value["per_seed"] for shots, value in fewshot_results.items()} or None,
            "fewshot_seeds": seeds if args.fewshot else None,
            "fewshot_l2_reg": args.fewshot_l2_reg if args.fewshot else None,
            "fewshot_train_samples": len(splits.train) if args.fewshot else None,
            "preprocessing": describe(args.preprocessing, args.crop_pct),
            "image_size": list(image_size_of(model)),
            "normalisation": {"mean": list(processor.image_mean), "std": list(processor.image_std)},
            "model": {
                "name": provenance.name,
                "kind": provenance.kind,  # pretrained (a folder or Hub id), converted (an original checkpoint), scratch
                "url": provenance.url,
                "revision": getattr(model.config, "_commit_hash", None),
                "num_parameters": model.num_parameters(),
            },
            "dataset": report.dataset_description(splits.source)[0],
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "eval_runtime": runtime,
            "eval_samples_per_second": total / max(runtime, 1e-9),
        }

        # ---- the results, the confusion matrix, the card
        if accelerator.is_main_process:
            predictions = dataset_class_predictions(evaluated, label_map) if has_head else None
            references = evaluated.references if has_head else None
            report.write_evaluation(output_dir, results, references, predictions, splits.labels)
            if args.update_card:
                report.update_model_card(
                    args.model_name_or_path, report.evaluation_card_results(results, splits.source)
                )
    return results


if __name__ == "__main__":
    run_script(main, "evaluate.py", known_errors=(RunFolderError,), interrupted="interrupted; nothing was written.")
