"""Training a Bayesian network by variational inference: the ELBO's KL part and the
optimizer-like training object.

:class:`ELBO` makes the model's layers variational (:func:`~.layers.bayesian_`), gives the
optimizer the new ``log_sigma2`` parameters, owns the generator of the layers' noise, and
returns the KL part of the per-example negative ELBO: ``loss = CE + loss_term()`` with
``loss_term() = w * KL / train_size``, where ``w`` rises linearly from 0 to ``kl_weight``
over the first ``kl_warmup`` steps (the usual warm-up that lets the means settle before
the prior pulls on them).

:class:`VariationalTraining` (method ``vi``: dense mean-field VI) behaves like the other
training objects of :mod:`sparsecraft.train`: ``step()`` after every optimizer step,
``state_dict()`` / ``load_state_dict()`` (checked before anything changes, bit-exact
resume: the noise generator is saved), ``finalize_()``. Subclasses change the prior and
what happens at a step (:meth:`_update`) and at the end (:meth:`_prune`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, SparsecraftError
from ..train.base import StateMismatch, unwrap_model
from ..train.registry import Plan, option_int, option_number, option_steps, recipe_method
from .layers import DEFAULT_LOG_SIGMA2, bayes_layers, bayesian_
from .measures import check_samples, ood_inputs, uncertainty_report
from .priors import Prior, make_prior

__all__ = ["ELBO", "VariationalTraining", "VI_OPTIONS", "vi_settings", "variational_report"]

STATE_VERSION = 1
#: recipe options every variational method accepts
VI_OPTIONS = frozenset({"kl_weight", "kl_warmup", "init_log_sigma2", "samples"})


def _check_int(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _check_number(value, what: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ConfigError(f"{what} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return float(value)


class ELBO:
    """The variational part of a training run (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, prior: Prior, *,
                 train_size: int, kl_weight: float = 1.0, kl_warmup: int = 0,
                 init_log_sigma2: float = DEFAULT_LOG_SIGMA2, seed: int = 0):
        self.train_size = _check_int(train_size, "train_size (training examples)", 1)
        self.kl_weight = _check_number(kl_weight, "kl_weight")
        self.kl_warmup = _check_int(kl_warmup, "kl_warmup", 0)
        self.init_log_sigma2 = _check_number(init_log_sigma2, "init_log_sigma2", positive=False)
        self.prior = prior
        self.model = model
        params = bayesian_(model, prior, init_log_sigma2=self.init_log_sigma2)
        if optimizer is not None and params:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        self.layers = bayes_layers(model)
        self.generator = torch.Generator().manual_seed(int(seed))
        for _, layer in self.layers:
            layer.noise_generator = self.generator

    def weight_at(self, step: int) -> float:
        if self.kl_warmup == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, step / self.kl_warmup)

    def kl(self) -> torch.Tensor:
        return sum((m.kl() for _, m in self.layers), torch.zeros(()))

    def loss_term(self, step: int) -> torch.Tensor:
        return self.weight_at(step) * self.kl() / self.train_size

    def config(self) -> dict[str, Any]:
        return {**self.prior.config(), "train_size": self.train_size, "kl_weight": self.kl_weight,
                "kl_warmup": self.kl_warmup, "init_log_sigma2": self.init_log_sigma2}

    def release(self) -> None:
        for _, layer in self.layers:
            layer.noise_generator = None


class VariationalTraining:
    """Dense mean-field VI (method ``vi``); the base of the sparsifying variational methods."""

    method: ClassVar[str] = "vi"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 train_size: int, prior: str | Prior = "gaussian", prior_options: dict | None = None,
                 kl_weight: float = 1.0, kl_warmup: int = 0, init_log_sigma2: float = DEFAULT_LOG_SIGMA2,
                 threshold: float | None = None, samples: int = 10, seed: int = 0):
        self.model = unwrap_model(model)
        prior = make_prior(prior, **(prior_options or {}))
        self.threshold = None if threshold is None else _check_number(threshold, "threshold", positive=False)
        self.samples = check_samples(samples)
        self.seed = int(seed)
        self._validate_extra()
        self.elbo = ELBO(self.model, optimizer, prior, train_size=train_size, kl_weight=kl_weight,
                         kl_warmup=kl_warmup, init_log_sigma2=init_log_sigma2, seed=seed)
        self.step_count = 0
        self.finalized = False

    def _validate_extra(self) -> None:
        """Subclasses check their own settings here, before the model changes."""

    # -- the training-loop API ---------------------------------------------------------------
    def loss_term(self) -> torch.Tensor:
        """Add to the per-example data loss (cross-entropy) before ``backward()``."""
        self._check_open()
        return self.elbo.loss_term(self.step_count)

    def step(self) -> dict[str, Any]:
        self._check_open()
        self.step_count += 1
        return self._update(self.step_count) or {}

    def _update(self, step: int) -> dict[str, Any] | None:
        return None

    def sparsity(self) -> float:
        """Fraction of exactly-zero means over the variational layers."""
        total = sum(m.weight.numel() for _, m in self.elbo.layers)
        zeros = sum(int((m.weight == 0).sum()) for _, m in self.elbo.layers)
        return zeros / total

    @torch.no_grad()
    def _prune(self) -> None:
        """Zero the means (and so drop the variance and KL) of weights whose log alpha is above
        the threshold."""
        if self.threshold is None:
            return
        for _, m in self.elbo.layers:
            m.weight.masked_fill_(m.log_alpha() > self.threshold, 0.0)

    def finalize_(self) -> nn.Module:
        """Prune what the posterior calls noise (if the method has a threshold); the layers stay
        variational (use :func:`~.layers.deterministic_` for plain ones)."""
        self._check_open()
        self._prune()
        self.elbo.release()
        self.finalized = True
        return self.model

    def report(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Uncertainty measures on test data (MC prediction with ``samples`` draws)."""
        return variational_report(self.model, x, y, self.samples)

    def _check_open(self) -> None:
        if self.finalized:
            raise SparsecraftError(f"this {type(self).__name__} was finalized; create a new one")

    # -- persistence --------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {**self.elbo.config(), "threshold": self.threshold, "samples": self.samples, "seed": self.seed}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        self._check_open()
        return {"version": STATE_VERSION, "method": self.method, "step": self.step_count,
                "config": self.config_dict(), "generator": self.elbo.generator.get_state(),
                "extra": self._extra_state()}

    def validate_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("method") != self.method:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise StateMismatch(f"checkpoint is from method {got!r}, this run uses '{self.method}'")
        if state.get("version") != STATE_VERSION:
            raise StateMismatch(f"{self.method} state version {state.get('version')} != {STATE_VERSION}")
        if state.get("config") != self.config_dict():
            raise StateMismatch(f"checkpoint's {self.method} settings differ: {state.get('config')} vs {self.config_dict()}")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise StateMismatch(f"{self.method} state: step must be an integer >= 0, got {step!r}")
        gen, mine = state.get("generator"), self.elbo.generator.get_state()
        if not (torch.is_tensor(gen) and gen.dtype == mine.dtype and gen.shape == mine.shape):
            raise StateMismatch(f"{self.method} state: the noise generator state does not fit")
        if not isinstance(state.get("extra"), dict):
            raise StateMismatch(f"{self.method} state: 'extra' must be a mapping")
        self._validate_extra_state(state["extra"])

    def _validate_extra_state(self, extra: dict) -> None:
        pass

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_open()
        self.validate_state(state)
        self.step_count = int(state["step"])
        self.elbo.generator.set_state(state["generator"])
        self._load_extra_state(state["extra"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step={self.step_count}, sparsity={self.sparsity():.4f})"


def variational_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int | None) -> dict[str, Any]:
    """The training report's uncertainty entries (``mc_*``) on test data; the OOD set is the
    test images rotated 90 degrees (1-D signals: reversed), see :mod:`.measures`."""
    kind = "rotated" if x.dim() == 4 and x.shape[-1] == x.shape[-2] else "reversed"
    out: dict[str, Any] = {f"mc_{k}": v for k, v in
                           uncertainty_report(model, x, y, ood_inputs(x, kind), samples=samples).items()}
    out["ood_set"] = kind
    return out


# -- recipes (sparsecraft train) -----------------------------------------------------------------
def vi_settings(recipe) -> dict[str, Any]:
    """The options every variational recipe shares, checked."""
    return {
        "kl_weight": option_number(recipe, "kl_weight", 1.0, low=1e-12),
        "kl_warmup": option_steps(recipe, "kl_warmup", 0.3, low=0),
        "init_log_sigma2": option_number(recipe, "init_log_sigma2", DEFAULT_LOG_SIGMA2, low=-30.0, high=5.0),
        "samples": option_int(recipe, "samples", 10),
        "seed": recipe.seed,
    }


def _train_size(context) -> int:
    size = getattr(context, "train_size", None)
    if size is None:
        raise ConfigError("variational methods need the number of training examples (BuildContext.train_size)")
    return size


@recipe_method("vi", options=VI_OPTIONS | {"prior_var"})
def _plan_vi(recipe) -> Plan:
    settings = vi_settings(recipe)
    prior_var = option_number(recipe, "prior_var", 1.0, low=1e-12)

    def build(model, optimizer, context):
        return VariationalTraining(model, optimizer, train_size=_train_size(context), prior="gaussian",
                                   prior_options={"var": prior_var}, **settings)

    return Plan(build, recipe.steps)
