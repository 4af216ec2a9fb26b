"""Shrinking a Hugging Face model folder larger than memory: one block in memory at a time.

:func:`shrink_pretrained` is :func:`~sparsecraft.structured.shrink_` for a folder of
safetensors weights, written as a sharded sparsecraft checkpoint the way
:func:`sparsecraft.streaming.prune_pretrained` writes pruned ones (same staging folder,
manifest, resume and atomic end; see :mod:`sparsecraft.streaming`):

1. the plan (groups, exact counts, overrides) is made on the model built from
   ``config.json`` on the meta device, so every rule is checked before a weight is read;
   every group must lie inside one block (MLP channels and attention heads do);
2. for each block: its weights are read, its groups are scored, the lowest units are cut
   out, the block's smaller tensors are written as one shard and freed. ``magnitude`` reads
   only the weights. ``wanda`` runs the calibration batches through the dense block (the
   embeddings' outputs at block 0), which gives the input norms of its layers and the next
   block's inputs in one pass: the scores are those of the untouched model, as in the
   in-memory ``shrink_``, so both choose the same units;
3. the index records the new shapes (``sparsecraft.load`` rebuilds them); ``config.json``
   holds the new sizes when the shrink is uniform and the config can express it (then
   ``transformers`` loads the folder too), else the original sizes and a note why.

``taylor`` and ``lrp-*`` need gradients or relevance through the whole model: refused before
anything is read (load the model whole and use ``shrink_``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..blocks import capture_block_inputs, check_calibration, find_blocks
from ..checkpoint import _check_extra_files
from ..errors import ConfigError, SparsecraftError
from ..memory import check_memory, return_freed_memory
from ..shapes import SHAPES_ATTR
from ..shards import ShardedWeights
from ..streaming import (
    _calibration_record,
    _check_disk,
    _check_tensors,
    _common_dtype,
    _Run,
    _skeleton,
    _tie_groups,
    _where,
    check_stream_output,
    split_state_names,
    staging_folder,
)
from .config import ShrinkConfig
from .resize import apply_shapes_, get_shapes
from .scores import norms_while
from .shrink import (
    LayerShrink,
    ShrinkReport,
    apply_selections_,
    choose_units,
    magnitude_maps,
    plan_shrink,
    wanda_maps,
    wanda_modules,
)

__all__ = ["shrink_pretrained", "STREAMABLE_CRITERIA"]

#: criteria whose scores one block at a time can give
STREAMABLE_CRITERIA = ("magnitude", "wanda")


def check_streamable_shrink(config: ShrinkConfig) -> None:
    """ConfigError when ``config`` needs the whole model at once."""
    if config.criterion not in STREAMABLE_CRITERIA:
        raise ConfigError(f"cannot shrink block by block: criterion '{config.criterion}' needs gradients or "
                          f"relevance through the whole model; load the model whole (sparsecraft.models.load + "
                          f"shrink_, CLI: --no-stream)")


def _block_of(step, blocks_name: str) -> int:
    """The block every tensor of ``step``'s group lives in (a group across blocks cannot stream)."""
    owners = {_where(f"{s.module}.x", blocks_name) for s in step.group.slices}
    if len(owners) != 1 or "rest" in owners:
        raise ConfigError(f"cannot shrink block by block: layer '{step.group.name}' has units in "
                          f"{'the embeddings or head' if 'rest' in owners else 'several blocks'}; load the model "
                          "whole (CLI: --no-stream)")
    return int(owners.pop())


def shrink_pretrained(
    model_dir: str | Path,
    config: ShrinkConfig | Mapping[str, Any],
    calibration=None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = True,
    extra_files: dict[str, str] | Callable[[ShrinkReport], dict[str, str]] | None = None,
    progress: bool = True,
) -> ShrinkReport:
    """Shrink the Hugging Face model in ``model_dir`` block by block into the checkpoint ``out``.

    ``config``: a :class:`ShrinkConfig` (or a mapping) with criterion ``magnitude`` or
    ``wanda``; ``calibration``: token ids ``[samples, seq_len]`` for ``wanda``; ``out``,
    ``overwrite``, ``resume`` and ``extra_files`` (a dict, or a function of the report
    returning one) as for :func:`~sparsecraft.streaming.prune_pretrained`. Returns the report ``shrink_`` gives; the
    checkpoint loads with :func:`sparsecraft.load` (weights keep the input's dtype).
    """
    config = config if isinstance(config, ShrinkConfig) else ShrinkConfig.from_dict(config)
    config.validate()
    check_streamable_shrink(config)
    out = check_stream_output(out, overwrite, extra_files, "shrink_pretrained")

    weights = ShardedWeights.open(model_dir)
    model = _skeleton(weights.folder, _common_dtype(weights.slots))
    ties = _tie_groups(model)
    _check_tensors(model, weights, ties, [], "shrink")
    plan = plan_shrink(model, config)  # every rule, on shapes alone
    blocks_name, blocks = find_blocks(model)
    steps_of: list[list] = [[] for _ in blocks]
    for step in plan.steps:
        steps_of[_block_of(step, blocks_name)].append(step)
    calib = check_calibration(model, calibration) if config.needs_calibration else None
    params_before = sum(p.numel() for p in model.parameters())

    block_names, rest_names = split_state_names(model, blocks_name, len(blocks))
    rest_bytes = weights.nbytes(n for n in rest_names if n in weights.slots)
    block_bytes = max(weights.nbytes(n for n in ns if n in weights.slots) for ns in block_names)
    check_memory(rest_bytes + 2 * block_bytes, "streaming (the embeddings and head, then one block at a time)",
                 SparsecraftError)

    identity = {"sparsecraft": __version__, "torch": torch.__version__, "config": {"shrink": config.to_dict()},
                "calibration": _calibration_record(calib), "model": weights.fingerprint()}
    run = _Run(model, weights, ties, block_names, rest_names, staging_folder(out), identity, {}, set(), progress)
    resuming = resume and run.staging.exists()
    if resuming:
        run._check_identity(run._read_manifest())
    act = 0
    if calib is not None and not resuming:
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None) or 0
        act = 2 * calib.numel() * hidden * torch.empty((), dtype=_common_dtype(weights.slots)).element_size()
    done_before = run._read_manifest().get("done", 0) if resuming else 0
    _check_disk(out, act + sum(weights.nbytes(n for n in ns if n in weights.slots) for ns in block_names[done_before:])
                + (0 if resuming else rest_bytes), "the activations and the output" if act else "the output")

    return_freed_memory()  # the peak must not grow with depth (see memory.py)
    run.open(resume)
    fresh = run.first == 0 and not run.manifest.get("rest_done")
    try:
        # the finished blocks of an interrupted run: their new shapes, on the meta device
        finished = {k: v for k, v in (run.manifest.get("shapes") or {}).items()}
        if finished:
            apply_shapes_(model, finished)
        layers = [LayerShrink(**layer) for layer in run.manifest.get("layers") or []]
        run.load_rest(blocks)
        batches = None
        if calib is not None:
            batches = capture_block_inputs(model, blocks, calib, config.batch_size)
            activations = run.store(batches)  # writes the embeddings' shard first
        else:
            run.write_rest({})
        for i, block in enumerate(tqdm(blocks, desc=f"shrink ({config.criterion}) blocks", disable=not progress)):
            if i < run.first:
                continue
            run.load(i, block, [])
            groups = [st.group for st in steps_of[i]]
            if batches is None:
                maps = magnitude_maps(model, groups)
            else:  # the dense block: its layers' input norms, and the next block's inputs
                norms = norms_while(wanda_modules(model, groups), lambda: activations.run(block, batches))
                maps = wanda_maps(model, groups, norms)
            selections, block_layers = choose_units(steps_of[i], maps, config)
            apply_selections_(model, selections)
            layers += block_layers
            run.manifest["shapes"] = get_shapes(model)
            run.manifest["layers"] = [vars(layer) for layer in layers]
            run.done(i, block, {}, {})
        params_after = sum(p.numel() for p in model.parameters())
        report = ShrinkReport(config.criterion, layers, params_before, params_after, plan.skipped,
                              {st.group.name: st.group for st in plan.steps})
        files = extra_files(report) if callable(extra_files) else extra_files
        _check_extra_files(files)
        run.finish(out, overwrite, files, **_index_and_config(model))
    except BaseException:
        run.abandon(fresh)
        raise
    return report


def _index_and_config(model) -> dict:
    """The index's shape record and shrink note, and the config.json to write (see
    :func:`sparsecraft.hf_export.hf_config`)."""
    from ..hf_export import hf_config

    described = hf_config(model)
    config = described.config
    if config is None:  # the original sizes, and why transformers cannot load it
        config = copy.deepcopy(model.config)
        config.sparsecraft_note = f"{described.reason}; load this folder with sparsecraft.load"
    # in sorted order: a resumed run has recorded its finished blocks in another
    shapes = json.loads(json.dumps(getattr(model, SHAPES_ATTR), sort_keys=True))
    return {"index_extra": {"shapes": shapes, "shrink": described.record()}, "config": config}
