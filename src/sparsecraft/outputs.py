"""Where commands may write: one output policy for every command that writes.

Every check runs before a model is loaded or any work is done:

* the parent folder must exist (no chain of folders is created) and be writable;
* an output that is, or contains, the current folder (``--out .``, ``--out ..``) is refused;
* an existing output is replaced only with ``--overwrite``, and ``--overwrite`` replaces only
  what sparsecraft wrote: a folder holding the marker file :data:`MARKER` (every command
  that writes a folder puts it there) or a sparsecraft checkpoint (its header parses), a
  ``.safetensors`` file with a sparsecraft header, or (for ``--json``/``--plot`` reports) a
  plain file. An empty folder counts as free.
* ``train --out DIR`` continues the run in DIR; see :func:`check_train_out`.

All refusals are :class:`~sparsecraft.errors.ConfigError` with one line naming the path.
Light on imports: the command modules import this while the parser is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["MARKER", "check_output", "check_train_out", "marker_text", "write_marker", "is_sparsecraft_output"]

#: Written into every output folder; ``--overwrite`` replaces only folders that hold it
#: (or a sparsecraft checkpoint, for folders written before the marker existed).
MARKER = "sparsecraft-output.json"
#: Files ``run_training`` writes into its folder (for runs from before the marker).
TRAIN_FILES = frozenset({"checkpoint.pt", "model.safetensors", "report.json", MARKER})


def marker_text(command: str) -> str:
    from . import __version__

    return json.dumps({"written_by": "sparsecraft", "version": __version__, "command": command}) + "\n"


def write_marker(folder: str | Path, command: str) -> None:
    """Mark ``folder`` as written by ``command`` (atomically)."""
    from .formats.io import atomic_write

    atomic_write(Path(folder) / MARKER, lambda tmp: tmp.write_text(marker_text(command)))


def _marker_command(folder: Path) -> str | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("written_by") == "sparsecraft":
        return str(data.get("command"))
    return None


def _holds_checkpoint(path: Path) -> bool:
    from .checkpoint import is_checkpoint

    return is_checkpoint(path)


def is_sparsecraft_output(path: str | Path) -> bool:
    """Whether ``path`` is something sparsecraft wrote (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _marker_command(path) is not None or _holds_checkpoint(path)
    return path.suffix == ".safetensors" and path.is_file() and _holds_checkpoint(path)


def _check_place(text: str, flag: str) -> Path:
    """The checks every output shares: not the current folder, parent exists and is writable."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{flag} needs a path")
    path = Path(text)
    full = Path(os.path.abspath(path))  # lexical: '..' resolved without following links
    real = path.resolve()
    cwd = Path.cwd().resolve()
    for candidate in (full, real):
        if candidate == cwd or candidate in cwd.parents:
            raise ConfigError(f"{flag} '{text}' is or contains the current folder; choose a new folder")
    parent = full.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ConfigError(f"{flag} '{text}': parent folder '{parent}' {what} (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} '{text}': folder '{parent}' is not writable")
    return path


def check_output(text: str, *, overwrite: bool, flag: str = "--out", kind: str = "model",
                 how: str = "pass --overwrite") -> Path:
    """Check an output path before any work; returns it as a Path.

    ``kind``: ``model`` (a folder, or one file when the name ends in ``.safetensors``),
    ``folder`` (a folder of results) or ``file`` (a report file: JSON, PNG). ``how`` says
    in the refusal how to allow replacing (a recipe says ``set overwrite: true``).
    """
    if kind not in ("model", "folder", "file"):
        raise ValueError(f"unknown output kind {kind!r}")
    path = _check_place(text, flag)
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        raise ConfigError(f"{flag} '{text}' exists; {how} to replace it")
    if kind == "file":
        if path.is_dir():
            raise ConfigError(f"{flag} '{text}' is a folder; it needs a file name")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{flag} '{text}' is not writable")
        return path
    single = kind == "model" and path.suffix == ".safetensors"
    if single:
        if path.is_dir() or not _holds_checkpoint(path):
            raise ConfigError(f"{flag} '{text}' is not a sparsecraft checkpoint; --overwrite replaces "
                              f"only what sparsecraft wrote")
        return path
    if not path.is_dir():
        raise ConfigError(f"{flag} '{text}' is a file, not a folder; --overwrite replaces only sparsecraft folders")
    if any(path.iterdir()) and not is_sparsecraft_output(path):
        raise ConfigError(
            f"{flag} '{text}' is not a sparsecraft output (no {MARKER} and no sparsecraft checkpoint); "
            f"--overwrite replaces only what sparsecraft wrote"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} '{text}' is not writable")
    return path


def _is_train_run(folder: Path) -> bool:
    command = _marker_command(folder)
    if command is not None:
        return command == "train"
    # a run from before the marker existed (or interrupted before it was written)
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    return "checkpoint.pt" in names and names <= TRAIN_FILES


def check_train_out(text: str, *, overwrite: bool, resume: bool, flag: str = "--out") -> Path:
    """Check ``train --out``: a new or empty folder, or the folder of a training run.

    A training run's folder is continued (the runner refuses a checkpoint of another
    recipe); starting it over (``--no-resume``) replaces its files and so needs
    ``--overwrite``. Any other existing content is refused, with or without ``--overwrite``:
    training writes its files into the folder and must never mix them with another model's.
    """
    path = _check_place(text, flag)
    if not (path.exists() or path.is_symlink()):
        return path
    if not path.is_dir():
        raise ConfigError(f"{flag} '{text}' is a file; train needs a folder")
    if not any(path.iterdir()):
        return path
    if not _is_train_run(path):
        raise ConfigError(f"{flag} '{text}' holds files that are not a sparsecraft training run; "
                          f"train never writes into another model's folder: choose another {flag}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} '{text}' is not writable")
    if not resume and not overwrite:
        raise ConfigError(f"{flag} '{text}' holds a training run; pass --overwrite with --no-resume to "
                          f"start it over")
    return path
