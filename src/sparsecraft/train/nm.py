"""N:M training: SR-STE and decaying gradient flow.

The dense weight stays the trained parameter; the layer computes with an effective weight
derived from it through a parametrization, with an N:M mask recomputed from |w| after every
optimizer step (so pruned weights can come back, which is the point of these recipes).

* :class:`SRSTE` (Zhou et al., 2021): the forward pass uses ``w * mask``; the backward pass
  sends the gradient straight through to every dense weight and adds the sparse-refined
  term ``lambda_w * (~mask) * w``, which pulls the pruned weights toward zero so the mask
  settles. ``lambda_w = 0`` is plain STE.
* :class:`DecayingNM` (progressive gradient flow, Bambhaniya et al., 2024): the forward
  pass uses ``w * (mask + beta * ~mask)``; the pruned elements' share of the output, and so
  of the gradient, is ``beta``, which decays to 0 on a :class:`DecaySchedule`. The pattern
  may tighten over stages (e.g. 4:8 -> 2:8 -> 1:8), which is what keeps high N:M sparsity
  (75% and above) trainable.

``finalize_()`` removes the parametrizations and leaves the hard N:M weights, recorded in
the model's sparsity metadata like a one-shot prune.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, SparsecraftError
from ..masks import SparsityState
from ..patterns import NM, parse_pattern
from ..targets import TargetSpec
from .base import TrainingSparsity, distributed_world
from .registry import Plan, option_choice, option_number, option_steps, quote_hint, recipe_method
from .schedules import DecaySchedule

__all__ = ["NMTraining", "SRSTE", "DecayingNM", "sr_ste"]

log = logging.getLogger(__name__)


class _SparseRefinedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, keep, lam):
        ctx.save_for_backward(weight, keep)
        ctx.lam = lam
        return weight.masked_fill(~keep, 0.0)

    @staticmethod
    def backward(ctx, grad):
        weight, keep = ctx.saved_tensors
        if ctx.lam:
            grad = grad + ctx.lam * weight.masked_fill(keep, 0.0)
        return grad, None, None


def sr_ste(weight: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """``weight * keep`` forward; gradient ``g + lam * (~keep) * weight`` backward."""
    return _SparseRefinedSTE.apply(weight, keep, float(lam))


def decayed(weight: torch.Tensor, keep: torch.Tensor, beta: float) -> torch.Tensor:
    """``weight`` where kept, ``beta * weight`` where pruned (plain autograd)."""
    if beta == 0.0:
        return weight.masked_fill(~keep, 0.0)
    return torch.where(keep, weight, weight * beta)


class _EffectiveWeight(nn.Module):
    """Parametrization: the weight a layer computes with, given its owner's current mask."""

    def __init__(self, owner: "NMTraining", name: str):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule, not in state dicts
        self.target_name = name

    def forward(self, weight):
        return self._owner._effective(self.target_name, weight)


def _parse_nm(pattern) -> NM:
    p = parse_pattern(pattern)
    if not isinstance(p, NM):
        raise ConfigError(f"N:M training needs an N:M pattern like 2:4, got '{p}'")
    return p


class NMTraining(TrainingSparsity):
    """Base: N:M masks recomputed from dense weights after every step."""

    method = ""

    def __init__(self, model, pattern, optimizer=None, *, targets: TargetSpec | dict | None = None):
        super().__init__(model, optimizer, targets=targets)
        self.pattern = _parse_nm(pattern)
        for t in self.targets:
            self.pattern.check(t.shape, t.name)
            if t.param_name != "weight" or parametrize.is_parametrized(t.module, "weight"):
                raise ConfigError(f"layer '{t.name}': N:M training needs a plain, unparametrized weight")

    def _begin(self) -> None:
        """Validated; now compute masks and install the parametrizations."""
        self.keep: dict[str, torch.Tensor] = {}
        self._dense: dict[str, nn.Parameter] = {t.name: t.param for t in self.targets}
        self._recompute_masks()
        for t in self.targets:
            parametrize.register_parametrization(t.module, "weight", _EffectiveWeight(self, t.name))
        self.optimizers = list(self._pending_optimizers)
        self._pending_optimizers = []
        self._open = True

    # subclasses: which pattern is active at a step, and the effective weight
    def pattern_at(self, step: int) -> NM:
        return self.pattern

    def _effective(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _recompute_masks(self) -> None:
        pattern = self.pattern_at(self.step_count)
        masks = {name: pattern.keep_mask(w.detach().abs().float(), layer=name) for name, w in self._dense.items()}
        if distributed_world() > 1:
            masks = self._synchronise(masks)
        self.keep = masks

    def step(self) -> dict[str, Any]:
        self._check_open()
        self.step_count += 1
        self._recompute_masks()
        return self._event()

    def _event(self) -> dict[str, Any]:
        return {"pattern": str(self.pattern_at(self.step_count))}

    # the base class keeps masks in a SparsityState; here they live in self.keep
    def _check_open(self) -> None:
        if not getattr(self, "_open", False):
            raise SparsecraftError(f"this {type(self).__name__} was finalized; create a new one")

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        self._check_open()
        return self.keep

    def sparsity(self) -> float:
        """Sparsity of the current N:M masks (what finalize_ will leave)."""
        self._check_open()
        total = sum(k.numel() for k in self.keep.values())
        return 1.0 - sum(int(k.sum()) for k in self.keep.values()) / total

    def layer_sparsity(self) -> dict[str, float]:
        self._check_open()
        return {n: 1.0 - k.sum().item() / k.numel() for n, k in self.keep.items()}

    def attach_optimizer(self, optimizer):
        self.optimizers.append(optimizer)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The weights the layers compute with right now."""
        with torch.no_grad():
            return {t.name: t.module.weight.detach().clone() for t in self.targets}

    def finalize_(self) -> nn.Module:
        """Remove the parametrizations; the weights become hard N:M (final pattern)."""
        self._check_open()
        final = self.pattern_at(self.step_count)
        for t in self.targets:
            parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=False)
        self._open = False
        state = SparsityState(self.model)
        with torch.no_grad():
            for t in self.targets:
                keep = final.keep_mask(t.param.detach().abs().float(), layer=t.name)
                state.attach(t.name, keep, pattern=str(final), method=self.method)
        return state.finalize_()

    def _mask_state(self) -> dict[str, Any]:
        return {"masks": {n: k.detach().cpu().clone() for n, k in self.keep.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_open()
        self.validate_state(state)
        self.step_count = int(state["step"])
        self._recompute_masks()  # masks follow from the (already restored) dense weights

    def __repr__(self):
        if not getattr(self, "_open", False):
            return f"{type(self).__name__}(finalized)"
        return f"{type(self).__name__}(step={self.step_count}, pattern={self.pattern_at(self.step_count)})"


class SRSTE(NMTraining):
    """N:M training with the sparse-refined straight-through estimator.

    ``SRSTE(model, "2:4", decay=2e-4)``; ``decay`` is lambda_w (0 gives plain STE).
    """

    method = "srste"

    def __init__(self, model, pattern="2:4", optimizer=None, *, decay: float = 2e-4,
                 targets: TargetSpec | dict | None = None):
        super().__init__(model, pattern, optimizer, targets=targets)
        if not (isinstance(decay, (int, float)) and decay >= 0):
            raise ConfigError(f"SR-STE decay (lambda_w) must be a number >= 0, got {decay!r}")
        self.decay = float(decay)
        self._begin()

    def _effective(self, name, weight):
        return sr_ste(weight, self.keep[name], self.decay)

    def config_dict(self):
        return {"pattern": str(self.pattern), "decay": self.decay}


class DecayingNM(NMTraining):
    """N:M training where the pruned elements' gradient share decays to zero.

    ``beta`` (the pruned weights' factor) falls from 1 at ``start`` to 0 at ``end``.
    ``stages`` tightens the pattern: ``[(0, "4:8"), (2000, "2:8"), (4000, "1:8")]``; by
    default ``tighten=True`` builds such stages from M/2 : M down to the target N : M,
    halving N, evenly spaced over [start, end]. The last stage's pattern must be ``pattern``.
    """

    method = "decaying-nm"

    def __init__(self, model, pattern="1:8", optimizer=None, *, start: int = 0, end: int,
                 shape: str = "linear", stages: list | None = None, tighten: bool = False,
                 targets: TargetSpec | dict | None = None):
        super().__init__(model, pattern, optimizer, targets=targets)
        self.beta = DecaySchedule(start=start, end=end, initial=1.0, shape=shape)
        if stages is None:
            stages = self._default_stages(start, end) if tighten else [(0, str(self.pattern))]
        self.stages = self._check_stages(stages)
        self._begin()

    def _default_stages(self, start, end):
        ns, n = [], self.pattern.m // 2
        while n > self.pattern.n:
            ns.append(n)
            n //= 2
        ns.append(self.pattern.n)
        span = (end - start) / len(ns)
        return [(0 if i == 0 else int(start + i * span), f"{n}:{self.pattern.m}") for i, n in enumerate(ns)]

    def _check_stages(self, stages):
        parsed = []
        for item in stages:
            try:
                step, pattern = item
            except (TypeError, ValueError):
                raise ConfigError(f"each stage must be (step, 'N:M'), got {item!r}") from None
            if int(step) != step or step < 0:
                raise ConfigError(f"stage step must be a whole step >= 0, got {step!r}")
            parsed.append((int(step), _parse_nm(pattern)))
        if not parsed or parsed[0][0] != 0:
            raise ConfigError("stages must start at step 0")
        steps = [s for s, _ in parsed]
        if steps != sorted(set(steps)):
            raise ConfigError(f"stage steps must increase, got {steps}")
        if parsed[-1][1] != self.pattern:
            raise ConfigError(f"the last stage's pattern {parsed[-1][1]} must be the target {self.pattern}")
        for (_, a), (_, b) in zip(parsed, parsed[1:]):
            if b.n / b.m > a.n / a.m:
                raise ConfigError(f"stages may only tighten: {a} -> {b} keeps more weights")
        for t in self.targets:
            for _, p in parsed:
                p.check(t.shape, t.name)
        return parsed

    def pattern_at(self, step):
        current = self.stages[0][1]
        for s, p in self.stages:
            if step >= s:
                current = p
        return current

    def _effective(self, name, weight):
        return decayed(weight, self.keep[name], self.beta.factor(self.step_count))

    def _event(self):
        return {"pattern": str(self.pattern_at(self.step_count)), "beta": self.beta.factor(self.step_count)}

    def config_dict(self):
        return {"pattern": str(self.pattern), "start": self.beta.start, "end": self.beta.end,
                "shape": self.beta.shape, "stages": [[s, str(p)] for s, p in self.stages]}


# -- recipes (sparsecraft train) -------------------------------------------------------------
def _recipe_nm(recipe) -> NM:
    try:
        return _parse_nm(recipe.pattern)
    except ConfigError as exc:
        raise ConfigError(f"train recipe: pattern: {exc}") from None


@recipe_method("srste", options={"decay"})
def _plan_srste(recipe) -> Plan:
    pattern = _recipe_nm(recipe)
    decay = option_number(recipe, "decay", 2e-4)

    def build(model, optimizer, context):
        return SRSTE(model, pattern, optimizer, decay=decay)

    return Plan(build, recipe.steps)


@recipe_method("decaying-nm", options={"start", "end", "tighten", "stages", "shape"})
def _plan_decaying_nm(recipe) -> Plan:
    pattern = _recipe_nm(recipe)
    end = option_steps(recipe, "end", 0.75)
    start = option_steps(recipe, "start", 0.0, high=end)
    tighten = recipe.options.get("tighten", True)
    if not isinstance(tighten, bool):
        raise ConfigError(f"train recipe: options.tighten must be true or false, got {tighten!r}")
    shape = option_choice(recipe, "shape", "linear", ("linear", "cosine"))
    stages = recipe.options.get("stages")
    if stages is not None:
        if not isinstance(stages, (list, tuple)):
            raise ConfigError(f"train recipe: options.stages must be a list of [step, \"N:M\"], got {stages!r}")
        checked = []
        for i, item in enumerate(stages):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ConfigError(f"train recipe: options.stages[{i}] must be [step, \"N:M\"], got {item!r}")
            step, spec = item
            if isinstance(spec, (int, float)) and not isinstance(spec, bool):
                raise quote_hint(f"options.stages[{i}] pattern", spec)
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= recipe.steps:
                raise ConfigError(
                    f"train recipe: options.stages[{i}] step must be a whole step in [0, steps={recipe.steps}], "
                    f"got {step!r}"
                )
            try:
                _parse_nm(spec)
            except ConfigError as exc:
                raise ConfigError(f"train recipe: options.stages[{i}]: {exc}") from None
            checked.append((step, spec))
        stages = checked

    def build(model, optimizer, context):
        return DecayingNM(model, pattern, optimizer, start=start, end=end, tighten=tighten,
                          stages=stages, shape=shape)

    return Plan(build, recipe.steps)
