"""Block reconstruction with the mask fixed: tune a pruned block so its output matches a target.

After a block's layers are pruned, its kept weights (and optionally the norms' scales and the
biases) are trained by Adam so that the block's output on calibration inputs matches given
targets: the dense block's output on the same inputs, or the dense model's hidden states.
The masks never change: gradients of pruned weights are zeroed and the zeros are written
again after every step, so the pruned entries stay exactly zero.

Some calibration batches are held out. Their loss is measured before tuning and after every
epoch; the weights of the best epoch are kept (the untouched weights when no epoch beat
them), and tuning stops after ``patience`` epochs without improvement or when the time budget
is spent. So the held-out loss after tuning is never above the loss before it.

The loss is the mean squared error normalised by the target's mean square, per batch.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blocks import block_hidden
from ..criteria import BlockStage, register_block_stage
from ..errors import ConfigError
from ..quant.tuning import grid_parameters

__all__ = ["tune_block_", "TUNABLE", "Reconstruct"]

log = logging.getLogger(__name__)

#: what may be tuned besides the pruned weights
TUNABLE = ("weights", "weights+norms", "weights+norms+biases")


def _plain(value: Any) -> Any:
    """A copy usable by autograd: tensors captured under inference mode cannot be."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _split(value: Any, start: int, stop: int, rows: int) -> Any:
    """``value`` cut to the batch rows ``start:stop``: tensors of 2 or more dimensions whose first
    size is the batch's ``rows``; everything else (shared positions, 1-D cache positions) as is."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() >= 2 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_split(v, start, stop, rows) for v in value)
    if isinstance(value, dict):
        return {k: _split(v, start, stop, rows) for k, v in value.items()}
    return value


def _micro_batches(batches: list, targets: list[torch.Tensor], size: int) -> tuple[list, list[torch.Tensor]]:
    """Each calibration batch cut into pieces of ``size`` samples (one optimizer step each)."""
    out_b, out_t = [], []
    for b, t in zip(batches, targets):
        rows = b.hidden.shape[0]
        for start in range(0, rows, size):
            stop = min(rows, start + size)
            out_b.append(type(b)(b.hidden[start:stop], _split(b.args, start, stop, rows),
                                 _split(b.kwargs, start, stop, rows)))
            out_t.append(t[start:stop])
    return out_b, out_t


def _forward(block: nn.Module, batch) -> torch.Tensor:
    out = block(batch.hidden, *batch.args, **batch.kwargs)
    return block_hidden(out)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(out.dtype)
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _trainable(block: nn.Module, masks: dict[str, torch.Tensor], tune: str) -> dict[str, nn.Parameter]:
    params = dict(block.named_parameters())
    chosen = {name: params[name] for name in masks}
    if tune != "weights":
        for mod_name, module in block.named_modules():
            is_norm = "norm" in type(module).__name__.lower()
            for p_name, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if full in chosen:
                    continue
                if (is_norm and "norms" in tune) or (p_name == "bias" and "biases" in tune):
                    chosen[full] = p
    return chosen


def tune_block_(
    block: nn.Module,
    batches: list,
    targets: list[torch.Tensor],
    masks: dict[str, torch.Tensor],
    *,
    lr: float = 1e-3,
    epochs: int = 3,
    holdout: int = 1,
    patience: int = 1,
    tune: str = "weights",
    time_budget: float | None = None,
    micro_batch: int | None = 4,
    progress: bool = False,
    desc: str = "reconstruct",
) -> dict:
    """Tune ``block`` in place so that ``block(batches[i]) ~ targets[i]``; returns a summary.

    Args:
        block: the pruned block (its pruned weights already zero).
        batches: calibration inputs at the block, objects with ``hidden``, ``args`` and
            ``kwargs`` (:class:`~sparsecraft.blocks.BlockBatch`).
        targets: the output to match for each batch (same shapes as the block's output).
        masks: parameter name inside ``block`` -> boolean keep-mask; these weights are tuned
            and their zeros kept.
        lr, epochs: Adam's learning rate and the most passes over the training batches.
        holdout: how many of the last batches judge the epochs instead of training.
        patience: epochs without a better held-out loss before stopping.
        tune: ``"weights"``, ``"weights+norms"`` or ``"weights+norms+biases"``.
        time_budget: seconds; stops after the step that passes it (None: no limit).
        micro_batch: samples per optimizer step: the training batches are cut into pieces
            of this size (None: one step per calibration batch). Small steps make more
            steps from the same forward and backward work, which matters at a small lr.

    Returns:
        ``{"val_before", "val_best", "best_epoch", "epochs_run", "steps", "train_first",
        "train_last", "seconds", "stopped"}``; ``best_epoch`` 0 means the untouched weights
        were kept.
    """
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"reconstruction lr must be a positive number, got {lr!r}")
    for name, value, low in (("epochs", epochs, 1), ("holdout", holdout, 1), ("patience", patience, 1),
                             ("micro_batch", 1 if micro_batch is None else micro_batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"reconstruction {name} must be an integer >= {low}, got {value!r}")
    if tune not in TUNABLE:
        raise ConfigError(f"reconstruction tune must be one of {', '.join(TUNABLE)}, got {tune!r}")
    if time_budget is not None and not (time_budget > 0 and math.isfinite(time_budget)):
        raise ConfigError(f"reconstruction time budget must be > 0 seconds, got {time_budget!r}")
    if len(batches) != len(targets):
        raise ConfigError(f"{len(batches)} calibration batches but {len(targets)} targets")
    if len(batches) <= holdout:
        raise ConfigError(
            f"block reconstruction holds out {holdout} calibration batch(es) for early stopping "
            f"and needs at least one more to train on; got {len(batches)} batch(es): use more "
            f"calibration samples or a smaller batch size"
        )
    params = dict(block.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ConfigError(f"masks name parameters the block does not have: {unknown[:3]}")

    start = time.perf_counter()
    trainable = _trainable(block, masks, tune)
    keep = {n: masks[n].to(device=params[n].device, dtype=torch.bool) for n in masks}
    frozen = {n: p.requires_grad for n, p in params.items()}
    train_b, val_b = batches[:-holdout], batches[-holdout:]
    train_t, val_t = targets[:-holdout], targets[-holdout:]
    train_b = [type(b)(_plain(b.hidden), _plain(b.args), _plain(b.kwargs)) for b in train_b]
    if micro_batch is not None:
        train_b, train_t = _micro_batches(train_b, train_t, micro_batch)

    def val_loss() -> float:
        with torch.no_grad():
            return sum(float(_loss(_forward(block, b), t)) for b, t in zip(val_b, val_t)) / len(val_b)

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainable.items()}

    summary = {"val_before": val_loss(), "best_epoch": 0, "epochs_run": 0, "steps": 0, "stopped": "epochs"}
    best_loss, best_state = summary["val_before"], snapshot()
    train_losses: list[float] = []
    was_training = block.training
    try:
        for n, p in params.items():
            p.requires_grad_(n in trainable)
        block.train(False)  # no dropout: the target is a deterministic function
        opt = torch.optim.Adam(list(trainable.values()), lr=lr)
        stale = 0
        bar = tqdm(total=epochs * len(train_b), desc=desc, disable=not progress, leave=False)
        for epoch in range(1, epochs + 1):
            for b, t in zip(train_b, train_t):
                opt.zero_grad(set_to_none=True)
                loss = _loss(_forward(block, b), t)
                loss.backward()
                with torch.no_grad():
                    for n, k in keep.items():
                        if params[n].grad is not None:
                            params[n].grad.mul_(k)
                opt.step()
                with torch.no_grad():
                    for n, k in keep.items():
                        params[n].masked_fill_(~k, 0.0)
                train_losses.append(float(loss.detach()))
                summary["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{train_losses[-1]:.4g}", best=f"{best_loss:.4g}")
                if time_budget is not None and time.perf_counter() - start > time_budget:
                    summary["stopped"] = "time budget"
                    break
            summary["epochs_run"] = epoch
            current = val_loss()
            if current < best_loss:
                best_loss, best_state, stale = current, snapshot(), 0
                summary["best_epoch"] = epoch
            else:
                stale += 1
            if summary["stopped"] == "time budget":
                break
            if stale >= patience:
                summary["stopped"] = "early stop"
                break
        bar.close()
    finally:
        with torch.no_grad():  # the best epoch's weights (or the untouched ones)
            for n, value in best_state.items():
                trainable[n].copy_(value)
        for n, p in params.items():
            p.requires_grad_(frozen[n])
        block.train(was_training)
    summary.update(
        val_best=best_loss, seconds=time.perf_counter() - start,
        train_first=train_losses[0] if train_losses else None,
        train_last=train_losses[-1] if train_losses else None,
    )
    log.debug("%s: held-out loss %.4g -> %.4g (epoch %d of %d, %s)", desc, summary["val_before"],
              best_loss, summary["best_epoch"], summary["epochs_run"], summary["stopped"])
    return summary


@register_block_stage
class Reconstruct(BlockStage):
    """The ``reconstruct`` stage: :func:`tune_block_` on every pruned block, masks fixed.
    Quantised layers (a quantising method) keep their codes too: their grids are tuned
    (:func:`sparsecraft.quant.tuning.grid_parameters`), so they stay quantised.

    Switched on with ``options={"reconstruct": True}`` (or a mapping of these options); the
    targets are the dense block's outputs on the inputs the already-pruned earlier blocks
    produce, so each block also absorbs some of the error its inputs carry.
    """

    name = "reconstruct"
    order = 10  # after stages that change masks
    quantized = True  # quantised layers: their grids are tuned, codes and masks fixed
    # for total_time_budget: blocks still to tune and seconds spent so far (start() resets them)
    _blocks_left: int = 1
    _spent: float = 0.0

    @dataclass(frozen=True)
    class Options:
        # from a sweep on SmolLM2's first blocks (SparseGPT 2:4, 64 x 512 calibration): at equal
        # compute, more and smaller steps at 1e-3 lowered the held-out loss more than 1e-4 did;
        # 3e-3 overshot on some blocks (early stopping then kept the untouched weights)
        lr: float = 1e-3
        epochs: int = 3
        holdout: int = 1  # calibration batches kept for early stopping
        patience: int = 1
        tune: str = "weights"  # weights | weights+norms | weights+norms+biases
        time_budget: float | None = None  # seconds per block
        # seconds for all blocks together: each block gets what is left over the blocks left
        total_time_budget: float | None = None
        micro_batch: int | None = 4  # samples per optimizer step (None: a whole calibration batch)
        # which pruned layers of the block are tuned: glob patterns on their names inside the
        # block (e.g. "mlp.*"); None: all of them
        layers: tuple[str, ...] | None = None

        def check(self):
            # the same rules tune_block_ applies, checked before the model changes
            if not (self.lr > 0 and math.isfinite(self.lr)):
                raise ConfigError(f"reconstruct: lr must be a positive number, got {self.lr}")
            for name in ("epochs", "holdout", "patience"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"reconstruct: {name} must be >= 1, got {getattr(self, name)}")
            if self.tune not in TUNABLE:
                raise ConfigError(f"reconstruct: tune must be one of {', '.join(TUNABLE)}, got {self.tune!r}")
            if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
                raise ConfigError(f"reconstruct: time_budget must be > 0 seconds, got {self.time_budget}")
            if self.micro_batch is not None and self.micro_batch < 1:
                raise ConfigError(f"reconstruct: micro_batch must be >= 1, got {self.micro_batch}")
            total = self.total_time_budget
            if total is not None and not (total > 0 and math.isfinite(total)):
                raise ConfigError(f"reconstruct: total_time_budget must be > 0 seconds, got {total}")
            if self.layers is not None and (isinstance(self.layers, str) or not self.layers
                                            or not all(isinstance(r, str) for r in self.layers)):
                raise ConfigError(f"reconstruct: layers must be a non-empty list of glob patterns, got {self.layers!r}")

    def holdout(self) -> int:
        return self.options.holdout

    def start(self, blocks: int) -> None:
        self._blocks_left, self._spent = blocks, 0.0

    def _budget(self) -> float | None:
        """This block's seconds: the per-block budget, or a fair share of what is left."""
        o = self.options
        budgets = [o.time_budget] if o.time_budget is not None else []
        if o.total_time_budget is not None:
            budgets.append(max(1e-3, (o.total_time_budget - self._spent) / max(1, self._blocks_left)))
        return min(budgets) if budgets else None

    def run(self, block, batches, targets, layers, *, progress=False):
        o = self.options
        masks = {name: layer.keep for name, layer in layers.items()
                 if o.layers is None or any(fnmatch.fnmatchcase(name, rule) for rule in o.layers)}
        if not masks:
            raise ConfigError(f"reconstruct: layers {list(o.layers or [])} match none of the block's pruned "
                              f"layers ({', '.join(sorted(layers))})")
        quantised = {name: layers[name] for name in masks if layers[name].quant is not None}
        with grid_parameters(block, quantised) as grids:
            masks = {name: keep for name, keep in masks.items() if name not in quantised} | grids
            summary = tune_block_(block, batches, targets, masks, lr=o.lr, epochs=o.epochs, holdout=o.holdout,
                                  patience=o.patience, tune=o.tune, time_budget=self._budget(),
                                  micro_batch=o.micro_batch, progress=progress)
        self._spent += summary["seconds"]
        self._blocks_left = max(1, self._blocks_left - 1)
        return summary
