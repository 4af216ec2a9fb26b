"""Kronecker-structured sparse Bayesian learning (KroSBL).

For ``y = (A_1 (x) ... (x) A_k) x + n`` with a Kronecker-supported ``x``, the prior variances
are constrained to ``gamma = gamma_1 (x) ... (x) gamma_k`` (He and Joseph, "Bayesian
algorithms for Kronecker-structured sparse vector recovery with application to IRS-MIMO
channel estimation", IEEE TSP 2024). EM then needs:

* **E-step**, exact and matrix-free. ``C = sigma2 I + A Gamma A^H`` equals
  ``(U_1 (x) ... (x) U_k) (sigma2 I + D) (U_1 (x) ... (x) U_k)^H`` where
  ``A_i Gamma_i A_i^H = U_i D_i U_i^H`` are eigendecompositions of ``M_i x M_i`` matrices and
  ``D = D_1 (x) ... (x) D_k``. Hence ``C^{-1}`` is two Kronecker products and a diagonal; the
  posterior mean is ``gamma * A^H C^{-1} y`` and the posterior variances are
  ``gamma - gamma^2 * ((|B_1|^2 (x) ... (x) |B_k|^2)^T w)`` with ``B_i = U_i^H A_i`` and
  ``w = 1 / (sigma2 + diag D)``. One iteration costs ``O(sum M_i^3 + N sum M_i)`` time and
  ``O(N)`` memory; no ``M x N`` or ``N x N`` matrix is formed.
* **M-step** over the factors, minimising ``sum_j t_j / gamma_j + log gamma_j`` with
  ``t = |mu|^2 + diag(Sigma)``: either by alternating minimisation (``method="am"``, closed
  form per factor, monotone) or by the best rank-one fit of the tensor ``t``
  (``method="svd"``: SVD for two factors, higher-order power iteration for more).
* **Block coupling** (PC-KroSBL, for block-sparse modes): the factor ``gamma_i`` is
  constrained to ``C_beta g`` with ``C_beta`` tridiagonal (1 on the diagonal, ``beta`` next to
  it) and ``g >= 0``; the AM update is projected on that set by non-negative least squares
  (weighted to measure relative error, the M-step objective's local shape).
* **Beyond the paper**: the cost ``log|C| + y^H C^{-1} y`` comes exactly from the same
  eigendecompositions, which allows over-relaxed EM for AM (a step is lengthened only while
  the cost falls), pruning that is refused when it would raise the cost, and factor restarts
  kept only when they are better (see :func:`krosbl`). The measurements behind these choices
  are in ``benchmarks/recovery/NOTES.md``.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ._common import (
    DivergenceError,
    RecoveryError,
    RecoveryResult,
    check_int,
    check_memory,
    check_positive,
    finish,
    logger,
    noise_floor,
    real_dtype,
    run_batched,
)
from .operators import KroneckerOperator, kron_apply, prepare
from .sbl_em import em_noise_update


def kron_vec(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``v_1 (x) v_2 (x) ... (x) v_k`` for 1-D tensors (or, formed explicitly, small matrices)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = torch.kron(out, v)
    return out


def kron_posterior(factors: Sequence[torch.Tensor], gammas: Sequence[torch.Tensor],
                   noise_var: float, y: torch.Tensor) -> dict:
    """Exact SBL posterior for a Kronecker dictionary and Kronecker prior variances (pure).

    Args:
        factors: ``A_i``, shape ``(M_i, N_i)``.
        gammas: ``gamma_i >= 0``, length ``N_i``.
        noise_var: ``sigma2 > 0``.
        y: length ``prod M_i``.

    Returns the same dict as :func:`sparsecraft.recovery.sbl_em.sbl_posterior`: ``mu``,
    ``sigma_diag``, ``cost`` (``log|C| + y^H C^{-1} y``), ``resid_sq``, ``dof``.
    """
    rdt = real_dtype(factors[0].dtype)
    Us, ds, Bs = [], [], []
    for A_i, g_i in zip(factors, gammas):
        P = (A_i * g_i.to(rdt)) @ A_i.mH
        P = 0.5 * (P + P.mH)
        d, U = torch.linalg.eigh(P)
        Us.append(U)
        ds.append(torch.clamp(d, min=0.0))
        Bs.append(U.mH @ A_i)
    d = kron_vec(ds)
    w = 1.0 / (noise_var + d)
    Uy = kron_apply([U.mH for U in Us], y)
    Ciy = kron_apply(Us, w.to(Uy.dtype) * Uy)
    gamma = kron_vec([g.to(rdt) for g in gammas])
    mu = gamma * kron_apply([A.mH for A in factors], Ciy)
    diag_q = kron_apply([B.abs().pow(2).T for B in Bs], w)
    sigma_diag = torch.clamp(gamma - gamma * gamma * diag_q, min=0.0)
    resid_sq = float(torch.linalg.vector_norm(y - kron_apply(factors, mu)) ** 2)
    cost = float(torch.log(noise_var + d).sum()) + float((w * Uy.abs().pow(2)).sum())
    # sum_j (1 - Sigma_jj / gamma_j) = tr(C^{-1} A Gamma A^H) = sum_m d_m / (sigma2 + d_m)
    dof = float((w * d).sum())
    return {"mu": mu, "sigma_diag": sigma_diag, "cost": cost, "resid_sq": resid_sq, "dof": dof}


def _others_product(gammas: Sequence[torch.Tensor], skip: int, shape) -> torch.Tensor:
    k = len(gammas)
    out = None
    for j in range(k):
        if j == skip:
            continue
        s = [1] * k
        s[j] = shape[j]
        g = gammas[j].reshape(s)
        out = g if out is None else out * g
    return out


def coupling_matrix(n: int, beta: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Tridiagonal ``I + beta (shift_up + shift_down)`` of size ``n``."""
    C = torch.eye(n, dtype=dtype, device=device)
    if n > 1 and beta:
        off = torch.full((n - 1,), float(beta), dtype=dtype, device=device)
        C = C + torch.diag(off, 1) + torch.diag(off, -1)
    return C


def _nnls(C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``argmin_{g >= 0} ||C g - u||``; tiny (n <= a few dozen), solved by scipy on the CPU."""
    from scipy.optimize import nnls

    g, _ = nnls(C.detach().cpu().double().numpy(), u.detach().cpu().double().numpy(), maxiter=50 * C.shape[1])
    return torch.from_numpy(g).to(device=u.device, dtype=u.dtype)


def project_coupled(u: torch.Tensor, beta: float) -> torch.Tensor:
    """The point of ``{C_beta g : g >= 0}`` closest to ``u > 0`` in relative error (pure).

    Around its minimum ``u`` the M-step objective ``sum_n u_n / g_n + log g_n`` grows like
    ``sum_n ((g_n - u_n) / u_n)^2 / 2``, so a plain Euclidean projection over-weights the large
    entries. The weights are capped (``u`` floored at 1e-2 of its largest) so that tiny entries
    do not dictate the block.
    """
    C = coupling_matrix(u.numel(), beta, dtype=u.dtype, device=u.device)
    wgt = 1.0 / torch.clamp(u, min=1e-2 * max(float(u.max()), 1e-300))
    return C @ _nnls(C * wgt[:, None], u * wgt)


def am_mstep(T: torch.Tensor, gammas: list[torch.Tensor], *, couplings=None, n_sweeps: int = 10,
             tol: float = 1e-4) -> list[torch.Tensor]:
    """Alternating-minimisation M-step (pure).

    Minimises ``sum_j T_j / gamma_j + log gamma_j`` over ``gamma = gamma_1 (x) ... (x) gamma_k``,
    one factor at a time in closed form: ``gamma_i[n] = mean over the other modes of
    T / (prod of the other factors)``. With ``couplings[i] = beta`` the factor is projected on
    ``{C_beta g + eps : g >= 0}`` (PC-KroSBL) by non-negative least squares weighted by
    ``1 / u`` (relative error). Scale is moved into the last factor.
    """
    k = T.ndim
    gs = [g.clone() for g in gammas]
    shape = T.shape
    prev = kron_vec(gs)
    for _ in range(n_sweeps):
        for i in range(k):
            dims = [j for j in range(k) if j != i]
            u = (T / _others_product(gs, i, shape)).mean(dim=dims)
            beta = couplings[i] if couplings is not None else None
            if beta:
                u = project_coupled(u, beta)
            # A strictly positive floor keeps the other factors' division finite.
            gs[i] = torch.clamp(u, min=1e-12 * max(float(u.max()), 1e-300))
        for i in range(k - 1):
            n = float(torch.linalg.vector_norm(gs[i]))
            gs[i] = gs[i] / n
            gs[-1] = gs[-1] * n
        cur = kron_vec(gs)
        change = float(torch.linalg.vector_norm(cur - prev)) / max(float(torch.linalg.vector_norm(prev)), 1e-300)
        prev = cur
        if change < tol:
            break
    return gs


def rank_one_fit(T: torch.Tensor, n_iter: int = 30, tol: float = 1e-8) -> list[torch.Tensor]:
    """Best rank-one approximation ``T ~ g_1 (x) ... (x) g_k`` of a non-negative tensor (pure).

    Two modes: leading singular pair. More modes: higher-order power iteration started from the
    leading singular vectors of the unfoldings (HOSVD). Factors are made non-negative (the
    leading singular vectors of a non-negative tensor can be chosen so) and the scale is put
    into the last factor.
    """
    k = T.ndim
    if k == 2:
        U, S, Vh = torch.linalg.svd(T, full_matrices=False)
        return [U[:, 0].abs(), S[0] * Vh[0].abs()]
    gs = []
    for i in range(k):
        unf = torch.movedim(T, i, 0).reshape(T.shape[i], -1)
        U, _, _ = torch.linalg.svd(unf, full_matrices=False)
        gs.append(U[:, 0].abs())
    letters = "abcdefghij"[:k]
    for _ in range(n_iter):
        old = [g.clone() for g in gs]
        for i in range(k):
            ops = [T] + [gs[j] for j in range(k) if j != i]
            spec = letters + "," + ",".join(letters[j] for j in range(k) if j != i) + "->" + letters[i]
            v = torch.einsum(spec, *ops)
            gs[i] = v / max(float(torch.linalg.vector_norm(v)), 1e-300)
        if max(float(torch.linalg.vector_norm(g - o)) for g, o in zip(gs, old)) < tol:
            break
    spec = letters + "," + ",".join(letters) + "->"
    lam = float(torch.einsum(spec, T, *gs))
    gs[-1] = gs[-1] * max(lam, 0.0)
    return gs


@functools.lru_cache(maxsize=64)
def _all_subsets(n: int, k: int) -> torch.Tensor:
    # itertools is many times faster than torch.combinations here.
    return torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long).reshape(-1, k)


def best_subsets(A: torch.Tensor, Z: torch.Tensor, noise_var: float, *, n_sigma: float = 3.0,
                 budget: int = 20000, extra: int = 1) -> list[torch.Tensor]:
    """Smallest sets of columns of ``A`` whose span leaves only noise in ``Z`` (pure).

    ``Z`` is ``A X + E`` with ``X`` row-sparse and ``E`` white noise of variance ``noise_var``
    per entry. For ``k = 1, 2, ...`` (below the number of rows) the ``k`` columns whose span
    captures most of ``||Z||_F^2`` are found, exhaustively while there are at most ``budget``
    subsets of that size and by extending the previous best by one column after that. The
    first ``k`` whose residual ``||(I - P_S) Z||_F^2`` is within ``n_sigma`` standard
    deviations of the noise's (a chi-square over ``(M - k) * columns`` terms) qualifies; it
    and the best sets of the next ``extra`` sizes are returned (sorted indices), since a weak
    true column can hide below the noise test. Empty when no size qualifies.
    """
    M, N = A.shape
    G = A.mH @ A
    AZ = A.mH @ Z
    H = AZ @ AZ.mH
    ridge = 1e-12 * float(torch.diagonal(G).real.mean())
    terms_per_row = Z.shape[1] * (2 if Z.is_complex() else 1)
    found: list[torch.Tensor] = []
    prev = None
    for k in range(1, min(M, N)):
        if prev is None or math.comb(N, k) <= budget:
            subsets = _all_subsets(N, k).to(A.device)
            Gs = G[subsets[:, :, None], subsets[:, None, :]]
            Hs = H[subsets[:, :, None], subsets[:, None, :]]
            eye = torch.eye(k, dtype=G.dtype, device=G.device)
            captured = torch.diagonal(torch.linalg.solve(Gs + ridge * eye, Hs), dim1=-2, dim2=-1).sum(-1).real
            prev = subsets[int(torch.argmax(torch.nan_to_num(captured, nan=-math.inf)))]
        else:
            prev = torch.cat([prev, _best_extension(A, Z, prev).reshape(1)])
        if found:
            found.append(torch.sort(prev).values)
        else:
            # The winner's residual exactly (the ridge that keeps the batch solvable would
            # swamp a noise level near the floor).
            A_S = A[:, prev]
            resid = float(torch.linalg.vector_norm(Z - A_S @ torch.linalg.lstsq(A_S, Z).solution) ** 2)
            if _within_noise(resid, noise_var * (M - k) * Z.shape[1], (M - k) * terms_per_row, n_sigma):
                found.append(torch.sort(prev).values)
        if len(found) > extra:
            break
    return found


def _within_noise(energy: float, expected: float, terms: float, n_sigma: float = 3.0) -> bool:
    """Is ``energy``, a sum of ``terms`` squared noise components expected to total ``expected``,
    within ``n_sigma`` standard deviations of that (chi-square: relative deviation sqrt(2/terms))?"""
    return energy <= expected * (1.0 + n_sigma * math.sqrt(2.0 / terms))


def _best_extension(A: torch.Tensor, Z: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The column that, added to ``chosen``, captures most of ``Z`` (orthogonal least squares)."""
    Q, _ = torch.linalg.qr(A[:, chosen])
    A_perp = A - Q @ (Q.mH @ A)
    R = Z - Q @ (Q.mH @ Z)
    gain = (A_perp.mH @ R).abs().pow(2).sum(1) / A_perp.abs().pow(2).sum(0).clamp_min(1e-300)
    gain[chosen] = -math.inf
    return torch.argmax(gain)


def mode_subset_candidates(factors: Sequence[torch.Tensor], keep: Sequence[torch.Tensor], y: torch.Tensor,
                           noise_var: float, i: int) -> list[torch.Tensor]:
    """Supports for factor ``i`` read from the data with the other factors' supports fixed.

    Projecting ``y`` on the span of the other modes' kept columns (orthonormal bases, so the
    noise stays white with the same variance) leaves ``Z = A_i X``, a multiple-measurement
    problem in mode ``i``; :func:`best_subsets` finds its smallest adequate supports. Returns
    indices into the columns of ``A_i`` (possibly none).
    """
    mats = []
    for j, (A_j, kp) in enumerate(zip(factors, keep)):
        if j == i:
            mats.append(torch.eye(A_j.shape[0], dtype=A_j.dtype, device=A_j.device))
        else:
            U, S, _ = torch.linalg.svd(A_j[:, kp], full_matrices=False)
            rank = int((S > S[0] * 1e-10).sum()) if S.numel() and float(S[0]) > 0 else 0
            if rank == 0:
                return []
            mats.append(U[:, :rank].mH)
    t = kron_apply(mats, y.to(factors[0].dtype)).reshape([m.shape[0] for m in mats])
    Z = torch.movedim(t, i, 0).reshape(factors[i].shape[0], -1)
    return best_subsets(factors[i], Z, float(noise_var))


def joint_subset_candidate(factors: Sequence[torch.Tensor], keep: Sequence[torch.Tensor], y: torch.Tensor,
                           noise_var: float, max_columns: int = 5_000_000) -> list[torch.Tensor] | None:
    """The smallest Kronecker support, among the per-mode subset candidates, that fits ``y``
    to within the noise by least squares (pure); ``None`` when none does.

    One Gauss-Seidel sweep of :func:`mode_subset_candidates` (each mode read with the others'
    newest supports) gives each mode its smallest adequate support and the best one a column
    larger; the combinations are tried from the smallest total size up.
    """
    current = list(keep)
    options = []
    for i in range(len(factors)):
        cands = mode_subset_candidates(factors, current, y, noise_var, i)
        if not cands:
            return None
        current[i] = cands[0]
        options.append(cands)
    M = y.shape[0]
    combos = sorted(itertools.product(*options), key=lambda c: math.prod(int(s.numel()) for s in c))
    for combo in combos:
        size = math.prod(int(s.numel()) for s in combo)
        if size >= M or size * M > max_columns:
            continue
        A_S = kron_vec([f[:, s] for f, s in zip(factors, combo)])
        coef = torch.linalg.lstsq(A_S, y.to(A_S.dtype).unsqueeze(1)).solution
        if residual_is_noise(factors, y - (A_S @ coef).squeeze(1), noise_var, size):
            return list(combo)
    return None


def residual_is_noise(factors: Sequence[torch.Tensor], r: torch.Tensor, noise_var: float, dof: float,
                      alpha: float = 0.01) -> bool:
    """Could the residual ``r`` of a fit with ``dof`` parameters be noise alone (pure)?

    Two tests at level about ``alpha``: the total ``||r||^2`` against its chi-square (within
    3 standard deviations), and, more sensitive to one missing column, the largest normalised
    correlation ``|a_j^H r|^2 / ||a_j||^2`` over all columns of the Kronecker dictionary against
    the maximum of that many chi-square(1) (real) or exponential (complex) variables.
    """
    free = max(r.shape[0] - dof, 1.0)
    complex_ = r.is_complex()
    if not _within_noise(float(torch.linalg.vector_norm(r) ** 2), noise_var * free, free * (2 if complex_ else 1)):
        return False
    corr = kron_apply([A.mH for A in factors], r).abs().pow(2)
    norms = kron_vec([A.abs().pow(2).sum(0) for A in factors])
    score = float((corr / norms.clamp_min(1e-300)).max()) / noise_var
    n = corr.numel()
    # chi-square(1) upper quantile 2 erfinv(1 - p)^2 (torch: importing scipy.stats cost 0.5 s,
    # more than a whole KroSBL run)
    p = torch.tensor(1.0 - alpha / n, dtype=torch.float64)
    limit = math.log(n / alpha) if complex_ else 2.0 * float(torch.special.erfinv(p)) ** 2
    return score <= limit


def _parse_supports(supports, dims, device):
    """Validated ``init_supports``: sorted unique index tensors, one per factor, or ``None``."""
    if supports is None:
        return None
    if isinstance(supports, (str, bytes)) or len(supports) != len(dims):
        raise RecoveryError(f"init_supports must hold one index sequence per factor ({len(dims)})")
    out = []
    for i, (sup, n) in enumerate(zip(supports, dims)):
        idx = torch.as_tensor(sup).reshape(-1)
        if idx.numel() == 0 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise RecoveryError(f"init_supports[{i}] must be a non-empty sequence of integer column indices")
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise RecoveryError(f"init_supports[{i}] has an index outside 0..{n - 1} (factor {i} has {n} columns)")
        out.append(torch.unique(idx.long()).to(device))
    return out


def _parse_couplings(coupling, k: int):
    if coupling is None:
        return None
    if isinstance(coupling, (int, float)) and not isinstance(coupling, bool):
        vals = [float(coupling)] * k
    else:
        vals = list(coupling)
        if len(vals) != k:
            raise RecoveryError(f"coupling must be a number or one value (or None) per factor ({k}), got {len(vals)}")
    out = []
    for i, v in enumerate(vals):
        if v is None:
            out.append(None)
            continue
        check_positive(v, f"coupling[{i}]", allow_zero=True)
        out.append(float(v) if v else None)
    return out


def krosbl(factors, y, *, method: str = "am", coupling=None, noise_var: float | None = None,
           max_iter: int = 300, tol: float = 1e-4, prune: float | Sequence[float] = 1e-3,
           n_sweeps: int = 10, record_cost: bool = True, init_scale: float | None = None,
           restarts: int = 2, restart_draws: int = 0, seed: int = 0, accelerate: bool = True,
           subset_restarts: bool = True, init_supports=None) -> RecoveryResult:
    """KroSBL: SBL with Kronecker-structured prior variances, by EM with the fast E-step.

    Args:
        factors: list of ``k >= 2`` matrices ``A_i`` (``M_i x N_i``) or a
            :class:`~sparsecraft.recovery.operators.KroneckerOperator`.
        y: measurements of length ``prod M_i`` (or ``(M, B)``, columns solved independently).
        method: ``"am"`` (alternating minimisation) or ``"svd"`` (rank-one tensor fit).
        coupling: block coupling ``beta`` (PC-KroSBL): a number for every factor or a list with
            one value or ``None`` per factor. Requires ``method="am"``.
        noise_var: known noise variance, or ``None`` to estimate it by EM.
        max_iter, tol: stop when the relative change of ``gamma`` is below ``tol``.
        prune: per-factor pruning: entries of ``gamma_i`` below ``prune * max(gamma_i)`` are
            removed with their dictionary columns (a number or one per factor; 0 disables).
            Besides saving time it lets AM-KroSBL converge (EM shrinks unneeded variances only
            slowly). A prune that would raise the cost markedly is refused.
        n_sweeps: AM sweeps per M-step.
        record_cost: keep the cost of every iteration in ``info["cost"]``.
        init_scale: the initial ``gamma`` (the same for every entry) is ``init_scale`` times the
            measurement power over the mean squared column norm. ``None`` (default): the level
            at which the prior predicts the measured power minus the noise variance, i.e.
            ``M / N * (1 - sigma2 / power)`` (at least ``1e-3 M / N``).
        restarts: rounds of restarts after EM converges (0 disables); rounds stop early when
            none is accepted. EM from a flat start can settle on a wrong support in one factor
            while the others are right (a local optimum). Each round runs EM again from:
            the smallest Kronecker support whose least-squares fit leaves only noise (known
            noise only; see ``subset_restarts``); then per factor, with the others kept, the
            supports a subset search on that mode suggests (a coupled factor also every entry
            re-opened flat); then ``restart_draws`` random re-openings.
        restart_draws: random re-openings per factor and round (levels log-uniform over two
            decades; seeded by ``seed``). Slower; they repair some cases the others do not.
        seed: seed of the random re-openings (the same call gives the same result).
        accelerate: over-relaxed EM for ``method="am"``.
        subset_restarts: use the subset searches (default). Per mode, least squares on the
            other modes' kept columns leaves a small multiple-measurement problem, whose
            smallest column set that leaves only noise (exhaustive while affordable) and the
            best set one larger are restart candidates. A restart is kept when its cost
            (negative log marginal likelihood, exact) is lower, except that with a known
            ``noise_var`` outcomes whose residual is noise come first and among them the
            smaller support (the cost alone can prefer a wrong support). ``False``: flat
            re-openings and the cost alone.
        init_supports: optional warm start, one sequence of column indices per factor (e.g. the
            ``mode_supports`` of a previous frame when tracking a channel): EM starts with only
            these columns, flat, and the default start level counts only them. Restarts may
            still re-open other columns.

    Returns:
        :class:`RecoveryResult`; ``info`` has ``gammas`` (per-factor, zeros where pruned),
        ``noise_var``, ``cost`` (per iteration of the run kept), ``final_cost``,
        ``mode_supports`` (kept indices per factor), ``restarts_accepted``.
    """
    op = factors if isinstance(factors, KroneckerOperator) else KroneckerOperator(factors)
    op, yt, as_numpy = prepare(op, y)
    cfg = KroSBLSettings.parse(
        op, method=method, coupling=coupling, noise_var=noise_var, max_iter=max_iter, tol=tol, prune=prune,
        n_sweeps=n_sweeps, record_cost=record_cost, init_scale=init_scale, restarts=restarts,
        restart_draws=restart_draws, seed=seed, accelerate=accelerate, subset_restarts=subset_restarts,
        init_supports=init_supports)
    # O(N) memory per measurement vector: refuse before the first length-N vector
    N = op.shape[1]
    check_memory((_VECTORS_PER_RUN + 2 * (yt.shape[1] if yt.ndim == 2 else 1)) * N * yt.element_size(),
                 f"krosbl with N = {' x '.join(map(str, op.in_dims))} = {N} unknowns")
    return finish(run_batched(lambda yv: _krosbl_one(op, yv, cfg), yt), as_numpy)


# Length-N vectors alive at once in a KroSBL run (posterior, prior, restarts' candidates),
# generously counted, for the memory check.
_VECTORS_PER_RUN = 24


@dataclass(frozen=True)
class KroSBLSettings:
    """The settings of one :func:`krosbl` call, normalised and validated by :meth:`parse`.

    Fields are :func:`krosbl`'s keyword arguments, with ``couplings`` (one value or None per
    factor, or None), ``prunes`` (one per factor) and ``init_supports`` (sorted index tensors
    per factor, or None) in per-factor form. ``relax_growth`` is the over-relaxation factor
    by which EM's step length grows while the cost keeps falling.
    """

    method: str
    couplings: tuple | None
    noise_var: float | None
    max_iter: int
    tol: float
    prunes: tuple
    n_sweeps: int
    record_cost: bool
    init_scale: float | None
    restarts: int
    restart_draws: int
    seed: int
    accelerate: bool
    subset_restarts: bool
    init_supports: tuple | None
    relax_growth: float = 1.5

    @property
    def noise_known(self) -> bool:
        return self.noise_var is not None

    @property
    def over_relax(self) -> bool:
        """Over-relaxed EM needs a true M-step (AM); the rank-one fit is not one."""
        return self.accelerate and self.method == "am"

    def coupled(self, i: int) -> bool:
        return self.couplings is not None and bool(self.couplings[i])

    @classmethod
    def parse(cls, op: KroneckerOperator, *, method, coupling, noise_var, max_iter, tol, prune, n_sweeps,
              record_cost, init_scale, restarts, restart_draws, seed, accelerate, subset_restarts,
              init_supports) -> "KroSBLSettings":
        """Check :func:`krosbl`'s arguments for the factors of ``op``; :class:`RecoveryError` names
        the first one that breaks a rule."""
        k = len(op.factors)
        if method not in ("am", "svd"):
            raise RecoveryError(f"method must be 'am' or 'svd', got {method!r}")
        couplings = _parse_couplings(coupling, k)
        if couplings is not None and any(couplings) and method != "am":
            raise RecoveryError("coupling (block-coupled KroSBL) requires method='am'")
        check_positive(noise_var, "noise_var", allow_none=True, allow_zero=True)
        check_int(max_iter, "max_iter")
        check_int(n_sweeps, "n_sweeps")
        check_positive(tol, "tol", allow_zero=True)
        check_positive(init_scale, "init_scale", allow_none=True)
        prunes = [prune] * k if isinstance(prune, (int, float)) else list(prune)
        if len(prunes) != k:
            raise RecoveryError(f"prune must be a number or one value per factor ({k})")
        for i, p in enumerate(prunes):
            check_positive(p, f"prune[{i}]", allow_zero=True)
            if p >= 1:
                raise RecoveryError(f"prune[{i}] must be < 1, got {p}")
        check_int(restarts, "restarts", minimum=0)
        check_int(restart_draws, "restart_draws", minimum=0)
        check_int(seed, "seed", minimum=0)
        supports = _parse_supports(init_supports, op.in_dims, op.device)
        return cls(method=method, couplings=None if couplings is None else tuple(couplings),
                   noise_var=None if noise_var is None else float(noise_var), max_iter=int(max_iter),
                   tol=float(tol), prunes=tuple(float(p) for p in prunes), n_sweeps=int(n_sweeps),
                   record_cost=bool(record_cost), init_scale=None if init_scale is None else float(init_scale),
                   restarts=int(restarts), restart_draws=int(restart_draws), seed=int(seed),
                   accelerate=bool(accelerate), subset_restarts=bool(subset_restarts),
                   init_supports=None if supports is None else tuple(supports))


def _krosbl_one(op: KroneckerOperator, y, cfg: KroSBLSettings) -> RecoveryResult:
    factors_full = op.factors
    k = len(factors_full)
    M = op.shape[0]
    dev = op.device
    rdt = real_dtype(op.dtype)
    ypow = float(torch.linalg.vector_norm(y) ** 2) / M
    if ypow == 0.0:
        return RecoveryResult(x=torch.zeros(op.shape[1], dtype=op.dtype, device=dev),
                              support=torch.zeros(0, dtype=torch.long), n_iter=0, converged=True,
                              info={"gammas": [torch.zeros(n, dtype=rdt) for n in op.in_dims],
                                    "noise_var": 0.0, "cost": [], "final_cost": None,
                                    "mode_supports": [[] for _ in range(k)], "restarts_accepted": 0})
    floor = noise_floor(ypow, rdt)
    s2 = max(cfg.noise_var, floor) if cfg.noise_known else 0.1 * ypow
    colpow = float(op.column_norms().pow(2).mean())
    keep = list(cfg.init_supports) if cfg.init_supports is not None else [torch.arange(n, device=dev) for n in op.in_dims]
    gammas = [torch.ones(int(kp.numel()), dtype=rdt, device=dev) for kp in keep]
    init_scale = cfg.init_scale
    if init_scale is None:
        init_scale = M / math.prod(int(kp.numel()) for kp in keep) * max(1.0 - s2 / ypow, 1e-3)
    gammas[-1] = gammas[-1] * (init_scale * ypow / max(colpow, 1e-300))
    gammas = [_flat_start(g, cfg, i) for i, g in enumerate(gammas)]
    run = _EMRun(factors_full, y, cfg, floor)
    best = run(keep, gammas, s2)
    n_iter, accepted = best.n_iter, 0
    # Restarts: EM from a flat start can lock one factor onto a wrong support while the others
    # are right. Each round tries (1) the smallest Kronecker support that fits the data to within a known
    # noise, from per-mode subset searches; (2) per factor, the supports its subset search
    # suggests with the others kept (a coupled factor also re-opened flat); (3) restart_draws
    # random re-openings. EM runs from each and the result replaces the current one when
    # ``_better`` says so.
    gen = torch.Generator().manual_seed(cfg.seed)  # the same call gives the same result
    for _ in range(cfg.restarts):
        improved = False
        if cfg.subset_restarts and cfg.noise_known:
            joint = joint_subset_candidate(factors_full, best.keep, y, best.noise_var)
            if joint is not None and not all(torch.equal(a, b) for a, b in zip(joint, best.keep)):
                level = [_flat_start(torch.full((int(s.numel()),), float(g.max()), dtype=rdt, device=dev),
                                     cfg, i) for i, (s, g) in enumerate(zip(joint, best.gammas))]
                trial = run(joint, level, best.noise_var)
                n_iter += trial.n_iter
                if _better(trial, best, factors_full, y, cfg.noise_known):
                    best, improved = trial, True
                    accepted += 1
        for i in range(k):
            full = torch.arange(op.in_dims[i], device=dev)
            coupled = cfg.coupled(i)
            # (support, random levels?). The subset candidates replace a flat re-opening
            # (as accurate, faster), except that a coupled factor is re-opened flat too: the
            # subset search knows nothing of blocks.
            starts = [] if cfg.subset_restarts and not coupled else [(full, False)]
            if cfg.subset_restarts:
                cands = mode_subset_candidates(factors_full, best.keep, y, best.noise_var, i)
                # When the smallest adequate support is the current one, nothing to try.
                if cands and not torch.equal(cands[0], best.keep[i]):
                    starts += [(c, False) for c in cands if not torch.equal(c, best.keep[i])]
            starts += [(full, True)] * cfg.restart_draws
            for support, random_levels in starts:
                keep_i, gammas_i = list(best.keep), list(best.gammas)
                keep_i[i] = support
                level = torch.full((support.numel(),), float(best.gammas[i].max()), dtype=rdt)
                if random_levels:  # log-uniform over two decades below the flat level
                    level = level * torch.pow(10.0, -2.0 * torch.rand(support.numel(), generator=gen, dtype=rdt))
                gammas_i[i] = _flat_start(level.to(dev), cfg, i)
                trial = run(keep_i, gammas_i, best.noise_var)
                n_iter += trial.n_iter
                if _better(trial, best, factors_full, y, cfg.noise_known):
                    best, improved = trial, True
                    accepted += 1
        if not improved:
            break
    post, keep, gammas = best.final, best.keep, best.gammas
    x = torch.zeros(op.in_dims, dtype=op.dtype, device=dev)
    grids = torch.meshgrid(*keep, indexing="ij")
    x[grids] = post["mu"].reshape([int(kp.numel()) for kp in keep])
    x = x.reshape(-1)
    full_gammas = []
    for n, kp, g in zip(op.in_dims, keep, gammas):
        fg = torch.zeros(n, dtype=rdt, device=dev)
        fg[kp] = g
        full_gammas.append(fg)
    support = torch.nonzero(kron_vec(full_gammas) > 0).flatten().cpu()
    if not best.converged:
        logger.info("krosbl(%s): not converged after %d iterations", cfg.method, best.n_iter)
    return RecoveryResult(x=x, support=support, n_iter=n_iter, converged=best.converged,
                          info={"gammas": full_gammas, "noise_var": best.noise_var, "cost": best.costs,
                                "final_cost": post["cost"], "mode_supports": [kp.cpu().tolist() for kp in keep],
                                "restarts_accepted": accepted})


def _better(trial, best, factors, y, noise_known: bool) -> bool:
    """Does a restart's outcome replace the current one?

    Without a known noise level: when its cost is lower. With one, outcomes whose residual is
    noise (:func:`residual_is_noise`) come first, ranked among them by the cost plus ``log M``
    per kept coefficient (BIC). The cost alone can prefer a wrong, larger support; the support
    size alone preferred, on fresh draws, wrong smaller supports whose cost was hundreds worse.
    """
    if not noise_known:
        return trial.final["cost"] < best.final["cost"] - 1e-9 * abs(best.final["cost"])
    return _rank(trial, factors, y) < _rank(best, factors, y)


def _rank(outcome, factors, y):
    if outcome.fits is None:
        facs = [f[:, kp] for f, kp in zip(factors, outcome.keep)]
        r = y - kron_apply(facs, outcome.final["mu"])
        outcome.fits = residual_is_noise(factors, r, outcome.noise_var, outcome.final["dof"])
    size = math.prod(int(kp.numel()) for kp in outcome.keep)
    cost = outcome.final["cost"]
    return (0, cost + math.log(y.shape[0]) * size) if outcome.fits else (1, cost)


def _flat_start(g: torch.Tensor, cfg: KroSBLSettings, i: int) -> torch.Tensor:
    """A coupled factor starts inside its constraint set ``{C_beta h : h >= 0}``."""
    if cfg.coupled(i):
        return coupling_matrix(g.numel(), cfg.couplings[i], g.dtype, g.device) @ g
    return g


@dataclass
class _EMOutcome:
    keep: list          # kept indices per factor
    gammas: list        # kept entries of each factor
    noise_var: float
    final: dict         # posterior at the end (``kron_posterior``)
    costs: list
    n_iter: int
    converged: bool
    fits: bool | None = None  # residual is noise (set when first asked, by ``_rank``)


class _EMRun:
    """EM iterations of KroSBL from a given start (kept indices per factor, factors, noise)."""

    def __init__(self, factors, y, cfg: KroSBLSettings, floor: float):
        self.factors, self.y, self.cfg, self.floor = factors, y, cfg, floor

    def _extrapolate(self, gammas, new, eta):
        out = []
        for i, (g, n) in enumerate(zip(gammas, new)):
            top = float(n.max())
            lo = 1e-12 * max(top, 1e-300)
            log_p = torch.log(g.clamp_min(lo)) + eta * (torch.log(n.clamp_min(lo)) - torch.log(g.clamp_min(lo)))
            # Bounded in log space, so that no entry overflows whatever eta reached.
            p = torch.exp(log_p.clamp(min=math.log(lo), max=math.log(top) + 20.0))
            if self.cfg.coupled(i):
                p = torch.clamp(project_coupled(p, self.cfg.couplings[i]), min=lo)
            out.append(p)
        return out

    def __call__(self, keep, gammas, s2) -> _EMOutcome:
        k = len(self.factors)
        M = self.y.shape[0]
        keep, gammas = list(keep), list(gammas)
        costs: list[float] = []
        converged = False
        eta = 1.0
        post = None  # posterior of the current point when the last iteration already computed it
        it = 0
        for it in range(1, self.cfg.max_iter + 1):
            facs = [f[:, kp] for f, kp in zip(self.factors, keep)]
            if post is None:
                post = kron_posterior(facs, gammas, s2, self.y)
            if self.cfg.record_cost:
                costs.append(post["cost"])
            shape = [int(kp.numel()) for kp in keep]
            T = (post["mu"].abs().pow(2) + post["sigma_diag"]).reshape(shape)
            old = kron_vec(gammas)
            if not bool(torch.isfinite(T).all()):
                raise DivergenceError(
                    f"krosbl: the posterior became non-finite at iteration {it} (noise variance {s2:.3g}; "
                    f"dtype {self.factors[0].dtype}); use float64 or a larger noise_var")
            if self.cfg.method == "am":
                # After pruning, the coupling acts between kept neighbours (as in PC-KroSBL).
                new = am_mstep(T, gammas, couplings=self.cfg.couplings, n_sweeps=self.cfg.n_sweeps)
            else:
                new = rank_one_fit(T)
            s2_new = s2 if self.cfg.noise_known else max(em_noise_update(post["resid_sq"], post["dof"], s2, M), self.floor)
            next_post = None
            em_step = new
            if self.cfg.over_relax:
                # Over-relaxed EM (Salakhutdinov and Roweis, 2003), in log gamma: step eta times
                # as far as EM did; keep the step only if the cost is below the current one (so
                # the iteration stays monotone), else take the plain EM step and reset eta.
                # Plain EM crawls where a factor has far fewer measurements than entries.
                eta = min(eta * self.cfg.relax_growth, 1e3)
                prop = self._extrapolate(gammas, new, eta)
                trial = kron_posterior(facs, prop, s2_new, self.y)
                if trial["cost"] < post["cost"]:
                    new, next_post = prop, trial
                else:
                    eta = 1.0
            cur = kron_vec(new)
            change = float(torch.linalg.vector_norm(cur - old)) / max(float(torch.linalg.vector_norm(old)), 1e-300)
            gammas, s2, post = new, s2_new, next_post
            # Prune per factor: small entries and their dictionary columns leave for good. The
            # decision reads the plain EM step: an extrapolated step can overshoot for a moment.
            new_keep, new_gammas = list(keep), list(gammas)
            for i in range(k):
                g, e = gammas[i], em_step[i]
                m = float(e.max())
                ok = e > max(self.cfg.prunes[i] * m, 0.0) if self.cfg.prunes[i] > 0 else e > 0
                if m <= 0 or not bool(ok.any()):
                    ok = e >= m  # keep the largest so the model stays defined
                if not bool(ok.all()):
                    new_keep[i], new_gammas[i] = keep[i][ok], g[ok]
            pruned_any = any(a.numel() != b.numel() for a, b in zip(new_keep, keep))
            if pruned_any:
                # A prune that raises the cost by more than 10 (plus 1e-3 relative) removed a
                # column the data need (seen after large over-relaxed steps): refuse it.
                if post is None:
                    post = kron_posterior(facs, gammas, s2, self.y)
                pruned_post = kron_posterior([f[:, kp] for f, kp in zip(self.factors, new_keep)], new_gammas, s2,
                                             self.y)
                if pruned_post["cost"] <= post["cost"] + 10.0 + 1e-3 * abs(post["cost"]):
                    keep, gammas, post = new_keep, new_gammas, pruned_post
                else:
                    pruned_any, eta = False, 1.0
            if change < self.cfg.tol and not pruned_any:
                converged = True
                break
        # ``post``, when set, is already the posterior of the final point.
        final = post if post is not None else kron_posterior(
            [f[:, kp] for f, kp in zip(self.factors, keep)], gammas, s2, self.y)
        return _EMOutcome(keep=keep, gammas=gammas, noise_var=s2, final=final, costs=costs, n_iter=it,
                          converged=converged)
