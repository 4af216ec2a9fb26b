"""DSnoT (Zhang et al. 2023, "Dynamic Sparse No Training"): training-free mask refinement.

Given a layer's weights, a keep-mask from any method and per-input-channel statistics
(mean, variance, squared norm), DSnoT swaps pruned and kept weights inside each output row
to shrink the row's *expected* reconstruction error, without changing any weight value
and without changing how many weights a row (or an N:M group) keeps.

For row ``i`` with contribution ``c_j = W_ij * E[x_j]`` the expected error of the sparse
row is ``e = E[(W - W') x] = sum over pruned j of c_j``. Each cycle, per row:

* grow: among the initially pruned weights whose contribution has the sign of ``e``,
  revive the one with the largest ``|c_j| / Var(x_j)^p`` (a large, stable reduction);
  growing removes ``c_j`` from ``e``;
* prune: among the initially kept weights whose contribution has the opposite sign
  (removing them also moves ``e`` towards 0), drop the one with the smallest Wanda
  importance ``|W_ij| * ||X_j||``; pruning adds ``c_j`` to ``e``.
  For N:M the pruned weight must sit in the grown weight's group of M (lowest Wanda
  importance there, preferring the opposite sign), so every group keeps N;
* the swap is accepted only if ``e`` keeps its sign and ``|e|`` strictly shrinks (no
  overshoot past 0). A row stops when ``|e| <= threshold``, when candidates run out, or
  after ``max_cycles``.

Each weight moves at most once (candidates come from the initial mask), which keeps the
cost linear and rules out oscillation. One deviation from the reference code: there a
rejected swap stops the row for good; here it only discards the candidate that caused it
(the prune candidate if it alone overshoots, else the grow candidate) and the row goes
on, so a row can only improve further.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..criteria import Refiner, register_refiner
from ..errors import ConfigError, TargetError
from ..patterns import NM, Pattern, Unstructured, parse_pattern, reduction_view

__all__ = ["dsnot_refine", "expected_row_error", "DSnoT"]


def _vec(t, cols: int, name: str, device, dtype) -> torch.Tensor:
    v = torch.as_tensor(t).detach().reshape(-1)
    if v.numel() != cols:
        raise TargetError(f"dsnot: {name} has {v.numel()} entries, the weight {cols} columns")
    v = v.to(device=device, dtype=dtype)
    if not torch.isfinite(v).all():
        raise TargetError(f"dsnot: {name} contains NaN or inf")
    return v


def expected_row_error(weight: torch.Tensor, keep_mask: torch.Tensor, input_mean) -> torch.Tensor:
    """``E[(W - W*mask) x]`` per output row: the sum of ``W_ij * E[x_j]`` over pruned j."""
    w = reduction_view(weight.detach())
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    mu = _vec(input_mean, w.shape[1], "input_mean", w.device, dtype)
    pruned = ~reduction_view(keep_mask).to(device=w.device, dtype=torch.bool)
    return (w.to(dtype) * mu[None, :] * pruned).sum(dim=1)


def dsnot_refine(
    weight: torch.Tensor,
    keep_mask: torch.Tensor,
    input_mean: torch.Tensor,
    input_var: torch.Tensor,
    input_sq_norm: torch.Tensor,
    *,
    pattern: str | Pattern = "unstructured",
    max_cycles: int = 50,
    threshold: float = 0.1,
    var_power: float = 1.0,
    layer: str = "",
) -> tuple[torch.Tensor, dict]:
    """Refine ``keep_mask`` for ``weight``; returns ``(new_keep_mask, info)``.

    Args:
        weight: the values the mask applies to (dense weights for a Wanda or magnitude
            mask); never modified.
        keep_mask: boolean, True = kept; never modified.
        input_mean, input_var, input_sq_norm: per input column, e.g. from
            :class:`~sparsecraft.oneshot.stats.InputNormAccumulator`.
        pattern: ``"unstructured"`` (swaps anywhere in the row) or ``"N:M"`` (swaps inside
            one group); the mask must already satisfy N:M.
        max_cycles: at most this many swap attempts per row.
        threshold: a row stops once ``|E[error]| <= threshold`` (absolute, in output units;
            the reference uses 0.1).
        var_power: exponent ``p`` of the variance in the growing criterion (0 ignores it).

    ``info``: ``cycles``, ``swaps`` (total), ``row_swaps`` (tensor), and the mean over rows
    of ``|E[error]|`` before and after (``expected_error_before`` / ``_after``).
    """
    pattern = parse_pattern(pattern)
    if not isinstance(pattern, (Unstructured, NM)):
        raise ConfigError(f"layer '{layer}': DSnoT supports unstructured and N:M, not {pattern}")
    if max_cycles < 0 or threshold < 0:
        raise ConfigError("dsnot: max_cycles and threshold must be >= 0")
    if tuple(keep_mask.shape) != tuple(weight.shape):
        raise ConfigError(
            f"layer '{layer}': keep_mask shape {tuple(keep_mask.shape)} != weight shape "
            f"{tuple(weight.shape)}"
        )
    w = reduction_view(weight.detach())
    rows, cols = w.shape
    dev = w.device
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.to(dtype)
    mu = _vec(input_mean, cols, "input_mean", dev, dtype)
    var = _vec(input_var, cols, "input_var", dev, dtype).clamp_min(torch.finfo(dtype).tiny)
    sq = _vec(input_sq_norm, cols, "input_sq_norm", dev, dtype).clamp_min(0)
    keep = reduction_view(keep_mask).to(device=dev, dtype=torch.bool).clone()
    nm = pattern if isinstance(pattern, NM) else None
    if nm is not None and not nm.is_valid(keep):
        raise ConfigError(f"layer '{layer}': the keep-mask is not a valid {nm} mask")

    c = w * mu[None, :]
    imp = w.abs() * sq.sqrt()[None, :]
    e = (c * ~keep).sum(dim=1)
    e_before = e.abs().mean().item() if rows else 0.0
    sign = torch.sign(e)[:, None]
    inf = torch.tensor(torch.inf, dtype=dtype, device=dev)
    ar = torch.arange(rows, device=dev)

    # Grow candidates, best first: pruned, contribution of the error's sign.
    grow_ok = ~keep & (sign * c > 0)
    grow_key = torch.where(grow_ok, -(sign * c) / var.pow(var_power)[None, :], inf)
    grow_order = torch.sort(grow_key, dim=1, stable=True).indices
    n_grow = grow_ok.sum(dim=1)
    pg = torch.zeros(rows, dtype=torch.long, device=dev)
    if nm is None:
        # Prune candidates, least important first: kept, contribution of opposite sign.
        prune_ok = keep & (sign * c < 0)
        prune_order = torch.sort(torch.where(prune_ok, imp, inf), dim=1, stable=True).indices
        n_prune = prune_ok.sum(dim=1)
        pp = torch.zeros(rows, dtype=torch.long, device=dev)
    else:
        movable = keep.clone()  # initially kept and not yet pruned: may be pruned
        offs = torch.arange(nm.m, device=dev)

    active = (n_grow > 0) & (e.abs() > threshold)
    if nm is None:
        active &= n_prune > 0
    row_swaps = torch.zeros(rows, dtype=torch.long, device=dev)
    cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        jg = grow_order.gather(1, pg.clamp(max=cols - 1)[:, None]).squeeze(1)
        cg = c[ar, jg]
        if nm is None:
            jp = prune_order.gather(1, pp.clamp(max=cols - 1)[:, None]).squeeze(1)
            has_p = torch.ones_like(active)
        else:
            cols_g = (jg - jg % nm.m)[:, None] + offs[None, :]
            ok_g = movable.gather(1, cols_g)
            imp_g = imp.gather(1, cols_g)
            right = ok_g & (sign * c.gather(1, cols_g) < 0)
            key = torch.where(right, imp_g, torch.where(ok_g, imp_g + imp_g.max() + 1, inf))
            jp = cols_g.gather(1, key.argmin(dim=1, keepdim=True)).squeeze(1)
            has_p = ok_g.any(dim=1)
        cp = c[ar, jp]
        e_after = e - cg + cp
        s = sign.squeeze(1)
        accept = active & has_p & (s * e_after >= 0) & (e_after.abs() < e.abs())
        r = ar[accept]
        keep[r, jg[accept]] = True
        keep[r, jp[accept]] = False
        e = torch.where(accept, e_after, e)
        row_swaps += accept
        if nm is None:
            # A prune candidate that alone overshoots can never be used (|e| only
            # shrinks); otherwise the grow candidate was too large for this pair.
            bad_p = active & ~accept & (cp.abs() >= e.abs())
            pp += accept | bad_p
            pg += accept | (active & ~accept & ~bad_p)
            active &= (pp < n_prune)
        else:
            movable[r, jp[accept]] = False
            pg += active
        active &= (pg < n_grow) & (e.abs() > threshold)

    info = {
        "cycles": cycles,
        "swaps": int(row_swaps.sum()),
        "row_swaps": row_swaps,
        "expected_error_before": e_before,
        "expected_error_after": e.abs().mean().item() if rows else 0.0,
    }
    return keep.reshape(keep_mask.shape), info


@register_refiner
class DSnoT(Refiner):
    """The ``dsnot`` refinement stage: :func:`dsnot_refine` on the layer's dense weights
    and input statistics; a weight-updating solver then reconstructs for the new mask."""

    name = "dsnot"
    requires = ("input_norms",)
    patterns = (Unstructured, NM)

    @dataclass(frozen=True)
    class Options:
        max_cycles: int = 50
        threshold: float = 0.1
        var_power: float = 1.0

        def check(self):
            if self.max_cycles < 0 or self.threshold < 0:
                raise ConfigError("dsnot: max_cycles and threshold must be >= 0")

    def refine(self, ctx, keep, pattern):
        norms = ctx.stats["input_norms"]
        o = self.options
        keep, _ = dsnot_refine(
            ctx.param.detach(), keep, norms.mean, norms.var, norms.sq_norm, pattern=pattern,
            max_cycles=o.max_cycles, threshold=o.threshold, var_power=o.var_power, layer=ctx.name,
        )
        return keep
