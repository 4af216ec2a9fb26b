"""Activation sparsity for batch-1 decoding (the TEAL / WINA family), training-free.

Decoding one token multiplies each weight matrix by one vector: the time goes into reading
the weight. If most entries of the input ``x`` are skipped, only the weight columns of the
remaining ones need reading: ``W x ~= sum_{j active} x_j W[:, j]``.

* **Which entries** (per target Linear, per token): those whose score exceeds the layer's
  threshold. TEAL scores by magnitude, ``|x_j|``; WINA weighs it by the column norm of the
  weight, ``|x_j| * ||W[:, j]||_2``, i.e. by how much the entry can move the output.
* **Thresholds** are calibrated per layer from the empirical score distribution on
  calibration text: the ``sparsity`` quantile of a uniform sample of the layer's input
  scores, so that a fraction ``sparsity`` of entries is skipped on such text. One target for
  every layer (TEAL's greedy per-layer allocation is not implemented).
* **Decoding** (an input holding one token): only the active rows of ``W^T`` are read. The
  layer's weight is stored column-major for this (``W^T`` contiguous; same parameter, same
  values, same state dict), so an active input selects a contiguous row. The product is
  ``F.embedding_bag`` over those rows weighted by ``x_j`` (pure torch), or the compiled
  ``act_gemv`` when available, which also picks the active inputs itself.
* **Prefill and batches** (more than one token): ``prefill="dense"`` (default) computes the
  layer densely: it is compute-bound and skipping scattered inputs saves nothing there.
  ``prefill="masked"`` zeroes the inputs below threshold and computes densely: what every
  token would see if it were decoded, used to measure quality (perplexity).
* A threshold of 0 (``sparsity=0``) computes the layer exactly as ``nn.Linear`` does.
* Memory: none extra; the weight is only stored transposed. Not for training.

``remove()`` on the returned handle puts the original layers back, with their row-major
weights, bit for bit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, SparsecraftError
from ..targets import TargetSpec, select_targets
from .planner import run_with_location

__all__ = [
    "sparsify_activations_", "ActivationSparsity", "ActivationSparseLinear", "gather_decode",
    "masked_linear", "scores", "METHODS", "DECODE_KERNELS",
]

log = logging.getLogger(__name__)

METHODS = ("teal", "wina")
DECODE_KERNELS = ("auto", "cpp", "embag", "masked")
PREFILL_MODES = ("dense", "masked")


# -- pure tensor math --------------------------------------------------------------------
def scores(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Importance of each input entry: ``|x|`` (TEAL) or ``|x| * scale`` (WINA)."""
    s = x.abs()
    return s if scale is None else s * scale


def masked_linear(x, weight, bias, threshold: float, scale=None) -> torch.Tensor:
    """Reference: the layer with every input entry at or below threshold set to zero."""
    return F.linear(torch.where(scores(x, scale) > threshold, x, torch.zeros((), dtype=x.dtype)), weight, bias)


def gather_decode(x: torch.Tensor, wt: torch.Tensor, bias, threshold: float, scale=None) -> torch.Tensor:
    """One token: ``sum_{j: score_j > threshold} x_j * wt[j] (+ bias)`` reading only the
    active rows of ``wt`` (= ``W^T``, [in, out]); ``x`` is 1-D. Pure torch (embedding_bag)."""
    idx = torch.nonzero(scores(x, scale) > threshold).squeeze(1)
    y = F.embedding_bag(idx.unsqueeze(0), wt, per_sample_weights=x.index_select(0, idx).unsqueeze(0),
                        mode="sum").squeeze(0)
    return y if bias is None else y + bias


def wina_scale(weight: torch.Tensor) -> torch.Tensor:
    """WINA's column norms ``||W[:, j]||_2`` (float32)."""
    return weight.detach().float().norm(dim=0)


# -- the module ------------------------------------------------------------------------
class ActivationSparseLinear(nn.Module):
    """A Linear layer that skips small inputs when it decodes one token.

    It holds the very ``weight`` and ``bias`` parameters of the layer it replaces, so the
    state dict is unchanged; the weight's storage is column-major while this module is in
    place (``remove`` restores it).
    """

    def __init__(self, linear: nn.Linear, threshold: float, scale: torch.Tensor | None = None,
                 kernel: str = "embag", prefill: str = "dense"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.threshold = float(threshold)
        self.register_buffer("scale", scale, persistent=False)
        self.kernel, self.prefill = kernel, prefill
        self.track = False  # count skipped inputs (for measuring the reached sparsity)
        self.seen = self.skipped = 0

    @property
    def exact(self) -> bool:
        """Threshold 0 skips nothing that matters: the layer runs as nn.Linear, bit for bit.
        (A negative threshold keeps every input but still runs the gather kernel: a control
        that measures the kernel apart from the sparsity.)"""
        return self.threshold == 0.0

    def _count(self, x: torch.Tensor) -> None:
        s = scores(x, self.scale) > self.threshold
        self.seen += s.numel()
        self.skipped += s.numel() - int(s.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track:
            self._count(x)
        if self.exact:
            return F.linear(x, self.weight, self.bias)
        one_token = x.numel() == self.in_features
        if one_token and self.kernel in ("cpp", "embag"):
            x1 = x.reshape(-1)
            wt = self.weight.t()  # contiguous: the weight is stored column-major
            if not wt.is_contiguous():  # e.g. a weight assigned anew: restore the layout
                _column_major_(self.weight)
                wt = self.weight.t()
            if self.kernel == "cpp":
                y = _extension().act_gemv(x1.contiguous(), wt, self.scale, self.threshold, self.bias)
            else:
                y = gather_decode(x1, wt, self.bias, self.threshold, self.scale)
            return y.view(*x.shape[:-1], self.out_features)
        if one_token or self.prefill == "masked":
            return masked_linear(x, self.weight, self.bias, self.threshold, self.scale)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold:.4g}, scale={'wina' if self.scale is not None else 'none'}, "
                f"kernel={self.kernel}, prefill={self.prefill}")


_EXT: list = []


def _extension():
    """The compiled module (looked up once; decoding calls this per layer and token)."""
    if not _EXT:
        from .extension import get_extension

        ext = get_extension()
        if ext is None:
            raise SparsecraftError("the compiled kernels are unavailable; use kernel='embag'")
        _EXT.append(ext)
    return _EXT[0]


def _column_major_(param: nn.Parameter) -> None:
    """Store ``param`` ([out, in]) column-major, so ``param.t()`` is contiguous; same values."""
    with torch.no_grad():
        param.data = param.data.t().contiguous().t()


def _row_major_(param: nn.Parameter) -> None:
    with torch.no_grad():
        param.data = param.data.contiguous()


# -- calibration ------------------------------------------------------------------------
def _batches(tokens: torch.Tensor, batch_size: int):
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    tokens: torch.Tensor,
    sparsity: dict[str, float],
    scales: dict[str, torch.Tensor | None],
    *,
    batch_size: int = 4,
    max_samples: int = 2**17,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, int]]:
    """Per layer: the ``sparsity`` quantile of its input scores on ``tokens`` (a uniform sample
    of at most ``max_samples`` scores per layer), and the sample size it came from."""
    n_batches = math.ceil((tokens.shape[0] if tokens.dim() > 1 else 1) / batch_size)
    quota = max(1, max_samples // n_batches)
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook_for(name):
        def hook(_module, args):
            s = scores(args[0].detach().reshape(-1, layers[name].in_features).float(), scales[name]).reshape(-1)
            if s.numel() > quota:
                pick = torch.randint(0, s.numel(), (quota,), generator=generator).to(s.device)
                s = s.index_select(0, pick)
            samples[name].append(s.cpu())
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        device = next(model.parameters()).device
        for batch in _batches(tokens, batch_size):
            run_with_location(model, batch.to(device), "calibration tokens")
    finally:
        for h in handles:
            h.remove()
    thresholds, counts = {}, {}
    for name, parts in samples.items():
        if not parts:
            raise SparsecraftError(f"layer '{name}' was never called on the calibration tokens")
        s = torch.cat(parts)
        k = round(sparsity[name] * s.numel())
        thresholds[name] = 0.0 if k == 0 else float(torch.kthvalue(s, k).values)
        counts[name] = s.numel()
    return thresholds, counts


# -- the public entry point --------------------------------------------------------------
@dataclass
class LayerInfo:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    threshold: float
    samples: int


class ActivationSparsity:
    """Handle returned by :func:`sparsify_activations_`: inspect, measure, switch, remove."""

    def __init__(self, model: nn.Module, originals: dict[str, nn.Linear],
                 modules: dict[str, ActivationSparseLinear], info: list[LayerInfo], method: str):
        self.model, self.method = model, method
        self._originals, self.modules, self.info = originals, modules, info
        self.removed = False

    @property
    def kernel(self) -> str:
        return next(iter(self.modules.values())).kernel

    def set_mode(self, *, prefill: str | None = None, kernel: str | None = None) -> None:
        """Switch how many-token inputs (``prefill``) or one-token inputs (``kernel``) run."""
        if prefill is not None and prefill not in PREFILL_MODES:
            raise ConfigError(f"prefill must be one of {PREFILL_MODES}, got '{prefill}'")
        if kernel is not None:
            kernel = _resolve_kernel(kernel, self.model)
        for m in self.modules.values():
            m.prefill = prefill or m.prefill
            m.kernel = kernel or m.kernel

    @torch.no_grad()
    def measure_sparsity(self, tokens: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
        """Fraction of inputs skipped per layer on ``tokens`` (and ``"overall"``)."""
        for m in self.modules.values():
            m.track, m.seen, m.skipped = True, 0, 0
        try:
            device = next(self.model.parameters()).device
            for batch in _batches(tokens, batch_size):
                run_with_location(self.model, batch.to(device), "tokens")
        finally:
            for m in self.modules.values():
                m.track = False
        out = {n: m.skipped / m.seen for n, m in self.modules.items() if m.seen}
        seen = sum(m.seen for m in self.modules.values())
        out["overall"] = sum(m.skipped for m in self.modules.values()) / seen if seen else 0.0
        return out

    def remove(self) -> nn.Module:
        """Put the original Linear layers back (row-major weights); returns the model."""
        if self.removed:
            raise SparsecraftError("activation sparsity was already removed from this model")
        for name, linear in self._originals.items():
            _row_major_(linear.weight)
            _set_module(self.model, name, linear)
        self.removed = True
        return self.model

    def to_dict(self) -> dict:
        return {"method": self.method, "kernel": self.kernel, "layers": [asdict(i) for i in self.info]}

    def __str__(self) -> str:
        mean_t = sum(i.target_sparsity for i in self.info) / max(len(self.info), 1)
        return (f"activation sparsity ({self.method}, decode kernel {self.kernel}): {len(self.info)} layers, "
                f"target {mean_t:.2f}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _resolve_kernel(kernel: str, model: nn.Module) -> str:
    if kernel not in DECODE_KERNELS:
        raise ConfigError(f"decode kernel must be one of {DECODE_KERNELS}, got '{kernel}'")
    if kernel in ("auto", "cpp"):
        p = next(model.parameters())
        usable = p.dtype == torch.float32 and p.device.type == "cpu"
        from .extension import get_extension

        if usable and get_extension() is not None:
            return "cpp"
        if kernel == "cpp":
            raise ConfigError("decode kernel 'cpp' needs the compiled kernels and a float32 CPU model")
        log.info("activation sparsity decodes with the pure-torch kernel (embedding_bag)")
        return "embag"
    return kernel


def _sparsity_per_layer(names: list[str], sparsity) -> dict[str, float]:
    if isinstance(sparsity, dict):
        unknown = set(sparsity) - set(names)
        if unknown:
            raise ConfigError(f"sparsity given for layers that are not targets: {sorted(unknown)[:5]}")
        out = {n: float(sparsity.get(n, 0.0)) for n in names}
    else:
        out = {n: float(sparsity) for n in names}
    for n, s in out.items():
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"activation sparsity must be in [0, 1), got {s} for '{n}'")
    return out


def sparsify_activations_(
    model: nn.Module,
    calibration_tokens: torch.Tensor,
    sparsity: float | dict[str, float] = 0.5,
    method: str = "teal",
    *,
    targets: TargetSpec | dict | None = None,
    kernel: str = "auto",
    prefill: str = "dense",
    batch_size: int = 4,
    max_samples: int = 2**17,
    seed: int = 0,
) -> ActivationSparsity:
    """Make the inputs of ``model``'s Linear layers sparse when decoding, in place.

    ``targets`` chooses the layers with the rules of :mod:`sparsecraft.targets` (default:
    every ``nn.Linear`` except the output head). ``calibration_tokens`` ([samples, length]
    token ids) set each layer's threshold (see the module docstring). Everything is
    calibrated before any layer is swapped, so an error leaves the model as it was.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got '{method}'")
    if prefill not in PREFILL_MODES:
        raise ConfigError(f"prefill must be one of {PREFILL_MODES}, got '{prefill}'")
    if any(isinstance(m, ActivationSparseLinear) for m in model.modules()):
        raise SparsecraftError("the model already has activation sparsity; remove() it first")
    spec = targets if isinstance(targets, TargetSpec) else TargetSpec.from_dict(targets)
    spec = TargetSpec(spec.include, spec.exclude, ["Linear"], ["weight"], spec.include_head)
    layers = {t.module_name: t.module for t in select_targets(model, spec) if type(t.module) is nn.Linear}
    if not layers:
        raise SparsecraftError("no nn.Linear layer among the targets")
    per_layer = _sparsity_per_layer(list(layers), sparsity)
    kernel = _resolve_kernel(kernel, model)
    scales = {n: (wina_scale(m.weight).to(m.weight.device) if method == "wina" else None) for n, m in layers.items()}

    thresholds, counts = calibrate_thresholds(model, layers, calibration_tokens, per_layer, scales,
                                              batch_size=batch_size, max_samples=max_samples, seed=seed)
    modules, info = {}, []
    for name, linear in layers.items():
        scale = scales[name]
        if scale is not None:
            scale = scale.to(dtype=linear.weight.dtype)
        modules[name] = ActivationSparseLinear(linear, thresholds[name], scale, kernel, prefill)
        info.append(LayerInfo(name, (linear.out_features, linear.in_features), per_layer[name],
                              thresholds[name], counts[name]))
    for name, linear in layers.items():  # the model changes only here
        if not modules[name].exact:
            _column_major_(linear.weight)
        _set_module(model, name, modules[name])
    log.info("activation sparsity %s on %d layers, decode kernel %s", method, len(modules), kernel)
    return ActivationSparsity(model, layers, modules, info, method)
