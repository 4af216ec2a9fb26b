"""Conv filter dependencies found with ``torch.fx`` (symbolic tracing, no example input).

For every ``Conv1d/2d/3d`` (``groups == 1``) the output channels are followed forward
through the traced graph:

* BatchNorm on the way: its affine parameters and running statistics are cut too;
* channel-preserving operations pass through: activations, dropout, pooling, reductions
  over non-channel dims, ``contiguous``;
* a following conv (``groups == 1``) consumes the channels: its input channels are cut;
* ``flatten(1)`` followed by a ``Linear``: each channel owns ``in_features // channels``
  consecutive columns (its flattened spatial positions);
* a ``Linear`` on a 2-D ``[batch, channels]`` tensor consumes the channels directly.

Anything else on the way (a residual add, concatenation, a view, the model's output)
makes the filter count of that conv fixed; the conv is reported as skipped with the
reason, never shrunk half-way. Tensor ranks are tracked from the conv type (batched
inputs assumed), so no example input is needed.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError
from .groups import Slice, UnitGroup

__all__ = ["find_conv_groups"]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_PASS_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.leaky_relu, F.elu, F.hardswish, F.mish, F.dropout, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "to"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}


class _Unsupported(Exception):
    """The channels reach an operation that would need coupled or reshaped indices."""


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _reduce_dims(node, rank: int) -> tuple[list[int], bool]:
    args = list(node.args[1:])
    dim = node.kwargs.get("dim", args[0] if args else None)
    keepdim = node.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dim is None:
        raise _Unsupported(f"'{node.name}' reduces over all dims, channels included")
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [_norm_dim(d, rank) for d in dims], bool(keepdim)


class _Tracer:
    """Follows one conv's output channels through the graph, collecting slices."""

    def __init__(self, modules: dict[str, nn.Module], source: str, channels: int):
        self.modules = modules
        self.source = source
        self.channels = channels
        self.slices: list[Slice] = []

    def follow(self, node, rank: int, flat: bool = False) -> None:
        """``rank``: tensor rank at ``node`` (channels at dim 1); ``flat``: after flatten(1)."""
        if not node.users:
            raise _Unsupported(f"'{node.name}' is never used")
        for user in node.users:
            self._visit(user, node, rank, flat)

    def _visit(self, user, producer, rank: int, flat: bool) -> None:
        where = f"'{user.name}'"
        if user.op == "output":
            raise _Unsupported("its channels are the model's output")
        if user.op == "call_module":
            m = self.modules[user.target]
            if user.args[0] is not producer or len(user.args) != 1:
                raise _Unsupported(f"{where} takes it as a second input")
            if isinstance(m, _CONVS):
                if flat or m.groups != 1 or m.in_channels != self.channels:
                    raise _Unsupported(f"conv '{user.target}' cannot drop input channels (groups={m.groups})")
                self.slices.append(Slice(user.target, 1))
                return
            if isinstance(m, nn.Linear):
                self._linear(user.target, m, rank, flat)
                return
            if isinstance(m, _NORMS) and not flat:
                if m.num_features != self.channels:
                    raise _Unsupported(f"norm '{user.target}' has {m.num_features} features")
                names = tuple(n for n in ("weight", "bias", "running_mean", "running_var")
                              if getattr(m, n, None) is not None)
                self.slices.append(Slice(user.target, 0, tensors=names))
                self.follow(user, rank, flat)
                return
            if isinstance(m, nn.Flatten) and not flat:
                if _norm_dim(m.start_dim, rank) != 1 or m.end_dim != -1:
                    raise _Unsupported(f"{where} flattens other dims than 1..-1")
                self.follow(user, 2, True)
                return
            if isinstance(m, _PASS_MODULES) and not (flat and not isinstance(m, (nn.Dropout, nn.Identity))):
                self.follow(user, rank, flat)
                return
            raise _Unsupported(f"{where} is a {type(m).__name__} it cannot see through")
        if user.op == "call_function":
            target = user.target
            if target in _PASS_FUNCTIONS and user.args and user.args[0] is producer and not flat:
                self.follow(user, rank, flat)
                return
            if target is torch.flatten and user.args[0] is producer:
                self._flatten(user, rank, flat)
                return
            if target in (torch.mean, torch.sum, torch.amax, torch.amin) and user.args[0] is producer:
                self._reduce(user, rank, flat)
                return
            if target is operator.getitem:
                raise _Unsupported(f"{where} indexes it")
            raise _Unsupported(f"{where} ({getattr(target, '__name__', target)}) combines or reshapes it")
        if user.op == "call_method":
            if user.args[0] is not producer:
                raise _Unsupported(f"{where} takes it as an argument")
            if user.target in _PASS_METHODS and (user.target != "to" or not flat):
                self.follow(user, rank, flat)
                return
            if user.target == "flatten":
                self._flatten(user, rank, flat)
                return
            if user.target in _REDUCTIONS:
                self._reduce(user, rank, flat)
                return
            raise _Unsupported(f"{where} (.{user.target}) combines or reshapes it")
        raise _Unsupported(f"{where} ({user.op}) is not understood")

    def _flatten(self, node, rank: int, flat: bool) -> None:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        if flat or _norm_dim(start, rank) != 1 or _norm_dim(end, rank) != rank - 1:
            raise _Unsupported(f"'{node.name}' flattens other dims than 1..-1")
        self.follow(node, 2, True)

    def _reduce(self, node, rank: int, flat: bool) -> None:
        dims, keepdim = _reduce_dims(node, rank)
        if flat or 1 in dims or 0 in dims:
            raise _Unsupported(f"'{node.name}' reduces over the channel or batch dim")
        self.follow(node, rank if keepdim else rank - len(set(dims)), flat)

    def _linear(self, name: str, m: nn.Linear, rank: int, flat: bool) -> None:
        if flat:
            if m.in_features % self.channels:
                raise _Unsupported(f"linear '{name}' has {m.in_features} inputs, not a multiple of {self.channels}")
            self.slices.append(Slice(name, 1, width=m.in_features // self.channels))
            return
        if rank != 2 or m.in_features != self.channels:
            raise _Unsupported(f"linear '{name}' would act on a non-channel dim")
        self.slices.append(Slice(name, 1))


def find_conv_groups(model: nn.Module, *, kinds: tuple[str, ...] = ("conv",)) -> tuple[list[UnitGroup], dict[str, str]]:
    """``(groups, skipped)``: shrinkable conv filter groups and ``{conv: reason}`` for the rest.

    With ``"linear"`` in ``kinds``, the output neurons of ``nn.Linear`` layers are followed the
    same way (a 2-D ``[batch, features]`` output through activations into the next Linear):
    plain MLPs lose hidden neurons. A Linear whose outputs reach the model's output (the
    head) or anything else is skipped with the reason."""
    import torch.fx

    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the message says what failed
        raise TargetError(
            f"conv shrinking follows channels through a torch.fx trace, and "
            f"{type(model).__name__} does not trace: {type(exc).__name__}: {exc}"
        ) from None
    modules = dict(traced.named_modules())
    groups, skipped = [], {}
    sources: tuple[type, ...] = (_CONVS if "conv" in kinds else ()) + ((nn.Linear,) if "linear" in kinds else ())
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], sources):
            continue
        conv = modules[node.target]
        name = node.target
        if isinstance(conv, nn.Linear):
            _linear_group(traced, modules, node, groups, skipped)
            continue
        if conv.groups != 1:
            skipped[name] = f"grouped conv (groups={conv.groups})"
            continue
        if any(n.op == "call_module" and n.target == name for n in traced.graph.nodes if n is not node):
            skipped[name] = "the module is called more than once"
            continue
        tracer = _Tracer(modules, name, conv.out_channels)
        try:
            tracer.follow(node, rank=conv.weight.dim())  # conv weight rank == batched input rank
        except _Unsupported as exc:
            skipped[name] = str(exc)
            continue
        produce = ("weight", "bias") if conv.bias is not None else ("weight",)
        groups.append(UnitGroup(name, "conv", "filter", conv.out_channels,
                                [Slice(name, 0, tensors=produce)] + tracer.slices))
    for name, reason in skipped.items():
        log.info("'%s' keeps its units: %s", name, reason)
    return groups, skipped


def _linear_group(traced, modules, node, groups: list[UnitGroup], skipped: dict[str, str]) -> None:
    name, linear = node.target, modules[node.target]
    if any(n.op == "call_module" and n.target == name for n in traced.graph.nodes if n is not node):
        skipped[name] = "the module is called more than once"
        return
    tracer = _Tracer(modules, name, linear.out_features)
    try:
        tracer.follow(node, rank=2)
    except _Unsupported as exc:
        skipped[name] = str(exc)
        return
    produce = ("weight", "bias") if linear.bias is not None else ("weight",)
    groups.append(UnitGroup(name, "linear", "neuron", linear.out_features,
                            [Slice(name, 0, tensors=produce)] + tracer.slices))
