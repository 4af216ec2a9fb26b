"""The planner: measure each sparse layer's kernels on its real input shapes, keep the fastest.

``compile_(model, example_input, *more_inputs)``

1. refuses a model that still has an open :class:`~sparsecraft.SparsityState` (masks and
   hooks would fight a swapped module: finalize first) or that is already compiled;
2. picks the candidate layers: ``nn.Linear`` modules whose weight is at least
   ``min_sparsity`` zeros (default 0.5: below that no kernel here beats dense);
3. runs each example input through the model once, with hooks recording the input shape
   every candidate sees (a layer never called is left alone); a forward pass that fails is
   reported with the module where it failed and what that module expects;
4. per layer and per distinct input size (rows = tokens after flattening batch and
   sequence), times ``dense`` and every available sparse kernel on an input of that shape,
   after checking each kernel's output against dense; the fastest wins, but a sparse kernel
   must beat dense by ``margin`` (5%) on the median, otherwise the layer stays dense;
5. only then swaps winners for :class:`~sparsecraft.runtime.SparseLinear` modules.

Any error before step 5 leaves the model exactly as it was. Pass several example inputs
to plan for several regimes, e.g. a prompt and a single decoded token: the layer then uses
the kernel measured for the nearest input size.

The timer is injectable (``timer=``): a function taking ``{kernel: fn}`` plus the keywords
``layer`` and ``rows``, returning ``{kernel: seconds}``. Timings come from isolated layer
calls on warm caches; inside a large model the weights of a layer are usually cold, which
favours the kernels that read fewer bytes, so the plan errs towards dense.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, SparsecraftError
from ..masks import has_open_state
from .kernels import KERNELS, KernelUnavailable, get_kernel
from .modules import SparseLinear
from .timing import interleaved_medians

__all__ = ["compile_", "decompile_", "apply_plan_", "CompileReport", "LayerPlan", "describe_input"]

log = logging.getLogger(__name__)

Timer = Callable[..., dict[str, float]]


@dataclass
class LayerPlan:
    """What was measured for one layer at one input size, and what was chosen."""

    layer: str
    shape: tuple[int, int]  # weight (out_features, in_features)
    rows: int  # input rows: tokens after flattening batch and sequence
    input_shape: tuple[int, ...]
    sparsity: float
    times: dict[str, float]  # kernel -> median seconds
    chosen: str
    rejected: dict[str, str] = field(default_factory=dict)  # kernel -> why it was not timed

    @property
    def predicted_speedup(self) -> float:
        """The ideal: 1 / density (only the non-zeros cost anything)."""
        density = 1.0 - self.sparsity
        return math.inf if density == 0 else 1.0 / density

    @property
    def measured_speedup(self) -> float:
        return self.times["dense"] / self.times[self.chosen]

    @property
    def best_sparse(self) -> str | None:
        sparse = {k: t for k, t in self.times.items() if k != "dense"}
        return min(sparse, key=sparse.get) if sparse else None


@dataclass
class CompileReport:
    layers: list[LayerPlan]
    skipped: dict[str, str]  # layer -> why it was not considered
    margin: float
    threads: int
    extension: str

    def plan(self) -> dict[str, dict[int, str]]:
        """layer -> {rows: kernel}, for layers where some input size chose a sparse kernel."""
        out: dict[str, dict[int, str]] = {}
        for p in self.layers:
            out.setdefault(p.layer, {})[p.rows] = p.chosen
        return {name: rows for name, rows in out.items() if any(k != "dense" for k in rows.values())}

    def totals(self) -> dict[int, dict[str, float]]:
        """Per input size: summed dense and chosen seconds over the candidate layers."""
        out: dict[int, dict[str, float]] = {}
        for p in self.layers:
            t = out.setdefault(p.rows, {"dense": 0.0, "chosen": 0.0, "layers": 0})
            t["dense"] += p.times["dense"]
            t["chosen"] += p.times[p.chosen]
            t["layers"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for p in self.layers:
            d = asdict(p)
            d["predicted_speedup"] = p.predicted_speedup
            d["measured_speedup"] = p.measured_speedup
            layers.append(d)
        return {"layers": layers, "skipped": self.skipped, "margin": self.margin,
                "threads": self.threads, "extension": self.extension,
                "plan": {k: {str(r): n for r, n in v.items()} for k, v in self.plan().items()}}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def __str__(self) -> str:
        head = ["layer", "shape", "rows", "sparsity", "ideal", "dense ms", "best sparse", "sparse ms", "chosen", "speed-up"]
        rows = []
        for p in self.layers:
            best = p.best_sparse
            rows.append([
                p.layer, "x".join(map(str, p.shape)), str(p.rows), f"{p.sparsity:.3f}",
                f"{p.predicted_speedup:.1f}x", f"{p.times['dense'] * 1e3:.3f}", best or "-",
                f"{p.times[best] * 1e3:.3f}" if best else "-", p.chosen, f"{p.measured_speedup:.2f}x",
            ])
        lines = []
        if rows:
            widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
            fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        for rows_, t in sorted(self.totals().items()):
            lines.append(f"{rows_} rows: {t['layers']} layers, dense {t['dense'] * 1e3:.2f} ms -> chosen "
                         f"{t['chosen'] * 1e3:.2f} ms ({t['dense'] / t['chosen']:.2f}x on these layers)")
        lines.append(f"{len(self.plan())} layers compiled; {len(self.skipped)} linear layers not considered; "
                     f"margin {self.margin:.0%}; torch threads {self.threads}; compiled kernels: {self.extension}")
        return "\n".join(lines)


# -- inputs and the capture pass -------------------------------------------------------
def describe_input(example: Any) -> str:
    """Short description of an example input: shapes and dtypes, never values."""
    if isinstance(example, torch.Tensor):
        return f"tensor {tuple(example.shape)} {str(example.dtype).replace('torch.', '')}"
    if isinstance(example, dict):
        return "{" + ", ".join(f"{k}: {describe_input(v)}" for k, v in example.items()) + "}"
    if isinstance(example, (tuple, list)):
        return "(" + ", ".join(describe_input(v) for v in example) + ")"
    return type(example).__name__


def _call(model: nn.Module, example: Any):
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def _expects(module: nn.Module) -> str:
    """What a module expects of its input, from its attributes."""
    for attr, what in (("in_features", "inputs whose last dimension is {}"),
                       ("in_channels", "inputs with {} channels"),
                       ("num_embeddings", "integer indices below {}"),
                       ("normalized_shape", "inputs ending in shape {}")):
        value = getattr(module, attr, None)
        if value is not None:
            return what.format(tuple(value) if isinstance(value, (tuple, list)) else value)
    return f"the inputs {type(module).__name__}.forward takes"


def run_with_location(model: nn.Module, example: Any, what: str = "example input") -> Any:
    """Run ``model`` on ``example``; a failure becomes a SparsecraftError naming the module
    that failed (the innermost one running when it happened) and what that module expects."""
    stack: list[str] = []
    failed: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(module, _args):
        stack.append(names.get(module, type(module).__name__))

    def post(module, _args, _out):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    try:
        try:
            return _call(model, example)
        except Exception as exc:
            failed = list(stack)
            where = failed[-1] if failed else None
            module = dict(model.named_modules()).get(where) if where is not None else None
            place = (f" in module '{where or '(model)'}' ({type(module).__name__}, which expects "
                     f"{_expects(module)})") if module is not None else ""
            raise SparsecraftError(
                f"{what} {describe_input(example)} does not fit the model: forward failed{place}: "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            ) from exc
    finally:
        for h in handles:
            h.remove()


def _capture_rows(model: nn.Module, layers: dict[str, nn.Linear], examples: list) -> dict[str, dict[int, tuple]]:
    """layer -> {rows: input shape} over one forward pass of each example."""
    seen: dict[str, dict[int, tuple]] = {name: {} for name in layers}

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            rows = x.numel() // x.shape[-1] if x.dim() else 1
            seen[name].setdefault(rows, tuple(x.shape))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, example in enumerate(examples):
                what = "example input" if len(examples) == 1 else f"example input {i + 1}"
                run_with_location(model, example, what)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


# -- measuring one layer -----------------------------------------------------------------
def _close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    if y.shape != ref.shape or not torch.isfinite(y).all():
        return False
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2
    return float((y.float() - ref.float()).norm()) <= tol * float(ref.float().norm()) + 1e-6


def _measure_layer(name: str, linear: nn.Linear, rows_shapes: dict[int, tuple], kernels: list[str],
                   timer: Timer, margin: float, sparsity: float, generator: torch.Generator) -> list[LayerPlan]:
    weight, bias = linear.weight.detach(), linear.bias
    out_f, in_f = weight.shape
    packed: dict[str, dict] = {}
    rejected: dict[str, str] = {}
    for k in kernels:
        try:
            packed[k] = get_kernel(k).pack(weight)
        except (KernelUnavailable, RuntimeError, NotImplementedError) as exc:
            rejected[k] = str(exc).split("\n")[0][:200]
    plans = []
    for rows, shape in sorted(rows_shapes.items()):
        x = torch.randn(rows, in_f, generator=generator).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            ref = F.linear(x, weight, bias)
            fns, why_not = {}, dict(rejected)
            for k, p in packed.items():
                kernel = get_kernel(k)
                try:
                    ok = _close(kernel.run(p, x, bias, out_f), ref)
                except (RuntimeError, NotImplementedError) as exc:
                    why_not[k] = str(exc).split("\n")[0][:200]
                    continue
                if not ok:
                    log.warning("layer %s: kernel %s disagrees with dense at %d rows; not used", name, k, rows)
                    why_not[k] = "output differs from dense"
                    continue
                fns[k] = (lambda kernel=kernel, p=p: kernel.run(p, x, bias, out_f))
            times = timer(fns, layer=name, rows=rows)
        missing = set(fns) - set(times)
        if missing:
            raise SparsecraftError(f"the timer returned no time for {sorted(missing)}")
        best = min(times, key=times.get)
        chosen = best if best == "dense" or times[best] <= (1.0 - margin) * times["dense"] else "dense"
        plans.append(LayerPlan(name, (out_f, in_f), rows, shape, sparsity, dict(times), chosen, why_not))
    return plans


# -- the public functions ----------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_kernels(kernels) -> list[str]:
    names = list(KERNELS) if kernels is None else list(kernels)
    for k in names:
        get_kernel(k)  # raises ConfigError for an unknown name
    if "dense" not in names:
        names.insert(0, "dense")
    return names


def compile_(
    model: nn.Module,
    example_input: Any,
    *more_inputs: Any,
    kernels: list[str] | None = None,
    timer: Timer | None = None,
    margin: float = 0.05,
    min_sparsity: float = 0.5,
    repeats: int = 7,
    seed: int = 0,
) -> CompileReport:
    """Swap the sparse Linear layers of ``model`` for the fastest measured kernel, in place.

    ``example_input`` (and each of ``more_inputs``) is what the model is called with: a
    tensor, a tuple of positional arguments or a dict of keyword arguments. See the module
    docstring for the steps and rules; returns the :class:`CompileReport`.
    """
    if has_open_state(model):
        raise SparsecraftError(
            "the model has an open SparsityState (masks and hooks attached): finalize first "
            "(state.finalize_()), then compile"
        )
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise SparsecraftError("the model is already compiled; call decompile_(model) first")
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"margin must be in [0, 1), got {margin}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    names = _check_kernels(kernels)
    timer = timer or (lambda fns, **ctx: interleaved_medians(fns, repeats=repeats, **ctx))

    candidates: dict[str, nn.Linear] = {}
    sparsity: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight.detach()
        s = 1.0 - int(torch.count_nonzero(w)) / w.numel()
        if s == 0.0:
            continue  # dense layers are not sparse layers; the report lists only those with zeros
        if s < min_sparsity:
            skipped[name] = f"sparsity {s:.3f} below min_sparsity {min_sparsity}"
            continue
        candidates[name], sparsity[name] = module, s

    seen = _capture_rows(model, candidates, [example_input, *more_inputs])
    generator = torch.Generator().manual_seed(seed)
    plans: list[LayerPlan] = []
    for name, module in candidates.items():
        if not seen[name]:
            skipped[name] = "never called in the forward pass (its weight may be used directly)"
            continue
        plans += _measure_layer(name, module, seen[name], names, timer, margin, sparsity[name], generator)

    from .extension import extension_status

    report = CompileReport(plans, skipped, margin, torch.get_num_threads(), extension_status())
    apply_plan_(model, report.plan())  # the model changes only here
    log.info("compiled %d of %d sparse linear layers", len(report.plan()), len(candidates))
    return report


def apply_plan_(model: nn.Module, plan: dict[str, dict[int | str, str]]) -> list[str]:
    """Swap layers for :class:`SparseLinear` as ``plan`` says (``{layer: {rows: kernel}}``),
    without measuring: for a plan saved by ``sparsecraft compile --out``. A kernel that cannot
    run here (e.g. the compiled one without a compiler) falls back to dense for that entry,
    with a warning. Everything is packed before anything is swapped. Returns swapped names."""
    modules = dict(model.named_modules())
    built: dict[str, SparseLinear] = {}
    for name, entries in plan.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise SparsecraftError(f"plan names layer '{name}', which is not an nn.Linear of this model")
        entries = {int(r): k for r, k in entries.items()}
        for rows, k in list(entries.items()):
            try:
                get_kernel(k).pack(linear.weight.detach()[:1])  # cheap availability probe
            except KernelUnavailable as exc:
                log.warning("layer %s: kernel %s unavailable (%s); dense for %d rows", name, k, exc, rows)
                entries[rows] = "dense"
        if any(k != "dense" for k in entries.values()):
            built[name] = SparseLinear.from_linear(linear, entries)
    for name, module in built.items():
        _set_module(model, name, module)
    return list(built)


def decompile_(model: nn.Module) -> nn.Module:
    """Replace every :class:`SparseLinear` by an equal plain ``nn.Linear``; returns the model.
    Weights come back bit for bit, except that a stored -0.0 comes back as +0.0."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            _set_module(model, name, module.to_linear())
    return model
