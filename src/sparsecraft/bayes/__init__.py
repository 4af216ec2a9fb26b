"""Bayesian sparsification: variational layers, uncertainty, sparse and structured VI.

```
import sparsecraft as sc
from sparsecraft import bayes

vd = bayes.VariationalDropout(model, opt, train_size=len(x_train))   # makes the layers variational
for x, y in loader:
    loss = F.cross_entropy(model(x), y) + vd.loss_term()             # negative ELBO per example
    opt.zero_grad(); loss.backward(); opt.step(); vd.step()
vd.finalize_()                                                       # weights with log alpha > 3 -> 0
print(bayes.uncertainty_report(model, x_test, y_test, bayes.ood_inputs(x_test, "rotated"), samples=10))
```

* :mod:`.layers`: :class:`BayesLinear`, :class:`BayesConv2d` (mean-field Gaussian, local
  reparameterisation, KL per layer), :func:`bayesian_`, :func:`deterministic_`, :func:`sampling`;
* :mod:`.priors`: Gaussian, log-uniform (variational dropout), ARD;
* :mod:`.measures`: NLL, ECE, Brier, predictive entropy, AUROC, OOD sets;
* training objects (``step()`` / ``state_dict()`` like :mod:`sparsecraft.train`, each a
  ``sparsecraft train`` recipe): :class:`VariationalTraining` (``vi``),
  :class:`VariationalDropout` (``vd``), :class:`ARD` (``ard``), :class:`SSVI` (``ssvi``),
  :class:`TurboVBI` (``turbo-vbi``).
"""

from .ard import ARD
from .layers import (
    DEFAULT_LOG_SIGMA2,
    BayesConv2d,
    BayesLayer,
    BayesLinear,
    bayes_layers,
    bayesian_,
    deterministic_,
    kl_divergence,
    sampling,
)
from .measures import OOD_KINDS, auroc, brier, ece, entropy, nll, ood_inputs, predict_probs, uncertainty_report
from .objective import ELBO, VariationalTraining
from .priors import DEFAULT_THRESHOLD, ARDPrior, GaussianPrior, LogUniformPrior, Prior, gaussian_kl, log_uniform_kl
from .ssvi import SSVI, folded_normal_moments, subspace_scores
from .turbo import TurboPrior, TurboVBI, shrink_neurons_, support_posterior, zero_neurons_
from .vd import VariationalDropout

__all__ = [
    "BayesLinear", "BayesConv2d", "BayesLayer", "bayesian_", "deterministic_", "bayes_layers", "kl_divergence",
    "sampling", "DEFAULT_LOG_SIGMA2",
    "Prior", "GaussianPrior", "LogUniformPrior", "ARDPrior", "gaussian_kl", "log_uniform_kl", "DEFAULT_THRESHOLD",
    "nll", "ece", "brier", "entropy", "auroc", "predict_probs", "ood_inputs", "uncertainty_report", "OOD_KINDS",
    "ELBO", "VariationalTraining", "VariationalDropout", "ARD", "SSVI", "subspace_scores", "folded_normal_moments",
    "TurboVBI", "TurboPrior", "support_posterior", "shrink_neurons_", "zero_neurons_",
]
