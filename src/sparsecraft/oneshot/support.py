"""Exact least-squares weights on a fixed support: the back-solve shared by the layer solvers.

Pure tensor math. Given a keep-mask, every output row is an independent problem
``min (w - w') H (w - w')^T`` over its kept entries; :func:`solve_on_support` solves all rows at
once by batched preconditioned conjugate gradients, and :func:`refit_on_support` wraps it with
the preparation a layer's Hessian needs (dead inputs, damping, unit-diagonal scaling).
"""

from __future__ import annotations

import torch

from ..patterns import reduction_view

__all__ = ["solve_on_support", "refit_on_support"]

#: elements of one row slice in :func:`refit_on_support` (16 MB per work tensor in float32)
ROW_SLICE_ELEMENTS = 1 << 22


def solve_on_support(
    weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, *,
    x0: torch.Tensor | None = None, max_iter: int = 500, tol: float = 1e-10,
) -> tuple[torch.Tensor, dict]:
    """Per row, ``argmin (w - w') H (w - w')^T`` with ``w'`` zero where ``keep`` is False.

    ``weight`` ``[rows, cols]`` and ``hessian`` ``[cols, cols]`` (positive definite; damp it
    first if needed) in the compute dtype. Batched preconditioned conjugate gradients from
    ``x0`` (default: the masked weight) until every row's residual is below ``tol`` times its
    right-hand side, or ``max_iter``. Returns ``(w', info)`` with ``iterations`` and the
    largest relative ``residual`` left.
    """
    m = keep.to(weight.dtype)
    b = (weight @ hessian) * m  # the normal equations restricted to the support
    x = (weight * m) if x0 is None else x0 * m
    r = b - (x @ hessian) * m
    precond = 1.0 / hessian.diagonal().clamp_min(torch.finfo(weight.dtype).tiny)
    z = r * precond
    p = z.clone()
    rz = (r * z).sum(dim=1)
    b_norm = b.norm(dim=1).clamp_min(torch.finfo(weight.dtype).tiny)
    rel = r.norm(dim=1) / b_norm
    it = 0
    # in place where it can be: at the sizes of a transformer's layers each pass over a
    # [rows, cols] tensor costs about what the product with the Hessian does
    z = torch.empty_like(r)
    while it < max_iter and bool((rel > tol).any()):
        hp = torch.mm(p, hessian).mul_(m)
        php = torch.linalg.vecdot(p, hp)
        active = (rel > tol) & (php > 0)
        alpha = torch.where(active, rz / torch.where(php > 0, php, 1.0), 0.0)[:, None]
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, hp, value=-1.0)
        torch.mul(r, precond, out=z)
        rz_new = torch.linalg.vecdot(r, z)
        beta = torch.where(active, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)[:, None]
        p.mul_(beta).add_(z)
        rz = rz_new
        rel = torch.linalg.vector_norm(r, dim=1) / b_norm
        it += 1
    return x * m, {"iterations": it, "residual": float(rel.max()) if rel.numel() else 0.0}


def refit_on_support(
    weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, *, percdamp: float,
    x0: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, tol: float | None = None,
    max_iter: int = 500,
) -> tuple[torch.Tensor, dict]:
    """The kept weights that minimise the layer's output error on the support ``keep``.

    ``weight`` (the dense layer, any shape whose reduction view is ``[rows, cols]``) and its
    ``hessian`` ``[cols, cols]`` (proportional to ``X^T X``). Inputs that never fire get a unit
    diagonal and zero weights (their weights do nothing); the Hessian is damped by ``percdamp``
    times its mean diagonal, as the sweep solvers damp it, and scaled to a unit diagonal, which
    is the Jacobi preconditioning and keeps float32 well conditioned. ``x0``: a starting point
    (e.g. a solver's weights on this support). ``tol`` defaults to 1e-5 in float32, 1e-10 in
    float64. One copy of the Hessian in ``dtype`` is made (a 5632-wide layer's is 127 MB in
    float32), scaled in place.

    Returns the weights in ``weight``'s shape and dtype (exact zeros off the support) and the
    conjugate-gradient info (``iterations`` and ``residual``: the largest over the row slices)
    plus ``row_losses``: per row ``1/2 (w - w') H (w - w')^T`` for the
    damped ``H``, ``w`` with dead inputs zeroed (SparseGPT's loss), in ``dtype``.
    """
    w = reduction_view(weight.detach()).to(dtype, copy=True)
    h = hessian.detach().to(device=w.device, dtype=dtype, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0  # inputs that never fire: their weights do nothing, zero is the tidy choice
    h.diagonal().add_(percdamp * float(h.diagonal().to(torch.float64).mean()))
    c = h.diagonal().sqrt()  # a new tensor: the scaling below does not change it
    h.div_(c[:, None]).div_(c[None, :])
    w.mul_(c)
    start = None if x0 is None else reduction_view(x0.detach()).to(dtype) * c
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
    mask = reduction_view(keep).to(device=w.device, dtype=torch.bool)
    # rows are independent problems: solving them a slice at a time keeps the conjugate
    # gradients' half-dozen work tensors small on wide layers, at the same cost
    step = max(1, ROW_SLICE_ELEMENTS // max(1, w.shape[1]))
    solved = torch.empty_like(w)
    losses = torch.empty(w.shape[0], dtype=dtype, device=w.device)
    info = {"iterations": 0, "residual": 0.0}
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        part, cg = solve_on_support(w[rows], h, mask[rows], x0=None if start is None else start[rows],
                                    max_iter=max_iter, tol=tol)
        solved[rows] = part
        # the loss is the same in the scaled variables: (w c - w' c) H~ (w c - w' c)^T, H~ = H / c c^T
        diff = w[rows].sub_(part)
        losses[rows] = (diff @ h).mul_(diff).sum(dim=1) / 2
        info = {"iterations": max(info["iterations"], cg["iterations"]),
                "residual": max(info["residual"], cg["residual"])}
    info["row_losses"] = losses
    return (solved.div_(c)).to(weight.dtype).reshape(weight.shape), info
