"""Sparse Bayesian learning (SBL) by expectation-maximisation, in torch, and its entry point.

:func:`sbl` runs Tipping and Faul's fast marginal-likelihood maximisation by default
(:mod:`.sbl_fast`, numpy); ``update="em"`` / ``"mackay"`` run the EM here, which the block
variants :func:`block_sbl` and :func:`pc_sbl` also use.

Model: ``y = A x + n``, ``n ~ N(0, sigma2 I)``, prior ``x_j ~ N(0, gamma_j)`` (complex normal
for complex data). EM alternates the Gaussian posterior of ``x`` (E-step) with closed-form
updates of ``gamma`` and, if unknown, ``sigma2`` (M-step); each EM step cannot increase the
cost ``log|C| + y^H C^{-1} y`` with ``C = sigma2 I + A Gamma A^H``.

The E-step uses the ``M x M`` form (Woodbury) while more hyperparameters are active than there
are measurements, and the ``N_active x N_active`` form after pruning has made that smaller.
Pruned columns leave the solver's working set for good. On the CPU, real float32/float64
Woodbury steps call BLAS/LAPACK through scipy when it is installed; other dtypes and devices
use torch (the same maths).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ._common import (
    RecoveryError,
    RecoveryResult,
    check_int,
    check_positive,
    finish,
    logger,
    noise_floor,
    real_dtype,
    run_batched,
)
from .operators import prepare
from .sbl_fast import fast_sbl_loop


def sbl_posterior(A: torch.Tensor, gamma: torch.Tensor, noise_var: float, y: torch.Tensor) -> dict:
    """Exact Gaussian posterior of ``x`` given ``y`` for ``x ~ N(0, diag(gamma))`` (pure).

    Args:
        A: ``M x n`` matrix (the active columns), real or complex.
        gamma: length ``n`` positive prior variances.
        noise_var: ``sigma2 > 0``.
        y: length ``M``.

    Returns a dict with ``mu`` (posterior mean), ``sigma_diag`` (posterior variances),
    ``cost`` (``log|C| + y^H C^{-1} y``), ``resid_sq`` (``||y - A mu||^2``) and ``dof``
    (``sum_j (1 - Sigma_jj / gamma_j)``, used by the noise update).
    """
    M, n = A.shape
    rdt = real_dtype(A.dtype)
    g = gamma.to(rdt)
    if n == 0:
        yy = float(torch.linalg.vector_norm(y) ** 2)
        return {"mu": torch.zeros(0, dtype=A.dtype, device=A.device),
                "sigma_diag": torch.zeros(0, dtype=rdt, device=A.device),
                "cost": M * math.log(noise_var) + yy / noise_var, "resid_sq": yy, "dof": 0.0}
    if M <= n and _cpu_real(A, g, y):
        mu, sigma_diag, logdet, quad = _woodbury_lapack(A, g, noise_var, y)
    elif M <= n:
        # Woodbury: work with the M x M marginal covariance C.
        C = (A * g) @ A.mH
        C.diagonal().add_(noise_var)
        L = torch.linalg.cholesky(C)
        # Invert the M x M factor once (M^3/3) and apply it by a GEMM: faster than a
        # triangular solve against the M x n matrix.
        Li = torch.linalg.solve_triangular(L, torch.eye(M, dtype=A.dtype, device=A.device), upper=False)
        LiA = Li @ A
        Liy = Li @ y
        mu = g * (LiA.mH @ Liy)
        LiA2 = (LiA * LiA).sum(0) if not LiA.is_complex() else LiA.abs().pow(2).sum(0)
        sigma_diag = torch.clamp(g - g * g * LiA2, min=0.0)
        logdet = 2.0 * float(torch.log(L.diagonal().real).sum())
        quad = float(torch.linalg.vector_norm(Liy) ** 2)
    else:
        # Small active set: Sigma = G^1/2 (I + G^1/2 A^H A G^1/2 / s2)^-1 G^1/2, well scaled.
        sg = g.sqrt()
        As = A * sg
        B = (As.mH @ As) / noise_var
        B.diagonal().add_(1.0)
        L = torch.linalg.cholesky(B)
        Li = torch.linalg.solve_triangular(L, torch.eye(n, dtype=A.dtype, device=A.device), upper=False)
        Binv = Li.mH @ Li
        mu = sg * (Binv @ (As.mH @ y)) / noise_var
        sigma_diag = torch.clamp(g * Binv.diagonal().real, min=0.0)
        logdet = M * math.log(noise_var) + 2.0 * float(torch.log(L.diagonal().real).sum())
        quad = None
    r = y - A @ mu
    resid_sq = float(torch.linalg.vector_norm(r) ** 2)
    if quad is None:
        # C^{-1} y = (y - A mu) / sigma2.
        quad = float(torch.real(torch.vdot(y, r))) / noise_var
    safe = torch.where(g > 0, g, torch.ones_like(g))
    dof = float(torch.where(g > 0, 1.0 - sigma_diag / safe, torch.zeros_like(g)).sum())
    return {"mu": mu, "sigma_diag": sigma_diag, "cost": logdet + quad, "resid_sq": resid_sq, "dof": dof}


def _lapack_funcs():
    """scipy's BLAS/LAPACK wrappers (the optional ``recovery`` extra), or None without scipy."""
    global _LAPACK
    if _LAPACK is None:
        try:
            from scipy.linalg import blas, lapack
            _LAPACK = {torch.float64: (blas.dsyrk, lapack.dpotrf, lapack.dtrtri, blas.dtrmm),
                       torch.float32: (blas.ssyrk, lapack.spotrf, lapack.strtri, blas.strmm)}
        except ImportError:  # pragma: no cover - scipy is in the recovery extra
            _LAPACK = {}
    return _LAPACK


_LAPACK = None


def _cpu_real(A, g, y) -> bool:
    return (A.device.type == "cpu" and A.dtype in (torch.float64, torch.float32) and y.dtype == A.dtype
            and g.dtype == A.dtype and not A.requires_grad and A.dtype in _lapack_funcs())


def _woodbury_lapack(A: torch.Tensor, g: torch.Tensor, noise_var: float, y: torch.Tensor):
    """The Woodbury E-step for real CPU tensors through BLAS/LAPACK directly (same maths).

    ``C = A G A^T + s2 I`` by a rank-n update (SYRK, half a GEMM's flops), its Cholesky
    factor L (POTRF), ``L^-1`` (TRTRI, M^3/3) and ``L^-1 A`` by a triangular multiply (TRMM),
    faster than torch's checked wrappers for the same steps. Returns ``mu``, ``sigma_diag``,
    ``log|C|`` and ``y^T C^-1 y``.
    """
    syrk, potrf, trtri, trmm = _lapack_funcs()[A.dtype]
    An = A.numpy()                       # M x n (a view of the transposed working set: no copy)
    gn = g.numpy()
    yn = y.numpy()
    # SYRK computes a a^T for an M x n Fortran-ordered a: scale the columns by sqrt(gamma).
    As = np.asfortranarray(An * np.sqrt(gn))
    C = syrk(1.0, As, lower=1)
    C.flat[::C.shape[0] + 1] += noise_var
    L, info = potrf(C, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise RecoveryError(f"sbl: the marginal covariance is not positive definite (LAPACK info {info})")
    logdet = 2.0 * float(np.log(np.diagonal(L)).sum())
    Li, info = trtri(L, lower=1, overwrite_c=1)
    if info != 0:
        raise RecoveryError(f"sbl: singular Cholesky factor (LAPACK info {info})")
    LiA = trmm(1.0, Li, np.asfortranarray(An), lower=1)
    Liy = Li @ yn
    mu = gn * (LiA.T @ Liy)
    sigma_diag = np.maximum(gn - gn * gn * np.einsum("ij,ij->j", LiA, LiA), 0.0)
    quad = float(Liy @ Liy)
    return torch.from_numpy(mu), torch.from_numpy(sigma_diag), logdet, quad


def em_noise_update(resid_sq: float, dof: float, noise_var: float, M: int) -> float:
    """EM update of the noise variance: ``(||y - A mu||^2 + sigma2 sum_j (1 - Sigma_jj/gamma_j)) / M``."""
    return (resid_sq + noise_var * dof) / M


def _check_common(noise_var, max_iter, tol, prune):
    check_positive(noise_var, "noise_var", allow_none=True, allow_zero=True)
    check_int(max_iter, "max_iter")
    check_positive(tol, "tol", allow_zero=True)
    check_positive(prune, "prune", allow_zero=True)
    if prune >= 1:
        raise RecoveryError(f"prune is a fraction of the largest gamma and must be < 1, got {prune}")


def _sbl_loop(A: torch.Tensor, y: torch.Tensor, update: Callable, *, noise_var, max_iter: int,
              tol: float, prune: float, gamma0=None, learn_noise: bool, record_cost: bool = True,
              name: str = "sbl", mackay: bool = False) -> RecoveryResult:
    """Shared EM driver: ``update(target, gamma, active) -> new gamma`` (full length).

    With ``mackay`` the hyperparameters use MacKay's fixed-point updates instead (``update``
    is ignored): faster in practice, but without EM's monotone-cost guarantee.
    """
    M, N = A.shape
    rdt = real_dtype(A.dtype)
    dev = A.device
    ypow = float(torch.linalg.vector_norm(y) ** 2) / M
    if ypow == 0.0:
        return RecoveryResult(x=torch.zeros(N, dtype=A.dtype, device=dev),
                              support=torch.zeros(0, dtype=torch.long), n_iter=0, converged=True,
                              info={"cost": [], "noise_var": 0.0 if noise_var is None else noise_var,
                                    "gamma": torch.zeros(N, dtype=rdt, device=dev)})
    # A floor keeps C positive definite when the noise is zero or shrinks to zero.
    floor = noise_floor(ypow, rdt)
    s2 = max(float(noise_var), floor) if noise_var is not None else 0.1 * ypow
    colpow = A.abs().pow(2).sum(0)
    if gamma0 is None:
        gamma = torch.full((N,), ypow / max(float(colpow.mean()), 1e-300), dtype=rdt, device=dev)
    else:
        gamma = gamma0.to(rdt).clone()
    active = gamma > 0
    # Working set: the active columns, stored as contiguous rows of A^T so that dropping pruned
    # columns is a cheap row gather (done only when the active set shrinks).
    At = A.mT.contiguous()
    idx = torch.nonzero(active).flatten()
    n_act = idx.numel()
    At_w = At if n_act == N else At[idx]
    costs: list[float] = []
    converged = False
    it = 0
    post = None
    for it in range(1, max_iter + 1):  # noqa: B007 - read after the loop
        g_a = gamma[idx]
        post = sbl_posterior(At_w.mT, g_a, s2, y)
        if record_cost:
            costs.append(post["cost"])
        if mackay:
            # gamma_j = |mu_j|^2 / (1 - Sigma_jj / gamma_j): MacKay's fixed point.
            keep_frac = torch.clamp(1.0 - post["sigma_diag"] / g_a, min=1e-12)
            new_gamma = torch.zeros(N, dtype=rdt, device=dev)
            new_gamma[idx] = post["mu"].abs().pow(2) / keep_frac
        else:
            target = torch.zeros(N, dtype=rdt, device=dev)
            target[idx] = post["mu"].abs().pow(2) + post["sigma_diag"]
            new_gamma = update(target, gamma, active)
        new_gamma = torch.where(active, new_gamma, torch.zeros_like(new_gamma))
        if learn_noise:
            if mackay:
                s2 = max(post["resid_sq"] / max(M - post["dof"], 1e-3 * M), floor)
            else:
                s2 = max(em_noise_update(post["resid_sq"], post["dof"], s2, M), floor)
        change = float(torch.linalg.vector_norm(new_gamma - gamma)) / max(float(torch.linalg.vector_norm(gamma)), 1e-300)
        gamma = new_gamma
        if prune > 0:
            active = active & (gamma > prune * float(gamma.max()))
        else:
            active = active & (gamma > 0)
        gamma = torch.where(active, gamma, torch.zeros_like(gamma))
        keep = active[idx]
        n_new = int(keep.sum())
        if n_new < n_act:
            # Drop pruned columns from the working set for the later iterations.
            local = torch.nonzero(keep).flatten()
            idx = idx[local]
            At_w = At_w[local]
            n_act = n_new
        if change < tol:
            converged = True
            break
    post = sbl_posterior(At_w.mT, gamma[idx], s2, y)
    x = torch.zeros(N, dtype=A.dtype, device=dev)
    x[idx] = post["mu"]
    if not converged:
        logger.info("%s: not converged after %d iterations", name, it)
    return RecoveryResult(x=x, support=idx.cpu(), n_iter=it, converged=converged,
                          info={"cost": costs, "noise_var": s2, "gamma": gamma})


def _em_update(target, gamma, active):
    return target


def sbl(A, y, *, noise_var: float | None = None, max_iter: int = 1000, tol: float | None = None,
        prune: float | None = None, gamma0=None, record_cost: bool = True, update: str = "fast",
        add_level: float | None = 0.1) -> RecoveryResult:
    """Classic SBL (Tipping; Wipf and Rao), real or complex: fast sequential, EM or MacKay.

    Args:
        A: matrix or operator (operators are densified: memory ``M N``).
        y: ``(M,)`` or ``(M, B)`` (columns solved independently).
        noise_var: known noise variance; ``None`` estimates it (starting from 10% of the
            measurement power). ``0`` means noiseless (a ``1e-12`` relative floor keeps the
            covariance invertible).
        max_iter: iterations (EM steps, or single-column steps for ``"fast"``).
        tol: EM / MacKay: stop when ``||gamma_new - gamma|| / ||gamma|| < tol`` (default
            ``1e-6``). Fast: stop when no step lowers the cost by more than ``tol`` and a noise
            update changes the noise variance by less than ``tol`` relatively (default
            ``1e-3``); along the way, a learned noise variance is updated only when it moves
            by more than ``tol`` relatively.
        prune: EM / MacKay (default ``1e-3``): drop ``gamma_j`` below ``prune * max(gamma)``
            for good (0 keeps all; needed for an exactly monotone cost). Pruning also sharpens
            EM, but costs exactness once some coefficient is small: use ``prune=1e-6`` (or 0)
            for exact recovery of noiseless data. Fast (default ``1e-2``): a column whose
            variance would be at least ``prune`` times the largest may enter even if it fails
            the ``add_level`` test.
        gamma0: EM / MacKay initial variances (default: the measurement power divided by the
            mean squared column norm). Not accepted by ``"fast"``.
        record_cost: keep the cost ``log|C| + y^H C^{-1} y`` of every iteration in
            ``info["cost"]``.
        update: ``"fast"`` (default): Tipping and Faul's (2003) fast marginal-likelihood
            maximisation, which starts from an empty model and at each step adds, deletes or
            re-estimates the one hyperparameter that lowers the cost most, in closed form,
            working only with the active columns (numpy on the CPU whatever the input's device;
            the result comes back on it). ``"em"``: EM over all columns (monotone cost,
            Woodbury E-step). ``"mackay"``: MacKay / Tipping fixed-point updates of ``gamma``
            and the noise, as in scikit-learn's ARDRegression (fewer iterations than EM, no
            monotonicity guarantee).
        add_level: fast only: false discovery rate of the test a column must pass to enter
            (Benjamini-Hochberg on ``|q|^2 / s``, which has mean 1 for a column ``y`` does not
            depend on). ``None`` (with ``prune=0``) lets any column with ``|q|^2 > s`` enter,
            as in the original algorithm, which with a learned noise variance tends to fit
            the noise when N > M.

    Returns:
        :class:`RecoveryResult` with ``x`` the posterior mean; ``support`` the hyperparameters
        left after pruning (fast: the active columns); ``info`` has ``cost``, ``noise_var``,
        ``gamma``; fast also ``n_added``, ``n_deleted``, ``n_reestimated``. With a known noise
        variance the fast method's cost never increases; with a learned one a noise update is
        kept only if it lowers the cost, so it does not increase either.
    """
    op, yt, as_numpy = prepare(A, y)
    if update not in ("em", "mackay", "fast"):
        raise RecoveryError(f"update must be 'fast', 'em' or 'mackay', got {update!r}")
    fast = update == "fast"
    tol = (1e-3 if fast else 1e-6) if tol is None else tol
    prune = (1e-2 if fast else 1e-3) if prune is None else prune
    _check_common(noise_var, max_iter, tol, prune)
    if add_level is not None:
        check_positive(add_level, "add_level")
        if add_level >= 1:
            raise RecoveryError(f"add_level is a false discovery rate and must be < 1, got {add_level}")
    if update == "fast" and gamma0 is not None:
        raise RecoveryError("gamma0 is not used by update='fast', which starts from an empty model")
    Ad = op.to_dense()
    g0 = None
    if gamma0 is not None:
        from ._common import to_tensor
        g0 = to_tensor(gamma0, "gamma0", ndim=(1,), allow_complex=False, device=Ad.device)
        if g0.numel() != Ad.shape[1] or bool((g0 < 0).any()):
            raise RecoveryError(f"gamma0 must be {Ad.shape[1]} non-negative values")

    def solve_one(yv):
        if update == "fast":
            return fast_sbl_loop(Ad, yv, noise_var=noise_var, max_iter=max_iter, tol=tol,
                                 prune=prune, record_cost=record_cost, add_level=add_level)
        return _sbl_loop(Ad, yv, _em_update, noise_var=noise_var, max_iter=max_iter, tol=tol,
                         prune=prune, gamma0=g0, learn_noise=noise_var is None,
                         record_cost=record_cost, name="sbl", mackay=update == "mackay")

    return finish(run_batched(solve_one, yt), as_numpy)


def _block_labels(N: int, blocks) -> torch.Tensor:
    if isinstance(blocks, (int, np.integer)) and not isinstance(blocks, bool):
        if blocks < 1 or N % blocks:
            raise RecoveryError(f"blocks={blocks} must be a positive block size dividing N={N}")
        return torch.arange(N) // int(blocks)
    lab = torch.as_tensor(np.asarray(blocks) if not isinstance(blocks, torch.Tensor) else blocks)
    if lab.ndim != 1 or lab.numel() != N or lab.is_floating_point() or lab.is_complex():
        raise RecoveryError(f"blocks must be a block size or {N} integer block labels")
    _, inv = torch.unique(lab, return_inverse=True)
    return inv


def block_sbl(A, y, blocks, *, noise_var: float | None = None, max_iter: int = 1000,
              tol: float = 1e-6, prune: float = 1e-3) -> RecoveryResult:
    """Block SBL with a known partition: one variance per block, shared by its entries (EM).

    Args:
        blocks: a block size dividing ``N`` (contiguous equal blocks) or ``N`` integer labels.
        Other arguments as :func:`sbl`.
    """
    op, yt, as_numpy = prepare(A, y)
    _check_common(noise_var, max_iter, tol, prune)
    Ad = op.to_dense()
    lab = _block_labels(Ad.shape[1], blocks).to(Ad.device)
    nb = int(lab.max()) + 1

    def update(target, gamma, active):
        # Inactive entries contribute 0 to their block's mean, as in the exact EM on the block.
        cnt = torch.zeros(nb, dtype=target.dtype, device=target.device).index_add_(0, lab, active.to(target.dtype))
        sums = torch.zeros(nb, dtype=target.dtype, device=target.device).index_add_(0, lab, target)
        per_block = sums / torch.clamp(cnt, min=1)
        return per_block[lab]

    def solve_one(yv):
        return _sbl_loop(Ad, yv, update, noise_var=noise_var, max_iter=max_iter, tol=tol,
                         prune=prune, learn_noise=noise_var is None, name="block_sbl")

    res = finish(run_batched(solve_one, yt), as_numpy)
    return res


def coupled_precision_update(target: torch.Tensor, beta: float, b: float) -> torch.Tensor:
    """Pattern-coupled SBL hyperparameter update (Fang et al., 2015), pure.

    Precisions ``alpha_j = 1 / (omega_j + b)`` with ``omega_j = E|x_j|^2 + beta (E|x_{j-1}|^2
    + E|x_{j+1}|^2)``; the variance of ``x_j`` is ``1 / (alpha_j + beta (alpha_{j-1} +
    alpha_{j+1}))`` (missing neighbours at the ends count as 0).
    """
    pad = torch.nn.functional.pad(target.reshape(1, 1, -1), (1, 1)).reshape(-1)
    omega = target + beta * (pad[:-2] + pad[2:])
    alpha = 1.0 / (omega + b)
    apad = torch.nn.functional.pad(alpha.reshape(1, 1, -1), (1, 1)).reshape(-1)
    return 1.0 / (alpha + beta * (apad[:-2] + apad[2:]))


def pc_sbl(A, y, *, beta: float = 1.0, noise_var: float | None = None, max_iter: int = 1000,
           tol: float = 1e-6, prune: float = 1e-3) -> RecoveryResult:
    """Pattern-coupled SBL for block-sparse signals with unknown block boundaries.

    Each entry's prior variance is tied to its neighbours' (see
    :func:`coupled_precision_update`); ``beta = 0`` gives classic SBL's EM.
    """
    op, yt, as_numpy = prepare(A, y)
    _check_common(noise_var, max_iter, tol, prune)
    check_positive(beta, "beta", allow_zero=True)
    Ad = op.to_dense()

    def solve_one(yv):
        b = 1e-10 * float(torch.linalg.vector_norm(yv) ** 2) / Ad.shape[0]

        def update(target, gamma, active):
            return coupled_precision_update(target, float(beta), max(b, 1e-300))

        return _sbl_loop(Ad, yv, update, noise_var=noise_var, max_iter=max_iter, tol=tol,
                         prune=prune, learn_noise=noise_var is None, name="pc_sbl")

    return finish(run_batched(solve_one, yt), as_numpy)
