"""OWL (Yin et al. 2023): outlier-weighted layerwise sparsity.

Layers whose Wanda scores ``|W| * ||X||`` hold more outliers matter more, so they get a
lower sparsity. For each layer (or group of layers, e.g. one transformer block as in the
paper) the outlier ratio ``D_l`` is the fraction of scores greater than ``m`` times the
mean score of that layer or group.

Mapping to sparsities: ``D`` is normalised to ``[0, 1]`` over the layers; the layer with
the most outliers gets ``target - lam`` and the one with the fewest ``target + lam``
before a common shift; the shift is chosen so the parameter-weighted mean is the target,
with every layer clipped to ``[target - lam, target + lam]`` (and to
``[0, max_sparsity]``). With equal layer sizes and no clipping this is the paper's
``s_l = target - 2 lam (norm_l - mean(norm))``.

Exact counts: the total number pruned is ``floor(target * N + 0.5)`` over all ``N``
parameters (the package's rounding rule). Per-layer counts are the rounded ideal counts,
kept inside the bounds and fixed up to that total by largest remainder; the returned
sparsity is ``k_l / n_l``, which the patterns' rounding turns back into exactly ``k_l``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..allocation import Allocation, bounded_round, register_allocation
from ..errors import ConfigError, TargetError
from ..patterns import num_to_prune
from .wanda import wanda_scores

__all__ = ["outlier_ratio", "owl_sparsities", "owl_counts", "OWL"]

log = logging.getLogger(__name__)

Scores = torch.Tensor | Sequence[torch.Tensor] | float


def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of scores ``> m * mean``; a list of tensors counts as one group."""
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    if not parts:
        raise TargetError("owl: empty group of scores")
    total = sum(p.numel() for p in parts)
    if total == 0:
        raise TargetError("owl: empty scores")
    mean = sum(float(p.detach().double().sum()) for p in parts) / total
    above = sum(int((p.detach().double() > m * mean).sum()) for p in parts)
    return above / total


def owl_counts(
    scores_per_layer: Mapping[str, Scores],
    numels: Mapping[str, int],
    target: float,
    lam: float = 0.08,
    m: float = 5.0,
    *,
    max_sparsity: float = 0.99,
) -> dict[str, int]:
    """Pruned count per layer (see the module docstring); sums to the exact total."""
    names = list(scores_per_layer)
    if not names:
        return {}
    missing = [n for n in names if n not in numels]
    if missing:
        raise ConfigError(f"owl: numels missing for {missing}")
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"owl: target sparsity must be in [0, 1), got {target}")
    if lam < 0 or m <= 0:
        raise ConfigError(f"owl: need lam >= 0 and m > 0, got lam={lam}, m={m}")
    lo_s = max(0.0, target - lam)
    hi_s = min(max_sparsity, target + lam)
    if not lo_s <= target <= hi_s:
        raise ConfigError(f"owl: target {target} is above max_sparsity {max_sparsity}")

    ratios = []
    for name in names:
        s = scores_per_layer[name]
        ratios.append(float(s) if isinstance(s, (int, float)) else outlier_ratio(s, m))
    sizes = [int(numels[n]) for n in names]
    if any(n <= 0 for n in sizes):
        raise ConfigError("owl: every layer needs a positive parameter count")
    total = sum(sizes)
    k_total = num_to_prune(target, total)

    spread = max(ratios) - min(ratios)
    if spread <= 0 or lam == 0:
        raw = [target] * len(names)
    else:
        # Most outliers -> target - lam, fewest -> target + lam, before the shift.
        raw = [target + lam * (1 - 2 * (r - min(ratios)) / spread) for r in ratios]

    def mean_at(shift: float) -> float:
        return sum(n * min(max(x + shift, lo_s), hi_s) for n, x in zip(sizes, raw)) / total

    a, b = -2 * lam - 1e-12, 2 * lam + 1e-12  # mean_at(a) = lo_s <= target <= mean_at(b)
    for _ in range(100):  # bisection on a monotone function
        mid = (a + b) / 2
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    shift = (a + b) / 2
    ideal = [n * min(max(x + shift, lo_s), hi_s) for n, x in zip(sizes, raw)]
    lo = [math.ceil(lo_s * n - 1e-9) for n in sizes]
    hi = [math.floor(hi_s * n + 1e-9) for n in sizes]
    try:
        counts = bounded_round(ideal, lo, hi, k_total)
    except ConfigError:
        # Tiny layers or lam ~ 0: the interval may hold no whole count; allow the
        # nearest counts (off the interval by less than one weight).
        lo = [min(a, math.floor(x)) for a, x in zip(lo, ideal)]
        hi = [max(b, math.ceil(x)) for b, x in zip(hi, ideal)]
        counts = bounded_round(ideal, lo, hi, k_total)
    return dict(zip(names, counts))


def owl_sparsities(
    scores_per_layer: Mapping[str, Scores],
    numels: Mapping[str, int],
    target: float,
    lam: float = 0.08,
    m: float = 5.0,
    *,
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    """Per-layer sparsity ``k_l / n_l`` from OWL.

    ``scores_per_layer`` maps a layer (or group) name to its Wanda scores, a list of score
    tensors (one group: one mean, one ratio), or an outlier ratio already computed with
    :func:`outlier_ratio`. ``numels`` gives each name's parameter count. The
    parameter-weighted mean of the result is ``floor(target * N + 0.5) / N``.
    """
    counts = owl_counts(scores_per_layer, numels, target, lam, m, max_sparsity=max_sparsity)
    return {name: k / int(numels[name]) for name, k in counts.items()}


@register_allocation
class OWL(Allocation):
    """OWL as an allocation: outlier ratios of Wanda scores per group (one group per
    transformer block when the driver gives ``groups``, else per layer), block counts by
    :func:`owl_counts`, each block's exact count split over its layers by size (largest
    remainder), so the total is exact. Needs ``input_sq_norm`` of each layer's inputs on
    the dense model (the driver's statistics pass)."""

    name = "owl"
    requires = ("input_sq_norm",)

    @dataclass(frozen=True)
    class Options:
        owl_m: float = 5.0  # outlier: score above m times the group's mean
        owl_lambda: float = 0.08  # sparsities spread over [target - lambda, target + lambda]

        def check(self):
            if self.owl_m <= 0 or self.owl_lambda < 0:
                raise ConfigError(f"owl: need owl_m > 0 and owl_lambda >= 0, got {self.owl_m}, {self.owl_lambda}")

    def __call__(self, targets, sparsity, *, stats, groups, max_sparsity, **_):
        by_name = {t.name: t for t in targets}
        groups = [list(g) for g in groups] if groups else [[t.name] for t in targets]
        ratios, numels = {}, {}
        for i, names in enumerate(groups):
            scores = [wanda_scores(by_name[n].param.detach(), stats[n]["input_sq_norm"]) for n in names]
            ratios[str(i)] = outlier_ratio(scores, m=self.options.owl_m)
            numels[str(i)] = sum(by_name[n].param.numel() for n in names)
        counts = owl_counts(ratios, numels, sparsity, lam=self.options.owl_lambda, max_sparsity=max_sparsity)
        log.info("OWL group sparsities: %s",
                 ", ".join(f"{counts[str(i)] / numels[str(i)]:.3f}" for i in range(len(groups))))
        out: dict[str, float] = {}
        for i, names in enumerate(groups):
            sizes = [by_name[n].param.numel() for n in names]
            share = counts[str(i)] / numels[str(i)]
            split = bounded_round([share * n for n in sizes], [0] * len(sizes), sizes, counts[str(i)])
            out.update({n: k / size for n, k, size in zip(names, split, sizes)})
        return out
