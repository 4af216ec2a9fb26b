"""Pruning a Hugging Face model folder larger than memory: one block in memory at a time.

:func:`prune_pretrained` reads a folder with ``config.json`` and safetensors weights (one
``model.safetensors`` or ``model.safetensors.index.json`` + shards, see
:mod:`sparsecraft.shards`) and writes a sparsecraft checkpoint (:mod:`sparsecraft.checkpoint`,
sharded: one shard for the embeddings, final norm and head, one per block):

1. everything is checked before anything is read or written: the config (streamable, see
   below), the output path, every shard header against its file, the model built from
   ``config.json`` on the meta device (no memory) against the tensors the shards hold
   (names, shapes, dtypes the method handles), the memory for one block and the disk for
   the activations and the output (``shutil.disk_usage``);
2. the embeddings, final norm and head are read; the first block's inputs are captured;
   they are written as shard 1 and freed (back to the meta device);
3. for each block: its weights are read from the shards (memory-mapped), the block is
   calibrated and pruned by the calibrated driver (:func:`~sparsecraft.oneshot.driver.
   calibrated_prune`, any registered method) or, for methods without calibration, layer
   by layer; its outputs go to the next block; its tensors are written, compressed, as one
   shard; it is freed;
4. the index, ``config.json``, the tokenizer files of the input folder and ``extra_files``
   are written and the folder is renamed into place: the output appears whole or not at all.

Peak memory: the embeddings and head (during step 2 only), one block's weights with its
statistics, and the pages of the calibration activations in use. The block-boundary
activations always live in two memory-mapped files in the staging folder, which is what
makes resuming possible; a batch's pages leave the process once a pass is done with it
(:meth:`~sparsecraft.blocks.DiskActivations.release`). The peak does not grow with depth:
glibc's allocator is told to return freed tensors at once
(:func:`~sparsecraft.memory.return_freed_memory`), without which the holes of one block's
large temporaries stay resident and add up block after block.

Resume. Everything is written into the staging folder ``.<out name>.partial`` next to
``out``. Its ``stream-manifest.json`` records what the run is (config, calibration
checksum, sparsecraft version, the input's fingerprint: SHA-256 of ``config.json`` and of
the index, and per shard its size, modification time and header SHA-256, see
:meth:`~sparsecraft.shards.ShardedWeights.fingerprint`) and how many blocks are finished
(shard written and fsynced, the next block's inputs fsynced). A run that finds the staging
folder of an interrupted run of the same config, calibration and input continues after
its last finished block; any difference is an error naming what differs (``resume=False``
starts over). The files are written deterministically, so a resumed run gives the same
bytes as an uninterrupted one (on the same machine and library versions: the arithmetic of
the blocks must repeat exactly).

Not streamable (a ConfigError before anything is read): methods that need gradients of the
whole model, allocations that compare layers (``global``) or scan every block first
(``owl``), whole-model stages (``distill``) and ``activations="memory"``; for methods
without calibration, allocations other than ``uniform`` and ``erk``. Load such models with
:func:`sparsecraft.models.load` and use :func:`sparsecraft.prune_`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .allocation import allocate
from .blocks import BlockBatch, DiskActivations, block_targets, check_calibration, find_blocks
from .checkpoint import CONFIG_FILE, _check_extra_files, _model_record, _replace_dir, shard_name, write_index
from .criteria import LayerContext
from .errors import ConfigError, FormatError, SparsecraftError, TargetError
from .formats import read_header, write_tensors
from .formats.io import _UMASK, HEADER_SHA_KEY, atomic_write
from .memory import check_memory, format_bytes, return_freed_memory
from .models import _offline
from .oneshot.driver import _split, calibrated_prune, needs_block_driver
from .outputs import check_output
from .prune import WEIGHT_DTYPES, PruneConfig, _check_finite
from .shards import ShardedWeights, TensorSlot
from .targets import Target, resolve_patterns, select_targets

__all__ = ["prune_pretrained", "StreamResult", "check_streamable", "staging_folder", "MANIFEST"]

log = logging.getLogger(__name__)

MANIFEST = "stream-manifest.json"
MANIFEST_VERSION = 1
#: files of the input folder copied byte for byte next to the checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass
class StreamResult:
    """What :func:`prune_pretrained` did."""

    path: Path
    blocks: int
    resumed_from: int  # the first block this call computed (0: a fresh run)
    sparsity: float  # pruned weights over all weights of the pruned layers
    checkpoint_bytes: int  # stored bytes of every tensor (the index's total_size)
    info: dict[str, dict] = field(default_factory=dict)  # per layer, as SparsityState.info


def staging_folder(out: str | Path) -> Path:
    """Where a streamed run writes before the output appears: ``.<name>.partial`` beside ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_streamable(config) -> None:
    """ConfigError when ``config`` needs the whole model at once (see the module docstring)."""
    alloc = config.allocation_obj()
    names = set(config.solver().requires) | {n for r in config.refiners() for n in r.requires}
    _, model_stats = _split(names)
    why = None
    if config.solver().quantization() is not None:
        why = f"method '{config.method}' quantises: its layers are written whole by sparsecraft.save"
    elif config.model_stages():
        why = f"stage(s) {', '.join(st.name for st in config.model_stages())} tune the whole model"
    elif model_stats:
        why = (f"method '{config.method}' needs statistics of the whole model "
               f"({', '.join(s.name for s in model_stats)}: gradients of its loss)")
    elif alloc.requires:
        why = f"allocation '{alloc.name}' scans every block before pruning"
    elif alloc.needs_scores:
        why = f"allocation '{alloc.name}' compares the scores of every layer"
    elif not needs_block_driver(config) and alloc.name not in ("uniform", "erk"):
        why = f"allocation '{alloc.name}' is not supported without calibration"
    elif config.driver_options().activations == "memory":
        why = "activations='memory' was asked, but a streamed run keeps them in its staging folder (to resume)"
    if why:
        raise ConfigError(f"cannot prune block by block: {why}; load the model whole "
                          "(sparsecraft.models.load + prune_, CLI: --no-stream)")


# ---- the model skeleton --------------------------------------------------------------------

def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """State-dict name -> every name of the same tensor object (tied weights), state order."""
    names = list(model.state_dict(keep_vars=True))
    objects: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in names:
            objects.setdefault(id(t), []).append(name)
    order = {n: i for i, n in enumerate(names)}
    groups = {}
    for members in objects.values():
        members.sort(key=order.__getitem__)
        for n in members:
            groups[n] = members
    return groups


def _assign_(model: nn.Module, tensors: Mapping[str, torch.Tensor], groups: dict[str, list[str]]) -> None:
    """Put ``tensors`` (state-dict names) into the model, every tied name sharing one object."""
    for name, t in tensors.items():
        shared = None
        for member in groups.get(name, [name]):
            owner, leaf = _owner(model, member)
            if leaf in owner._parameters:
                old = owner._parameters[leaf]
                if shared is None:
                    shared = nn.Parameter(t, requires_grad=old.requires_grad)
                owner._parameters[leaf] = shared
            else:
                owner._buffers[leaf] = t


def _to_meta_(model: nn.Module, names, groups: dict[str, list[str]]) -> None:
    """Free the tensors ``names`` (and their tied names): back to the meta device."""
    _assign_(model, {n: torch.empty_like(model.get_parameter(n) if _is_param(model, n) else model.get_buffer(n),
                                         device="meta") for n in names}, groups)


def _is_param(model: nn.Module, name: str) -> bool:
    owner, leaf = _owner(model, name)
    return leaf in owner._parameters


def _init_buffers_(model: nn.Module, scope: nn.Module, skip: nn.Module | None = None) -> None:
    """Give the non-persistent buffers of ``scope`` (rotary frequencies, ...) but not of
    ``skip`` their values, as transformers does after building a model on the meta device:
    ``_init_weights`` of the modules that own them."""
    init = getattr(model, "_init_weights", None)
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    for module in scope.modules():
        if id(module) in skipped:
            continue
        pending = [b for b in module._non_persistent_buffers_set
                   if module._buffers.get(b) is not None and module._buffers[b].is_meta]
        if not pending:
            continue
        for b in pending:
            module._buffers[b] = torch.empty_like(module._buffers[b], device="cpu")
        if init is None:
            raise FormatError(f"cannot compute the buffers {pending} of {type(module).__name__}: the model has no "
                              "_init_weights")
        init(module)


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model ``config.json`` describes, built on the meta device (no memory)."""
    import transformers  # here: importing it takes seconds

    _offline()
    config_file = folder / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise FormatError(f"'{config_file}' is not a config transformers can read: {e}") from None
    auto = (transformers.AutoModelForCausalLM
            if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else transformers.AutoModel)
    try:
        with torch.device("meta"):
            model = auto.from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FormatError(f"'{config_file}': cannot build the model it describes: {e}") from None
    return model.eval()


def _common_dtype(slots: Mapping[str, TensorSlot]) -> torch.dtype:
    """The floating dtype holding most of the bytes: the model's dtype."""
    sizes: dict[torch.dtype, int] = {}
    for slot in slots.values():
        if slot.dtype.is_floating_point:
            sizes[slot.dtype] = sizes.get(slot.dtype, 0) + slot.nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else torch.float32


def _check_tensors(model: nn.Module, weights: ShardedWeights, groups, targets: list[Target], method: str) -> None:
    """Every tensor the model needs is in the shards with its shape; target weights have a
    dtype the method handles; the shards hold nothing the model lacks."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    where = weights.index or weights.folder / "model.safetensors"
    for name, t in expected.items():
        group = groups.get(name, [name])
        if not any(n in weights.slots for n in group):
            raise FormatError(f"'{where}': tensor '{name}' of the {type(model).__name__} that config.json describes "
                              "is in no shard")
        for n in group:
            slot = weights.slots.get(n)
            if slot is not None and slot.shape != tuple(t.shape):
                raise FormatError(f"shard '{slot.file}': tensor '{n}' has shape {list(slot.shape)}, the model "
                                  f"needs {list(t.shape)}")
    ignore = [getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [], [r"rotary_emb\.inv_freq"]]
    for name, slot in weights.slots.items():
        if name not in expected and not any(re.search(p, name) for ps in ignore for p in ps):
            raise FormatError(f"shard '{slot.file}' holds tensor '{name}', which the {type(model).__name__} that "
                              "config.json describes has not")
    for t in targets:
        for n in groups.get(t.name, [t.name]):
            slot = weights.slots.get(n)
            if slot is not None and slot.dtype not in WEIGHT_DTYPES:
                raise TargetError(f"shard '{slot.file}': weight '{n}' is {str(slot.dtype).removeprefix('torch.')}; "
                                  f"method '{method}' handles {', '.join(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)}")


# ---- the run -------------------------------------------------------------------------------

def _canonical(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _calibration_record(calibration: torch.Tensor | None) -> dict | None:
    if calibration is None:
        return None
    raw = calibration.contiguous().numpy().tobytes()
    return {"shape": list(calibration.shape), "sha256": hashlib.sha256(raw).hexdigest()}


class _Run:
    """The staging folder, its manifest and the block-by-block life of the weights: the
    :class:`~sparsecraft.oneshot.driver.BlockStream` the driver streams through."""

    def __init__(self, model, weights: ShardedWeights, groups, block_names: list[list[str]], rest_names: list[str],
                 staging: Path, identity: dict, rest_info: dict, skipped: set[str], progress: bool):
        self.model = model
        self.weights = weights
        self.groups = groups
        self.block_names = block_names
        self.rest_names = rest_names
        self.staging = staging
        self.identity = identity
        self.rest_info = rest_info
        self.skipped = skipped  # targets the pattern cannot tile, left dense (fallback "skip")
        self.n_shards = len(block_names) + 1
        self.shards = [shard_name(i, self.n_shards) for i in range(self.n_shards)]
        self.first = 0
        self.manifest: dict = {}
        self.activations: DiskActivations | None = None
        self.summary: dict[str, dict] = {}  # per pruned layer: info and counts
        self.aliases: dict[str, str] = {}
        self.progress = progress
        self._lock_fd: int | None = None

    # -- the manifest ----------------------------------------------------------------------
    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1, sort_keys=True, default=str) + "\n"
        atomic_write(self.staging / MANIFEST, lambda tmp: tmp.write_text(text))

    def open(self, resume: bool) -> None:
        """Take the staging folder: continue an interrupted run of the same identity, or start."""
        if self.staging.exists():
            manifest = self._read_manifest()
            if resume:
                self._check_identity(manifest)
                self._lock()
                self.manifest = manifest
                self.first = self._finished_blocks(manifest)
                self.aliases = dict(manifest.get("aliases") or {})
                self.summary = dict(manifest.get("summary") or {})
                log.info("resuming the run in '%s' after %d finished block(s)", self.staging, self.first)
                return
            log.info("starting over: removing the interrupted run in '%s'", self.staging)
            shutil.rmtree(self.staging)
        self.staging.mkdir(mode=0o777)
        self._lock()
        self.manifest = {"format": "sparsecraft-stream", "version": MANIFEST_VERSION, **self.identity,
                         "blocks": len(self.block_names), "done": 0, "rest_done": False, "shards": {},
                         "aliases": {}, "summary": {}}
        self._write_manifest()

    def _lock(self) -> None:
        fd = os.open(self.staging, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SparsecraftError(f"'{self.staging}' is in use by another run") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_manifest(self) -> dict:
        file = self.staging / MANIFEST
        if not self.staging.is_dir() or not file.is_file():
            raise SparsecraftError(f"'{self.staging}' exists but holds no {MANIFEST}: it is not the staging folder "
                                   "of an interrupted sparsecraft run; remove it")
        try:
            manifest = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SparsecraftError(f"'{file}' is damaged ({e}); start over (resume=False, CLI: --no-resume)") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "sparsecraft-stream":
            raise SparsecraftError(f"'{file}' is not a sparsecraft stream manifest")
        return manifest

    def _check_identity(self, manifest: dict) -> None:
        what = {"version": "manifest version", "sparsecraft": "sparsecraft version", "config": "config",
                "calibration": "calibration data", "model": "input model (fingerprint of its config, index and "
                "shard headers)", "blocks": "number of blocks", "activations": "activation dtype (what the blocks "
                "compute in)"}
        mine = {"version": MANIFEST_VERSION, **self.identity, "blocks": len(self.block_names)}
        for key, label in what.items():
            if _canonical(manifest.get(key)) != _canonical(mine.get(key)):
                raise SparsecraftError(f"'{self.staging / MANIFEST}' records an interrupted run with another {label}; "
                                       "start over (resume=False, CLI: --no-resume) or remove the folder")
        if manifest.get("torch") != torch.__version__:
            log.warning("the interrupted run used torch %s, this one %s: the resumed checkpoint may differ in "
                        "the last bits from an uninterrupted run", manifest.get("torch"), torch.__version__)

    def _finished_blocks(self, manifest: dict) -> int:
        """Finished blocks whose shards are intact (their header checksums on record)."""
        done = manifest.get("done")
        if not isinstance(done, int) or not 0 <= done <= len(self.block_names):
            raise SparsecraftError(f"'{self.staging / MANIFEST}': field 'done' is {done!r}")
        recorded = manifest.get("shards") or {}
        wanted = [self.shards[i + 1] for i in range(done)] + ([self.shards[0]] if manifest.get("rest_done") else [])
        for name in wanted:
            try:
                ok = read_header(self.staging / name).get(HEADER_SHA_KEY) == recorded.get(name)
            except FormatError:
                ok = False
            if not ok:
                raise SparsecraftError(f"shard '{self.staging / name}' of the interrupted run is missing or damaged; "
                                       "start over (resume=False, CLI: --no-resume)")
        return done

    # -- tensors in and out ----------------------------------------------------------------
    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` from the shards; tied names read once."""
        stored = {}
        for name in names:
            group = self.groups.get(name, [name])
            if group[0] != name and group[0] in names:
                continue  # read under the group's first name
            source = next(n for n in group if n in self.weights.slots)
            stored[name] = source
        tensors = self.weights.read(list(stored.values()))
        return {name: tensors[source] for name, source in stored.items()}

    def _write_shard(self, index: int, tensors: dict[str, torch.Tensor], info: dict[str, dict]) -> None:
        name = self.shards[index]
        header = write_tensors(self.staging / name, tensors, info=info, overwrite=True)
        self.manifest["shards"][name] = header[HEADER_SHA_KEY]

    def _state(self, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors ``names`` of the model, tied ones stored once (aliases to the first)."""
        tensors, aliases = {}, {}
        for name in names:
            group = self.groups.get(name, [name])
            if group[0] != name:
                aliases[name] = group[0]
                continue
            t = self.model.get_parameter(name) if _is_param(self.model, name) else self.model.get_buffer(name)
            tensors[name] = t.detach().cpu().contiguous()
        return tensors, aliases

    def _file_info(self, tensors, meta: dict[str, dict]) -> dict[str, dict]:
        # what save() stores: a record for what sparsecraft pruned (or skipped), dense otherwise
        return {n: dict(meta[n]) if "method" in meta.get(n, {}) else {"pattern": "dense"} for n in tensors}

    def load_rest(self, blocks: nn.Module) -> None:
        """The embeddings, final norm and head (and the model's own buffers) in memory."""
        _init_buffers_(self.model, self.model, skip=blocks)  # the blocks' own come with their weights
        _assign_(self.model, self._read(self.rest_names), self.groups)

    def write_rest(self, meta: dict[str, dict]) -> None:
        """Shard 1: everything outside the blocks; then free it. Layers in ``meta`` without a
        sparsity (left dense) get their measured one, as ``SparsityState.note`` records."""
        meta = {n: {**m, "sparsity": m.get("sparsity", _sparsity(None, self.model, n))} for n, m in meta.items()}
        if not self.manifest.get("rest_done"):
            tensors, aliases = self._state(self.rest_names)
            self._write_shard(0, tensors, self._file_info(tensors, meta))
            self.aliases.update(aliases)
            self.summary.update(self._summaries(meta))
            self.manifest.update(rest_done=True, aliases=self.aliases, summary=self.summary)
            self._write_manifest()
        _to_meta_(self.model, [n for n in self.rest_names if self.groups.get(n, [n])[0] == n], self.groups)

    def _summaries(self, meta: dict[str, dict]) -> dict[str, dict]:
        return {n: m for n, m in meta.items() if m.get("method") not in (None, "skipped")}

    # -- the driver's BlockStream ----------------------------------------------------------
    def store(self, batches: list[BlockBatch]) -> DiskActivations:
        self.write_rest(self.rest_info)
        if self.first == 0:
            self.activations = DiskActivations(batches, self.staging)
            self.activations.flush()
        else:
            self.activations = DiskActivations(batches, self.staging, current=self.first % 2)
        return self.activations

    def load(self, index: int, block: nn.Module, targets: list[Target]) -> None:
        _init_buffers_(self.model, block)
        _assign_(self.model, self._read(self.block_names[index]), self.groups)
        _check_finite(targets)

    def done(self, index: int, block: nn.Module, masks: dict[str, torch.Tensor], info: dict[str, dict]) -> None:
        info = {**{n: {"pattern": "dense", "method": "skipped"} for n in self.block_names[index] if n in self.skipped},
                **info}
        meta = {}
        for name, layer in info.items():
            keep = masks.get(name)
            if keep is not None:
                sparsity = 1.0 - keep.sum().item() / keep.numel()
            else:  # left dense (a fallback): its measured zeros, as SparsityState.note records
                param = self.model.get_parameter(name)
                sparsity = 1.0 - int(param.count_nonzero()) / param.numel()
            meta[name] = {**layer, "sparsity": sparsity}
        tensors, aliases = self._state(self.block_names[index])
        self._write_shard(index + 1, tensors, self._file_info(tensors, meta))
        if self.activations is not None:
            self.activations.flush()  # the next block's inputs survive a crash from here on
        self.aliases.update(aliases)
        self.summary.update(self._summaries(meta))
        self.manifest.update(done=index + 1, aliases=self.aliases, summary=self.summary)
        self._write_manifest()
        block.to("meta")

    def abandon(self, fresh: bool) -> None:
        """After a failure: release the folder, and remove it when nothing in it is worth
        resuming (a fresh run that finished no block)."""
        self.close()
        done = self.manifest.get("done", 0)
        if fresh and done == 0:
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            log.error("stopped after %d of %d blocks; the finished ones are kept in '%s': run again to resume",
                      done, len(self.block_names), self.staging)

    # -- the end ---------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Stored bytes of every tensor in the shards (what the index calls total_size)."""
        return sum(int(e["nbytes"]) for name in self.shards
                   for e in read_header(self.staging / name)["tensors"].values())

    def finish(self, out: Path, overwrite: bool, extra_files: dict[str, str] | None, *,
               index_extra: dict | None = None, config=None) -> None:
        """Write the index (with ``index_extra`` beside the model record) and the files beside
        it (``config``: the config.json to write, default the model's), then make the folder
        ``out`` (atomically)."""
        for name in DiskActivations.NAMES:
            (self.staging / name).unlink(missing_ok=True)
        write_index(self.staging, self.shards,
                    {"model": _model_record(self.model), "aliases": self.aliases, **(index_extra or {})})
        (config if config is not None else self.model.config).to_json_file(str(self.staging / CONFIG_FILE))
        for name in TOKENIZER_FILES:
            source = self.weights.folder / name
            if source.is_file():
                shutil.copyfile(source, self.staging / name)
        for name, text in (extra_files or {}).items():
            if (self.staging / name).exists():
                raise FormatError(f"extra_files: '{name}' would replace a file of the checkpoint")
            (self.staging / name).write_text(text)
        os.chmod(self.staging, 0o777 & ~_UMASK)
        (self.staging / MANIFEST).unlink()
        self.close()
        _replace_dir(self.staging, out, overwrite)


def _plain_block(config, targets: list[Target], patterns, budgets) -> tuple[dict, dict]:
    """One block of a method without calibration (what ``prune_`` does for it): masks and info,
    applied to the block's weights."""
    solver = config.solver()
    masks, info = {}, {}
    with torch.no_grad():
        for t in targets:
            p = patterns[t.name]
            if p is None:
                info[t.name] = {"pattern": "dense", "method": "skipped"}
                continue
            ctx = LayerContext(t.name, t.module, t.param, {})
            result = solver.solve(ctx, p, None if p.fixed_sparsity is not None else budgets[t.name])
            if result.weight is not None:
                t.param.copy_(result.weight)
            t.param.masked_fill_(~result.keep, 0.0)  # +0.0, see masks.py
            masks[t.name] = result.keep
            info[t.name] = {"pattern": str(p), "method": config.method}
    return masks, info


def whole_model_reason(model: str, out: str, evaluate: bool, format: str) -> str | None:
    """Why a run on ``model`` writing ``out`` cannot stream (the reasons prune and shrink
    share), or None: not a safetensors folder, one-file output, evaluation, another format."""
    from .checkpoint import claims_checkpoint
    from .shards import has_safetensors

    if not has_safetensors(model) or claims_checkpoint(model):
        return f"'{model}' is not a Hugging Face folder with safetensors weights"
    if out.endswith(".safetensors"):
        return "the output is one .safetensors file (a streamed run writes a folder of shards)"
    if evaluate:
        return "evaluation (--eval) needs the whole model"
    if format != "sparsecraft":
        return f"format {format} is written from the whole model (a streamed run writes sparsecraft shards)"
    return None


def check_stream_output(out, overwrite: bool, extra_files, who: str) -> Path:
    """The output folder of a streamed run, checked (see :func:`~sparsecraft.outputs.check_output`);
    ``extra_files`` checked unless it is a function (called at the end)."""
    if out is None:
        raise ConfigError(f"{who} needs an output folder (out=)")
    if Path(out).suffix == ".safetensors":
        raise ConfigError(f"out '{out}': a streamed run writes a folder (shard by shard), not one .safetensors file")
    out = check_output(os.fspath(out), overwrite=overwrite, flag="out", kind="folder",
                       how="pass overwrite=True (CLI: --overwrite)")
    if not callable(extra_files):
        _check_extra_files(extra_files)
    return out


def split_state_names(model: nn.Module, blocks_name: str, blocks: int) -> tuple[list[list[str]], list[str]]:
    """The model's state-dict names per block, and the rest (embeddings, final norm, head)."""
    block_names: list[list[str]] = [[] for _ in range(blocks)]
    rest_names = []
    for name in model.state_dict(keep_vars=True):
        where = _where(name, blocks_name)
        (rest_names if where == "rest" else block_names[int(where)]).append(name)
    return block_names, rest_names


def _check_disk(out: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise SparsecraftError(f"not enough disk space in '{out.parent}': {what} need about {format_bytes(need)} "
                               f"({need:,} bytes), {format_bytes(free)} is free")


def prune_pretrained(
    model_dir: str | Path,
    config,
    calibration=None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = True,
    extra_files: dict[str, str] | Callable[[StreamResult], dict[str, str]] | None = None,
    progress: bool = True,
) -> StreamResult:
    """Prune the Hugging Face model in ``model_dir`` block by block into the checkpoint ``out``.

    ``config``: a :class:`~sparsecraft.prune.PruneConfig` (or a mapping); ``calibration``:
    token ids ``[samples, seq_len]`` for calibrated methods; ``out``: a new folder (an
    existing one is replaced, atomically, only with ``overwrite`` and only if sparsecraft
    wrote it); ``resume``: continue an interrupted run of the same config, calibration and
    input from its last finished block (else start over); ``extra_files``: plain file names
    -> text written into the folder (as :func:`sparsecraft.save`), or a function of the
    result returning them (called once every block is written). See the module docstring.
    The result loads with :func:`sparsecraft.load`; weights keep the input's dtype.
    """
    if not isinstance(config, PruneConfig):
        config = PruneConfig.from_dict(config)
    config.validate()
    check_streamable(config)
    out = check_stream_output(out, overwrite, extra_files, "prune_pretrained")
    calibrated = needs_block_driver(config)

    weights = ShardedWeights.open(model_dir)
    model = _skeleton(weights.folder, _common_dtype(weights.slots))
    groups = _tie_groups(model)
    targets = select_targets(model, config.targets)
    _check_tensors(model, weights, groups, targets, config.method)
    blocks_name, blocks = find_blocks(model, targets)
    per_block = block_targets(blocks, targets)
    names = list(model.state_dict(keep_vars=True))
    block_names, rest_names = split_state_names(model, blocks_name, len(blocks))
    for name in names:  # a tied group must live in one shard
        owners = {_where(n, blocks_name) for n in groups.get(name, [name])}
        if len(owners) > 1:
            raise FormatError(f"tensor '{name}' is tied to {groups[name]} across blocks; cannot stream this model")
    inside = {t.name for ts in per_block for t in ts}
    outside = [t for t in targets if t.name not in inside]

    calib = check_calibration(model, calibration) if calibrated else None
    # every decision that needs only shapes, before anything is read (the driver decides again)
    patterns = resolve_patterns(targets if not calibrated else [t for ts in per_block for t in ts],
                                config.pattern_obj, config.fallback)
    skipped = {n for n, p in patterns.items() if p is None}
    if not calibrated:
        active = [t for t in targets if patterns[t.name] is not None]
        pattern = config.pattern_obj
        budgets = allocate(active, config.target_sparsity,
                           config.allocation_obj() if pattern.fixed_sparsity is None else "uniform",
                           overrides=config.overrides, max_sparsity=config.max_sparsity)

    # memory for the embeddings and head, and for one block twice (its weights and the
    # driver's copy of the originals); the driver checks its activations and statistics
    rest_bytes = weights.nbytes(n for n in rest_names if n in weights.slots)
    block_bytes = max(weights.nbytes(n for n in ns if n in weights.slots) for ns in block_names)
    check_memory(rest_bytes + 2 * block_bytes, "streaming (the embeddings and head, then one block at a time)",
                 SparsecraftError)

    stored = _common_dtype(weights.slots)
    # the block-boundary activations' dtype: the dtype the blocks compute in (their files are resumed)
    act_dtype = config.driver_options().wide_dtype(stored, "cpu") or stored
    identity = {"sparsecraft": __version__, "torch": torch.__version__, "config": config.to_dict(),
                "calibration": _calibration_record(calib), "model": weights.fingerprint(),
                "activations": str(act_dtype).removeprefix("torch.")}
    rest_info = {t.name: {"pattern": "dense", "method": "skipped"} for t in outside} if calibrated else {}
    run = _Run(model, weights, groups, block_names, rest_names, staging_folder(out), identity, rest_info, skipped,
               progress)
    # the disk: both activation files and the output, at most as large as the input's tensors
    resuming = resume and run.staging.exists()
    if resuming:
        run._check_identity(run._read_manifest())
    done_before = run._read_manifest().get("done", 0) if resuming else 0
    remaining = sum(weights.nbytes(n for n in ns if n in weights.slots) for ns in block_names[done_before:])
    need = remaining + (0 if resuming else rest_bytes)
    act = 0
    if calibrated and not resuming:
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None) or 0
        elem = torch.empty((), dtype=act_dtype).element_size()
        act = 2 * calib.numel() * hidden * elem
    _check_disk(out, need + act, "the activations and the output" if act else "the output")

    return_freed_memory()  # the peak must not grow with depth (see memory.py)
    run.open(resume)
    fresh = run.first == 0 and not run.manifest.get("rest_done")
    try:
        run.load_rest(blocks)
        _check_finite(outside)
        if calibrated:
            calibrated_prune(model, targets, config, calib, progress=progress, stream=run)
        else:
            rest_masks, rest_meta = _plain_block(config, outside, patterns, budgets)
            run.write_rest({n: {**m, "sparsity": _sparsity(rest_masks.get(n), model, n)} for n, m in rest_meta.items()})
            for i, (block, targets_i) in enumerate(tqdm(list(zip(blocks, per_block)), desc=f"{config.method} blocks",
                                                        disable=not progress)):
                if i < run.first:
                    continue
                run.load(i, block, targets_i)
                masks_i, info_i = _plain_block(config, targets_i, patterns, budgets)
                run.done(i, block, masks_i, info_i)
        summary = run.summary
        total = sum(_numel(model, n) for n in summary)
        pruned = sum(round(m["sparsity"] * _numel(model, n)) for n, m in summary.items())
        result = StreamResult(out, len(blocks), 0 if fresh else run.first, pruned / total if total else 0.0,
                              run.stored_bytes(), summary)
        files = extra_files(result) if callable(extra_files) else extra_files
        _check_extra_files(files)
        run.finish(out, overwrite, files)
    except BaseException:
        run.abandon(fresh)
        raise
    log.info("streamed %s over %d blocks into %s", config.method, len(blocks), out)
    return result


def _where(name: str, blocks_name: str) -> str:
    if name.startswith(f"{blocks_name}."):
        head = name[len(blocks_name) + 1:].split(".")[0]
        if head.isdigit():
            return head
    return "rest"


def _numel(model: nn.Module, name: str) -> int:
    with contextlib.suppress(AttributeError):
        return model.get_parameter(name).numel()
    return model.get_buffer(name).numel()


def _sparsity(keep: torch.Tensor | None, model: nn.Module, name: str) -> float:
    if keep is not None:
        return 1.0 - keep.sum().item() / keep.numel()
    param = model.get_parameter(name)
    return 1.0 - int(param.count_nonzero()) / param.numel()
