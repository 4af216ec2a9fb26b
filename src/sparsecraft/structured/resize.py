"""Physically smaller tensors, and the shape record that lets a checkpoint rebuild them.

``cut(t, dim, keep)`` is the pure tensor step. ``resize_module_`` swaps a module's
parameters and buffers for new tensors and keeps its size attributes (``in_features``,
``out_channels``, ``num_features`` ...) true.

Every module that shrinking changes is recorded on the model in ``model.sparsecraft_shapes``:
``{module: {"tensors": {name: shape}, "attrs": {attribute: value}}}``. ``sparsecraft.save``
writes the record into the checkpoint header; ``sparsecraft.load`` builds the model as its
class and config describe it, calls :func:`apply_shapes_` to give the recorded modules their
recorded shapes (empty tensors), and only then loads the saved tensors into them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import FormatError
from ..shapes import SHAPES_ATTR, check_record

__all__ = ["SHAPES_ATTR", "cut", "resize_module_", "get_shapes", "record_module", "apply_shapes_"]

#: size attributes of common layers, derived from their tensors after a resize
_SIZE_ATTRS = {
    nn.Linear: lambda m: {"in_features": m.weight.shape[1], "out_features": m.weight.shape[0]},
    nn.modules.conv._ConvNd: lambda m: {"in_channels": m.weight.shape[1] * m.groups,
                                        "out_channels": m.weight.shape[0]},
    nn.modules.batchnorm._NormBase: lambda m: {"num_features": (m.weight if m.weight is not None
                                                                else m.running_mean).shape[0]},
}


def cut(t: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """The entries of ``t`` at indices ``keep`` along ``dim``, as a new contiguous tensor."""
    return t.detach().index_select(dim, keep.to(t.device)).contiguous()


def _size_attrs(module: nn.Module) -> dict[str, int]:
    for cls, fn in _SIZE_ATTRS.items():
        if isinstance(module, cls):
            return {k: int(v) for k, v in fn(module).items()}
    return {}


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise FormatError(f"module {type(module).__name__} has no parameter or buffer '{name}'")


def resize_module_(module: nn.Module, tensors: dict[str, torch.Tensor], attrs: dict[str, Any]) -> None:
    """Give ``module`` the new ``tensors`` and ``attrs``, then fix its size attributes."""
    for name, value in tensors.items():
        _set_tensor(module, name, value)
    for key, value in {**attrs, **_size_attrs(module)}.items():
        setattr(module, key, value)


def get_shapes(model: nn.Module) -> dict[str, dict]:
    """The model's shape record (empty if never shrunk)."""
    return getattr(model, SHAPES_ATTR, None) or {}


def record_module(model: nn.Module, name: str, attrs: dict[str, Any]) -> None:
    """Record the current shapes of module ``name``'s tensors plus ``attrs`` on the model."""
    module = model.get_submodule(name)
    shapes = dict(get_shapes(model))
    entry = shapes.get(name, {"tensors": {}, "attrs": {}})
    tensors = {**entry["tensors"]}
    for tname, t in list(module._parameters.items()) + list(module._buffers.items()):
        if t is not None:
            tensors[tname] = list(t.shape)
    shapes[name] = {"tensors": tensors, "attrs": {**entry["attrs"], **attrs, **_size_attrs(module)}}
    object.__setattr__(model, SHAPES_ATTR, shapes)


def apply_shapes_(model: nn.Module, record: dict[str, dict], stored=None) -> nn.Module:
    """Resize the recorded modules of a freshly built ``model`` (contents left empty).

    The record is checked completely before any module changes
    (:func:`sparsecraft.shapes.check_record`: known modules and attributes, shapes no larger
    than the module's and, given ``stored`` {tensor name: shape}, equal to the stored ones),
    so nothing is allocated from an unchecked shape. The tensors keep their dtype and
    device; the caller loads their values afterwards.
    """
    modules = check_record(model, record, stored)
    for name, entry in record.items():
        module = modules[name]
        tensors = {}
        for tname, shape in entry["tensors"].items():
            current = module._parameters.get(tname, module._buffers.get(tname))
            tensors[tname] = current if list(current.shape) == shape else torch.empty(
                shape, dtype=current.dtype, device=current.device)
        resize_module_(module, tensors, dict(entry.get("attrs") or {}))
    object.__setattr__(model, SHAPES_ATTR, {k: dict(v) for k, v in record.items()})
    return model
