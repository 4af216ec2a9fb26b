"""Sparse recovery: find a sparse ``x`` from ``y = A x + noise`` with ``A`` underdetermined.

Functional solvers (torch on the inputs' device; numpy in, numpy out) return a
:class:`RecoveryResult`; estimator classes wrap them with ``fit`` / ``predict`` / ``coef_``.
"""

from . import discovery
from ._common import DivergenceError, RecoveryError, RecoveryResult
from .batched import krosbl_batch, omp_batch
from .convex import cv_lambda, fista, lambda_max, soft_threshold, universal_lambda
from .discovery import lorenz63, polynomial_library, sbl_threshold, stlsq
from .estimators import AMP, OMP, SBL, BlockSBL, EquationDiscovery, KroneckerOMP, KroSBL, Lasso, PatternCoupledSBL
from .greedy import kron_omp, omp
from .kronecker_sbl import am_mstep, kron_posterior, krosbl, rank_one_fit
from .message_passing import amp, amp_step
from .operators import DenseOperator, KroneckerOperator, LinearOperator, PartialDFTOperator, as_operator, kron_apply
from .sbl_em import block_sbl, pc_sbl, sbl, sbl_posterior
from .sbl_fast_batch import sbl_batch

__all__ = [
    "AMP", "BlockSBL", "EquationDiscovery", "KroSBL", "KroneckerOMP", "Lasso", "OMP",
    "PatternCoupledSBL", "SBL", "discovery", "lorenz63", "polynomial_library", "sbl_threshold", "stlsq",
    "DenseOperator", "DivergenceError", "KroneckerOperator", "LinearOperator",
    "PartialDFTOperator", "RecoveryError", "RecoveryResult", "as_operator", "block_sbl",
    "am_mstep", "amp", "amp_step", "cv_lambda", "fista", "kron_posterior", "krosbl", "rank_one_fit", "kron_apply", "kron_omp", "krosbl_batch", "lambda_max", "omp", "omp_batch", "pc_sbl", "sbl", "sbl_batch",
    "sbl_posterior", "soft_threshold", "universal_lambda",
]
