"""Sparse variational dropout (Molchanov, Ashukha and Vetrov, 2017).

Every weight has its own dropout rate ``alpha = sigma^2 / mu^2`` (parameterised additively
by ``mu`` and ``log_sigma2``, which keeps gradient variance low), under the log-uniform
prior whose KL is approximated as in the paper (:func:`~.priors.log_uniform_kl`). Training
pushes ``alpha`` of the useless weights to infinity; at the end, weights with
``log_alpha > threshold`` (default 3: alpha > 20, i.e. noise twenty times the signal) are
set to exactly zero.
"""

from __future__ import annotations

from ..train.registry import Plan, option_number, recipe_method
from .objective import VI_OPTIONS, VariationalTraining, _train_size, vi_settings
from .priors import DEFAULT_THRESHOLD, LogUniformPrior

__all__ = ["VariationalDropout"]


class VariationalDropout(VariationalTraining):
    """``VariationalDropout(model, opt, train_size=4000, threshold=3.0)``; ``step()`` after every
    optimizer step, ``finalize_()`` prunes."""

    method = "vd"

    def __init__(self, model, optimizer=None, *, train_size: int, threshold: float = DEFAULT_THRESHOLD, **kwargs):
        super().__init__(model, optimizer, train_size=train_size, prior=LogUniformPrior(), threshold=threshold,
                         **kwargs)


@recipe_method("vd", options=VI_OPTIONS | {"threshold"})
def _plan_vd(recipe) -> Plan:
    settings = vi_settings(recipe)
    threshold = option_number(recipe, "threshold", DEFAULT_THRESHOLD, low=-10.0, high=10.0)

    def build(model, optimizer, context):
        return VariationalDropout(model, optimizer, train_size=_train_size(context), threshold=threshold, **settings)

    return Plan(build, recipe.steps)
