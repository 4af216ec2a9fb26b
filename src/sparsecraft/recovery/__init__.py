"""Sparse recovery: find a sparse ``x`` from ``y = A x + noise`` with ``A`` underdetermined.

Functional solvers (torch on the inputs' device; numpy in, numpy out) return a
:class:`RecoveryResult`; estimator classes wrap them with ``fit`` / ``predict`` / ``coef_``.
"""

from ._common import DivergenceError, RecoveryError, RecoveryResult
from .convex import cv_lambda, fista, lambda_max, soft_threshold, universal_lambda
from .greedy import kron_omp, omp
from .operators import (DenseOperator, KroneckerOperator, LinearOperator, PartialDFTOperator,
                        as_operator, kron_apply)
from .sbl import block_sbl, pc_sbl, sbl, sbl_posterior

__all__ = [
    "DenseOperator", "DivergenceError", "KroneckerOperator", "LinearOperator",
    "PartialDFTOperator", "RecoveryError", "RecoveryResult", "as_operator", "block_sbl",
    "cv_lambda", "fista", "kron_apply", "kron_omp", "lambda_max", "omp", "pc_sbl", "sbl",
    "sbl_posterior", "soft_threshold", "universal_lambda",
]
