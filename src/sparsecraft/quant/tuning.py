"""Block reconstruction of quantised layers: tune the grids, keep the codes and the masks.

GQSA's second stage: once a block's layers are pruned and quantised, the grids (scales, and
for asymmetric grids the offsets) are trained so that the block's output matches a target,
while every code and every mask stays as the solver chose it. Each quantised weight becomes,
for the duration, ``W = codes * s + o`` (zeros where pruned) with

* ``s = s0 * exp(a)``: a trainable log-factor ``a`` per group (0 at the start), so Adam's
  steps are relative changes of the scale whatever its size;
* ``o = -zero * s`` for symmetric grids (zero stays exactly representable), else
  ``o = o0 + b * s0``: a trainable shift ``b`` in steps of the starting scale.

:func:`grid_parameters` installs this as a ``torch.nn.utils.parametrize`` parametrisation and
yields the names of the new parameters (for :func:`~sparsecraft.oneshot.block_tuning.tune_block_`);
on leaving, the tuned grids are rounded to float16, the layer's ``QuantizedWeight`` is
replaced and the weight is written back as exactly its dequantised values (the parameter
object is the same). If the body raises, the weights are left as they were.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .grid import check_fp16
from .tensor import QuantizedWeight

__all__ = ["grid_parameters", "GridParametrization"]


class GridParametrization(nn.Module):
    """``weight = codes * s + o`` with trainable grids (see the module docstring)."""

    def __init__(self, qweight: QuantizedWeight):
        super().__init__()
        self.qweight = qweight
        spec = qweight.spec
        out, cols = qweight.shape
        keep = qweight.keep_mask()
        codes = torch.full((out, cols), spec.zero, dtype=torch.float32, device=qweight.packed.device)
        if keep is None:
            codes.copy_(qweight.codes().float())
        else:
            codes[keep] = qweight.codes().float().reshape(-1)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("scale0", qweight.scale.float(), persistent=False)
        self.register_buffer("offset0", qweight.offset.float(), persistent=False)
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.shift = None if spec.symmetric else nn.Parameter(torch.zeros_like(self.scale0))

    def grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale0 * torch.exp(self.log_scale)
        if self.shift is None:
            return scale, -self.qweight.spec.zero * scale
        return scale, self.offset0 + self.shift * self.scale0

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        g = self.qweight.spec.group
        scale, offset = self.grids()
        w = self.codes * scale.repeat_interleave(g, dim=1) + offset.repeat_interleave(g, dim=1)
        if self.keep is not None:
            w = w * self.keep
        return w.to(original.dtype).reshape(original.shape)

    def result(self, layer: str) -> QuantizedWeight:
        """The tuned grids rounded to float16 (symmetric offsets exactly ``-zero * scale``)."""
        with torch.no_grad():
            scale, offset = self.grids()
            check_fp16(scale, "scale", layer)
            check_fp16(offset, "offset", layer)
            scale16 = scale.half()
            offset16 = (-self.qweight.spec.zero * scale16.float()).half() if self.shift is None else offset.half()
        return replace(self.qweight, scale=scale16, offset=offset16)


@contextlib.contextmanager
def grid_parameters(block: nn.Module, layers: dict) -> Iterator[dict[str, torch.Tensor]]:
    """Parametrise each quantised weight of ``block`` by its grids while the body runs.

    ``layers`` maps parameter names inside ``block`` (``"mlp.up_proj.weight"``) to objects
    with a ``quant`` attribute (a :class:`QuantizedWeight`), e.g. the block stages'
    ``BlockLayer``; their ``quant`` is replaced by the tuned one on success. Yields
    ``{trainable parameter name: all-True mask}``.
    """
    installed: dict[str, GridParametrization] = {}
    try:
        for name in layers:
            module_name, _, attr = name.rpartition(".")
            module = block.get_submodule(module_name) if module_name else block
            grid = GridParametrization(layers[name].quant)
            parametrize.register_parametrization(module, attr, grid, unsafe=True)
            installed[name] = grid
        params = dict(block.named_parameters())
        names = {id(p): n for n, p in params.items()}
        yield {names[id(p)]: torch.ones_like(p, dtype=torch.bool)
               for grid in installed.values() for p in grid.parameters()}
        results = {name: grid.result(name) for name, grid in installed.items()}
    except BaseException:
        for name in installed:
            module_name, _, attr = name.rpartition(".")
            parametrize.remove_parametrizations(block.get_submodule(module_name) if module_name else block, attr,
                                                leave_parametrized=False)
        raise
    for name, qweight in results.items():
        module_name, _, attr = name.rpartition(".")
        module = block.get_submodule(module_name) if module_name else block
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        weight = getattr(module, attr)
        with torch.no_grad():
            weight.copy_(qweight.dequantize().to(weight.dtype).reshape(weight.shape))
        layers[name].quant = qweight
