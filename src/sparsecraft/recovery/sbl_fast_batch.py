"""Fast SBL for many problems with one dictionary, in one call (torch, CPU or GPU).

:func:`sbl_batch` runs Tipping and Faul's sequential method of :mod:`.sbl_fast` (the default of
:func:`~.sbl_em.sbl`) on every row of ``Y`` at once: each problem keeps its own active set,
precisions, noise level, step choices and stopping point, and one iteration applies every
running problem's chosen step (add, re-estimate or delete one column) through batched tensor
operations. A single call of :func:`~.sbl_em.sbl` costs many tiny numpy steps; here those
steps' fixed costs are paid once per iteration for the whole batch.

Agreement with single calls (tests):

* the batch of one (``Y`` of shape ``(M,)``) is the same code; on the CPU a problem's numbers do
  not depend on its batch-mates (every operation on a problem reads only its own slices), so
  batched results equal the batch-of-one results bit for bit;
* against :func:`~.sbl_em.sbl` (numpy, one problem per call) the decisions are the same
  (same steps, supports, iteration counts) but not the rounding: the active columns sit in
  slots in another order and the rank-one updates run in torch, so ``x`` agrees to round-off
  (relative ``1e-9`` in the tests), not bit for bit. Where two candidate steps tie to
  round-off the two may choose differently.

Memory: per problem the Gram columns of its active set (``N x capacity``, the capacity
doubling as active sets grow), so ``B * N * K_max`` numbers; checked before allocating.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ._common import (
    RecoveryError,
    RecoveryResult,
    check_int,
    check_memory,
    check_positive,
    finish,
    noise_floor,
    real_dtype,
)
from .batched import check_dictionary, stack_problems
from .sbl_fast import _NOISE_EVERY, _REFRESH_EVERY, _bh_bounds


def sbl_batch(A, Y, *, noise_var: float | None = None, max_iter: int = 1000, tol: float = 1e-3,
              prune: float = 1e-2, add_level: float | None = 0.1) -> RecoveryResult:
    """Fast SBL (as ``sbl(A, y)``, its defaults) on every row of ``Y``, in one call.

    Args:
        A: ``(M, N)`` dictionary, real or complex (numpy or torch; the device of a tensor is used).
        Y: ``(B, M)``, one problem per row, or ``(M,)`` (one problem), or a list of length-``M``
            vectors.
        noise_var: known noise variance (every problem), or ``None`` to learn one per problem.
        max_iter, tol, prune, add_level: as :func:`~.sbl_em.sbl` with ``update="fast"``.

    Returns:
        :class:`RecoveryResult` with ``x`` of shape ``(B, N)`` (``(N,)`` for one problem),
        ``support`` (sorted indices per problem), ``n_iter`` and ``converged`` per problem;
        ``info`` has ``gamma`` (``(B, N)``), ``noise_var`` and ``final_cost`` per problem, and
        ``time`` (s) and ``time_per_problem``.
    """
    t0 = time.perf_counter()
    At = check_dictionary(A, "A")
    M, N = At.shape
    Yt, as_numpy, single = stack_problems(Y, M, At.dtype, At.device)
    check_positive(noise_var, "noise_var", allow_none=True, allow_zero=True)
    check_int(max_iter, "max_iter")
    check_positive(tol, "tol", allow_zero=True)
    check_positive(prune, "prune", allow_zero=True)
    if prune >= 1:
        raise RecoveryError(f"prune must be < 1, got {prune}")
    if add_level is not None:
        check_positive(add_level, "add_level")
        if add_level >= 1:
            raise RecoveryError(f"add_level is a false discovery rate and must be < 1, got {add_level}")
    out_dtype = Yt.dtype
    floor_dtype = real_dtype(out_dtype)
    work = torch.complex128 if out_dtype.is_complex else torch.float64
    Bn = Yt.shape[0]
    # The Gram matrix and a first capacity of 16 columns per problem (more checked as it grows).
    check_memory((N * N + Bn * (4 * N + 16 * (N + 16))) * torch.finfo(torch.float64).bits / 8
                 * (2 if work.is_complex else 1), f"sbl_batch of {Bn} problems with N = {N}")
    Aw, Yw = At.to(work), Yt.to(work)
    ypow = Yw.abs().pow(2).sum(1) / M
    zero = ypow == 0
    floors = torch.tensor([noise_floor(float(p), floor_dtype) for p in ypow], dtype=torch.float64,
                          device=At.device)
    learn = noise_var is None
    s2 = 0.1 * ypow if noise_var is None else torch.maximum(torch.full_like(ypow, float(noise_var)), floors)
    s2 = torch.where(zero, torch.ones_like(s2), s2)  # a placeholder for problems with y = 0
    st = _FastBatch(Aw, Yw, 1.0 / s2)
    n_iter = torch.zeros(Bn, dtype=torch.long)
    converged = zero.clone().cpu()
    st.frozen |= zero
    for it in range(1, max_iter + 1):
        running = ~st.frozen
        if not bool(running.any()):
            break
        n_iter[st.rows[running].cpu()] = it
        gain, col, new_alpha, is_add, slot = st.best_action(prune, add_level)
        act = running & (gain > tol)
        idle = running & ~act
        # No single step helps: done, unless (learned noise) a noise update still moves.
        done = idle
        if learn and bool(idle.any()):
            moved = st.noise_step(idle, floors, 0.0) > tol
            done = idle & ~moved
            st.since_refresh[idle & moved] = 0
        converged[st.rows[done].cpu()] = True
        st.frozen |= done
        if bool(act.any()):
            st.apply(act, col, new_alpha, is_add, slot, gain)
            st.since_refresh[act] += 1
            noisy = torch.zeros_like(act)
            if learn and it % _NOISE_EVERY == 0:
                noisy = act & (st.noise_step(act, floors, tol) > 0)
                st.since_refresh[noisy] = 0
            stale = act & ~noisy & (st.since_refresh >= _REFRESH_EVERY)
            if bool(stale.any()):
                st.full_refresh(stale)
                st.since_refresh[stale] = 0
        st.compact_if_worth_it()
    return finish(st.result(zero, n_iter, converged, out_dtype, t0, single, learn, noise_var), as_numpy)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm``, with a batch of one run as a batch of two: torch sends a lone product down
    another kernel (matrix-vector), whose rounding differs, and a problem's numbers must not
    depend on how many problems share its call."""
    if a.shape[0] == 1:
        return torch.bmm(a.expand(2, *a.shape[1:]), b.expand(2, *b.shape[1:]))[:1]
    return torch.bmm(a, b)


def _rows_times(Y: torch.Tensor, A: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``Y @ A`` row by row without a GEMM (whose rounding depends on the number of rows): the
    sum over ``M`` runs in the same order for any batch. ``chunk`` rows at a time bound the
    ``chunk x M x N`` temporary."""
    out = torch.empty(Y.shape[0], A.shape[1], dtype=torch.promote_types(Y.dtype, A.dtype), device=Y.device)
    for i in range(0, Y.shape[0], chunk):
        out[i:i + chunk] = (Y[i:i + chunk, :, None] * A[None]).sum(1)
    return out


class _FastBatch:
    """Fast SBL's active-set statistics for a batch of problems (see ``sbl_fast._FastSBLState``).

    Problem ``b`` has ``K[b]`` active columns in slots of capacity ``cap``: ``idx[b, k]`` is the
    column in slot ``k`` (-1 for a free slot), with ``alpha``, ``mu``, ``Sig`` and the Gram
    column ``Bm[b, :, k] = Phi^H phi_idx``; free slots hold zeros in ``Sig``, ``mu`` and ``Bm``
    (so they drop out of every product) and precision 1. Finished problems are ``frozen``: their
    rows are never changed again and are moved out (``done_rows``) when enough have finished.
    """

    def __init__(self, A: torch.Tensor, Y: torch.Tensor, beta: torch.Tensor):
        self.A, self.Y = A, Y
        self.M, self.N = A.shape
        self.dev = A.device
        self.complex_ = A.is_complex()
        self.G = A.mH @ A                                           # Gram matrix, columns Phi^H phi_i
        self.d = (A.conj() * A).real.sum(0)                         # ||phi_m||^2
        Bn = Y.shape[0]
        self.rows = torch.arange(Bn, device=self.dev)               # original problem of each row
        self.yy = Y.abs().pow(2).sum(1)
        self.alpha_floor = 1e-12 * float(self.d.mean()) * self.M / self.yy.clamp_min(1e-300)
        self.Pty = _rows_times(Y, A.conj())                          # rows: Phi^H y
        self.beta = beta.clone()
        self.tiny_s = 1e-8 * self.beta[:, None] * self.d
        self.S = self.beta[:, None] * self.d
        self.Q = self.beta[:, None] * self.Pty
        self.cost = self.M * torch.log(1.0 / self.beta) + self.beta * self.yy
        self.K = torch.zeros(Bn, dtype=torch.long, device=self.dev)
        self.pos = torch.full((Bn, self.N), -1, dtype=torch.long, device=self.dev)
        self.frozen = torch.zeros(Bn, dtype=torch.bool, device=self.dev)
        self.since_refresh = torch.zeros(Bn, dtype=torch.long, device=self.dev)
        self.idx: torch.Tensor
        self.alpha: torch.Tensor
        self.mu: torch.Tensor
        self.Sig: torch.Tensor
        self.Bm: torch.Tensor
        self.cap = 0
        self._grow(min(self.N, 16))
        self.done_rows: list[tuple] = []                            # (rows, x, gamma, beta, cost)

    # -- storage -------------------------------------------------------------------------------
    def _grow(self, cap: int):
        Bn, old = self.rows.numel(), self.cap
        check_memory(Bn * (self.N + cap + 2) * cap * (16 if self.complex_ else 8),
                     f"sbl_batch active sets of {Bn} problems ({cap} columns each)")
        dt, rdt = self.A.dtype, torch.float64
        idx = torch.full((Bn, cap), -1, dtype=torch.long, device=self.dev)
        alpha = torch.ones(Bn, cap, dtype=rdt, device=self.dev)
        mu = torch.zeros(Bn, cap, dtype=dt, device=self.dev)
        Sig = torch.zeros(Bn, cap, cap, dtype=dt, device=self.dev)
        Bm = torch.zeros(Bn, self.N, cap, dtype=dt, device=self.dev)
        if old:
            idx[:, :old], alpha[:, :old], mu[:, :old] = self.idx, self.alpha, self.mu
            Sig[:, :old, :old], Bm[:, :, :old] = self.Sig, self.Bm
        self.idx, self.alpha, self.mu, self.Sig, self.Bm, self.cap = idx, alpha, mu, Sig, Bm, cap

    def _take(self, keep: torch.Tensor):
        for name in ("Y", "rows", "yy", "alpha_floor", "Pty", "beta", "tiny_s", "S", "Q", "cost", "K", "pos",
                     "frozen", "since_refresh", "idx", "alpha", "mu", "Sig", "Bm"):
            setattr(self, name, getattr(self, name)[keep])

    def compact_if_worth_it(self):
        """Move finished problems out once they are a quarter of the rows (their results kept)."""
        n_done = int(self.frozen.sum())
        if n_done == 0 or (n_done < 0.25 * self.rows.numel() and n_done < self.rows.numel()):
            return
        gone = self.frozen
        self.done_rows.append(self._final(gone))
        self._take(~gone)

    def abs2(self, v):
        return v.real * v.real + v.imag * v.imag if v.is_complex() else v * v

    def occupied(self):
        return self.idx >= 0

    # -- choosing a step (``sbl_fast._fast_best_action`` per row) -----------------------------------
    def best_action(self, prune: float, add_level):
        a_gain, a_col, a_alpha, a_ok = self._best_add(prune, add_level)
        c_gain, c_slot, c_alpha, c_ok = self._best_change()
        use_change = c_ok & (~a_ok | (c_gain > a_gain))
        zero = torch.zeros_like(a_gain)
        gain = torch.where(use_change, c_gain, torch.where(a_ok, a_gain, zero))
        cols = torch.gather(self.idx, 1, c_slot[:, None]).squeeze(1)
        col = torch.where(use_change, cols, a_col)
        new_alpha = torch.where(use_change, c_alpha, a_alpha)
        return gain, col, new_alpha, ~use_change & a_ok, c_slot

    def _best_add(self, prune, add_level):
        s = torch.maximum(self.S, self.tiny_s)
        score = self.abs2(self.Q) / s
        score = torch.where(self.pos >= 0, torch.full_like(score, -math.inf), score)
        m = torch.argmax(score, dim=1)
        top = torch.gather(score, 1, m[:, None]).squeeze(1)
        cand = top > 1.0
        if add_level is None:
            admissible = torch.full_like(cand, prune <= 0)
        else:
            admissible = self._passes_bh(score, top, cand, add_level)
        if prune > 0:
            fallback = cand & ~admissible
            if bool(fallback.any()):
                g_new = (score - 1.0) / s
                act_max = torch.where(self.occupied(), 1.0 / self.alpha, torch.zeros_like(self.alpha)).amax(1)
                gmax = torch.maximum(g_new.amax(1), act_max)
                score2 = torch.where(g_new >= prune * gmax[:, None], score, torch.full_like(score, -math.inf))
                m2 = torch.argmax(score2, dim=1)
                top2 = torch.gather(score2, 1, m2[:, None]).squeeze(1)
                m = torch.where(fallback, m2, m)
                top = torch.where(fallback, top2, top)
                cand = cand & (admissible | (top2 > 1.0))
        else:
            cand = cand & admissible
        r = top - 1.0
        gain = r - torch.log1p(r)
        new_alpha = torch.maximum(torch.gather(s, 1, m[:, None]).squeeze(1) / r, self.alpha_floor)
        return gain, m, new_alpha, cand

    def _passes_bh(self, score, top, cand, level):
        """Benjamini-Hochberg at ``level`` on each row's scores (``sbl_fast._passes_add_test``)."""
        n = self.N - self.K
        bounds = {v: torch.from_numpy(np.array(_bh_bounds(level, self.complex_, v))).to(self.dev)
                  for v in torch.unique(n).cpu().tolist()}
        first = torch.empty_like(top)
        last = torch.empty_like(top)
        for v, b in bounds.items():
            first[n == v], last[n == v] = b[0], b[-1]
        passes = top >= first
        need = cand & ~passes
        if not bool(need.any()):
            return passes
        counts = torch.where(need, (score >= last[:, None]).sum(1), torch.zeros_like(n))
        kk = int(counts.max())
        if kk == 0:
            return passes
        vals = torch.topk(score, kk, dim=1).values                  # descending
        table = torch.full((score.shape[0], kk), math.inf, dtype=score.dtype, device=self.dev)
        for v, b in bounds.items():
            b = b[:kk]
            table[n == v, :b.numel()] = b
        k = torch.arange(kk, device=self.dev)
        ok = ((vals >= table) & (k[None, :] < counts[:, None])).any(1)
        return passes | (need & ok)

    def _best_change(self):
        occ = self.occupied()
        a = self.alpha
        sjj = torch.where(occ, torch.diagonal(self.Sig, dim1=1, dim2=2).real, torch.ones_like(a))
        inv = 1.0 / sjj
        s = inv - a
        m2 = self.abs2(self.mu)
        theta = m2 * (inv * inv) - s
        keep = theta > 0
        floor = self.alpha_floor[:, None]
        new_alpha = torch.maximum(s * s / theta, floor)
        t = (new_alpha - a) * sjj
        w = m2 * inv
        gain = torch.where(keep, torch.log(new_alpha / a) - torch.log1p(t) - w * t / (1.0 + t),
                           torch.log1p(s / a) - w)
        gain = torch.where(torch.isnan(gain) | ~occ, torch.full_like(gain, -math.inf), gain)
        # Keep at least one column: deleting the last would leave nothing to re-estimate.
        gain = torch.where((self.K == 1)[:, None] & ~keep, torch.full_like(gain, -math.inf), gain)
        j = torch.argmax(gain, dim=1)
        g = torch.gather(gain, 1, j[:, None]).squeeze(1)
        kept = torch.gather(keep, 1, j[:, None]).squeeze(1)
        na = torch.where(kept, torch.gather(new_alpha, 1, j[:, None]).squeeze(1), torch.full_like(g, math.inf))
        return g, j, na, (self.K > 0) & (g > -math.inf)

    # -- carrying a step out ------------------------------------------------------------------------
    def apply(self, act, col, new_alpha, is_add, slot, gain):
        """One rank-one step per acting row: add column ``col``, or re-estimate / delete ``slot``."""
        add = act & is_add
        change = act & ~is_add
        delete = change & torch.isinf(new_alpha)
        if bool(add.any()) and int(self.K[add].max()) >= self.cap:
            self._grow(min(2 * self.cap, self.N))
        b = self.beta
        r = torch.arange(self.rows.numel(), device=self.dev)
        col = col.clamp_min(0)  # -1 (no column) only on rows that do not act
        dt = self.A.dtype
        # Change: z = Sigma[:, j]; add: z = beta Sigma Phi_A^H phi_i.
        Sj = torch.gather(self.Sig, 2, slot[:, None, None].expand(-1, self.cap, 1)).squeeze(2)
        brow = self.Bm[r, col]                                      # (rows, cap): phi_col^H Phi_A ... conj'd below
        comm = _bmm(self.Sig, brow.conj().unsqueeze(2)).squeeze(2) * b[:, None]
        z = torch.where(add[:, None], comm, torch.where(change[:, None], Sj, torch.zeros_like(Sj)))
        v = _bmm(self.Bm, z.unsqueeze(2)).squeeze(2)                    # Phi^H Phi_A z
        gcol = self.G[:, col].T                                     # (rows, N): Phi^H phi_col
        S_col = torch.gather(self.S, 1, col[:, None]).squeeze(1)
        Q_col = torch.gather(self.Q, 1, col[:, None]).squeeze(1)
        fin = torch.where(add, new_alpha, torch.ones_like(new_alpha))
        s_ii = 1.0 / (fin + S_col)
        mu_i = s_ii * Q_col
        s_jj = torch.gather(Sj, 1, slot[:, None]).squeeze(1).real
        old = torch.gather(self.alpha, 1, slot[:, None]).squeeze(1)
        step = torch.where(delete | add, torch.ones_like(old), new_alpha - old)
        kappa = torch.where(delete, 1.0 / s_jj, 1.0 / (s_jj + 1.0 / step))
        mu_j = torch.gather(self.mu, 1, slot[:, None]).squeeze(1)
        # u: add e = beta (g - v); change comm = beta v. S += c |u|^2, Q += cq u, Sigma += cs z z^H,
        # mu += cm z (sbl_fast's add / reestimate / delete, one row each).
        u = torch.where(add[:, None], (gcol - v) * b[:, None], v * b[:, None])
        c = torch.where(add, -s_ii, kappa)
        cq = torch.where(add, -mu_i, kappa * mu_j)
        cs = torch.where(add, s_ii, -kappa)
        cm = torch.where(add, -mu_i, -(kappa * mu_j))
        a2 = act[:, None]
        self.S = torch.where(a2, self.S + c[:, None] * self.abs2(u), self.S)
        self.Q = torch.where(a2, self.Q + cq[:, None].to(dt) * u, self.Q)
        self.Sig = torch.where(act[:, None, None], self.Sig + cs[:, None, None].to(dt) * (z[:, :, None] * z.conj()[:, None, :]),
                               self.Sig)
        self.mu = torch.where(a2, self.mu + cm[:, None].to(dt) * z, self.mu)
        self.cost = torch.where(act, self.cost - gain, self.cost)
        # Re-estimated precisions.
        reest = change & ~delete
        if bool(reest.any()):
            self.alpha[r[reest], slot[reest]] = new_alpha[reest]
        if bool(delete.any()):
            rd, jd = r[delete], slot[delete]
            self.Sig[rd, jd, :] = 0
            self.Sig[rd, :, jd] = 0
            self.mu[rd, jd] = 0
            self.Bm[rd, :, jd] = 0
            self.pos[rd, self.idx[rd, jd]] = -1
            self.idx[rd, jd] = -1
            self.alpha[rd, jd] = 1.0
            self.K[rd] -= 1
        if bool(add.any()):
            ra, ia = r[add], col[add]
            k = torch.argmax((self.idx[ra] < 0).to(torch.int32), dim=1)  # the first free slot
            cvec = (-s_ii[add])[:, None].to(dt) * comm[add]
            self.Sig[ra, :, k] = cvec
            self.Sig[ra, k, :] = cvec.conj()
            self.Sig[ra, k, k] = s_ii[add].to(dt)
            self.mu[ra, k] = mu_i[add]
            self.Bm[ra, :, k] = gcol[add]
            self.idx[ra, k] = ia
            self.alpha[ra, k] = new_alpha[add]
            self.pos[ra, ia] = k
            self.K[ra] += 1

    # -- noise and refreshes ---------------------------------------------------------------------------
    def _posterior(self, rows, beta):
        """``(Sigma, mu, L^-1, cost, ok)`` of the active sets of ``rows`` at precision ``beta``."""
        idx, occ = self.idx[rows], self.idx[rows] >= 0
        safe = idx.clamp_min(0)
        Bm = self.Bm[rows]
        gram = torch.gather(Bm, 1, safe[:, :, None].expand(-1, -1, self.cap))   # B[idx, :]
        both = occ[:, :, None] & occ[:, None, :]
        H = torch.where(both, gram * beta[:, None, None], torch.zeros_like(gram))
        diag = torch.where(occ, self.alpha[rows], torch.ones_like(self.alpha[rows]))
        H = H + torch.diag_embed(diag.to(H.dtype))
        L, info = torch.linalg.cholesky_ex(H)
        ok = info == 0
        eye = torch.eye(self.cap, dtype=H.dtype, device=self.dev).expand_as(H)
        L = torch.where(ok[:, None, None], L, eye)
        Li = torch.linalg.solve_triangular(L, eye, upper=False)
        Sigma = _bmm(Li.mH, Li)
        Sigma = torch.where(both, Sigma, torch.zeros_like(Sigma))
        pty = torch.where(occ, torch.gather(self.Pty[rows], 1, safe), torch.zeros_like(self.mu[rows]))
        mu = beta[:, None].to(H.dtype) * _bmm(Sigma, pty.unsqueeze(2)).squeeze(2)
        logdet = (self.M * torch.log(1.0 / beta) - torch.where(occ, torch.log(self.alpha[rows]), 0.0).sum(1)
                  + 2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2).real).sum(1))
        quad = beta * (self.yy[rows] - (pty.conj() * mu).sum(1).real)
        return Sigma, mu, Li, logdet + quad, ok

    def _set_posterior(self, rows, beta, post):
        Sigma, mu, Li, cost, _ = post
        Bm = self.Bm[rows]
        W = _bmm(Bm, Li.mH)
        self.Sig[rows], self.mu[rows], self.cost[rows] = Sigma, mu, cost
        self.S[rows] = beta[:, None] * self.d - (beta * beta)[:, None] * self.abs2(W).sum(2)
        self.Q[rows] = beta[:, None] * self.Pty[rows] - beta[:, None] * _bmm(Bm, mu.unsqueeze(2)).squeeze(2)

    def full_refresh(self, mask):
        rows = torch.nonzero(mask).flatten()
        post = self._posterior(rows, self.beta[rows])
        if not bool(post[4].all()):
            bad = int(self.rows[rows[~post[4]][0]])
            raise RecoveryError(f"sbl_batch: problem {bad}: the active columns became numerically dependent "
                                "(noise variance too small for them)")
        self._set_posterior(rows, self.beta[rows], post)

    def noise_step(self, mask, floors, min_change: float):
        """MacKay's noise update for the rows in ``mask``, kept where it lowers the cost; returns
        the relative change applied per row (0 elsewhere). As ``sbl_fast._fast_noise_step``."""
        rows = torch.nonzero(mask).flatten()
        out = torch.zeros(self.rows.numel(), dtype=torch.float64, device=self.dev)
        if rows.numel() == 0:
            return out
        idx, occ = self.idx[rows], self.idx[rows] >= 0
        P = self.A[:, idx.clamp_min(0)].permute(1, 0, 2)              # (rows, M, cap)
        mu = torch.where(occ, self.mu[rows], torch.zeros_like(self.mu[rows]))
        res = self.Y[rows] - _bmm(P, mu.unsqueeze(2)).squeeze(2)
        resid = self.abs2(res).sum(1)
        sig_d = torch.diagonal(self.Sig[rows], dim1=1, dim2=2).real
        dof = self.K[rows].to(torch.float64) - torch.where(occ, self.alpha[rows] * sig_d, 0.0).sum(1)
        s2 = torch.maximum(resid / torch.clamp(self.M - dof, min=1e-3 * self.M), floors[self.rows[rows]])
        beta = 1.0 / s2
        old = self.beta[rows]
        change = (old / beta - 1.0).abs()
        try_it = ~(((beta - old).abs() <= 1e-12 * old) | (change < min_change))
        if not bool(try_it.any()):
            return out
        sub = rows[try_it]
        post = self._posterior(sub, beta[try_it])
        accept = post[4] & (post[3] <= self.cost[sub])
        if not bool(accept.any()):
            return out
        keep = torch.nonzero(accept).flatten()
        acc_rows = sub[keep]
        nb = beta[try_it][keep]
        self.beta[acc_rows] = nb
        self.tiny_s[acc_rows] = 1e-8 * nb[:, None] * self.d
        self._set_posterior(acc_rows, nb, tuple(p[keep] for p in post))
        out[acc_rows] = change[try_it][keep]
        return out

    # -- results ---------------------------------------------------------------------------------------
    def _final(self, mask):
        rows = torch.nonzero(mask).flatten()
        Sigma, mu, _, cost, ok = self._posterior(rows, self.beta[rows])
        if not bool(ok.all()):
            bad = int(self.rows[rows[~ok][0]])
            raise RecoveryError(f"sbl_batch: problem {bad}: the active columns became numerically dependent "
                                "(noise variance too small for them)")
        n = rows.numel()
        x = torch.zeros(n, self.N, dtype=self.A.dtype, device=self.dev)
        gamma = torch.zeros(n, self.N, dtype=torch.float64, device=self.dev)
        idx, occ = self.idx[rows], self.idx[rows] >= 0
        rr = torch.arange(n, device=self.dev)[:, None].expand_as(idx)
        x[rr[occ], idx[occ]] = mu[occ]
        gamma[rr[occ], idx[occ]] = 1.0 / self.alpha[rows][occ]
        return self.rows[rows], x, gamma, self.beta[rows], cost

    def result(self, zero, n_iter, converged, out_dtype, t0, single, learn, noise_var):
        parts = self.done_rows + ([self._final(torch.ones_like(self.frozen))] if self.rows.numel() else [])
        Bn = zero.numel()
        x = torch.zeros(Bn, self.N, dtype=out_dtype, device=self.dev)
        gamma = torch.zeros(Bn, self.N, dtype=torch.float64, device=self.dev)
        nv = torch.zeros(Bn, dtype=torch.float64, device=self.dev)
        cost = torch.zeros(Bn, dtype=torch.float64, device=self.dev)
        for rows, xr, gr, br, cr in parts:
            x[rows], gamma[rows], nv[rows], cost[rows] = xr.to(out_dtype), gr, 1.0 / br, cr
        # Problems with y = 0: x = 0 and the noise they were given (0 when learned), as ``sbl``.
        x[zero], gamma[zero], cost[zero] = 0, 0, 0
        nv[zero] = 0.0 if learn else float(noise_var)
        gamma = gamma.to(real_dtype(out_dtype))
        support = [torch.nonzero(gamma[b] > 0).flatten().cpu() for b in range(Bn)]
        elapsed = time.perf_counter() - t0
        info = {"gamma": gamma, "noise_var": nv, "final_cost": cost, "time": elapsed, "time_per_problem": elapsed / Bn}
        if single:
            info.update(gamma=gamma[0], noise_var=float(nv[0]), final_cost=float(cost[0]))
            return RecoveryResult(x=x[0], support=support[0], n_iter=int(n_iter[0]), converged=bool(converged[0]),
                                  info=info)
        return RecoveryResult(x=x, support=support, n_iter=n_iter.tolist(), converged=converged.tolist(), info=info)
