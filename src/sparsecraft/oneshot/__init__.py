"""One-shot (post-training) pruning: the pure per-layer tensor math.

One file per method; every function takes tensors and returns tensors, with no hooks and
no module walking; each method file also registers its solver, refiner or allocation
(the classes at the bottom of the file). :mod:`.driver` is the block-by-block runner that
collects what they require.

* :mod:`.stats`: input statistics accumulated batch by batch (norms, mean/var, Hessian).
* :mod:`.wanda`: Wanda scores and masks; registers the ``wanda`` criterion.
* :mod:`.sparsegpt`: the SparseGPT OBS solver with escalating damping.
* :mod:`.dsnot`: DSnoT prune-and-grow mask refinement (training-free).
* :mod:`.owl`: OWL outlier-weighted per-layer sparsities.
* :mod:`.reconstruction`: ``||WX - W'X|| / ||WX||`` from inputs or a Hessian.
* :mod:`.admm`: the ADMM layer solver with an exact back-solve on the support.
* :mod:`.block_tuning`: block reconstruction with the masks fixed.
* :mod:`.learned_masks`: learned N:M masks (Gumbel-softmax over each group's choices).

Every module of this package is imported with it, so a method file dropped in here
registers itself without any other file changing.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .dsnot import DSnoT, dsnot_refine, expected_row_error
from .owl import OWL, outlier_ratio, owl_counts, owl_sparsities
from .reconstruction import relative_reconstruction_error
from .sparsegpt import SolverError, SparseGPTSolver, inverse_cholesky_upper, sparsegpt_prune
from .stats import HessianAccumulator, InputNormAccumulator
from .wanda import Wanda, WandaSolver, row_prune_counts, rowwise_keep_mask, wanda_mask, wanda_scores

__all__ = [
    "InputNormAccumulator",
    "HessianAccumulator",
    "wanda_scores",
    "wanda_mask",
    "row_prune_counts",
    "rowwise_keep_mask",
    "Wanda",
    "sparsegpt_prune",
    "SolverError",
    "inverse_cholesky_upper",
    "dsnot_refine",
    "expected_row_error",
    "outlier_ratio",
    "owl_sparsities",
    "owl_counts",
    "relative_reconstruction_error",
    "WandaSolver",
    "SparseGPTSolver",
    "DSnoT",
    "OWL",
]

for _module in _pkgutil.iter_modules(__path__):
    if _module.name != "commands":  # the CLI's module; loaded by the parser, not a method
        _importlib.import_module(f"{__name__}.{_module.name}")
