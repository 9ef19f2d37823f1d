"""The training log: the progress bar, the loss read back once per --logging_steps (the device runs ahead in
between), the stop on a non-finite loss, throughput, trackers, and the history the curves and checkpoints keep."""

import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .cli import NonFiniteLossError
from .metrics import METRICS
from .run_folder import TrainingState, checkpoint_folders


logger = get_logger(__name__)


def new_history() -> dict[str, list]:
    """Train loss and lr by step; every metric of METRICS by evaluation step."""
    return {"step": [], "loss": [], "lr": [], "eval_step": [], **{f"eval_{name}": [] for name in METRICS}}


class TrainingLog:
    """Used as `with TrainingLog(...) as log:` around the loop; `add_loss` at every micro-step, `end_of_step` after
    each optimizer step, `evaluation` after each evaluation."""

    def __init__(self, args, accelerator: Accelerator, state: TrainingState, splits, per_device_batch: int):
        self.args, self.accelerator, self.state, self.monitor_name = args, accelerator, state, splits.monitor[1]
        state.history = state.history or new_history()
        self.history = state.history
        self.unlogged = []  # (step, lr, loss on the device) of the steps since the losses were last read
        self.step_loss = torch.zeros((), device=accelerator.device)
        self.steady_images_per_second = None
        logger.info(
            f"{len(splits.train)} training images, {len(splits.labels)} classes; {args.max_train_steps} steps of "
            f"{args.total_batch_size} images = {accelerator.num_processes} process(es) x {per_device_batch} x "
            f"{accelerator.gradient_accumulation_steps} accumulation; evaluating on {self.monitor_name} every "
            f"{args.eval_steps} steps, reporting on {splits.report_name}."
        )
        if args.with_tracking:
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
            accelerator.init_trackers("finetune", config=config)

    def __enter__(self):
        self.progress = tqdm(
            total=self.args.max_train_steps,
            initial=self.state.completed_steps,
            disable=not self.accelerator.is_local_main_process,
            desc="train",
            mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not one per step
        )
        self.session_start, self.session_steps = time.time(), 0
        self.first_read = None  # (time, steps) at the first loss read: the steady rate excludes the warm-up before it
        return self

    def __exit__(self, *exception):
        self.progress.close()  # before any error line is printed
        if self.args.with_tracking:
            self.accelerator.end_training()

    def add_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss, kept on the device: the step's loss is the mean over its micro-batches."""
        self.step_loss += loss.detach() / self.accelerator.gradient_accumulation_steps

    def end_of_step(self, lr: float, read_now: bool) -> None:
        """After each optimizer step; the losses are read every --logging_steps, and when `read_now` (before an
        evaluation or checkpoint: a checkpoint is never written after a non-finite loss)."""
        step = self.state.completed_steps
        self.unlogged.append((step, lr, self.step_loss))
        self.step_loss = torch.zeros((), device=self.accelerator.device)
        self.session_steps += 1
        self.progress.update(1)
        if not (read_now or step % self.args.logging_steps == 0):
            return
        self.read_losses()
        images_per_second = self.session_steps * self.args.total_batch_size / (time.time() - self.session_start)
        if self.first_read is None:
            self.first_read = (time.time(), self.session_steps)
        elif self.session_steps > self.first_read[1]:  # the host just synced: the device did all these steps
            steps, seconds = self.session_steps - self.first_read[1], time.time() - self.first_read[0]
            self.steady_images_per_second = steps * self.args.total_batch_size / seconds
        loss, lr = self.history["loss"][-1], self.history["lr"][-1]
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")
        if self.args.with_tracking:
            self.accelerator.log({"train_loss": loss, "lr": lr, "images_per_second": images_per_second}, step=step)

    def read_losses(self) -> None:
        """Read the losses of the unlogged steps (one host sync, one all-reduce) into the history; a
        NonFiniteLossError at the first non-finite one."""
        losses = self.accelerator.reduce(torch.stack([loss for _, _, loss in self.unlogged]), "mean").tolist()
        for (step, lr, _), loss in zip(self.unlogged, losses, strict=True):
            if not math.isfinite(loss):
                found = checkpoint_folders(Path(self.args.output_dir))
                raise NonFiniteLossError(
                    f"the training loss became {loss} at step {step} (lr {lr:.3g}); stopped. "
                    f"Last good checkpoint: {found[-1] if found else 'none'}. Lower --learning_rate or check the data."
                )
            self.history["step"].append(step)
            self.history["loss"].append(loss)
            self.history["lr"].append(lr)
        self.unlogged.clear()

    def evaluation(self, metrics: dict[str, float]) -> None:
        step = self.state.completed_steps
        self.history["eval_step"].append(step)
        for name, value in metrics.items():
            self.history[f"eval_{name}"].append(value)
        split = self.monitor_name.split()[0]
        logger.info(f"step {step}: {self.monitor_name} " + ", ".join(f"{n} {v:.4f}" for n, v in metrics.items()))
        if self.args.with_tracking:
            self.accelerator.log({f"eval_{name}_{split}": value for name, value in metrics.items()}, step=step)
