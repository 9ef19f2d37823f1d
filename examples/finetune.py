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
records what defines it (the arguments of the run-defining groups below), and a resume that changes it is refused.

This file is the training story; the bookkeeping is in the hf_vit_examples package beside it (see its docstring).
"""

import argparse

import torch
import transformers
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    LoggerType,
    TorchDynamoPlugin,
    set_seed,
)
from transformers import get_scheduler

from hf_vit_examples import report
from hf_vit_examples.augmentation import Augment, add_augmentation_arguments, check_augmentation_arguments
from hf_vit_examples.cli import (
    ArgumentParser,
    UsageError,
    check_numbers,
    close_matches,
    run_script,
    set_up_logging,
)
from hf_vit_examples.data import (
    DECODE_CHECK_LIMIT,
    Collate,
    add_data_arguments,
    decode_splits,
    eval_dataloader_for,
    load_splits,
    loader_options,
    train_dataloader_for,
    training_batches,
)
from hf_vit_examples.metrics import evaluate_split
from hf_vit_examples.models import (
    Normalize,
    add_model_arguments,
    check_model_arguments,
    image_processor_of,
    image_size_of,
    load_model,
    save_model,
)
from hf_vit_examples.optimizer import add_optimizer_arguments, build_optimizer
from hf_vit_examples.run_folder import RunFolder, RunFolderError, plan_output_dir, run_identity
from hf_vit_examples.training_log import TrainingLog


def argument_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    # The run-defining groups: what makes a run what it is. Their arguments are recorded in run.json, compared on
    # resume (a change is refused unless --allow_changed_arguments) and listed in the model card.
    add_model_arguments(parser.add_run_defining_group("model"))
    add_data_arguments(parser.add_run_defining_group("data"))
    add_augmentation_arguments(parser.add_run_defining_group("augmentation"))
    training = parser.add_run_defining_group("training")
    training.add_argument(
        "--total_batch_size", type=int, default=512, help="Images per optimizer step, all processes."
    )
    training.add_argument("--max_train_steps", type=int, default=10_000, help="Optimizer steps.")
    training.add_argument("--num_warmup_steps", type=int, default=500)
    training.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        choices=[t.value for t in transformers.SchedulerType],
        help="A transformers scheduler.",
    )
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clip; 0 turns it off.")
    training.add_argument("--seed", type=int, default=42)
    add_optimizer_arguments(parser.add_run_defining_group("optimizer"))

    speed = parser.add_argument_group("input pipeline and speed (may change on resume)")
    speed.add_argument(
        "--per_device_train_batch_size",
        type=int,
        help="Images per process per forward pass (default: total / processes, no accumulation).",
    )
    speed.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        help="Default: total_batch_size / (per_device_train_batch_size x processes).",
    )
    speed.add_argument("--per_device_eval_batch_size", type=int, default=128)
    speed.add_argument(
        "--decode_check",
        action=argparse.BooleanOptionalAction,
        help="Decode every image once before training and report all unreadable ones at once (default: on when the "
        f"decoded dataset fits in {DECODE_CHECK_LIMIT >> 30} GiB).",
    )
    speed.add_argument(
        "--dataloader_num_workers",
        type=int,
        help="Decoding processes per training process (default: 0 for digits, else min(8, cpus per process)).",
    )
    speed.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: accelerate's config.")
    speed.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the model with torch.compile (inductor, fullgraph) for training and evaluation: slower start, "
        "faster steps on a GPU.",
    )

    run = parser.add_argument_group("evaluation, checkpoints, tracking, Hub (may change on resume)")
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
    return parser


def parse_args(argv: list[str] | None = None, parser: ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or argument_parser()
    args = parser.parse_args(argv)
    if not args.model_name_or_path and not args.config_name:
        parser.error("give --model_name_or_path (fine-tune) or --config_name (train from scratch).")
    if problem := check_augmentation_arguments(args):
        parser.error(problem)
    if not 0 <= args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}.")
    positive = ("max_train_steps", "eval_steps", "logging_steps", "checkpointing_steps", "total_batch_size")
    positive += ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size")
    positive += ("learning_rate", "image_size", "max_train_samples", "max_eval_samples")
    not_negative = ("momentum", "weight_decay", "max_grad_norm", "num_warmup_steps", "checkpoints_total_limit")
    check_numbers(parser, args, positive, (*not_negative, "dataloader_num_workers"))
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


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(
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
        project_dir=args.output_dir,
    )


def split_the_batch(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """Images per process per forward pass; sets the accumulation that makes --total_batch_size on any process count."""
    processes, per_device = accelerator.num_processes, args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    if per_device is None:
        per_device = args.total_batch_size // (processes * (accumulation or 1))
    if accumulation is None:
        accumulation = max(1, args.total_batch_size // (processes * per_device))
    if per_device * processes * accumulation != args.total_batch_size:
        raise UsageError(
            f"--total_batch_size {args.total_batch_size} must equal per_device_train_batch_size ({per_device}) x "
            f"processes ({processes}) x gradient_accumulation_steps ({accumulation}): change one of them."
        )
    accelerator.gradient_accumulation_steps = accumulation  # derived from the process count, known only now
    return per_device


def main(argv: list[str] | None = None) -> dict:
    started = report.process_start_time()
    parser = argument_parser()
    args = parse_args(argv, parser)
    # Everything is checked before anything is written: names, config overrides, the output folder...
    check_model_arguments(args)
    folder_plan = plan_output_dir(args)
    accelerator = make_accelerator(args)
    per_device = split_the_batch(args, accelerator)
    set_up_logging(accelerator)
    set_seed(args.seed)

    # ---- data: loaded, split and (when it fits in memory) decoded once, so that bad images are found now
    splits = load_splits(args, accelerator)
    # Every process decodes (each needs the images in memory); an error is the same everywhere, printed once.
    train_pixels = decode_splits(splits.named(), args.decode_check, show_progress=accelerator.is_local_main_process)

    # ---- the run's folder: only the run that owns it resumes in it; set-up failing puts it back as it was
    identity = run_identity(args, run_defining(parser), splits.fingerprints(), accelerator.mixed_precision)
    run = RunFolder(args, folder_plan, identity)
    repo_id = report.create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    with run.claim(accelerator):
        # ---- model, loaders, optimizer, schedule
        model, provenance = load_model(args, splits.labels, accelerator)
        image_processor, image_size = image_processor_of(model, args.model_name_or_path), image_size_of(model)
        loader_kwargs = loader_options(args.dataloader_num_workers, splits.source, accelerator.num_processes)
        resize = (image_size, image_processor.resample)
        # One loader batch feeds every process (accelerate splits it): the batch sizes are global.
        train_batch = per_device * accelerator.num_processes
        eval_batch = args.per_device_eval_batch_size * accelerator.num_processes
        train_dataloader = train_dataloader_for(
            splits.train, train_pixels, *resize, train_batch, loader_kwargs, accelerator.device
        )
        resize_only = Collate(*resize, keep_native_size=False)
        monitor_dataloader = eval_dataloader_for(splits.monitor[0], resize_only, eval_batch, loader_kwargs)
        report_dataloader = eval_dataloader_for(splits.report, resize_only, eval_batch, loader_kwargs)
        optimizer = build_optimizer(args, model, accelerator.device)
        lr_scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.num_warmup_steps,
            num_training_steps=args.max_train_steps,
        )
        model, optimizer, train_dataloader, monitor_dataloader, report_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, monitor_dataloader, report_dataloader, lr_scheduler
        )
        # ---- resume: model, optimizer, scheduler and RNG states, step and history from the checkpoint
        state = run.resume(accelerator, optimizer, lr_scheduler, session_start=started)
    augment, normalize = Augment(args, image_size, accelerator, per_device), Normalize(image_processor)

    # ---- train
    model.train()
    steps = training_batches(train_dataloader, accelerator, state.completed_steps, args.max_train_steps)
    with run.interruptible(state), TrainingLog(args, accelerator, state, splits, per_device) as log:
        for step, micro_step, batch in steps:
            if micro_step == 0:
                # Each step's randomness (dropout) comes from (seed, step), not from wherever the RNG happens to
                # be: a resumed run then draws what an uninterrupted one draws, though its loaders restarted.
                set_seed(args.seed + step, device_specific=True)
            with accelerator.accumulate(model):
                pixel_values = normalize(augment(batch["pixel_values"], step, micro_step))
                loss = model(pixel_values=pixel_values, labels=batch["labels"]).loss
                log.add_loss(loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue  # the next micro-batch of the same optimizer step

            state.completed_steps += 1
            evaluating = state.completed_steps % args.eval_steps == 0 or state.completed_steps == args.max_train_steps
            checkpointing = state.completed_steps % args.checkpointing_steps == 0
            checkpointing = checkpointing and state.completed_steps < args.max_train_steps
            log.end_of_step(lr_scheduler.get_last_lr()[0], read_now=evaluating or checkpointing)
            if evaluating:
                log.evaluation(evaluate_split(model, monitor_dataloader, accelerator, normalize).metrics)
            if checkpointing:
                run.save_checkpoint(accelerator, state)

    # ---- final evaluation, model, card, results, Hub (a Ctrl-C here says that the model was being written)
    with run.interruptible(state):
        final = evaluate_split(model, report_dataloader, accelerator, normalize)
        results = report.training_results(state, splits, final, log.steady_images_per_second, args, accelerator)
        save_model(accelerator, model, args.output_dir)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(model)
            described = report.describe_run(
                args, parser, argv, splits, model, provenance, optimizer, normalize, accelerator, state
            )
            report.write_report(args.output_dir, described, results, state.history, final)
            if repo_id is not None:
                report.push_to_hub(repo_id, args.output_dir, results)
        accelerator.wait_for_everyone()
    return results


def run_defining(parser: ArgumentParser) -> list[str]:
    return [name for names in parser.run_defining_groups().values() for name in names]


if __name__ == "__main__":
    run_script(main, "finetune.py", known_errors=(RunFolderError,))
