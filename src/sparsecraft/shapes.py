"""The shape record of structurally shrunk models, and its validation.

A neutral home shared by :mod:`sparsecraft.structured.resize` (which writes the record) and
:mod:`sparsecraft.checkpoint` (which saves it and checks it on load), so neither imports the
other.

The record lives on the model as ``model.sparsecraft_shapes``::

    {module name: {"tensors": {tensor name: [shape]}, "attrs": {attribute: int}}}

A record read from a file decides which tensors get allocated and which attributes get
``setattr`` on modules, so :func:`check_record` accepts only

* module names the model has, tensor names those modules have, with the same rank;
* shapes of non-negative ints no larger than the freshly built module's (shrinking only
  shrinks), and equal to the stored tensor's shape when the file stores it;
* attribute names from :data:`SIZE_ATTRS` (the size attributes shrinking updates) with int
  values in ``0..MAX_SIZE``.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .errors import FormatError

__all__ = ["SHAPES_ATTR", "SIZE_ATTRS", "MAX_SIZE", "register_size_attr", "check_record"]

SHAPES_ATTR = "sparsecraft_shapes"

#: attributes shrinking may record: layer sizes (Linear, Conv, BatchNorm) and the head and
#: width counts that structured.groups keeps true on attention and MLP blocks
SIZE_ATTRS: set[str] = {
    "in_features", "out_features", "in_channels", "out_channels", "num_features",
    "num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim",
    "num_attention_heads", "all_head_size", "attention_head_size",
    "hidden_size", "intermediate_size",
}
#: no size attribute of a real layer comes near this; it keeps ints from a file sane
MAX_SIZE = 1 << 31


def register_size_attr(name: str) -> None:
    """Allow a further size attribute in shape records (for a custom shrink family)."""
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise FormatError(f"size attribute name {name!r} must be a public identifier")
    SIZE_ATTRS.add(name)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_record(model: nn.Module, record: Any,
                 stored: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, nn.Module]:
    """Validate a shape record against ``model`` (see the module docstring); returns the modules.

    ``stored`` maps full tensor names to the shapes a file stores; a recorded tensor the
    file stores must have exactly that shape. Nothing is changed.
    """
    if not isinstance(record, dict):
        raise FormatError("shape record: not a mapping of module name -> entry")
    modules = {}
    for name, entry in record.items():
        if not isinstance(name, str):
            raise FormatError(f"shape record: module name {name!r} is not a string")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"shape record names module '{name}', which the model does not have") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict) \
                or not isinstance(entry.get("attrs", {}), dict) or set(entry) - {"tensors", "attrs"}:
            raise FormatError(f"shape record of '{name}' is malformed "
                              "(needs a 'tensors' mapping and an optional 'attrs' mapping)")
        for tname, shape in entry["tensors"].items():
            full = f"{name}.{tname}" if name else str(tname)
            current = module._parameters.get(tname, module._buffers.get(tname)) if isinstance(tname, str) else None
            if current is None:
                raise FormatError(f"shape record: module '{name}' has no tensor '{tname}'")
            if not isinstance(shape, list) or len(shape) != current.dim() or not all(
                _is_int(s) and s >= 0 for s in shape
            ):
                raise FormatError(f"shape record: bad shape {shape!r} for '{full}' "
                                  f"(needs {current.dim()} non-negative ints)")
            if any(s > c for s, c in zip(shape, current.shape)):
                raise FormatError(f"shape record: '{full}' {shape} is larger than the model's "
                                  f"{list(current.shape)}; shrinking only makes tensors smaller")
            if stored is not None and full in stored and tuple(stored[full]) != tuple(shape):
                raise FormatError(f"shape record: '{full}' {shape} differs from the stored tensor's "
                                  f"shape {list(stored[full])}")
        for key, value in (entry.get("attrs") or {}).items():
            if key not in SIZE_ATTRS:
                raise FormatError(f"shape record of '{name}': attribute {key!r} is not a known size "
                                  f"attribute ({', '.join(sorted(SIZE_ATTRS))})")
            if not _is_int(value) or not 0 <= value <= MAX_SIZE:
                raise FormatError(f"shape record of '{name}': attribute {key!r} = {value!r} must be "
                                  f"an int in 0..{MAX_SIZE}")
        modules[name] = module
    return modules
