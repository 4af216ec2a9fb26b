"""Pruning during training: static masks, gradual magnitude pruning, iterative pruning.

* :class:`StaticSparsity`: one mask at initialisation from any criterion (seeded random
  with ERK densities, SNIP's connection sensitivity |g * w|, magnitude, or the zeros of an
  already-pruned model), kept for the whole run.
* :class:`GMP`: magnitude pruning on the cubic schedule of Zhu & Gupta.
* :class:`IMP`: iterative magnitude pruning with weight rewinding (lottery tickets):
  train a round, prune a fraction of what is left, rewind every parameter to its value at
  step ``rewind_step``, repeat.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..allocation import ALLOCATIONS, check_sparsity
from ..criteria import SNIP, LayerContext, get_criterion
from ..errors import ConfigError
from ..patterns import Pattern
from ..targets import TargetSpec
from .base import StateMismatch, TrainingSparsity, check_pattern_for_training, current_sparsity
from .registry import Plan, option_choice, option_int, option_number, option_steps, recipe_method, recipe_sparsity
from .schedules import CubicSchedule

__all__ = ["StaticSparsity", "GMP", "IMP", "SNIP", "accumulate_gradients"]

log = logging.getLogger(__name__)


def _check_allocation(allocation: str) -> str:
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation '{allocation}'; known: {', '.join(ALLOCATIONS)}")
    return allocation


#: GMP's M-FAC Fisher: per-batch gradients in blocks, per-example gradients in blocks, or the
#: diagonal of per-token gradients (see :class:`GMP`)
FISHER_KINDS = ("blocks", "examples", "token")


def _examples(batch) -> list:
    """One batch split into batches of one example: a tensor, or a tuple/list of tensors that
    share their first dimension."""
    parts = batch if isinstance(batch, (tuple, list)) else (batch,)
    if not parts or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in parts) \
            or len({t.shape[0] for t in parts}) != 1:
        raise ConfigError("GMP fisher='examples' needs batches that are a tensor or a tuple of tensors with the "
                          f"same first dimension, got {type(batch).__name__}")
    n = parts[0].shape[0]
    if isinstance(batch, torch.Tensor):
        return [batch[i:i + 1] for i in range(n)]
    return [type(batch)(t[i:i + 1] for t in parts) for i in range(n)]


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    names: Iterable[str],
) -> dict[str, torch.Tensor]:
    """Sum of gradients of ``loss_fn(model, batch)`` over ``batches`` for parameters ``names``.

    The model's own ``.grad`` fields are left as they were.
    """
    params = dict(model.named_parameters())
    wanted = [params[n] for n in names]
    total = {n: torch.zeros_like(params[n]) for n in names}
    seen = 0
    for batch in batches:
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                total[n] += g
        seen += 1
    if seen == 0:
        raise ConfigError("gradient-based criterion needs at least one batch")
    return total


class StaticSparsity(TrainingSparsity):
    """A fixed mask chosen once, at construction, and kept through training.

    ``criterion``: ``random`` (seeded; the default with ``erk`` allocation, as in the
    dynamic-sparse-training papers' static baselines), ``snip`` (needs ``loss_fn`` and
    ``batches``), ``magnitude``, or ``existing`` (keep the model's current zeros, e.g. to
    fine-tune a one-shot pruned model without losing its mask).
    """

    method = "static"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        optimizer=None,
        *,
        criterion: str = "random",
        allocation: str = "erk",
        pattern: str | Pattern = "unstructured",
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        batches: Iterable[Any] | None = None,
        targets: TargetSpec | dict | None = None,
        seed: int = 0,
        max_sparsity: float = 0.99,
    ):
        super().__init__(model, optimizer, targets=targets)
        self.criterion_name = criterion
        self.allocation = _check_allocation(allocation)
        self.max_sparsity = max_sparsity
        self.seed = int(seed)
        from ..patterns import parse_pattern

        self.pattern = parse_pattern(pattern)
        if criterion == "existing":
            masks = {t.name: t.param.detach() != 0 for t in self.targets}
            self.target = current_sparsity(self.targets)
        else:
            if self.pattern.fixed_sparsity is not None:
                sparsity = self.pattern.fixed_sparsity if sparsity is None else sparsity
            if sparsity is None:
                raise ConfigError("StaticSparsity needs a sparsity")
            self.target = check_sparsity(sparsity)
            masks = self._plan(criterion, loss_fn, batches)
        self._start(masks, pattern=str(self.pattern), criterion=criterion)

    def _plan(self, criterion_name, loss_fn, batches) -> dict[str, torch.Tensor]:
        kwargs = {"seed": self.seed} if criterion_name == "random" else {}
        criterion = get_criterion(criterion_name, **kwargs)
        grads: dict[str, torch.Tensor] = {}
        if "grad" in criterion.requires:
            if loss_fn is None or batches is None:
                raise ConfigError(f"criterion '{criterion_name}' needs loss_fn and batches")
            grads = accumulate_gradients(self.model, loss_fn, batches, [t.name for t in self.targets])
        elif criterion.requires:
            raise ConfigError(f"criterion '{criterion_name}' needs {criterion.requires}; not available here")

        def score(t):
            return criterion(LayerContext(t.name, t.module, t.param, grad=grads.get(t.name)))

        if self.allocation == "global" and not criterion.globally_comparable:
            raise ConfigError(f"global allocation needs comparable scores; '{criterion_name}' has none")
        return self._plan_scores(score, self.target, self.allocation, self.pattern)

    def config_dict(self):
        return {"criterion": self.criterion_name, "allocation": self.allocation,
                "pattern": str(self.pattern), "sparsity": self.target, "seed": self.seed}


class GMP(TrainingSparsity):
    """Gradual pruning at the steps of a :class:`CubicSchedule`, by |w| or by M-FAC.

    ``GMP(model, sparsity=0.9, start=1000, end=8000, frequency=100)`` reaches exactly 90% at
    step 8000. A model that already has zeros starts from them: its current sparsity is the
    schedule's initial value (it must not exceed the target) and its zeros stay pruned.

    ``criterion="mfac"`` (with ``loss_fn(model, batch)`` and ``batches``, a function of an
    index) scores by ``w^2 / (2 [F^-1]_ii)`` from ``fisher_samples`` gradients taken at each
    pruning step on the next training batches, block-diagonal inverse Fisher with blocks of
    ``fisher_block`` (default 64; see :mod:`sparsecraft.oneshot.mfac`), and with ``obs_update``
    (default on) moves the kept weights by the OBS correction. ``fisher="token"`` uses instead
    the diagonal Fisher of the per-example (per-token) gradients of ``nn.Linear`` weights on the
    same batches, so ``fisher_samples`` batches of ``b`` examples give ``fisher_samples * b``
    gradients; it has no blocks and no update. ``last_cost`` holds the seconds and the bytes of
    gradients and inverse blocks of the latest pruning step. ``fisher="examples"`` keeps the
    blocks and the update but takes one gradient per example of those batches (batches that
    are a tensor or a tuple of tensors sharing their first dimension), the empirical Fisher
    oBERT uses: ``fisher_samples`` batches of ``b`` examples give ``fisher_samples * b``.
    The gradients of weights already pruned are zero (the masks hold them at zero), so the
    Fisher is that of the weights still free.
    """

    method = "gmp"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        start: int,
        end: int,
        frequency: int = 100,
        optimizer=None,
        *,
        allocation: str = "uniform",
        pattern: str | Pattern = "unstructured",
        targets: TargetSpec | dict | None = None,
        max_sparsity: float = 0.99,
        criterion: str = "magnitude",
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        batches: Callable[[int], Any] | None = None,
        fisher_samples: int = 16,
        fisher_block: int | None = None,
        fisher_damp: float = 1e-2,
        obs_update: bool | None = None,
        fisher: str = "blocks",
    ):
        super().__init__(model, optimizer, targets=targets)
        if criterion not in ("magnitude", "mfac"):
            raise ConfigError(f"GMP criterion must be 'magnitude' or 'mfac', got {criterion!r}")
        if criterion == "mfac":
            if loss_fn is None or batches is None:
                raise ConfigError("GMP criterion 'mfac' needs loss_fn and batches (gradients at each pruning step)")
            if fisher not in FISHER_KINDS:
                raise ConfigError(f"GMP fisher must be one of {', '.join(FISHER_KINDS)}, got {fisher!r}")
            for key, value in (("fisher_samples", fisher_samples), ("fisher_block", fisher_block)):
                if value is None and key == "fisher_block":
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"GMP {key} must be a positive integer, got {value!r}")
            if not fisher_damp > 0:
                raise ConfigError(f"GMP fisher_damp must be > 0, got {fisher_damp!r}")
            if fisher == "token" and (fisher_block not in (None, 1) or obs_update):
                raise ConfigError("GMP fisher='token' has a diagonal Fisher: it takes no fisher_block > 1 and no "
                                  "obs_update (which would move nothing)")
            if fisher == "token":
                from ..oneshot.mfac import check_token_targets

                check_token_targets(self.targets)
            if fisher == "examples":
                _examples(batches(0))  # batches it cannot split are refused now, not at the first pruning step
        self.criterion = criterion
        self.loss_fn, self.batches = loss_fn, batches
        token = fisher == "token"
        self.fisher = {"samples": fisher_samples, "block": 1 if token else (fisher_block or 64),
                       "damp": float(fisher_damp), "obs_update": False if token else obs_update is not False}
        if fisher != "blocks":  # saved settings of blocks runs keep the keys they always had
            self.fisher["kind"] = fisher
        self.last_cost: dict[str, float] = {}
        if isinstance(end, (int, float)) and not isinstance(end, bool) and end < 1:
            # sparsity.step() is first called after optimizer step 1: step 0 never comes
            raise ConfigError(f"GMP end must be a step >= 1 (steps count from 1), got {end}")
        self.allocation = _check_allocation(allocation)
        self.pattern = check_pattern_for_training(pattern, "GMP")
        self.max_sparsity = max_sparsity
        initial = current_sparsity(self.targets)
        check_sparsity(sparsity, "GMP sparsity")
        if sparsity < initial - 1e-12:
            raise ConfigError(
                f"GMP prunes only: target sparsity {sparsity} is below the model's current "
                f"sparsity {initial:.4f}"
            )
        self.schedule = CubicSchedule(final=float(sparsity), start=start, end=end,
                                      frequency=frequency, initial=min(initial, float(sparsity)))
        self._start({t.name: t.param.detach() != 0 for t in self.targets}, pattern=str(self.pattern))

    def _update(self, step: int):
        if not self.schedule.is_pruning_step(step):
            return None
        target = self.schedule.sparsity(step)
        if self.criterion == "mfac":
            return self._update_mfac(step, target)
        self._install(self._plan_magnitude(target, self.allocation, self.pattern), pattern=str(self.pattern))
        log.debug("GMP step %d: sparsity %.4f", step, self.state.sparsity())
        return {"pruned": True, "sparsity": target}

    def _update_mfac(self, step: int, target: float) -> dict[str, Any]:
        import time

        from ..oneshot import mfac

        start = time.perf_counter()
        if self.fisher.get("kind") == "token":
            return self._update_token_fisher(step, target, start)
        names = [t.name for t in self.targets]
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for k in range(self.fisher["samples"]):  # the next training batches: a function of the step
            batch = self.batches(step + k)
            for part in (_examples(batch) if self.fisher.get("kind") == "examples" else [batch]):
                with torch.enable_grad():
                    g = accumulate_gradients(self.model, self.loss_fn, [part], names)
                for n in names:  # the masks already zero the gradients of pruned weights
                    grads[n].append(g[n].detach().float().reshape(-1))
        stacked = {n: torch.stack(v) for n, v in grads.items()}
        lam = {n: mfac.damping(stacked[n], self.fisher["damp"]) for n in names}
        current = self.state.masks

        def score(t):
            diag = mfac.inverse_fisher_diag(stacked[t.name], self.fisher["block"], lam[t.name])
            return mfac.mfac_scores(t.param, diag).float().masked_fill(~current[t.name], -1.0)

        masks = self._plan_scores(score, target, self.allocation, self.pattern)
        if self.fisher["obs_update"]:
            with torch.no_grad():
                for t in self.targets:
                    t.param.copy_(mfac.obs_update(t.param, masks[t.name], stacked[t.name],
                                                  self.fisher["block"], lam[t.name]))
        self._install(masks, pattern=str(self.pattern))
        block = self.fisher["block"]
        nbytes = sum(v.numel() * 4 for v in stacked.values())
        nbytes += max(-(-v.shape[1] // block) * block * block * 8 for v in stacked.values())  # one layer's blocks
        return self._report_cost(step, target, start, nbytes)

    def _update_token_fisher(self, step: int, target: float, start: float) -> dict[str, Any]:
        from ..oneshot import mfac

        names = [t.name for t in self.targets]
        batches = [self.batches(step + k) for k in range(self.fisher["samples"])]
        with mfac.token_squares(self.targets) as sums, torch.enable_grad():
            accumulate_gradients(self.model, self.loss_fn, batches, names)
        current = self.state.masks

        def score(t):
            diag, _ = mfac.token_inverse_diag(sums[t.name], self.fisher["damp"])
            return mfac.mfac_scores(t.param, diag).float().masked_fill(~current[t.name], -1.0)

        self._install(self._plan_scores(score, target, self.allocation, self.pattern), pattern=str(self.pattern))
        nbytes = sum(v.numel() * 8 for v in sums.values())
        return self._report_cost(step, target, start, nbytes)

    def _report_cost(self, step: int, target: float, start: float, nbytes: float) -> dict[str, Any]:
        """``last_cost`` of an M-FAC pruning step, logged, and the step's event."""
        import time

        self.last_cost = {"seconds": time.perf_counter() - start, "bytes": float(nbytes)}
        log.info("GMP/M-FAC step %d: sparsity %.4f, %.2f s, %.1f MB", step, self.state.sparsity(),
                 self.last_cost["seconds"], nbytes / 2**20)
        return {"pruned": True, "sparsity": target, **self.last_cost}

    def config_dict(self):
        s = self.schedule
        out = {"sparsity": s.final, "start": s.start, "end": s.end, "frequency": s.frequency,
               "initial": s.initial, "allocation": self.allocation, "pattern": str(self.pattern)}
        if self.criterion != "magnitude":  # magnitude runs keep the settings they always had
            out.update(criterion=self.criterion, **{f"fisher_{k}": v for k, v in self.fisher.items()})
        return out


class IMP(TrainingSparsity):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin; Frankle et al. 2020).

    The run is ``rounds + 1`` rounds of ``round_steps`` steps. At step ``rewind_step`` every
    parameter of the model is recorded. At the end of round r (step ``r * round_steps``,
    r = 1..rounds) the weights are pruned by magnitude to ``1 - (1 - sparsity)^(r / rounds)``,
    every parameter is rewound to its recorded value (pruned ones stay zero) and the optimizer
    state is cleared; the last round trains the final ticket. :attr:`schedule_step` is the step
    to feed a learning-rate schedule, so it rewinds too.
    """

    method = "imp"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        rounds: int,
        round_steps: int,
        rewind_step: int = 0,
        optimizer=None,
        *,
        allocation: str = "global",
        pattern: str | Pattern = "unstructured",
        targets: TargetSpec | dict | None = None,
        max_sparsity: float = 0.99,
    ):
        super().__init__(model, optimizer, targets=targets)
        self.target = check_sparsity(sparsity, "IMP sparsity")
        if int(rounds) != rounds or rounds < 1:
            raise ConfigError(f"IMP rounds must be a positive integer, got {rounds}")
        if int(round_steps) != round_steps or round_steps < 1:
            raise ConfigError(f"IMP round_steps must be a positive integer, got {round_steps}")
        if isinstance(rewind_step, bool) or int(rewind_step) != rewind_step or not 0 <= rewind_step < round_steps:
            raise ConfigError(
                f"IMP rewind_step must be a whole step in [0, round_steps={round_steps}), got {rewind_step}"
            )
        initial = current_sparsity(self.targets)
        if self.target < initial - 1e-12:
            raise ConfigError(
                f"IMP prunes only: target sparsity {self.target} is below the model's current "
                f"sparsity {initial:.4f}"
            )
        self.rounds, self.round_steps, self.rewind_step = int(rounds), int(round_steps), int(rewind_step)
        self.allocation = _check_allocation(allocation)
        self.pattern = check_pattern_for_training(pattern, "IMP")
        self.max_sparsity = max_sparsity
        self.rounds_done = 0
        self.rewind_weights: dict[str, torch.Tensor] | None = None
        self._start({t.name: t.param.detach() != 0 for t in self.targets}, pattern=str(self.pattern))
        if self.rewind_step == 0:
            self._record()

    @property
    def total_steps(self) -> int:
        return (self.rounds + 1) * self.round_steps

    def round_sparsity(self, r: int) -> float:
        return 1.0 - (1.0 - self.target) ** (r / self.rounds)

    @property
    def schedule_step(self) -> int:
        """Position in the current round's learning-rate schedule (rewinds with the weights)."""
        if self.rounds_done == 0:
            return self.step_count
        return self.rewind_step + (self.step_count - self.rounds_done * self.round_steps)

    def _record(self) -> None:
        self.rewind_weights = {
            n: p.detach().clone() for n, p in self.model.named_parameters()
        }

    def _update(self, step: int):
        if step == self.rewind_step and self.rounds_done == 0:
            self._record()
        if step % self.round_steps or self.rounds_done >= self.rounds:
            return None
        r = step // self.round_steps
        target = self.round_sparsity(r)
        masks = self._plan_magnitude(target, self.allocation, self.pattern)
        self._rewind_()
        self._install(masks, pattern=str(self.pattern))
        self.rounds_done = r
        log.info("IMP round %d/%d: pruned to %.4f and rewound to step %d", r, self.rounds,
                 self.state.sparsity(), self.rewind_step)
        return {"pruned": True, "rewound": True, "round": r, "sparsity": target}

    @torch.no_grad()
    def _rewind_(self) -> None:
        for name, param in self.model.named_parameters():
            param.copy_(self.rewind_weights[name])
        for opt in self.optimizers:
            opt.state.clear()  # moments from the previous round belong to other weights

    def config_dict(self):
        return {"sparsity": self.target, "rounds": self.rounds, "round_steps": self.round_steps,
                "rewind_step": self.rewind_step, "allocation": self.allocation,
                "pattern": str(self.pattern)}

    def _extra_state(self):
        weights = None if self.rewind_weights is None else {
            n: w.detach().cpu().clone() for n, w in self.rewind_weights.items()
        }
        return {"rounds_done": self.rounds_done, "rewind_weights": weights}

    def _load_extra_state(self, extra):
        self.rounds_done = int(extra.get("rounds_done", 0))
        weights = extra.get("rewind_weights")
        params = dict(self.model.named_parameters())
        self.rewind_weights = None if weights is None else {
            n: w.to(params[n].device, params[n].dtype) for n, w in weights.items()
        }

    def _check_state(self, state):
        super()._check_state(state)
        extra = state.get("extra") or {}
        done = extra.get("rounds_done", 0)
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= self.rounds:
            raise StateMismatch(f"IMP state: rounds_done must be in [0, {self.rounds}], got {done!r}")
        weights = extra.get("rewind_weights")
        if weights is not None:
            params = dict(self.model.named_parameters())
            if not isinstance(weights, dict) or set(weights) != set(params) or any(
                not torch.is_tensor(weights[n]) or tuple(weights[n].shape) != tuple(params[n].shape)
                for n in params
            ):
                raise StateMismatch("IMP checkpoint's rewind weights do not fit this model")
            bad = [n for n, w in weights.items() if w.is_floating_point() and not torch.isfinite(w).all()]
            if bad:
                raise StateMismatch(f"IMP checkpoint's rewind weights hold NaN or inf in {bad[:3]}")



# -- recipes (sparsecraft train): each planner checks its options against the run's length ----
def _recipe_allocation(recipe, default: str) -> str:
    return option_choice(recipe, "allocation", default, ALLOCATIONS)


def _recipe_pattern(recipe, method: str | None) -> Pattern:
    """The recipe's pattern; ``method`` names a schedule that cannot take a fixed N:M pattern."""
    from ..patterns import parse_pattern

    return parse_pattern(recipe.pattern) if method is None else check_pattern_for_training(recipe.pattern, method)


@recipe_method("static", options={"criterion", "allocation"})
def _plan_static(recipe) -> Plan:
    criterion = option_choice(recipe, "criterion", "random", ("random", "magnitude", "existing"))
    # 'existing' keeps the given model's zeros: its sparsity is whatever they are
    sparsity = None if criterion == "existing" and recipe.sparsity is None else recipe_sparsity(recipe)
    allocation = _recipe_allocation(recipe, "erk")
    pattern = _recipe_pattern(recipe, None)

    def build(model, optimizer, context):
        return StaticSparsity(model, sparsity, optimizer, criterion=criterion, allocation=allocation,
                              pattern=pattern, seed=recipe.seed)

    return Plan(build, recipe.steps)


@recipe_method("snip", options={"allocation", "snip_batches"})
def _plan_snip(recipe) -> Plan:
    sparsity = recipe_sparsity(recipe)
    allocation = _recipe_allocation(recipe, "global")
    batches = option_int(recipe, "snip_batches", 1)
    if batches > recipe.steps:
        raise ConfigError(f"train recipe: options.snip_batches ({batches}) exceeds steps ({recipe.steps})")
    pattern = _recipe_pattern(recipe, None)

    def build(model, optimizer, context):
        return StaticSparsity(model, sparsity, optimizer, criterion="snip", allocation=allocation,
                              pattern=pattern, loss_fn=context.loss_fn,
                              batches=[context.batch_at(i) for i in range(batches)], seed=recipe.seed)

    return Plan(build, recipe.steps)


@recipe_method("gmp", options={"start", "end", "frequency", "allocation", "criterion", "fisher", "fisher_samples",
                               "fisher_block", "fisher_damp", "obs_update"})
def _plan_gmp(recipe) -> Plan:
    sparsity = recipe_sparsity(recipe)
    end = option_steps(recipe, "end", 0.75, low=1)
    start = option_steps(recipe, "start", 0.1, high=end)
    frequency = option_int(recipe, "frequency", max(1, (end - start) // 40))
    if frequency > max(1, end - start):
        raise ConfigError(
            f"train recipe: options.frequency ({frequency}) is longer than the pruning span "
            f"start..end ({start}..{end}); GMP would jump to the target in one step"
        )
    allocation = _recipe_allocation(recipe, "uniform")
    pattern = _recipe_pattern(recipe, "GMP")
    criterion = option_choice(recipe, "criterion", "magnitude", ("magnitude", "mfac"))
    fisher = {"fisher": option_choice(recipe, "fisher", "blocks", FISHER_KINDS),
              "fisher_samples": option_int(recipe, "fisher_samples", 16),
              "fisher_block": option_int(recipe, "fisher_block", 64) if "fisher_block" in recipe.options else None,
              "fisher_damp": option_number(recipe, "fisher_damp", 1e-2, low=1e-12),
              "obs_update": recipe.options.get("obs_update")}
    if fisher["obs_update"] is not None and not isinstance(fisher["obs_update"], bool):
        raise ConfigError(f"train recipe: options.obs_update must be true or false, got {fisher['obs_update']!r}")
    if criterion == "magnitude" and any(k in recipe.options for k in fisher):
        raise ConfigError("train recipe: options fisher, fisher_* and obs_update apply to criterion 'mfac' only")

    def build(model, optimizer, context):
        extra = {} if criterion == "magnitude" else {"criterion": criterion, "loss_fn": context.loss_fn,
                                                     "batches": context.batch_at, **fisher}
        return GMP(model, sparsity, start, end, frequency, optimizer, allocation=allocation, pattern=pattern,
                   **extra)

    return Plan(build, recipe.steps)


@recipe_method("imp", options={"rounds", "rewind_step", "allocation"})
def _plan_imp(recipe) -> Plan:
    sparsity = recipe_sparsity(recipe)
    rounds = option_int(recipe, "rounds", 3)
    rewind = option_steps(recipe, "rewind_step", 0.05, high=recipe.steps - 1)
    allocation = _recipe_allocation(recipe, "global")
    pattern = _recipe_pattern(recipe, "IMP")

    def build(model, optimizer, context):
        return IMP(model, sparsity, rounds, recipe.steps, rewind, optimizer, allocation=allocation, pattern=pattern)

    # IMP trains rounds + 1 rounds of `steps` (the last one trains the final ticket)
    return Plan(build, (rounds + 1) * recipe.steps)
