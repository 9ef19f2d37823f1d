"""The command-line plumbing of the example scripts: bad input is one line and exit status 2, a failed run one line
and 1, Ctrl-C one line and 130; under torchrun the same line goes into its error file."""

import argparse
import contextlib
import difflib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import datasets
import transformers
from tqdm.auto import tqdm


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
    """argparse whose errors are one UsageError line (no usage block), and which knows the run-defining arguments:
    those of the groups made by `add_run_defining_group`. run.json's identity and the model card's hyper-parameter
    table are derived from these groups, so an argument declared in one is recorded, compared on resume and shown."""

    def error(self, message: str):
        raise UsageError(message)

    def add_run_defining_group(self, title: str, description: str | None = None):
        group = self.add_argument_group(title, description)
        group.run_defining = True
        return group

    def run_defining_groups(self) -> dict[str, list[str]]:
        """{group title: [argument names]} in declaration order."""
        return {
            group.title: [action.dest for action in group._group_actions]
            for group in self._action_groups
            if getattr(group, "run_defining", False)
        }


def check_numbers(parser, args, positive: tuple[str, ...] = (), not_negative: tuple[str, ...] = ()) -> None:
    """--NAME must be positive / not negative where given: numbers that would otherwise fail deep inside torch (a
    DataLoader, an optimizer) with a traceback, or run nonsense."""
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    for name in not_negative:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}.")


def close_matches(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.8)
    return f" (did you mean {' or '.join(map(repr, matches))}?)" if matches else ""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def transient_progress(description: str, enabled: bool):
    """One progress line while a step runs, cleared when it ends, so that what stays on the terminal is the result
    (or the error line). datasets' own bars ("Generating train split") stay on screen when done: they are off inside."""
    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tqdm(desc=description, bar_format="{desc} ({elapsed})", leave=False, disable=not enabled) as line:
            yield line
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def set_up_logging(accelerator) -> None:
    """Log lines with their time; the libraries' warnings from the main process only."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file at each checkpoint is noise
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    datasets.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.set_verbosity(verbosity)


def exit_with(script: str, line: str, status: int, every_process: bool = False) -> None:
    """End the process with one line on stderr, printed by the main process unless every process found it itself.

    Under a multi-process `accelerate launch` (torchrun) the same line goes into torch's error file, so that the
    failure summary torchrun prints after it names this line as the root cause instead of a blank traceback.
    """
    line = f"{script}: {line}"
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


def run_script(
    main,
    script: str,
    *,
    known_errors: tuple[type[Exception], ...] = (),
    interrupted: str = "interrupted before training started; nothing was trained.",
) -> None:
    """Run `main()` as a command: every error the script expects becomes one line and its exit status.

    UsageError and `known_errors` (e.g. RunFolderError) are bad input (2); NonFiniteLossError a failed run (1);
    Interrupted and a Ctrl-C before training 130 (`interrupted`: the line of the latter). Anything else is a bug and
    keeps its traceback."""
    # accelerate's launcher stops its child with SIGTERM when the user presses Ctrl-C: treat both alike.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        main()
    except (UsageError, *known_errors) as error:
        exit_with(script, f"error: {error}", 2, every_process=getattr(error, "this_process_only", False))
    except NonFiniteLossError as error:
        exit_with(script, f"error: {error}", 1)
    except Interrupted as error:
        exit_with(script, str(error), 130)
    except KeyboardInterrupt:
        exit_with(script, interrupted, 130)
