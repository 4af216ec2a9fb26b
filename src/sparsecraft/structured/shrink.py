"""``shrink_(model, config, calibration)``: remove whole units and make tensors smaller.

The driver works in three stages, and the model changes only in the last:

1. **plan**: find the unit groups (transformer blocks by structure, conv filters through a
   ``torch.fx`` trace), give each its fraction (overrides included) and turn fractions into
   exact unit counts; every rule is checked here: no layer may lose all its units, GQA
   layers keep the same number of query heads per key/value group, overrides must match a
   layer, calibration must be present for ``wanda``/``taylor``;
2. **score and select**: criterion scores from the untouched model (calibration passes run
   in eval mode and leave parameters, gradients and flags as they were); the lowest-scoring
   units go, ties dropping the lower index first;
3. **apply**: every new tensor is built first, then swapped in; module attributes that the
   forward pass reads are updated, and the new shapes are recorded on the model so
   ``sparsecraft.save``/``load`` reproduce it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from ..masks import META_ATTR, get_meta, has_open_state
from ..patterns import num_to_prune
from ..targets import match_rule
from . import scores as S
from .config import ShrinkConfig
from .groups import Slice, UnitGroup, find_block_groups
from .resize import cut, record_module, resize_module_

__all__ = ["shrink_", "plan_shrink", "ShrinkError", "ShrinkReport", "LayerShrink", "ShrinkPlan", "zero_units_"]

log = logging.getLogger(__name__)


class ShrinkError(TargetError):
    """A layer cannot be shrunk as asked (no unit left, GQA grouping broken, ...)."""


@dataclass
class LayerShrink:
    """What shrinking did to one layer."""

    name: str
    kind: str
    unit: str
    before: int
    after: int
    removed: list[int]
    buckets_before: int
    buckets_after: int
    removed_buckets: list[int]
    fraction: float


@dataclass
class ShrinkReport:
    """Per-layer unit counts before/after and the removed indices, with parameter totals."""

    criterion: str
    layers: list[LayerShrink]
    params_before: int
    params_after: int
    skipped: dict[str, str] = field(default_factory=dict)
    groups: dict[str, UnitGroup] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [asdict(l) for l in self.layers],
            "skipped": dict(self.skipped),
        }

    def __str__(self) -> str:
        width = max([len(l.name) for l in self.layers] + [5])
        lines = [f"{'layer'.ljust(width)}  {'kind':>5}  {'units':>13}  {'k/v groups':>10}"]
        for l in self.layers:
            kv = f"{l.buckets_before}->{l.buckets_after}" if l.buckets_before != l.before else ""
            lines.append(f"{l.name.ljust(width)}  {l.kind:>5}  {f'{l.before}->{l.after}':>13}  {kv:>10}")
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        lines.append(f"parameters {self.params_before:,} -> {self.params_after:,} ({ratio:.3f} of dense); "
                     f"criterion {self.criterion}")
        for name, reason in self.skipped.items():
            lines.append(f"kept {name}: {reason}")
        return "\n".join(lines)


@dataclass
class _Step:
    """One group with its exact counts."""

    group: UnitGroup
    fraction: float
    drop_buckets: int
    drop_per_bucket: int
    kept_units: int = 0  # filled after rounding (round_to) for single-level groups


@dataclass
class ShrinkPlan:
    """Validated groups and counts; building it never changes the model."""

    steps: list[_Step]
    skipped: dict[str, str]


# -- plan ----------------------------------------------------------------------------------
def _discover(model: nn.Module, config: ShrinkConfig) -> tuple[list[UnitGroup], dict[str, str]]:
    explicit = config.kinds()
    overrides = any(config.overrides.values())
    groups: list[UnitGroup] = []
    skipped: dict[str, str] = {}
    block_kinds = {"mlp", "heads"} & explicit
    if block_kinds or overrides:
        try:
            found = find_block_groups(model, {"mlp", "heads"} if overrides else block_kinds)
        except TargetError:
            if block_kinds:
                raise TargetError(
                    f"{' and '.join(sorted(block_kinds))} shrinking needs repeated transformer blocks "
                    f"(a ModuleList of same-type layers); {type(model).__name__} has none"
                ) from None
            found = []
        for kind in sorted(block_kinds):
            if not any(g.kind == kind for g in found):
                what = "MLP (gate/up/down or intermediate/output)" if kind == "mlp" else "attention (q/k/v/o with a head size)"
                raise TargetError(f"found no {what} layers in the blocks of {type(model).__name__}")
        groups += found
    traced_kinds = tuple(k for k in ("conv", "linear") if k in explicit)
    if overrides and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        traced_kinds = tuple(sorted(set(traced_kinds) | {"conv"}))
    if traced_kinds:
        from .fxdeps import find_conv_groups

        try:
            conv_groups, skipped = find_conv_groups(model, kinds=traced_kinds)
        except TargetError:
            if "conv" in explicit or "linear" in explicit:
                raise
            conv_groups = []
        if "linear" in explicit and not any(g.kind == "linear" for g in conv_groups):
            reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "no Linear layers"
            raise TargetError(f"no Linear layer of {type(model).__name__} can lose neurons ({reasons})")
        if "conv" in explicit and not any(g.kind == "conv" for g in conv_groups):
            reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "no conv layers"
            raise TargetError(f"no conv layer of {type(model).__name__} can lose filters ({reasons})")
        groups += conv_groups
    return groups, skipped


def _fraction(group: UnitGroup, config: ShrinkConfig, used: set[str]) -> float:
    for rule, value in config.overrides.items():
        if match_rule(rule, group.name):
            used.add(rule)
            return float(value)
    return {"mlp": config.mlp, "heads": config.heads, "conv": config.conv, "linear": config.linear}[group.kind]


def _round_kept(kept: int, units: int, multiple: int) -> int:
    if multiple <= 1:
        return kept
    return min(units, max(multiple, (kept + multiple // 2) // multiple * multiple))


def _step(group: UnitGroup, fraction: float, config: ShrinkConfig) -> _Step | None:
    query = config.query_heads if group.kind == "heads" else 0.0
    if fraction == 0.0 and query == 0.0:
        return None
    if group.kind != "heads":
        kept = _round_kept(group.units - num_to_prune(fraction, group.units), group.units, config.round_to)
        if kept < 1:
            raise ShrinkError(
                f"layer '{group.name}': removing {fraction:g} of its {group.units} {group.unit}s "
                f"would leave none; a layer must keep at least one"
            )
        return _Step(group, fraction, group.units - kept, 0, kept) if kept < group.units else None
    drop_buckets = num_to_prune(fraction, group.buckets)
    if drop_buckets >= group.buckets:
        what = "key/value groups" if group.per_bucket > 1 else f"{group.unit}s"
        raise ShrinkError(
            f"layer '{group.name}': heads={fraction:g} removes all {group.buckets} {what}; "
            f"a layer must keep at least one"
        )
    drop_per = num_to_prune(query, group.per_bucket)
    if query and group.per_bucket == 1:
        raise ShrinkError(
            f"layer '{group.name}': query_heads needs grouped-query attention (several query heads "
            f"per key/value head); this layer has one per group, so remove heads with 'heads'"
        )
    if drop_per >= group.per_bucket:
        raise ShrinkError(
            f"layer '{group.name}': query_heads={query:g} removes {drop_per} of the {group.per_bucket} "
            f"query heads in each key/value group; every group must keep at least one, and all keep "
            f"the same number (num_key_value_groups is one number per layer)"
        )
    if drop_buckets == 0 and drop_per == 0:
        return None
    kept = (group.buckets - drop_buckets) * (group.per_bucket - drop_per)
    return _Step(group, fraction, drop_buckets, drop_per, kept)


def _check_claims(steps: list[_Step]) -> None:
    owner: dict[tuple[str, int], str] = {}
    for st in steps:
        for s in st.group.slices:
            key = (s.module, s.dim)
            if key in owner and owner[key] != st.group.name:
                raise ShrinkError(
                    f"'{s.module}' dim {s.dim} belongs to both '{owner[key]}' and '{st.group.name}'; "
                    f"coupled layers are not supported"
                )
            owner[key] = st.group.name


def plan_shrink(model: nn.Module, config: ShrinkConfig | Mapping[str, Any]) -> ShrinkPlan:
    """Find groups and exact counts, checking every rule; the model is not changed."""
    config = config if isinstance(config, ShrinkConfig) else ShrinkConfig.from_dict(config)
    groups, skipped = _discover(model, config)
    used: set[str] = set()
    steps = []
    for g in groups:
        st = _step(g, _fraction(g, config, used), config)
        if st is not None:
            steps.append(st)
    unused = [r for r in config.overrides if r not in used]
    if unused:
        names = ", ".join(g.name for g in groups[:3])
        raise ConfigError(f"override '{unused[0]}' matches no shrinkable layer (layers look like: {names})")
    if not steps:
        raise ShrinkError("the fractions round to removing no unit in any layer; nothing to shrink")
    _check_claims(steps)
    return ShrinkPlan(steps, skipped)


# -- score ---------------------------------------------------------------------------------
def _check_calibration(model: nn.Module, calibration) -> torch.Tensor:
    if calibration is None:
        raise ConfigError("criterion needs calibration data (token ids [samples, seq_len] or model inputs)")
    if getattr(getattr(model, "config", None), "vocab_size", None) is not None:
        from ..blocks import check_calibration

        return check_calibration(model, calibration)
    if not isinstance(calibration, torch.Tensor) or calibration.dim() < 1 or calibration.shape[0] < 1:
        raise ConfigError("calibration must be a non-empty tensor of model inputs (batch on dim 0)")
    return calibration


def _score_maps(model, plan: ShrinkPlan, config: ShrinkConfig, calibration, loss_fn, progress):
    """Elementwise score maps per slice, all from the untouched model."""
    groups = [st.group for st in plan.steps]
    maps: dict[Slice, list[torch.Tensor]] = {}
    if config.criterion == "magnitude":
        maps.update(magnitude_maps(model, groups))
    elif config.criterion == "wanda":
        norms = S.input_norms(model, wanda_modules(model, groups), calibration, config.batch_size, progress)
        maps.update(wanda_maps(model, groups, norms))
    elif config.criterion.startswith("lrp-"):
        maps.update(_lrp_maps(model, groups, config, calibration))
    else:
        params = {f"{s.module}.{t}": model.get_submodule(s.module)._parameters[t]
                  for g in groups for s in g.slices for t in s.tensors
                  if model.get_submodule(s.module)._parameters.get(t) is not None}
        grads = S.taylor_grads(model, params, calibration, config.batch_size, loss_fn, progress)
        for s in (s for g in groups for s in g.slices):
            maps[s] = [S.taylor_map(params[f"{s.module}.{t}"], grads[f"{s.module}.{t}"])
                       for t in s.tensors if f"{s.module}.{t}" in params]
    return maps


def magnitude_maps(model: nn.Module, groups: list[UnitGroup]) -> dict[Slice, list[torch.Tensor]]:
    return {s: [S.magnitude_map(model.get_submodule(s.module).weight)]
            for g in groups for s in S.weight_slices(model, g)}


def wanda_modules(model: nn.Module, groups: list[UnitGroup]) -> dict[str, nn.Module]:
    """The layers whose input norms Wanda's scores of ``groups`` need, by name."""
    return {s.module: model.get_submodule(s.module) for g in groups for s in S.wanda_slices(model, g)}


def wanda_maps(model: nn.Module, groups: list[UnitGroup], norms: dict[str, torch.Tensor]
               ) -> dict[Slice, list[torch.Tensor]]:
    return {s: [S.wanda_map(model.get_submodule(s.module).weight, norms[s.module])]
            for g in groups for s in S.wanda_slices(model, g)}


def _lrp_maps(model, groups, config: ShrinkConfig, calibration) -> dict[Slice, list[torch.Tensor]]:
    """Relevance of each unit's producing weights (rows of a Linear, filters of a Conv): the
    relevance its output carries, less what its bias carries (Yeom et al., 2021)."""
    from ..oneshot.lrp import relevance

    rule = config.criterion.split("-", 1)[1]
    rel = relevance(model, calibration, rule=rule, batch_size=config.batch_size)
    maps: dict[Slice, list[torch.Tensor]] = {}
    for g in groups:
        producers = [s for s in S.weight_slices(model, g) if s.dim == 0 and f"{s.module}.weight" in rel.weights]
        if not producers:
            raise ConfigError(f"layer '{g.name}': LRP relevance does not reach the weights that produce its units")
        for s in producers:
            maps[s] = [rel.weights[f"{s.module}.weight"].double()]
    return maps


# -- apply ---------------------------------------------------------------------------------
def _slice_index(s: Slice, kept: torch.Tensor) -> torch.Tensor:
    """Tensor indices along the slice's dim owned by the kept units."""
    return (kept[:, None] * s.width + torch.arange(s.width)[None, :]).reshape(-1)


def _new_tensors(model, selections) -> dict[str, dict[str, torch.Tensor]]:
    """Every cut tensor, built before anything is swapped in (dims cut one after another)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, kept, kept_buckets in selections:
        for s in group.slices:
            module = model.get_submodule(s.module)
            index = _slice_index(s, kept_buckets if s.coarse else kept)
            tensors = out.setdefault(s.module, {})
            for t in s.tensors:
                current = tensors.get(t, getattr(module, t))
                tensors[t] = cut(current, s.dim, index)
    return out


def choose_units(steps: list[_Step], maps: dict[Slice, list[torch.Tensor]], config: ShrinkConfig):
    """The kept units of each step's group from the score ``maps``: ``(selections, layers)``,
    selections ``(group, kept, kept_buckets)`` for :func:`apply_selections_`."""
    selections, layers = [], []
    for st in steps:
        g = st.group
        fine, bucket = S.group_scores(g, maps, sqrt=config.criterion == "magnitude")
        drop_buckets = st.drop_buckets if g.kind == "heads" else g.units - st.kept_units
        kept, kept_buckets = S.select_units(fine, bucket, g.per_bucket, drop_buckets, st.drop_per_bucket)
        selections.append((g, kept, kept_buckets))
        layers.append(LayerShrink(
            g.name, g.kind, g.unit, g.units, kept.numel(),
            sorted(set(range(g.units)) - set(kept.tolist())), g.buckets, kept_buckets.numel(),
            sorted(set(range(g.buckets)) - set(kept_buckets.tolist())), st.fraction,
        ))
    return selections, layers


def apply_selections_(model: nn.Module, selections) -> dict[str, dict[str, torch.Tensor]]:
    """Cut the tensors of the selected groups, resize their modules and record the new shapes
    on ``model``; returns the new tensors per module."""
    new = _new_tensors(model, selections)
    attrs: dict[str, dict[str, Any]] = {}
    for g, kept, kept_buckets in selections:
        for name, values in g.attrs(kept.numel(), kept_buckets.numel()).items():
            attrs.setdefault(name, {}).update(values)
    for name in new.keys() | attrs.keys():
        resize_module_(model.get_submodule(name), new.get(name, {}), attrs.get(name, {}))
        record_module(model, name, attrs.get(name, {}))
    return new


def shrink_(
    model: nn.Module,
    config: ShrinkConfig | Mapping[str, Any],
    calibration=None,
    *,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> ShrinkReport:
    """Remove the least important units of ``model`` in place; returns what was removed.

    ``calibration``: token ids ``[samples, seq_len]`` for language models, or a batch of
    model inputs for other modules (used by ``wanda`` and ``taylor``). ``loss_fn(model,
    batch) -> scalar`` is the loss for ``taylor`` (default: the LM loss of a causal LM).
    On any error the model is left as it was.
    """
    config = config if isinstance(config, ShrinkConfig) else ShrinkConfig.from_dict(config)
    if has_open_state(model):
        raise ShrinkError("the model has open pruning masks; call state.finalize_() before shrinking")
    plan = plan_shrink(model, config)
    if config.needs_calibration:
        calibration = _check_calibration(model, calibration)
    if config.criterion == "taylor":
        loss_fn = loss_fn or S.default_loss(model)
        if loss_fn is None:
            raise ConfigError(
                f"taylor needs a loss: pass loss_fn(model, batch) for {type(model).__name__} "
                f"(causal LMs use their LM loss by default)"
            )
    params_before = sum(p.numel() for p in model.parameters())
    maps = _score_maps(model, plan, config, calibration, loss_fn, progress)

    selections, layers = choose_units(plan.steps, maps, config)
    # everything is decided; only now does the model change
    new = apply_selections_(model, selections)
    _forget_meta(model, new)
    params_after = sum(p.numel() for p in model.parameters())
    log.info("shrunk %d layers with %s: %d -> %d parameters", len(layers), config.criterion,
             params_before, params_after)
    return ShrinkReport(config.criterion, layers, params_before, params_after, plan.skipped,
                        {g.name: g for g, _, _ in selections})


def _forget_meta(model: nn.Module, new: dict[str, dict[str, torch.Tensor]]) -> None:
    """Sparsity records of resized tensors no longer describe them (N:M groups moved)."""
    meta = dict(get_meta(model))
    stale = [f"{m}.{t}" for m, ts in new.items() for t in ts if f"{m}.{t}" in meta]
    for name in stale:
        log.warning("'%s' was pruned before and is now resized; its sparsity record is dropped", name)
        meta.pop(name)
    if stale:
        object.__setattr__(model, META_ATTR, meta)


def zero_units_(model: nn.Module, report: ShrinkReport) -> nn.Module:
    """Zero, in an unshrunk copy of the model, the units that ``report`` removed.

    The zeroed model computes what the shrunk one does (up to float rounding): every unit's
    consuming columns are zero, so it contributes nothing. Useful to check a shrink, or to
    preview it without changing shapes.
    """
    with torch.no_grad():
        for layer in report.layers:
            g = report.groups[layer.name]
            for s in g.slices:
                removed = torch.tensor(layer.removed_buckets if s.coarse else layer.removed, dtype=torch.long)
                if removed.numel() == 0:
                    continue
                module = model.get_submodule(s.module)
                index = _slice_index(s, removed)
                for t in s.tensors:
                    getattr(module, t).index_fill_(s.dim, index.to(getattr(module, t).device), 0.0)
    return model
