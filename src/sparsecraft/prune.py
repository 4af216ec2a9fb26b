"""One-shot pruning: ``prune_(model, config, calibration=None)``.

The driver validates everything first (config, targets, pattern fit, finite weights), then
computes every mask from the untouched weights, and only then attaches and applies them.
The calibrated (block-by-block) driver must change block i before it can compute block
i+1's inputs; it spills originals to disk and restores them on any error. Either way an
error leaves the model as it was.

Methods are registered by name. A method is either a plain criterion (score then mask:
magnitude, random) or a solver that also needs calibration data; solvers register
themselves in :data:`METHODS` with the same signature, so callers never change.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import ALLOCATIONS, allocate, check_sparsity
from .criteria import CRITERIA, Criterion, LayerContext, get_criterion
from .errors import ConfigError, TargetError, config_fields
from .masks import SparsityState
from .patterns import NM, Pattern, PatternMismatch, Unstructured, parse_pattern
from .targets import Target, TargetSpec, select_targets

__all__ = ["PruneConfig", "prune_", "plan_masks", "METHODS", "register_method", "Magnitude", "RandomPrune"]

log = logging.getLogger(__name__)
FALLBACKS = ("error", "skip", "unstructured")

#: method name -> function(model, targets, config, calibration, progress) -> (masks, info).
#: Criterion-only methods need no entry: they are looked up in ``criteria.CRITERIA``.
METHODS: dict[str, Callable[..., tuple[dict, dict]]] = {}

#: Options the calibrated (block-by-block) driver understands.
CALIBRATED_OPTIONS = {
    "batch_size", "dsnot", "owl_m", "owl_lambda", "blocksize", "percdamp", "max_damp_tries",
    "measure_error",  # record ||WX - W'X|| / ||WX|| per layer in the sparsity info
}


def _calibrated_driver(model, targets, config, calibration, *, progress=True):
    from .calibrate import calibrated_prune

    return calibrated_prune(model, targets, config, calibration, progress=progress)


METHODS["wanda"] = _calibrated_driver
METHODS["sparsegpt"] = _calibrated_driver


def register_method(name: str):
    """Decorator: register a solver-type method (needs more than per-layer scores)."""

    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


@dataclass
class PruneConfig:
    """What to prune, how much, in which pattern. YAML and Python build it the same way.

    ``fallback`` says what to do with a layer the pattern cannot tile: ``error`` (default)
    raises naming the layer; ``skip`` leaves that layer dense (logged, and recorded with
    pattern ``dense`` so reports show it); ``unstructured`` prunes that layer unstructured
    at the sparsity it would have had.
    """

    method: str = "magnitude"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    targets: TargetSpec = field(default_factory=TargetSpec)
    overrides: dict[str, float] = field(default_factory=dict)
    max_sparsity: float = 0.99
    fallback: str = "error"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # method-specific settings

    def __post_init__(self):
        if isinstance(self.targets, dict):
            self.targets = TargetSpec.from_dict(self.targets)
        self.validate()

    def validate(self) -> "PruneConfig":
        known = sorted(set(CRITERIA) | set(METHODS))
        if self.method not in known:
            raise ConfigError(f"unknown method '{self.method}'; known: {', '.join(known)}")
        pattern = self.pattern_obj
        if isinstance(pattern, NM):
            if self.sparsity is not None and abs(self.sparsity - pattern.fixed_sparsity) > 1e-9:
                raise ConfigError(
                    f"pattern {pattern} fixes sparsity at {pattern.fixed_sparsity:g}; "
                    f"got sparsity={self.sparsity}"
                )
            if self.allocation != "uniform":
                raise ConfigError(f"N:M pattern {pattern} works only with uniform allocation")
        else:
            if self.sparsity is None:
                raise ConfigError(f"pattern {pattern} needs a sparsity")
            check_sparsity(self.sparsity)
        allocations = ALLOCATIONS + ("owl",)
        if self.allocation not in allocations:
            raise ConfigError(
                f"unknown allocation '{self.allocation}'; known: {', '.join(allocations)}"
            )
        if self.needs_calibration:
            unknown = set(self.options) - CALIBRATED_OPTIONS
            if unknown:
                raise ConfigError(
                    f"unknown options {sorted(unknown)} for calibrated pruning; known: "
                    f"{', '.join(sorted(CALIBRATED_OPTIONS))}"
                )
            if self.allocation in ("global", "erk"):
                raise ConfigError(
                    f"method '{self.method}' with calibration supports allocation uniform or owl, "
                    f"not '{self.allocation}'"
                )
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"unknown fallback '{self.fallback}'; known: {', '.join(FALLBACKS)}")
        for rule, value in self.overrides.items():
            check_sparsity(value, f"override '{rule}'")
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether this config runs the block-by-block calibrated driver."""
        return (
            self.method in METHODS
            or self.allocation == "owl"
            or bool(self.options.get("dsnot") or self.options.get("measure_error"))
        )

    @property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        pattern = self.pattern_obj
        return pattern.fixed_sparsity if pattern.fixed_sparsity is not None else self.sparsity

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneConfig":
        return cls(**config_fields(cls, data, "prune config", "unknown prune config keys"))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["pattern"] = str(self.pattern_obj)
        return out


def default_sparsity(pattern: str | Pattern, requested: float | None = None, default: float = 0.5):
    """Sparsity for a config built from user flags: what was asked, else None for a pattern
    that fixes it (N:M), else ``default``. A malformed pattern is left for validation."""
    if requested is not None:
        return requested
    try:
        fixed = parse_pattern(pattern).fixed_sparsity
    except ConfigError:
        return default
    return None if fixed is not None else default


def Magnitude(**kwargs) -> PruneConfig:
    """Config for magnitude pruning, e.g. ``Magnitude(sparsity=0.5, pattern="2:4")``."""
    return PruneConfig(method="magnitude", **kwargs)


def RandomPrune(**kwargs) -> PruneConfig:
    """Config for seeded random pruning."""
    return PruneConfig(method="random", **kwargs)


def _check_finite(targets: list[Target]) -> None:
    for t in targets:
        if not torch.isfinite(t.param.detach()).all():
            raise TargetError(f"layer '{t.name}': weight contains NaN or inf; refusing to prune")


def _resolve_patterns(targets, config) -> dict[str, Pattern | None]:
    """Pattern per target after the fallback rule; None means "leave dense"."""
    base = config.pattern_obj
    out: dict[str, Pattern | None] = {}
    for t in targets:
        try:
            base.check(t.shape, t.name)
            out[t.name] = base
        except PatternMismatch as exc:
            if config.fallback == "error":
                raise
            log.warning("%s; fallback=%s", exc, config.fallback)
            out[t.name] = None if config.fallback == "skip" else Unstructured()
    return out


def _make_criterion(config: PruneConfig) -> Criterion:
    kwargs = dict(config.options)
    if config.method == "random":
        kwargs.setdefault("seed", config.seed)
    try:
        return get_criterion(config.method, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"method '{config.method}': bad options {config.options}: {exc}") from None


def plan_masks(
    model: nn.Module,
    config: PruneConfig,
    targets: list[Target] | None = None,
    *,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Compute keep-masks for a criterion-type method without touching the model."""
    targets = targets if targets is not None else select_targets(model, config.targets)
    patterns = _resolve_patterns(targets, config)
    criterion = _make_criterion(config)
    if criterion.requires:
        raise ConfigError(
            f"method '{config.method}' needs {criterion.requires}; use a driver that collects them"
        )

    def score(t: Target) -> torch.Tensor:
        return criterion(LayerContext(t.name, t.module, t.param))

    active = [t for t in targets if patterns[t.name] is not None]
    pattern = config.pattern_obj
    if config.allocation == "global" and not criterion.globally_comparable:
        raise ConfigError(f"global allocation needs comparable scores; '{config.method}' has none")
    budgets = allocate(
        active,
        config.target_sparsity,
        config.allocation if pattern.fixed_sparsity is None else "uniform",
        score_fn=score,
        overrides=config.overrides,
        max_sparsity=config.max_sparsity,
    )
    masks, info = {}, {}
    for t in tqdm(active, desc=f"{config.method} {pattern}", disable=not progress, leave=False):
        p = patterns[t.name]
        s = None if p.fixed_sparsity is not None else budgets[t.name]
        masks[t.name] = p.keep_mask(score(t), s, layer=t.name)
        info[t.name] = {"pattern": str(p), "method": config.method}
    for t in targets:
        if patterns[t.name] is None:
            info[t.name] = {"pattern": "dense", "method": "skipped"}
    return masks, info


def prune_(
    model: nn.Module,
    config: PruneConfig | Mapping[str, Any],
    calibration=None,
    *,
    progress: bool = True,
) -> SparsityState:
    """Prune ``model`` in place; returns the attached :class:`SparsityState`.

    ``calibration`` is passed to methods that need data (Wanda, SparseGPT, ...); the
    criterion-only methods ignore it. Call ``state.finalize_()`` to drop the machinery.
    """
    if not isinstance(config, PruneConfig):
        config = PruneConfig.from_dict(config)
    config.validate()
    targets = select_targets(model, config.targets)
    _check_finite(targets)
    if config.needs_calibration:
        driver = METHODS.get(config.method, _calibrated_driver)
        masks, info = driver(model, targets, config, calibration, progress=progress)
    else:
        masks, info = plan_masks(model, config, targets, progress=progress)

    # Everything is computed; only now does the model change.
    state = SparsityState(model)
    for name, keep in masks.items():
        state.attach(name, keep, **info[name])
    for name in info.keys() - masks.keys():
        state.note(name, **info[name])
    log.info("pruned %d targets with %s: sparsity %.4f", len(masks), config.method, state.sparsity())
    return state
