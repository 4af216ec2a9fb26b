"""The optimizer-like base of every training-time sparsity method.

A method object is built on a model (and optionally its optimizers), and ``step()`` is
called after every ``optimizer.step()``. It owns a :class:`~sparsecraft.masks.SparsityState`
(masks, gradient hooks, re-masking after optimizer steps) and a step counter; subclasses
decide what happens to the masks at a given step (:meth:`_update`).

``state_dict()`` holds everything needed to continue a run mid-schedule with identical
results: the step, the masks, the method's own state (random generator, rewind weights),
and a fingerprint of the model's targets and the method's settings, which
``load_state_dict`` checks before changing anything.

Under ``torch.distributed`` (e.g. DDP with gloo), masks are broadcast from rank 0 after
every change, so every rank holds the same masks; methods that need statistics (RigL's
dense gradients) average them over ranks before deciding.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from ..allocation import allocate
from ..errors import ConfigError, SparsecraftError, TargetError
from ..masks import SparsityState
from ..patterns import Pattern
from ..targets import Target, TargetSpec, select_targets

__all__ = [
    "TrainingSparsity", "unwrap_model", "current_sparsity", "distributed_world",
    "magnitude_scores", "StateMismatch",
]

log = logging.getLogger(__name__)
STATE_VERSION = 1


class StateMismatch(SparsecraftError):
    """A saved training-sparsity state does not belong to this model or method."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers (their parameters are the same)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
        "DistributedDataParallel", "DataParallel",
    ):
        model = model.module
    return model


def distributed_world() -> int:
    """World size when torch.distributed is initialised, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def current_sparsity(targets: Iterable[Target]) -> float:
    """Fraction of exact zeros over the targets' weights."""
    total = zeros = 0
    for t in targets:
        total += t.param.numel()
        zeros += t.param.numel() - int(t.param.count_nonzero())
    return zeros / total if total else 0.0


def magnitude_scores(param: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """|w|, with already-pruned positions scored below every weight (so they stay pruned)."""
    scores = param.detach().abs().float()
    if keep is not None:
        scores = scores.masked_fill(~keep, -1.0)
    return scores


class TrainingSparsity:
    """Base class: masks that change (or not) on a step schedule during training."""

    #: registry name, written into ``state_dict()`` and checked on load
    method: ClassVar[str] = ""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        targets: TargetSpec | dict | None = None,
    ):
        self.model = unwrap_model(model)
        self.targets: list[Target] = select_targets(self.model, targets)
        if not self.targets:
            raise TargetError("no targets to sparsify in this model")
        self._by_name = {t.name: t for t in self.targets}
        for t in self.targets:
            if not torch.isfinite(t.param.detach()).all():
                raise TargetError(f"layer '{t.name}': weight contains NaN or inf")
        self.step_count = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        self._pending_optimizers = (
            [] if optimizer is None
            else [optimizer] if isinstance(optimizer, torch.optim.Optimizer)
            else list(optimizer)
        )
        self.state: SparsityState | None = None

    # -- set-up, called by subclasses once everything is validated ----------------------
    def _start(self, masks: dict[str, torch.Tensor], **info) -> None:
        """Attach the initial masks and optimizers; the first change to the model."""
        self.state = SparsityState(self.model)
        self._install(masks, **info)
        for opt in self._pending_optimizers:
            self.attach_optimizer(opt)
        self._pending_optimizers = []

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-mask after every step of ``optimizer`` and reset its state where masks change."""
        self.optimizers.append(optimizer)
        self.state.attach_optimizer(optimizer)

    # -- the training-loop API --------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """Call after ``optimizer.step()``; returns what happened at this step (may be empty)."""
        self._check_open()
        self.step_count += 1
        event = self._update(self.step_count) or {}
        if not self.optimizers:  # attached optimizers already re-masked after their step
            self.state.apply_()
        return event

    def _update(self, step: int) -> dict[str, Any] | None:
        """Method-specific mask change at ``step`` (after the optimizer moved the weights)."""
        return None

    def sparsity(self) -> float:
        self._check_open()
        return self.state.sparsity()

    def layer_sparsity(self) -> dict[str, float]:
        self._check_open()
        return self.state.layer_sparsity()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        self._check_open()
        return self.state.masks

    def finalize_(self) -> nn.Module:
        """Apply the masks a last time, remove every hook; returns the model."""
        self._check_open()
        model = self.state.finalize_()
        self.state = None
        return model

    def _check_open(self) -> None:
        if self.state is None:
            raise SparsecraftError(f"this {type(self).__name__} was finalized; create a new one")

    # -- mask changes ---------------------------------------------------------------------
    def _install(self, masks: dict[str, torch.Tensor], **info) -> None:
        """Replace masks (broadcast from rank 0 under DDP), zero optimizer state where they
        changed, and apply them."""
        masks = self._synchronise(masks)
        for name, keep in masks.items():
            old = self.state.masks.get(name)
            if old is not None:
                changed = old ^ keep
                if changed.any():
                    self.reset_optimizer_state_(name, changed)
            self.state.attach(name, keep, method=self.method, **info)

    def _synchronise(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if distributed_world() == 1:
            return masks
        out = {}
        for name, keep in masks.items():
            buf = keep.to(torch.uint8).contiguous()
            torch.distributed.broadcast(buf, src=0)
            out[name] = buf.bool()
        return out

    @torch.no_grad()
    def reset_optimizer_state_(self, name: str, positions: torch.Tensor) -> None:
        """Zero every per-element optimizer state (momentum, Adam moments) at ``positions``."""
        param = self._by_name[name].param
        for opt in self.optimizers:
            for value in opt.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(positions, 0)

    def _plan_scores(
        self,
        score_fn,
        sparsity: float,
        allocation: str,
        pattern: Pattern,
        *,
        overrides: dict[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keep-masks from per-target scores, with ``allocation`` spreading ``sparsity``."""
        if pattern.fixed_sparsity is not None:
            return {t.name: pattern.keep_mask(score_fn(t), layer=t.name) for t in self.targets}
        budgets = allocate(
            self.targets, sparsity, allocation, score_fn=score_fn, overrides=overrides,
            max_sparsity=getattr(self, "max_sparsity", 0.99),
        )
        return {t.name: pattern.keep_mask(score_fn(t), budgets[t.name], layer=t.name) for t in self.targets}

    def _plan_magnitude(
        self,
        sparsity: float,
        allocation: str,
        pattern: Pattern,
        *,
        overrides: dict[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Magnitude keep-masks at ``sparsity`` that never revive an already-pruned weight."""
        current = self.state.masks if self.state is not None else {}

        def score(t: Target) -> torch.Tensor:
            return magnitude_scores(t.param, current.get(t.name))

        return self._plan_scores(score, sparsity, allocation, pattern, overrides=overrides)

    # -- persistence ----------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The settings that define the method's behaviour (checked on load)."""
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _mask_state(self) -> dict[str, Any]:
        return self.state.state_dict()

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        self._check_open()
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "step": self.step_count,
            "targets": {t.name: list(t.shape) for t in self.targets},
            "config": self.config_dict(),
            "masks": self._mask_state(),
            "extra": self._extra_state(),
        }

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "method" not in state or "masks" not in state:
            raise StateMismatch("not a training-sparsity state (expected the dict from state_dict())")
        if state.get("version") != STATE_VERSION:
            raise StateMismatch(f"training-sparsity state version {state.get('version')} != {STATE_VERSION}")
        if not isinstance(state.get("extra", {}), dict):
            raise StateMismatch("training-sparsity state: 'extra' must be a mapping")
        if state["method"] != self.method:
            raise StateMismatch(
                f"checkpoint is from method '{state['method']}', this run uses '{self.method}'"
            )
        mine = {t.name: list(t.shape) for t in self.targets}
        targets = state.get("targets", {})
        if not isinstance(targets, dict) or not all(isinstance(v, (list, tuple)) for v in targets.values()):
            raise StateMismatch("training-sparsity state: 'targets' must map layer names to shapes")
        theirs = {k: list(v) for k, v in targets.items()}
        if mine != theirs:
            missing = sorted(set(theirs) - set(mine))
            extra = sorted(set(mine) - set(theirs))
            shape = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
            raise StateMismatch(
                "checkpoint is from a different model: "
                + "; ".join(
                    part for part in (
                        f"layers not in this model: {missing[:5]}" if missing else "",
                        f"layers missing from checkpoint: {extra[:5]}" if extra else "",
                        f"different shapes: {[(n, theirs[n], mine[n]) for n in shape[:3]]}" if shape else "",
                    ) if part
                )
            )
        config = self.config_dict()
        if not isinstance(state.get("config"), dict):
            raise StateMismatch("training-sparsity state: 'config' must be a mapping")
        if state.get("config") != config:
            diff = sorted(
                k for k in set(config) | set(state.get("config", {}))
                if config.get(k) != state.get("config", {}).get(k)
            )
            raise StateMismatch(
                f"checkpoint's {self.method} settings differ from this run's in {diff}: "
                f"{ {k: state.get('config', {}).get(k) for k in diff} } vs { {k: config.get(k) for k in diff} }"
            )

    def validate_state(self, state: Any) -> None:
        """Check ``state`` completely (method, model, settings, step, masks, extra) without
        changing anything: :class:`StateMismatch` names what does not fit."""
        self._check_state(state)
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise StateMismatch(f"training-sparsity state: step must be an integer >= 0, got {step!r}")
        masks = state["masks"].get("masks") if isinstance(state["masks"], dict) else None
        if not isinstance(masks, dict) or set(masks) != set(self._by_name):
            raise StateMismatch("training-sparsity state: masks must cover exactly this model's targets")
        for name, keep in masks.items():
            if not torch.is_tensor(keep) or keep.dtype != torch.bool or list(keep.shape) != list(self._by_name[name].shape):
                raise StateMismatch(f"layer '{name}': saved mask does not fit this model")
        info = state["masks"].get("info", {})
        simple = (str, int, float, bool, type(None))
        if not isinstance(info, dict) or any(
            not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, simple) for k, v in entry.items())
            for entry in info.values()
        ):
            raise StateMismatch("training-sparsity state: mask info must map names to plain settings")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; everything is checked before anything changes."""
        self._check_open()
        self.validate_state(state)
        self.state.load_state_dict(state["masks"])
        self.step_count = int(state["step"])
        self._load_extra_state(state.get("extra", {}))

    def __repr__(self) -> str:
        if self.state is None:
            return f"{type(self).__name__}(finalized)"
        return f"{type(self).__name__}(step={self.step_count}, sparsity={self.sparsity():.4f})"


def check_pattern_for_training(pattern: str | Pattern, method: str) -> Pattern:
    from ..patterns import parse_pattern

    pattern = parse_pattern(pattern)
    if pattern.fixed_sparsity is not None:
        raise ConfigError(
            f"{method} changes sparsity over time; N:M pattern {pattern} fixes it. Use SRSTE or "
            "DecayingNM for N:M training"
        )
    return pattern
