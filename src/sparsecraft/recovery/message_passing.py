"""Approximate message passing (AMP) for the Lasso-type soft-threshold denoiser.

AMP (Donoho, Maleki and Montanari, 2009) is fast and accurate for matrices with i.i.d.
zero-mean entries of variance ``1/M`` (unit-norm columns), and diverges for many others
(ill-conditioned, correlated columns). This implementation damps its updates and watches the
residual: when it blows up, it raises :class:`DivergenceError` instead of returning an
iterate that means nothing.
"""

from __future__ import annotations

import math

import torch

from ._common import (
    DivergenceError,
    RecoveryError,
    RecoveryResult,
    check_int,
    check_positive,
    finish,
    logger,
    run_batched,
    support_of,
)
from .convex import soft_threshold
from .operators import prepare


def amp_step(op, y, x, z, alpha: float, damping: float):
    """One damped AMP iteration (pure): returns ``(x_new, z_new, threshold)``.

    ``r = x + A^H z``; ``theta = alpha * ||z|| / sqrt(M)`` (the residual estimates the
    effective noise level); ``x_new = eta(r; theta)``; the Onsager term is
    ``(N/M) <eta'(r)> z`` with ``eta'`` = 1 on kept real entries and
    ``1 - theta / (2|r|)`` on kept complex entries.
    """
    M, N = op.shape
    r = x + op.rmatvec(z)
    theta = alpha * float(torch.linalg.vector_norm(z)) / math.sqrt(M)
    x_new = soft_threshold(r, theta)
    kept = r.abs() > theta
    if r.is_complex():
        div = torch.where(kept, 1.0 - theta / (2.0 * r.abs().clamp_min(1e-300)), torch.zeros_like(r.real)).sum()
    else:
        div = kept.sum().to(r.dtype)
    onsager = float(div) / M
    z_new = y - op.matvec(x_new) + onsager * z
    if damping < 1.0:
        x_new = damping * x_new + (1.0 - damping) * x
        z_new = damping * z_new + (1.0 - damping) * z
    return x_new, z_new, theta


def amp(A, y, *, alpha: float = 1.5, damping: float = 1.0, max_iter: int = 500, tol: float = 1e-6,
        divergence_factor: float = 10.0, on_divergence: str = "raise") -> RecoveryResult:
    """AMP with soft thresholding, real or complex.

    Args:
        A: matrix or operator, ideally with i.i.d. entries of variance ``1/M``.
        y: ``(M,)`` or ``(M, B)``.
        alpha: threshold multiplier (threshold = ``alpha * ||z|| / sqrt(M)``).
        damping: in ``(0, 1]``; 1 is undamped AMP, smaller values average with the last iterate.
        max_iter, tol: stop when ``||x_new - x|| <= tol ||x_new||``.
        divergence_factor: declare divergence when the residual norm exceeds this multiple of
            the smallest residual norm seen, or any value stops being finite.
        on_divergence: ``"raise"`` (:class:`DivergenceError`) or ``"return"`` (the result has
            ``converged=False`` and ``info["diverged"] = True``; ``x`` is the iterate with the
            smallest residual, not the diverged one).
    """
    op, yt, as_numpy = prepare(A, y)
    check_positive(alpha, "alpha")
    check_positive(damping, "damping")
    if damping > 1:
        raise RecoveryError(f"damping must be in (0, 1], got {damping}")
    check_int(max_iter, "max_iter")
    check_positive(tol, "tol", allow_zero=True)
    check_positive(divergence_factor, "divergence_factor")
    if divergence_factor <= 1:
        raise RecoveryError(f"divergence_factor must be > 1, got {divergence_factor}")
    if on_divergence not in ("raise", "return"):
        raise RecoveryError(f"on_divergence must be 'raise' or 'return', got {on_divergence!r}")

    def solve_one(yv):
        x = torch.zeros(op.shape[1], dtype=op.dtype, device=op.device)
        z = yv.clone()
        best_res = float(torch.linalg.vector_norm(z))
        best_x = x.clone()
        history = [best_res]
        converged = False
        diverged = False
        it = 0
        for it in range(1, max_iter + 1):
            x_new, z, theta = amp_step(op, yv, x, z, alpha, damping)
            res = float(torch.linalg.vector_norm(yv - op.matvec(x_new)))
            history.append(res)
            if not math.isfinite(res) or not bool(torch.isfinite(x_new).all()) or \
                    res > divergence_factor * max(best_res, 1e-300):
                diverged = True
                msg = (f"AMP diverged at iteration {it}: residual norm {res:.3g} vs best "
                       f"{best_res:.3g}; A is probably far from i.i.d. Gaussian. Try damping < 1 "
                       f"or another solver (fista, sbl)")
                if on_divergence == "raise":
                    raise DivergenceError(msg)
                logger.warning(msg)
                break
            if res < best_res:
                best_res, best_x = res, x_new
            dx = float(torch.linalg.vector_norm(x_new - x))
            x = x_new
            if dx <= tol * max(float(torch.linalg.vector_norm(x)), 1e-300):
                converged = True
                break
        out = best_x if diverged else x
        return RecoveryResult(x=out, support=support_of(out).cpu(), n_iter=it, converged=converged,
                              info={"residual_history": history, "diverged": diverged})

    return finish(run_batched(solve_one, yt), as_numpy)
