"""Fast sparse Bayesian learning: Tipping and Faul's (2003) sequential marginal-likelihood
maximisation, in numpy on the CPU (``sbl(..., update="fast")``, the default of :func:`~.sbl_em.sbl`).

The cost ``log|C| + y^H C^-1 y`` separates in one hyperparameter:
``cost = cost_without_j - l_j(alpha_j)``, ``l(alpha) = log(alpha / (alpha + s)) + |q|^2 / (alpha + s)``
with ``s``, ``q`` the "sparsity" and "quality" of column j measured against C without j. ``l``
has a closed-form maximiser (``alpha = s^2 / (|q|^2 - s)`` if ``|q|^2 > s``, else
``alpha = inf``, i.e. prune), so each step adds, deletes or re-estimates the one column that
lowers the cost most, and works only with the active set. ``alpha = 1 / gamma`` is the prior
precision.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ._common import RecoveryError, RecoveryResult, logger, noise_floor, real_dtype


class _FastSBLState:
    """Active-set statistics of fast SBL, kept up to date by rank-one updates.

    Float64 / complex128 numpy on the CPU: the method is a long chain of tiny sequential
    steps (vectors of length N, matrices K x K), for which numpy's per-call overhead is lower
    than torch's. ``B`` holds the Gram columns ``Phi^H phi_a`` of the active columns, so that
    ``S`` and ``Q`` (for all N columns) update in O(N K) per step.

    The per-column arrays live in buffers with room for more columns than are active (doubled
    when full): adding a column writes one column of ``B`` instead of copying all of it. ``B`` and the active columns of ``Phi`` are
    column-major for that reason. ``idx``, ``alpha``, ``mu``, ``Sigma`` and ``B`` are views
    of the first ``K`` entries; ``pos[m]`` is column m's position in them, or -1.
    """

    def __init__(self, Phi: np.ndarray, y: np.ndarray, beta: float):
        self.Phi, self.y = Phi, y
        self.M, self.N = Phi.shape
        self.complex_ = Phi.dtype.kind == "c"
        self.d = np.einsum("ij,ij->j", Phi.conj(), Phi).real     # ||phi_m||^2
        self.set_beta(beta)
        self.yy = float(np.vdot(y, y).real)
        # Smallest precision (largest variance) allowed: 1e12 times the signal scale.
        self.alpha_floor = 1e-12 * float(self.d.mean()) * self.M / max(self.yy, 1e-300)
        self.Pty = Phi.conj().T @ y                               # Phi^H y
        self.K = 0
        self.pos = np.full(self.N, -1, dtype=np.int64)
        self._alloc(min(self.N, 64))
        self.S = beta * self.d
        self.Q = beta * self.Pty
        self.cost = self.M * math.log(1.0 / beta) + beta * self.yy

    def _alloc(self, cap: int):
        """(Re)allocate the buffers for ``cap`` active columns, keeping the first K."""
        K, dt = self.K, self.Phi.dtype
        old = getattr(self, "_B", None)
        B = np.empty((self.N, cap), dtype=dt, order="F")          # Gram columns Phi^H phi_a
        P = np.empty((self.M, cap), dtype=dt, order="F")          # the active columns phi_a
        Sig = np.empty((cap, cap), dtype=dt)
        mu, alpha, idx = np.empty(cap, dtype=dt), np.empty(cap), np.empty(cap, dtype=np.int64)
        if old is not None:
            B[:, :K], P[:, :K], Sig[:K, :K] = self._B[:, :K], self._P[:, :K], self._Sig[:K, :K]
            mu[:K], alpha[:K], idx[:K] = self._mu[:K], self._alpha[:K], self._idx[:K]
        self._B, self._P, self._Sig, self._mu, self._alpha, self._idx = B, P, Sig, mu, alpha, idx

    @property
    def idx(self) -> np.ndarray:
        return self._idx[:self.K]

    @property
    def alpha(self) -> np.ndarray:
        return self._alpha[:self.K]

    @property
    def mu(self) -> np.ndarray:
        return self._mu[:self.K]

    @property
    def Sigma(self) -> np.ndarray:
        return self._Sig[:self.K, :self.K]

    @property
    def B(self) -> np.ndarray:
        return self._B[:, :self.K]

    def abs2(self, v: np.ndarray) -> np.ndarray:
        """``|v|^2`` elementwise, real."""
        return v.real * v.real + v.imag * v.imag if self.complex_ else v * v

    def set_beta(self, beta: float):
        """Set the noise precision (statistics must then be refreshed)."""
        self.beta = beta
        # S below this is rounding noise (the rank-one updates lose a few digits): the column
        # is already explained by the active ones and must not enter (H would be singular).
        self.tiny_s = 1e-8 * beta * self.d

    def posterior(self, beta: float):
        """``(Sigma, mu, L^-1, cost)`` of the active set at noise precision ``beta``, from scratch.

        ``L`` is the Cholesky factor of ``Sigma^-1 = beta Phi_A^H Phi_A + diag(alpha)``. Only
        K x K work: a noise update is judged by its cost before ``S`` and ``Q`` are touched.
        Raises :class:`RecoveryError` if the active columns are numerically dependent.
        """
        K = self.K
        if K == 0:
            e = np.zeros((0, 0), dtype=self.Phi.dtype)
            return e, np.zeros(0, dtype=self.Phi.dtype), e, self.M * math.log(1.0 / beta) + beta * self.yy
        idx = self.idx
        H = self._B[idx, :K] * beta                               # beta Phi_A^H Phi_A
        H.flat[::K + 1] += self._alpha[:K]
        L, Li = _cholesky_and_inverse(H)
        Sigma = Li.conj().T @ Li
        pty = self.Pty[idx]
        mu = beta * (Sigma @ pty)
        logdet = self.M * math.log(1.0 / beta) - float(np.log(self._alpha[:K]).sum()) \
            + 2.0 * float(np.log(np.diagonal(L).real).sum())
        quad = beta * (self.yy - float(np.vdot(pty, mu).real))
        return Sigma, mu, Li, logdet + quad

    def set_posterior(self, Sigma, mu, Li, cost):
        """Install a :meth:`posterior` (at the current ``beta``) and recompute S and Q from it."""
        b, K = self.beta, self.K
        self._Sig[:K, :K] = Sigma
        self._mu[:K] = mu
        self.cost = cost
        B = self._B[:, :K]
        W = B @ Li.conj().T                                       # rows: phi_m^H Phi_A L^-H
        self.S = b * self.d - (b * b) * np.einsum("ij,ij->i", W, W.conj()).real
        self.Q = b * self.Pty - b * (B @ mu)

    def full_refresh(self):
        """Recompute Sigma, mu, S, Q and the cost from scratch (after a noise change, and
        now and then against the drift of the rank-one updates)."""
        self.set_posterior(*self.posterior(self.beta))

    def reestimate(self, j: int, new_alpha: float):
        """Change the precision of active position ``j`` (rank-one downdate of Sigma)."""
        K = self.K
        Sig = self._Sig[:K, :K]
        old = self._alpha[j]
        Sj = Sig[:, j].copy()
        kappa = 1.0 / (Sj[j].real + 1.0 / (new_alpha - old))
        mu_j = self._mu[j]
        Sig -= (kappa * Sj)[:, None] * Sj.conj()
        self._mu[:K] -= (kappa * mu_j) * Sj
        comm = self._B[:, :K] @ Sj
        comm *= self.beta
        self.S += kappa * self.abs2(comm)
        self.Q += (kappa * mu_j) * comm
        self._alpha[j] = new_alpha

    def add(self, i: int, new_alpha: float):
        """Bring column ``i`` into the model with precision ``new_alpha``."""
        K = self.K
        if K == self._alpha.size:
            self._alloc(min(2 * K, self.N))
        b = self.beta
        col = self.Phi[:, i]
        gcol = (self.Phi.T @ col.conj()).conj() if self.complex_ else self.Phi.T @ col  # Phi^H phi_i
        B = self._B[:, :K]
        Sig = self._Sig[:K, :K]
        comm = Sig @ self._B[i, :K].conj()                        # Sigma Phi_A^H phi_i
        comm *= b
        s_ii = 1.0 / (new_alpha + self.S[i])
        mu_i = s_ii * self.Q[i]
        e = gcol - B @ comm
        e *= b
        self.S -= s_ii * self.abs2(e)
        self.Q -= mu_i * e
        Sig += (s_ii * comm)[:, None] * comm.conj()
        c = -s_ii * comm
        self._Sig[:K, K] = c
        self._Sig[K, :K] = c.conj()
        self._Sig[K, K] = s_ii
        self._mu[:K] -= mu_i * comm
        self._mu[K] = mu_i
        self._B[:, K] = gcol
        self._P[:, K] = col
        self._idx[K] = i
        self._alpha[K] = new_alpha
        self.pos[i] = K
        self.K = K + 1

    def delete(self, j: int):
        """Remove active position ``j`` from the model (alpha_j -> infinity)."""
        K = self.K
        Sig = self._Sig[:K, :K]
        Sj = Sig[:, j].copy()
        s_jj = Sj[j].real
        mu_j = self._mu[j]
        comm = self._B[:, :K] @ Sj
        comm *= self.beta
        self.S += self.abs2(comm) / s_jj
        self.Q += (mu_j / s_jj) * comm
        Sig -= (Sj / s_jj)[:, None] * Sj.conj()
        self._mu[:K] -= (mu_j / s_jj) * Sj
        # Close the gap, keeping the others in order (numpy buffers overlapping copies).
        gone = self._idx[j]
        if j < K - 1:
            self._Sig[j:K - 1, :K] = self._Sig[j + 1:K, :K]
            self._Sig[:K - 1, j:K - 1] = self._Sig[:K - 1, j + 1:K]
            for a in (self._mu, self._alpha, self._idx):
                a[j:K - 1] = a[j + 1:K]
            self._B[:, j:K - 1] = self._B[:, j + 1:K]
            self._P[:, j:K - 1] = self._P[:, j + 1:K]
            self.pos[self._idx[j:K - 1]] = np.arange(j, K - 1)
        self.pos[gone] = -1
        self.K = K - 1

    def residual_and_dof(self):
        """``||y - Phi_A mu||^2`` and ``sum_j (1 - alpha_j Sigma_jj)`` (the well-determined count)."""
        K = self.K
        r = self.y - self._P[:, :K] @ self._mu[:K]
        dof = K - float(self._alpha[:K] @ np.diagonal(self._Sig[:K, :K]).real)
        return float(np.vdot(r, r).real), dof


def _cholesky_and_inverse(H: np.ndarray):
    """Lower Cholesky factor of a Hermitian positive definite ``H`` and its inverse.

    Through LAPACK's POTRF / TRTRI when scipy is there (a triangular inverse, with less call
    overhead than ``np.linalg.cholesky`` + ``np.linalg.inv``); numpy otherwise. Raises :class:`RecoveryError` if ``H`` is not positive definite.
    """
    funcs = _fast_lapack().get(H.dtype.char)
    if funcs is None:
        try:
            L = np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            raise RecoveryError(_DEPENDENT_MSG) from None
        return L, np.linalg.inv(L)
    potrf, trtri = funcs
    L, info = potrf(H, lower=1, clean=1)
    if info != 0:
        raise RecoveryError(_DEPENDENT_MSG)
    Li, info = trtri(L, lower=1)
    if info != 0:
        raise RecoveryError(_DEPENDENT_MSG)
    return L, Li


_DEPENDENT_MSG = ("sbl (fast): the active columns became numerically dependent "
                  "(noise variance too small for them); try update='em'")


@functools.lru_cache(maxsize=1)
def _fast_lapack() -> dict:
    """POTRF / TRTRI by numpy dtype character ('d', 'D'), or {} without scipy."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scipy is in the recovery extra
        return {}
    return {"d": (lapack.dpotrf, lapack.dtrtri), "D": (lapack.zpotrf, lapack.ztrtri)}


def _ell(alpha, s, q2):
    """The cost reduction ``l(alpha) = log(alpha / (alpha + s)) + |q|^2 / (alpha + s)``."""
    return -np.log1p(s / alpha) + q2 / (alpha + s)


def _fast_best_action(st: _FastSBLState, prune: float, add_level: float | None):
    """Pick the add / delete / re-estimate step that lowers the cost most.

    Each column's cost term has its optimum at ``alpha = s^2 / (|q|^2 - s)`` if ``|q|^2 > s``
    (else at infinity: delete). If ``y`` did not depend on column j, ``|q_j|^2 / s_j`` would
    have mean 1, so taking every column with ``|q|^2 > s`` lets in many that only fit noise
    (with a learned noise variance this snowballs: the noise estimate shrinks and more enter).
    An inactive column therefore enters only if it passes a Benjamini-Hochberg test at false
    discovery rate ``add_level`` against that null, or if its variance would be at least
    ``prune`` times the largest (see :func:`sbl`). Active columns are re-estimated or deleted
    by the plain rule. Returns ``(gain, column, new_alpha)``, ``new_alpha = inf`` for a
    deletion; the gain is the exact cost decrease of that step.
    """
    add = _best_add(st, prune, add_level)
    if st.K:
        change = _best_change(st)
        if add is None or change[0] > add[0]:
            return change
    return add if add is not None else (0.0, 0, math.inf)


def _best_add(st: _FastSBLState, prune: float, add_level: float | None):
    """``(gain, column, alpha)`` of the best admissible inactive column, or None.

    For an inactive column ``s = S`` and ``q = Q``; the gain ``r - log(1 + r)`` with
    ``r = |q|^2 / s - 1`` grows with the score ``|q|^2 / s``, so the best admissible column
    is the one with the highest admissible score.
    """
    # Columns with (numerically) no sparsity left are already explained: score 0.
    s = np.maximum(st.S, st.tiny_s)
    score = st.abs2(st.Q) / s
    score[st.idx] = -np.inf
    m = int(np.argmax(score))
    top = float(score[m])
    if top <= 1.0:
        return None
    if add_level is None:
        admissible = prune <= 0              # the original rule: any column with |q|^2 > s
    else:
        n = st.N - st.K
        # A top score past the rank-1 bound passes without sorting anything.
        admissible = top >= _bh_bounds(add_level, st.complex_, n)[0] or \
            _passes_add_test(score, add_level, st.complex_, n)
    if not admissible:
        if prune <= 0:
            return None
        # gamma = theta / s^2 = (score - 1) / s for the candidates.
        g_new = score - 1.0
        g_new /= s
        gmax = max(float(g_new.max()), 1.0 / float(st.alpha.min()) if st.K else 0.0)
        score = np.where(g_new >= prune * gmax, score, -np.inf)
        m = int(np.argmax(score))
        top = float(score[m])
        if top <= 1.0:
            return None
    r = top - 1.0
    return r - math.log1p(r), m, max(float(s[m]) / r, st.alpha_floor)


def _best_change(st: _FastSBLState):
    """``(gain, column, alpha)`` of the best re-estimation or deletion of an active column.

    For an active column, ``Sigma_jj = 1 / (alpha_j + s_j)`` and ``mu_j = Sigma_jj q_j``; the
    textbook ``s = alpha S / (alpha - S)`` cancels catastrophically once ``s >> alpha``
    (small noise), this form does not. With ``w = |q|^2 / (alpha + s) = |mu|^2 / Sigma_jj``:
    deleting gains ``-l(alpha) = log(1 + s / alpha) - w``; moving alpha by ``d`` to the
    optimum gains ``l(new) - l(alpha) = log(new / alpha) - log(1 + t) - w t / (1 + t)`` with
    ``t = d Sigma_jj``, written without the difference of two large ``l`` values (each of
    order ``|q|^2 / s``, huge at small noise, while their difference is small).
    """
    a = st.alpha
    sjj = np.diagonal(st.Sigma).real
    inv = 1.0 / sjj                                   # alpha + s
    s = inv - a
    m2 = st.abs2(st.mu)
    theta = m2 * (inv * inv) - s                      # |q|^2 - s
    keep = theta > 0
    # Outside `keep` new_alpha and the re-estimation gain are meaningless (errstate is off in
    # the loop); np.where picks the deletion gain there.
    new_alpha = np.maximum(s * s / theta, st.alpha_floor)
    t = (new_alpha - a) * sjj
    w = m2 * inv
    gain = np.where(keep, np.log(new_alpha / a) - np.log1p(t) - w * t / (1.0 + t), np.log1p(s / a) - w)
    # A step whose gain rounding cannot resolve (NaN) is not taken.
    gain[np.isnan(gain)] = -np.inf
    if a.size == 1 and not keep[0]:
        # Keep at least one column: deleting the last would leave nothing to re-estimate.
        gain[0] = -np.inf
    j = int(np.argmax(gain))
    return float(gain[j]), int(st.idx[j]), float(new_alpha[j]) if keep[j] else math.inf


def _passes_add_test(score, level: float, complex_: bool, n: int) -> bool:
    """Does the highest score pass Benjamini-Hochberg at false discovery rate ``level``?

    If ``y`` did not depend on column j, ``|q_j|^2 / s_j`` would be chi-square(1) (real) or
    exponential (complex) with mean 1. BH admits the ``k`` highest scores, ``k`` the largest
    rank whose p-value is at most ``level k / n`` (``n`` inactive columns); it admits any
    column only if it admits the highest. The test runs on the scores themselves: the k-th
    highest passes its p-value bound iff it reaches the score bound ``b_k`` of
    :func:`_bh_bounds`. Only scores with p-value <= ``level`` (score >= ``b_n``) can count,
    so just those few are sorted.
    """
    b = _bh_bounds(level, complex_, n)
    z = score[score >= b[-1]]
    if z.size == 0:
        return False
    z.sort()
    return bool((z[::-1] >= b[:z.size]).any())


@functools.lru_cache(maxsize=256)
def _bh_bounds(level: float, complex_: bool, n: int) -> np.ndarray:
    """Score bounds ``b_k``, k = 1..n: a null p-value is <= ``level k / n`` iff the score is >= ``b_k``.

    Real: ``p = erfc(sqrt(z / 2)) = 2 Phi(-sqrt(z))``, so ``b_k = Phi^-1(level k / (2 n))^2``;
    complex: ``p = exp(-z)``, ``b_k = -log(level k / n)``. Decreasing in k; cached, since
    ``n`` (the number of inactive columns) takes few values in a run.
    """
    p = level * torch.arange(1, max(n, 1) + 1, dtype=torch.float64) / max(n, 1)
    b = -torch.log(p) if complex_ else torch.special.ndtri(0.5 * p) ** 2
    out = b.numpy()
    out.flags.writeable = False
    return out


def _fast_noise_step(st: _FastSBLState, floor: float, min_change: float = 0.0) -> float:
    """MacKay's noise update ``sigma2 = ||y - Phi mu||^2 / (M - dof)``, kept only if it lowers
    the cost (so the cost stays monotone). Returns the relative change of sigma2 applied.

    A change smaller than ``min_change`` (relative) is not applied: it would cost a full
    recomputation for next to nothing, and it is not lost, since the next noise step measures
    the change from the same old value.
    """
    resid, dof = st.residual_and_dof()
    old_beta = st.beta
    s2 = max(resid / max(st.M - dof, 1e-3 * st.M), floor)
    beta = 1.0 / s2
    change = abs(old_beta / beta - 1.0)
    if abs(beta - old_beta) <= 1e-12 * old_beta or change < min_change:
        return 0.0
    # Judge the new noise by its cost (K x K work) before recomputing S and Q (N x K^2).
    try:
        post = st.posterior(beta)
    except RecoveryError:                    # too small a noise for this active set
        return 0.0
    if not post[3] <= st.cost:               # also rejects a NaN cost
        return 0.0
    st.set_beta(beta)
    st.set_posterior(*post)
    return change


def fast_sbl_loop(A: torch.Tensor, y: torch.Tensor, *, noise_var, max_iter: int, tol: float,
                   prune: float, record_cost: bool, add_level: float | None = 0.1) -> RecoveryResult:
    """One measurement vector of fast SBL; ``A`` and ``y`` are torch tensors (any device)."""
    M, N = A.shape
    rdt = real_dtype(A.dtype)
    dev = A.device
    cdt = np.complex128 if A.is_complex() or y.is_complex() else np.float64
    Phi = A.detach().cpu().numpy().astype(cdt, copy=False)
    yn = y.detach().cpu().numpy().astype(cdt, copy=False)
    ypow = float(np.vdot(yn, yn).real) / M
    if ypow == 0.0:
        return RecoveryResult(x=torch.zeros(N, dtype=A.dtype, device=dev),
                              support=torch.zeros(0, dtype=torch.long), n_iter=0, converged=True,
                              info={"cost": [], "noise_var": 0.0 if noise_var is None else noise_var,
                                    "gamma": torch.zeros(N, dtype=rdt, device=dev),
                                    "n_added": 0, "n_deleted": 0, "n_reestimated": 0})
    floor = noise_floor(ypow, rdt)
    learn = noise_var is None
    s2 = 0.1 * ypow if learn else max(float(noise_var), floor)
    st = _FastSBLState(Phi, yn, 1.0 / s2)
    counts = {"n_added": 0, "n_deleted": 0, "n_reestimated": 0}
    costs = [st.cost] if record_cost else []
    converged = False
    it = 0
    since_refresh = 0
    # The gains of impossible steps (deleting where the optimum is finite, and the reverse)
    # are computed and discarded: no warnings for their infinities and NaNs.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for it in range(1, max_iter + 1):
            gain, m, new_alpha = _fast_best_action(st, prune, add_level)
            if gain <= tol:
                # No single step helps: done, unless a noise update still moves.
                if not learn or _fast_noise_step(st, floor) <= tol:
                    converged = True
                    break
                since_refresh = 0
            else:
                _fast_apply(st, m, new_alpha, counts)
                st.cost -= gain
                since_refresh += 1
                if learn and it % _NOISE_EVERY == 0 and _fast_noise_step(st, floor, tol):
                    since_refresh = 0
                elif since_refresh >= _REFRESH_EVERY:
                    st.full_refresh()
                    since_refresh = 0
            if record_cost:
                costs.append(st.cost)
        Sigma, mu, _, _ = st.posterior(st.beta)
    x = torch.zeros(N, dtype=A.dtype, device=dev)
    idx = torch.from_numpy(np.sort(st.idx))
    order = np.argsort(st.idx)
    x[idx.to(dev)] = torch.from_numpy(mu[order]).to(device=dev, dtype=A.dtype)
    gamma = torch.zeros(N, dtype=rdt, device=dev)
    gamma[idx.to(dev)] = torch.from_numpy(1.0 / st.alpha[order]).to(device=dev, dtype=rdt)
    if not converged:
        logger.info("sbl (fast): not converged after %d iterations", it)
    return RecoveryResult(x=x, support=idx, n_iter=it, converged=converged,
                          info={"cost": costs, "noise_var": 1.0 / st.beta, "gamma": gamma, **counts})


# Full recomputation of the active-set statistics after this many steps without one bounds
# the rounding drift of the rank-one updates. A learned noise variance is updated every
# _NOISE_EVERY steps, and only if it moves by more than ``tol`` relatively: each update
# needs a full recomputation (measurements in benchmarks/recovery/NOTES.md).
_REFRESH_EVERY = 50
_NOISE_EVERY = 3


def _fast_apply(st: _FastSBLState, m: int, new_alpha: float, counts: dict):
    """Carry out the chosen step on column ``m``."""
    pos = int(st.pos[m])
    if pos < 0:
        st.add(m, new_alpha)
        counts["n_added"] += 1
    elif math.isinf(new_alpha):
        st.delete(pos)
        counts["n_deleted"] += 1
    else:
        st.reestimate(pos, new_alpha)
        counts["n_reestimated"] += 1
