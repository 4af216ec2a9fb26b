"""Saving and loading whole models in sparsecraft's compressed format.

``save(model, path)`` writes

* ``path`` itself when it ends in ``.safetensors`` (one file), or
* a directory ``path/`` holding ``model.safetensors`` (+ ``config.json`` and the tokenizer
  for Hugging Face models, so their own tools can read the folder, + ``extra_files``: plain
  file names only);
* with ``max_shard_bytes`` (folders only), or when written block by block
  (:mod:`sparsecraft.streaming`), a directory of shards
  ``model-00001-of-0000N.safetensors``, each a complete tensor file as above, plus the index
  ``model.safetensors.index.json`` (see :func:`write_index`). Folders with one
  ``model.safetensors`` (every checkpoint written before shards existed) load as before.

The tensor file is valid safetensors; its header carries, per tensor, the encoding chosen
automatically (dense, bitmask, CSR or packed N:M), the pattern, sparsity and a checksum
(see :mod:`sparsecraft.formats`). Tied parameters are stored once and recorded as aliases.
Only tensors that sparsecraft pruned (a ``method`` in their record) get a pattern other than
``dense``; an untouched tensor that happens to hold zeros is still ``dense`` (with its
measured sparsity).

A directory is written into a temporary sibling and renamed into place, so a crash never
leaves half a checkpoint; an existing path is replaced only with ``overwrite=True``. The
folder gets the usual permissions (``0o777 & ~umask``), not the temporary folder's 0700.

``load(path)`` rebuilds Hugging Face models from the recorded class and config; any other
model is loaded into a module you pass (``load(path, model=module)``). The model never
gets pickled. Structurally shrunk models (:mod:`sparsecraft.structured`) carry a record of
their resized modules (:mod:`sparsecraft.shapes`); ``load`` resizes those modules of the
freshly built model first. A shrunk transformers model whose blocks all have the same new
sizes gets a ``config.json`` with those sizes (:func:`sparsecraft.hf_export.hf_config`), so
``transformers`` loads the folder too as long as its tensors are stored dense (a shrunk model
that was not also pruned); otherwise ``config.json`` keeps the original sizes plus a
``sparsecraft_note`` saying why, and the header's ``extra["shrink"]`` (shown by
``sparsecraft info``) says whether the shrink is uniform.

``save(..., format="dense-hf")`` writes instead a folder that knows nothing of sparsity: plain
dense safetensors shards and ``config.json`` as transformers saves them (see
:mod:`sparsecraft.hf_export`), plus the tokenizer and ``extra_files``, made visible atomically
the same way.

Nothing the file says is used before it is checked, in this order: the whole header against
its checksum; the model class against an allow-list of transformers model classes (built
from transformers' auto-model mappings; ``pipeline``, ``Trainer`` and other callables are
refused); the model is built on the meta device (no memory) and every tensor it expects is
compared with the header (names, shapes, dtypes, aliases, the shape record and its size
attributes); the bytes the load needs are compared with the file's length and the available
memory. Only then is the model materialised and the tensors read and verified.

What the checksums protect, and what not: every tensor and the whole header (tensor table,
aliases, shape record, model record) are covered by SHA-256 checksums, which catch
accidental corruption: flipped bits, a truncated or half-copied file, a header edited by
mistake. They are **not signatures**: anyone who can write the file can rewrite a tensor or
the header together with its checksum. The checks above keep such a file from making us
allocate, import or run anything beyond the allow-listed model class, but its weights are
only as trustworthy as its source.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import FormatError
from .formats.io import _UMASK
from .masks import META_ATTR, get_meta
from .quant.convert import RECORD_KEY as QUANT_KEY
from .quant.convert import apply_quant_record_, quant_expected, quant_record, record_meta
from .shapes import SHAPES_ATTR, check_record

__all__ = ["save", "load", "load_tensors", "is_checkpoint", "claims_checkpoint", "tensor_file",
           "describe", "read_checkpoint_header", "write_index", "shard_name", "TENSOR_FILE", "CONFIG_FILE",
           "INDEX_FILE", "FORMATS"]

log = logging.getLogger(__name__)
TENSOR_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: output formats of :func:`save`: sparsecraft's compressed checkpoint, or dense shards for transformers
FORMATS = ("sparsecraft", "dense-hf")
#: the index of a sharded checkpoint (Hugging Face's name: its ``weight_map`` says which shard
#: holds each stored key; sparsecraft's own table is under ``"sparsecraft"``)
INDEX_FILE = "model.safetensors.index.json"
INDEX_VERSION = 1
_INDEX_SHA_KEY = "index_sha256"
_MAX_INDEX_BYTES = 64 * 2**20


def describe(path: str | Path) -> str:
    """What ``sparsecraft info`` prints for a checkpoint folder or tensor file
    (see :func:`sparsecraft.formats.describe`; a sharded folder is one table over its shards),
    plus a line on a structural shrink."""
    from .formats.io import describe_header

    layout = _layout(Path(path))
    if layout.index is None:
        from .formats import describe as describe_file

        text = describe_file(layout.files[0])
    else:
        size = sum(f.stat().st_size for f in layout.files)
        title = f"{layout.index}  ({len(layout.files)} shards, format version {layout.version}"
        text = describe_header(title, layout.header, size)
    shrink = (layout.header.get("extra") or {}).get("shrink")
    if isinstance(shrink, dict):
        sizes = shrink.get("sizes") if isinstance(shrink.get("sizes"), dict) else {}
        kind = "uniform" if shrink.get("uniform") else "non-uniform"
        text += (f"\nstructurally shrunk ({kind}"
                 + ("".join(f", {k} {v}" for k, v in sorted(sizes.items())) if sizes else "") + "): "
                 + str(shrink.get("note", "")))
    return text


def read_checkpoint_header(path: str | Path) -> dict:
    """The sparsecraft header of a checkpoint (a sharded one's shards merged: every tensor's
    entry, and the index's ``extra``); reads no tensor data."""
    return _layout(Path(path)).header


def tensor_file(path: Path) -> Path:
    """The safetensors file of a checkpoint: the path itself or ``path/model.safetensors``."""
    return path if path.suffix == ".safetensors" else path / TENSOR_FILE


def shard_name(i: int, n: int) -> str:
    """The file name of shard ``i`` (from 0) of ``n``: ``model-00001-of-0000n.safetensors``."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _claims_index(index: Path) -> bool:
    try:
        with open(index, "rb") as f:
            return b'"sparsecraft"' in f.read(1 << 20)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like something :func:`save` wrote."""
    try:
        _layout(Path(path))
    except FormatError:
        return False
    return True


def claims_checkpoint(path: str | Path) -> bool:
    """Whether ``path``'s tensor file (or a sharded folder's index) presents itself as
    sparsecraft's, even a damaged one (:func:`sparsecraft.formats.claims_sparsecraft`); such a
    path must load as a checkpoint or fail, never fall back to another loader."""
    from .formats import claims_sparsecraft

    path = Path(path)
    if claims_sparsecraft(tensor_file(path)):
        return True
    return path.suffix != ".safetensors" and _claims_index(path / INDEX_FILE)


def _canonical_sha256(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def write_index(folder: Path, shards: list[str], extra: dict) -> dict:
    """Write the index of the shards ``shards`` (file names in ``folder``, each written by
    :func:`~sparsecraft.formats.write_tensors`) with the model-level ``extra`` (model record,
    aliases, shape record); returns the index.

    The index has Hugging Face's ``metadata.total_size`` and ``weight_map`` (stored key ->
    shard) and sparsecraft's section: format, version, per shard its header checksum and the
    tensors it holds, ``extra``, and ``index_sha256`` over the section (canonical JSON), so
    a shard swapped for another checkpoint's or an edited index is refused on load. Built
    from the shards' headers only, so the same shards always give the same bytes.
    """
    from .formats import read_header
    from .formats.io import HEADER_SHA_KEY, atomic_write

    weight_map: dict[str, str] = {}
    table: dict[str, dict] = {}
    total = 0
    for name in shards:
        header = read_header(folder / name)
        for entry in header["tensors"].values():
            for key in entry["components"].values():
                weight_map[key] = name
            total += int(entry["nbytes"])
        table[name] = {"header_sha256": header[HEADER_SHA_KEY], "tensors": list(header["tensors"])}
    section = {"format": "sparsecraft", "version": INDEX_VERSION, "shards": table, "extra": extra}
    try:
        section[_INDEX_SHA_KEY] = _canonical_sha256(section)
    except (TypeError, ValueError) as e:
        raise FormatError(f"extra must be JSON-serialisable (no NaN/inf): {e}") from None
    index = {"metadata": {"total_size": total}, "weight_map": weight_map, "sparsecraft": section}
    text = json.dumps(index, indent=1) + "\n"
    atomic_write(folder / INDEX_FILE, lambda tmp: tmp.write_text(text))
    return index


@dataclass
class _Layout:
    """Where a checkpoint's tensors are: one file, or shards listed by an index."""

    files: list[Path]
    header: dict  # the header read_header returns; a sharded checkpoint's merged
    index: Path | None = None
    version: int = 0

    @property
    def what(self) -> Path:  # the file that errors name
        return self.index if self.index is not None else self.files[0]


def _layout(path: Path) -> _Layout:
    """The checked layout of the checkpoint at ``path`` (headers only, see :func:`_read_index`)."""
    from .formats import read_header

    file = tensor_file(path)
    index = path / INDEX_FILE
    if path.suffix != ".safetensors" and not file.exists() and index.is_file():
        return _read_index(index)
    if not file.exists():
        raise FormatError(f"no sparsecraft checkpoint at '{path}' (missing {file.name})")
    return _Layout([file], read_header(file))


def _read_index(index: Path) -> _Layout:
    """A sharded checkpoint's index and every shard's header, checked before any is used:
    size, JSON, the section's checksum, plain shard names present in the folder, each
    shard's header checksum equal to the one on record and holding exactly the tensors the
    index lists for it, no tensor in two shards."""
    from .formats import read_header
    from .formats.io import HEADER_SHA_KEY

    size = index.stat().st_size
    if size > _MAX_INDEX_BYTES:
        raise FormatError(f"'{index}': index of {size:,} bytes is larger than any index sparsecraft writes")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"'{index}': not valid JSON: {e}") from None
    section = data.get("sparsecraft") if isinstance(data, dict) else None
    if not isinstance(section, dict) or section.get("format") != "sparsecraft":
        raise FormatError(f"'{index}' is not a sparsecraft index (no 'sparsecraft' section)")
    version = section.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != INDEX_VERSION:
        raise FormatError(f"'{index}': index version {version!r} is not supported (this sparsecraft reads "
                          f"{INDEX_VERSION})")
    want = section.get(_INDEX_SHA_KEY)
    try:
        got = _canonical_sha256({k: v for k, v in section.items() if k != _INDEX_SHA_KEY})
    except ValueError as e:
        raise FormatError(f"'{index}': malformed index: {e}") from None
    if not isinstance(want, str) or got != want:
        raise FormatError(f"'{index}': index checksum mismatch: the shard table or model record was altered "
                          "or corrupted")
    shards = section.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise FormatError(f"'{index}': field 'shards' must be a non-empty mapping")
    entries: dict[str, dict] = {}
    files = []
    for name, record in shards.items():
        if not isinstance(name, str) or name != os.path.basename(name) or name.startswith(".") \
                or not name.endswith(".safetensors"):
            raise FormatError(f"'{index}': shard {name!r} is not a plain .safetensors file name")
        file = index.parent / name
        if not file.is_file():
            raise FormatError(f"shard '{file}' is missing (listed in '{index}')")
        if not isinstance(record, dict) or not isinstance(record.get("tensors"), list):
            raise FormatError(f"'{index}': shard '{name}' has a malformed record")
        header = read_header(file)
        if header.get(HEADER_SHA_KEY) != record.get("header_sha256"):
            raise FormatError(f"shard '{file}' is not the shard '{index}' lists (header checksum differs): "
                              "a shard of another checkpoint?")
        if list(header["tensors"]) != record["tensors"]:
            raise FormatError(f"shard '{file}' holds other tensors than '{index}' lists for it")
        for tensor, entry in header["tensors"].items():
            if tensor in entries:
                raise FormatError(f"'{index}': tensor '{tensor}' is in two shards")
            entries[tensor] = entry
        files.append(file)
    extra = section.get("extra")
    if not isinstance(extra, dict):
        raise FormatError(f"'{index}': field 'extra' must be a mapping")
    return _Layout(files, {"tensors": entries, "extra": extra}, index, version)


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
    extra_files: dict[str, str] | None = None, format: str = "sparsecraft",
    max_shard_size: int | str | None = None, max_shard_bytes: int | None = None,
) -> Path:
    """Write ``model`` to ``path`` (see the module docstring); returns the path.

    ``format``: ``"sparsecraft"`` (compressed, the default) or ``"dense-hf"`` (a folder of
    dense safetensors shards of at most ``max_shard_size``, transformers' notation such as
    ``"2GB"``, for transformers' ``from_pretrained``; a model transformers cannot express is a
    FormatError before anything is written). ``extra_files`` (folder checkpoints only) maps
    plain file names (no folders, not ``model.safetensors`` or ``config.json``) to text written
    beside the model inside the same atomic step, e.g. a JSON report of the run.
    ``max_shard_bytes`` (sparsecraft folders only) splits the tensors over shards of at most
    that many dense bytes each, in state-dict order (a tensor larger than the limit gets a
    shard of its own).
    """
    from .formats import write_tensors
    from .hf_export import DEFAULT_SHARD_SIZE, check_dense_hf, hf_config, write_dense_hf

    path = Path(path)
    if format not in FORMATS:
        raise FormatError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    if path.exists() and not overwrite:
        raise FormatError(f"'{path}' exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FormatError(f"parent folder of '{path}' does not exist")
    _check_extra_files(extra_files)
    if max_shard_bytes is not None:
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise FormatError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        if path.suffix == ".safetensors":
            raise FormatError("max_shard_bytes needs a folder checkpoint, not a single .safetensors file")
    if format == "dense-hf":
        if path.suffix == ".safetensors":
            raise FormatError(f"format dense-hf writes a folder (shards, config.json, tokenizer), not the "
                              f"single file '{path}'")
        check_dense_hf(model)  # before anything is written
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            write_dense_hf(model, staging, max_shard_size=max_shard_size or DEFAULT_SHARD_SIZE)
            _finish_folder(staging, path, overwrite, tokenizer, extra_files)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path
    tensors, aliases = _unique_state(model)
    meta = get_meta(model)
    # only what sparsecraft pruned (a method on record) gets a pattern; the rest is dense
    # whatever zeros it holds (its measured sparsity is still stored)
    info = {name: dict(meta[name]) if "method" in meta.get(name, {}) else {"pattern": "dense"}
            for name in tensors}
    record = _model_record(model)
    extra = {"model": record, "aliases": aliases}
    shapes = getattr(model, SHAPES_ATTR, None)
    described = hf_config(model)
    if shapes:  # structurally shrunk modules: their shapes, so load can rebuild them
        extra["shapes"] = shapes
        if record["kind"] == "transformers":  # and whether its config.json can describe them
            extra["shrink"] = described.record(pruned=any("method" in m for m in meta.values()))
    quant = quant_record(model)
    if quant:  # quantised modules: what load must build in place of Linear / Embedding
        extra[QUANT_KEY] = quant

    if path.suffix == ".safetensors":
        if extra_files:
            raise FormatError("extra_files need a folder checkpoint, not a single .safetensors file")
        write_tensors(path, tensors, info=info, extra=extra, overwrite=overwrite)
        return path

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if max_shard_bytes is None:
            write_tensors(staging / TENSOR_FILE, tensors, info=info, extra=extra)
        else:
            groups = _shard_groups(tensors, max_shard_bytes)
            names = [shard_name(i, len(groups)) for i in range(len(groups))]
            for name, group in zip(names, groups):
                write_tensors(staging / name, {k: tensors[k] for k in group}, info={k: info[k] for k in group})
            write_index(staging, names, extra)
        config = described.config
        if config is None and shapes:  # the original sizes, and why transformers cannot load it
            config = copy.deepcopy(getattr(model, "config", None))
            if config is not None:
                config.sparsecraft_note = f"{described.reason}; load this folder with sparsecraft.load"
        if config is not None and hasattr(config, "to_json_file"):
            config.to_json_file(str(staging / CONFIG_FILE))
        _finish_folder(staging, path, overwrite, tokenizer, extra_files)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _finish_folder(staging: Path, path: Path, overwrite: bool, tokenizer, extra_files) -> None:
    """Tokenizer and extra files into the staging folder, then the folder into place."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    for name, text in (extra_files or {}).items():
        if (staging / name).exists():  # e.g. a tokenizer file of the same name
            raise FormatError(f"extra_files: '{name}' would replace a file of the checkpoint")
        (staging / name).write_text(text)
    # mkdtemp makes the folder 0700; a checkpoint gets the permissions of any new folder
    os.chmod(staging, 0o777 & ~_UMASK)
    _replace_dir(staging, path, overwrite)
def _shard_groups(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Tensor names in order, cut into runs of at most ``limit`` dense bytes."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _check_extra_files(extra_files) -> None:
    if extra_files is None:
        return
    if not isinstance(extra_files, dict):
        raise FormatError("extra_files must map file names to text")
    for name, text in extra_files.items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
                or "\\" in name or "\0" in name or os.path.isabs(name):
            raise FormatError(f"extra_files: {name!r} is not a plain file name (no folders, "
                              "no '..', no absolute paths)")
        if name in (TENSOR_FILE, CONFIG_FILE, INDEX_FILE) or (name.startswith("model-") and name.endswith(".safetensors")):
            raise FormatError(f"extra_files: '{name}' is reserved for the checkpoint itself")
        if name.startswith("."):
            raise FormatError(f"extra_files: '{name}' is a hidden name (those are used for staging)")
        if not isinstance(text, str):
            raise FormatError(f"extra_files: '{name}' must be text, got {type(text).__name__}")


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


def _aliases(file: Path, extra: dict, stored) -> dict[str, str]:
    """The alias table, checked: plain names, each pointing at a stored tensor."""
    aliases = extra.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise FormatError(f"'{file}': 'aliases' must map tensor names to tensor names")
    for alias, source in aliases.items():
        if not isinstance(alias, str) or not isinstance(source, str):
            raise FormatError(f"'{file}': alias {alias!r} -> {source!r} is not a pair of names")
        if alias in stored:
            raise FormatError(f"'{file}': alias '{alias}' is also a stored tensor")
        if source not in stored:
            raise FormatError(f"'{file}': alias '{alias}' points at missing tensor '{source}'")
    return aliases


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """Decoded tensors (aliases filled in), per-tensor info and the model record."""
    layout = _layout(Path(path))
    extra = layout.header.get("extra") or {}
    _aliases(layout.what, extra, layout.header["tensors"])
    tensors, info = _read_all(layout)
    for alias, source in (extra.get("aliases") or {}).items():
        tensors[alias] = tensors[source]
    return tensors, info, extra


def _read_all(layout: _Layout) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every tensor of the layout's files, verified (see :func:`sparsecraft.formats.read_tensors`)."""
    from .formats import read_tensors

    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for file in layout.files:
        t, i, _ = read_tensors(file)
        tensors.update(t)
        info.update(i)
    return tensors, info


def _model_classes() -> set[str]:
    """Names of every transformers model class the auto-model mappings know."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if not (attr.startswith("MODEL") and attr.endswith("MAPPING_NAMES")):
            continue
        mapping = getattr(modeling_auto, attr)
        for value in getattr(mapping, "values", lambda: [])():
            names.update(v for v in (value if isinstance(value, (list, tuple)) else [value])
                         if isinstance(v, str))
    return names


def _model_class(file: Path, record: dict):
    """The transformers model class the record names, from the allow-list only."""
    import transformers

    name = record.get("class")
    if not isinstance(name, str) or name not in _model_classes():
        raise FormatError(f"'{file}': field model.class = {name!r} is not a transformers model class "
                          "(only classes of transformers' auto-model mappings are loaded)")
    cls = getattr(transformers, name, None)  # imports that model's module, now that it is allowed
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FormatError(f"'{file}': field model.class = {name!r} is not a PreTrainedModel subclass")
    return cls


def _model_config(file: Path, record: dict, cls, n_tensors: int):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_dict = record.get("config")
    if not isinstance(config_dict, dict):
        raise FormatError(f"'{file}': field model.config must be a mapping")
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise FormatError(f"'{file}': field model.config.model_type = {model_type!r} is not a "
                          "transformers model type")
    # a model has at least one tensor per layer: a layer count beyond the stored tensors is a
    # lie that would only cost time and memory to build (even on the meta device)
    for key, value in config_dict.items():
        if "layers" in key and isinstance(value, int) and not isinstance(value, bool) \
                and not 0 <= value <= n_tensors:
            raise FormatError(f"'{file}': field model.config.{key} = {value} does not fit the "
                              f"{n_tensors} tensors the file holds")
    try:
        config = transformers.AutoConfig.for_model(**config_dict)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FormatError(f"'{file}': field model.config is not a valid {model_type} config: {e}") from None
    if not isinstance(config, cls.config_class):
        raise FormatError(f"'{file}': model.class {cls.__name__} does not take a "
                          f"{type(config).__name__} (model.config.model_type = {model_type!r})")
    return config


def _skeleton(file: Path, cls, config) -> nn.Module:
    """The model built on the meta device: its tensors have shapes and dtypes but no memory."""
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception as e:  # a config transformers accepts may still not build
        raise FormatError(f"'{file}': cannot build {cls.__name__} from model.config: {e}") from None


def _expected(model: nn.Module, record: dict | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """State-dict name -> (shape, dtype) of ``model`` once the shape record is applied."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    for module, entry in (record or {}).items():
        for tname, shape in entry["tensors"].items():
            full = f"{module}.{tname}" if module else tname
            if full in expected:
                expected[full] = (tuple(shape), expected[full][1])
    return expected


def _same_dtype(stored: torch.dtype, expected: torch.dtype) -> bool:
    # saved precision is kept (an fp16 checkpoint loads as fp16 into an fp32 module)
    return stored == expected or (stored.is_floating_point and expected.is_floating_point)


def _check_fit(file: Path, header: dict, aliases: dict, expected: dict) -> None:
    """Compare the header with the model's expected tensors (names, shapes, dtypes, aliases)."""
    from .formats.encodings import _as_dtype

    entries = header["tensors"]
    missing = sorted(set(expected) - set(entries) - set(aliases))
    unexpected = sorted((set(entries) | set(aliases)) - set(expected))
    if missing or unexpected:
        raise FormatError(f"checkpoint '{file}' does not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    for name, entry in entries.items():
        shape, dtype = expected[name]
        try:
            stored_shape = tuple(int(s) for s in entry["shape"])
            stored_dtype = _as_dtype(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"'{file}': tensor '{name}' has a malformed shape or dtype") from None
        if stored_shape != shape:
            raise FormatError(f"tensor '{name}': checkpoint shape {stored_shape} != model shape {shape}")
        if not _same_dtype(stored_dtype, dtype):
            raise FormatError(f"tensor '{name}': checkpoint dtype {stored_dtype} does not fit model dtype {dtype}")
    for alias, source in aliases.items():
        if expected[alias] != expected[source]:
            raise FormatError(f"'{file}': alias '{alias}' {expected[alias]} cannot share tensor "
                              f"'{source}' {expected[source]}")


def _module_nbytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of a (meta) module, counting shared ones once."""
    seen = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint; returns ``model`` filled in, or a rebuilt transformers model.

    Everything the file says is validated before the model is built or a tensor allocated
    (see the module docstring); a bad file raises :class:`FormatError` naming the file and
    the field.
    """
    from .formats.io import check_memory, read_plan

    layout = _layout(Path(path))
    file = layout.what
    # the whole header against its checksum, every component inside the file and fitting
    # its tensor's shape; reads no tensor data (a sharded checkpoint: every shard's)
    read_bytes = sum(read_plan(f)[1] for f in layout.files)
    header = layout.header
    extra = header.get("extra") or {}
    if not isinstance(extra, dict):
        raise FormatError(f"'{file}': field 'extra' must be a mapping")
    entries = header["tensors"]
    aliases = _aliases(file, extra, entries)
    record = extra.get("model") or {}
    if not isinstance(record, dict):
        raise FormatError(f"'{file}': field 'model' must be a mapping")
    shapes = extra.get("shapes") or None
    quant = extra.get(QUANT_KEY) or None

    cls = config = None
    if model is None:
        if record.get("kind") != "transformers":
            raise FormatError(
                f"'{path}' holds a plain module ({record.get('class', '?')}); "
                f"build it yourself and call load(path, model=module)"
            )
        cls = _model_class(file, record)
        config = _model_config(file, record, cls, len(entries) + len(aliases))
        target = _skeleton(file, cls, config)
    else:
        target = model
    stored = {n: e.get("shape") for n, e in entries.items() if isinstance(e, dict)}
    if shapes is not None:
        check_record(target, shapes, stored)
    expected = _expected(target, shapes)
    if quant is not None:  # quantised modules hold other tensors than the Linear they replace
        expected = quant_expected(target, quant, expected, file)
    _check_fit(file, header, aliases, expected)
    # the decoded tensors, plus the model's own tensors (all of them, non-persistent buffers
    # too) while they are built and before the file's replace them
    check_memory(read_bytes + (_module_nbytes(target) if model is None else 0), f"loading '{file}'")

    tensors, info = _read_all(layout)  # verified before the model changes
    if model is None:
        model = cls(config)
    if shapes is not None:
        from .structured.resize import apply_shapes_

        apply_shapes_(model, shapes, stored)  # resize shrunk modules before loading tensors
    if quant is not None:
        apply_quant_record_(model, quant)
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    # assign=True keeps the saved dtypes (an fp16 checkpoint stays fp16)
    model.load_state_dict(tensors, strict=True, assign=True)
    # a quantised embedding is tied to its head through the shared buffers (aliases) already
    if hasattr(model, "tie_weights") and not any(e.get("kind") == "embedding" for e in (quant or {}).values()):
        model.tie_weights()
    # only tensors that sparsecraft pruned carry a method (stored among the entry's attrs)
    meta = {
        name: {
            "pattern": entry.get("pattern"),
            "sparsity": entry.get("target_sparsity", entry.get("sparsity")),
            "method": entry["attrs"]["method"],
        }
        for name, entry in info.items()
        if isinstance(entry.get("attrs"), dict) and "method" in entry["attrs"]
    }
    if quant is not None:
        meta.update(record_meta(quant))
    object.__setattr__(model, META_ATTR, meta)
    model.eval()
    return model
