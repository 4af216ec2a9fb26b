"""Calibration-driven one-shot pruning, block by block, for any transformer.

The runner finds the model's repeated blocks by structure (the largest ``ModuleList`` of
same-type modules holding targets; no per-model code), captures the inputs of the first
block for the calibration samples, and then, for each block:

1. runs the block on the current inputs with hooks on its target layers, collecting the
   statistics the method needs (input norms for Wanda, mean/variance for DSnoT, the
   Hessian ``2XX^T`` for SparseGPT);
2. prunes the block's targets (SparseGPT also updates the kept weights);
3. runs the block again with the pruned weights; its outputs are the next block's inputs.

Memory: the calibration activations (inputs and outputs of one block) plus one block's
statistics; there is never a second copy of the model in memory. The original weights of
each block are spilled to a temporary file before the block changes, so an error half-way
restores the model exactly. The runner estimates its memory before starting and refuses
when it will not fit.

All layers of a block are pruned from statistics of the dense block (not re-collected after
each sub-layer is pruned); this is one forward pass per block cheaper than the
"sequential" variant of the SparseGPT reference.

OWL allocation takes one extra dense pass over all blocks first to measure each block's
outlier ratio (Wanda scores above ``m`` times the block mean).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, SparsecraftError, TargetError
from .patterns import NM, Unstructured
from .targets import Target, match_rule

__all__ = ["find_blocks", "capture_block_inputs", "calibrated_prune", "check_calibration", "CALIBRATED_METHODS"]

log = logging.getLogger(__name__)
CALIBRATED_METHODS = ("magnitude", "wanda", "sparsegpt")


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BlockBatch:
    """One calibration batch at a block boundary: the hidden states and the other inputs."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def find_blocks(model: nn.Module, targets: list[Target] | None = None) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ModuleList of same-type modules holding the most parameters."""
    target_modules = {id(t.module) for t in targets} if targets else None
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if target_modules is not None and not any(
            id(m) in target_modules for block in module for m in block.modules()
        ):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise TargetError(
            "found no repeated blocks (a ModuleList of same-type layers holding targets); "
            "calibrated methods need a transformer-like stack"
        )
    return best


def check_calibration(model: nn.Module, calibration) -> torch.Tensor:
    """Validate calibration token ids ``[samples, seq_len]``; returns them as a LongTensor."""
    if calibration is None:
        raise ConfigError("this method needs calibration data (token ids [samples, seq_len])")
    if not isinstance(calibration, torch.Tensor):
        try:
            calibration = torch.as_tensor(calibration)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"calibration must be token ids [samples, seq_len]: {exc}") from None
    if calibration.dim() != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 1:
        raise ConfigError(
            f"calibration must be a non-empty [samples, seq_len] tensor, got shape {tuple(calibration.shape)}"
        )
    if calibration.dtype.is_floating_point or calibration.dtype == torch.bool:
        raise ConfigError(f"calibration must hold integer token ids, got {calibration.dtype}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        low, high = int(calibration.min()), int(calibration.max())
        if low < 0 or high >= vocab:
            raise ConfigError(
                f"calibration token ids span [{low}, {high}] but the model's vocabulary has "
                f"{vocab} entries: was it tokenised with another tokenizer?"
            )
    return calibration.long()


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, batch_size: int
) -> list[BlockBatch]:
    """Run the model up to the first block for every batch and record that block's inputs."""
    captured: list[BlockBatch] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        captured.append(BlockBatch(hidden.detach(), rest, kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, calibration.shape[0], batch_size):
                batch = calibration[start : start + batch_size].to(device)
                try:
                    try:
                        model(batch, use_cache=False)
                    except TypeError:
                        model(batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != math.ceil(calibration.shape[0] / batch_size):
        raise SparsecraftError("could not capture the inputs of the first block")
    return captured


def _run_block(block: nn.Module, batches: list[BlockBatch]) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for b in batches:
            out = block(b.hidden, *b.args, **b.kwargs)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outs


class _Collector:
    """Forward hooks on a block's target layers that accumulate their input statistics."""

    def __init__(self, targets: list[Target], need_hessian: bool, need_norms: bool):
        from .oneshot import HessianAccumulator, InputNormAccumulator

        self.norms = {t.name: InputNormAccumulator() for t in targets} if need_norms else {}
        self.hessians = {t.name: HessianAccumulator() for t in targets} if need_hessian else {}
        self.handles = []
        for t in targets:  # Linear only: calibrated_prune checked that up front
            self.handles.append(t.module.register_forward_hook(self._hook(t.name)))

    def _hook(self, name):
        def hook(_module, inputs, _output):
            x = inputs[0]
            if name in self.norms:
                self.norms[name].add(x)
            if name in self.hessians:
                self.hessians[name].add(x)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _block_targets(blocks: nn.ModuleList, targets: list[Target]) -> list[list[Target]]:
    by_module = {id(t.module): t for t in targets}
    per_block = []
    for block in blocks:
        per_block.append([by_module[id(m)] for m in block.modules() if id(m) in by_module])
    return per_block


def _estimate_bytes(model, blocks, calibration, per_block, need_hessian) -> int:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:
        hidden = max(t.module.in_features for ts in per_block for t in ts)
    elem = next(model.parameters()).element_size()
    acts = 2 * calibration.numel() * hidden * elem  # inputs and outputs of one block
    stats = max(
        sum((t.module.in_features ** 2 * 4 if need_hessian else 0) + t.module.in_features * 24 for t in ts)
        for ts in per_block
    )
    # the widest intermediate activation of one batch (MLP width) during a block's forward
    widest = max(t.module.out_features for ts in per_block for t in ts)
    return acts + stats + 4 * widest * calibration.shape[1] * elem


def _owl_layer_sparsities(blocks, batches, per_block, config, progress) -> dict[str, float]:
    from .allocation import bounded_round
    from .oneshot import outlier_ratio, owl_counts, wanda_scores

    ratios, numels = {}, {}
    current = [b.hidden for b in batches]
    for i, (block, targets) in enumerate(
        tqdm(list(zip(blocks, per_block)), desc="OWL outlier scan", disable=not progress, leave=False)
    ):
        collector = _Collector(targets, need_hessian=False, need_norms=True)
        try:
            staged = [BlockBatch(h, b.args, b.kwargs) for h, b in zip(current, batches)]
            current = _run_block(block, staged)
        finally:
            collector.remove()
        scores = [wanda_scores(t.param.detach(), collector.norms[t.name].sq_norm) for t in targets]
        ratios[str(i)] = outlier_ratio(scores, m=float(config.options.get("owl_m", 5.0)))
        numels[str(i)] = sum(t.param.numel() for t in targets)
    counts = owl_counts(
        ratios, numels, config.sparsity, lam=float(config.options.get("owl_lambda", 0.08)),
        max_sparsity=config.max_sparsity,
    )
    log.info("OWL block sparsities: %s", ", ".join(f"{counts[str(i)] / numels[str(i)]:.3f}" for i in range(len(blocks))))
    # split each block's exact count over its layers (largest remainder), so the total is exact
    per_layer: dict[str, float] = {}
    for i, targets in enumerate(per_block):
        sizes = [t.param.numel() for t in targets]
        share = counts[str(i)] / numels[str(i)]
        split = bounded_round([share * n for n in sizes], [0] * len(sizes), sizes, counts[str(i)])
        per_layer.update({t.name: k / n for t, k, n in zip(targets, split, sizes)})
    return per_layer


def _prune_layer(t: Target, config, pattern, sparsity: float | None, collector: _Collector):
    """Keep-mask and (for SparseGPT) the new weight of one layer."""
    from .oneshot import dsnot_refine, sparsegpt_prune, wanda_mask

    weight = t.param.detach()
    s = None if pattern.fixed_sparsity is not None else sparsity
    new_weight = None
    if config.method == "magnitude":
        keep = pattern.keep_mask(weight.abs().float(), s, layer=t.name)
    elif config.method == "wanda":
        keep = wanda_mask(weight, collector.norms[t.name].sq_norm, pattern, s, layer=t.name)
    else:
        opts = {k: config.options[k] for k in ("blocksize", "percdamp", "max_damp_tries") if k in config.options}
        new_weight, keep, info = sparsegpt_prune(weight, collector.hessians[t.name].hessian, s, pattern, layer=t.name, **opts)
        if info.get("tries", 1) > 1:
            log.warning("layer '%s': SparseGPT needed damping %.3g", t.name, info["percdamp"])
    if config.options.get("dsnot"):
        norms = collector.norms[t.name]
        keep, _ = dsnot_refine(weight, keep, norms.mean, norms.var, norms.sq_norm, pattern=pattern, layer=t.name)
        if config.method == "sparsegpt":  # reconstruct again with the refined mask
            new_weight, keep, _ = sparsegpt_prune(weight, collector.hessians[t.name].hessian, s, pattern, keep_mask=keep, layer=t.name)
    return keep, new_weight


def calibrated_prune(model, targets, config, calibration, *, progress=True):
    """Block-by-block driver; returns ``(masks, info)`` like ``prune.plan_masks``."""
    from .oneshot import relative_reconstruction_error

    if config.method not in CALIBRATED_METHODS:
        raise ConfigError(f"method '{config.method}' has no calibrated driver")
    calibration = check_calibration(model, calibration)
    pattern = config.pattern_obj
    if config.allocation not in ("uniform", "owl"):
        raise ConfigError(
            f"calibrated pruning supports allocation 'uniform' or 'owl', got '{config.allocation}'"
        )
    if config.allocation == "owl" and pattern.fixed_sparsity is not None:
        raise ConfigError(f"OWL allocation needs a free sparsity; pattern {pattern} fixes it")
    if not isinstance(pattern, (Unstructured, NM)):
        raise ConfigError(f"calibrated methods support unstructured and N:M patterns, got {pattern}")
    from .prune import _resolve_patterns

    _, blocks = find_blocks(model, targets)
    per_block = _block_targets(blocks, targets)
    inside = {t.name for ts in per_block for t in ts}
    outside = [t.name for t in targets if t.name not in inside]
    # the pattern per layer after the fallback rule (error, skip, unstructured)
    layer_pattern = _resolve_patterns([t for ts in per_block for t in ts], config)
    skipped = [n for n, p in layer_pattern.items() if p is None]
    per_block = [[t for t in ts if layer_pattern[t.name] is not None] for ts in per_block]
    for t in (t for ts in per_block for t in ts):  # checked before anything runs
        if not isinstance(t.module, nn.Linear):
            raise TargetError(
                f"layer '{t.name}': calibrated methods support Linear layers inside blocks; "
                f"got {type(t.module).__name__} (exclude it, or use magnitude)"
            )
    measure = bool(config.options.get("measure_error"))
    need_hessian = config.method == "sparsegpt" or measure
    need_norms = config.method == "wanda" or bool(config.options.get("dsnot")) or config.allocation == "owl"
    batch_size = int(config.options.get("batch_size", 8))
    estimate = _estimate_bytes(model, blocks, calibration, per_block, need_hessian)
    available = _available_memory()
    if available is not None and estimate > 0.9 * available:
        raise SparsecraftError(
            f"calibrated pruning needs about {estimate / 2**30:.2f} GiB for activations and "
            f"statistics but only {available / 2**30:.2f} GiB is available; use fewer or shorter "
            f"calibration samples"
        )
    log.info("calibrated %s: %d blocks, %d samples x %d tokens, estimated %.0f MiB",
             config.method, len(blocks), calibration.shape[0], calibration.shape[1], estimate / 2**20)

    batches = capture_block_inputs(model, blocks, calibration, batch_size)
    layer_sparsity = (
        _owl_layer_sparsities(blocks, batches, per_block, config, progress)
        if config.allocation == "owl" else {t.name: config.target_sparsity for ts in per_block for t in ts}
    )
    overrides = config.overrides or {}
    masks, info = {}, {}
    spill = Path(tempfile.mkdtemp(prefix="sparsecraft-originals-"))
    touched: list[int] = []
    try:
        for i, (block, targets_i) in enumerate(
            tqdm(list(zip(blocks, per_block)), desc=f"{config.method} blocks", disable=not progress)
        ):
            collector = _Collector(targets_i, need_hessian, need_norms)
            try:
                _run_block(block, batches)
            finally:
                collector.remove()
            hessians = {n: h.hessian for n, h in collector.hessians.items()} if measure else {}
            results = {}
            for t in targets_i:
                s = next((v for r, v in overrides.items() if match_rule(r, t.name, t.module_name)),
                         layer_sparsity[t.name])
                results[t.name] = _prune_layer(t, config, layer_pattern[t.name], s, collector)
            del collector
            # the original weights go to disk before the block changes (restored on failure)
            originals = {t.name: t.param.detach().cpu().clone() for t in targets_i}
            torch.save(originals, spill / f"{i}.pt")
            touched.append(i)
            with torch.no_grad():
                for t in targets_i:
                    keep, new_weight = results[t.name]
                    if new_weight is not None:
                        t.param.copy_(new_weight)
                    t.param.masked_fill_(~keep, 0.0)  # +0.0, see masks.py
                    masks[t.name] = keep
                    info[t.name] = {"pattern": str(layer_pattern[t.name]), "method": config.method}
                    if measure:  # ||WX - W'X|| / ||WX|| on this block's calibration inputs
                        info[t.name]["reconstruction_error"] = float(relative_reconstruction_error(
                            originals[t.name].to(t.param.device), t.param.detach(), hessian=hessians[t.name]))
            outs = _run_block(block, batches)
            for b, out in zip(batches, outs):
                b.hidden = out
    except BaseException:
        log.error("calibrated pruning failed; restoring the original weights of %d blocks", len(touched))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for i in touched:
                for name, original in torch.load(spill / f"{i}.pt").items():
                    params[name].copy_(original)
        raise
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    for name in outside:
        log.warning("layer '%s' is outside the repeated blocks; left dense", name)
        info[name] = {"pattern": "dense", "method": "skipped"}
    for name in skipped:
        info[name] = {"pattern": "dense", "method": "skipped"}
    return masks, info
