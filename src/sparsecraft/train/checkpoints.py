"""Training checkpoints: written atomically with a checksum, checked completely before a resume.

Layout: one magic line, one JSON line ``{"version", "bytes", "sha256"}`` describing the
payload, then the payload: ``torch.save`` of the run's state (recipe, step, model, optimizer,
sparsity state). Reading verifies the length and the SHA-256 of the payload before
``torch.load(weights_only=True)`` sees a byte (so nothing in the file executes), then
checks what it holds against the running model, optimizer and recipe before anything is
changed. Like model files' checksums, this detects damage, not a deliberate forgery.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, FormatError, SparsecraftError
from ..formats.io import atomic_write

__all__ = ["CHECKPOINT", "write_checkpoint", "read_checkpoint", "restore_"]

CHECKPOINT = "checkpoint.pt"
MAGIC = b"SPARSECRAFT-TRAIN-CHECKPOINT\n"
VERSION = 1
_HEADER_LIMIT = 4096  # the JSON line is ~120 bytes
_KEYS = {"recipe", "step", "elapsed", "model", "optimizer", "sparsity"}


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = json.dumps({"version": VERSION, "bytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + header)
            f.write(payload)

    atomic_write(path, write)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The verified, unpickled-without-code state of ``path`` (FormatError otherwise)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                old = magic.startswith(b"PK")  # a bare torch.save zip from before checksums
                raise FormatError(
                    f"checkpoint '{path}' is "
                    + ("from an older sparsecraft without checksums" if old else "not a sparsecraft training checkpoint")
                    + "; use another --out folder, or --no-resume --overwrite to start over"
                )
            line = f.readline(_HEADER_LIMIT)
            try:
                header = json.loads(line)
            except ValueError:
                header = None
            if (not isinstance(header, dict) or header.get("version") != VERSION
                    or not isinstance(header.get("bytes"), int) or not isinstance(header.get("sha256"), str)):
                raise FormatError(f"checkpoint '{path}': damaged header")
            start = len(MAGIC) + len(line)
            if header["bytes"] != size - start:
                raise FormatError(
                    f"checkpoint '{path}' is truncated or extended: {size - start} payload bytes, "
                    f"header says {header['bytes']}"
                )
            payload = f.read()  # exactly the file's own length, checked above
    except OSError as exc:
        raise FormatError(f"checkpoint '{path}' cannot be read: {exc.strerror or exc}") from None
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise FormatError(f"checkpoint '{path}' fails its checksum: the file is damaged")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything that would run code
        raise FormatError(
            f"checkpoint '{path}' cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    if not isinstance(state, dict) or set(state) != _KEYS:
        raise FormatError(f"checkpoint '{path}' does not hold a training state ({sorted(_KEYS)})")
    return state


def _finite(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all())


def _check_recipe(path, state, recipe) -> None:
    # how often checkpoints are written does not change the run
    mine = {k: v for k, v in recipe.to_dict().items() if k != "checkpoint_every"}
    theirs = state["recipe"]
    if not isinstance(theirs, dict):
        raise FormatError(f"checkpoint '{path}': its recipe is not a mapping")
    theirs = {k: v for k, v in theirs.items() if k != "checkpoint_every"}
    if mine != theirs:
        diff = sorted(str(k) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k))
        raise ConfigError(
            f"checkpoint '{path}' is from a different recipe (differs in {diff}); "
            "use another --out folder, or --no-resume --overwrite to start over"
        )


def _check_model(path, saved, model) -> None:
    mine = model.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(mine):
        keys = set(saved) if isinstance(saved, dict) else set()
        raise FormatError(
            f"checkpoint '{path}': model tensors do not fit (missing {sorted(set(mine) - keys)[:3]}, "
            f"unexpected {sorted(map(str, keys - set(mine)))[:3]})"
        )
    for name, t in saved.items():
        if not torch.is_tensor(t) or tuple(t.shape) != tuple(mine[name].shape) or t.dtype != mine[name].dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
            raise FormatError(
                f"checkpoint '{path}': tensor '{name}' is {got}, the model's is "
                f"{tuple(mine[name].shape)} {mine[name].dtype}"
            )
        if not _finite(t):
            raise FormatError(f"checkpoint '{path}': tensor '{name}' holds NaN or inf")


def _check_optimizer(path, saved, optimizer) -> None:
    mine = optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        raise FormatError(f"checkpoint '{path}': optimizer state is not a torch optimizer state")
    groups = saved["param_groups"]
    if len(groups) != len(mine["param_groups"]):
        raise FormatError(f"checkpoint '{path}': optimizer has {len(groups)} parameter groups, this run has "
                          f"{len(mine['param_groups'])}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for theirs, ours in zip(groups, mine["param_groups"]):
        if not isinstance(theirs, dict) or theirs.get("params") != ours["params"]:
            raise FormatError(f"checkpoint '{path}': optimizer parameter groups do not fit this model")
        # lr is set by the schedule at every step; every other setting must be this run's
        differ = sorted(k for k in set(ours) | set(theirs) if k not in ("params", "lr", "initial_lr")
                        and theirs.get(k) != ours.get(k))
        if differ:
            raise FormatError(f"checkpoint '{path}': optimizer settings differ from this run's in {differ}")
    for key, entry in saved["state"].items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(params) \
                or not isinstance(entry, dict):
            raise FormatError(f"checkpoint '{path}': optimizer state for an unknown parameter {key!r}")
        shape = tuple(params[key].shape)
        for name, value in entry.items():
            if value is None or isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                continue
            if not torch.is_tensor(value) or (value.numel() != 1 and tuple(value.shape) != shape) \
                    or not _finite(value):
                raise FormatError(
                    f"checkpoint '{path}': optimizer state '{name}' of parameter {key} does not fit "
                    f"(shape {shape}) or holds NaN/inf"
                )


def restore_(path: Path, state: dict[str, Any], recipe, total_steps: int, model, optimizer, sparsity) -> tuple[int, float]:
    """Check ``state`` (from :func:`read_checkpoint`) against this run, then load it into
    ``model``, ``optimizer`` and ``sparsity``; returns (step, elapsed seconds)."""
    _check_recipe(path, state, recipe)
    step, elapsed = state["step"], state["elapsed"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
        raise FormatError(f"checkpoint '{path}': step {step!r} is outside the run's [0, {total_steps}]")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not (math.isfinite(elapsed) and elapsed >= 0):
        raise FormatError(f"checkpoint '{path}': elapsed time {elapsed!r} is not a number of seconds")
    _check_model(path, state["model"], model)
    _check_optimizer(path, state["optimizer"], optimizer)
    if (state["sparsity"] is None) != (sparsity is None):
        raise FormatError(f"checkpoint '{path}' does not match the method '{recipe.method}'")
    if sparsity is not None:
        try:
            sparsity.validate_state(state["sparsity"])
        except SparsecraftError as exc:
            raise FormatError(f"checkpoint '{path}': {exc}") from None
        if state["sparsity"]["step"] != step:
            raise FormatError(
                f"checkpoint '{path}': sparsity state is at step {state['sparsity']['step']}, the run at {step}"
            )
    # everything checked: now change things
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if sparsity is not None:
        sparsity.load_state_dict(state["sparsity"])
    return step, float(elapsed)
