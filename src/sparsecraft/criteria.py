"""Importance criteria, solvers and refiners: the per-layer extension points of pruning.

* A :class:`Criterion` only scores (a layer's context -> one score per weight, higher =
  more important); a pattern then decides which scores survive.
* A :class:`Solver` is a pruning method: for one layer it returns the keep-mask and,
  optionally, new weights for the kept entries (SparseGPT). Every registered criterion is
  also a method (the criterion's scores through the pattern).
* A :class:`Refiner` is a stage after the solver that changes a layer's mask (DSnoT).

Each declares in ``requires`` the statistics it needs (see ``oneshot.driver.STATISTICS``:
``input_norms``, ``input_sq_norm``, ``mean_var``, ``hessian``, ``gradients``); the driver
collects exactly those into ``LayerContext.stats`` (``gradients`` into ``ctx.grad``), so a
new method is one file that registers itself and ``prune_`` never changes. Typed options:
a solver's or refiner's ``Options`` dataclass lists the settings it accepts; anything else
is a ConfigError naming the option and the method.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, get_type_hints

import torch
from torch import nn

from .errors import ConfigError
from .patterns import Pattern

__all__ = [
    "LayerContext",
    "Criterion",
    "Magnitude",
    "Random",
    "register_criterion",
    "get_criterion",
    "CRITERIA",
    "Solver",
    "Refiner",
    "LayerResult",
    "NoOptions",
    "SOLVERS",
    "REFINERS",
    "BLOCK_STAGES",
    "BlockStage",
    "BlockLayer",
    "register_block_stage",
    "MODEL_STAGES",
    "ModelStage",
    "register_model_stage",
    "register_solver",
    "register_refiner",
    "get_solver",
    "method_names",
    "build_options",
]


@dataclass
class LayerContext:
    """Everything a criterion may look at for one target parameter."""

    name: str  # qualified parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    module: nn.Module
    param: torch.Tensor
    stats: Mapping[str, Any] = field(default_factory=dict)  # calibration statistics
    grad: torch.Tensor | None = None


class Criterion:
    """Base class: ``__call__(ctx) -> scores`` of ``ctx.param``'s shape."""

    name: ClassVar[str] = ""
    #: Names of statistics the driver must put in ``ctx.stats`` ("grad" means ctx.grad).
    requires: ClassVar[tuple[str, ...]] = ()
    #: Whether scores of different layers are comparable (needed by global allocation).
    globally_comparable: ClassVar[bool] = False

    def __call__(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **kwargs) -> Criterion:
    try:
        cls = CRITERIA[name]
    except KeyError:
        raise ConfigError(
            f"unknown criterion '{name}'; known: {', '.join(sorted(CRITERIA))}"
        ) from None
    return cls(**kwargs)


@register_criterion
class Magnitude(Criterion):
    """|w|: the classic baseline."""

    name = "magnitude"
    globally_comparable = True

    def __call__(self, ctx):
        return ctx.param.detach().abs().float()


@register_criterion
class Random(Criterion):
    """Uniform random scores, seeded per layer so a run is reproducible.

    The layer's stream depends on ``seed`` and the layer name only (a CRC of the name),
    so adding or removing other targets does not change this layer's mask.
    """

    name = "random"
    globally_comparable = True

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, ctx):
        gen = torch.Generator(device="cpu")
        gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(ctx.name.encode())) % (2**63))
        scores = torch.rand(ctx.param.shape, generator=gen, dtype=torch.float32)
        return scores.to(ctx.param.device)

    def __repr__(self):
        return f"Random(seed={self.seed})"


@register_criterion
class SNIP(Criterion):
    """Connection sensitivity |dL/dw * w| (Lee et al., 2019). One-shot pruning collects the
    gradients of the LM loss on the calibration text; training collects them from its loss."""

    name = "snip"
    requires = ("grad",)
    globally_comparable = True

    def __call__(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.grad is None:
            raise ConfigError(f"layer '{ctx.name}': SNIP needs a gradient; none was computed")
        return (ctx.grad.detach() * ctx.param.detach()).abs().float()


# ---- solvers and refiners ----------------------------------------------------------------

@dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own."""


def _type_ok(value, hint) -> bool:
    """Whether ``value`` fits a simple annotation (int, float, bool, str, or a union of them)."""
    if hint is Any:
        return True
    args = getattr(hint, "__args__", None)
    if args and type(hint).__name__ in ("UnionType", "_UnionGenericAlias"):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def build_options(options_cls: type, values: Mapping[str, Any] | None, owner: str):
    """The typed options of ``owner`` from a mapping: unknown names and wrong types are
    ConfigErrors that name the option and the method; an ``Options.check()`` runs last."""
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{owner} has no option {', '.join(map(repr, unknown))}; its options: {known}")
    hints = get_type_hints(options_cls)
    for name, value in values.items():
        if not _type_ok(value, hints.get(name, Any)):
            want = getattr(hints[name], "__name__", str(hints[name]))
            raise ConfigError(f"{owner} option '{name}' must be {want}, got {value!r}")
    try:
        opts = options_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{owner}: bad options {values}: {exc}") from None
    check = getattr(opts, "check", None)
    if check is not None:
        check()
    return opts


@dataclass
class LayerResult:
    """What a solver decides for one layer: the keep-mask (True = stays) and optionally
    the new weight (same shape; entries outside the mask are zeroed by the driver)."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    #: the quantised weight (a :class:`~sparsecraft.quant.QuantizedWeight`) when the method
    #: quantises: ``weight`` then holds exactly its dequantised values, and ``prune_`` swaps the
    #: layer for a :class:`~sparsecraft.quant.QuantLinear` once every layer is done
    quant: Any = None


class Solver:
    """Base class of a pruning method for one layer.

    Subclasses set ``name``, ``requires`` and ``Options`` (a dataclass of their settings)
    and implement :meth:`solve`; they register with :func:`register_solver`. ``sparsity``
    is None when the pattern fixes it (N:M).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    #: Whether :meth:`scores` of different layers compare (needed by global allocation).
    globally_comparable: ClassVar[bool] = False
    #: Whether ``solve`` returns new weights (then it must implement :meth:`reconstruct`
    #: to be combined with a refiner).
    updates_weights: ClassVar[bool] = False
    #: Pattern classes it supports; None means any (checked before the model changes).
    patterns: ClassVar[tuple[type, ...] | None] = None

    def __init__(self, options=None, *, seed: int = 0):
        self.options = options if options is not None else build_options(self.Options, {}, f"method '{self.name}'")
        self.seed = int(seed)

    def scores(self, ctx: LayerContext) -> torch.Tensor | None:
        """Per-weight importance, if the method has one (used by score-based allocation)."""
        return None

    def solve(self, ctx: LayerContext, pattern: Pattern, sparsity: float | None) -> LayerResult:
        scores = self.scores(ctx)
        if scores is None:
            raise NotImplementedError(f"{type(self).__name__} must implement solve() or scores()")
        return LayerResult(pattern.keep_mask(scores, sparsity, layer=ctx.name))

    def reconstruct(self, ctx: LayerContext, keep: torch.Tensor, pattern: Pattern) -> torch.Tensor | None:
        """New weights for a given mask (after a refiner changed it); None keeps the values."""
        return None

    def quantization(self) -> Any:
        """The quantisation settings (a :class:`~sparsecraft.quant.options.QuantOptions`) when
        this method quantises the layers it solves, else None."""
        return None

    def quantize_head(self, weight: torch.Tensor, hessian: torch.Tensor, spec: Any, layer: str) -> Any:
        """The quantised weight (a :class:`~sparsecraft.quant.QuantizedWeight` on ``spec``'s
        grids) of an output head with input Hessian ``hessian``, by this method's own
        error-compensating solver; None when it has none (the head is then rounded to nearest)."""
        return None

    def check_targets(self, layers: list, sparsity: float | None) -> None:
        """Refuse, before the model changes, what this method cannot do (an error naming the
        layer): ``layers`` pairs each target with its pattern; ``sparsity`` is the config's
        target (None when the pattern fixes it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class Refiner:
    """Base class of a mask-refinement stage run after the solver on each layer.

    ``refine(ctx, keep, pattern) -> keep`` must keep the pattern valid and the count; the
    driver then asks the solver to :meth:`Solver.reconstruct` the weights for the new mask.
    It is switched on by an option named after it (``options={"dsnot": True}`` or a mapping
    of its own options).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    patterns: ClassVar[tuple[type, ...] | None] = None

    def __init__(self, options=None):
        self.options = options if options is not None else build_options(self.Options, {}, f"refiner '{self.name}'")

    def refine(self, ctx: LayerContext, keep: torch.Tensor, pattern: Pattern) -> torch.Tensor:
        raise NotImplementedError


SOLVERS: dict[str, type[Solver]] = {}
class BlockStage:
    """Base class of a stage run on a whole block after its layers are pruned.

    ``run(block, batches, targets, layers)`` may change the block's kept weights and, for
    stages that learn masks, the masks: ``layers`` maps each pruned parameter's name inside
    the block to a :class:`BlockLayer`, whose ``keep`` a stage may replace (with a mask of
    the same pattern). ``targets`` are the dense block's outputs on the same inputs. Stages
    run in ascending ``order``; each is switched on by an option named after it
    (``options={"reconstruct": True}`` or a mapping of its own options).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    order: ClassVar[int] = 0
    #: Pattern classes it supports; None means any (checked before the model changes).
    patterns: ClassVar[tuple[type, ...] | None] = None
    #: Whether it keeps quantised layers on their grids (``BlockLayer.quant``); stages that
    #: do not are refused with quantising methods.
    quantized: ClassVar[bool] = False

    def __init__(self, options=None):
        self.options = options if options is not None else build_options(self.Options, {}, f"stage '{self.name}'")

    def holdout(self) -> int:
        """Calibration batches the stage keeps for judging (0 if none); checked up front."""
        return 0

    def check(self, stages: list["BlockStage"]) -> None:
        """Refuse a combination of stages that cannot work (e.g. learned masks alone)."""

    def start(self, blocks: int) -> None:
        """Called once before the first block with the number of blocks (for budgets)."""

    def run(self, block: nn.Module, batches: list, targets: list[torch.Tensor],
            layers: dict[str, "BlockLayer"], *, progress: bool = False) -> dict:
        raise NotImplementedError


@dataclass
class BlockLayer:
    """A pruned layer as a block stage sees it: its keep-mask, pattern and dense weights."""

    keep: torch.Tensor
    pattern: Any
    dense: torch.Tensor
    #: the layer's :class:`~sparsecraft.quant.QuantizedWeight` when it is quantised: a stage
    #: that changes the weights must keep them on a grid and replace this (see ``quant.tuning``)
    quant: Any = None


class ModelStage:
    """Base class of a stage run on the whole pruned model, after every block is pruned.

    ``run(model, teacher, calibration, state)`` may change the kept weights (never the
    masks; ``state`` is the :class:`~sparsecraft.masks.SparsityState` that keeps them).
    ``teacher`` is a copy of the model made before pruning. Switched on by an option named
    after it, like block stages. ``check(calibration)`` refuses unusable calibration before
    anything changes.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options=None):
        self.options = options if options is not None else build_options(self.Options, {}, f"stage '{self.name}'")

    def check(self, calibration) -> None:
        """ConfigError when ``calibration`` cannot serve this stage."""

    def run(self, model: nn.Module, teacher: nn.Module, calibration, state, *, progress: bool = False) -> dict:
        raise NotImplementedError


REFINERS: dict[str, type[Refiner]] = {}
BLOCK_STAGES: dict[str, type[BlockStage]] = {}
MODEL_STAGES: dict[str, type[ModelStage]] = {}


def register_model_stage(cls: type[ModelStage]) -> type[ModelStage]:
    """Class decorator: make a whole-model stage available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    MODEL_STAGES[cls.name] = cls
    return cls


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make a solver available as a pruning method by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"{cls.__name__}.Options must be a dataclass")
    SOLVERS[cls.name] = cls
    return cls


def register_block_stage(cls: type[BlockStage]) -> type[BlockStage]:
    """Class decorator: make a block stage available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    BLOCK_STAGES[cls.name] = cls
    return cls


def register_refiner(cls: type[Refiner]) -> type[Refiner]:
    """Class decorator: make a refinement stage available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    REFINERS[cls.name] = cls
    return cls


def _criterion_options(crit: type[Criterion]) -> type:
    """A dataclass of the criterion's keyword arguments (``seed`` comes from the config)."""
    params = [
        p for p in inspect.signature(crit.__init__).parameters.values()
        if p.name not in ("self", "seed") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return dataclasses.make_dataclass(
        f"{crit.__name__}Options",
        [(p.name, Any, field(default=p.default)) for p in params if p.default is not p.empty],
        frozen=True,
    )


def _criterion_solver(crit: type[Criterion]) -> type[Solver]:
    """A solver that prunes by a criterion's scores through the pattern."""

    class CriterionSolver(Solver):
        name = crit.name
        requires = crit.requires
        Options = _criterion_options(crit)
        globally_comparable = crit.globally_comparable

        def __init__(self, options=None, *, seed: int = 0):
            super().__init__(options, seed=seed)
            kwargs = dataclasses.asdict(self.options)
            if "seed" in inspect.signature(crit.__init__).parameters:
                kwargs["seed"] = self.seed
            self.criterion = crit(**kwargs)

        def scores(self, ctx):
            return self.criterion(ctx)

    CriterionSolver.__name__ = CriterionSolver.__qualname__ = f"{crit.__name__}Solver"
    return CriterionSolver


def _solver_class(name: str) -> type[Solver]:
    if name in SOLVERS:
        return SOLVERS[name]
    if name in CRITERIA:
        return _criterion_solver(CRITERIA[name])
    raise ConfigError(f"unknown method '{name}'; known: {', '.join(method_names())}")


def method_names() -> list[str]:
    """Every pruning method: registered solvers and criteria."""
    return sorted(set(SOLVERS) | set(CRITERIA))


def get_solver(name: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> Solver:
    """The solver for method ``name`` with its typed ``options`` (ConfigError on unknown ones)."""
    cls = _solver_class(name)
    return cls(build_options(cls.Options, options, f"method '{name}'"), seed=seed)
