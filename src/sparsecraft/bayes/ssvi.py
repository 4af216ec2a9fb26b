"""Sparse Subspace Variational Inference (SSVI; Li et al., 2024): a Bayesian network that is
sparse from the first step to the last.

The variational posterior lives on a sparse subspace: the means (and variances) of a fixed
number of weights, chosen at random with ERK densities at the start (the head stays dense,
as for the library's RigL). The subspace is trained by VI (Gaussian prior, local
reparameterisation) and, every ``update_every`` steps until ``end``, a decaying fraction of
each layer's active weights is exchanged, keeping every layer's exact count:

* **removal** takes the active weights with the lowest ``criterion``, a statistic of each
  weight's posterior ``q(theta) = N(mu, sigma^2)``: ``snr`` (the default, ``|mu| / sigma``),
  ``magnitude`` (``|mu|``), ``second_moment`` (``mu^2 + sigma^2``), and the paper's two
  statistics of ``|theta|`` (a folded normal): ``mean_abs`` (``E|theta|``) and ``snr_abs``
  (``E|theta| / std|theta|``, the paper's default; it is an increasing function of
  ``|mu| / sigma`` alone, so it removes exactly the weights ``snr`` removes);
* **growth** takes the inactive weights with the largest dense gradient ``|dL/dmu|``
  (``grow="gradient"``, read only on the backward pass before an update, as RigL) or random
  ones (``grow="random"``, a seeded generator saved in the state).

A grown weight starts with a tiny random mean (``1e-3`` times a standard normal draw; a mean
of exactly zero means "pruned" to the variational layers) and a log variance of
``grow_sigma``: ``"init"`` (the run's starting value) or ``"mean"`` (the mean log variance of
the layer's weights that stayed, as the paper does, so a newcomer is as uncertain as its
neighbours rather than a near point estimate); its optimizer state (mean and variance) is
reset. Training FLOPs are counted against dense VI on the same passes
(:class:`~.flops.TrainingFlops`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..allocation import check_sparsity
from ..errors import ConfigError
from ..train.base import StateMismatch, unwrap_model
from ..train.dynamic import RigL
from ..train.pruning import _check_allocation
from ..train.registry import (
    Plan,
    option_choice,
    option_int,
    option_number,
    option_steps,
    recipe_method,
    recipe_sparsity,
)
from ..train.schedules import UpdateSchedule
from .flops import TrainingFlops
from .layers import DEFAULT_LOG_SIGMA2
from .measures import check_samples
from .objective import ELBO, VI_OPTIONS, _train_size, variational_report, vi_settings
from .priors import GaussianPrior

__all__ = ["SSVI", "SSVI_CRITERIA", "subspace_scores", "folded_normal_moments"]

SSVI_CRITERIA = ("snr", "magnitude", "second_moment", "mean_abs", "snr_abs")
GROW = ("gradient", "random")
GROW_SIGMA = ("init", "mean")
_GROWN_SCALE = 1e-3


def folded_normal_moments(mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E|theta|, Var|theta|)`` for ``theta ~ N(mu, sigma^2)``; pure, in float64 (the variance
    ``mu^2 + sigma^2 - E|theta|^2`` cancels when ``|mu| >> sigma``)."""
    mu, sigma = mu.double(), sigma.double().clamp_min(1e-30)
    r = mu / sigma
    mean = sigma * math.sqrt(2 / math.pi) * torch.exp(-0.5 * r * r) + mu * torch.erf(r / math.sqrt(2))
    var = (mu * mu + sigma * sigma - mean * mean).clamp_min(0.0)
    # beyond 8 standard deviations |theta| is theta's normal to double precision
    far = r.abs() > 8
    return torch.where(far, mu.abs(), mean), torch.where(far, sigma * sigma, var)


def subspace_scores(mu: torch.Tensor, log_sigma2: torch.Tensor, criterion: str) -> torch.Tensor:
    """The removal score of every weight (lowest goes first); pure."""
    mu, log_sigma2 = mu.detach().float(), log_sigma2.detach().float()
    if criterion == "snr":
        return mu.abs() * torch.exp(-0.5 * log_sigma2)
    if criterion == "magnitude":
        return mu.abs()
    if criterion == "second_moment":
        return mu * mu + torch.exp(log_sigma2)
    if criterion in ("mean_abs", "snr_abs"):
        mean, var = folded_normal_moments(mu, torch.exp(0.5 * log_sigma2.double()))
        if criterion == "mean_abs":
            return mean.float()
        return (mean / var.sqrt().clamp_min(1e-300)).clamp_max(1e30).float()
    raise ConfigError(f"unknown SSVI criterion '{criterion}'; known: {', '.join(SSVI_CRITERIA)}")


class SSVI(RigL):
    """``SSVI(model, 0.9, update_every=100, end=1500, optimizer=opt, train_size=4000)``.

    ``fraction`` (decaying by ``decay`` until ``end``) of each layer's active weights is
    exchanged every ``update_every`` steps; ``prior_var``, ``kl_weight``, ``kl_warmup`` and
    ``init_log_sigma2`` are those of :class:`~.objective.ELBO`."""

    method = "ssvi"

    def __init__(self, model: nn.Module, sparsity: float, update_every: int = 100, end: int | None = None,
                 optimizer=None, *, train_size: int, criterion: str = "snr", grow: str = "gradient",
                 grow_sigma: str = "init", prior_var: float = 1.0, kl_weight: float = 1.0, kl_warmup: int = 0,
                 init_log_sigma2: float = DEFAULT_LOG_SIGMA2, samples: int = 10, fraction: float = 0.3,
                 decay: str = "cosine", allocation: str = "erk", seed: int = 0, targets=None):
        # every setting is checked before the layers become variational
        check_sparsity(sparsity, "SSVI sparsity")
        if end is None:
            raise ConfigError("SSVI needs end: the step after which the subspace stops changing")
        schedule = UpdateSchedule(every=update_every, end=end, fraction=fraction, decay=decay)
        if schedule.every >= schedule.end:
            raise ConfigError(f"SSVI: update_every ({update_every}) must be below end ({end})")
        _check_allocation(allocation)
        if criterion not in SSVI_CRITERIA:
            raise ConfigError(f"unknown SSVI criterion '{criterion}'; known: {', '.join(SSVI_CRITERIA)}")
        if grow not in GROW:
            raise ConfigError(f"unknown SSVI growth '{grow}'; known: {', '.join(GROW)}")
        if grow_sigma not in GROW_SIGMA:
            raise ConfigError(f"unknown SSVI grow_sigma '{grow_sigma}'; known: {', '.join(GROW_SIGMA)}")
        self.criterion, self.grow, self.samples = criterion, grow, check_samples(samples)
        self.grow_sigma = grow_sigma
        model = unwrap_model(model)
        self.elbo = ELBO(model, optimizer, GaussianPrior(prior_var), train_size=train_size, kl_weight=kl_weight,
                         kl_warmup=kl_warmup, init_log_sigma2=init_log_sigma2, seed=seed)
        super().__init__(model, sparsity, update_every, end, optimizer, fraction=fraction, decay=decay,
                         allocation=allocation, init="random", seed=seed, targets=targets)
        if grow == "random":
            self.state.grad_observer = None
        self.flops = TrainingFlops(self.elbo.layers)

    # -- the variational objective -------------------------------------------------------------
    def loss_term(self) -> torch.Tensor:
        self._check_open()
        return self.elbo.loss_term(self.step_count)

    def report(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        return {**variational_report(self.model, x, y, self.samples), "train_flops": self.flops.sparse,
                "train_flops_dense_vi": self.flops.dense, "train_flops_ratio": self.flops.ratio()}

    # -- subspace updates --------------------------------------------------------------------------
    def drop_scores(self, target) -> torch.Tensor:
        return subspace_scores(target.param, target.module.log_sigma2, self.criterion)

    def grow_scores(self, name, keep):
        if self.grow == "random":
            return torch.rand(keep.shape, generator=self.generator).to(keep.device)
        return super().grow_scores(name, keep)

    def _before_update(self):
        if self.grow == "gradient":
            super()._before_update()
            self.flops.add_dense_gradient()

    @torch.no_grad()
    def _init_grown_(self, target, grown):
        mu, log_sigma2 = target.param, target.module.log_sigma2
        start = _GROWN_SCALE * torch.randn(mu.shape, generator=self.generator).to(mu)
        start = torch.where(start == 0, torch.full_like(start, _GROWN_SCALE), start)
        mu.copy_(torch.where(grown, start, mu))
        fill = self.elbo.init_log_sigma2
        stayed = (mu != 0) & ~grown
        if self.grow_sigma == "mean" and stayed.any():
            fill = float(log_sigma2[stayed].mean())
        log_sigma2.masked_fill_(grown, fill)
        self.reset_optimizer_state_(target.name, grown)
        for opt in self.optimizers:
            for value in opt.state.get(log_sigma2, {}).values():
                if torch.is_tensor(value) and value.shape == log_sigma2.shape:
                    value.masked_fill_(grown, 0)

    def finalize_(self) -> nn.Module:
        model = super().finalize_()
        self.elbo.release()
        self.flops.remove()
        return model

    # -- persistence ------------------------------------------------------------------------------
    def config_dict(self):
        return {**super().config_dict(), **self.elbo.config(), "criterion": self.criterion, "grow": self.grow,
                "grow_sigma": self.grow_sigma, "samples": self.samples}

    def _extra_state(self):
        return {**super()._extra_state(), "noise": self.elbo.generator.get_state(), "flops": self.flops.state()}

    def _check_state(self, state):
        super()._check_state(state)
        extra = state.get("extra") or {}
        noise, mine = extra.get("noise"), self.elbo.generator.get_state()
        if not (torch.is_tensor(noise) and noise.dtype == mine.dtype and noise.shape == mine.shape):
            raise StateMismatch("ssvi state: the noise generator state does not fit")
        flops = extra.get("flops")
        if not (isinstance(flops, dict) and set(flops) == {"sparse", "dense"}
                and all(isinstance(v, float) for v in flops.values())):
            raise StateMismatch("ssvi state: the FLOP counts do not fit")

    def _load_extra_state(self, extra):
        super()._load_extra_state(extra)
        self.elbo.generator.set_state(extra["noise"])
        self.flops.load(extra["flops"])


@recipe_method("ssvi", options=VI_OPTIONS | {"update_every", "end", "fraction", "decay", "allocation", "criterion",
                                             "grow", "grow_sigma", "prior_var"})
def _plan_ssvi(recipe) -> Plan:
    sparsity = recipe_sparsity(recipe)
    if recipe.pattern != "unstructured":
        raise ConfigError(f"train recipe: method 'ssvi' is unstructured only, got pattern {recipe.pattern!r}")
    settings = vi_settings(recipe)
    end = option_steps(recipe, "end", 0.75, low=1)
    every = option_int(recipe, "update_every", 50)
    if every >= end:
        raise ConfigError(f"train recipe: options.update_every ({every}) must be below options.end (step {end})")
    fraction = option_number(recipe, "fraction", 0.3, high=1.0)
    if fraction == 0:
        raise ConfigError("train recipe: options.fraction must be in (0, 1], got 0")
    decay = option_choice(recipe, "decay", "cosine", ("cosine", "linear", "constant"))
    from ..allocation import ALLOCATIONS

    allocation = option_choice(recipe, "allocation", "erk", ALLOCATIONS)
    criterion = option_choice(recipe, "criterion", "snr", SSVI_CRITERIA)
    grow = option_choice(recipe, "grow", "gradient", GROW)
    grow_sigma = option_choice(recipe, "grow_sigma", "init", GROW_SIGMA)
    prior_var = option_number(recipe, "prior_var", 1.0, low=1e-12)

    def build(model, optimizer, context):
        return SSVI(model, sparsity, every, end, optimizer, train_size=_train_size(context), criterion=criterion,
                    grow=grow, grow_sigma=grow_sigma, prior_var=prior_var, fraction=fraction, decay=decay,
                    allocation=allocation, **settings)

    return Plan(build, recipe.steps)
