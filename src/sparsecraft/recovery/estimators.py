"""scikit-learn-style estimators wrapping the functional solvers.

``fit(A, y)`` takes the measurement matrix (or operator; for the Kronecker estimators the list
of factors) and measurements; ``coef_`` is the recovered ``x`` (numpy if the inputs were
numpy, else a tensor on the inputs' device), ``support_``, ``n_iter_`` and ``result_`` (the
full :class:`RecoveryResult`) are set too; ``predict(A)`` returns ``A @ coef_``.
"""

from __future__ import annotations

import numpy as np
import torch

from . import discovery
from ._common import RecoveryError, RecoveryResult
from .convex import fista
from .greedy import kron_omp, omp
from .kronecker_sbl import krosbl
from .message_passing import amp
from .operators import KroneckerOperator, as_operator
from .sbl_em import block_sbl, pc_sbl, sbl


class _Recovery:
    _fn = None

    def _params(self) -> dict:
        return dict(self.__dict__)

    def get_params(self, deep: bool = True) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_")}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self.get_params():
                raise RecoveryError(f"{type(self).__name__} has no parameter {k!r}")
            setattr(self, k, v)
        return self

    def _solve(self, A, y) -> RecoveryResult:
        return type(self)._fn(A, y, **self.get_params())

    def fit(self, A, y):
        res = self._solve(A, y)
        self.result_ = res
        self.coef_ = res.x
        self.support_ = res.support
        self.n_iter_ = res.n_iter
        self.converged_ = res.converged
        return self

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RecoveryError(f"{type(self).__name__} is not fitted; call fit(A, y) first")

    def predict(self, A):
        self._check_fitted()
        op = KroneckerOperator(A) if isinstance(A, (list, tuple)) else as_operator(A)
        coef = self.coef_
        as_numpy = isinstance(coef, np.ndarray)
        c = torch.from_numpy(coef) if as_numpy else coef
        if c.shape[0] != op.shape[1]:
            raise RecoveryError(f"A has {op.shape[1]} columns but coef_ has {c.shape[0]} entries")
        out = op.matvec(c.to(device=op.device, dtype=torch.promote_types(op.dtype, c.dtype)))
        return out.cpu().numpy() if as_numpy else out

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class OMP(_Recovery):
    """Orthogonal matching pursuit (:func:`~sparsecraft.recovery.greedy.omp`)."""
    _fn = staticmethod(omp)

    def __init__(self, n_nonzero=None, *, tol=None, normalize=True, max_iter=None):
        self.n_nonzero, self.tol, self.normalize, self.max_iter = n_nonzero, tol, normalize, max_iter


class KroneckerOMP(_Recovery):
    """Kronecker OMP (:func:`~sparsecraft.recovery.greedy.kron_omp`); ``fit(factors, y)``."""
    _fn = staticmethod(kron_omp)

    def __init__(self, n_nonzero=None, *, tol=None, max_iter=None):
        self.n_nonzero, self.tol, self.max_iter = n_nonzero, tol, max_iter


class Lasso(_Recovery):
    """Lasso by FISTA (:func:`~sparsecraft.recovery.convex.fista`)."""
    _fn = staticmethod(fista)

    def __init__(self, lam="cv", *, noise_var=None, max_iter=1000, tol=1e-6, n_folds=5, debias=False):
        self.lam, self.noise_var, self.max_iter, self.tol = lam, noise_var, max_iter, tol
        self.n_folds, self.debias = n_folds, debias


class AMP(_Recovery):
    """Damped AMP with divergence detection (:func:`~sparsecraft.recovery.message_passing.amp`)."""
    _fn = staticmethod(amp)

    def __init__(self, *, alpha=1.5, damping=1.0, max_iter=500, tol=1e-6, divergence_factor=10.0,
                 on_divergence="raise"):
        self.alpha, self.damping, self.max_iter, self.tol = alpha, damping, max_iter, tol
        self.divergence_factor, self.on_divergence = divergence_factor, on_divergence


class SBL(_Recovery):
    """Classic SBL (:func:`~sparsecraft.recovery.sbl_em.sbl`): ``update="fast"`` (default,
    Tipping and Faul's sequential method), ``"em"`` or ``"mackay"``; ``noise_var_`` after fit."""
    _fn = staticmethod(sbl)

    def __init__(self, *, noise_var=None, max_iter=1000, tol=None, prune=None, update="fast", add_level=0.1):
        self.noise_var, self.max_iter, self.tol, self.prune = noise_var, max_iter, tol, prune
        self.update, self.add_level = update, add_level

    def fit(self, A, y):
        super().fit(A, y)
        self.noise_var_ = self.result_.info["noise_var"]
        return self


class BlockSBL(SBL):
    """Block SBL with a known partition (:func:`~sparsecraft.recovery.sbl_em.block_sbl`)."""
    _fn = staticmethod(block_sbl)

    def __init__(self, blocks, *, noise_var=None, max_iter=1000, tol=1e-6, prune=1e-3):
        self.blocks = blocks
        self.noise_var, self.max_iter, self.tol, self.prune = noise_var, max_iter, tol, prune

    def _solve(self, A, y):
        p = self.get_params()
        blocks = p.pop("blocks")
        return block_sbl(A, y, blocks, **p)


class PatternCoupledSBL(SBL):
    """Pattern-coupled SBL (:func:`~sparsecraft.recovery.sbl_em.pc_sbl`)."""
    _fn = staticmethod(pc_sbl)

    def __init__(self, beta=1.0, *, noise_var=None, max_iter=1000, tol=1e-6, prune=1e-3):
        self.beta = beta
        self.noise_var, self.max_iter, self.tol, self.prune = noise_var, max_iter, tol, prune


class KroSBL(SBL):
    """Kronecker-structured SBL (:func:`~sparsecraft.recovery.kronecker_sbl.krosbl`); ``fit(factors, y)``.

    ``method="am"`` or ``"svd"``; ``coupling`` gives the block-coupled variant (PC-KroSBL).
    """
    _fn = staticmethod(krosbl)

    def __init__(self, method="am", *, coupling=None, noise_var=None, max_iter=300, tol=1e-4,
                 prune=1e-3, n_sweeps=10, init_scale=None, restarts=2, restart_draws=0, seed=0, accelerate=True,
                 subset_restarts=True, init_supports=None):
        self.method, self.coupling, self.n_sweeps, self.init_scale = method, coupling, n_sweeps, init_scale
        self.restarts, self.restart_draws, self.seed, self.accelerate = restarts, restart_draws, seed, accelerate
        self.subset_restarts, self.init_supports = subset_restarts, init_supports
        self.noise_var, self.max_iter, self.tol, self.prune = noise_var, max_iter, tol, prune


class EquationDiscovery:
    """Sparse identification of ``dX/dt = Theta(X) Xi`` with a polynomial library.

    Args:
        method: ``"stlsq"``, ``"sbl"`` (SBL/RVM with thresholding) or ``"lasso"``.
        degree: polynomial degree of the library.
        threshold: coefficient magnitude below which a term is dropped.
        names: state names for :meth:`equations`.

    ``fit(X, dXdt)`` sets ``coef_`` (``P x d``) and ``feature_names_``; ``predict(X)`` returns
    the modelled derivatives; :meth:`equations` renders the discovered equations.
    """

    def __init__(self, method: str = "stlsq", *, degree: int = 2, threshold: float = 0.1, names=None):
        if method not in ("stlsq", "sbl", "lasso"):
            raise RecoveryError(f"method must be 'stlsq', 'sbl' or 'lasso', got {method!r}")
        self.method, self.degree, self.threshold, self.names = method, degree, threshold, names

    def fit(self, X, dXdt):
        Theta, self.feature_names_ = discovery.polynomial_library(X, self.degree, names=self.names)
        if self.method == "stlsq":
            self.coef_ = discovery.stlsq(Theta, dXdt, self.threshold)
        elif self.method == "sbl":
            self.coef_ = discovery.sbl_threshold(Theta, dXdt, self.threshold)
        else:
            self.coef_ = discovery.lasso_discovery(Theta, dXdt, threshold=self.threshold)
        return self

    def predict(self, X):
        if not hasattr(self, "coef_"):
            raise RecoveryError("EquationDiscovery is not fitted; call fit(X, dXdt) first")
        Theta, _ = discovery.polynomial_library(X, self.degree, names=self.names)
        return Theta @ self.coef_

    def equations(self, precision: int = 3) -> list[str]:
        if not hasattr(self, "coef_"):
            raise RecoveryError("EquationDiscovery is not fitted; call fit(X, dXdt) first")
        C = np.asarray(self.coef_.cpu() if isinstance(self.coef_, torch.Tensor) else self.coef_)
        C = C.reshape(C.shape[0], -1)
        lhs = self.names or discovery.default_state_names(C.shape[1])
        out = []
        for j in range(C.shape[1]):
            terms = [f"{C[i, j]:+.{precision}g} {n}".replace(" 1", "") if n == "1" else f"{C[i, j]:+.{precision}g} {n}"
                     for i, n in enumerate(self.feature_names_) if C[i, j] != 0]
            out.append(f"d{lhs[j]}/dt = " + (" ".join(terms) if terms else "0"))
        return out
