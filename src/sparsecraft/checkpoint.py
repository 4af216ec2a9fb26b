"""Saving and loading whole models in sparsecraft's compressed format.

``save(model, path)`` writes

* ``path`` itself when it ends in ``.safetensors`` (one file), or
* a directory ``path/`` holding ``model.safetensors`` (+ ``config.json`` and the tokenizer
  for Hugging Face models, so their own tools can read the folder).

The tensor file is valid safetensors; its header carries, per tensor, the encoding chosen
automatically (dense, bitmask, CSR or packed N:M), the pattern, sparsity and a checksum
(see :mod:`sparsecraft.formats`). Tied parameters are stored once and recorded as aliases.

A directory is written into a temporary sibling and renamed into place, so a crash never
leaves half a checkpoint; an existing path is replaced only with ``overwrite=True``.

``load(path)`` rebuilds Hugging Face models from the recorded class and config; any other
model is loaded into a module you pass (``load(path, model=module)``). The model never
gets pickled. Structurally shrunk models (:mod:`sparsecraft.structured`) carry a record of
their resized modules; ``load`` resizes those modules of the freshly built model first.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import FormatError
from .masks import META_ATTR, get_meta

__all__ = ["save", "load", "load_tensors", "is_checkpoint", "tensor_file", "TENSOR_FILE"]

log = logging.getLogger(__name__)
TENSOR_FILE = "model.safetensors"
SHAPES_ATTR = "sparsecraft_shapes"  # set by sparsecraft.structured on shrunk models


def tensor_file(path: Path) -> Path:
    """The safetensors file of a checkpoint: the path itself or ``path/model.safetensors``."""
    return path if path.suffix == ".safetensors" else path / TENSOR_FILE


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like something :func:`save` wrote."""
    from .formats import read_header

    file = tensor_file(Path(path))
    if not file.is_file():
        return False
    try:
        read_header(file)
    except FormatError:
        return False
    return True


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with tied tensors stored once: (tensors, {alias: stored name})."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_storage: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in first_by_storage:
            aliases[name] = first_by_storage[key]
            continue
        first_by_storage[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def _model_record(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {"kind": "transformers", "class": type(model).__name__, "config": config.to_dict()}
    return {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def save(
    model: nn.Module, path: str | Path, *, overwrite: bool = False, tokenizer=None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` compressed to ``path`` (see the module docstring); returns the path.

    ``extra_files`` (folder checkpoints only) maps file names to text written beside the
    model inside the same atomic step, e.g. a JSON report of the run.
    """
    from .formats import write_tensors

    path = Path(path)
    if path.exists() and not overwrite:
        raise FormatError(f"'{path}' exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FormatError(f"parent folder of '{path}' does not exist")
    tensors, aliases = _unique_state(model)
    meta = get_meta(model)
    info = {name: dict(meta[name]) for name in tensors if name in meta}
    extra = {"model": _model_record(model), "aliases": aliases}
    shapes = getattr(model, SHAPES_ATTR, None)
    if shapes:  # structurally shrunk modules: their shapes, so load can rebuild them
        extra["shapes"] = shapes

    if path.suffix == ".safetensors":
        if extra_files:
            raise FormatError("extra_files need a folder checkpoint, not a single .safetensors file")
        write_tensors(path, tensors, info=info, extra=extra, overwrite=overwrite)
        return path

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write_tensors(staging / TENSOR_FILE, tensors, info=info, extra=extra)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_file"):
            config.to_json_file(str(staging / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        _replace_dir(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _replace_dir(staging: Path, path: Path, overwrite: bool) -> None:
    if not path.exists():
        os.replace(staging, path)
        return
    if not overwrite:
        raise FormatError(f"'{path}' appeared while saving; not replaced")
    backup = path.with_name(f".{path.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(path, backup)
    os.replace(staging, path)
    if backup.is_dir():
        shutil.rmtree(backup)
    else:
        backup.unlink()


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """Decoded tensors (aliases filled in), per-tensor info and the model record."""
    from .formats import read_tensors

    path = Path(path)
    file = tensor_file(path)
    if not file.exists():
        raise FormatError(f"no sparsecraft checkpoint at '{path}' (missing {file.name})")
    tensors, info, extra = read_tensors(file)
    for alias, source in (extra.get("aliases") or {}).items():
        if source not in tensors:
            raise FormatError(f"'{file}': alias '{alias}' points at missing tensor '{source}'")
        tensors[alias] = tensors[source]
    return tensors, info, extra


def _build_transformers(record: dict) -> nn.Module:
    import transformers

    config_dict = dict(record["config"])
    model_type = config_dict.get("model_type")
    cls = getattr(transformers, record["class"], None)
    if model_type is None or cls is None:
        raise FormatError(f"cannot rebuild model class '{record['class']}' from the checkpoint")
    config = transformers.AutoConfig.for_model(**config_dict)
    return cls(config)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint; returns ``model`` filled in, or a rebuilt transformers model."""
    tensors, info, extra = load_tensors(path)
    record = extra.get("model") or {}
    if model is None:
        if record.get("kind") != "transformers":
            raise FormatError(
                f"'{path}' holds a plain module ({record.get('class', '?')}); "
                f"build it yourself and call load(path, model=module)"
            )
        model = _build_transformers(record)
    if extra.get("shapes"):
        from .structured.resize import apply_shapes_

        apply_shapes_(model, extra["shapes"])  # resize shrunk modules before loading tensors
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(
            f"checkpoint '{path}' does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, t in tensors.items():
        if tuple(expected[name].shape) != tuple(t.shape):
            raise FormatError(
                f"tensor '{name}': checkpoint shape {tuple(t.shape)} != model shape "
                f"{tuple(expected[name].shape)}"
            )
    # assign=True keeps the saved dtypes (an fp16 checkpoint stays fp16)
    model.load_state_dict(tensors, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    # only tensors that sparsecraft pruned carry a method (stored among the entry's attrs)
    meta = {
        name: {
            "pattern": entry.get("pattern"),
            "sparsity": entry.get("target_sparsity", entry.get("sparsity")),
            "method": entry["attrs"]["method"],
        }
        for name, entry in info.items()
        if "method" in (entry.get("attrs") or {})
    }
    object.__setattr__(model, META_ATTR, meta)
    model.eval()
    return model
