"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

Pure tensor math: the driver collects ``||X_j||^2`` per input channel
(:class:`~sparsecraft.oneshot.stats.InputNormAccumulator`) and calls :func:`wanda_mask`.

Comparison group. Unstructured Wanda compares weights within one output row, not across
the layer (the paper shows the per-row group matters for LLMs). N:M compares within each
group of M along the reduction dim, via :class:`~sparsecraft.patterns.NM`. Other patterns
(block, rows) use the pattern's own, layer-wide group.

Rounding. The layer prunes exactly ``k = floor(s * rows * cols + 0.5)`` weights (the
package's rule). Each row prunes ``k // rows`` and the first ``k % rows`` rows one more,
so per-row counts differ by at most one and the layer total is exact. When ``s * cols``
is a whole number (e.g. 50% of an even width) every row prunes exactly ``s * cols``.
Ties inside a row: the lower column index is pruned first (stable sort).
"""

from __future__ import annotations

import torch

from ..criteria import Criterion, LayerResult, Solver, register_criterion, register_solver
from ..errors import ConfigError, TargetError
from ..patterns import Pattern, Unstructured, num_to_prune, parse_pattern, reduction_view

__all__ = ["wanda_scores", "wanda_mask", "row_prune_counts", "rowwise_keep_mask", "Wanda", "WandaSolver"]


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sq_norm)`` broadcast over output rows; the weight's shape, float32/64.

    ``input_sq_norm`` has one entry per column of the weight's reduction view
    (``in_features`` for a Linear).
    """
    view = reduction_view(weight.detach())
    norms = torch.as_tensor(input_sq_norm).detach().reshape(-1)
    if norms.numel() != view.shape[1]:
        raise TargetError(
            f"wanda: input_sq_norm has {norms.numel()} entries but the weight "
            f"{tuple(weight.shape)} has {view.shape[1]} input columns"
        )
    dtype = _float_dtype(weight)
    norms = norms.to(device=view.device, dtype=dtype).clamp_min(0).sqrt()
    return (view.abs().to(dtype) * norms[None, :]).reshape(weight.shape)


def row_prune_counts(
    rows: int, cols: int, sparsity: float | None = None, *, num_pruned: int | None = None,
    device=None,
) -> torch.Tensor:
    """Per-row pruned counts (int64, ``[rows]``) summing to the layer's exact count."""
    total = rows * cols
    if num_pruned is None:
        if sparsity is None:
            raise ConfigError("need a sparsity or num_pruned")
        num_pruned = num_to_prune(float(sparsity), total)
    if not 0 <= num_pruned <= total:
        raise ConfigError(f"num_pruned={num_pruned} outside [0, {total}]")
    q, r = divmod(int(num_pruned), rows)
    counts = torch.full((rows,), q, dtype=torch.long, device=device)
    counts[:r] += 1
    return counts


def rowwise_keep_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask of ``scores.shape`` pruning the ``counts[i]`` lowest scores of row ``i``.

    Rows are the reduction view's rows; ties go to the lower column index.
    """
    view = reduction_view(scores)
    rows, cols = view.shape
    counts = counts.to(device=view.device, dtype=torch.long).reshape(-1)
    if counts.numel() != rows:
        raise ConfigError(f"need {rows} per-row counts, got {counts.numel()}")
    order = torch.sort(view, dim=1, stable=True).indices
    pruned_sorted = torch.arange(cols, device=view.device)[None, :] < counts[:, None]
    keep = torch.empty_like(view, dtype=torch.bool)
    keep.scatter_(1, order, ~pruned_sorted)
    return keep.reshape(scores.shape)


def wanda_mask(
    weight: torch.Tensor,
    input_sq_norm: torch.Tensor,
    pattern: str | Pattern = "unstructured",
    sparsity: float | None = None,
    *,
    num_pruned: int | None = None,
    layer: str = "",
) -> torch.Tensor:
    """Wanda keep-mask (True = stays) of ``weight.shape``.

    Unstructured: per-row groups with the exact layer count (see the module docstring).
    N:M: ``sparsity`` may be left unset. Other patterns: the pattern's own keep_mask.
    """
    pattern = parse_pattern(pattern)
    scores = wanda_scores(weight, input_sq_norm)
    if isinstance(pattern, Unstructured):
        rows, cols = reduction_view(scores).shape
        counts = row_prune_counts(
            rows, cols, sparsity, num_pruned=num_pruned, device=scores.device
        )
        return rowwise_keep_mask(scores, counts)
    return pattern.keep_mask(scores, sparsity, num_pruned=num_pruned, layer=layer)


@register_criterion
class Wanda(Criterion):
    """|W| * ||X_j||_2 per weight; the driver must supply ``stats["input_sq_norm"]``.

    The scores alone with the plain ``Unstructured`` pattern compare across the whole
    layer; use :func:`wanda_mask` for Wanda's per-row comparison.
    """

    name = "wanda"
    requires = ("input_sq_norm",)

    def __call__(self, ctx):
        try:
            norms = ctx.stats["input_sq_norm"]
        except KeyError:
            raise ConfigError(
                f"layer '{ctx.name}': criterion 'wanda' needs stats['input_sq_norm'] "
                f"(calibration inputs); run it through a calibration driver"
            ) from None
        return wanda_scores(ctx.param, norms)


@register_solver
class WandaSolver(Solver):
    """The ``wanda`` method: :func:`wanda_mask` (per-row groups) from the layer's input norms."""

    name = "wanda"
    requires = ("input_sq_norm",)

    def scores(self, ctx):
        return wanda_scores(ctx.param, ctx.stats["input_sq_norm"])

    def solve(self, ctx, pattern, sparsity):
        return LayerResult(wanda_mask(ctx.param.detach(), ctx.stats["input_sq_norm"], pattern, sparsity, layer=ctx.name))
