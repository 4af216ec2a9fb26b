"""Layer-wise reconstruction error ``||W X - W' X|| / ||W X||`` (Frobenius norms).

From the inputs ``x`` (``[..., in]``, rows are samples) or from a Gram/Hessian matrix
``H`` proportional to ``X^T X`` (``2/n X^T X`` from
:class:`~sparsecraft.oneshot.stats.HessianAccumulator` works: the scale cancels), via
``||D X^T||^2 = tr(D H D^T)`` up to that scale. Computed in float64.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, TargetError
from ..patterns import reduction_view

__all__ = ["relative_reconstruction_error"]


def relative_reconstruction_error(
    w_dense: torch.Tensor,
    w_sparse: torch.Tensor,
    x: torch.Tensor | None = None,
    *,
    hessian: torch.Tensor | None = None,
    per_row: bool = False,
) -> float | torch.Tensor:
    """``||(W - W') X^T|| / ||W X^T||`` over the layer (float), or per output row.

    Give exactly one of ``x`` (inputs, ``[..., in]``) or ``hessian`` (``[in, in]``).
    A zero denominator gives 0 if the numerator is 0 too, else inf.
    """
    if (x is None) == (hessian is None):
        raise ConfigError("give exactly one of x or hessian")
    wd = reduction_view(w_dense.detach()).double()
    ws = reduction_view(w_sparse.detach()).to(device=wd.device, dtype=torch.float64)
    if wd.shape != ws.shape:
        raise TargetError(f"weight shapes differ: {tuple(wd.shape)} vs {tuple(ws.shape)}")
    diff = wd - ws
    cols = wd.shape[1]
    if x is not None:
        if x.shape[-1] != cols:
            raise TargetError(f"x has {x.shape[-1]} features, the weight {cols} columns")
        xs = x.detach().reshape(-1, cols).to(device=wd.device, dtype=torch.float64)
        num = (diff @ xs.t()).pow(2).sum(dim=1)
        den = (wd @ xs.t()).pow(2).sum(dim=1)
    else:
        if tuple(hessian.shape) != (cols, cols):
            raise TargetError(f"hessian shape {tuple(hessian.shape)} != ({cols}, {cols})")
        h = hessian.detach().to(device=wd.device, dtype=torch.float64)
        # Rounding can make a tiny quadratic form negative; it is a squared norm.
        num = ((diff @ h) * diff).sum(dim=1).clamp_min(0)
        den = ((wd @ h) * wd).sum(dim=1).clamp_min(0)
    if per_row:
        out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, torch.inf, 0.0))
        return out.sqrt()
    n, d = float(num.sum()), float(den.sum())
    if d == 0:
        return 0.0 if n == 0 else float("inf")
    return (n / d) ** 0.5
