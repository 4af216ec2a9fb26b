"""What sparsity bought: per-target sparsity, bytes and FLOPs, with totals.

``report(model, input_shape=(1, 512))`` lists every target (the pruned parameters recorded on
the model, else the default targets): shape, pattern, nonzeros, sparsity, dense bytes,
compressed bytes under the encoding ``save`` would choose, and, when an input shape or
example input is given, dense and effective FLOPs measured by running one forward pass with
hooks. A FLOP is one multiply or one add, so a multiply-accumulate counts 2; effective FLOPs
count only nonzero weights (what an ideal sparse kernel would do). ``targets=`` (rules as in
:func:`sparsecraft.targets.select_targets`) counts exactly those parameters instead, e.g.
``targets={"include_head": True}`` for every Linear/Conv weight of two models compared
whole (a dense model and its Sparse-IFT version).

Quantised layers (:class:`~sparsecraft.quant.QuantLinear`, ``QuantEmbedding``) are rows too:
their stored bytes are the codes, grids and group mask ``save`` writes, their dense bytes the
weight they replaced; an output head sharing a quantised embedding's buffers is counted once
(with the embedding). The totals compare the whole model's stored bytes (rows plus the other
parameters) with the same parameters in float32 and in float16.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .masks import get_meta
from .quant.convert import quantized_modules
from .quant.modules import QuantEmbedding, QuantLinear
from .targets import select_targets

__all__ = ["report", "Report", "LayerReport"]

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    pattern: str
    numel: int
    nonzeros: int
    sparsity: float
    dtype: str
    encoding: str
    dense_bytes: int
    compressed_bytes: int
    dense_flops: int | None = None
    effective_flops: int | None = None


@dataclass
class Report:
    layers: list[LayerReport]
    input_shape: tuple[int, ...] | None = None
    other_params_bytes: int = 0
    other_params_numel: int = 0
    totals: dict = field(default_factory=dict)

    def __post_init__(self):
        self.totals = self._totals()

    def _totals(self) -> dict:
        numel = sum(l.numel for l in self.layers)
        nonzeros = sum(l.nonzeros for l in self.layers)
        out = {
            "targets": len(self.layers),
            "numel": numel,
            "nonzeros": nonzeros,
            "sparsity": 1.0 - nonzeros / numel if numel else 0.0,
            "dense_bytes": sum(l.dense_bytes for l in self.layers),
            "compressed_bytes": sum(l.compressed_bytes for l in self.layers),
            "other_params_bytes": self.other_params_bytes,
            "model_bytes": sum(l.compressed_bytes for l in self.layers) + self.other_params_bytes,
            "fp32_bytes": 4 * (numel + self.other_params_numel),
            "fp16_bytes": 2 * (numel + self.other_params_numel),
        }
        if self.layers and all(l.dense_flops is not None for l in self.layers):
            out["dense_flops"] = sum(l.dense_flops for l in self.layers)
            out["effective_flops"] = sum(l.effective_flops for l in self.layers)
        return out

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "layers": [asdict(l) | {"shape": list(l.shape)} for l in self.layers],
            "totals": self.totals,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def __str__(self) -> str:
        flops = "dense_flops" in self.totals
        head = ["layer", "shape", "pattern", "sparsity", "nonzeros", "dense", "stored", "enc"]
        if flops:
            head += ["GFLOPs", "eff. GFLOPs"]
        rows = []
        for l in self.layers:
            row = [
                l.name, "x".join(map(str, l.shape)), l.pattern, f"{l.sparsity:.4f}",
                f"{l.nonzeros:,}", _size(l.dense_bytes), _size(l.compressed_bytes), l.encoding,
            ]
            if flops:
                row += [f"{l.dense_flops / 1e9:.3f}", f"{l.effective_flops / 1e9:.3f}"]
            rows.append(row)
        t = self.totals
        total = [
            f"total ({t['targets']} targets)", "", "", f"{t['sparsity']:.4f}", f"{t['nonzeros']:,}",
            _size(t["dense_bytes"]), _size(t["compressed_bytes"]),
            f"{t['dense_bytes'] / max(t['compressed_bytes'], 1):.2f}x",
        ]
        if flops:
            total += [f"{t['dense_flops'] / 1e9:.3f}", f"{t['effective_flops'] / 1e9:.3f}"]
        rows.append(total)
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        out = [line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in rows[:-1]] + [line(["-" * w for w in widths]), line(rows[-1])]
        if self.input_shape:
            out.append(f"FLOPs for one forward pass on input shape {tuple(self.input_shape)}")
        out.append(f"other parameters (not targets): {_size(self.other_params_bytes)}")
        out.append(f"model: {_size(t['model_bytes'])} stored; {t['model_bytes'] / t['fp32_bytes']:.3f} of float32 "
                   f"({_size(t['fp32_bytes'])}), {t['model_bytes'] / t['fp16_bytes']:.3f} of float16 "
                   f"({_size(t['fp16_bytes'])})")
        return "\n".join(out)

    def plot(self, path: str | Path) -> Path:
        """Bar chart of per-layer sparsity, saved as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [l.name for l in self.layers]
        fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names) + 2), 4))
        ax.bar(range(len(names)), [l.sparsity for l in self.layers], color="#3a6ea5")
        ax.axhline(self.totals["sparsity"], color="#c03", lw=1, label=f"overall {self.totals['sparsity']:.3f}")
        ax.set_ylim(0, 1)
        ax.set_ylabel("sparsity")
        ax.set_xlabel("target (model order)")
        step = max(1, len(names) // 20)
        ax.set_xticks(range(0, len(names), step))
        ax.set_xticklabels([names[i] for i in range(0, len(names), step)], rotation=90, fontsize=6)
        ax.legend(loc="lower right")
        ax.set_title("per-layer sparsity")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _nm_hint(pattern: str) -> tuple[int, int] | None:
    parts = pattern.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _positions(model: nn.Module, modules: dict[str, nn.Module], example) -> dict[str, int]:
    """Output positions per module (tokens, pixels) seen in one forward pass."""
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name, module):
        def hook(_mod, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            channels = module.out_features if isinstance(module, QuantLinear) else module.weight.shape[0]
            counts[name] = counts.get(name, 0) + out.numel() // channels

        return hook

    for name, module in modules.items():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, QuantLinear)):
            handles.append(module.register_forward_hook(make_hook(name, module)))
    try:
        with torch.inference_mode():
            if isinstance(example, dict):
                model(**example)
            else:
                model(example)
    finally:
        for h in handles:
            h.remove()
    return counts


def _example_input(model: nn.Module, input_shape) -> torch.Tensor:
    device = next(model.parameters()).device
    getter = getattr(model, "get_input_embeddings", None)
    first = getter() if callable(getter) else next(
        (m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))), None
    )
    if isinstance(first, (nn.Embedding, QuantEmbedding)):  # the model reads token ids
        return torch.zeros(tuple(input_shape), dtype=torch.long, device=device)
    dtype = next(model.parameters()).dtype
    return torch.zeros(tuple(input_shape), dtype=dtype, device=device)


def report(model: nn.Module, input_shape=None, example_input=None, targets=None) -> Report:
    """Build a :class:`Report` for ``model`` (see the module docstring)."""
    from .formats import choose_encoding, encoded_nbytes

    meta = get_meta(model)
    params = dict(model.named_parameters())
    if targets is not None:
        chosen = select_targets(model, targets)
        names = [t.name for t in chosen]
        owner = {t.name: t.module for t in chosen}
    elif meta:
        names = [n for n in meta if n in params]
        modules = dict(model.named_modules())
        owner = {n: modules.get(n.rsplit(".", 1)[0] if "." in n else "") for n in names}
    else:
        targets = select_targets(model)
        names = [t.name for t in targets]
        owner = {t.name: t.module for t in targets}

    positions: dict[str, int] = {}
    if example_input is not None or input_shape is not None:
        example = example_input if example_input is not None else _example_input(model, input_shape)
        if input_shape is None and isinstance(example, torch.Tensor):
            input_shape = tuple(example.shape)
        by_module = {n: owner[n] for n in names if owner[n] is not None}
        by_module.update({f"{n}.weight": m for n, m in quantized_modules(model).items()})
        positions = _positions(model, by_module, example)

    layers = []
    for name in names:
        w = params[name].detach()
        nonzeros = int(torch.count_nonzero(w))
        pattern = meta.get(name, {}).get("pattern", "dense" if nonzeros == w.numel() else "unknown")
        encoding, opts = choose_encoding(w, nm_hint=_nm_hint(pattern))
        layer = LayerReport(
            name=name,
            shape=tuple(w.shape),
            pattern=pattern,
            numel=w.numel(),
            nonzeros=nonzeros,
            sparsity=1.0 - nonzeros / w.numel(),
            dtype=str(w.dtype).replace("torch.", ""),
            encoding=encoding if not opts.get("nm") else f"{encoding}{opts['nm'][0]}:{opts['nm'][1]}",
            dense_bytes=w.numel() * w.element_size(),
            compressed_bytes=encoded_nbytes(w, encoding, **opts),
        )
        if positions:
            p = positions.get(name, 0)
            layer.dense_flops = 2 * p * w.numel()
            layer.effective_flops = 2 * p * nonzeros
        layers.append(layer)
    layers += _quantized_rows(model, meta, positions)
    counted = set(names)
    seen: set[int] = set()
    other = other_numel = 0
    for n, p in params.items():
        if n not in counted and id(p) not in seen:
            other += p.numel() * p.element_size()
            other_numel += p.numel()
        seen.add(id(p))
    return Report(layers, tuple(input_shape) if input_shape else None, other, other_numel)


def _quantized_rows(model: nn.Module, meta: dict, positions: dict[str, int]) -> list[LayerReport]:
    """One row per quantised weight: modules sharing buffers (an embedding and its tied head)
    are one row, named after the first, with the matrix products of all of them."""
    shared: dict[int, list[str]] = {}
    modules = quantized_modules(model)
    for module_name, m in modules.items():
        shared.setdefault(m.packed.data_ptr(), []).append(module_name)
    rows = []
    for group in shared.values():
        m = modules[group[0]]
        q = m.quantized()
        name = f"{group[0]}.weight"
        numel = q.shape[0] * q.shape[1]
        # pruned weights (the solver's mask), not the kept ones that happen to round to 0
        sparsity = float(meta.get(name, {}).get("sparsity") or q.sparsity())
        nonzeros = numel - round(sparsity * numel)
        pattern = meta.get(name, {}).get("pattern", "dense") if sparsity else "dense"
        row = LayerReport(
            name=name, shape=tuple(q.shape), pattern=pattern, numel=numel,
            nonzeros=nonzeros, sparsity=1.0 - nonzeros / numel, dtype=q.spec.name, encoding=q.describe(),
            dense_bytes=numel * torch.empty((), dtype=m.dtype).element_size(), compressed_bytes=q.nbytes,
        )
        if positions:
            p = sum(positions.get(f"{n}.weight", 0) for n in group)
            row.dense_flops, row.effective_flops = 2 * p * numel, 2 * p * nonzeros
        rows.append(row)
    return rows
