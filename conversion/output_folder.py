"""The output folder, written atomically: OUTPUT_DIR is checked before anything is read, the conversion writes into a
temporary folder beside it, and only a complete, verified folder is renamed into place. A folder left by a killed
conversion is removed by the next conversion of the same OUTPUT_DIR, which says so.
"""

import os
import secrets
import shutil
import sys
from pathlib import Path

from .errors import ConversionError


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """OUTPUT_DIR can be created (or replaced); touches nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"OUTPUT_DIR {output_dir} exists and is not a directory: choose another path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"OUTPUT_DIR {output_dir} is not empty: pass --overwrite to replace it.")
    parent = output_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"Cannot create OUTPUT_DIR {output_dir}: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"Cannot write OUTPUT_DIR {output_dir}: {parent} is not writable.")


class building:
    """
    A temporary folder beside OUTPUT_DIR, created with the umask's permissions as `save_pretrained` would, and removed
    (with any folders created above it) if the conversion fails. Its name holds this process's id, so that a later
    conversion of the same OUTPUT_DIR can tell a folder left by a killed conversion from a running one's.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.created = []
        parent = output_dir.parent
        while not parent.exists():
            self.created.insert(0, parent)
            parent = parent.parent

    def __enter__(self) -> Path:
        try:
            self.output_dir.parent.mkdir(parents=True, exist_ok=True)
            self.path = fresh_partial(self.output_dir)
            self.path.mkdir()
        except OSError as error:
            self._remove_created()
            raise ConversionError(f"Cannot create OUTPUT_DIR {self.output_dir}: {error.strerror or error}.") from None
        return self.path

    def __exit__(self, kind, error, traceback):
        if error is None:
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_created()
        if isinstance(error, OSError):  # disk full, permissions...: the user's problem, told in one line
            raise ConversionError(
                f"Writing {self.output_dir} failed: {error.strerror or error}; nothing was written."
            ) from None
        return False

    def _remove_created(self):
        for directory in reversed(self.created):
            try:
                directory.rmdir()
            except OSError:
                break


def fresh_partial(output: Path) -> Path:
    """Where to build OUTPUT before it is renamed into place: a new `.NAME.partial-PID-*` beside it (the same file
    system, so the rename is atomic), once the partials of killed runs are gone."""
    remove_stale_partials(output)
    return output.with_name(f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")


def remove_stale_partials(output: Path) -> None:
    """Remove the `.NAME.partial-*` folders (conversions) or files (`.npz` exports) of the same OUTPUT that were
    killed, saying so."""
    for partial in output.parent.glob(f".{output.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _is_running(int(pid)):
            continue  # another conversion of the same OUTPUT is under way
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        print(f"removed {partial}, left by an interrupted conversion", file=sys.stderr)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_into_place(temporary: Path, output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists():
        if any(output_dir.iterdir()) and not overwrite:  # appeared while converting
            raise ConversionError(f"OUTPUT_DIR {output_dir} is not empty: pass --overwrite to replace it.")
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
        output_dir.rename(old)
        try:
            temporary.rename(output_dir)
        except BaseException:
            old.rename(output_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(output_dir)


__all__ = ["building", "check_output_dir", "fresh_partial", "move_into_place", "remove_stale_partials"]
