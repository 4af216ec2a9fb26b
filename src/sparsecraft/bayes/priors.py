"""Priors over the weights of variational layers, each with the KL term of the layer.

The posterior of every weight is ``N(mu, sigma^2)`` (mean-field). A prior turns
``(mu, log_sigma2, active)`` into the layer's KL divergence ``KL(q || p)``, summed over the
active weights only (a weight whose mean is exactly zero is pruned: a point mass at zero
with no KL, see :mod:`.layers`).

* :class:`GaussianPrior`: ``N(0, var)``, KL in closed form.
* :class:`LogUniformPrior`: the improper log-uniform prior of sparse variational dropout;
  its KL has no closed form and uses the approximation of Molchanov et al. (2017),
  ``-KL ~ k1 sigmoid(k2 + k3 log_alpha) - 0.5 log(1 + 1/alpha) - k1``.
* :class:`ARDPrior`: ``N(0, gamma)`` with one variance per weight, learned by variational
  EM: ``em_step_`` sets ``gamma = mu^2 + sigma^2`` (the M-step's maximiser), the layer's
  KL then uses the Gaussian closed form with that ``gamma``.

``log_alpha = log(sigma^2 / mu^2)`` says how much a weight is noise: above the threshold
(default 3, i.e. alpha > 20, the value of the variational-dropout paper) it is pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError

__all__ = ["Prior", "GaussianPrior", "LogUniformPrior", "ARDPrior", "PRIORS", "make_prior",
           "gaussian_kl", "log_uniform_kl", "log_alpha", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 3.0
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695


def log_alpha(mu: torch.Tensor, log_sigma2: torch.Tensor, clip: float = 10.0) -> torch.Tensor:
    """``log(sigma^2 / mu^2)``, clipped to [-clip, clip] (large values all mean "noise")."""
    return torch.clamp(log_sigma2 - torch.log(mu * mu + 1e-8), -clip, clip)


def gaussian_kl(mu: torch.Tensor, log_sigma2: torch.Tensor, prior_var: torch.Tensor | float) -> torch.Tensor:
    """Elementwise ``KL(N(mu, sigma^2) || N(0, prior_var))``."""
    prior_var = torch.as_tensor(prior_var, dtype=mu.dtype, device=mu.device)
    sigma2 = torch.exp(log_sigma2)
    return 0.5 * ((sigma2 + mu * mu) / prior_var - 1.0 - log_sigma2 + torch.log(prior_var))


def log_uniform_kl(mu: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL to the log-uniform prior, Molchanov et al.'s approximation (up to a constant
    chosen so that the KL tends to 0 as alpha -> infinity)."""
    la = log_alpha(mu, log_sigma2)
    return -(_K1 * torch.sigmoid(_K2 + _K3 * la) - 0.5 * torch.nn.functional.softplus(-la) - _K1)


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a number > 0, got {value!r}")
    return float(value)


class Prior:
    """Base: ``kl(layer)`` sums the layer's KL over its active weights."""

    name: ClassVar[str] = ""

    def kl(self, layer) -> torch.Tensor:
        raise NotImplementedError

    def attach_(self, layer) -> None:
        """Give ``layer`` the buffers this prior keeps per weight (none by default)."""

    def config(self) -> dict:
        return {"prior": self.name}


@dataclass
class GaussianPrior(Prior):
    """``N(0, var)`` for every weight."""

    var: float = 1.0
    name: ClassVar[str] = "gaussian"

    def __post_init__(self):
        self.var = _positive(self.var, "gaussian prior var")

    def kl(self, layer):
        active = layer.active()
        return (gaussian_kl(layer.weight, layer.log_sigma2, self.var) * active).sum()

    def config(self):
        return {"prior": self.name, "var": self.var}


@dataclass
class LogUniformPrior(Prior):
    """The log-uniform (scale-invariant) prior of sparse variational dropout."""

    name: ClassVar[str] = "log-uniform"

    def kl(self, layer):
        return (log_uniform_kl(layer.weight, layer.log_sigma2) * layer.active()).sum()


@dataclass
class ARDPrior(Prior):
    """``N(0, gamma_i)`` per weight; ``gamma`` (a buffer ``prior_var`` on the layer) is set by
    the M-step :meth:`em_step_`; ``init_var`` is its starting value."""

    init_var: float = 1.0
    name: ClassVar[str] = "ard"

    def __post_init__(self):
        self.init_var = _positive(self.init_var, "ard prior init_var")

    def attach_(self, layer):
        if getattr(layer, "prior_var", None) is None:
            layer.register_buffer("prior_var", torch.full_like(layer.weight.detach(), self.init_var))

    def kl(self, layer):
        return (gaussian_kl(layer.weight, layer.log_sigma2, layer.prior_var) * layer.active()).sum()

    @torch.no_grad()
    def em_step_(self, layer) -> None:
        """M-step: ``gamma = mu^2 + sigma^2`` maximises the expected log prior; floored so a
        pruned weight's variance stays positive."""
        layer.prior_var.copy_((layer.weight * layer.weight + torch.exp(layer.log_sigma2)).clamp_min(1e-12))

    def config(self):
        return {"prior": self.name, "init_var": self.init_var}


PRIORS: dict[str, type[Prior]] = {"gaussian": GaussianPrior, "log-uniform": LogUniformPrior, "ard": ARDPrior}


def make_prior(prior: str | Prior, **options) -> Prior:
    if isinstance(prior, Prior):
        return prior
    cls = PRIORS.get(prior)
    if cls is None:
        raise ConfigError(f"unknown prior '{prior}'; known: {', '.join(PRIORS)}")
    return cls(**options)
