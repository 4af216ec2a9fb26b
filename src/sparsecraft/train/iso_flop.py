"""Sparse Iso-FLOP Transformations (Sparse-IFT; Thangarasa, Saxena et al., ICML 2024).

A dense ``Linear`` or ``Conv2d`` is replaced by a bigger sparse structure with the same
FLOPs, whose sparse weights are then trained with dynamic sparse training (RigL or SET):

```python
result = to_sparse_ift_(model, "wide", sparsity=0.75)      # the module tree changes in place
opt = torch.optim.SGD(result.model.parameters(), lr=0.05, momentum=0.9)
rigl = result.dst("rigl", update_every=50, end=1000, optimizer=opt)
print(result)                                                # what changed, and why
```

One number sets every transformation: the sparsity ``s`` (density ``d = 1 - s``). ``K`` is a
layer's reduction size (``in_features``, or ``in_channels * kh * kw``) and ``out`` its outputs.

* ``wide``: hidden widths grow by ``k = 1 / sqrt(d)`` (rounded to whole units). A width is
  widened when it is the output of a target layer and every layer that reads it is a target
  too; the channels are followed through a ``torch.fx`` trace (through BatchNorm, which is
  rebuilt at the new width, activations, pooling and ``flatten`` into a Linear), as
  structured shrinking does (:mod:`sparsecraft.structured.fxdeps`). The model's inputs and
  outputs keep their sizes. Every layer with a widened side keeps exactly the dense layer's
  number of weights: density ``~d`` with both sides widened, ``~sqrt(d)`` with one. Widths
  stay as they are, said in ``kept``/``notes``, when a reader is not a target (under the
  default rules, the classifier head: widening its input would add dense FLOPs there) or the
  channels reach something that couples them (a residual add, a concatenation, the output).
* ``parallel``: ``n = max(2, round(1 / d))`` branches of the layer's shape, each followed by
  its own normalisation (``BatchNorm2d`` after a conv, ``LayerNorm`` after a Linear: the
  per-branch non-linearity of the paper, as in its RepVGG-style CIFAR code), outputs summed;
  the norms carry the shift, so branches have no bias. The branches share the dense number of
  weights (``1/n`` each), so their sparsity is ``1 - 1/n``: ``s`` itself when ``1/d`` is whole.
* ``factorized``: ``v(u(x))`` with ``u``: ``K -> r`` (the layer's kernel, stride and padding)
  and ``v``: ``r -> out`` (1x1 for a conv, with the layer's bias), no non-linearity between;
  ``r = round(K * out / (d * (K + out)))`` so that the pair at density ``d`` costs the dense
  FLOPs. ``u`` and ``v`` together keep the dense number of weights, split by their sizes.
* ``doped``: ``sparse(x) + v(u(x))``: a sparse layer of the dense shape plus a dense low-rank
  pair of rank ``r = floor(s * K * out / (K + out))``, the paper's split: the low-rank part
  takes the share ``s`` of the dense FLOPs and the sparse layer keeps the rest
  (``K * out - r * (K + out)`` weights, density ``~d``). Only the sparse layer is a target.
  A layer too small for rank 1 stays as it is (said in ``kept``).

**FLOPs.** Every transformed structure keeps the dense layer's multiply-accumulates per
output position exactly (the kept counts are exact integers; rounding moves only the
sparsities), so ``report(model, example_input=x, targets={"include_head": True})`` gives the
same effective FLOPs before and after, once the masks are on. Norms, biases and the
addition of branches are not counted (as the report counts none of them).

**Initialisation.** New layers are new modules with PyTorch's default initialisation, so
transform a freshly built model (Sparse-IFT trains from scratch); the second layer of a
low-rank pair keeps its input's variance (uniform, variance 1 / fan-in), so the pair starts
at one layer's scale. Each sparse weight is then multiplied by ``1 / sqrt(density)``: once
masked, every output sums the same variance as with all its weights (``rescale_init=False``
keeps the plain initialisation).

**Training and saving.** :meth:`IsoFlopResult.dst` builds RigL or SET on exactly the new
sparse weights with their sparsities pinned (``overrides``), so every layer keeps its exact
count through prune-and-regrow. To reload a trained model, apply the same transformation to
a fresh model of the same architecture (it depends only on the shapes) and then
``load_state_dict``.

**Bad input** changes nothing: an unknown transformation, a sparsity outside (0, 1), target
rules that match nothing, a target that is not an ``nn.Linear`` or a ``groups=1``
``nn.Conv2d``, a model with masks attached, or a model in which nothing can be transformed
are errors (:mod:`sparsecraft.errors`) raised before the first module is replaced.

A transformation is one :func:`register_transform` entry: ``fn(model, layers, sparsity) ->``
:class:`TransformPlan` (pure: new modules and kept counts, the model untouched). Registering
also makes the recipe method ``sparse-ift-<name>`` of ``sparsecraft train``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..allocation import bounded_round
from ..errors import ConfigError, TargetError
from ..masks import has_open_state
from ..structured.fxdeps import find_conv_groups
from ..targets import Target, TargetSpec, select_targets
from .dynamic import SCHEDULE_OPTIONS, SET, DynamicSparsity, RigL, schedule_options
from .registry import Plan, option_choice, recipe_method

__all__ = [
    "to_sparse_ift_", "IsoFlopResult", "TransformPlan", "register_transform", "TRANSFORMS",
    "SparseParallel", "SparseFactorized", "SparseDoped", "check_ift_sparsity",
]

log = logging.getLogger(__name__)

#: name -> ``fn(model, layers, sparsity) -> TransformPlan``
TRANSFORMS: dict[str, Callable[[nn.Module, list[Target], float], "TransformPlan"]] = {}
#: the dynamic sparse training methods that train the new sparse weights
DST_METHODS: dict[str, type[DynamicSparsity]] = {"rigl": RigL, "set": SET}


# -- the replacement modules -----------------------------------------------------------------
class SparseParallel(nn.Module):
    """The sum of ``n`` layers of one shape, each followed by its own normalisation."""

    def __init__(self, branches: list[nn.Module], norms: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.norms = nn.ModuleList(norms)

    def forward(self, x):
        out = None
        for layer, norm in zip(self.branches, self.norms):
            y = norm(layer(x))
            out = y if out is None else out + y
        return out


class SparseFactorized(nn.Module):
    """``v(u(x))``: a rank-``r`` pair standing for one layer (both sparse)."""

    def __init__(self, u: nn.Module, v: nn.Module):
        super().__init__()
        self.u, self.v = u, v

    def forward(self, x):
        return self.v(self.u(x))


class SparseDoped(nn.Module):
    """``sparse(x) + v(u(x))``: a sparse layer plus a dense low-rank pair."""

    def __init__(self, sparse: nn.Module, u: nn.Module, v: nn.Module):
        super().__init__()
        self.sparse, self.u, self.v = sparse, u, v

    def forward(self, x):
        return self.sparse(x) + self.v(self.u(x))


# -- plans -------------------------------------------------------------------------------------
@dataclass
class TransformPlan:
    """What a transformation would do, built without touching the model.

    ``replace``: module name -> new module; ``keep``: parameter name in the new model -> the
    exact number of weights it keeps (its sparse targets); ``notes``: what changes and why;
    ``kept``: target layers (or widths) left as they are -> why.
    """

    replace: dict[str, nn.Module] = field(default_factory=dict)
    keep: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def register_transform(name: str):
    """Decorator: register ``fn(model, layers, sparsity) -> TransformPlan`` as the
    transformation ``name`` and the recipe method ``sparse-ift-<name>``."""

    def deco(fn):
        if name in TRANSFORMS and TRANSFORMS[name] is not fn:
            raise ValueError(f"Sparse-IFT transformation '{name}' is registered twice")
        TRANSFORMS[name] = fn
        recipe_method(f"sparse-ift-{name}", options=SCHEDULE_OPTIONS | {"dst", "targets"})(_recipe_planner(name))
        return fn

    return deco


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _factory(module: nn.Module) -> dict[str, Any]:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def _sizes(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a Linear or Conv2d."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _like(layer: nn.Module, inputs: int, outputs: int, *, bias: bool, pointwise: bool = False) -> nn.Module:
    """A new layer of ``layer``'s kind with other sizes (a 1x1 conv when ``pointwise``)."""
    factory = _factory(layer)
    if isinstance(layer, nn.Linear):
        return nn.Linear(inputs, outputs, bias=bias, **factory)
    if pointwise:
        return nn.Conv2d(inputs, outputs, 1, bias=bias, **factory)
    return nn.Conv2d(inputs, outputs, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=bias, padding_mode=layer.padding_mode, **factory)


def _second_factor(layer: nn.Module) -> nn.Module:
    """Re-initialise the second layer of a low-rank pair to keep its input's variance
    (uniform, variance 1 / fan-in): the pair then starts at one default layer's scale, where
    two default layers in a row would shrink the signal three times more."""
    fan_in = layer.weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
    return layer


def _split(total: int, capacities: list[int]) -> list[int]:
    """``total`` weights spread over tensors of ``capacities`` in proportion, summing exactly."""
    whole = sum(capacities)
    return bounded_round([total * c / whole for c in capacities], [1] * len(capacities), capacities, total)


def _shape(layer: nn.Module) -> str:
    return "x".join(map(str, layer.weight.shape))


# -- recipes (sparsecraft train) -------------------------------------------------------------
_TARGET_KEYS = ("include", "exclude", "include_head")


def _recipe_targets(recipe) -> dict[str, Any] | None:
    """``options.targets``: None, or a mapping of ``include``/``exclude`` rules and ``include_head``."""
    value = recipe.options.get("targets")
    if value is None:
        return None
    field_ = "train recipe: options.targets"
    if not isinstance(value, dict):
        raise ConfigError(f"{field_} must be a mapping with keys {', '.join(_TARGET_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(_TARGET_KEYS))
    if unknown:
        raise ConfigError(f"{field_}: unknown keys {unknown}; allowed: {', '.join(_TARGET_KEYS)}")
    out: dict[str, Any] = {}
    for key in ("include", "exclude"):
        rules = value.get(key, [])
        rules = [rules] if isinstance(rules, str) else rules
        if not isinstance(rules, list) or not all(isinstance(r, str) and r for r in rules):
            raise ConfigError(f"{field_}.{key} must be a rule or a list of rules (text), got {value.get(key)!r}")
        out[key] = rules
    head = value.get("include_head", False)
    if not isinstance(head, bool):
        raise ConfigError(f"{field_}.include_head must be true or false, got {head!r}")
    out["include_head"] = head
    return out


def _recipe_planner(transform: str):
    def plan(recipe) -> Plan:
        if recipe.sparsity is None:
            raise ConfigError(f"train recipe: method '{recipe.method}' needs a sparsity (a number in (0, 1))")
        sparsity = check_ift_sparsity(recipe.sparsity, "train recipe: sparsity")
        schedule = schedule_options(recipe)
        dst = option_choice(recipe, "dst", "rigl", tuple(DST_METHODS))
        targets = _recipe_targets(recipe)

        def prepare(model):
            result = to_sparse_ift_(model, transform, sparsity, targets=targets)
            return result.model, result

        def build(model, optimizer, context):
            result = context.prepared
            if not isinstance(result, IsoFlopResult) or result.model is not model:
                raise ConfigError(f"method '{recipe.method}' builds on the model its plan's prepare() transformed")
            return result.dst(dst, optimizer=optimizer, seed=recipe.seed, **schedule)

        return Plan(build, recipe.steps, prepare=prepare)

    return plan


# -- the four transformations ----------------------------------------------------------------
@register_transform("wide")
def _wide(model: nn.Module, layers: list[Target], sparsity: float) -> TransformPlan:
    k = 1.0 / math.sqrt(1.0 - sparsity)
    chosen = {t.module_name for t in layers}
    modules = dict(model.named_modules())
    groups, skipped = find_conv_groups(model, kinds=("conv", "linear"))
    plan = TransformPlan()
    inputs: dict[str, int] = {}
    outputs: dict[str, int] = {}
    norms: dict[str, int] = {}
    for g in groups:
        if g.name not in chosen:
            continue
        readers = sorted({s.module for s in g.slices if s.dim == 1})
        outside = [r for r in readers if r not in chosen]
        if outside:
            plan.kept[g.name] = (f"outputs not widened: read by {', '.join(outside)}, not a target "
                                 "(widening them would add FLOPs to a dense layer)")
            continue
        units = round(g.units * k)
        if units == g.units:
            plan.kept[g.name] = f"outputs not widened: {g.units} x {k:.3f} rounds to no new {g.unit}"
            continue
        for s in g.slices:
            if s.module == g.name:
                outputs[s.module] = units
            elif s.dim == 1:
                inputs[s.module] = units * s.width
            else:
                norms[s.module] = units
        plan.notes.append(f"{g.name}: {g.units} -> {units} output {g.unit}s (k = {k:.3f}; read by "
                          f"{', '.join(readers)}, all targets)")
    for name, reason in skipped.items():
        if name in chosen:
            plan.kept[name] = f"outputs not widened: {reason}"
    if not outputs:
        why = "; ".join(f"{n}: {r}" for n, r in plan.kept.items()) or "no target feeds another target"
        raise TargetError(f"sparse wide: no hidden width lies between two target layers ({why})")
    for t in layers:
        layer = t.module
        old_in, old_out = _sizes(layer)
        new_in, new_out = inputs.get(t.module_name, old_in), outputs.get(t.module_name, old_out)
        if (new_in, new_out) == (old_in, old_out):
            plan.kept.setdefault(t.module_name, "neither its inputs nor its outputs are widened")
            continue
        wide = _like(layer, new_in, new_out, bias=layer.bias is not None)
        plan.replace[t.module_name] = wide
        plan.keep[_join(t.module_name, "weight")] = layer.weight.numel()
        plan.notes.append(f"{t.module_name}: {_shape(layer)} -> {_shape(wide)}, keeps its "
                          f"{layer.weight.numel():,} weights (density {layer.weight.numel() / wide.weight.numel():.4f})")
    for name, units in norms.items():
        norm = modules[name]
        plan.replace[name] = type(norm)(units, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                                        track_running_stats=norm.track_running_stats, **_factory(norm))
        plan.notes.append(f"{name}: {norm.num_features} -> {units} features (follows its layer)")
    return plan


@register_transform("parallel")
def _parallel(model: nn.Module, layers: list[Target], sparsity: float) -> TransformPlan:
    n = max(2, round(1.0 / (1.0 - sparsity)))
    plan = TransformPlan()
    for t in layers:
        layer = t.module
        inputs, outputs = _sizes(layer)
        numel = layer.weight.numel()
        branches = [_like(layer, inputs, outputs, bias=False) for _ in range(n)]
        norms = [nn.LayerNorm(outputs, **_factory(layer)) if isinstance(layer, nn.Linear)
                 else nn.BatchNorm2d(outputs, **_factory(layer)) for _ in range(n)]
        plan.replace[t.module_name] = SparseParallel(branches, norms)
        counts = _split(numel, [numel] * n)
        for i, count in enumerate(counts):
            plan.keep[_join(t.module_name, f"branches.{i}.weight")] = count
        plan.notes.append(f"{t.module_name}: {n} parallel {_shape(layer)} branches with their own "
                          f"{type(norms[0]).__name__}, {min(counts):,}-{max(counts):,} of {numel:,} weights each")
    return plan


def _reduction(layer: nn.Module) -> tuple[int, int, int]:
    """(K, out, K * out): reduction size, outputs and weights of a Linear or Conv2d."""
    numel = layer.weight.numel()
    out = layer.weight.shape[0]
    return numel // out, out, numel


@register_transform("factorized")
def _factorized(model: nn.Module, layers: list[Target], sparsity: float) -> TransformPlan:
    plan = TransformPlan()
    for t in layers:
        layer = t.module
        inputs, outputs = _sizes(layer)
        K, out, numel = _reduction(layer)
        # at least the rank at which the pair holds the dense count at density 1
        rank = max(math.ceil(numel / (K + out)), round(numel / ((1.0 - sparsity) * (K + out))))
        u = _like(layer, inputs, rank, bias=False)
        v = _second_factor(_like(layer, rank, outputs, bias=layer.bias is not None, pointwise=True))
        plan.replace[t.module_name] = SparseFactorized(u, v)
        keep_u, keep_v = _split(numel, [u.weight.numel(), v.weight.numel()])
        plan.keep[_join(t.module_name, "u.weight")] = keep_u
        plan.keep[_join(t.module_name, "v.weight")] = keep_v
        plan.notes.append(f"{t.module_name}: {_shape(layer)} -> rank {rank} pair {_shape(u)} then {_shape(v)}, "
                          f"keeping {keep_u:,} + {keep_v:,} weights")
    return plan


@register_transform("doped")
def _doped(model: nn.Module, layers: list[Target], sparsity: float) -> TransformPlan:
    plan = TransformPlan()
    for t in layers:
        layer = t.module
        inputs, outputs = _sizes(layer)
        K, out, numel = _reduction(layer)
        rank = math.floor(sparsity * numel / (K + out))
        if rank < 1:
            plan.kept[t.module_name] = (f"too small for a rank-1 low-rank part at sparsity {sparsity} "
                                        f"({K} x {out} weights)")
            continue
        sparse = _like(layer, inputs, outputs, bias=layer.bias is not None)
        u = _like(layer, inputs, rank, bias=False)
        v = _second_factor(_like(layer, rank, outputs, bias=False, pointwise=True))
        plan.replace[t.module_name] = SparseDoped(sparse, u, v)
        keep = numel - rank * (K + out)
        plan.keep[_join(t.module_name, "sparse.weight")] = keep
        plan.notes.append(f"{t.module_name}: sparse {_shape(layer)} keeping {keep:,} weights plus a dense "
                          f"rank-{rank} pair {_shape(u)} then {_shape(v)} ({rank * (K + out):,} weights)")
    return plan


# -- the entry point ---------------------------------------------------------------------------
def check_ift_sparsity(value, what: str = "Sparse-IFT sparsity") -> float:
    """A Sparse-IFT sparsity is a number in (0, 1): 0 would change nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{what} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_layers(model: nn.Module, targets: list[Target]) -> None:
    for t in targets:
        where = f"layer '{t.module_name or type(model).__name__}'"
        if t.param_name != "weight":
            raise TargetError(f"{where}: Sparse-IFT transforms whole layers; target '{t.name}' is not a weight")
        if type(t.module) not in (nn.Linear, nn.Conv2d):
            raise TargetError(f"{where} is a {type(t.module).__name__}: Sparse-IFT transforms nn.Linear and "
                              "nn.Conv2d layers only (leave it out with an exclude rule)")
        if isinstance(t.module, nn.Conv2d) and t.module.groups != 1:
            raise TargetError(f"{where} is a grouped conv (groups={t.module.groups}): Sparse-IFT transforms "
                              "groups=1 convolutions only")
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if any(module is t.module for t in targets) and names.setdefault(id(module), name) != name:
            raise TargetError(f"layer '{names[id(module)]}' is also registered as '{name}': a shared layer "
                              "cannot be replaced in one place only")


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _exact(name: str) -> str:
    """A rule matching exactly one parameter name."""
    return "re:" + re.escape(name)


@dataclass
class IsoFlopResult:
    """A transformed model and its sparse weights (see the module docstring)."""

    model: nn.Module
    transform: str
    sparsity: float
    targets: list[Target]
    keep: dict[str, int]
    notes: list[str]
    kept: dict[str, str]

    @property
    def layer_sparsity(self) -> dict[str, float]:
        """Sparsity of every new sparse weight (exact counts: ``1 - keep / numel``)."""
        return {t.name: 1.0 - self.keep[t.name] / t.param.numel() for t in self.targets}

    @property
    def overall_sparsity(self) -> float:
        total = sum(t.param.numel() for t in self.targets)
        return 1.0 - sum(self.keep.values()) / total

    def target_spec(self) -> dict[str, Any]:
        """Rules selecting exactly the new sparse weights (for a sparsity object's ``targets=``)."""
        return {"include": [_exact(t.name) for t in self.targets], "include_head": True}

    def overrides(self) -> dict[str, float]:
        """``{rule: sparsity}`` pinning every new sparse weight to its exact count."""
        return {_exact(name): s for name, s in self.layer_sparsity.items()}

    def dst(self, method: str | type[DynamicSparsity] = "rigl", update_every: int = 100, end: int | None = None,
            optimizer=None, **kwargs) -> DynamicSparsity:
        """RigL or SET (a name or a :class:`DynamicSparsity` class) on the new sparse weights,
        each pinned to its sparsity; ``kwargs`` go to the method (``fraction``, ``decay``, ``seed``)."""
        cls = DST_METHODS.get(method) if isinstance(method, str) else method
        if not (isinstance(cls, type) and issubclass(cls, DynamicSparsity)):
            raise ConfigError(f"Sparse-IFT trains with {', '.join(DST_METHODS)} or a DynamicSparsity class, "
                              f"got {method!r}")
        fixed = {"targets", "overrides", "allocation"} & set(kwargs)
        if fixed:
            raise ConfigError(f"Sparse-IFT sets {sorted(fixed)} itself (its sparse weights, pinned)")
        return cls(self.model, self.overall_sparsity, update_every, end, optimizer,
                   targets=self.target_spec(), overrides=self.overrides(), allocation="uniform", **kwargs)

    def __str__(self) -> str:
        lines = [f"sparse {self.transform} at sparsity {self.sparsity}: {len(self.targets)} sparse weights, "
                 f"overall sparsity {self.overall_sparsity:.4f}"]
        lines += [f"  {n}" for n in self.notes]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


def to_sparse_ift_(
    model: nn.Module,
    transform: str,
    sparsity: float = 0.75,
    *,
    targets: TargetSpec | dict | None = None,
    rescale_init: bool = True,
) -> IsoFlopResult:
    """Replace the target ``Linear``/``Conv2d`` layers of ``model`` by the Sparse-IFT
    ``transform`` (``wide``, ``parallel``, ``factorized``, ``doped``) at ``sparsity``.

    ``targets``: rules as in :func:`sparsecraft.targets.select_targets` (default: every
    Linear/Conv weight but the output head). The module tree changes in place; the result
    holds the model (a new object only when the model itself was the one layer), the new
    sparse weights as targets and their exact sparsities. Everything is checked and every
    new module built before the first one is swapped in.
    """
    if not isinstance(transform, str) or transform not in TRANSFORMS:
        raise ConfigError(f"unknown Sparse-IFT transformation {transform!r}; known: {', '.join(TRANSFORMS)}")
    sparsity = check_ift_sparsity(sparsity)
    if has_open_state(model):
        raise ConfigError("the model has masks attached (an open sparsity state): Sparse-IFT replaces layers, "
                          "so transform the dense model first and build the sparsity object afterwards")
    chosen = select_targets(model, targets)
    _check_layers(model, chosen)
    plan = TRANSFORMS[transform](model, chosen, sparsity)
    if not plan.keep:
        why = "; ".join(f"{n}: {r}" for n, r in plan.kept.items())
        raise TargetError(f"sparse {transform}: no layer could be transformed ({why})")
    for name, new in plan.replace.items():  # everything is built: now the model changes
        model = _swap(model, name, new)
    modules = dict(model.named_modules())
    sparse = []
    for pname in plan.keep:
        module_name, _, attr = pname.rpartition(".")
        sparse.append(Target(pname, module_name, modules[module_name], attr))
    if rescale_init:
        with torch.no_grad():
            for t in sparse:
                t.param.mul_(math.sqrt(t.param.numel() / plan.keep[t.name]))
    result = IsoFlopResult(model, transform, sparsity, sparse, dict(plan.keep), plan.notes, plan.kept)
    for line in str(result).splitlines():
        log.info("%s", line.strip())
    return result
