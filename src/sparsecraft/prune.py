"""One-shot pruning: ``prune_(model, config, calibration=None)``.

The driver validates everything first (config, targets, pattern fit, finite weights), then
computes every mask from the untouched weights, and only then attaches and applies them.
The calibrated (block-by-block) driver, :mod:`sparsecraft.oneshot.driver`, must change
block i before it can compute block i+1's inputs; it spills originals to disk and restores
them on any error. Either way an error leaves the model as it was.

A method is a :class:`~sparsecraft.criteria.Solver` registered by name (or any registered
criterion): it declares the statistics it ``requires``, and its ``Options`` dataclass types
its settings. ``PruneConfig.options`` is one flat mapping split four ways: the driver's own
settings (:class:`~sparsecraft.oneshot.driver.DriverOptions`), refiners switched on by name
(``dsnot``), the allocation's options (``owl_m``, ``owl_lambda``), and the method's; a name
none of them knows is a ConfigError naming the option and the method. The typed
constructors (``SparseGPT(...)``, ``Wanda(...)``, ``Magnitude(...)``, ``GPTQ(...)``, ``RTN(...)``,
or :func:`method_config` for any registered method) build the same ``PruneConfig``.

Quantisation: a method whose solver quantises (``gptq``, ``rtn``, ``sparsegpt`` with the
option ``quantize``) returns quantised weights per layer; once every layer is done ``prune_``
finalizes the sparsity state (the masks are in the quantised layers now) and swaps each
layer for a :class:`~sparsecraft.quant.QuantLinear` (and, with the option ``embeddings``,
quantises the token embedding). Refiners and whole-model stages would move weights off
their grids and are refused with quantisation; block reconstruction tunes the grids.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import ALLOCATIONS, Allocation, allocate, check_sparsity, get_allocation
from .blocks import check_calibration, module_input_hessian
from .criteria import (
    BLOCK_STAGES,
    MODEL_STAGES,
    REFINERS,
    SOLVERS,
    BlockStage,
    LayerContext,
    ModelStage,
    Refiner,
    Solver,
    build_options,
    get_solver,
    method_names,
    register_solver,
)
from .distributed import Ranks, current
from .errors import ConfigError, TargetError, config_fields
from .masks import META_ATTR, SparsityState, get_meta
from .oneshot.driver import (
    DriverOptions,
    calibrated_prune,
    check_model_inputs,
    check_requires,
    collect_model_statistics,
    needs_block_driver,
)
from .patterns import NM, Pattern, PatternMismatch, Unstructured, parse_pattern
from .quant.convert import embedding_problem, quantize_embeddings_, swap_linear_, tied_head
from .targets import FALLBACKS, Target, TargetSpec, resolve_patterns, select_targets

__all__ = [
    "PruneConfig", "prune_", "quantize_", "plan_masks", "METHODS", "register_method", "method_config",
    "default_sparsity", "method_default_sparsity", "Magnitude", "RandomPrune", "Wanda", "SparseGPT", "GPTQ", "RTN", "resolve_patterns",
]

log = logging.getLogger(__name__)

#: The registry of solver methods (criteria are methods too: see ``criteria.method_names``).
METHODS = SOLVERS
#: Decorator registering a :class:`~sparsecraft.criteria.Solver` class as a method.
register_method = register_solver
_DRIVER_FIELDS = {f.name for f in dataclasses.fields(DriverOptions)}


@dataclass
class PruneConfig:
    """What to prune, how much, in which pattern. YAML and Python build it the same way.

    ``fallback`` says what to do with a layer the pattern cannot tile: ``error`` (default)
    raises naming the layer; ``skip`` leaves that layer dense (logged, and recorded with
    pattern ``dense`` so reports show it); ``unstructured`` prunes that layer unstructured
    at the sparsity it would have had.
    """

    method: str = "magnitude"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    targets: TargetSpec = field(default_factory=TargetSpec)
    overrides: dict[str, float] = field(default_factory=dict)
    max_sparsity: float = 0.99
    fallback: str = "error"
    seed: int = 0
    # the method's, the driver's, the allocation's and refiners' settings (see the module docstring)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.targets, dict):
            self.targets = TargetSpec.from_dict(self.targets)
        self.validate()

    def validate(self) -> "PruneConfig":
        if self.method not in method_names():
            raise ConfigError(f"unknown method '{self.method}'; known: {', '.join(method_names())}")
        pattern = self.pattern_obj
        if isinstance(pattern, NM):
            if self.sparsity is not None and abs(self.sparsity - pattern.fixed_sparsity) > 1e-9:
                raise ConfigError(
                    f"pattern {pattern} fixes sparsity at {pattern.fixed_sparsity:g}; "
                    f"got sparsity={self.sparsity}"
                )
            if self.allocation != "uniform":
                raise ConfigError(f"N:M pattern {pattern} works only with uniform allocation")
        else:
            if self.sparsity is None:
                raise ConfigError(f"pattern {pattern} needs a sparsity")
            check_sparsity(self.sparsity)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"unknown allocation '{self.allocation}'; known: {', '.join(ALLOCATIONS)}"
            )
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"unknown fallback '{self.fallback}'; known: {', '.join(FALLBACKS)}")
        for rule, value in self.overrides.items():
            check_sparsity(value, f"override '{rule}'")
        solver, refiners, alloc = self.solver(), self.refiners(), self.allocation_obj()
        self.driver_options()
        self.block_stages()
        self.model_stages()
        check_requires(solver.requires, f"method '{self.method}'")
        for r in refiners:
            check_requires(r.requires, f"refiner '{r.name}'")
            if solver.updates_weights and type(solver).reconstruct is Solver.reconstruct:
                raise ConfigError(f"method '{self.method}' updates weights but cannot re-fit them for "
                                  f"refiner '{r.name}' (it has no reconstruct)")
        check_requires(alloc.requires, f"allocation '{alloc.name}'")
        if solver.quantization() is not None:
            others = [r.name for r in refiners] + [st.name for st in self.model_stages()]
            others += [st.name for st in self.block_stages() if not st.quantized]
            if others:
                raise ConfigError(f"method '{self.method}' quantises the layers; {', '.join(others)} would move "
                                  f"weights off their grids (block reconstruction tunes the grids instead)")
        if alloc.needs_scores:
            if needs_block_driver(self):
                raise ConfigError(
                    f"method '{self.method}' with calibration supports allocation uniform, erk or owl, "
                    f"not '{self.allocation}'"
                )
            if not solver.globally_comparable:
                raise ConfigError(f"global allocation needs comparable scores; '{self.method}' has none")
        return self

    def _split_options(self) -> tuple[dict, dict, dict, dict]:
        """``options`` split into (method, driver, allocation, refiners and block stages) settings."""
        alloc_cls = ALLOCATIONS.get(self.allocation)
        alloc_fields = {f.name for f in dataclasses.fields(alloc_cls.Options)} if alloc_cls else set()
        method, driver, alloc, refine = {}, {}, {}, {}
        for key, value in self.options.items():
            if key in _DRIVER_FIELDS:
                driver[key] = value
            elif key in REFINERS or key in BLOCK_STAGES or key in MODEL_STAGES:
                refine[key] = value
            elif key in alloc_fields:
                alloc[key] = value
            else:
                method[key] = value
        return method, driver, alloc, refine

    def solver(self) -> Solver:
        """The method's solver with its typed options (ConfigError on one it does not know)."""
        method_opts = self._split_options()[0]
        try:
            return get_solver(self.method, method_opts, seed=self.seed)
        except ConfigError as exc:
            unknown = [k for k in method_opts if "'" + k + "'" in str(exc)]
            if not unknown:
                raise
            shared = sorted(_DRIVER_FIELDS | set(REFINERS) | set(BLOCK_STAGES) | set(MODEL_STAGES))
            raise ConfigError(f"{exc}; options every method takes: {', '.join(shared)}") from None

    def _switched_on(self, registry: Mapping[str, type], kind: str) -> list:
        """The stages of ``registry`` switched on in ``options`` (``True`` or their own options)."""
        out = []
        for name, value in self._split_options()[3].items():
            if name not in registry or value is None or value is False:
                continue
            if value is True:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"option '{name}' must be true/false or a mapping of {name}'s options, got {value!r}")
            cls = registry[name]
            out.append(cls(build_options(cls.Options, value, f"{kind} '{name}'")))
        return out

    def refiners(self) -> list[Refiner]:
        """The refinement stages switched on in ``options``."""
        return self._switched_on(REFINERS, "refiner")

    def block_stages(self) -> list[BlockStage]:
        """The block stages switched on in ``options``, in the order they run."""
        stages = sorted(self._switched_on(BLOCK_STAGES, "stage"), key=lambda st: st.order)
        for st in stages:
            st.check(stages)
            if st.patterns is not None and not isinstance(self.pattern_obj, st.patterns):
                raise ConfigError(f"'{st.name}' supports {', '.join(k.__name__ for k in st.patterns)} patterns, "
                                  f"not {self.pattern_obj}")
        return stages

    def model_stages(self) -> list[ModelStage]:
        """The whole-model stages switched on in ``options`` (distillation), run after pruning."""
        return self._switched_on(MODEL_STAGES, "stage")

    def allocation_obj(self) -> Allocation:
        return get_allocation(self.allocation, self._split_options()[2])

    def driver_options(self) -> DriverOptions:
        return build_options(DriverOptions, self._split_options()[1], "the one-shot driver")

    @property
    def needs_calibration(self) -> bool:
        """Whether this config needs calibration data (any statistic, refiner or error measure)."""
        names = set(self.solver().requires) | set(self.allocation_obj().requires)
        return (bool(names) or bool(self.refiners()) or bool(self.block_stages()) or bool(self.model_stages())
                or self.driver_options().measure_error)

    @property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        pattern = self.pattern_obj
        return pattern.fixed_sparsity if pattern.fixed_sparsity is not None else self.sparsity

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneConfig":
        """From a mapping (YAML); without ``sparsity`` an N:M pattern fixes it."""
        fields = config_fields(cls, data, "prune config", "unknown prune config keys")
        if "sparsity" not in fields:
            fields["sparsity"] = default_sparsity(fields.get("pattern", "unstructured"),
                                                  default=method_default_sparsity(fields.get("method", "magnitude")))
        return cls(**fields)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["pattern"] = str(self.pattern_obj)
        return out


def default_sparsity(pattern: str | Pattern, requested: float | None = None, default: float = 0.5):
    """Sparsity for a config built from user flags: what was asked, else None for a pattern
    that fixes it (N:M), else ``default``. A malformed pattern is left for validation."""
    if requested is not None:
        return requested
    try:
        fixed = parse_pattern(pattern).fixed_sparsity
    except ConfigError:
        return default
    return None if fixed is not None else default


def method_default_sparsity(method: str) -> float:
    """The sparsity a config of ``method`` gets when none is given (and the pattern does not
    fix it): 0 for methods that quantise by default (``gptq``, ``rtn``: quantise only), else 0.5."""
    options = getattr(SOLVERS.get(method), "Options", None)
    return 0.0 if getattr(options, "quantize", None) is not None else 0.5


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(PruneConfig)} - {"method", "options"}


def method_config(method: str, **kwargs) -> PruneConfig:
    """A :class:`PruneConfig` for ``method``: config fields by name, every other keyword is
    one of ``options``. Without ``sparsity`` an N:M pattern fixes it (else 0.5)."""
    options = dict(kwargs.pop("options", None) or {})
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    options.update(kwargs)
    if "sparsity" not in fields:
        fields["sparsity"] = default_sparsity(fields.get("pattern", "unstructured"),
                                              default=method_default_sparsity(method))
    return PruneConfig(method=method, options=options, **fields)


def _typed(method: str, doc: str) -> Callable[..., PruneConfig]:
    def make(**kwargs) -> PruneConfig:
        return method_config(method, **kwargs)

    make.__doc__ = doc
    return make


Magnitude = _typed("magnitude", "Config for magnitude pruning, e.g. ``Magnitude(sparsity=0.5)`` or ``Magnitude(pattern=\"1:4\")``.")
Magnitude.__name__ = "Magnitude"
RandomPrune = _typed("random", "Config for seeded random pruning, e.g. ``RandomPrune(sparsity=0.5, seed=3)``.")
RandomPrune.__name__ = "RandomPrune"
Wanda = _typed("wanda", "Config for Wanda (needs calibration), e.g. ``Wanda(sparsity=0.5, dsnot=True)``.")
Wanda.__name__ = "Wanda"
SparseGPT = _typed(
    "sparsegpt",
    "Config for SparseGPT (needs calibration), e.g. "
    "``SparseGPT(sparsity=0.5, pattern=\"2:4\", blocksize=128, percdamp=0.01)``.",
)
SparseGPT.__name__ = "SparseGPT"


#: weight dtypes the methods handle: statistics accumulate in float32 (float64 for input
#: norms), solvers compute in float32 or float64 and cast their results back
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _quant_typed(method: str, doc: str) -> Callable[..., PruneConfig]:
    def make(bits: int = 4, group: int = 64, **kwargs) -> PruneConfig:
        if isinstance(bits, bool) or bits not in (4, 8):
            raise ConfigError(f"method '{method}': bits must be 4 or 8, got {bits!r}"
                              + (f" (int{bits} is not supported)" if isinstance(bits, int) else ""))
        return method_config(method, quantize=f"int{bits}", group=group, **kwargs)

    make.__doc__ = doc
    make.__name__ = method.upper()
    return make


GPTQ = _quant_typed(
    "gptq",
    "Config for GPTQ (needs calibration): the SparseGPT sweep with every weight put on its group's grid, "
    "e.g. ``GPTQ(bits=4, group=64)``; with ``pattern=\"2:4\"`` or ``pattern=\"group:16\", sparsity=0.5`` "
    "it prunes and quantises jointly (GQSA). Other keywords as for ``SparseGPT`` (``symmetric``, "
    "``embeddings``, ``blocksize``, ``percdamp``, ``reconstruct``...). Sparsity defaults to 0.",
)
RTN = _quant_typed(
    "rtn",
    "Config for round-to-nearest quantisation (no calibration), e.g. ``RTN(bits=8, group=128, symmetric=False)``.",
)


def _check_finite(targets: list[Target]) -> None:
    """TargetError for a weight of a dtype the methods cannot handle or holding NaN or inf."""
    for t in targets:
        if t.param.dtype not in WEIGHT_DTYPES:
            raise TargetError(f"layer '{t.name}': weight dtype {str(t.param.dtype).removeprefix('torch.')} is not "
                              "supported; pruning handles float32, float64, bfloat16 and float16 weights")
        if not torch.isfinite(t.param.detach()).all():
            raise TargetError(f"layer '{t.name}': weight contains NaN or inf; refusing to prune")


def _quiet_patterns(targets: list[Target], pattern: Pattern, fallback: str) -> list[tuple[Target, Pattern]]:
    """Each target with the pattern it will get (the fallback rule, without its log lines; with
    ``fallback="error"`` a layer the pattern cannot tile keeps it: the pattern's error follows)."""
    out = []
    for t in targets:
        try:
            pattern.check(t.shape, t.name)
            out.append((t, pattern))
        except PatternMismatch:
            if fallback != "skip":
                out.append((t, Unstructured() if fallback == "unstructured" else pattern))
    return out


def plan_masks(
    model: nn.Module,
    config: PruneConfig,
    targets: list[Target] | None = None,
    *,
    calibration=None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Keep-masks for a method without per-layer calibration statistics, without touching
    the model. Model-level statistics (gradients) come from ``calibration``."""
    masks, info, weights, _ = _plan(model, config, targets, calibration, progress)
    if weights:
        raise ConfigError(f"method '{config.method}' updates weights; use prune_")
    return masks, info


def _plan(model, config, targets, calibration, progress):
    targets = targets if targets is not None else select_targets(model, config.targets)
    solver = config.solver()
    if needs_block_driver(config):
        raise ConfigError(
            f"method '{config.method}' needs per-layer calibration statistics; use prune_ with calibration data"
        )
    patterns = resolve_patterns(targets, config.pattern_obj, config.fallback)
    active = [t for t in targets if patterns[t.name] is not None]
    values: dict[str, dict] = {}
    if solver.requires:  # model-level statistics only (the block driver handles the rest)
        calibration = check_model_inputs(model, calibration, solver.requires)
        values = collect_model_statistics(model, active, solver.requires, calibration,
                                          config.driver_options().batch_size, current())

    def ctx(t: Target) -> LayerContext:
        stats = values.get(t.name, {})
        return LayerContext(t.name, t.module, t.param, stats, grad=stats.get("gradients"))

    pattern = config.pattern_obj
    budgets = allocate(
        active,
        config.target_sparsity,
        config.allocation_obj() if pattern.fixed_sparsity is None else "uniform",
        score_fn=lambda t: solver.scores(ctx(t)),
        overrides=config.overrides,
        max_sparsity=config.max_sparsity,
    )
    masks, info, weights, quants = {}, {}, {}, {}
    for t in tqdm(active, desc=f"{config.method} {pattern}", disable=not progress, leave=False):
        p = patterns[t.name]
        result = solver.solve(ctx(t), p, None if p.fixed_sparsity is not None else budgets[t.name])
        masks[t.name] = result.keep
        if result.weight is not None:
            weights[t.name] = result.weight
        if result.quant is not None:
            quants[t.name] = result.quant
        info[t.name] = {"pattern": str(p), "method": config.method}
    for t in targets:
        if patterns[t.name] is None:
            info[t.name] = {"pattern": "dense", "method": "skipped"}
    return masks, info, weights, quants


def _fingerprint(value) -> str:
    """Shape, dtype and SHA-256 of a tensor's bytes (``repr`` of anything else)."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    t = value.detach().cpu().contiguous()
    return f"{tuple(t.shape)} {t.dtype} {hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()}"


def _check_ranks_agree(ranks: Ranks, config: PruneConfig, targets: list[Target], calibration) -> None:
    """Every process of a distributed run must prune the same targets with the same config and
    calibration; checked before anything runs (a mismatch is a ConfigError on every rank)."""
    ranks.check_same({
        "config": json.dumps(config.to_dict(), sort_keys=True, default=str),
        "calibration": _fingerprint(calibration),
        "model (targets and shapes)": json.dumps([[t.name, list(t.param.shape)] for t in targets]),
    })


def prune_(
    model: nn.Module,
    config: PruneConfig | Mapping[str, Any],
    calibration=None,
    *,
    progress: bool = True,
) -> SparsityState:
    """Prune ``model`` in place; returns the attached :class:`SparsityState`.

    ``calibration`` (token ids ``[samples, seq_len]``) feeds methods that need data (Wanda,
    SparseGPT, gradients, OWL, DSnoT); the others ignore it. Call ``state.finalize_()`` to
    drop the machinery.

    Under ``torch.distributed`` every process calls ``prune_`` with the same model, config and
    whole calibration set; the calibration batches are split over the processes, their
    statistics summed, and every process ends with the same masks and weights (see
    :mod:`sparsecraft.distributed`). Progress bars show on rank 0 only.
    """
    if not isinstance(config, PruneConfig):
        config = PruneConfig.from_dict(config)
    config.validate()
    targets = select_targets(model, config.targets)
    ranks = current()
    if ranks is not None:
        _check_ranks_agree(ranks, config, targets, calibration)
        progress = progress and ranks.main
    _check_finite(targets)
    solver = config.solver()
    quant = solver.quantization()
    calibrated = needs_block_driver(config)
    if calibrated and calibration is None:
        hint = "; round to nearest (method 'rtn') quantises without data" if quant is not None else ""
        raise ConfigError(f"method '{config.method}' needs calibration data (token ids [samples, seq_len]){hint}")
    solver.check_targets(_quiet_patterns(targets, config.pattern_obj, config.fallback), config.target_sparsity)
    embeddings = False
    if quant is not None and quant.embeddings is not False:
        problem = embedding_problem(model, quant.embedding_spec())
        if problem and quant.embeddings:
            raise ConfigError(f"method '{config.method}' option embeddings="
                              f"{quant.embeddings if isinstance(quant.embeddings, str) else 'true'}: {problem}")
        embeddings = problem is None
        if problem:
            log.info("token embedding left as it is: %s", problem)
    head_solver = embeddings and _head_solver(model, solver, quant, calibration)
    model_stages = config.model_stages()
    teacher = None
    if model_stages:  # checked, and the dense teacher copied, before the model changes
        calibration = check_calibration(model, calibration)
        for st in model_stages:
            st.check(calibration)
        teacher = copy.deepcopy(model)
    weights: dict[str, torch.Tensor] = {}
    if calibrated:
        masks, info, quants = calibrated_prune(model, targets, config, calibration, progress=progress)
    else:
        masks, info, weights, quants = _plan(model, config, targets, calibration, progress)

    # Everything is computed; only now does the model change.
    if weights:
        params = {t.name: t.param for t in targets}
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(w)
    state = SparsityState(model)
    for name, keep in masks.items():
        state.attach(name, keep, **info[name])
    for name in info.keys() - masks.keys():
        state.note(name, **info[name])
    log.info("pruned %d targets with %s: sparsity %.4f", len(masks), config.method, state.sparsity())
    if quant is not None:
        _quantize_layers_(model, state, targets, quants, quant)
        if embeddings:
            _quantize_embeddings_(model, solver, quant, calibration if head_solver else None,
                                  config.driver_options().batch_size)
    for st in model_stages:
        summary = st.run(model, teacher, calibration, state, progress=progress)
        for name in masks:
            state.info[name][st.name] = summary
    return state


def _quantize_layers_(model, state: SparsityState, targets: list[Target], quants: dict, quant):
    """Swap the quantised layers in (the masks live in them now, so the state is finalized)."""
    state.finalize_()
    modules = {t.name: t.module_name for t in targets}
    meta = dict(get_meta(model))
    for name, qweight in quants.items():
        swap_linear_(model, modules[name], qweight)
        meta[name] = {**meta.get(name, {}), "quant": qweight.describe()}
    object.__setattr__(model, META_ATTR, meta)
    log.info("quantised %d layers (%s)", len(quants), quant.spec())


def _head_solver(model, solver, quant, calibration) -> bool:
    """Whether the tied embedding goes through the solver (option ``embeddings_solver``);
    refuses, before anything changes, a ``true`` that cannot be honoured."""
    if quant.embeddings_solver is False:
        return False
    why = ("the token embedding is not tied to an output head (the head's inputs are what give it a Hessian)"
           if tied_head(model) is None else
           f"method '{solver.name}' has no error-compensating solver" if type(solver).quantize_head is Solver.quantize_head
           else "no calibration data" if calibration is None else None)
    if why and quant.embeddings_solver:
        raise ConfigError(f"method '{solver.name}' option embeddings_solver=true: {why}")
    if why:
        log.debug("token embedding rounded to nearest: %s", why)
    return why is None


def _quantize_embeddings_(model, solver, quant, calibration, batch_size: int) -> None:
    """Quantise the token embedding (and its tied head): with ``calibration``, by the solver on
    the Hessian of the head's inputs in the model as it now is (layers already quantised)."""
    spec = quant.embedding_spec()
    if calibration is None:
        quantize_embeddings_(model, spec)
        return
    from .oneshot.sparsegpt import SolverError

    head = tied_head(model)
    hessian = module_input_hessian(model, head, check_calibration(model, calibration), batch_size)
    name = next(n for n, m in model.named_modules() if m is head)
    try:
        qweight = solver.quantize_head(head.weight, hessian, spec, name)
    except SolverError as e:  # the layers are quantised already: finish the model the plain way, and say so
        log.warning("layer '%s': %s; the tied embedding is rounded to nearest instead", name, e)
        quantize_embeddings_(model, spec)
        return
    quantize_embeddings_(model, spec, qweight, method=solver.name)


def quantize_(
    model: nn.Module,
    config: PruneConfig | Mapping[str, Any],
    calibration=None,
    *,
    progress: bool = True,
) -> SparsityState:
    """Quantise ``model`` in place with a quantising config (``GPTQ(...)``, ``RTN(...)``, or any
    method with the option ``quantize``); :func:`prune_` does the work, so a pattern and a
    sparsity prune jointly. Returns the (finalized) sparsity state; the layers are
    :class:`~sparsecraft.quant.QuantLinear` modules afterwards."""
    if not isinstance(config, PruneConfig):
        config = PruneConfig.from_dict(config)
    if config.solver().quantization() is None:
        raise ConfigError(f"method '{config.method}' does not quantise; use GPTQ(...), RTN(...) or the option "
                          f"quantize (int4 | int8)")
    return prune_(model, config, calibration, progress=progress)
