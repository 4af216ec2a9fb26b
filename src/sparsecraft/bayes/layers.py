"""Mean-field Gaussian variational layers with the local reparameterisation trick.

:class:`BayesLinear` and :class:`BayesConv2d` subclass ``nn.Linear`` / ``nn.Conv2d``: the
parameter ``weight`` is the posterior mean ``mu`` and ``log_sigma2`` the log variance, so
the rest of the library sees ordinary Linear/Conv layers. Targets select them, a
:class:`~sparsecraft.masks.SparsityState` masks their ``weight``, files and reports read
it. **A weight whose mean is exactly zero is pruned**: it contributes neither variance
nor KL (a point mass at zero), which is how the library's masks apply to these layers.

Forward pass: sampling (in training mode, or always inside :func:`sampling`) draws the
pre-activation instead of the weights (local reparameterisation, Kingma et al. 2015):
``b ~ N(x mu^T + bias, x^2 sigma^2^T)``, one independent draw per example; otherwise the
layer computes with the mean weights. The noise comes from ``layer.noise_generator`` when
set (training objects own one and save its state, so a resumed run is bit-exact), else
from torch's global generator.

:func:`bayesian_` converts a model's Linear/Conv2d layers in place (the mean *is* the old
weight parameter object, so optimizers keep working), :func:`deterministic_` converts back
to plain layers with the mean weights, :func:`kl_divergence` sums the layers' KL terms.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, TargetError
from .priors import GaussianPrior, Prior, log_alpha, make_prior

__all__ = ["BayesLinear", "BayesConv2d", "BayesLayer", "bayesian_", "deterministic_", "bayes_layers",
           "kl_divergence", "sampling", "DEFAULT_LOG_SIGMA2"]

DEFAULT_LOG_SIGMA2 = -10.0  # a small starting variance: training begins near the point estimate


class BayesLayer:
    """What both variational layers share (the mean is ``self.weight``)."""

    weight: nn.Parameter
    log_sigma2: nn.Parameter
    prior: Prior
    sample: bool | None
    noise_generator: torch.Generator | None
    training: bool

    def _init_variational(self, prior: Prior, init_log_sigma2: float) -> None:
        if not math.isfinite(init_log_sigma2):
            raise ConfigError(f"init_log_sigma2 must be finite, got {init_log_sigma2!r}")
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight.detach(), float(init_log_sigma2)))
        self.prior = prior
        self.sample = None
        self.noise_generator = None
        prior.attach_(self)

    def active(self) -> torch.Tensor:
        """1.0 where the weight is kept (mean nonzero), 0.0 where it is pruned."""
        return (self.weight.detach() != 0).to(self.weight.dtype)

    def weight_var(self) -> torch.Tensor:
        return torch.exp(self.log_sigma2) * self.active()

    def log_alpha(self) -> torch.Tensor:
        return log_alpha(self.weight.detach(), self.log_sigma2.detach())

    def kl(self) -> torch.Tensor:
        return self.prior.kl(self)

    def sampling_now(self) -> bool:
        return self.training if self.sample is None else self.sample

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        g = self.noise_generator
        if g is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=g, dtype=like.dtype, device=g.device).to(like.device)

    def _reparameterise(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        # the tiny floor keeps sqrt differentiable where every input weight is pruned
        return mean + torch.sqrt(var + 1e-16) * self._noise(mean)


class BayesLinear(BayesLayer, nn.Linear):
    """``nn.Linear`` with a Gaussian posterior per weight (mean ``weight``, ``log_sigma2``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 prior: Prior | None = None, init_log_sigma2: float = DEFAULT_LOG_SIGMA2, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, bias, **kwargs)
        self._init_variational(prior or GaussianPrior(), init_log_sigma2)

    def forward(self, x):
        mean = F.linear(x, self.weight, self.bias)
        if not self.sampling_now():
            return mean
        return self._reparameterise(mean, F.linear(x * x, self.weight_var()))


class BayesConv2d(BayesLayer, nn.Conv2d):
    """``nn.Conv2d`` with a Gaussian posterior per weight (local reparameterisation per output
    position)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 prior: Prior | None = None, init_log_sigma2: float = DEFAULT_LOG_SIGMA2, **kwargs):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           bias, padding_mode, **kwargs)
        self._init_variational(prior or GaussianPrior(), init_log_sigma2)

    def forward(self, x):
        mean = self._conv_forward(x, self.weight, self.bias)
        if not self.sampling_now():
            return mean
        return self._reparameterise(mean, self._conv_forward(x * x, self.weight_var(), None))


_CONVERT = {nn.Linear: BayesLinear, nn.Conv2d: BayesConv2d}


def bayes_layers(model: nn.Module) -> list[tuple[str, BayesLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BayesLayer)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def bayesian_(model: nn.Module, prior: str | Prior = "gaussian", *,
              init_log_sigma2: float = DEFAULT_LOG_SIGMA2, **prior_options) -> list[nn.Parameter]:
    """Make every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` variational, in place.

    The new layer's mean is the old ``weight`` Parameter object itself (and ``bias`` too), so
    an optimizer built on the model still updates them; the returned ``log_sigma2``
    parameters are new and must be given to the optimizer (``add_param_group``). Every
    layer has its own copy of the prior's per-weight state. Layers already variational are
    left alone (their parameters are not returned).
    """
    prior = make_prior(prior, **prior_options)  # checked before the model changes
    found = [(n, m) for n, m in model.named_modules() if type(m) in _CONVERT]
    if not math.isfinite(init_log_sigma2):
        raise ConfigError(f"init_log_sigma2 must be finite, got {init_log_sigma2!r}")
    if not found and not bayes_layers(model):
        raise TargetError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to make variational")
    new_params = []
    for name, old in found:
        cls = _CONVERT[type(old)]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.__dict__.update({k: v for k, v in old.__dict__.items()
                               if k not in ("_parameters", "_buffers", "_modules", "training")})
        layer.training = old.training
        layer.weight = old.weight
        layer.bias = old.bias
        layer._init_variational(prior, init_log_sigma2)
        _replace(model, name, layer)
        new_params.append(layer.log_sigma2)
    return new_params


def deterministic_(model: nn.Module) -> nn.Module:
    """Replace every variational layer by a plain ``nn.Linear`` / ``nn.Conv2d`` holding the
    mean weights (the same Parameter objects); returns the model."""
    back = {BayesLinear: nn.Linear, BayesConv2d: nn.Conv2d}
    for name, layer in bayes_layers(model):
        cls = back[type(layer)]
        plain = cls.__new__(cls)
        nn.Module.__init__(plain)
        skip = {"_parameters", "_buffers", "_modules", "training", "prior", "sample", "noise_generator"}
        plain.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in skip})
        plain.training = layer.training
        plain.weight = layer.weight
        plain.bias = layer.bias
        _replace(model, name, plain)
    return model


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """The sum of every variational layer's KL term (a scalar tensor with gradients)."""
    layers = bayes_layers(model)
    if not layers:
        raise TargetError(f"{type(model).__name__} has no variational layer; call bayes.bayesian_(model) first")
    return sum((m.kl() for _, m in layers), torch.zeros((), device=layers[0][1].weight.device))


@contextlib.contextmanager
def sampling(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Inside the block, variational layers sample (``enabled``) or use the mean, whatever
    the train/eval mode; each layer's setting is restored afterwards."""
    layers = [m for _, m in bayes_layers(model)]
    saved = [m.sample for m in layers]
    try:
        for m in layers:
            m.sample = enabled
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.sample = s
