"""Putting quantised layers into a model, and the record that lets a checkpoint rebuild them.

* :func:`swap_linear_` replaces one ``nn.Linear`` with a :class:`QuantLinear`.
* :func:`quantize_embeddings_` quantises the token embedding round-to-nearest (and the output
  head when it is tied to it: both then share one set of buffers).
* :func:`quant_record` describes every quantised module for ``sparsecraft.save``;
  :func:`check_quant_record` and :func:`apply_quant_record_` check it against a freshly built
  model and put empty quantised modules in place, so ``sparsecraft.load`` can fill them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from ..masks import META_ATTR, get_meta
from .grid import QuantSpec
from .modules import QuantEmbedding, QuantLinear, _QuantBase
from .rtn import rtn_quantize
from .tensor import SPARSE_GROUPS, QuantizedWeight

__all__ = ["swap_linear_", "quantize_embeddings_", "tied_head", "quant_record", "check_quant_record", "quant_expected",
           "apply_quant_record_",
           "record_meta", "quantized_modules", "embedding_problem", "RECORD_KEY"]

log = logging.getLogger(__name__)

#: the key of the record in a checkpoint's ``extra`` header
RECORD_KEY = "quant"
_META_KEYS = ("pattern", "sparsity", "method")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_modules(model: nn.Module) -> dict[str, _QuantBase]:
    """Every :class:`QuantLinear` and :class:`QuantEmbedding` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantBase)}


def swap_linear_(model: nn.Module, module_name: str, qweight: QuantizedWeight) -> QuantLinear:
    """Replace the ``nn.Linear`` called ``module_name`` by a :class:`QuantLinear` (same bias)."""
    linear = model.get_submodule(module_name)
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"layer '{module_name}': only Linear layers are quantised, got {type(linear).__name__}")
    device = linear.weight.device
    layer = QuantLinear(qweight.to(device), linear.bias, linear.weight.dtype)
    _set_module(model, module_name, layer)
    return layer


def _tied_head(model: nn.Module, embedding: nn.Module) -> str | None:
    """The name of the output head sharing ``embedding``'s weight, if there is one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Linear) and head.weight is embedding.weight:
        return next(n for n, m in model.named_modules() if m is head)
    return None


def embedding_problem(model: nn.Module, spec: QuantSpec) -> str | None:
    """Why the token embedding cannot be quantised with ``spec`` (None when it can)."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if not isinstance(emb, nn.Embedding):
        return "the model has no nn.Embedding token embedding"
    if emb.embedding_dim % spec.group:
        return f"quantisation group {spec.group} does not divide the embedding width {emb.embedding_dim}"
    return None


def tied_head(model: nn.Module) -> nn.Linear | None:
    """The output head sharing the token embedding's weight, if the model has one."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    name = _tied_head(model, emb) if isinstance(emb, nn.Embedding) else None
    return None if name is None else model.get_submodule(name)


def quantize_embeddings_(model: nn.Module, spec: QuantSpec, qweight: QuantizedWeight | None = None,
                         method: str = "rtn") -> list[str]:
    """Quantise the token embedding with ``spec`` (and the output head tied to it): round to
    nearest, or ``qweight`` when a solver computed it (``method`` names that solver in the
    metadata); returns the module names replaced. ConfigError when it cannot be done."""
    problem = embedding_problem(model, spec)
    if problem:
        raise ConfigError(f"cannot quantise the embeddings: {problem}")
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    head_name = _tied_head(model, emb)
    if qweight is None:
        qweight = rtn_quantize(emb.weight, spec, layer=f"{name}.weight")
        method = "rtn"
    elif tuple(qweight.shape) != tuple(emb.weight.shape) or qweight.spec != spec:
        raise ConfigError(f"layer '{name}': a quantised weight {tuple(qweight.shape)} ({qweight.spec}) does not fit "
                          f"the embedding {tuple(emb.weight.shape)} ({spec})")
    qemb = QuantEmbedding(qweight, emb.weight.dtype, emb.padding_idx)
    names = [name]
    head = None
    if head_name is not None:
        old = model.get_submodule(head_name)
        head = QuantLinear.tied_to(qemb, old.bias)
        names.append(head_name)
    _set_module(model, name, qemb)
    if head is not None:
        _set_module(model, head_name, head)
    meta = dict(get_meta(model))
    meta[f"{name}.weight"] = {"pattern": "dense", "sparsity": 0.0, "method": method, "quant": str(spec)}
    object.__setattr__(model, META_ATTR, meta)
    log.info("quantised the token embedding %s%s %s (%s)", name, f" and the tied head {head_name}" if head_name else "",
             "round-to-nearest" if method == "rtn" else f"with {method}", spec)
    return names


# ---- the checkpoint record -----------------------------------------------------------------

def quant_record(model: nn.Module) -> dict[str, dict]:
    """``{module name: record}`` for every quantised module (empty when there is none)."""
    meta = get_meta(model)
    mods = quantized_modules(model)
    first_owner: dict[int, str] = {}
    out: dict[str, dict] = {}
    for name, m in mods.items():
        entry = m.record()
        entry["kind"] = "embedding" if isinstance(m, QuantEmbedding) else "linear"
        if isinstance(m, QuantLinear):
            entry["bias"] = m.bias is not None
        owner = first_owner.setdefault(m.packed.data_ptr(), name)
        if owner != name:
            entry["tied_to"] = owner
        info = meta.get(f"{name}.weight", {})
        entry["meta"] = {k: info[k] for k in _META_KEYS if k in info and isinstance(info[k], (str, int, float))}
        out[name] = entry
    return out


def _field(ok: bool, file, name: str, what: str, value) -> None:
    if not ok:
        raise FormatError(f"'{file}': field quant.{name}.{what} = {value!r} is not valid")


def check_quant_record(model: nn.Module, record, file, expected: dict | None = None) -> None:
    """FormatError naming the file and the field when ``record`` does not fit ``model``
    (whose weights have the shapes ``expected`` gives, when a shape record resizes them)."""
    if not isinstance(record, dict):
        raise FormatError(f"'{file}': field 'quant' must map module names to records")
    modules = dict(model.named_modules())
    for name, entry in record.items():
        if not isinstance(entry, dict):
            raise FormatError(f"'{file}': field quant.{name} must be a mapping")
        kind = entry.get("kind")
        _field(kind in ("linear", "embedding"), file, name, "kind", kind)
        module = modules.get(name)
        want = nn.Linear if kind == "linear" else nn.Embedding
        if not isinstance(module, want):
            raise FormatError(f"'{file}': field quant.{name} names no {want.__name__} of the model")
        shape = entry.get("shape")
        real = (expected or {}).get(f"{name}.weight", (tuple(module.weight.shape),))[0]
        _field(isinstance(shape, list) and tuple(shape) == tuple(real), file, name, "shape", shape)
        try:
            spec = QuantSpec(entry.get("bits"), entry.get("group"), entry.get("symmetric"))
        except ConfigError as e:
            raise FormatError(f"'{file}': field quant.{name}: {e}") from None
        _field(real[1] % spec.group == 0, file, name, "group", spec.group)
        big, kept = entry.get("sparse_group"), entry.get("kept")
        if big is None:
            _field(kept is None, file, name, "kept", kept)
        else:
            _field(big in SPARSE_GROUPS and spec.group % big == 0 and kind == "linear", file, name, "sparse_group", big)
            _field(isinstance(kept, int) and not isinstance(kept, bool) and 0 <= kept <= real[1] // big,
                   file, name, "kept", kept)
        dtype = getattr(torch, str(entry.get("dtype")), None)
        _field(isinstance(dtype, torch.dtype) and dtype.is_floating_point, file, name, "dtype", entry.get("dtype"))
        if kind == "linear":
            _field(isinstance(entry.get("bias"), bool) and entry["bias"] == (module.bias is not None),
                   file, name, "bias", entry.get("bias"))
        tied = entry.get("tied_to")
        if tied is not None:
            src = record.get(tied)
            _field(isinstance(src, dict) and src.get("tied_to") is None and tied != name
                   and {k: src.get(k) for k in ("bits", "group", "symmetric", "shape")}
                   == {k: entry.get(k) for k in ("bits", "group", "symmetric", "shape")}
                   and big is None, file, name, "tied_to", tied)
        _field(isinstance(entry.get("meta", {}), dict), file, name, "meta", entry.get("meta"))


def quant_expected(model: nn.Module, record, expected: dict, file) -> dict:
    """``expected`` (state-dict name -> (shape, dtype)) with each recorded module's weight
    replaced by the tensors its quantised module holds; the record is checked first."""
    check_quant_record(model, record, file, expected)
    out = dict(expected)
    for name, entry in record.items():
        out.pop(f"{name}.weight", None)
        qweight = _empty(entry, "meta")
        tensors = {"packed": qweight.packed, "scale": qweight.scale, "offset": qweight.offset}
        if entry.get("sparse_group") is not None:
            out_f, cols = entry["shape"]
            tensors["group_mask"] = torch.empty((out_f * (cols // entry["sparse_group"]) + 7) // 8, dtype=torch.uint8,
                                                device="meta")
        for tname, t in tensors.items():
            out[f"{name}.{tname}"] = (tuple(t.shape), t.dtype)
    return out


def _empty(entry: dict, device) -> QuantizedWeight:
    spec = QuantSpec(entry["bits"], entry["group"], entry["symmetric"])
    out, cols = entry["shape"]
    big, kept = entry.get("sparse_group"), entry.get("kept")
    n = cols if big is None else kept * big
    packed = torch.zeros(out, n // 2 if spec.bits == 4 else n, dtype=torch.uint8, device=device)
    grid = torch.zeros(out, cols // spec.group, dtype=torch.float16, device=device)
    index = None if big is None else torch.zeros(out, kept, dtype=torch.int32, device=device)
    return QuantizedWeight(spec, (out, cols), packed, grid, grid.clone(), big, index)


def record_meta(record: dict) -> dict[str, dict]:
    """The sparsity records (``model.sparsecraft_meta`` entries) a quant record carries."""
    return {f"{name}.weight": {**entry["meta"], "quant": _describe(entry)}
            for name, entry in record.items() if entry.get("meta")}


def _describe(entry: dict) -> str:
    text = str(QuantSpec(entry["bits"], entry["group"], entry["symmetric"]))
    if entry.get("sparse_group") is not None:
        text += f" group:{entry['sparse_group']} ({entry['kept']} of {entry['shape'][1] // entry['sparse_group']} kept)"
    return text


def apply_quant_record_(model: nn.Module, record: dict) -> None:
    """Replace the modules ``record`` names with empty quantised ones of the same shapes (on
    the device of the module replaced, the meta device included), ready for a state dict."""
    built: dict[str, _QuantBase] = {}
    for name in sorted(record, key=lambda n: record[n].get("tied_to") is not None):  # sources first
        entry = record[name]
        old = model.get_submodule(name)
        device = old.weight.device
        dtype = getattr(torch, entry["dtype"])
        if entry["kind"] == "embedding":
            new: _QuantBase = QuantEmbedding(_empty(entry, device), dtype, old.padding_idx)
        else:
            bias = old.bias
            if entry.get("tied_to") is not None:
                new = QuantLinear.tied_to(built[entry["tied_to"]], bias)
            else:
                new = QuantLinear(_empty(entry, device), bias, dtype)
        built[name] = new
        _set_module(model, name, new)

