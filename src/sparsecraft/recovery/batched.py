"""Many independent recoveries with one dictionary, solved together.

``Y`` holds one problem per row (``(B, M)``); every problem has its own support, prior
variances and noise level, and stops at its own convergence. The work of all problems still
running is done by batched tensor operations (batched ``eigh`` / Cholesky / matrix products
on the inputs' device, CPU or GPU), so the per-call overhead that dominates small problems is
paid once per iteration instead of once per problem per iteration.

A single problem is the batch of one (``Y`` of shape ``(M,)`` is solved as ``(1, M)``): the
same code, so a problem's result does not depend on the others in its batch (each problem's
numbers come from its own slices of batched operations). ``info["time_per_problem"]`` is the
call's wall time over ``B``.

* :func:`krosbl_batch`: KroSBL (alternating-minimisation M-step) by EM with the exact
  Kronecker E-step of :mod:`.kronecker_sbl`. Pruned entries are masked (their variance set to
  zero) rather than removed, so shapes stay the same across problems; no over-relaxation and
  no restarts (use :func:`~.kronecker_sbl.krosbl` for hard single problems).
* :func:`omp_batch`: orthogonal matching pursuit with ``K`` columns per problem.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from ._common import (
    RecoveryError,
    RecoveryResult,
    check_int,
    check_positive,
    finish,
    noise_floor,
    real_dtype,
    to_tensor,
)


def check_dictionary(A, name: str) -> torch.Tensor:
    """``A`` as a 2-D tensor; :class:`RecoveryError` naming the first column with NaN or inf."""
    if isinstance(A, (np.ndarray, torch.Tensor)) and A.ndim == 2:
        bad = ~torch.isfinite(torch.as_tensor(A)).all(dim=0)
        if bool(bad.any()):
            cols = torch.nonzero(bad).flatten().tolist()
            raise RecoveryError(f"{name} column {cols[0]} contains NaN or inf ({len(cols)} bad column(s)); "
                                "every dictionary column must be finite")
    return to_tensor(A, name, ndim=(2,))


def stack_problems(Y, M: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, bool, bool]:
    """``Y`` as a ``(B, M)`` tensor, whether the caller gave numpy, and whether it was one problem.

    ``Y`` is a ``(B, M)`` or ``(M,)`` array, or a sequence of ``B`` length-``M`` vectors; a
    problem of another length is refused naming it.
    """
    as_numpy = not isinstance(Y, torch.Tensor) and not (
        isinstance(Y, (list, tuple)) and Y and isinstance(Y[0], torch.Tensor))
    if isinstance(Y, (list, tuple)):
        if not Y:
            raise RecoveryError("Y holds no problems")
        rows = [to_tensor(v, f"Y[{b}]", ndim=(1,)) for b, v in enumerate(Y)]
        for b, r in enumerate(rows):
            if r.shape[0] != M:
                raise RecoveryError(f"Y[{b}] has {r.shape[0]} measurements but the dictionary has M = {M} rows: "
                                    "a batch holds problems of one shape")
        Yt, single = torch.stack([r.to(rows[0].dtype) for r in rows]), False
    else:
        Yt = to_tensor(Y, "Y", ndim=(1, 2))
        single = Yt.ndim == 1
        Yt = Yt.reshape(1, -1) if single else Yt
        if Yt.shape[1] != M:
            raise RecoveryError(f"Y has shape {tuple(Yt.shape)}: each row is one problem and needs M = {M} "
                                "measurements (the dictionary's rows)")
    if Yt.shape[0] == 0:
        raise RecoveryError("Y holds no problems")
    dt = torch.promote_types(Yt.dtype, dtype)
    return Yt.to(device=device, dtype=dt), as_numpy, single


def _mode_apply(t: torch.Tensor, mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply ``mats[i]`` along mode ``i + 1`` of ``t`` (mode 0 is the problem).

    A matrix is ``(m_i, n_i)`` (shared) or ``(b, m_i, n_i)`` (one per problem)."""
    for i, F in enumerate(mats):
        t = torch.movedim(t, i + 1, -1)
        if F.ndim == 2:
            t = t @ F.mT
        else:
            shape = t.shape
            t = (t.reshape(shape[0], -1, shape[-1]) @ F.mT).reshape(*shape[:-1], F.shape[1])
        t = torch.movedim(t, -1, i + 1)
    return t


def _outer(vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(b, n_1, ..., n_k)`` outer products of the per-problem vectors ``vs[i]`` (``(b, n_i)``)."""
    out = vs[0]
    for v in vs[1:]:
        out = out.unsqueeze(-1) * v.reshape(v.shape[0], *([1] * (out.ndim - 1)), v.shape[1])
    return out


class _KroBatch:
    """Exact batched KroSBL E-step and AM M-step for the problems still running."""

    def __init__(self, factors: list[torch.Tensor]):
        self.factors = factors
        self.k = len(factors)

    def posterior(self, gammas, s2, Y):
        """Per problem: mean, variances, ``||y - A mu||^2``, ``sum (1 - Sigma/gamma)``."""
        b = Y.shape[0]
        Us, ds, Bs = [], [], []
        for A_i, g_i in zip(self.factors, gammas):
            P = (A_i.unsqueeze(0) * g_i.to(A_i.dtype).unsqueeze(1)) @ A_i.mH
            P = 0.5 * (P + P.mH)
            d, U = torch.linalg.eigh(P)
            Us.append(U)
            ds.append(torch.clamp(d, min=0.0))
            Bs.append(U.mH @ A_i)
        d = _outer(ds)
        w = 1.0 / (s2.reshape(b, *([1] * self.k)) + d)
        Yt = Y.reshape(b, *[A.shape[0] for A in self.factors])
        Uy = _mode_apply(Yt, [U.mH for U in Us])
        Ciy = _mode_apply(w.to(Uy.dtype) * Uy, Us)
        gamma = _outer([g.to(d.dtype) for g in gammas])
        mu = gamma * _mode_apply(Ciy, [A.mH for A in self.factors])
        diag_q = _mode_apply(w, [B.abs().pow(2).mT for B in Bs])
        sigma = torch.clamp(gamma - gamma * gamma * diag_q, min=0.0)
        resid = Yt - _mode_apply(mu, self.factors)
        resid_sq = resid.abs().pow(2).reshape(b, -1).sum(1)
        dof = (w * d).reshape(b, -1).sum(1)
        cost = torch.log(s2.reshape(b, *([1] * self.k)) + d).reshape(b, -1).sum(1) + (
            w * Uy.abs().pow(2)).reshape(b, -1).sum(1)
        return mu, sigma, resid_sq, dof, cost

    def am_step(self, T, gammas, n_sweeps: int, tol: float = 1e-4):
        """The AM M-step of :func:`~.kronecker_sbl.am_mstep` over the kept (non-zero) entries."""
        gs = [g.clone() for g in gammas]
        k = self.k
        prev = _outer(gs)
        # A problem stops sweeping at its own convergence (its result must not depend on the batch).
        done = torch.zeros(T.shape[0], dtype=torch.bool, device=T.device)
        for _ in range(n_sweeps):
            before = list(gs)
            for i in range(k):
                others = _outer([gs[j] if j != i else torch.ones_like(gs[j]) for j in range(k)])
                kept = others > 0
                ratio = torch.where(kept, T / torch.where(kept, others, torch.ones_like(others)), torch.zeros_like(T))
                dims = [j + 1 for j in range(k) if j != i]
                u = ratio.sum(dim=dims) / kept.sum(dim=dims).clamp_min(1).to(T.dtype)
                top = u.max(dim=1, keepdim=True).values.clamp_min(1e-300)
                alive = gs[i] > 0
                gs[i] = torch.where(alive, torch.clamp(u, min=1e-12 * top), torch.zeros_like(u))
            for i in range(k - 1):
                n = torch.linalg.vector_norm(gs[i], dim=1, keepdim=True)
                gs[i] = gs[i] / n
                gs[-1] = gs[-1] * n
            gs = [torch.where(done.unsqueeze(1), b, g) for b, g in zip(before, gs)]
            cur = _outer(gs)
            change = (torch.linalg.vector_norm((cur - prev).reshape(cur.shape[0], -1), dim=1)
                      / torch.linalg.vector_norm(prev.reshape(prev.shape[0], -1), dim=1).clamp_min(1e-300))
            prev = cur
            done = done | (change < tol)
            if bool(done.all()):
                break
        return gs


def krosbl_batch(factors, Y, *, noise_var: float | None = None, max_iter: int = 300, tol: float = 1e-4,
                 prune: float = 1e-3, n_sweeps: int = 10) -> RecoveryResult:
    """KroSBL (AM) for many problems with the same Kronecker dictionary, in one call.

    Args:
        factors: ``k >= 2`` matrices ``A_i`` (``M_i x N_i``); the dictionary is their Kronecker
            product (``M = prod M_i`` rows, ``N = prod N_i`` columns).
        Y: ``(B, M)``: one problem per row (or ``(M,)``, one problem, or a list of vectors).
        noise_var: known noise variance (every problem), or ``None`` to learn one per problem.
        max_iter, tol: per problem, stop when the relative change of ``gamma`` is below ``tol``.
        prune: per factor and problem, entries below ``prune`` times the factor's largest are
            set to zero for good.
        n_sweeps: AM sweeps per M-step.

    Returns:
        :class:`RecoveryResult` with ``x`` of shape ``(B, N)`` (``(N,)`` for one problem),
        ``support``, ``n_iter`` and ``converged`` per problem; ``info`` has ``gammas`` (per
        factor, ``(B, N_i)``), ``noise_var`` (per problem), ``time`` (s) and
        ``time_per_problem``.
    """
    t0 = time.perf_counter()
    if isinstance(factors, (np.ndarray, torch.Tensor)) or not isinstance(factors, (list, tuple)) or len(factors) < 2:
        raise RecoveryError("factors must be a list of at least 2 matrices")
    fs = [check_dictionary(f, f"factors[{i}]") for i, f in enumerate(factors)]
    dt = fs[0].dtype
    for f in fs[1:]:
        dt = torch.promote_types(dt, f.dtype)
    dev = fs[0].device
    fs = [f.to(device=dev, dtype=dt) for f in fs]
    M = math.prod(f.shape[0] for f in fs)
    Yt, as_numpy, single = stack_problems(Y, M, dt, dev)
    fs = [f.to(Yt.dtype) for f in fs]
    check_positive(noise_var, "noise_var", allow_none=True, allow_zero=True)
    check_int(max_iter, "max_iter")
    check_int(n_sweeps, "n_sweeps")
    check_positive(tol, "tol", allow_zero=True)
    check_positive(prune, "prune", allow_zero=True)
    if prune >= 1:
        raise RecoveryError(f"prune must be < 1, got {prune}")
    rdt = real_dtype(Yt.dtype)
    Bn = Yt.shape[0]
    dims = [f.shape[1] for f in fs]
    N = math.prod(dims)
    ypow = Yt.abs().pow(2).sum(1).to(rdt) / M
    floor = torch.tensor([noise_floor(float(p), rdt) for p in ypow], dtype=rdt, device=dev)
    s2 = (torch.maximum(torch.full_like(ypow, float(noise_var)), floor) if noise_var is not None
          else 0.1 * ypow)
    colpow = float(_outer([f.abs().pow(2).sum(0).unsqueeze(0).to(rdt) for f in fs]).mean())
    level = M / N * torch.clamp(1.0 - s2 / ypow.clamp_min(1e-300), min=1e-3) * ypow / max(colpow, 1e-300)
    gammas = [torch.ones(Bn, n, dtype=rdt, device=dev) for n in dims]
    gammas[-1] = gammas[-1] * level.unsqueeze(1)
    zero = ypow == 0
    for g in gammas:
        g[zero] = 0.0
    n_iter = torch.zeros(Bn, dtype=torch.long)
    converged = zero.clone().cpu()
    eng = _KroBatch(fs)
    running = torch.nonzero(~zero).flatten()
    eta = torch.ones(Bn, dtype=rdt, device=dev)
    for it in range(1, max_iter + 1):
        if running.numel() == 0:
            break
        g_r = [g[running] for g in gammas]
        s2_r = s2[running]
        mu, sigma, resid_sq, dof, cost = eng.posterior(g_r, s2_r, Yt[running])
        T = mu.abs().pow(2) + sigma
        em = eng.am_step(T, g_r, n_sweeps)
        if noise_var is None:
            s2_r = torch.maximum((resid_sq + s2_r * dof) / M, floor[running])
        # Over-relaxed EM, as krosbl's: a step eta times as long in log gamma, kept per problem
        # only where it lowers the cost (so each problem's cost stays monotone).
        eta_r = torch.clamp(eta[running] * _RELAX_GROWTH, max=1e3)
        prop = _extrapolate(g_r, em, eta_r)
        trial_cost = eng.posterior(prop, s2_r, Yt[running])[4]
        ok = trial_cost < cost
        new = [torch.where(ok.unsqueeze(1), p, e) for p, e in zip(prop, em)]
        eta[running] = torch.where(ok, eta_r, torch.ones_like(eta_r))
        old_full, new_full = _outer(g_r).reshape(len(running), -1), _outer(new).reshape(len(running), -1)
        change = (torch.linalg.vector_norm(new_full - old_full, dim=1)
                  / torch.linalg.vector_norm(old_full, dim=1).clamp_min(1e-300))
        pruned_any = torch.zeros(len(running), dtype=torch.bool, device=dev)
        if prune > 0:
            # The decision reads the plain EM step: an extrapolated one can overshoot.
            for i in range(len(new)):
                top = em[i].max(dim=1, keepdim=True).values
                small = (em[i] <= prune * top) & (em[i] > 0) & (em[i] < top)
                pruned_any |= small.any(dim=1)
                new[i] = torch.where(small, torch.zeros_like(new[i]), new[i])
        for i in range(len(gammas)):
            gammas[i][running] = new[i]
        s2[running] = s2_r
        n_iter[running.cpu()] = it
        done = (change < tol) & ~pruned_any
        converged[running[done].cpu()] = True
        running = running[~done]
    # Final posterior mean at the final hyperparameters, every problem at once.
    mu = eng.posterior(gammas, s2, Yt)[0]
    x = mu.reshape(Bn, N)
    x[zero] = 0.0
    full = _outer(gammas).reshape(Bn, N)
    support = [torch.nonzero(full[b] > 0).flatten().cpu() for b in range(Bn)]
    elapsed = time.perf_counter() - t0
    res = RecoveryResult(x=x, support=support, n_iter=n_iter.tolist(), converged=converged.tolist(),
                         info={"gammas": gammas, "noise_var": s2, "time": elapsed, "time_per_problem": elapsed / Bn})
    return finish(_single(res) if single else res, as_numpy)


_RELAX_GROWTH = 1.5


def _extrapolate(gammas, new, eta):
    """``exp(log g + eta (log new - log g))`` per problem, bounded; zero (pruned) entries stay zero."""
    out = []
    for g, n in zip(gammas, new):
        top = n.max(dim=1, keepdim=True).values
        lo = 1e-12 * top.clamp_min(1e-300)
        log_p = torch.log(torch.maximum(g, lo)) + eta.unsqueeze(1) * (
            torch.log(torch.maximum(n, lo)) - torch.log(torch.maximum(g, lo)))
        p = torch.exp(torch.minimum(torch.maximum(log_p, torch.log(lo)), torch.log(top.clamp_min(1e-300)) + 20.0))
        out.append(torch.where(n > 0, p, torch.zeros_like(p)))
    return out


def _single(res: RecoveryResult) -> RecoveryResult:
    """The batch of one returned as one problem."""
    info = dict(res.info)
    info["gammas"] = [g[0] for g in info["gammas"]]
    info["noise_var"] = float(info["noise_var"][0])
    return RecoveryResult(x=res.x[0], support=res.support[0], n_iter=res.n_iter[0], converged=res.converged[0],
                          info=info)


def omp_batch(A, Y, n_nonzero: int) -> RecoveryResult:
    """Orthogonal matching pursuit with ``n_nonzero`` columns for every problem, in one call.

    Each step picks, per problem, the column most correlated (normalised) with its residual,
    then refits all picked columns by least squares (Cholesky of their Gram matrix).

    Args:
        A: ``(M, N)`` dictionary.
        Y: ``(B, M)`` (one problem per row), ``(M,)`` or a list of vectors.
        n_nonzero: ``K``, at most ``M`` and ``N``.

    Returns:
        :class:`RecoveryResult` with ``x`` ``(B, N)`` and per-problem ``support``;
        ``info["time_per_problem"]``.
    """
    t0 = time.perf_counter()
    At = check_dictionary(A, "A")
    M, N = At.shape
    check_int(n_nonzero, "n_nonzero")
    if n_nonzero > M:
        raise RecoveryError(f"n_nonzero={n_nonzero} exceeds the number of measurements M={M}")
    if n_nonzero > N:
        raise RecoveryError(f"n_nonzero={n_nonzero} exceeds the number of unknowns N={N}")
    Yt, as_numpy, single = stack_problems(Y, M, At.dtype, At.device)
    At = At.to(Yt.dtype)
    Bn = Yt.shape[0]
    norms = torch.linalg.vector_norm(At, dim=0).clamp_min(1e-300)
    G = At.mH @ At
    AtY = (At.mH @ Yt.unsqueeze(-1)).squeeze(-1)         # (B, N), one product per problem
    chosen = torch.zeros(Bn, 0, dtype=torch.long, device=At.device)
    R = Yt
    rows = torch.arange(Bn, device=At.device)
    coef = torch.zeros(Bn, 0, dtype=Yt.dtype, device=At.device)
    for _ in range(n_nonzero):
        corr = (At.mH @ R.unsqueeze(-1)).squeeze(-1).abs() / norms
        corr[rows.unsqueeze(1), chosen] = -1.0
        chosen = torch.cat([chosen, corr.argmax(dim=1, keepdim=True)], dim=1)
        Gs = G[chosen.unsqueeze(2), chosen.unsqueeze(1)]
        L = torch.linalg.cholesky(Gs)
        coef = torch.cholesky_solve(AtY[rows.unsqueeze(1), chosen].unsqueeze(-1), L).squeeze(-1)
        R = Yt - (At[:, chosen].permute(1, 0, 2) @ coef.unsqueeze(-1)).squeeze(-1)
    x = torch.zeros(Bn, N, dtype=Yt.dtype, device=At.device)
    x[rows.unsqueeze(1), chosen] = coef
    elapsed = time.perf_counter() - t0
    res = RecoveryResult(x=x, support=[torch.sort(c).values.cpu() for c in chosen], n_iter=[n_nonzero] * Bn,
                         converged=[True] * Bn, info={"time": elapsed, "time_per_problem": elapsed / Bn})
    if single:
        res = RecoveryResult(x=x[0], support=res.support[0], n_iter=n_nonzero, converged=True, info=res.info)
    return finish(res, as_numpy)
