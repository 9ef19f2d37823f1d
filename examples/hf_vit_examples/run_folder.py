"""The output folder of an `examples/finetune.py` run: which run owns it, its checkpoints, and what a resume may change.

`RunFolder` is the one object the script talks to: it claims the folder (and puts it back if the run fails before
training), resumes, writes checkpoints, and turns Ctrl-C into a line saying how to resume. The functions before it
are its steps.

A run writes `OUTPUT_DIR/run.json` (what defines it: the run-defining arguments, the data's fingerprints)
once it is set up, and the same record into every checkpoint. So a new run can tell its own folder from another
run's, `--resume_from_checkpoint latest` continues only the run that wrote the checkpoints, and a resume that
changes what the run is (learning rate, steps, data...) is refused by name unless `--allow_changed_arguments` says so.

Checkpoints are `OUTPUT_DIR/checkpoints/step_000500` folders of `accelerator.save_state`, written under a temporary
name and renamed once complete.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from .cli import Interrupted, UsageError
from .optimizer import apply_changed_arguments


logger = get_logger(__name__)


RUN_FILE = "run.json"
CHECKPOINT_PREFIX = "step_"


class RunFolderError(Exception):
    """The output folder or checkpoint can't be used as asked: the script reports it as one line, exit status 2."""


def run_identity(args, run_defining: list[str], data_fingerprints: dict, mixed_precision: str) -> dict:
    """What defines a run, as JSON-able values: compared on resume, recorded in run.json and every checkpoint.

    `run_defining`: the arguments of the parser's run-defining groups. The others (workers, logging, checkpoint
    cadence, how the batch is split across processes, Hub) may change between a run and its resume without changing
    its result."""
    arguments = {name: getattr(args, name) for name in run_defining}
    arguments = {name: list(value) if isinstance(value, tuple) else value for name, value in arguments.items()}
    arguments["mixed_precision"] = mixed_precision
    return {"arguments": arguments, "data": data_fingerprints}


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """'--learning_rate 0.03 -> 0.5' for each run-defining value that differs (the data as 'the data')."""
    differences = []
    for name, value in current["arguments"].items():
        before = recorded.get("arguments", {}).get(name)
        if before != value:
            differences.append(f"--{name} {format_value(before)} -> {format_value(value)}")
    for split, fingerprint in current["data"].items():
        if recorded.get("data", {}).get(split) != fingerprint:
            differences.append(
                f"the {split} data (fingerprint {recorded.get('data', {}).get(split)} -> {fingerprint})"
            )
    return differences


def format_value(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "(unset)" if value is None else str(value)


def read_run_file(output_dir: Path) -> dict | None:
    path = output_dir / RUN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise RunFolderError(f"{path} is unreadable ({error}): pass --overwrite_output_dir to start over.") from None


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The complete checkpoints in OUTPUT_DIR/checkpoints, oldest step first."""
    folders = (output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
    complete = [f for f in folders if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", f.name) and f.is_dir()]
    return sorted(complete, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(CHECKPOINT_PREFIX) :])


def read_training_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "training_state.json").read_text())
    except (OSError, ValueError):
        raise RunFolderError(
            f"{checkpoint} is not a checkpoint of this script (no readable training_state.json)."
        ) from None


def check_writable(output_dir: Path) -> None:
    """The folder, or the nearest folder above it that exists, accepts new files (tried, then removed)."""
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"--output_dir {output_dir}: {existing} is a file, not a folder.")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        raise RunFolderError(
            f"--output_dir {output_dir} is not writable ({error.strerror}): choose another folder."
        ) from None


def run_finished(output_dir: Path) -> bool:
    """all_results.json is written last: the run that wrote it has ended."""
    return (output_dir / "all_results.json").exists()


def describe_contents(output_dir: Path) -> str:
    set_aside = sorted(output_dir.glob(".replaced-*"))
    if set_aside:  # a run killed between start_run_folder and keep_run_folder
        return (
            f"{set_aside[0].name}, what an interrupted --overwrite_output_dir run had set aside (move its contents back "
            "into the folder to recover them)"
        )
    found = checkpoint_folders(output_dir)
    model = (output_dir / "config.json").exists() or (output_dir / "model.safetensors").exists()
    if found:
        what = "a finished run: its model, and checkpoints" if run_finished(output_dir) else "the checkpoints of a run"
        return f"{what} up to step {checkpoint_step(found[-1])}"
    if model:
        return "a model"
    names = sorted(p.name for p in output_dir.iterdir())
    return f"{len(names)} entries ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def plan_output_dir(args) -> str:
    """Check --output_dir before anything is written: 'fresh', 'overwrite' or 'resume' (identity checked later)."""
    output_dir = Path(args.output_dir)
    check_writable(output_dir)  # also refuses a file in the folder's place
    empty = not output_dir.exists() or not any(output_dir.iterdir())
    if args.overwrite_output_dir:
        resume = args.resume_from_checkpoint
        if resume == "latest" or resume and output_dir.resolve() in Path(resume).resolve().parents:
            raise RunFolderError(
                f"--overwrite_output_dir replaces what {output_dir} holds: it can't resume from a checkpoint in it "
                f"(--resume_from_checkpoint {resume})."
            )
        return "fresh" if empty else "overwrite"
    if empty:
        return "fresh"
    if args.resume_from_checkpoint:
        recorded = read_run_file(output_dir)
        if recorded is not None or checkpoint_folders(output_dir):
            return "resume"
    resumable = checkpoint_folders(output_dir) and not (args.resume_from_checkpoint or run_finished(output_dir))
    hint = "--resume_from_checkpoint latest to continue the run that wrote it, " if resumable else ""
    raise RunFolderError(
        f"--output_dir {output_dir} already holds {describe_contents(output_dir)}: pass {hint}--overwrite_output_dir "
        "to replace it, or choose another folder."
    )


def checkpoint_to_resume(args, identity: dict) -> tuple[Path | None, list[str]]:
    """(checkpoint or None for a fresh start, the differences --allow_changed_arguments let through).

    The run resumed is the one that wrote the checkpoint (its record is in training_state.json) and, when
    --output_dir already holds a run, that run too (its run.json).
    """
    output_dir = Path(args.output_dir)
    if not args.resume_from_checkpoint:  # a fresh start, in a folder plan_output_dir found empty or may clear
        return None, []
    records = {}  # where -> the run recorded there
    if output_dir.is_dir() and (recorded := read_run_file(output_dir)) is not None:
        records[output_dir / RUN_FILE] = recorded
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_folders(output_dir) if output_dir.is_dir() else []
        checkpoint = found[-1] if found else None
    else:
        checkpoint = Path(args.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise RunFolderError(f"--resume_from_checkpoint {checkpoint} is not a folder.")
    if checkpoint is not None:
        recorded = read_training_state(checkpoint).get("run")
        if recorded is None:
            raise RunFolderError(
                f"{checkpoint} was written by another run or an older version of this script (it has no run record): "
                "resume only checkpoints this script wrote, or pass --overwrite_output_dir to start over."
            )
        records[checkpoint] = recorded
    differences = []
    for where, recorded in records.items():
        before = recorded.get("arguments", {}).get("optimizer", "sgd")  # runs recorded before --optimizer were SGD
        if before != identity["arguments"].get("optimizer", before):
            # The checkpoint holds the other optimizer's state (momentum buffers, not Adam's moments): it cannot go on.
            raise RunFolderError(
                f"the run in {where} was trained with --optimizer {before}, this command asks for "
                f"--optimizer {identity['arguments']['optimizer']}; a checkpoint's optimizer state serves only its own "
                "optimizer, even with --allow_changed_arguments: resume with --optimizer "
                f"{before}, or start a new run (a new --output_dir, or --model_name_or_path the finished model)."
            )
        for difference in identity_differences(recorded, identity):
            if difference not in differences:
                differences.append(difference)
        if differences and not args.allow_changed_arguments:
            raise RunFolderError(
                f"this command changes what the run in {where} is: {'; '.join(differences)}. Resume with the run's "
                "own arguments, pass --allow_changed_arguments to continue with the new values (the model card "
                "records the change), or choose another --output_dir."
            )
    return checkpoint, differences


def start_run_folder(output_dir: Path, plan: str) -> tuple[bool, Path | None]:
    """(whether this call created OUTPUT_DIR, the folder inside it holding what it held before, for 'overwrite').

    'overwrite' moves the old contents aside instead of deleting them: they are deleted by `keep_run_folder` once the
    new run is set up, and put back by `undo_run_folder` if it fails before that (a model that can't be built, a
    checkpoint that doesn't load), so bad input never costs the run that was there."""
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    set_aside = None
    if plan == "overwrite":
        set_aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=output_dir))
        for entry in output_dir.iterdir():
            if entry != set_aside:
                entry.rename(set_aside / entry.name)
    return created, set_aside


def keep_run_folder(output_dir: Path, set_aside: Path | None, identity: dict) -> None:
    """The run is set up (model built, checkpoint loaded): record it in run.json, delete what it replaces."""
    write_json_atomically(output_dir / RUN_FILE, identity)
    if set_aside is not None:
        shutil.rmtree(set_aside)


def undo_run_folder(output_dir: Path, plan: str, created: bool, set_aside: Path | None) -> None:
    """The run failed before `keep_run_folder`: leave OUTPUT_DIR as it was (gone, if this run created it)."""
    if created:
        shutil.rmtree(output_dir, ignore_errors=True)
        return
    if plan == "resume":  # nothing was written: run.json and the checkpoints are the resumed run's
        return
    for entry in output_dir.iterdir():  # what this run wrote (a converted .npz) into a folder empty or set aside
        if entry != set_aside:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if set_aside is not None:
        for entry in set_aside.iterdir():
            entry.rename(output_dir / entry.name)
        set_aside.rmdir()


def write_json_atomically(path: Path, value) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def save_checkpoint(accelerator, output_dir: Path, step: int, training_state: dict, keep: int) -> Path:
    """accelerator.save_state, atomically: a kill during the save leaves the previous checkpoints as they were.

    Then pruning keeps this checkpoint and the `keep - 1` before it (all if keep is 0). Checkpoints of later steps
    are from before a resume from an earlier checkpoint of this run: they are deleted, so `latest` stays this one.
    """
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            (partial / "training_state.json").write_text(json.dumps(training_state))
    except Exception as error:  # a full disk: OSError, torch.save's RuntimeError, safetensors' SafetensorError...
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        found = checkpoint_folders(output_dir)
        last = f"the last complete checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise RunFolderError(
            f"cannot write the checkpoint of step {step} into {final.parent} ({reason}); {last}. Make room and "
            "continue with the same command and --resume_from_checkpoint latest."
        ) from None
    accelerator.wait_for_everyone()  # every process has written its share (its RNG states) before the rename
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        earlier = [folder for folder in checkpoint_folders(output_dir) if checkpoint_step(folder) < step]
        later = [folder for folder in checkpoint_folders(output_dir) if checkpoint_step(folder) > step]
        unfinished = list((output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*.partial"))  # of killed saves
        for old in later + unfinished + (earlier[: max(0, len(earlier) - (keep - 1))] if keep > 0 else []):
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


@dataclass
class TrainingState:
    """What a checkpoint holds besides accelerate's own state (model, optimizer, scheduler, RNGs)."""

    completed_steps: int = 0
    history: dict = field(default_factory=dict)  # the training log's, see training_log.TrainingLog
    elapsed_before: float = 0.0  # wall time of the sessions before this one
    changes: list = field(default_factory=list)  # the --allow_changed_arguments changes, by step
    session_start: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        """Wall time of the run, all sessions, loading included."""
        return self.elapsed_before + time.time() - self.session_start


class RunFolder:
    """The output folder of one run: checked before anything is written, claimed, resumed, checkpointed."""

    def __init__(self, args, plan: str, identity: dict):
        self.args, self.output_dir, self.plan, self.identity = args, Path(args.output_dir), plan, identity
        self.checkpoint, self.changes = checkpoint_to_resume(args, identity)

    @contextlib.contextmanager
    def claim(self, accelerator: Accelerator):
        """Inside: set up the run (model, loaders, resume). If that fails on any process, the folder goes back to
        what it was (or away, if this run made it); once it succeeded, run.json records the run and what it
        replaces is deleted."""
        created, set_aside = False, None
        if accelerator.is_main_process:
            created, set_aside = start_run_folder(self.output_dir, self.plan)
        try:
            accelerator.wait_for_everyone()
            yield
            # Every process is set up before the old contents go: a process that failed has left this barrier to
            # torchrun, which stops the others (a KeyboardInterrupt here), so the folder is put back.
            accelerator.wait_for_everyone()
        except BaseException:
            if accelerator.is_main_process:
                undo_run_folder(self.output_dir, self.plan, created, set_aside)
            raise
        if accelerator.is_main_process:
            keep_run_folder(self.output_dir, set_aside, self.identity)

    def resume(self, accelerator: Accelerator, optimizer, lr_scheduler, session_start: float) -> TrainingState:
        """The checkpoint's state loaded into the prepared objects, or a fresh state."""
        if self.checkpoint is None:
            if self.args.resume_from_checkpoint == "latest":
                logger.info(f"No checkpoint in {self.output_dir / 'checkpoints'}: starting from scratch.")
            return TrainingState(session_start=session_start)
        saved = load_checkpoint(accelerator, self.checkpoint, self.args.max_train_steps)
        state = TrainingState(
            saved["completed_steps"], saved["history"], saved["elapsed"], saved.get("changes", []), session_start
        )
        if self.changes:
            apply_changed_arguments(self.args, optimizer, lr_scheduler)
            state.changes = [*state.changes, {"step": state.completed_steps, "changes": self.changes}]
            logger.warning(f"Resumed with changed arguments (--allow_changed_arguments): {'; '.join(self.changes)}.")
        logger.info(f"Resumed from {self.checkpoint} at step {state.completed_steps}.")
        return state

    def save_checkpoint(self, accelerator: Accelerator, state: TrainingState) -> Path:
        training_state = {
            "completed_steps": state.completed_steps,
            "history": state.history,
            "elapsed": state.elapsed(),
            "run": self.identity,
            "changes": state.changes,
        }
        return save_checkpoint(
            accelerator, self.output_dir, state.completed_steps, training_state, self.args.checkpoints_total_limit
        )

    @contextlib.contextmanager
    def interruptible(self, state: TrainingState):
        """Ctrl-C, or the SIGTERM with which `accelerate launch` stops its child: one Interrupted line saying where
        the run stopped and how to continue."""
        try:
            yield
        except KeyboardInterrupt:
            found = checkpoint_folders(self.output_dir)
            where = f"the last checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            final = state.completed_steps == self.args.max_train_steps
            when = "while writing the final model, after" if final else "at"
            raise Interrupted(
                f"interrupted {when} step {state.completed_steps} of {self.args.max_train_steps}; {where}. Continue "
                "with the same command and --resume_from_checkpoint latest."
            ) from None


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


# ---- the output folder of an `examples/evaluate.py` run

EVAL_RESULTS_FILE = "eval_results.json"
CONVERTED = ".converted"  # where an original checkpoint is converted to, inside the output folder


def check_evaluation_dir(output_dir: Path, overwrite: bool) -> None:
    """An evaluation writes into a new or empty folder, or replaces an earlier evaluation with --overwrite_output_dir;
    checked before anything is written."""
    check_writable(output_dir)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    results = output_dir / EVAL_RESULTS_FILE
    if results.exists():
        if overwrite:
            return
        try:
            recorded = json.loads(results.read_text())
            what = f"of {recorded['model']['name']} on {recorded['eval_split']}"
        except (OSError, ValueError, KeyError, TypeError):
            what = "(an unreadable eval_results.json)"
        raise RunFolderError(
            f"--output_dir {output_dir} already holds another evaluation {what}: pass --overwrite_output_dir to "
            "replace it, or choose another folder."
        )
    raise RunFolderError(
        f"--output_dir {output_dir} already holds {describe_contents(output_dir)}: choose a new or empty folder."
    )


@contextlib.contextmanager
def evaluation_folder(accelerator: Accelerator, output_dir: Path):
    """Inside: the evaluation, its folder made. A failure removes the folder if this run made it; the converted
    checkpoint is removed either way (it is a copy of the original: nothing an evaluation leaves)."""
    created = not output_dir.exists()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        yield
        accelerator.wait_for_everyone()
    except BaseException:
        if accelerator.is_main_process and created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(output_dir / CONVERTED, ignore_errors=True)
