"""Automatic relevance determination by variational EM.

Each weight has a Gaussian prior ``N(0, gamma_i)`` with its own variance. The E-step is the
variational posterior ``N(mu, sigma^2)``, trained by gradient steps on the ELBO; every
``em_every`` steps the M-step sets ``gamma_i = mu_i^2 + sigma_i^2`` (its closed-form
maximiser). An irrelevant weight's prior variance collapses, which pulls its mean to zero
while its variance stays: the posterior says "irrelevant" through a large
``log_alpha = log(sigma^2 / mu^2)``, and weights above ``threshold`` (default 3) are pruned
at the end. (:mod:`sparsecraft.recovery` solves the same model for linear problems.)
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..train.registry import Plan, option_int, option_number, recipe_method
from .objective import VI_OPTIONS, VariationalTraining, _train_size, vi_settings
from .priors import DEFAULT_THRESHOLD, ARDPrior

__all__ = ["ARD"]


class ARD(VariationalTraining):
    """``ARD(model, opt, train_size=4000, em_every=50, threshold=3.0, init_var=1.0)``."""

    method = "ard"

    def __init__(self, model, optimizer=None, *, train_size: int, em_every: int = 50,
                 threshold: float = DEFAULT_THRESHOLD, init_var: float = 1.0, **kwargs):
        self.em_every = em_every
        super().__init__(model, optimizer, train_size=train_size, prior=ARDPrior(init_var), threshold=threshold,
                         **kwargs)

    def _validate_extra(self):
        if isinstance(self.em_every, bool) or not isinstance(self.em_every, int) or self.em_every < 1:
            raise ConfigError(f"ARD em_every must be an integer >= 1, got {self.em_every!r}")

    def _update(self, step: int) -> dict[str, Any] | None:
        if step % self.em_every:
            return None
        for _, layer in self.elbo.layers:
            self.elbo.prior.em_step_(layer)  # type: ignore[attr-defined]
        return {"em": True}

    def config_dict(self):
        return {**super().config_dict(), "em_every": self.em_every}


@recipe_method("ard", options=VI_OPTIONS | {"threshold", "em_every", "prior_var"})
def _plan_ard(recipe) -> Plan:
    settings = vi_settings(recipe)
    threshold = option_number(recipe, "threshold", DEFAULT_THRESHOLD, low=-10.0, high=10.0)
    em_every = option_int(recipe, "em_every", 50)
    init_var = option_number(recipe, "prior_var", 1.0, low=1e-12)

    def build(model, optimizer, context):
        return ARD(model, optimizer, train_size=_train_size(context), em_every=em_every, threshold=threshold,
                   init_var=init_var, **settings)

    return Plan(build, recipe.steps)
