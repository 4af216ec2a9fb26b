"""Learned N:M masks: per group of M weights, a learned distribution over the N:M choices.

For every group of M consecutive weights along the reduction dimension there are
``C(M, N)`` valid keep-patterns (6 for 2:4). Each group holds logits over them, started so
that a prior mask (the solver's) is the most likely choice. A Gumbel-softmax sample of each
group's choice gives a soft mask; the block runs with ``W * soft_mask`` and Adam trains the
logits so that the block's output matches the targets (the dense block's output). The
temperature falls geometrically from ``tau`` to ``tau_end`` over the run (over the planned
steps, or over the time budget when that runs out first), so the samples harden.

Which ``W``: with ``tune_weights`` (the default) the weights train together with the logits,
starting from the solver's weights where the prior keeps and the dense ones where it prunes,
so a choice is judged with weights fitted to it. Without it ``W`` is frozen: the solver's
weights in groups whose choice stays, the dense ones in groups that change (a mask alone,
MaskLLM's setting).

After every epoch the masks are hardened (each group takes its most likely choice) and judged
on held-out batches with the weights they would hand on: the prior is the first candidate,
with the solver's weights, so the held-out loss of the result is never above the solver's
own. Every returned group is a valid N:M choice by construction.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..blocks import block_hidden
from ..criteria import BlockStage, register_block_stage
from ..errors import ConfigError
from ..patterns import NM, reduction_view
from .block_tuning import _loss, _micro_batches, _plain

__all__ = ["learn_nm_masks", "nm_choices", "LearnMask"]

log = logging.getLogger(__name__)


def nm_choices(n: int, m: int) -> torch.Tensor:
    """All keep-patterns of one group, ``[C(m, n), m]`` booleans, in lexicographic order."""
    return NM(n, m).choices()


def _group_view(t: torch.Tensor, m: int) -> torch.Tensor:
    return reduction_view(t).reshape(-1, m)


def _prior_logits(prior: torch.Tensor, choices: torch.Tensor, strength: float) -> torch.Tensor:
    """Logits ``strength * overlap / N``: the prior's own choice scores ``strength``."""
    groups = _group_view(prior, choices.shape[1]).float()
    overlap = groups @ choices.float().T  # kept positions shared with each choice
    return strength * overlap / choices[0].sum()


def temperature(tau: float, tau_end: float, step_fraction: float, time_fraction: float | None = None) -> float:
    """The Gumbel-softmax temperature after ``step_fraction`` of the planned steps, or of the
    time budget when that is further along: a run cut short by its budget still anneals to
    ``tau_end`` (and hardens what it learned) by the end of its time."""
    done = step_fraction if time_fraction is None else max(step_fraction, time_fraction)
    return tau * (tau_end / tau) ** min(1.0, max(0.0, done))


def _harden(logits: torch.Tensor, choices: torch.Tensor, shape) -> torch.Tensor:
    return choices[logits.argmax(dim=1)].reshape(shape)


def learn_nm_masks(
    block: nn.Module,
    batches: list,
    targets: list[torch.Tensor],
    prior: dict[str, torch.Tensor],
    pattern: NM,
    *,
    dense: dict[str, torch.Tensor] | None = None,
    tune_weights: bool = True,
    weight_lr: float = 1e-3,
    lr: float = 0.5,
    epochs: int = 2,
    holdout: int = 1,
    tau: float = 2.0,
    tau_end: float = 0.05,
    strength: float = 3.0,
    time_budget: float | None = None,
    seed: int = 0,
    micro_batch: int | None = 4,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Learn N:M keep-masks for the parameters named in ``prior`` (module docstring).

    Args:
        block: the block, holding the solver's weights (zero where the prior prunes); its
            parameters are not changed.
        batches, targets: calibration inputs at the block and the outputs to match.
        prior: parameter name -> a valid N:M keep-mask to start from.
        pattern: the N:M pattern.
        dense: parameter name -> the dense weights (default: the block's current ones).
        tune_weights: train the weights with the logits (module docstring).
        weight_lr: Adam's learning rate for the weights.
        lr, epochs, holdout: Adam on the logits, passes over the training batches, batches
            kept for judging.
        tau, tau_end: Gumbel-softmax temperature at the start and the end.
        strength: the prior's logit lead.
        time_budget: seconds (None: no limit).
        seed: Gumbel noise seed.
        micro_batch: samples per optimizer step (None: a whole calibration batch).

    Returns:
        ``(masks, weights, summary)``: hardened keep-masks, the weights to go with them (zero
        where pruned) and ``{"val_prior", "val_best", "best_epoch", "changed", "steps",
        "seconds", "stopped"}`` (``changed``: the share of groups whose choice differs from
        the prior; ``val_prior``: the held-out loss of the solver's masks and weights).
    """
    if not isinstance(pattern, NM):
        raise ConfigError(f"learned masks need an N:M pattern, got {pattern}")
    for name, value in (("lr", lr), ("weight_lr", weight_lr), ("tau", tau), ("tau_end", tau_end),
                        ("strength", strength)):
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ConfigError(f"learned masks: {name} must be a positive number, got {value!r}")
    for name, value in (("epochs", epochs), ("holdout", holdout), ("micro_batch", 1 if micro_batch is None else micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"learned masks: {name} must be an integer >= 1, got {value!r}")
    if time_budget is not None and not (time_budget > 0 and math.isfinite(time_budget)):
        raise ConfigError(f"learned masks: time budget must be > 0 seconds, got {time_budget!r}")
    if len(batches) != len(targets) or len(batches) <= holdout:
        raise ConfigError(
            f"learned masks hold out {holdout} calibration batch(es) and need at least one more "
            f"to train on (got {len(batches)} batches, {len(targets)} targets)"
        )
    params = dict(block.named_parameters())
    for name, keep in prior.items():
        if name not in params:
            raise ConfigError(f"learned masks: the block has no parameter '{name}'")
        if tuple(keep.shape) != tuple(params[name].shape) or not pattern.is_valid(keep):
            raise ConfigError(f"learned masks: the prior of '{name}' is not a valid {pattern} mask of its shape")

    start = time.perf_counter()
    choices = nm_choices(pattern.n, pattern.m)
    solved = {n: params[n].detach().clone() for n in prior}
    dense = {n: (dense or {}).get(n, params[n]).detach().to(solved[n].dtype).clone() for n in prior}
    logits = {n: _prior_logits(prior[n], choices, strength).requires_grad_(True) for n in prior}
    if tune_weights:
        weights = {n: torch.where(prior[n], solved[n], dense[n]).requires_grad_(True) for n in prior}
    else:
        weights = dense
    soft_choices = choices.float()
    train_b = [type(b)(_plain(b.hidden), _plain(b.args), _plain(b.kwargs)) for b in batches[:-holdout]]
    train_t, val_b, val_t = targets[:-holdout], batches[-holdout:], targets[-holdout:]
    if micro_batch is not None:
        train_b, train_t = _micro_batches(train_b, train_t, micro_batch)
    gen = torch.Generator().manual_seed(seed)
    total = epochs * len(train_b)

    def run(batch, masked: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(block, masked, (batch.hidden, *batch.args), batch.kwargs)
        return block_hidden(out)

    def handed_on(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights a candidate hands on: trained ones, or the solver's in unchanged groups."""
        if tune_weights:
            return {n: weights[n].detach() * masks[n] for n in masks}
        out = {}
        for n, keep in masks.items():
            changed = (_group_view(keep, pattern.m) != _group_view(prior[n], pattern.m)).any(dim=1, keepdim=True)
            mixed = torch.where(changed, _group_view(dense[n], pattern.m), _group_view(solved[n], pattern.m))
            out[n] = mixed.reshape(keep.shape) * keep
        return out

    def val_loss(candidate: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return sum(float(_loss(run(b, candidate), t)) for b, t in zip(val_b, val_t)) / len(val_b)

    best_masks = {n: prior[n].clone() for n in prior}
    best_weights = {n: solved[n] * prior[n] for n in prior}
    best = val_loss(best_weights)
    summary = {"val_prior": best, "best_epoch": 0, "steps": 0, "stopped": "epochs"}
    groups = [{"params": list(logits.values()), "lr": lr}]
    if tune_weights:
        groups.append({"params": list(weights.values()), "lr": weight_lr})
    opt = torch.optim.Adam(groups)
    was_training = block.training
    block.train(False)
    bar = tqdm(total=total, desc="learn N:M masks", disable=not progress, leave=False)
    try:
        for epoch in range(1, epochs + 1):
            for b, t in zip(train_b, train_t):
                temp = temperature(tau, tau_end, summary["steps"] / max(1, total - 1),
                                   None if time_budget is None else (time.perf_counter() - start) / time_budget)
                masked = {}
                for n, lg in logits.items():
                    u = torch.rand(lg.shape, generator=gen).clamp_(1e-10, 1 - 1e-10)
                    probs = torch.softmax((lg - torch.log(-torch.log(u))) / temp, dim=1)
                    masked[n] = weights[n] * (probs @ soft_choices).reshape(weights[n].shape)
                opt.zero_grad(set_to_none=True)
                loss = _loss(run(b, masked), t)
                loss.backward()
                opt.step()
                summary["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", tau=f"{temp:.3g}")
                if time_budget is not None and time.perf_counter() - start > time_budget:
                    summary["stopped"] = "time budget"
                    break
            hard = {n: _harden(lg.detach(), choices, prior[n].shape) for n, lg in logits.items()}
            candidate = handed_on(hard)
            current = val_loss(candidate)
            if current < best:
                best, best_masks, best_weights, summary["best_epoch"] = current, hard, candidate, epoch
            if summary["stopped"] == "time budget":
                break
    finally:
        bar.close()
        block.train(was_training)
    count = sum(k.numel() // pattern.m for k in prior.values())
    changed = sum(int((_group_view(best_masks[n], pattern.m) != _group_view(prior[n], pattern.m)).any(dim=1).sum())
                  for n in prior)
    summary.update(val_best=best, changed=changed / max(1, count), seconds=time.perf_counter() - start)
    log.debug("learned %s masks: held-out loss %.4g -> %.4g, %.1f%% of groups changed", pattern,
              summary["val_prior"], best, 100 * summary["changed"])
    return best_masks, {n: w.clone() for n, w in best_weights.items()}, summary


@register_block_stage
class LearnMask(BlockStage):
    """The ``learn_mask`` stage: learned N:M masks from the solver's masks and weights (see
    :func:`learn_nm_masks`); ``reconstruct`` (required with it) then tunes the kept weights."""

    name = "learn_mask"
    order = 0
    patterns = (NM,)

    @dataclass(frozen=True)
    class Options:
        tune_weights: bool = True  # train the weights with the logits (False: the mask alone)
        weight_lr: float = 1e-3  # the reconstruction stage's default
        lr: float = 0.5
        epochs: int = 2
        holdout: int = 1
        tau: float = 2.0
        tau_end: float = 0.05
        strength: float = 3.0
        time_budget: float | None = None  # seconds per block
        seed: int = 0
        micro_batch: int | None = 4  # samples per optimizer step (None: a whole calibration batch)

        def check(self):
            for name in ("lr", "weight_lr", "tau", "tau_end", "strength"):
                value = getattr(self, name)
                if not (value > 0 and math.isfinite(value)):
                    raise ConfigError(f"learn_mask: {name} must be a positive number, got {value}")
            for name in ("epochs", "holdout", "micro_batch"):
                value = getattr(self, name)
                if value is not None and value < 1:
                    raise ConfigError(f"learn_mask: {name} must be >= 1, got {getattr(self, name)}")
            if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
                raise ConfigError(f"learn_mask: time_budget must be > 0 seconds, got {self.time_budget}")

    def holdout(self) -> int:
        return self.options.holdout

    def check(self, stages):
        if not any(st.name == "reconstruct" for st in stages):
            raise ConfigError("learn_mask changes masks and needs reconstruct to fit the kept weights to them: "
                              "switch on reconstruct as well")

    def run(self, block, batches, targets, layers, *, progress=False):
        o = self.options
        pattern = next(iter(layers.values())).pattern
        prior = {name: layer.keep for name, layer in layers.items()}
        dense = {name: layer.dense for name, layer in layers.items()}
        masks, weights, summary = learn_nm_masks(
            block, batches, targets, prior, pattern, dense=dense, tune_weights=o.tune_weights,
            weight_lr=o.weight_lr, lr=o.lr, epochs=o.epochs, holdout=o.holdout, tau=o.tau, tau_end=o.tau_end,
            strength=o.strength, time_budget=o.time_budget, seed=o.seed, micro_batch=o.micro_batch,
            progress=progress)
        params = dict(block.named_parameters())
        with torch.no_grad():
            for name, layer in layers.items():
                params[name].copy_(weights[name].to(params[name].dtype))
                layer.keep = masks[name]
        return summary
