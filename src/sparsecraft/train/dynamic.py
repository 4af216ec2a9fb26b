"""Dynamic sparse training: prune and regrow connections during training at fixed sparsity.

Both methods start from a random mask with ERK densities (by default) and, every
``update_every`` steps until ``end``, move a decaying fraction of each layer's active
connections: the ones with the smallest |w| are dropped, and as many are grown among the
inactive ones (including those just dropped), so every layer keeps its exact count.

* :class:`SET` (Mocanu et al., 2018) grows at random (a seeded generator whose state is saved).
* :class:`RigL` (Evci et al., 2020) grows where the dense gradient |dL/dw| is largest. The
  dense gradient is read (before masking) only on the backward passes that precede an update
  step, and averaged over ranks under DDP, so every rank makes the same decision.

Grown connections start at zero and their optimizer state (momentum, Adam moments) is reset,
as is the state of dropped ones.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..allocation import ALLOCATIONS, check_sparsity
from ..criteria import LayerContext, get_criterion
from ..errors import ConfigError, SparsecraftError
from ..patterns import Unstructured
from ..targets import TargetSpec
from .base import StateMismatch, TrainingSparsity, distributed_world
from .pruning import _check_allocation
from .registry import Plan, option_choice, option_int, option_number, option_steps, recipe_method, recipe_sparsity
from .schedules import UpdateSchedule

__all__ = ["DynamicSparsity", "SET", "RigL", "drop_and_grow", "schedule_options", "SCHEDULE_OPTIONS"]

log = logging.getLogger(__name__)


def drop_and_grow(
    keep: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """New keep-mask after dropping the ``count`` active weights of smallest |w| and growing
    the ``count`` inactive positions (after the drop) of largest ``grow_scores``.

    Returns ``(new_keep, grown)``; ``grown`` marks the positions grown at this update.
    Pure function of its inputs; ties go to the lower index on both sides.
    """
    flat_keep = keep.reshape(-1)
    active = int(flat_keep.sum())
    count = min(count, active)
    if count <= 0:
        return keep.clone(), torch.zeros_like(keep)
    big = torch.finfo(torch.float32).max
    drop_scores = weight.detach().abs().float().reshape(-1).masked_fill(~flat_keep, big)
    # stable sorts give "lower index first" on ties, and identical results on every rank
    drop_idx = torch.sort(drop_scores, stable=True).indices[:count]
    after_drop = flat_keep.clone()
    after_drop[drop_idx] = False
    grow = grow_scores.detach().float().reshape(-1).masked_fill(after_drop, -big)
    grow_idx = torch.sort(grow, descending=True, stable=True).indices[:count]
    new_keep = after_drop.clone()
    new_keep[grow_idx] = True
    grown = torch.zeros_like(flat_keep)
    grown[grow_idx] = True
    return new_keep.reshape(keep.shape), grown.reshape(keep.shape)


class DynamicSparsity(TrainingSparsity):
    """Prune-and-regrow at a cadence; subclasses choose where to grow (:meth:`grow_scores`).

    ``overrides={rule: sparsity}`` pins the sparsity of matching targets (first matching rule
    wins); ``allocation`` spreads ``sparsity`` over the others (see :mod:`sparsecraft.allocation`).
    """

    method = ""

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        update_every: int = 100,
        end: int | None = None,
        optimizer=None,
        *,
        fraction: float = 0.3,
        decay: str = "cosine",
        allocation: str = "erk",
        init: str = "random",
        seed: int = 0,
        targets: TargetSpec | dict | None = None,
        max_sparsity: float = 0.99,
        overrides: dict[str, float] | None = None,
    ):
        name = type(self).__name__
        if isinstance(update_every, torch.optim.Optimizer) or isinstance(end, torch.optim.Optimizer):
            raise ConfigError(
                f"{name}(model, sparsity, update_every, end, optimizer): pass the optimizer as "
                "optimizer=opt (the third argument is update_every)"
            )
        if end is None:
            raise ConfigError(f"{name} needs end: the step after which masks stop changing")
        super().__init__(model, optimizer, targets=targets)
        self.target = check_sparsity(sparsity, f"{name} sparsity")
        self.schedule = UpdateSchedule(every=update_every, end=end, fraction=fraction, decay=decay)
        if self.schedule.every >= self.schedule.end:
            raise ConfigError(
                f"{name}: update_every ({update_every}) must be below end ({end}), else the masks never change"
            )
        self.allocation = _check_allocation(allocation)
        if init not in ("random", "magnitude"):
            raise ConfigError(f"unknown initial mask '{init}'; known: random, magnitude")
        self.init, self.seed, self.max_sparsity = init, int(seed), max_sparsity
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{name} overrides must map target rules to sparsities, got {overrides!r}")
        self.overrides = dict(overrides or {})  # {rule: sparsity}, checked by the allocation
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        criterion = get_criterion("random", seed=self.seed) if init == "random" else get_criterion("magnitude")
        masks = self._plan_scores(
            lambda t: criterion(LayerContext(t.name, t.module, t.param)),
            self.target, self.allocation, Unstructured(), overrides=self.overrides,
        )
        self._start(masks, pattern="unstructured")

    def grow_scores(self, name: str, keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def drop_scores(self, target) -> torch.Tensor:
        """Scores whose smallest active entries are dropped (|w|; subclasses may change it)."""
        return target.param

    @torch.no_grad()
    def _init_grown_(self, target, grown: torch.Tensor) -> None:
        """New connections start from zero, with their optimizer state reset."""
        target.param.masked_fill_(grown, 0.0)
        self.reset_optimizer_state_(target.name, grown)

    def _before_update(self) -> None:
        """Hook for state the grow scores need (e.g. RigL's averaged gradients)."""

    def _after_update(self) -> None:
        pass

    @torch.no_grad()
    def _update(self, step: int) -> dict[str, Any] | None:
        if not self.schedule.is_update_step(step):
            return None
        fraction = self.schedule.fraction_at(step)
        self._before_update()
        new_masks, grown_all, moved = {}, {}, 0
        for t in self.targets:
            keep = self.state.masks[t.name]
            count = int(fraction * int(keep.sum()) + 0.5)
            new_keep, grown = drop_and_grow(keep, self.drop_scores(t), self.grow_scores(t.name, keep), count)
            new_masks[t.name], grown_all[t.name] = new_keep, grown
            moved += int(grown.sum())
        self._after_update()
        grown_all = self._synchronise(grown_all)
        self._install(new_masks, pattern="unstructured")
        for t in self.targets:
            self._init_grown_(t, grown_all[t.name].to(t.param.device))
        log.debug("%s step %d: moved %d connections (fraction %.4f)", self.method, step, moved, fraction)
        return {"updated": True, "fraction": fraction, "moved": moved}

    def config_dict(self):
        s = self.schedule
        config = {"sparsity": self.target, "update_every": s.every, "end": s.end,
                  "fraction": s.fraction, "decay": s.decay, "allocation": self.allocation,
                  "init": self.init, "seed": self.seed}
        if self.overrides:  # only when set, so states saved before overrides existed still load
            config["overrides"] = dict(self.overrides)
        return config

    def _extra_state(self):
        return {"generator": self.generator.get_state()}

    def _check_state(self, state):
        super()._check_state(state)
        saved = (state.get("extra") or {}).get("generator")
        mine = self.generator.get_state()
        if saved is not None and not (
            torch.is_tensor(saved) and saved.dtype == mine.dtype and saved.shape == mine.shape
        ):
            raise StateMismatch(f"{self.method} state: the random generator state does not fit")

    def _load_extra_state(self, extra):
        if "generator" in extra:
            self.generator.set_state(extra["generator"])


class SET(DynamicSparsity):
    """Sparse Evolutionary Training: drop the smallest weights, regrow at random."""

    method = "set"

    def grow_scores(self, name, keep):
        return torch.rand(keep.shape, generator=self.generator).to(keep.device)


class RigL(DynamicSparsity):
    """Rigged Lottery: drop the smallest weights, regrow where the dense gradient is largest."""

    method = "rigl"

    def __init__(self, model, sparsity, *args, **kwargs):
        super().__init__(model, sparsity, *args, **kwargs)
        self._dense_grads: dict[str, torch.Tensor] = {}
        self.state.grad_observer = self._observe

    def _observe(self, name: str, grad: torch.Tensor) -> None:
        # only the backward passes feeding the next update are kept
        if not self.schedule.is_update_step(self.step_count + 1):
            return
        g = grad.detach()
        if name in self._dense_grads:
            self._dense_grads[name] += g
        else:
            self._dense_grads[name] = g.clone()

    def _before_update(self):
        missing = [t.name for t in self.targets if t.name not in self._dense_grads]
        if missing:
            raise SparsecraftError(
                f"RigL update at step {self.step_count} found no dense gradient for "
                f"{missing[:3]}: call sparsity.step() once per optimizer step, after backward()"
            )
        world = distributed_world()
        if world > 1:
            for g in self._dense_grads.values():
                torch.distributed.all_reduce(g)
                g /= world

    def grow_scores(self, name, keep):
        return self._dense_grads[name].abs()

    def _after_update(self):
        self._dense_grads.clear()


# -- recipes (sparsecraft train) -------------------------------------------------------------
#: the recipe options of the prune-and-regrow schedule (read by :func:`schedule_options`)
SCHEDULE_OPTIONS = frozenset({"update_every", "end", "fraction", "decay"})


def schedule_options(recipe) -> dict[str, Any]:
    """The checked prune-and-regrow schedule of a recipe: ``update_every``, ``end``,
    ``fraction`` and ``decay``, as keyword arguments of :class:`DynamicSparsity`."""
    if recipe.pattern != "unstructured":
        raise ConfigError(f"train recipe: method '{recipe.method}' is unstructured only, got pattern {recipe.pattern!r}")
    end = option_steps(recipe, "end", 0.75, low=1)
    every = option_int(recipe, "update_every", 50)
    if every >= end:
        raise ConfigError(
            f"train recipe: options.update_every ({every}) must be below options.end (step {end}); "
            "otherwise the masks never change"
        )
    fraction = option_number(recipe, "fraction", 0.3, high=1.0)
    if fraction == 0:
        raise ConfigError("train recipe: options.fraction must be in (0, 1], got 0")
    decay = option_choice(recipe, "decay", "cosine", ("cosine", "linear", "constant"))
    return {"update_every": every, "end": end, "fraction": fraction, "decay": decay}


def _plan_dynamic(cls):
    def plan(recipe) -> Plan:
        sparsity = recipe_sparsity(recipe)
        schedule = schedule_options(recipe)
        allocation = option_choice(recipe, "allocation", "erk", ALLOCATIONS)

        def build(model, optimizer, context):
            return cls(model, sparsity, optimizer=optimizer, allocation=allocation, seed=recipe.seed, **schedule)

        return Plan(build, recipe.steps)

    return plan


recipe_method("set", options=SCHEDULE_OPTIONS | {"allocation"})(_plan_dynamic(SET))
recipe_method("rigl", options=SCHEDULE_OPTIONS | {"allocation"})(_plan_dynamic(RigL))
