"""Sparse regression for equation discovery (SINDy-style).

Given samples of a dynamical system's state ``X`` (``T x d``) and its time derivative, build
a library ``Theta(X)`` of candidate terms (monomials up to a degree) and find a sparse
coefficient matrix ``Xi`` with ``dX/dt ~ Theta(X) Xi``:

* :func:`stlsq`: sequentially thresholded least squares (Brunton, Proctor and Kutz, 2016);
* :func:`sbl_threshold`: SBL / relevance vector machine per state, then thresholding and a
  refit on the kept terms (the approach of the model-error discovery papers);
* :func:`lasso_discovery`: the Lasso baseline (FISTA per state).

Real data only. :func:`lorenz63` simulates the benchmark system.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch

from ._common import RecoveryError, check_int, check_memory, check_positive, output, to_tensor
from .convex import fista
from .sbl_em import sbl


def _state(X, name="X"):
    as_numpy = not isinstance(X, torch.Tensor)
    t = to_tensor(X, name, ndim=(2,), allow_complex=False)
    return t, as_numpy


def default_state_names(d: int) -> list[str]:
    """``x, y, z`` for three states, else ``x0, x1, ...``."""
    return ["x", "y", "z"] if d == 3 else [f"x{i}" for i in range(d)]


def library_size(d: int, degree: int, *, include_bias: bool = True) -> int:
    """Number of monomials of ``d`` variables up to total degree ``degree``: ``C(d + degree, degree)``."""
    return math.comb(d + degree, degree) - (0 if include_bias else 1)


def polynomial_library(X, degree: int = 2, *, include_bias: bool = True,
                       names: Sequence[str] | None = None):
    """All monomials of the state columns up to ``degree``.

    Args:
        X: states, ``T x d`` (real).
        degree: highest total degree (>= 1).
        include_bias: include the constant term ``1``.
        names: state names (default ``x0, x1, ...``; ``x, y, z`` for three states).

    Returns:
        ``(Theta, feature_names)`` with ``Theta`` of shape ``T x P``, ``P = C(d + degree, degree)``
        (one less without the bias; numpy if ``X`` was numpy). Raises :class:`RecoveryError`
        before building anything when that would not fit in the available memory.
    """
    Xt, as_numpy = _state(X)
    check_int(degree, "degree")
    d = Xt.shape[1]
    if names is None:
        names = default_state_names(d)
    if len(names) != d:
        raise RecoveryError(f"names must give {d} state names, got {len(names)}")
    P = library_size(d, degree, include_bias=include_bias)
    # The columns, then their stack, plus a name and a tensor object per column.
    check_memory(P * (2 * Xt.shape[0] * Xt.element_size() + 300),
                 f"the degree-{degree} polynomial library of {d} states ({P} terms x {Xt.shape[0]} samples)")
    cols, fnames = [], []
    if include_bias:
        cols.append(torch.ones(Xt.shape[0], dtype=Xt.dtype, device=Xt.device))
        fnames.append("1")
    for deg in range(1, degree + 1):
        for combo in itertools.combinations_with_replacement(range(d), deg):
            cols.append(torch.prod(Xt[:, list(combo)], dim=1))
            fnames.append(" ".join(names[i] for i in combo))
    Theta = torch.stack(cols, dim=1)
    return output(Theta, as_numpy), fnames


def _prep(Theta, dXdt):
    as_numpy = not isinstance(Theta, torch.Tensor)
    Th = to_tensor(Theta, "Theta", ndim=(2,), allow_complex=False)
    D = to_tensor(dXdt, "dXdt", ndim=(1, 2), allow_complex=False, device=Th.device).to(Th.dtype)
    squeeze = D.ndim == 1
    if squeeze:
        D = D.unsqueeze(1)
    if D.shape[0] != Th.shape[0]:
        raise RecoveryError(f"shape mismatch: Theta has {Th.shape[0]} rows but dXdt has {D.shape[0]}")
    return Th, D, as_numpy, squeeze


def _column_scale(Th):
    s = torch.linalg.vector_norm(Th, dim=0)
    return torch.where(s > 0, s, torch.ones_like(s))


def stlsq(Theta, dXdt, threshold: float = 0.1, *, ridge: float = 0.0, max_iter: int = 20,
          normalize: bool = False):
    """Sequentially thresholded least squares.

    Repeats: least squares (ridge-regularised if ``ridge > 0``) on the kept terms, then drop
    coefficients with ``|xi| < threshold``, until the kept set stops changing.

    Args:
        Theta: library ``T x P``; dXdt: ``T`` or ``T x d`` derivatives.
        threshold: coefficient magnitude below which a term is dropped (on the scale of the
            coefficients, or of the column-normalised problem if ``normalize``).

    Returns:
        coefficients ``P x d`` (``P`` for 1-D ``dXdt``).
    """
    Th, D, as_numpy, squeeze = _prep(Theta, dXdt)
    check_positive(threshold, "threshold", allow_zero=True)
    check_positive(ridge, "ridge", allow_zero=True)
    check_int(max_iter, "max_iter")
    scale = _column_scale(Th) if normalize else torch.ones(Th.shape[1], dtype=Th.dtype, device=Th.device)
    Ths = Th / scale
    P, d = Th.shape[1], D.shape[1]
    Xi = torch.zeros(P, d, dtype=Th.dtype, device=Th.device)
    for j in range(d):
        keep = torch.ones(P, dtype=torch.bool, device=Th.device)
        coef = torch.zeros(P, dtype=Th.dtype, device=Th.device)
        for _ in range(max_iter):
            idx = torch.nonzero(keep).flatten()
            if idx.numel() == 0:
                break
            coef = torch.zeros(P, dtype=Th.dtype, device=Th.device)
            coef[idx] = _ridge(Ths[:, idx], D[:, j], ridge)
            new_keep = keep & (coef.abs() >= threshold)
            if bool((new_keep == keep).all()):
                break
            keep = new_keep
        coef = torch.where(keep, coef, torch.zeros_like(coef))
        idx = torch.nonzero(keep).flatten()
        if idx.numel():
            coef[idx] = _ridge(Ths[:, idx], D[:, j], ridge)
        Xi[:, j] = coef / scale
    return output(Xi[:, 0] if squeeze else Xi, as_numpy)


def _ridge(A, b, ridge):
    if ridge > 0:
        G = A.T @ A
        G.diagonal().add_(ridge)
        return torch.linalg.solve(G, A.T @ b)
    return torch.linalg.lstsq(A, b.unsqueeze(1)).solution[:, 0]


def sbl_threshold(Theta, dXdt, threshold: float = 0.1, *, max_iter: int = 500, tol: float = 1e-6,
                  n_rounds: int = 5):
    """SBL (RVM) per state with hard thresholding, repeated on the kept terms.

    Each round fits SBL with an estimated noise variance on the column-normalised kept terms,
    then drops coefficients below ``threshold`` (on the original coefficient scale); the final
    coefficients are the least-squares refit on the kept terms.
    """
    Th, D, as_numpy, squeeze = _prep(Theta, dXdt)
    check_positive(threshold, "threshold", allow_zero=True)
    check_int(n_rounds, "n_rounds")
    P, d = Th.shape[1], D.shape[1]
    scale = _column_scale(Th)
    Xi = torch.zeros(P, d, dtype=Th.dtype, device=Th.device)
    for j in range(d):
        keep = torch.ones(P, dtype=torch.bool, device=Th.device)
        for _ in range(n_rounds):
            idx = torch.nonzero(keep).flatten()
            if idx.numel() == 0:
                break
            # Pruning only what is numerically gone (1e-6): polynomial terms are strongly
            # collinear, and at sbl's default (1e-3) EM drops true terms early.
            res = sbl(Th[:, idx] / scale[idx], D[:, j], max_iter=max_iter, tol=tol, update="em", prune=1e-6)
            coef = torch.zeros(P, dtype=Th.dtype, device=Th.device)
            coef[idx] = res.x / scale[idx]
            new_keep = keep & (coef.abs() >= threshold)
            if bool((new_keep == keep).all()):
                break
            keep = new_keep
        idx = torch.nonzero(keep).flatten()
        if idx.numel():
            Xi[idx, j] = _ridge(Th[:, idx], D[:, j], 0.0)
    return output(Xi[:, 0] if squeeze else Xi, as_numpy)


def lasso_discovery(Theta, dXdt, lam="cv", *, threshold: float = 0.0):
    """Lasso per state (FISTA on column-normalised terms), optional hard threshold + refit."""
    Th, D, as_numpy, squeeze = _prep(Theta, dXdt)
    P, d = Th.shape[1], D.shape[1]
    scale = _column_scale(Th)
    Xi = torch.zeros(P, d, dtype=Th.dtype, device=Th.device)
    for j in range(d):
        res = fista(Th / scale, D[:, j], lam=lam, max_iter=3000)
        coef = res.x / scale
        if threshold > 0:
            keep = torch.nonzero(coef.abs() >= threshold).flatten()
            coef = torch.zeros_like(coef)
            if keep.numel():
                coef[keep] = _ridge(Th[:, keep], D[:, j], 0.0)
        Xi[:, j] = coef
    return output(Xi[:, 0] if squeeze else Xi, as_numpy)


def lorenz63_rhs(X: torch.Tensor, sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0):
    """The Lorenz-63 vector field for states ``X`` (``... x 3``)."""
    x, y, z = X[..., 0], X[..., 1], X[..., 2]
    return torch.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], dim=-1)


def lorenz63(n_steps: int = 5000, dt: float = 0.002, x0=(-8.0, 7.0, 27.0), *, sigma: float = 10.0,
             rho: float = 28.0, beta: float = 8.0 / 3.0, dtype=torch.float64):
    """Integrate Lorenz-63 with classical RK4.

    Returns ``(t, X, dXdt)`` (torch): times, states ``n_steps x 3`` and the exact derivatives
    (the vector field evaluated on the states).
    """
    check_int(n_steps, "n_steps", minimum=2)
    check_positive(dt, "dt")
    X = torch.empty(n_steps, 3, dtype=dtype)
    X[0] = torch.as_tensor(x0, dtype=dtype)
    f = lambda s: lorenz63_rhs(s, sigma, rho, beta)  # noqa: E731
    for i in range(n_steps - 1):
        s = X[i]
        k1 = f(s)
        k2 = f(s + 0.5 * dt * k1)
        k3 = f(s + 0.5 * dt * k2)
        k4 = f(s + dt * k3)
        X[i + 1] = s + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    t = torch.arange(n_steps, dtype=dtype) * dt
    return t, X, f(X)


def lorenz63_coefficients(feature_names: Sequence[str], sigma: float = 10.0, rho: float = 28.0,
                          beta: float = 8.0 / 3.0) -> np.ndarray:
    """The true ``P x 3`` coefficient matrix of Lorenz-63 for a library with these names."""
    true = {0: {"x": -sigma, "y": sigma}, 1: {"x": rho, "y": -1.0, "x z": -1.0},
            2: {"z": -beta, "x y": 1.0}}
    Xi = np.zeros((len(feature_names), 3))
    for j, terms in true.items():
        for name, val in terms.items():
            if name not in feature_names:
                raise RecoveryError(f"feature_names lack the Lorenz-63 term {name!r}")
            Xi[list(feature_names).index(name), j] = val
    return Xi


def derivative(X, dt: float, *, window: int | None = None, polyorder: int = 3):
    """Time derivative of sampled states ``X`` (``T x d``).

    ``window=None``: second-order central differences (one-sided at the ends). Otherwise a
    Savitzky-Golay fit of ``polyorder`` over ``window`` samples (odd), which also smooths noise
    (scipy). Returns the same kind of array as given.
    """
    Xt, as_numpy = _state(X)
    check_positive(dt, "dt")
    if window is None:
        out = torch.empty_like(Xt)
        out[1:-1] = (Xt[2:] - Xt[:-2]) / (2 * dt)
        out[0] = (-3 * Xt[0] + 4 * Xt[1] - Xt[2]) / (2 * dt)
        out[-1] = (3 * Xt[-1] - 4 * Xt[-2] + Xt[-3]) / (2 * dt)
        return output(out, as_numpy)
    check_int(window, "window", minimum=3)
    if window % 2 == 0 or window <= polyorder:
        raise RecoveryError(f"window must be odd and > polyorder={polyorder}, got {window}")
    from scipy.signal import savgol_filter

    d = savgol_filter(Xt.detach().cpu().numpy(), window, polyorder, deriv=1, delta=dt, axis=0)
    return output(torch.from_numpy(np.ascontiguousarray(d)).to(Xt.device, Xt.dtype), as_numpy)


def smooth(X, *, window: int, polyorder: int = 3):
    """Savitzky-Golay smoothing of the states (scipy); same kind of array as given."""
    Xt, as_numpy = _state(X)
    from scipy.signal import savgol_filter

    s = savgol_filter(Xt.detach().cpu().numpy(), window, polyorder, axis=0)
    return output(torch.from_numpy(np.ascontiguousarray(s)).to(Xt.device, Xt.dtype), as_numpy)
