"""Layer-wise relevance propagation (LRP) and the ``lrp`` pruning criterion.

Relevance starts at the explained output (the logit of the predicted class, or of a given
label) and flows backward through a ``torch.fx`` trace of the model, layer by layer, so that
each layer hands on what it received (Bach et al., 2015; Montavon et al., 2019). Pruning by
relevance follows Yeom et al. (2021, "Pruning by explaining"): the relevance of a weight or a
filter, summed over a few reference samples, says how much of the decision it carries.

Rules for a layer ``z = f(x)``, ``R`` the relevance at its output:

* ``epsilon``: ``s = R / (z + eps * sign(z))``; input relevance ``x * (df/dx)^T s``; weight
  relevance ``w * (df/dw)^T s`` (``w_ij x_j R_i / z_i`` for a Linear). At ``eps -> 0`` and
  without biases a layer conserves relevance: its inputs' and its weights' relevances each
  sum to ``sum R``.
* ``zplus``: only positive contributions ``w_ij x_j > 0`` count (``w+`` on ``x+`` and ``w-``
  on ``x-``, no bias); relevances are non-negative and conserved up to ``eps``.

``zplus`` applies to Linear and Conv layers; BatchNorm (eval), pooling and means use the
epsilon rule (they are piecewise linear in ``x``); ReLU, dropout and reshapes pass
relevance through. Any other operation (residual adds, attention, ...) is a ConfigError
naming the node, raised before any relevance is computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..criteria import LayerContext, LayerResult, Solver, register_solver
from ..errors import ConfigError, TargetError
from .driver import Statistic, register_statistic

__all__ = ["RULES", "Relevance", "relevance", "LRP", "ModelInputs", "check_lrp_model"]

log = logging.getLogger(__name__)

RULES = ("epsilon", "zplus")
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_PASS_MODULES = (nn.ReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_LINEAR_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    torch.mean, torch.sum,
}
_PASS_FUNCTIONS = {F.relu, torch.relu, F.dropout}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_LINEAR_METHODS = {"mean", "sum"}
_PASS_METHODS = {"relu", "contiguous", "float", "clone"}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose"}
_SHAPE_QUERIES = {"size", "dim"}


@dataclass
class Relevance:
    """Relevances of one explanation pass over a set of samples.

    ``weights``: per Linear/Conv weight (parameter name -> weight-shaped tensor), summed over
    the samples. ``outputs``: the explained output per sample. ``inputs``: relevance of the
    model input, per sample. ``totals``: per relevant layer (fx node name), the relevance of its
    input per sample, summed over the input's elements (conservation checks).
    """

    weights: dict[str, torch.Tensor]
    outputs: torch.Tensor
    inputs: torch.Tensor
    totals: dict[str, torch.Tensor] = field(default_factory=dict)


def _trace(model: nn.Module):
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the message says what failed
        raise ConfigError(f"LRP follows a torch.fx trace, and {type(model).__name__} does not trace: "
                          f"{type(exc).__name__}: {exc}") from None


def _kind(node, modules: dict[str, nn.Module]) -> str:
    """How relevance crosses ``node``: weighted, linear, pass, reshape, input, output, ignore."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "ignore"
    if node.op == "call_module":
        m = modules[node.target]
        for kinds, name in ((_WEIGHTED, "weighted"), (_LINEAR_MODULES, "linear"), (_PASS_MODULES, "pass"),
                            (_RESHAPE_MODULES, "reshape")):
            if isinstance(m, kinds):
                if name == "weighted" and isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1:
                    break
                return name
        what = f"module '{node.target}' ({type(m).__name__})"
    elif node.op == "call_function":
        for funcs, name in ((_LINEAR_FUNCTIONS, "linear"), (_PASS_FUNCTIONS, "pass"),
                            (_RESHAPE_FUNCTIONS, "reshape")):
            if node.target in funcs:
                return name
        what = f"function {getattr(node.target, '__name__', node.target)} at node '{node.name}'"
    else:  # call_method
        for methods, name in ((_LINEAR_METHODS, "linear"), (_PASS_METHODS, "pass"), (_RESHAPE_METHODS, "reshape"),
                              (_SHAPE_QUERIES, "ignore")):
            if node.target in methods:
                return name
        what = f"method .{node.target}() at node '{node.name}'"
    raise ConfigError(f"LRP cannot propagate relevance through {what}; supported: Linear, Conv (groups=1), "
                      "BatchNorm, pooling, mean/sum, ReLU, dropout, flatten/reshape")


def _tensor_inputs(node) -> list:
    import torch.fx

    nodes = [a for a in node.args if isinstance(a, torch.fx.Node)]
    nodes += [a for a in node.kwargs.values() if isinstance(a, torch.fx.Node)]
    return nodes


def check_lrp_model(model: nn.Module):
    """The traced model after checking every node can carry relevance (ConfigError naming the first
    that cannot). Nodes that only compute shapes (``x.size(0)``) are allowed."""
    gm = _trace(model)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        kind = _kind(node, modules)
        if kind in ("weighted", "linear", "pass", "reshape"):
            tensors = [a for a in _tensor_inputs(node) if _kind(a, modules) != "ignore"]
            if len(tensors) > 1 and kind != "reshape":
                raise ConfigError(f"LRP cannot propagate relevance through node '{node.name}': it combines "
                                  f"{len(tensors)} tensors (residual adds and concatenations are not supported)")
    return gm


def _call(node, modules, env: dict, x: torch.Tensor) -> torch.Tensor:
    """Run ``node`` again with its first tensor argument replaced by ``x``."""
    first = _tensor_inputs(node)[0]

    def swap(a):
        if a is first:
            return x
        return env[a] if hasattr(a, "op") else a

    args = tuple(swap(a) for a in node.args)
    kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _weighted_fn(m: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    if isinstance(m, nn.Linear):
        return F.linear
    return m._conv_forward  # type: ignore[operator]


def _weighted(m: nn.Module, x: torch.Tensor, rel: torch.Tensor, rule: str, eps: float):
    """(input relevance, weight relevance) of a Linear/Conv layer."""
    fn = _weighted_fn(m)
    w = m.weight.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if rule == "epsilon":
            xl = x.detach().clone().requires_grad_(True)
            z = fn(xl, w, None if m.bias is None else m.bias.detach())
            s = rel / _stabilise(z.detach(), eps)
            gx, gw = torch.autograd.grad(z, (xl, w), s)
            return xl.detach() * gx, w.detach() * gw
        xp = x.detach().clamp(min=0).requires_grad_(True)
        xn = x.detach().clamp(max=0).requires_grad_(True)
        z = fn(xp, w.clamp(min=0), None) + fn(xn, w.clamp(max=0), None)
        s = rel / (z.detach() + eps)
        gp, gn, gw = torch.autograd.grad(z, (xp, xn, w), s)
        return xp.detach() * gp + xn.detach() * gn, w.detach() * gw


def _linear(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rel: torch.Tensor, eps: float):
    with torch.enable_grad():
        xl = x.detach().clone().requires_grad_(True)
        z = fn(xl)
        s = rel / _stabilise(z.detach(), eps)
        (g,) = torch.autograd.grad(z, xl, s)
    return xl.detach() * g


def _reshape(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rel: torch.Tensor):
    with torch.enable_grad():
        xl = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xl), xl, rel)
    return g


def _explain(gm, modules, x: torch.Tensor, target: torch.Tensor | None, rule: str, eps: float):
    import torch.fx

    env: dict[Any, Any] = {}

    class _Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            env[n] = out
            return out

    with torch.no_grad():
        _Record(gm).run(x)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    logits_node = out_node.args[0]
    logits = env[logits_node]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ConfigError("LRP explains a model whose output is one [batch, classes] tensor")
    cls = logits.argmax(1) if target is None else target.to(logits.device)
    explained = logits.gather(1, cls[:, None])[:, 0]
    rels: dict[Any, torch.Tensor] = {logits_node: torch.zeros_like(logits).scatter_(1, cls[:, None], explained[:, None])}
    weights: dict[str, torch.Tensor] = {}
    totals: dict[str, torch.Tensor] = {}
    inputs = None
    for node in reversed(list(gm.graph.nodes)):
        if node not in rels:
            continue
        rel = rels.pop(node)
        kind = _kind(node, modules)
        if kind == "input":
            inputs = rel
            continue
        if kind in ("ignore", "output"):
            continue
        src = _tensor_inputs(node)[0]
        xin = env[src]
        if kind == "weighted":
            m = modules[node.target]
            rin, rw = _weighted(m, xin, rel, rule, eps)
            weights[f"{node.target}.weight"] = rw
        elif kind == "linear":
            rin = _linear(lambda t, node=node: _call(node, modules, env, t), xin, rel, eps)
        elif kind == "pass":
            rin = rel
        else:
            rin = _reshape(lambda t, node=node: _call(node, modules, env, t), xin, rel)
        if kind in ("weighted", "linear"):
            totals[node.name] = rin.flatten(1).sum(1)
        rels[src] = rels[src] + rin if src in rels else rin
    if inputs is None:
        raise ConfigError("LRP found no path from the output back to the model input")
    return weights, explained, inputs, totals


def relevance(model: nn.Module, inputs: torch.Tensor, *, rule: str = "epsilon", epsilon: float = 1e-6,
              target: torch.Tensor | None = None, batch_size: int = 64) -> Relevance:
    """Relevances of ``model`` explaining ``inputs`` (batch on dim 0).

    ``target``: the class explained per sample (default: the predicted one). The model runs in
    eval mode (restored afterwards); parameters and gradients are not changed.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown LRP rule '{rule}'; known: {', '.join(RULES)}")
    if not epsilon >= 0:
        raise ConfigError(f"LRP epsilon must be >= 0, got {epsilon}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] < 1:
        raise ConfigError("LRP needs a non-empty batch of model inputs (a tensor, batch on dim 0)")
    if not inputs.dtype.is_floating_point:
        raise ConfigError(f"LRP needs real-valued model inputs, got {inputs.dtype}")
    if target is not None and (target.shape[:1] != inputs.shape[:1]):
        raise ConfigError(f"LRP target has {target.shape[0]} labels for {inputs.shape[0]} samples")
    gm = check_lrp_model(model)
    modules = dict(gm.named_modules())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        parts = []
        for start in range(0, inputs.shape[0], batch_size):
            tgt = None if target is None else target[start:start + batch_size]
            parts.append(_explain(gm, modules, inputs[start:start + batch_size], tgt, rule, epsilon))
    finally:
        for m, mode in modes.items():
            m.training = mode
    weights = {k: sum(p[0][k] for p in parts) for k in parts[0][0]}
    return Relevance(
        weights=weights,
        outputs=torch.cat([p[1] for p in parts]),
        inputs=torch.cat([p[2] for p in parts]),
        totals={k: torch.cat([p[3][k] for p in parts]) for k in parts[0][3]},
    )


# -- prune_ integration -------------------------------------------------------------------------
class ModelInputs:
    """The model and its calibration inputs, shared by every layer of one ``prune_`` call, so a
    whole-model statistic (relevance) is computed once and read per layer."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, batch_size: int):
        self.model, self.inputs, self.batch_size = model, inputs, batch_size
        self._cache: dict[tuple, Relevance] = {}

    def relevance(self, rule: str, epsilon: float) -> Relevance:
        key = (rule, epsilon)
        if key not in self._cache:
            self._cache[key] = relevance(self.model, self.inputs, rule=rule, epsilon=epsilon,
                                         batch_size=self.batch_size)
        return self._cache[key]


def _model_inputs(model, targets, calibration, batch_size) -> dict[str, ModelInputs]:
    shared = ModelInputs(model, calibration, batch_size)
    return {t.name: shared for t in targets}


register_statistic(Statistic("model_inputs", "model", "model_inputs", _model_inputs, inputs="any"))


@dataclass(frozen=True)
class LRPOptions:
    rule: str = "epsilon"
    epsilon: float = 1e-6

    def check(self):
        if self.rule not in RULES:
            raise ConfigError(f"method 'lrp' option rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.epsilon < 0:
            raise ConfigError(f"method 'lrp' option epsilon must be >= 0, got {self.epsilon}")


@register_solver
class LRP(Solver):
    """Weight relevance (summed over the calibration samples) as the importance score.

    Calibration is a batch of model inputs (images, signals); each sample explains its
    predicted class. Scores of different layers compare (each layer's relevance sums to the
    explained output), so global allocation works.
    """

    name = "lrp"
    requires = ("model_inputs",)
    Options = LRPOptions
    globally_comparable = True

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        rel = ctx.stats["model_inputs"].relevance(self.options.rule, self.options.epsilon)
        if ctx.name not in rel.weights:
            raise TargetError(f"layer '{ctx.name}': LRP relevance does not reach it (not a Linear/Conv "
                              "on the path from the input to the output)")
        return rel.weights[ctx.name].float()

    def solve(self, ctx, pattern, sparsity) -> LayerResult:
        return LayerResult(pattern.keep_mask(self.scores(ctx), sparsity, layer=ctx.name))
