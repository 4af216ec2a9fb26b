"""Learned N:M masks, by one of two learners: straight-through magnitudes (``method="ste"``,
the default) or, per group of M weights, a learned distribution over the N:M choices
(``method="gumbel"``).

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

``method="ste"`` learns the masks straight through instead (as SR-STE does): the weights
train with the block's loss as if every position were kept, and each step's mask is the N
largest magnitudes of every group. Pruned positions start at zero, so the first mask is the
prior's, and a pruned weight joins its group only once its gradient has grown it past the
smallest kept one; ``decay`` shrinks the pruned weights a little every step (SR-STE's
refinement), so choices do not flip back and forth. It costs what a reconstruction step costs,
and with no swap it is reconstruction itself. The same judging on held-out batches applies.
It is the default because it measured better: at equal seconds per block, straight-through
learning then reconstruction ended between 0.98x and 1.01x reconstruction alone's error,
Gumbel-softmax between 1.01x and 1.08x (``benchmarks/results/learned_masks.md``).
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


class _Learner:
    """One way of learning masks: what the block runs with at each step, the optimizer step,
    and the hardened masks with the weights they hand on."""

    opt: torch.optim.Optimizer
    shown: dict[str, str] = {}

    def masked(self, done: float, spent: float | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self) -> None:
        self.opt.step()

    def harden(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError


class _Gumbel(_Learner):
    """Logits over every group's N:M choices, sampled by Gumbel-softmax (module docstring)."""

    def __init__(self, pattern, prior, solved, dense, *, tune_weights, lr, weight_lr, tau, tau_end, strength, seed):
        self.pattern, self.prior, self.solved, self.dense = pattern, prior, solved, dense
        self.tune_weights, self.tau, self.tau_end = tune_weights, tau, tau_end
        self.choices = nm_choices(pattern.n, pattern.m)
        self.soft_choices = self.choices.float()
        self.logits = {n: _prior_logits(prior[n], self.choices, strength).requires_grad_(True) for n in prior}
        if tune_weights:
            self.weights = {n: torch.where(prior[n], solved[n], dense[n]).requires_grad_(True) for n in prior}
        else:
            self.weights = dense
        groups = [{"params": list(self.logits.values()), "lr": lr}]
        if tune_weights:
            groups.append({"params": list(self.weights.values()), "lr": weight_lr})
        self.opt = torch.optim.Adam(groups)
        self.gen = torch.Generator().manual_seed(seed)

    def masked(self, done, spent):
        temp = temperature(self.tau, self.tau_end, done, spent)
        self.shown = {"tau": f"{temp:.3g}"}
        out = {}
        for n, lg in self.logits.items():
            u = torch.rand(lg.shape, generator=self.gen).clamp_(1e-10, 1 - 1e-10)
            probs = torch.softmax((lg - torch.log(-torch.log(u))) / temp, dim=1)
            out[n] = self.weights[n] * (probs @ self.soft_choices).reshape(self.weights[n].shape)
        return out

    def harden(self):
        hard = {n: _harden(lg.detach(), self.choices, self.prior[n].shape) for n, lg in self.logits.items()}
        if self.tune_weights:  # the trained weights
            return hard, {n: self.weights[n].detach() * hard[n] for n in hard}
        m = self.pattern.m
        out = {}  # the solver's weights in groups that keep their choice, the dense ones elsewhere
        for n, keep in hard.items():
            changed = (_group_view(keep, m) != _group_view(self.prior[n], m)).any(dim=1, keepdim=True)
            mixed = torch.where(changed, _group_view(self.dense[n], m), _group_view(self.solved[n], m))
            out[n] = mixed.reshape(keep.shape) * keep
        return hard, out


class _StraightThrough(_Learner):
    """Weights trained through the N largest magnitudes of every group (module docstring)."""

    def __init__(self, pattern, prior, solved, *, weight_lr, decay):
        self.pattern, self.prior, self.decay = pattern, prior, decay
        self.weights = {n: torch.where(prior[n], solved[n], 0.0).requires_grad_(True) for n in prior}
        self.opt = torch.optim.Adam(list(self.weights.values()), lr=weight_lr)
        self.keep: dict[str, torch.Tensor] = {}

    def _masks(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            # ties (a kept weight at zero, say) go to the prior's choice
            return {n: self.pattern.keep_mask(w.abs() + 1e-30 * self.prior[n]) for n, w in self.weights.items()}

    def masked(self, done, spent):
        self.keep = self._masks()
        # the value is the masked weight; the gradient reaches every position (straight through)
        return {n: w - (w * ~self.keep[n]).detach() for n, w in self.weights.items()}

    def step(self):
        self.opt.step()
        if self.decay:
            with torch.no_grad():
                for n, w in self.weights.items():
                    w[~self.keep[n]] *= 1.0 - self.decay

    def harden(self):
        hard = self._masks()
        return hard, {n: self.weights[n].detach() * hard[n] for n in hard}


LEARNERS = ("gumbel", "ste")


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
    method: str = "ste",
    decay: float = 0.0,
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
        method: ``"ste"`` (straight-through magnitudes, the default) or ``"gumbel"`` (a
            distribution per group; module docstring). ``"ste"`` trains the weights only (``lr``, ``tau``,
            ``tau_end``, ``strength``, ``seed`` and ``tune_weights`` do not apply).
        decay: ``"ste"``: the share of every pruned weight taken off after each step.

    Returns:
        ``(masks, weights, summary)``: hardened keep-masks, the weights to go with them (zero
        where pruned) and ``{"val_prior", "val_best", "best_epoch", "changed", "steps",
        "seconds", "stopped"}`` (``changed``: the share of groups whose choice differs from
        the prior; ``val_prior``: the held-out loss of the solver's masks and weights).
    """
    if not isinstance(pattern, NM):
        raise ConfigError(f"learned masks need an N:M pattern, got {pattern}")
    if method not in LEARNERS:
        raise ConfigError(f"learned masks: method must be one of {', '.join(LEARNERS)}, got {method!r}")
    if not (isinstance(decay, (int, float)) and 0 <= decay < 1):
        raise ConfigError(f"learned masks: decay must be in [0, 1), got {decay!r}")
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
    solved = {n: params[n].detach().clone() for n in prior}
    dense = {n: (dense or {}).get(n, params[n]).detach().to(solved[n].dtype).clone() for n in prior}
    if method == "gumbel":
        learner: _Learner = _Gumbel(pattern, prior, solved, dense, tune_weights=tune_weights, lr=lr,
                                    weight_lr=weight_lr, tau=tau, tau_end=tau_end, strength=strength, seed=seed)
    else:
        learner = _StraightThrough(pattern, prior, solved, weight_lr=weight_lr, decay=decay)
    train_b = [type(b)(_plain(b.hidden), _plain(b.args), _plain(b.kwargs)) for b in batches[:-holdout]]
    train_t, val_b, val_t = targets[:-holdout], batches[-holdout:], targets[-holdout:]
    if micro_batch is not None:
        train_b, train_t = _micro_batches(train_b, train_t, micro_batch)
    total = epochs * len(train_b)

    def run(batch, masked: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(block, masked, (batch.hidden, *batch.args), batch.kwargs)
        return block_hidden(out)

    def val_loss(candidate: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return sum(float(_loss(run(b, candidate), t)) for b, t in zip(val_b, val_t)) / len(val_b)

    best_masks = {n: prior[n].clone() for n in prior}
    best_weights = {n: solved[n] * prior[n] for n in prior}
    best = val_loss(best_weights)
    summary = {"val_prior": best, "best_epoch": 0, "steps": 0, "stopped": "epochs"}
    was_training = block.training
    block.train(False)
    bar = tqdm(total=total, desc="learn N:M masks", disable=not progress, leave=False)
    try:
        for epoch in range(1, epochs + 1):
            for b, t in zip(train_b, train_t):
                done = summary["steps"] / max(1, total - 1)
                spent = None if time_budget is None else (time.perf_counter() - start) / time_budget
                learner.opt.zero_grad(set_to_none=True)
                loss = _loss(run(b, learner.masked(done, spent)), t)
                loss.backward()
                learner.step()
                summary["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", **learner.shown)
                if time_budget is not None and time.perf_counter() - start > time_budget:
                    summary["stopped"] = "time budget"
                    break
            hard, candidate = learner.harden()
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
        # ste (straight-through magnitudes) | gumbel (a distribution per group). At equal seconds
        # per block (bench_learned_masks.py, SmolLM2 blocks 3 and 15, ADMM 2:4), ste then
        # reconstruction ended at 0.98-1.01x reconstruction alone; gumbel at 1.01-1.08x
        method: str = "ste"
        decay: float = 0.0  # ste: the share of every pruned weight taken off after each step

        def check(self):
            if self.method not in LEARNERS:
                raise ConfigError(f"learn_mask: method must be one of {', '.join(LEARNERS)}, got {self.method!r}")
            if not 0 <= self.decay < 1:
                raise ConfigError(f"learn_mask: decay must be in [0, 1), got {self.decay}")
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
            method=o.method, decay=o.decay, progress=progress)
        params = dict(block.named_parameters())
        with torch.no_grad():
            for name, layer in layers.items():
                params[name].copy_(weights[name].to(params[name].dtype))
                layer.keep = masks[name]
        return summary
