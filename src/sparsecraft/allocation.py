"""Allocation: one global sparsity target -> a sparsity per target.

Every allocation returns ``{target name: sparsity}``. Where an allocation fixes exact
element counts (global threshold, ERK) the returned sparsity is ``k / numel`` so that the
pattern's rounding rule (``floor(s * n + 0.5)``) gives back exactly ``k``.

* ``uniform``: every target gets the same sparsity.
* ``global``: one score threshold over all targets (scores must be comparable across
  layers, e.g. magnitude), with a per-layer cap ``max_sparsity`` so no layer is emptied.
  The total number of pruned elements is exact: ``floor(s * total + 0.5)``.
* ``erk``: Erdős–Rényi-kernel densities, proportional to ``sum(shape) / prod(shape)``,
  scaled so the total is exact; layers that would exceed density 1 stay dense and the
  rest is rescaled (as in RigL).
* ``owl``: outlier-weighted (registered by :mod:`sparsecraft.oneshot.owl`); it declares
  in ``requires`` the calibration statistic it needs (input norms), which the one-shot
  driver collects in a dense pass before pruning, exactly as for a solver.
* overrides: ``{rule: sparsity}`` pins matching targets (first matching rule wins); the
  allocation runs over the remaining targets.

Every allocation is an :class:`Allocation` in the one registry :data:`ALLOCATIONS`
(``register_allocation``); its ``Options`` dataclass lists the settings it accepts.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from .criteria import NoOptions, build_options
from .errors import ConfigError, TargetError
from .targets import Target, match_rule

__all__ = [
    "allocate", "ALLOCATIONS", "Allocation", "register_allocation", "get_allocation",
    "global_counts", "erk_counts", "check_sparsity", "bounded_round",
]

log = logging.getLogger(__name__)
ScoreFn = Callable[[Target], torch.Tensor]


class Allocation:
    """Base of a per-layer sparsity allocation.

    ``requires``: calibration statistics per layer (collected by the one-shot driver on
    the dense model and passed as ``stats``); ``needs_scores``: whether it compares the
    method's scores across layers (``score_fn``). ``groups`` (lists of target names, e.g.
    one per transformer block) lets an allocation decide per group.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    needs_scores: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options=None):
        self.options = options if options is not None else build_options(self.Options, {}, f"allocation '{self.name}'")

    def __call__(
        self,
        targets: Sequence[Target],
        sparsity: float,
        *,
        score_fn: ScoreFn | None,
        stats: Mapping[str, Mapping[str, Any]] | None,
        groups: Sequence[Sequence[str]] | None,
        max_sparsity: float,
    ) -> dict[str, float]:
        raise NotImplementedError


#: name -> Allocation subclass; one registry for every allocation.
ALLOCATIONS: dict[str, type[Allocation]] = {}


def register_allocation(cls: type[Allocation]) -> type[Allocation]:
    """Class decorator: make an allocation available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    ALLOCATIONS[cls.name] = cls
    return cls


def get_allocation(name: str, options: Mapping[str, Any] | None = None) -> Allocation:
    """The allocation ``name`` with its typed options (ConfigError on unknown ones)."""
    try:
        cls = ALLOCATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown allocation '{name}'; known: {', '.join(ALLOCATIONS)}") from None
    return cls(build_options(cls.Options, options, f"allocation '{name}'"))


def check_sparsity(value, what: str = "sparsity") -> float:
    """A sparsity must be a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ConfigError(f"{what} must be in [0, 1), got {value}")
    return value


def bounded_round(ideal: Sequence[float], lo: Sequence[int], hi: Sequence[int], total: int) -> list[int]:
    """Integers in ``[lo, hi]``, near ``ideal``, summing to ``total`` (largest remainder).

    Start from the floors (clipped to the bounds), then move one unit at a time to the
    entries with the largest fractional parts (smallest when taking away), index breaking
    ties, until the total is met.
    """
    counts = [min(max(math.floor(x), a), b) for x, a, b in zip(ideal, lo, hi)]
    frac = [x - math.floor(x) for x in ideal]
    short = total - sum(counts)
    step = 1 if short > 0 else -1
    order = sorted(range(len(ideal)), key=lambda i: (-step * frac[i], i))
    while short:
        moved = False
        for i in order:
            if short and lo[i] <= counts[i] + step <= hi[i]:
                counts[i] += step
                short -= step
                moved = True
        if not moved:
            raise ConfigError(f"the per-layer bounds leave no way to reach the exact total {total}")
    return counts


def _sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int32 keys with the same total order (for exact bisection).

    Non-negative floats keep their bit pattern; a negative float with magnitude bits ``m``
    becomes ``~m = -m - 1``, so larger magnitudes sort lower. int32, not int64: half the
    memory on layers of millions of scores.
    """
    bits = scores.detach().float().contiguous().view(torch.int32)
    return torch.where(bits < 0, torch.bitwise_not(bits & 0x7FFFFFFF), bits)


def _distribute(below: list[int], at_or_below: list[int], k: int) -> list[int]:
    """Prune everything strictly below the threshold, then ties in target order up to ``k``."""
    counts = list(below)
    short = k - sum(counts)
    for i in range(len(counts)):
        add = min(short, at_or_below[i] - counts[i])
        counts[i] += add
        short -= add
    assert short == 0, "threshold invariant broken"
    return counts


def _sample_bracket(targets, score_fn, quantile: float, size: int = 2**20) -> tuple[int, int]:
    """Keys that bracket the global ``quantile`` with high probability (strided sample)."""
    total = sum(t.param.numel() for t in targets)
    step = max(1, total // size)
    # copy each strided slice so no full-size layer tensor stays alive through the list
    sample = torch.cat([_sortable_keys(score_fn(t).reshape(-1)[::step].clone()) for t in targets]).sort().values
    m = sample.numel()
    margin = 6.0 / math.sqrt(m) + 1e-3
    lo_i, hi_i = math.floor((quantile - margin) * m), math.ceil((quantile + margin) * m)
    lo = int(sample[lo_i]) if lo_i >= 0 else -(2**31)
    hi = int(sample[hi_i]) if hi_i < m else 2**31 - 1
    return lo, hi


def _counts_in_bracket(targets, score_fn, caps, k, lo: int, hi: int) -> list[int] | None:
    """Exact counts when the threshold lies in [lo, hi]; None when it does not."""
    below_lo, candidates = [], []
    for t in targets:
        keys = _sortable_keys(score_fn(t)).reshape(-1)
        below_lo.append(int((keys < lo).sum()))
        candidates.append(keys[(keys >= lo) & (keys <= hi)].sort().values)

    def f(key: int, right: bool = True) -> list[int]:
        probe = torch.tensor([key], dtype=torch.int32)
        return [
            min(b + int(torch.searchsorted(c, probe, right=right)), cap)
            for b, c, cap in zip(below_lo, candidates, caps)
        ]

    if sum(f(lo, right=False)) >= k or sum(f(hi)) < k:
        return None  # the threshold is outside the bracket
    a, b = lo, hi
    while a < b:  # smallest key with f(key) >= k
        mid = (a + b) // 2
        if sum(f(mid)) >= k:
            b = mid
        else:
            a = mid + 1
    return _distribute(f(a, right=False), f(a), k)


def _counts_by_bisection(targets, score_fn, caps, k) -> list[int]:
    """Exact counts by bisection over the whole float order, one pass over the scores per step."""

    def capped_count(key: int, strict: bool) -> list[int]:
        out = []
        for target, cap in zip(targets, caps):
            keys = _sortable_keys(score_fn(target))
            n = int((keys < key).sum() if strict else (keys <= key).sum())
            out.append(min(n, cap))
        return out

    lo, hi = -(2**31), 2**31 - 1  # f(hi) >= k always
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(capped_count(mid, strict=False)) >= k:
            hi = mid
        else:
            lo = mid + 1
    return _distribute(capped_count(lo, strict=True), capped_count(lo, strict=False), k)


def global_counts(
    targets: Sequence[Target], sparsity: float, score_fn: ScoreFn, max_sparsity: float
) -> dict[str, int]:
    """Exact per-target pruned counts for one global threshold with a per-layer cap.

    The threshold is the smallest score key ``t`` (floats mapped to integers in the same
    order) with ``sum_i min(#{score_i <= t}, cap_i) >= k``. Elements strictly below ``t``
    are pruned; the remaining budget goes to elements equal to ``t`` in target order (lowest
    index first inside the layer, matching the patterns' tie rule).

    Memory stays at one layer's scores plus a small sample: a strided sample of about a
    million scores brackets the threshold, one pass counts what lies below the bracket and
    keeps what lies inside it, and the exact threshold is found among those. If the sample
    misses (rare, e.g. when caps bind), an exact bisection over all scores (32 passes) runs.
    """
    sizes = [t.param.numel() for t in targets]
    caps = [math.floor(max_sparsity * n) for n in sizes]
    k = math.floor(sparsity * sum(sizes) + 0.5)
    if k > sum(caps):
        raise ConfigError(
            f"global sparsity {sparsity} needs {k} pruned weights but the per-layer cap "
            f"max_sparsity={max_sparsity} allows only {sum(caps)}"
        )
    if k == 0:
        return {t.name: 0 for t in targets}
    lo, hi = _sample_bracket(targets, score_fn, k / sum(sizes))
    counts = _counts_in_bracket(targets, score_fn, caps, k, lo, hi)
    if counts is None:
        log.debug("sampled bracket missed the global threshold; exact bisection")
        counts = _counts_by_bisection(targets, score_fn, caps, k)
    return {t.name: c for t, c in zip(targets, counts)}


def erk_counts(targets: Sequence[Target], sparsity: float, power: float = 1.0) -> dict[str, int]:
    """Exact per-target pruned counts from Erdős–Rényi-kernel densities."""
    sizes = {t.name: t.param.numel() for t in targets}
    raw = {t.name: (sum(t.shape) / math.prod(t.shape)) ** power for t in targets}
    total = sum(sizes.values())
    keep_total = total - math.floor(sparsity * total + 0.5)
    dense: set[str] = set()
    while True:
        free = [n for n in sizes if n not in dense]
        budget = keep_total - sum(sizes[n] for n in dense)
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        over = {n for n in free if eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    ideal_kept = [sizes[n] if n in dense else eps * raw[n] * sizes[n] for n in sizes]
    ideal_pruned = [sizes[n] - kept for n, kept in zip(sizes, ideal_kept)]
    caps = [0 if n in dense else sizes[n] for n in sizes]
    pruned = bounded_round(ideal_pruned, [0] * len(caps), caps, total - keep_total)
    return dict(zip(sizes, pruned))


@register_allocation
class Uniform(Allocation):
    """Every target gets the same sparsity."""

    name = "uniform"

    def __call__(self, targets, sparsity, **_):
        return {t.name: sparsity for t in targets}


@register_allocation
class GlobalThreshold(Allocation):
    """One score threshold over all targets, each capped at ``max_sparsity``; exact total."""

    name = "global"
    needs_scores = True

    def __call__(self, targets, sparsity, *, score_fn, max_sparsity, **_):
        if score_fn is None:
            raise ConfigError("global allocation needs scores")
        counts = global_counts(targets, sparsity, score_fn, max_sparsity)
        return {t.name: counts[t.name] / t.param.numel() for t in targets}


@register_allocation
class ERK(Allocation):
    """Erdős–Rényi-kernel densities; exact total."""

    name = "erk"

    def __call__(self, targets, sparsity, **_):
        counts = erk_counts(targets, sparsity)
        return {t.name: counts[t.name] / t.param.numel() for t in targets}


def allocate(
    targets: Sequence[Target],
    sparsity: float,
    method: str | Allocation = "uniform",
    *,
    score_fn: ScoreFn | None = None,
    overrides: Mapping[str, float] | None = None,
    max_sparsity: float = 0.99,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Per-target sparsity for ``targets`` (see the module docstring)."""
    sparsity = check_sparsity(sparsity)
    alloc = method if isinstance(method, Allocation) else get_allocation(method, options)
    if not 0.0 < max_sparsity <= 1.0:
        raise ConfigError(f"max_sparsity must be in (0, 1], got {max_sparsity}")
    missing = [t.name for t in targets if alloc.requires and (stats is None or t.name not in stats)]
    if missing:
        raise ConfigError(
            f"allocation '{alloc.name}' needs calibration statistics {alloc.requires}; "
            f"none for {missing[0]} (run it through prune_ with calibration data)"
        )

    pinned: dict[str, float] = {}
    for rule, value in (overrides or {}).items():
        value = check_sparsity(value, f"override '{rule}'")
        hits = [t for t in targets if match_rule(rule, t.name, t.module_name)]
        if not hits:
            raise TargetError(
                f"override rule '{rule}' matches no target; targets: "
                f"{', '.join(t.name for t in targets[:12])}"
                + (" ..." if len(targets) > 12 else "")
            )
        for t in hits:
            pinned.setdefault(t.name, value)  # first matching rule wins
    free = [t for t in targets if t.name not in pinned]

    result: dict[str, float] = dict(pinned)
    if not free:
        return result
    free_names = {t.name for t in free}
    if groups is not None:
        groups = [[n for n in g if n in free_names] for g in groups]
        groups = [g for g in groups if g]
    result.update(alloc(free, sparsity, score_fn=score_fn, stats=stats, groups=groups, max_sparsity=max_sparsity))
    return {t.name: result[t.name] for t in targets}
