"""Structured Bayesian compression with Turbo-VBI (after Xia et al., 2023).

A three-layer hierarchical prior makes the surviving weights regular. For a layer with
output neurons ``i`` (a conv layer: filters) and the weights ``w_ij`` reading input ``j``
(a conv layer: the flattened ``in_channels x kh x kw`` positions):

1. **neuron support** ``c_i ~ Bernoulli(neuron_prior)``: whether neuron ``i`` exists at all
   (the output head keeps all its neurons);
2. **clustered support inside a neuron** ``s_ij``: all zero when ``c_i = 0``; otherwise a
   Markov chain along ``j`` (``p01``: 0 -> 1, ``p10``: 1 -> 0, small, so active weights come
   in runs);
3. **precision** ``rho_ij ~ Gamma(a, a * v1)`` when ``s_ij = 1`` (weights of the layer's own
   scale) and ``Gamma(a, a * v0)`` when ``s_ij = 0`` (pinned near zero); ``w_ij ~ N(0, 1/rho_ij)``.
   ``v1`` is ``var_active`` or, by default, the mean square of the layer's weights when
   training starts (a buffer ``var_active`` per layer, so the prior fits every layer's
   scale); ``v0 = inactive_ratio * v1``.

Inference alternates two modules, as the turbo approach does:

* **module A** (variational Bayesian inference of the weights): the mean-field posterior
  ``N(mu, sigma^2)`` is trained by gradient steps on the ELBO, with the Gaussian KL against
  the current prior variance ``1/E[rho]`` (a buffer ``prior_var`` per weight);
* every ``update_every`` steps, module A sends module B the *extrinsic* evidence of each
  weight for its support: the data's message about the weight, ``N(m, v)`` = the posterior
  divided by the current prior (:func:`data_evidence`; a weight the data does not constrain
  carries no evidence), scored as ``l_ij = log N(m; 0, v + v1) - log N(m; 0, v + v0)``
  (slab against spike, :func:`slab_spike_llr`);
* **module B** (message passing over the support prior) runs forward-backward along every
  neuron's chain, in the log domain and for all neurons at once, and returns the posterior
  ``P(c_i = 1)`` and ``P(s_ij = 1)``; its extrinsic message back is that posterior with
  module A's own evidence divided out, ``logit pi_ij - l_ij``;
* module A combines it with its evidence into ``q(s_ij)`` and updates ``q(rho_ij)`` in
  closed form: ``Gamma(a + 1/2, q a v1 + (1-q) a v0 + (mu^2+sigma^2)/2)``,
  whose mean sets the new prior variances.

At the end (``finalize_``) a neuron with ``P(c_i = 1) < 0.5`` (or with no weight left) is
removed completely: its weights, its bias and the next layer's inputs from it are zeroed,
so :func:`shrink_neurons_` can hand the model to :func:`sparsecraft.structured.shrink_`,
which removes exactly those units and makes the tensors smaller. Inside kept neurons,
weights with ``q(s_ij) < 0.5`` or ``log_alpha > threshold`` are zeroed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from ..targets import output_head_names
from ..train.registry import Plan, option_int, option_number, recipe_method
from .layers import bayes_layers
from .objective import VI_OPTIONS, VariationalTraining, _train_size, vi_settings
from .priors import DEFAULT_THRESHOLD, Prior, _positive, gaussian_kl

__all__ = ["TurboPrior", "TurboVBI", "support_posterior", "data_evidence", "slab_spike_llr", "shrink_neurons_", "zero_neurons_"]


log = logging.getLogger(__name__)


def data_evidence(mu: torch.Tensor, log_sigma2: torch.Tensor, prior_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the data alone says about each weight, ``N(m, v)``: the posterior ``N(mu, sigma^2)``
    divided by the prior ``N(0, prior_var)`` (precisions subtract). A weight the data does not
    constrain has a posterior equal to its prior, so ``v`` is huge and it carries no evidence."""
    post = torch.exp(-log_sigma2)
    data = (post - 1.0 / prior_var).clamp_min(1e-12)
    return mu * post / data, 1.0 / data


def slab_spike_llr(m: torch.Tensor, v: torch.Tensor, var_active: float, var_inactive: float) -> torch.Tensor:
    """``log N(m; 0, v + var_active) - log N(m; 0, v + var_inactive)``: the evidence of the data
    message ``N(m, v)`` for "active" (slab) against "inactive" (spike)."""
    va, vi = v + var_active, v + var_inactive
    return -0.5 * torch.log(va / vi) - 0.5 * m * m * (1.0 / va - 1.0 / vi)


def support_posterior(llr: torch.Tensor, neuron_prior: float, p01: float, p10: float, p_start: float,
                      neuron_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Module B: posterior ``(P(c_i = 1) [out], P(s_ij = 1) [out, fan_in])`` of the support prior
    given per-weight evidence ``llr [out, fan_in]`` (log-likelihood ratio of s=1 vs s=0).

    Exact forward-backward on each neuron's two-state chain (log domain), and the neuron gate
    by comparing the chain's evidence with the all-zero chain's (whose evidence ratio is 1).
    ``neuron_free``: every neuron exists (``c_i = 1``), as for the output head.
    """
    llr = llr.double()
    out, n = llr.shape
    log_t = torch.log(torch.tensor([[1 - p01, p01], [p10, 1 - p10]], dtype=torch.float64))  # [from, to]
    emit = torch.stack([torch.zeros_like(llr), llr], dim=-1)  # [out, n, 2]
    alpha = torch.empty(out, n, 2, dtype=torch.float64)
    alpha[:, 0] = torch.log(torch.tensor([1 - p_start, p_start], dtype=torch.float64)) + emit[:, 0]
    for j in range(1, n):
        prev = alpha[:, j - 1].unsqueeze(-1) + log_t  # [out, from, to]
        alpha[:, j] = torch.logsumexp(prev, dim=1) + emit[:, j]
    beta = torch.zeros(out, n, 2, dtype=torch.float64)
    for j in range(n - 2, -1, -1):
        nxt = log_t + (emit[:, j + 1] + beta[:, j + 1]).unsqueeze(1)  # [out, from, to]
        beta[:, j] = torch.logsumexp(nxt, dim=2)
    log_z = torch.logsumexp(alpha[:, -1], dim=-1)  # log evidence ratio of the chain vs all-zero
    post = alpha + beta
    p_s_given_c = torch.softmax(post, dim=-1)[..., 1]
    if neuron_free:
        p_c = torch.ones(out, dtype=torch.float64)
    else:
        p_c = torch.sigmoid(math.log(neuron_prior / (1 - neuron_prior)) + log_z)
    return p_c.float(), (p_c[:, None] * p_s_given_c).float()


@dataclass
class TurboPrior(Prior):
    """The three-layer prior's settings; the per-weight prior variance lives in each layer's
    ``prior_var`` buffer, ``support`` holds ``q(s)`` and ``neuron_support`` ``P(c = 1)``."""

    var_active: float | None = None
    inactive_ratio: float = 1e-3
    shape: float = 0.5
    neuron_prior: float = 0.2
    p01: float = 0.05
    p10: float = 0.05
    name: ClassVar[str] = "turbo"

    def __post_init__(self):
        if self.var_active is not None:
            self.var_active = _positive(self.var_active, "turbo prior var_active")
        for field in ("inactive_ratio", "shape", "neuron_prior", "p01", "p10"):
            setattr(self, field, _positive(getattr(self, field), f"turbo prior {field}"))
        for field in ("inactive_ratio", "neuron_prior", "p01", "p10"):
            if getattr(self, field) >= 1:
                raise ConfigError(f"turbo prior {field} must be in (0, 1), got {getattr(self, field)}")

    def attach_(self, layer):
        w = layer.weight.detach()
        if getattr(layer, "prior_var", None) is None:
            scale = float((w * w).mean()) if self.var_active is None else self.var_active
            scale = max(scale, 1e-12)
            layer.register_buffer("var_active", torch.tensor(scale, dtype=w.dtype, device=w.device))
            layer.register_buffer("prior_var", torch.full_like(w, scale))
            layer.register_buffer("support", torch.ones_like(w))
            layer.register_buffer("neuron_support", torch.ones(w.shape[0], dtype=w.dtype, device=w.device))

    def kl(self, layer):
        return (gaussian_kl(layer.weight, layer.log_sigma2, layer.prior_var) * layer.active()).sum()

    @property
    def p_start(self) -> float:
        return self.p01 / (self.p01 + self.p10)  # the chain's stationary probability of "active"

    @torch.no_grad()
    def turbo_update_(self, layer, neuron_free: bool) -> None:
        """One turbo round: A -> B evidence, B's posterior and extrinsic message, A's q(s), q(rho)."""
        mu, log_sigma2 = layer.weight.detach(), layer.log_sigma2.detach()
        active = layer.active()
        second = (mu * mu + torch.exp(log_sigma2) * active).reshape(mu.shape[0], -1)
        v1 = float(layer.var_active)
        v0 = v1 * self.inactive_ratio
        m, v = data_evidence(mu, log_sigma2, layer.prior_var)
        # a pruned weight (mean exactly zero) is evidence for "inactive" as strong as its prior
        llr = torch.where(active > 0, slab_spike_llr(m, v, v1, v0), torch.full_like(mu, -50.0))
        llr = llr.reshape(mu.shape[0], -1).clamp(-50, 50)
        p_c, pi = support_posterior(llr, self.neuron_prior, self.p01, self.p10, self.p_start, neuron_free)
        pi = pi.clamp(1e-6, 1 - 1e-6)
        extrinsic = torch.logit(pi) - llr  # B's message to A: its posterior without A's own evidence
        q = torch.sigmoid(extrinsic + llr)  # A's q(s): extrinsic prior times its own evidence
        a = self.shape
        rate = q * a * v1 + (1 - q) * a * v0 + 0.5 * second
        layer.prior_var.copy_((rate / (a + 0.5)).reshape(mu.shape))  # 1 / E[rho]
        layer.support.copy_(q.reshape(mu.shape))
        layer.neuron_support.copy_(p_c)

    def config(self):
        return {"prior": self.name, "var_active": self.var_active, "inactive_ratio": self.inactive_ratio,
                "shape": self.shape, "neuron_prior": self.neuron_prior, "p01": self.p01, "p10": self.p10}


class TurboVBI(VariationalTraining):
    """``TurboVBI(model, opt, train_size=4000, update_every=50)``; ``finalize_()`` removes the
    neurons the posterior switched off, :func:`shrink_neurons_` then makes the tensors smaller."""

    method = "turbo-vbi"

    def __init__(self, model: nn.Module, optimizer=None, *, train_size: int, update_every: int = 50,
                 threshold: float = DEFAULT_THRESHOLD, prior_options: dict | None = None, **kwargs):
        self.update_every = update_every
        prior = TurboPrior(**(prior_options or {}))
        super().__init__(model, optimizer, train_size=train_size, prior=prior, threshold=threshold, **kwargs)
        heads = output_head_names(self.model)
        self._free = {name: name in heads for name, _ in self.elbo.layers}

    def _validate_extra(self):
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ConfigError(f"turbo-vbi update_every must be an integer >= 1, got {self.update_every!r}")

    def _update(self, step: int) -> dict[str, Any] | None:
        if step % self.update_every:
            return None
        for name, layer in self.elbo.layers:
            self.elbo.prior.turbo_update_(layer, self._free[name])  # type: ignore[attr-defined]
        return {"turbo": True}

    def dead_neurons(self) -> dict[str, torch.Tensor]:
        """Per layer (not the head), the neurons the posterior switched off (``P(c=1) < 0.5``)
        or that have no weight left."""
        out = {}
        for name, layer in self.elbo.layers:
            if self._free[name]:
                continue
            empty = layer.weight.detach().reshape(layer.weight.shape[0], -1).eq(0).all(1)
            out[name] = (layer.neuron_support < 0.5) | empty
        return out

    @torch.no_grad()
    def _prune(self):
        for _, layer in self.elbo.layers:
            drop = (layer.support < 0.5) | (layer.log_alpha() > self.threshold)
            layer.weight.masked_fill_(drop, 0.0)
        zero_neurons_(self.model, self.dead_neurons())

    def config_dict(self):
        return {**super().config_dict(), "update_every": self.update_every}


@contextlib.contextmanager
def _plain_classes(model: nn.Module):
    """Variational layers look like their plain classes for the ``torch.fx`` trace (which
    traces into modules from outside ``torch.nn``, and would not see them as layers)."""
    layers = [m for _, m in bayes_layers(model)]
    saved = [type(m) for m in layers]
    try:
        for m in layers:
            m.__class__ = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
        yield model
    finally:
        for m, cls in zip(layers, saved):
            m.__class__ = cls


def _neuron_groups(model: nn.Module, names) -> dict:
    from ..structured.fxdeps import find_conv_groups

    with _plain_classes(model):
        groups, skipped = find_conv_groups(model, kinds=("conv", "linear"))
    found = {g.name: g for g in groups}
    missing = [n for n in names if n not in found]
    if missing:
        reasons = "; ".join(f"{n}: {skipped.get(n, 'not found')}" for n in missing[:3])
        raise TargetError(f"cannot follow the outputs of {missing[:3]} to the layers that read them ({reasons})")
    return found


@torch.no_grad()
def zero_neurons_(model: nn.Module, dead: dict[str, torch.Tensor]) -> None:
    """Zero everything of the ``dead`` units: their weights and bias, and the inputs that the
    layers reading them take from them (found through the ``torch.fx`` trace), so removing
    the units later changes nothing (with activations that map 0 to 0)."""
    try:
        groups = _neuron_groups(model, [n for n, d in dead.items() if d.any()])
    except TargetError as exc:  # consumers unknown: the units' own weights and bias still go
        log.warning("%s; zeroing only the dead units' own weights and bias", exc)
        groups = {}
    for name, units in dead.items():
        if not units.any():
            continue
        if name not in groups:
            layer = model.get_submodule(name)
            layer.weight[units.to(layer.weight.device)] = 0
            if layer.bias is not None:
                layer.bias[units.to(layer.bias.device)] = 0
            continue
        for sl in groups[name].slices:
            module = model.get_submodule(sl.module)
            for tname in sl.tensors:
                t = getattr(module, tname)
                view = t.unflatten(sl.dim, (t.shape[sl.dim] // sl.width, sl.width)) if sl.width > 1 else t
                index = [slice(None)] * sl.dim + [units.to(t.device)]
                view[tuple(index)] = 0


def shrink_neurons_(model: nn.Module, dead: dict[str, torch.Tensor]):
    """Remove the ``dead`` units (zeroed first) with :func:`sparsecraft.structured.shrink_`;
    returns its report, or None when no unit is dead. Plain layers only (call
    :func:`~.layers.deterministic_` first)."""
    from ..structured import ShrinkConfig, shrink_

    zero_neurons_(model, dead)
    counts = {name: int(d.sum()) for name, d in dead.items()}
    if not any(counts.values()):
        return None
    groups = _neuron_groups(model, list(dead))
    overrides = {name: counts.get(name, 0) / groups[name].units for name in groups}
    # every layer's exact fraction is an override; a kind is switched on where it has layers
    top = {kind: max([overrides[n] for n, g in groups.items() if g.kind == kind] or [0.0])
           for kind in ("linear", "conv")}
    if not any(top.values()):
        return None
    config = ShrinkConfig(linear=top["linear"], conv=top["conv"], overrides=overrides, criterion="magnitude")
    return shrink_(model, config, progress=False)


# -- recipe (sparsecraft train) --------------------------------------------------------------------
@recipe_method("turbo-vbi", options=VI_OPTIONS | {"threshold", "update_every", "var_active", "inactive_ratio",
                                                  "shape", "neuron_prior", "p01", "p10"})
def _plan_turbo(recipe) -> Plan:
    settings = vi_settings(recipe)
    threshold = option_number(recipe, "threshold", DEFAULT_THRESHOLD, low=-10.0, high=10.0)
    every = option_int(recipe, "update_every", 50)
    prior = {
        "var_active": None if recipe.options.get("var_active") is None
        else option_number(recipe, "var_active", None, low=1e-12),
        "inactive_ratio": option_number(recipe, "inactive_ratio", 1e-3, low=1e-12, high=1 - 1e-6),
        "shape": option_number(recipe, "shape", 0.5, low=1e-6),
        "neuron_prior": option_number(recipe, "neuron_prior", 0.2, low=1e-6, high=1 - 1e-6),
        "p01": option_number(recipe, "p01", 0.05, low=1e-6, high=1 - 1e-6),
        "p10": option_number(recipe, "p10", 0.05, low=1e-6, high=1 - 1e-6),
    }
    TurboPrior(**prior)  # checked now, before any data set or model is loaded

    def build(model, optimizer, context):
        return TurboVBI(model, optimizer, train_size=_train_size(context), update_every=every, threshold=threshold,
                        prior_options=prior, **settings)

    return Plan(build, recipe.steps)

