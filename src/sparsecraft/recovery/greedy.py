"""Greedy pursuit: orthogonal matching pursuit (OMP) and Kronecker OMP."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._common import RecoveryError, RecoveryResult, check_int, check_memory, check_positive, finish, logger, run_batched
from .operators import DenseOperator, KroneckerOperator, kron_apply, prepare


def _pursue(corr, column, col_norms: list[float], y, cap: int, stop: float, zeros, norm):
    """OMP's picks on one measurement vector, written once for numpy and torch arrays.

    ``corr(r)`` gives the (normalised) correlation magnitudes of every column with ``r``, a
    fresh array; ``column(j)`` column ``j``; ``zeros(*shape)`` and ``norm(v)`` the array
    library's. The picked columns' QR factors grow one column per pick (Gram-Schmidt,
    orthogonalised again when the first pass cancelled much of the column: "twice is
    enough"), so a pick costs O(M k) rather than a new least-squares solve.

    ``y`` is overwritten with the residual. Returns ``(support, R, Q^H y, residual norm,
    converged)``.
    """
    M = y.shape[0]
    Q, R, proj = zeros(M, cap), zeros(cap, cap), zeros(cap)
    picked = zeros(len(col_norms)) != 0
    support: list[int] = []
    r = y
    rnorm = float(norm(r))
    converged = rnorm <= stop
    while len(support) < cap and not converged:
        c = corr(r)
        c[picked] = -1.0
        j = int(c.argmax())
        if float(c[j]) <= 0.0:
            logger.debug("omp: residual orthogonal to all remaining columns")
            break
        k = len(support)
        q = column(j)
        if k:
            Qk = Q[:, :k]
            h = Qk.conj().T @ q
            q = q - Qk @ h
            rkk = float(norm(q))
            if rkk < 0.5 * col_norms[j]:
                g = Qk.conj().T @ q
                q -= Qk @ g
                h += g
                rkk = float(norm(q))
            R[:k, k] = h
        else:
            rkk = col_norms[j]
        if rkk <= 1e-12 * col_norms[j]:
            logger.debug("omp: column %d lies in the span of the picked ones", j)
            break
        Q[:, k] = q / rkk
        R[k, k] = rkk
        pk = (Q[:, k].conj() @ r).item()
        proj[k] = pk
        r -= pk * Q[:, k]
        support.append(j)
        picked[j] = True
        if stop > 0 or len(support) == cap:
            rnorm = float(norm(r))
            converged = rnorm <= stop
    k = len(support)
    return support, R[:k, :k], proj[:k], rnorm, converged


def omp(A, y, n_nonzero: int | None = None, *, tol: float | None = None,
        normalize: bool = True, max_iter: int | None = None) -> RecoveryResult:
    """Orthogonal matching pursuit.

    Picks, one at a time, the column most correlated with the residual (correlations divided
    by the column norm when ``normalize``, which dictionaries with unequal column norms such
    as Kronecker products need), then refits all picked columns by least squares.

    Args:
        A: ``M x N`` matrix or :class:`~sparsecraft.recovery.operators.LinearOperator`.
        y: measurements, ``(M,)`` or ``(M, B)`` (columns solved independently).
        n_nonzero: sparsity ``K`` (at most ``M``). Default: stop on ``tol`` only.
        tol: stop when ``||residual||_2 <= tol``. Default ``1e-10 * ||y||`` if ``n_nonzero`` is None.
        normalize: divide correlations by column norms.
        max_iter: cap on picks (default ``min(M, N)``).

    Returns:
        :class:`RecoveryResult`; ``info`` holds ``residual_norm``.
    """
    op, yt, as_numpy = prepare(A, y)
    M, N = op.shape
    check_int(n_nonzero, "n_nonzero", allow_none=True)
    if n_nonzero is not None and n_nonzero > M:
        raise RecoveryError(f"n_nonzero={n_nonzero} exceeds the number of measurements M={M}")
    if n_nonzero is not None and n_nonzero > N:
        raise RecoveryError(f"n_nonzero={n_nonzero} exceeds the number of unknowns N={N}")
    check_positive(tol, "tol", allow_none=True, allow_zero=True)
    check_int(max_iter, "max_iter", allow_none=True)
    col_norms = op.column_norms()
    if normalize:
        col_norms = torch.where(col_norms > 0, col_norms, torch.ones_like(col_norms))
    # An explicit matrix on the CPU runs the picks in numpy (same memory, a fraction of torch's
    # per-call cost, which dominates at these sizes); operators and other devices in torch.
    dense_cpu = isinstance(op, DenseOperator) and op.device.type == "cpu"
    if dense_cpu:
        AH = op.matrix.detach().numpy().conj().T
        inv = 1.0 / col_norms.numpy() if normalize else None
        dtype = AH.dtype

        def corr(r):
            c = np.abs(AH @ r)
            return c * inv if inv is not None else c

        def column(j):
            return AH[j].conj()

        def zeros(*shape):
            return np.zeros(shape, dtype=dtype)

        norm = np.linalg.norm
    else:
        inv_t = 1.0 / col_norms if normalize else None

        def corr(r):
            c = op.rmatvec(r).abs()
            return c.mul_(inv_t) if inv_t is not None else c

        def column(j):
            return op.column(j).reshape(M).to(op.dtype)

        def zeros(*shape):
            return torch.zeros(shape, dtype=op.dtype, device=op.device)

        norm = torch.linalg.vector_norm

    def solve_one(yv):
        cap = n_nonzero if n_nonzero is not None else min(M, N)
        if max_iter is not None:
            cap = min(cap, max_iter)
        stop = tol if tol is not None else (1e-10 * float(torch.linalg.vector_norm(yv))
                                            if n_nonzero is None else 0.0)
        support, R, proj, rnorm, converged = _pursue(
            corr, column, col_norms.tolist(), yv.detach().numpy().copy() if dense_cpu else yv.clone(), cap, stop, zeros, norm)
        if n_nonzero is not None and len(support) == n_nonzero:
            converged = True
        x = torch.zeros(N, dtype=op.dtype, device=op.device)
        if support:
            R, proj = torch.as_tensor(R, device=op.device), torch.as_tensor(proj, device=op.device)
            coef = torch.linalg.solve_triangular(R, proj.unsqueeze(-1), upper=True)[:, 0]
            x[torch.tensor(support, device=op.device)] = coef
        return RecoveryResult(x=x, support=torch.tensor(sorted(support), dtype=torch.long),
                              n_iter=len(support), converged=bool(converged),
                              info={"residual_norm": rnorm})

    return finish(run_batched(solve_one, yt), as_numpy)


def kron_omp(factors: Sequence, y, n_nonzero: Sequence[int] | None = None, *,
             tol: float | None = None, max_iter: int | None = None) -> RecoveryResult:
    """Kronecker OMP for ``y = (F_1 (x) ... (x) F_k) x`` with a Kronecker-structured support.

    Each pick takes the multi-index ``(n_1, ..., n_k)`` of the largest normalised correlation
    and adds its per-mode indices to per-mode index sets ``S_i``; the support is the product
    ``S_1 x ... x S_k`` and the refit is the exact least-squares solution on it, computed
    from the factors' pseudo-inverses (``pinv`` of a Kronecker product is the Kronecker
    product of the ``pinv``), so nothing of size ``M x N`` is formed.

    Args:
        factors: list of ``M_i x N_i`` matrices.
        y: measurements of length ``prod M_i`` (or ``(M, B)``).
        n_nonzero: per-mode sparsity ``(K_1, ..., K_k)``; each ``K_i <= M_i``.
        tol: stop when ``||residual|| <= tol`` (default ``1e-10 ||y||`` when ``n_nonzero`` is None).
        max_iter: cap on picks (default ``sum N_i``).
    """
    if isinstance(factors, KroneckerOperator):
        op = factors
    else:
        op = KroneckerOperator(factors)
    op, yt, as_numpy = prepare(op, y)
    k = len(op.factors)
    if n_nonzero is not None:
        if len(n_nonzero) != k:
            raise RecoveryError(f"n_nonzero must give one sparsity per factor ({k}), got {len(n_nonzero)}")
        for i, (ki, mi) in enumerate(zip(n_nonzero, op.out_dims)):
            check_int(ki, f"n_nonzero[{i}]")
            if ki > mi:
                raise RecoveryError(f"n_nonzero[{i}]={ki} exceeds factors[{i}]'s row count M_{i}={mi}")
            if ki > op.in_dims[i]:
                raise RecoveryError(f"n_nonzero[{i}]={ki} exceeds factors[{i}]'s column count")
    check_positive(tol, "tol", allow_none=True, allow_zero=True)
    check_int(max_iter, "max_iter", allow_none=True)
    # matrix-free, but a few length-N vectors (column norms, correlations, x) per column of y
    check_memory((8 + 2 * (yt.shape[1] if yt.ndim == 2 else 1)) * op.shape[1] * yt.element_size(),
                 f"kron_omp with N = {' x '.join(map(str, op.in_dims))} = {op.shape[1]} unknowns")
    norms = op.column_norms()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    caps = list(n_nonzero) if n_nonzero is not None else [min(m, n) for m, n in zip(op.out_dims, op.in_dims)]
    N = op.shape[1]

    def solve_one(yv):
        stop = tol if tol is not None else (1e-10 * float(torch.linalg.vector_norm(yv))
                                            if n_nonzero is None else 0.0)
        sets: list[list[int]] = [[] for _ in range(k)]
        r = yv.clone()
        rnorm = float(torch.linalg.vector_norm(r))
        coef = None
        it = 0
        limit = max_iter if max_iter is not None else sum(op.in_dims)
        converged = rnorm <= stop
        while it < limit and not converged:
            it += 1
            c = (op.rmatvec(r).abs() / norms).reshape(op.in_dims)
            # Per mode: which indices are already chosen (broadcastable over the others).
            chosen = []
            for i in range(k):
                shape = [1] * k
                shape[i] = op.in_dims[i]
                sel = torch.zeros(op.in_dims[i], dtype=torch.bool, device=c.device)
                if sets[i]:
                    sel[torch.tensor(sets[i], device=c.device)] = True
                chosen.append(sel.reshape(shape))
            # Only multi-indices that add something on a mode below its cap are eligible.
            mask = torch.ones_like(c, dtype=torch.bool)
            full = True
            for i in range(k):
                if len(sets[i]) >= caps[i]:
                    mask = mask & chosen[i]
                else:
                    full = False
            if full:
                break
            cand = torch.where(mask, c, torch.full_like(c, -1.0))
            # Exclude multi-indices already inside the product support.
            inside = torch.ones_like(c, dtype=torch.bool)
            for sel in chosen:
                inside = inside & sel
            cand = torch.where(inside, torch.full_like(c, -1.0), cand)
            flat = int(torch.argmax(cand))
            if float(cand.reshape(-1)[flat]) <= 0:
                break
            idx = np.unravel_index(flat, op.in_dims)
            for i in range(k):
                if int(idx[i]) not in sets[i]:
                    sets[i].append(int(idx[i]))
            subs = [f[:, torch.tensor(s, device=f.device)] for f, s in zip(op.factors, sets)]
            pinvs = [torch.linalg.pinv(s) for s in subs]
            coef = kron_apply(pinvs, yv)
            r = yv - kron_apply(subs, coef)
            rnorm = float(torch.linalg.vector_norm(r))
            converged = rnorm <= stop
        x = torch.zeros(op.in_dims, dtype=op.dtype, device=op.device)
        if coef is not None:
            grids = torch.meshgrid(*[torch.tensor(s, device=op.device) for s in sets], indexing="ij")
            x[grids] = coef.reshape([len(s) for s in sets])
        x = x.reshape(N)
        if n_nonzero is not None and all(len(s) >= c for s, c in zip(sets, caps)):
            converged = True
        support = torch.nonzero(x != 0).flatten().cpu()
        return RecoveryResult(x=x, support=support, n_iter=it, converged=bool(converged),
                              info={"residual_norm": rnorm,
                                    "mode_supports": [sorted(s) for s in sets]})

    return finish(run_batched(solve_one, yt), as_numpy)
