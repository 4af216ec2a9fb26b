"""FISTA for the Lasso, with the penalty from the universal rule or cross-validation."""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import RecoveryError, RecoveryResult, check_int, check_positive, finish, logger, run_batched, support_of
from .operators import DenseOperator, LinearOperator, prepare


def soft_threshold(v: torch.Tensor, thr) -> torch.Tensor:
    """Soft thresholding, real or complex: shrink the magnitude by ``thr``, keep the phase."""
    mag = v.abs()
    scale = torch.clamp(1.0 - thr / torch.clamp(mag, min=torch.finfo(mag.dtype).tiny), min=0.0)
    return v * scale


def fista_path(op: LinearOperator, y: torch.Tensor, lam: float, *, x0=None, lipschitz=None,
               max_iter: int = 500, tol: float = 1e-6):
    """Pure FISTA iterations for ``min 0.5 ||y - A x||^2 + lam ||x||_1``.

    Returns ``(x, n_iter, converged)``. Uses adaptive restart (O'Donoghue and Candes) when the
    objective's momentum points uphill, which keeps the iteration monotone in practice.
    """
    L = lipschitz if lipschitz is not None else op.norm_estimate() ** 2
    if L <= 0:
        return torch.zeros(op.shape[1], dtype=op.dtype, device=op.device), 0, True
    step = 1.0 / L
    x = x0.clone() if x0 is not None else torch.zeros(op.shape[1], dtype=op.dtype, device=op.device)
    z = x.clone()
    t = 1.0
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is read after the loop)
        grad = op.rmatvec(op.matvec(z) - y)
        x_new = soft_threshold(z - step * grad, lam * step)
        dx = x_new - x
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        # Restart the momentum when the step and the last move disagree.
        if float(torch.real(torch.vdot((z - x_new).reshape(-1), dx.reshape(-1)))) > 0:
            t_new = 1.0
            z = x_new
        else:
            z = x_new + ((t - 1.0) / t_new) * dx
        xn = float(torch.linalg.vector_norm(x_new))
        x, t = x_new, t_new
        if float(torch.linalg.vector_norm(dx)) <= tol * max(xn, 1e-30):
            converged = True
            break
    return x, it, converged


def lambda_max(op: LinearOperator, y: torch.Tensor) -> float:
    """Smallest penalty for which the Lasso solution is zero: ``||A^H y||_inf``."""
    return float(op.rmatvec(y).abs().max())


def universal_lambda(op: LinearOperator, noise_var: float) -> float:
    """The universal rule ``sigma * sqrt(2 log N) * max_j ||a_j||`` (Donoho and Johnstone)."""
    return math.sqrt(noise_var) * math.sqrt(2.0 * math.log(op.shape[1])) * float(op.column_norms().max())


def cv_lambda(op: LinearOperator, y: torch.Tensor, *, n_folds: int = 5, n_lambdas: int = 20,
              eps: float = 1e-3, max_iter: int = 500, tol: float = 1e-6, seed: int = 0):
    """Pick the penalty by ``n_folds``-fold cross-validation over the measurements.

    The grid is ``n_lambdas`` values geometrically spaced from ``lambda_max`` down to
    ``eps * lambda_max``, solved with warm starts. Needs the explicit matrix (row subsets),
    so the operator is densified: memory ``M N``.
    Returns ``(best_lambda, lambdas, mean_validation_error)``.
    """
    A = op.to_dense()
    M = A.shape[0]
    if M < n_folds:
        raise RecoveryError(f"cross-validation needs at least n_folds={n_folds} measurements, got {M}")
    lmax = lambda_max(op, y)
    lams = lmax * np.geomspace(1.0, eps, n_lambdas)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(M, generator=g).to(A.device)
    folds = torch.tensor_split(perm, n_folds)
    err = np.zeros(n_lambdas)
    for f in folds:
        train = torch.ones(M, dtype=torch.bool, device=A.device)
        train[f] = False
        sub = DenseOperator(A[train])
        L = sub.norm_estimate() ** 2
        x = None
        for i, lam in enumerate(lams):
            x, _, _ = fista_path(sub, y[train], float(lam), x0=x, lipschitz=L, max_iter=max_iter, tol=tol)
            err[i] += float(torch.linalg.vector_norm(A[f] @ x - y[f]) ** 2)
    err /= M
    best = float(lams[int(np.argmin(err))])
    logger.debug("cv_lambda: best lambda %.3g (lambda_max %.3g)", best, lmax)
    return best, lams, err


def fista(A, y, lam: float | str = "cv", *, noise_var: float | None = None, max_iter: int = 1000,
          tol: float = 1e-6, n_folds: int = 5, debias: bool = False) -> RecoveryResult:
    """Lasso by FISTA: ``min_x 0.5 ||y - A x||_2^2 + lam ||x||_1`` (real or complex).

    Args:
        A: matrix or operator.
        y: ``(M,)`` or ``(M, B)``.
        lam: the penalty, or a rule: ``"universal"`` (``sigma sqrt(2 log N) max_j ||a_j||``,
            needs ``noise_var``) or ``"cv"`` (``n_folds``-fold cross-validation over a
            geometric grid below ``||A^H y||_inf``; densifies the operator).
        noise_var: noise variance for the universal rule.
        max_iter, tol: stop when the relative change of ``x`` is below ``tol``.
        debias: refit the selected support by least squares (removes the Lasso shrinkage).

    Returns:
        :class:`RecoveryResult`; ``info`` has ``lam``.
    """
    op, yt, as_numpy = prepare(A, y)
    check_int(max_iter, "max_iter")
    check_positive(tol, "tol", allow_zero=True)
    if isinstance(lam, str):
        if lam not in ("universal", "cv"):
            raise RecoveryError(f"lam must be a positive number, 'universal' or 'cv', got {lam!r}")
        if lam == "universal":
            if noise_var is None:
                raise RecoveryError("lam='universal' needs noise_var; give it or use lam='cv'")
            check_positive(noise_var, "noise_var", allow_zero=True)
    else:
        check_positive(lam, "lam", allow_zero=True)
    L = op.norm_estimate() ** 2

    def solve_one(yv):
        if lam == "universal":
            lam_v = universal_lambda(op, float(noise_var))
        elif lam == "cv":
            lam_v, _, _ = cv_lambda(op, yv, n_folds=n_folds)
        else:
            lam_v = float(lam)
        x, it, conv = fista_path(op, yv, lam_v, lipschitz=L, max_iter=max_iter, tol=tol)
        supp = support_of(x)
        if debias and supp.numel():
            cols = op.columns(supp)
            coef = torch.linalg.lstsq(cols, yv.unsqueeze(-1)).solution[:, 0]
            x = torch.zeros_like(x)
            x[supp] = coef
        if not conv:
            logger.info("fista: not converged after %d iterations (lam=%.3g)", it, lam_v)
        return RecoveryResult(x=x, support=supp.cpu(), n_iter=it, converged=conv, info={"lam": lam_v})

    return finish(run_batched(solve_one, yt), as_numpy)
