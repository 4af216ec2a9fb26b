"""The calibrated one-shot driver: block by block, collecting what each method ``requires``.

The driver knows no method by name. It asks the config for its solver, refiners and
allocation, gathers the union of the statistics they declare in ``requires`` (see
:data:`STATISTICS`), and hands each layer a :class:`~sparsecraft.criteria.LayerContext`
with them. For each repeated block (:func:`~sparsecraft.blocks.find_blocks`):

1. run the block on the current inputs with hooks on its target layers, accumulating the
   layer statistics (input norms, mean/variance, Hessian ``2/n X^T X``);
2. per layer: the solver's mask (and new weights), then each refiner, then the solver
   reconstructs for a changed mask;
3. block stages (reconstruction, learned masks), when switched on, tune the pruned block
   against the dense block's outputs;
4. run the block again with the pruned weights; its outputs are the next block's inputs.

Two ways through a block (driver option ``sequential``):

* ``False`` (default, "two-pass"): every layer of the block from the statistics of the
  dense block; two forward passes per block.
* ``True`` ("true sequential", one pass): the block's layers in the order the forward pass
  calls them, each pruned from the inputs that the already-pruned earlier layers produce; the
  pass that collects the statistics is the pass that produces the pruned outputs (the
  batches run in lock step, see :class:`_Lockstep`).

Layers that read the same input tensor (q/k/v, gate/up) share one set of statistics.

Model-level statistics (``gradients``: of the language-modelling loss on the calibration
samples, dense model) are collected once before any block changes.

Under ``torch.distributed`` (:mod:`sparsecraft.distributed`) each process runs its share of
the calibration batches; a layer's statistics are summed over the processes just before the
layer is solved (:meth:`_LayerStats.layer_stats`), model-level statistics that declare
``merge="sum"`` right after they are collected, so every process solves from the same numbers
and computes the same masks. Block stages train on all calibration batches, so with them every
process runs the whole calibration set (the same work and result as one process).

An allocation that ``requires`` statistics (OWL) gets them from one dense pass over all
blocks first. Memory: the calibration activations of one block boundary plus one block's
statistics. With ``activations="disk"`` (or ``"auto"``, the default, when the estimate does
not fit in the available memory) the boundary activations live in two memory-mapped files
in the temporary folder (``TMPDIR``), so the calibration set may exceed the memory. The
original weights of each block are spilled to a temporary file before the block changes, so
an error half-way restores the model exactly. The driver estimates its memory before
starting and refuses when it will not fit.

Streaming (``stream=``, a :class:`BlockStream`; see :mod:`sparsecraft.streaming`):
the caller owns the blocks' weights. The driver asks it to load each block before the block
runs and hands it each finished block (weights pruned, outputs computed) with the block's
masks, which the driver then forgets; the boundary activations live in the caller's
memory-mapped store; blocks before ``stream.first`` are finished already (a resumed run) and
are skipped; nothing is spilled or restored (the caller's input files are never changed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import allocate
from ..blocks import (
    BlockBatch,
    ComputeIn,
    DiskActivations,
    advance_,
    block_hidden,
    block_targets,
    capture_block_inputs,
    cast_batches_,
    check_calibration,
    find_blocks,
    run_block,
)
from ..criteria import BlockLayer, LayerContext, LayerResult, Refiner, Solver
from ..distributed import Ranks, current
from ..errors import ConfigError, SparsecraftError, TargetError
from ..memory import available_memory, return_freed_memory
from ..targets import Target, resolve_patterns
from .reconstruction import relative_reconstruction_error
from .stats import HessianAccumulator, InputNormAccumulator

__all__ = [
    "DriverOptions", "BlockStream", "Statistic", "STATISTICS", "register_statistic", "check_requires", "calibrated_prune",
    "prune_layer", "collect_model_statistics", "collect_gradients", "needs_block_driver", "check_model_inputs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverOptions:
    """Settings of the driver itself (shared by every method)."""

    batch_size: int = 8  # calibration samples per forward pass
    measure_error: bool = False  # record ||WX - W'X|| / ||WX|| per layer in the info
    sequential: bool = False  # "true sequential" blocks (see the module docstring)
    activations: str = "auto"  # block-boundary activations: memory | disk | auto (disk when RAM is short)
    # what a bf16/fp16 model's blocks compute in: float32 | model | auto (float32 on CPU,
    # where half-precision matrix products are several times slower than float32)
    compute_dtype: str = "auto"

    def check(self):
        if self.batch_size < 1:
            raise ConfigError(f"option batch_size must be >= 1, got {self.batch_size}")
        if self.activations not in ("memory", "disk", "auto"):
            raise ConfigError(f"option activations must be memory, disk or auto, got {self.activations!r}")
        if self.compute_dtype not in ("float32", "model", "auto"):
            raise ConfigError(f"option compute_dtype must be float32, model or auto, got {self.compute_dtype!r}")

    def wide_dtype(self, dtype: torch.dtype, device: torch.device | str) -> torch.dtype | None:
        """The dtype blocks stored in ``dtype`` compute in, when it is not their own."""
        if dtype not in ComputeIn.HALF or self.compute_dtype == "model":
            return None
        if self.compute_dtype == "float32" or torch.device(device).type == "cpu":
            return torch.float32
        return None


class BlockStream(Protocol):
    """A caller that owns the blocks' weights and outputs (see the module docstring)."""

    #: blocks before this one are finished (a resumed run); the driver starts here
    first: int

    def store(self, batches: list[BlockBatch]) -> DiskActivations:
        """The boundary activations' store, once the first block's inputs are captured; its
        current file holds the inputs of block ``first``."""

    def load(self, index: int, block: nn.Module, targets: list[Target]) -> None:
        """Give block ``index`` its weights (it runs next)."""

    def done(self, index: int, block: nn.Module, masks: dict[str, torch.Tensor], info: dict[str, dict]) -> None:
        """Block ``index`` is pruned and its outputs are in the store: keep it, then free it."""


# ---- statistics ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Statistic:
    """How to collect one requirement.

    ``scope="layer"``: ``make()`` returns an accumulator with ``add(x)`` fed each batch of
    the layer's input; ``extract(acc)`` returns the ``ctx.stats`` entries. Requirements with
    the same ``key`` share one accumulator. ``scope="model"``: ``make(model, targets,
    calibration, batch_size)`` returns ``{layer name: value}`` (passed through ``extract``
    when given), put in ``ctx.stats[key]`` (and in ``ctx.grad`` for ``gradients``).

    Under ``torch.distributed``, a layer-scope accumulator needs ``all_reduce_(ranks)`` (sum
    over the processes). A model-scope statistic with ``merge="sum"`` is computed by each
    process on its calibration batches and summed over the processes; with ``merge=None``
    every process computes it over the whole calibration set.
    """

    name: str
    scope: str
    key: str
    make: Callable[..., Any]
    extract: Callable[[Any], dict] | None = None
    #: what calibration it reads: "tokens" (token ids [samples, seq_len]) or "any" (a batch of
    #: model inputs, e.g. images, batch on dim 0)
    inputs: str = "tokens"
    #: model scope, under torch.distributed: "sum" (each process's batches, summed) or None
    #: (every process computes it over the whole calibration set)
    merge: str | None = None


STATISTICS: dict[str, Statistic] = {}


def register_statistic(stat: Statistic) -> Statistic:
    if stat.scope not in ("layer", "model"):
        raise ValueError(f"statistic '{stat.name}': scope must be 'layer' or 'model'")
    if stat.merge not in (None, "sum"):
        raise ValueError(f"statistic '{stat.name}': merge must be None or 'sum'")
    STATISTICS[stat.name] = stat
    return stat


def _norm_stats(acc: InputNormAccumulator) -> dict:
    return {"input_norms": acc, "input_sq_norm": acc.sq_norm, "input_mean": acc.mean, "input_var": acc.var}


def _hessian_stats(acc: HessianAccumulator) -> dict:
    # taken once every batch was added (and summed over processes): the sum can go
    return {"hessian": acc.close()}


@contextlib.contextmanager
def gradients_only_for(model: nn.Module, params: list[torch.Tensor]):
    """Inside: only ``params`` require gradients and grad mode is on; the flags come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def collect_gradients(model: nn.Module, targets: list[Target], calibration: torch.Tensor, batch_size: int):
    """Sum over the calibration batches of d(LM loss)/dW for each target (dense model).

    The loss is the model's own (``labels=`` the input ids); a model that returns none is
    a ConfigError. ``requires_grad`` flags and ``.grad`` fields are left as they were. The sum
    is kept in float64 (so it does not depend on how the batches are grouped, e.g. over
    processes) and returned in float32.
    """
    params = [t.param for t in targets]
    total = {t.name: torch.zeros_like(t.param, dtype=torch.float64) for t in targets}
    device = params[0].device if params else torch.device("cpu")
    with gradients_only_for(model, params):
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start : start + batch_size].to(device)
            try:
                out = model(input_ids=batch, labels=batch)
            except TypeError:
                out = None
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ConfigError(
                    "gradients need a model that returns a language-modelling loss for labels= "
                    f"(got {type(model).__name__}); use a method without 'gradients'"
                )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, g in zip(targets, grads):
                if g is not None:
                    total[t.name] += g.float()
    return total


def _float32(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: v.float() for name, v in values.items()}


for _name in ("input_norms", "input_sq_norm", "mean_var", "input_mean", "input_var"):
    register_statistic(Statistic(_name, "layer", "input_norms", InputNormAccumulator, _norm_stats))
register_statistic(Statistic("hessian", "layer", "hessian", HessianAccumulator, _hessian_stats))
for _name in ("gradients", "grad"):
    register_statistic(Statistic(_name, "model", "gradients", collect_gradients, extract=_float32, merge="sum"))


def check_requires(names: Iterable[str], who: str) -> None:
    """ConfigError when ``who`` requires a statistic nobody knows how to collect."""
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        raise ConfigError(
            f"{who} requires {', '.join(map(repr, unknown))}, which the driver cannot collect; "
            f"known statistics: {', '.join(sorted(STATISTICS))}"
        )


def _split(names: Iterable[str]) -> tuple[list[Statistic], list[Statistic]]:
    """Distinct layer- and model-scope statistics (one per key) for ``names``."""
    layer, model, seen = [], [], set()
    for name in sorted(set(names)):
        stat = STATISTICS[name]
        if stat.key in seen:
            continue
        seen.add(stat.key)
        (layer if stat.scope == "layer" else model).append(stat)
    return layer, model


def check_model_inputs(model: nn.Module, calibration, names: Iterable[str]) -> torch.Tensor:
    """Calibration checked for the model-scope statistics ``names``: token ids unless every one
    of them reads any model inputs (then a non-empty tensor with the batch on dim 0)."""
    _, stats = _split(names)
    if stats and all(s.inputs == "any" for s in stats) and not (
            isinstance(calibration, torch.Tensor) and not calibration.dtype.is_floating_point):
        if not isinstance(calibration, torch.Tensor) or calibration.dim() < 1 or calibration.shape[0] < 1:
            raise ConfigError("this method needs calibration data: a non-empty tensor of model inputs "
                              "(batch on dim 0)")
        if not torch.isfinite(calibration).all():
            raise ConfigError("calibration inputs contain NaN or inf")
        return calibration
    return check_calibration(model, calibration)


def needs_block_driver(config) -> bool:
    """Whether ``config`` needs per-layer calibration statistics (the block driver)."""
    names = set(config.solver().requires)
    for r in config.refiners():
        names |= set(r.requires)
    names |= set(config.allocation_obj().requires)
    layer, _ = _split(names)
    return (bool(layer) or bool(config.refiners()) or bool(config.block_stages())
            or config.driver_options().measure_error)


def collect_model_statistics(model, targets, names, calibration, batch_size,
                             ranks: Ranks | None = None) -> dict[str, dict[str, Any]]:
    """``{layer: {key: value}}`` for the model-scope statistics among ``names``.

    ``calibration`` is the whole set; with ``ranks`` a statistic that merges by ``"sum"`` is
    computed on this process's batches and summed over the processes (see :class:`Statistic`).
    A model-scope ``extract`` turns the summed values into what the solver reads.
    """
    _, stats = _split(names)
    out: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
    for stat in stats:
        split = ranks is not None and stat.merge == "sum"
        values = stat.make(model, targets, ranks.shard(calibration, batch_size) if split else calibration,
                           batch_size)
        if split:
            for value in values.values():  # the same order on every process
                ranks.sum_(value)
        if stat.extract is not None:
            values = stat.extract(values)
        for name, value in values.items():
            out[name][stat.key] = value
    return out


class _LayerStats:
    """The accumulators of one block's target layers; a layer that reads the same input tensor
    as the layer before it (q/k/v, gate/up) shares that layer's statistics instead of
    accumulating the same numbers again."""

    def __init__(self, targets: list[Target], stats: list[Statistic], ranks: Ranks | None = None):
        self.stats = stats
        self.accs = {t.name: {s.key: s.make() for s in stats} for t in targets}
        self.owner: dict[str, str] = {}
        self.ranks = ranks
        self.summed: set[str] = set()

    def feed(self, name: str, x: torch.Tensor, previous: tuple[str, torch.Tensor] | None) -> bool:
        """Add one batch's input of ``name``; ``previous`` is ``(layer, input)`` of the last
        layer that accumulated for this batch. Returns whether ``name`` shares that input."""
        shares = previous is not None and previous[1] is x
        owner = self.owner.setdefault(name, previous[0] if shares and previous is not None else name)
        if (owner != name) != shares:
            raise SparsecraftError(
                f"layer '{name}' reads the same input as '{owner}' for one calibration batch but not "
                f"for another; the block's forward differs between batches"
            )
        if owner == name:
            for acc in self.accs[name].values():
                acc.add(x)
        return shares

    def layer_stats(self, name: str) -> dict:
        owner = self.owner.get(name, name)
        accs = self.accs[owner]
        if self.ranks is not None and owner not in self.summed:
            # the one point where processes meet: every process solves from the global sums
            for key in sorted(accs):
                accs[key].all_reduce_(self.ranks)
            self.summed.add(owner)
        out: dict = {}
        for s in self.stats:
            out.update(s.extract(accs[s.key]))
        return out


class _Collector(_LayerStats):
    """Forward hooks on the target layers feeding their inputs to the accumulators, for
    batches run one after another (``run_block``)."""

    def __init__(self, targets: list[Target], stats: list[Statistic], ranks: Ranks | None = None):
        super().__init__(targets, stats, ranks)
        self.last: tuple[str, torch.Tensor] | None = None
        self.handles = [t.module.register_forward_hook(self._hook(t.name)) for t in targets]

    def _hook(self, name):
        def hook(_module, inputs, _output):
            if not self.feed(name, inputs[0], self.last):
                self.last = (name, inputs[0])

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.last = None


class _Aborted(Exception):
    """Another batch of a lock-step pass failed; this one stops."""


class _Lockstep(_LayerStats):
    """One forward pass through a block that prunes its layers in call order ("true sequential").

    Each calibration batch runs the block in a thread of its own, but only one thread computes
    at a time: they pass a baton (the condition's lock), so the cores are never oversubscribed.
    Every target layer is a meeting point. Its forward pre-hook adds the batch's input to the
    layer's statistics, in batch order (so the sums are the same on every run), and waits;
    the last batch to arrive prunes the layer (``solve``), and then every batch goes on through
    the pruned layer. A layer that reads the same input as the layer before it shares that
    layer's statistics and is pruned by the first batch that reaches it. So the pass that
    collects each layer's statistics from the already-pruned earlier layers is the pass that
    produces the pruned block's outputs.
    """

    def __init__(self, targets: list[Target], stats: list[Statistic],
                 solve: Callable[[Target, Callable[[str], dict]], None], ranks: Ranks | None = None):
        super().__init__(targets, stats, ranks)
        self.targets = targets
        self.solve = solve
        self.cv = threading.Condition()
        self.local = threading.local()

    def _check(self) -> None:
        if self.failed:
            raise _Aborted

    def _hook(self, t: Target):
        def hook(_module, args):
            if not args:
                raise SparsecraftError(f"layer '{t.name}' was called without a positional input")
            j, x = self.local.index, args[0]
            if t.name in self.local.visited:
                raise SparsecraftError(
                    f"layer '{t.name}' runs more than once in one forward pass of its block; "
                    f"sequential=True cannot prune it in lock step (use sequential=False)"
                )
            self.local.visited.add(t.name)
            self.cv.wait_for(lambda: self.failed or self.arrived[t.name] == j)
            self._check()
            shares = self.feed(t.name, x, self.local.last)
            if not shares:
                self.local.last = (t.name, x)
            self.arrived[t.name] += 1
            # a layer sharing its input has complete statistics already (its owner was pruned)
            if (shares or self.arrived[t.name] == self.n) and t.name not in self.done:
                self.solve(t, self.layer_stats)
                self.done.add(t.name)
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.failed or t.name in self.done)
            self._check()

        return hook

    def _body(self, j: int, block: nn.Module, batch: BlockBatch, threads: int) -> None:
        self.local.index, self.local.visited, self.local.last = j, set(), None
        try:
            torch.set_num_threads(threads)  # a per-thread setting in OpenMP
            with self.cv, torch.inference_mode():
                out = block(batch.hidden, *batch.args, **batch.kwargs)
                self.outs[j] = block_hidden(out).detach()
                missed = [t.name for t in self.targets if t.name not in self.local.visited]
                if missed:
                    raise SparsecraftError(
                        f"layer '{missed[0]}' did not run for calibration batch {j}; sequential=True "
                        f"needs every target layer to run for every batch (use sequential=False)"
                    )
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.errors[j] = e
            with self.cv:
                self.failed = True
                self.cv.notify_all()
        finally:
            self.local.last = None

    def run(self, block: nn.Module, batches: list[BlockBatch]) -> list[torch.Tensor]:
        self.n = len(batches)
        self.arrived = {t.name: 0 for t in self.targets}
        self.done: set[str] = set()
        self.failed = False
        self.outs: list[Any] = [None] * self.n
        self.errors: dict[int, BaseException] = {}
        handles = [t.module.register_forward_pre_hook(self._hook(t)) for t in self.targets]
        workers = [threading.Thread(target=self._body, args=(j, block, b, torch.get_num_threads()), daemon=True,
                                    name=f"sparsecraft-batch-{j}") for j, b in enumerate(batches)]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        except BaseException:
            with self.cv:
                self.failed = True
                self.cv.notify_all()
            for w in workers:
                w.join()
            raise
        finally:
            for h in handles:
                h.remove()
        if self.errors:
            first = [e for _, e in sorted(self.errors.items()) if not isinstance(e, _Aborted)]
            raise (first or list(self.errors.values()))[0]
        return self.outs


def _estimate_bytes(model, calibration, per_block, need_hessian, *, sequential=False, on_disk=False,
                    block_stages=False, batch_size=8, wide=None) -> int:
    """Memory the driver needs besides the model: block-boundary activations (unless they
    live on disk), one block's statistics, what a block's forward keeps alive, and with
    ``wide`` (the dtype blocks compute in) the widened copy of one block."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:
        hidden = max(t.module.in_features for ts in per_block for t in ts)
    stored_elem = next(model.parameters()).element_size()
    elem = torch.empty((), dtype=wide).element_size() if wide is not None else stored_elem
    widened = 0 if wide is None else max(sum(t.param.numel() for t in ts) for ts in per_block) * elem
    boundary = calibration.numel() * hidden * elem  # the hidden states of every sample
    # inputs and outputs of one block (on disk: the pages of about one batch each); two passes
    # in memory replace each batch's input by its output as it goes: the inputs and one batch
    one_batch = boundary * min(batch_size, calibration.shape[0]) // calibration.shape[0]
    acts = 2 * one_batch if on_disk else 2 * boundary if sequential or block_stages else boundary + one_batch
    if block_stages:  # the dense block's outputs and the tuning's own copy of its inputs
        acts += 2 * boundary
    stats = max(
        sum((t.module.in_features ** 2 * 12 if need_hessian else 0) + t.module.in_features * 24 for t in ts)
        for ts in per_block
    )
    # the widest intermediate activation of one batch (MLP width) during a block's forward
    widest = max(t.module.out_features for ts in per_block for t in ts)
    if sequential:  # every batch's forward is paused inside the block at once; measured on
        # SmolLM2 (128 x 512) the process grew by about 6x these live activations (each
        # batch's thread keeps its own allocator pool)
        return acts + stats + widened + 6 * calibration.numel() * (2 * hidden + widest) * elem
    return acts + stats + widened + 4 * widest * calibration.shape[1] * elem


def prune_layer(solver: Solver, refiners: list[Refiner], ctx: LayerContext, pattern, sparsity) -> LayerResult:
    """The solver's decision for one layer, then each refiner (the solver re-fits the weights)."""
    result = solver.solve(ctx, pattern, sparsity)
    for refiner in refiners:
        keep = refiner.refine(ctx, result.keep, pattern)
        weight = solver.reconstruct(ctx, keep, pattern) if result.weight is not None else None
        result = LayerResult(keep, weight, result.info)
    return result


def _scan(blocks, batches, per_block, stats, progress, ranks=None, wide=None) -> dict[str, dict]:
    """One dense pass over all blocks collecting ``stats`` per layer (for an allocation);
    with ``wide`` each block computes in that dtype."""
    out: dict[str, dict] = {}
    hidden = [b.hidden for b in batches]
    for block, targets in tqdm(list(zip(blocks, per_block)), desc="statistics scan", disable=not progress,
                               leave=False):
        collector = _Collector(targets, stats, ranks)
        try:
            with _widened(block, wide):
                hidden = run_block(block, [BlockBatch(h, b.args, b.kwargs) for h, b in zip(hidden, batches)])
        finally:
            collector.remove()
        out.update({t.name: collector.layer_stats(t.name) for t in targets})
    return out


def _widened(block: nn.Module, wide: torch.dtype | None):
    """``ComputeIn(block, wide)``, or nothing to do when ``wide`` is None."""
    return ComputeIn(block, wide) if wide is not None else contextlib.nullcontext()


def calibrated_prune(model, targets, config, calibration, *, progress=True, stream: BlockStream | None = None):
    """Block-by-block driver; returns ``(masks, info, quants)``: ``masks`` and ``info`` like
    ``prune.plan_masks``, ``quants`` the quantised weights of a quantising method by layer
    (empty otherwise; the layers then hold their dequantised values).

    ``config`` is a :class:`~sparsecraft.prune.PruneConfig` (it supplies ``solver()``,
    ``refiners()``, ``allocation_obj()`` and ``driver_options()``). With ``stream`` the
    blocks come and go through it (see the module docstring) and the masks returned are
    those of layers outside the streamed blocks only.

    A bf16/fp16 model on CPU computes in float32 one block at a time (driver option
    ``compute_dtype``): the activations are float32, each block is widened while it runs and
    its weights are rounded back to their own dtype before its outputs are computed, so the
    outputs are those of the weights that are kept.
    """
    solver, refiners, alloc, opts = config.solver(), config.refiners(), config.allocation_obj(), config.driver_options()
    calibration = check_calibration(model, calibration)
    pattern = config.pattern_obj
    if alloc.needs_scores:
        raise ConfigError(
            f"method '{config.method}' with calibration does not support allocation '{alloc.name}' "
            f"(it compares scores across layers); use uniform, erk or owl"
        )
    if alloc.name != "uniform" and pattern.fixed_sparsity is not None:
        raise ConfigError(f"allocation '{alloc.name}' needs a free sparsity; pattern {pattern} fixes it")
    for part in [solver, *refiners]:
        kinds = getattr(part, "patterns", None)
        if kinds is not None and not isinstance(pattern, kinds):
            raise ConfigError(
                f"'{part.name}' supports {', '.join(k.__name__ for k in kinds)} patterns, not {pattern}"
            )

    _, blocks = find_blocks(model, targets)
    per_block = block_targets(blocks, targets)
    inside = {t.name for ts in per_block for t in ts}
    outside = [t.name for t in targets if t.name not in inside]
    layer_pattern = resolve_patterns([t for ts in per_block for t in ts], pattern, config.fallback)
    skipped = [n for n, p in layer_pattern.items() if p is None]
    per_block = [[t for t in ts if layer_pattern[t.name] is not None] for ts in per_block]
    active = [t for ts in per_block for t in ts]
    for t in active:  # checked before anything runs
        if not isinstance(t.module, nn.Linear):
            raise TargetError(
                f"layer '{t.name}': calibrated methods support Linear layers inside blocks; "
                f"got {type(t.module).__name__} (exclude it, or use magnitude)"
            )
    block_stages = config.block_stages()
    holdout = max((st.holdout() for st in block_stages), default=0)
    n_batches = math.ceil(calibration.shape[0] / opts.batch_size)
    if holdout and n_batches <= holdout:
        raise ConfigError(
            f"{', '.join(st.name for st in block_stages)} hold(s) out {holdout} calibration batch(es) of "
            f"{opts.batch_size} samples for early stopping and need(s) at least one more to train on; "
            f"{calibration.shape[0]} samples make {n_batches}: use more samples or a smaller batch_size"
        )
    names = set(solver.requires) | {n for r in refiners for n in r.requires}
    if opts.measure_error:
        names.add("hessian")
    layer_stats, model_stats = _split(names)
    alloc_stats, _ = _split(alloc.requires)
    ranks, whole = current(), calibration
    if ranks is not None and block_stages:
        log.warning("%s train(s) on every calibration batch: each of the %d processes runs the whole "
                    "calibration set (no speed-up, the same result)", ", ".join(st.name for st in block_stages),
                    ranks.world)
        ranks = None
    if ranks is not None:
        unsupported = sorted(s.name for s in layer_stats + alloc_stats if not hasattr(s.make(), "all_reduce_"))
        if unsupported:
            raise ConfigError(f"statistic(s) {', '.join(unsupported)} cannot be summed over processes "
                              f"(their accumulator has no all_reduce_); run in one process")
        calibration = ranks.shard(calibration, opts.batch_size)
    need_hessian = any(s.key == "hessian" for s in layer_stats)
    stored = active[0].param.dtype if active else torch.float32
    # streamed blocks are loaded on the CPU (on the meta device until then)
    wide = opts.wide_dtype(stored, "cpu" if stream is not None or not active else active[0].param.device)
    sizes = dict(sequential=opts.sequential, block_stages=bool(block_stages), batch_size=opts.batch_size, wide=wide)
    estimate = _estimate_bytes(model, calibration, per_block, need_hessian, **sizes)
    available = available_memory()
    if available is not None and ranks is not None:  # the processes on this machine share it
        available //= ranks.local_world
    on_disk = stream is not None or opts.activations == "disk" or (
        opts.activations == "auto" and available is not None and estimate > 0.9 * available)
    if on_disk:
        estimate = _estimate_bytes(model, calibration, per_block, need_hessian, on_disk=True, **sizes)
    if available is not None and estimate > 0.9 * available:
        raise SparsecraftError(
            f"calibrated pruning needs about {estimate / 2**30:.2f} GiB for "
            f"{'statistics (activations on disk)' if on_disk else 'activations and statistics'} but only "
            f"{available / 2**30:.2f} GiB is available; use fewer or shorter calibration samples"
            + ("" if on_disk else " or activations='disk'")
        )
    log.info("calibrated %s: %d blocks, %d samples x %d tokens%s, estimated %.0f MiB%s%s",
             config.method, len(blocks), whole.shape[0], whole.shape[1],
             "" if ranks is None else f", {calibration.shape[0]} in process {ranks.rank} of {ranks.world}",
             estimate / 2**20, ", sequential" if opts.sequential else "",
             ", activations on disk" if on_disk else "")
    # each block frees activations and statistics of the same large sizes again and again:
    # without this, glibc keeps their holes resident (see return_freed_memory)
    return_freed_memory()

    # Model-level statistics first, from the untouched model.
    model_values = collect_model_statistics(model, active, [s.name for s in model_stats], whole,
                                            opts.batch_size, ranks) if model_stats else {}
    batches = capture_block_inputs(model, blocks, calibration, opts.batch_size)
    if wide is not None:
        log.info("blocks stored in %s compute in %s, one at a time", str(stored).removeprefix("torch."),
                 str(wide).removeprefix("torch."))
        cast_batches_(batches, wide)
    scanned = _scan(blocks, batches, per_block, alloc_stats, progress, ranks, wide) if alloc_stats else None
    budgets = allocate(
        active, config.target_sparsity, alloc, overrides=config.overrides, max_sparsity=config.max_sparsity,
        stats=scanned, groups=[[t.name for t in ts] for ts in per_block],
    )
    del scanned
    masks, info, quants = {}, {}, {}
    spill = Path(tempfile.mkdtemp(prefix="sparsecraft-originals-"))
    touched: list[int] = []
    try:
        store = stream.store(batches) if stream is not None else DiskActivations(batches, spill) if on_disk else None
        first = stream.first if stream is not None else 0
        for st in block_stages:
            st.start(len(blocks))
        for i, (block, targets_i) in enumerate(
            tqdm(list(zip(blocks, per_block)), desc=f"{config.method} blocks", disable=not progress)
        ):
            if i < first:
                continue
            if stream is not None:
                stream.load(i, block, targets_i)
            # a copy of the dense weights: to restore them, to measure the error, for block stages
            keep_originals = stream is None or opts.measure_error or bool(block_stages)
            originals = {t.name: t.param.detach().cpu().clone() for t in targets_i} if keep_originals else {}
            if stream is None:  # the original weights go to disk before the block changes (restored on failure)
                torch.save(originals, spill / f"{i}.pt")
                touched.append(i)
            solve = functools.partial(_solve_layers, solver=solver, refiners=refiners, model_values=model_values,
                                      layer_pattern=layer_pattern, budgets=budgets, originals=originals,
                                      stored={t.name: t.param.dtype for t in targets_i}, opts=opts,
                                      method=config.method, masks=masks, info=info, quants=quants)
            with _widened(block, wide) as widened:
                _prune_block(block, i, targets_i, batches, store, solve, layer_stats, block_stages, layer_pattern,
                             originals, masks, info, quants, opts, ranks, progress, widened)
            if stream is not None:  # the block's masks leave with its weights
                stream.done(i, block, {t.name: masks.pop(t.name) for t in targets_i if t.name in masks},
                            {t.name: info[t.name] for t in targets_i if t.name in info})
            originals.clear()  # this block's copies go before the next block's weights arrive
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
    return masks, info, quants


def _prune_block(block, index, targets, batches, store, solve, layer_stats, block_stages, layer_pattern, originals,
                 masks, info, quants, opts, ranks, progress, widened) -> None:
    """Statistics, solve and block stages for one block, then its outputs become the batches'
    hidden states (or go to ``store``); ``widened`` is the block's :class:`ComputeIn` or None."""
    outs: list[torch.Tensor] | None = None
    # targets_out: the dense block's outputs on this block's inputs, what block stages
    # reconstruct; the two-pass variant's statistics pass computes them anyway
    if opts.sequential:  # one pass: statistics, pruning and the pruned outputs
        targets_out = run_block(block, batches) if block_stages else None
        outs = _Lockstep(targets, layer_stats, lambda t, stats_of: solve([t], stats_of), ranks).run(block, batches)
    else:
        collector = _Collector(targets, layer_stats, ranks)
        try:  # the dense outputs are kept only for block stages
            targets_out = run_block(block, batches, keep=bool(block_stages),
                                    after=store.release if store is not None else None) or None
        finally:
            collector.remove()
        solve(targets, collector.layer_stats)
        del collector
    if block_stages:
        _run_block_stages(block, index, targets, batches, targets_out, block_stages, layer_pattern,
                          originals, masks, info, quants, progress)
        del targets_out
        outs = None  # the weights changed
        if widened is not None:  # the tuned weights as they will be kept
            widened.round_()
    if store is not None:  # the outputs go to the other memory-mapped file
        store.run(block, batches) if outs is None else store.adopt(batches, outs)
    elif outs is None:  # each batch's input gives way to its output as soon as it is computed
        advance_(block, batches)
    else:
        for b, out in zip(batches, outs):
            b.hidden = out


def _solve_layers(targets, stats_of, *, solver, refiners, model_values, layer_pattern, budgets, originals, stored,
                  opts, method, masks, info, quants) -> None:
    """Solve each layer from its statistics (``stats_of(name)``) and write the result back,
    rounded to the dtype the layer is stored in (``stored`` by name: a widened block keeps
    computing with the values that will be kept). Each result is written as soon as it is
    solved, so one layer's new weights are alive at a time, not the block's; a failure
    part-way is undone by the caller (from its copy of the originals, or the shards)."""
    for t in targets:
        stats = stats_of(t.name)
        extra = model_values.get(t.name, {})
        stats.update(extra)
        ctx = LayerContext(t.name, t.module, t.param, stats, grad=extra.get("gradients"))
        p = layer_pattern[t.name]
        result = prune_layer(solver, refiners, ctx, p, None if p.fixed_sparsity is not None else budgets[t.name])
        with torch.no_grad():
            if result.weight is not None:
                t.param.copy_(result.weight.to(stored[t.name]))
            t.param.masked_fill_(~result.keep, 0.0)  # +0.0, see masks.py
            masks[t.name] = result.keep
            if result.quant is not None:
                quants[t.name] = result.quant
            info[t.name] = {"pattern": str(p), "method": method, **result.info}
            if opts.measure_error:  # ||WX - W'X|| / ||WX|| on this block's calibration inputs
                info[t.name]["reconstruction_error"] = float(relative_reconstruction_error(
                    originals[t.name].to(t.param), t.param.detach(), hessian=stats["hessian"]))
        del result, stats, ctx


def _run_block_stages(block, index, targets, batches, outputs, stages, layer_pattern, originals, masks, info,
                      quants, progress) -> None:
    """Run the block stages on a pruned block; masks, info and quantised weights follow what
    they changed."""
    inner = {id(p): n for n, p in block.named_parameters()}
    layers = {inner[id(t.param)]: BlockLayer(masks[t.name], layer_pattern[t.name], originals[t.name].to(t.param),
                                             quants.get(t.name))
              for t in targets}
    for st in stages:
        summary = st.run(block, batches, outputs, layers, progress=progress)
        log.info("block %d %s: %s", index, st.name, ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
        for t in targets:
            info[t.name][st.name] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    with torch.no_grad():
        for t in targets:
            layer = layers[inner[id(t.param)]]
            t.param.masked_fill_(~layer.keep, 0.0)
            masks[t.name] = layer.keep
            if layer.quant is not None:
                quants[t.name] = layer.quant
