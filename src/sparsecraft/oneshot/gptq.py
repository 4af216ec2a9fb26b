"""Quantising methods: ``gptq`` (error-compensating, needs calibration) and ``rtn`` (round to
nearest, no data).

``gptq`` is the SparseGPT column sweep with every kept weight put on its group's grid
(:func:`~.sparsegpt.sparsegpt_prune` with ``quantize=``): the same method as ``sparsegpt``
with the option ``quantize``, except that it always quantises (``quantize`` defaults to
``int4``) and its typed config (``sparsecraft.GPTQ``) prunes nothing unless given a pattern
and a sparsity. With ``pattern="2:4"`` or ``"group:16"`` it prunes and quantises jointly
(GQSA: group sparsity with int4 grids). ``rtn`` fits each group's grid to its own weights
(:func:`~sparsecraft.quant.rtn_quantize`) and prunes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..criteria import LayerResult, Solver, register_solver
from ..errors import ConfigError
from ..patterns import Unstructured, reduction_view
from ..quant.options import QuantOptions, check_quant_layer
from ..quant.rtn import rtn_quantize
from .sparsegpt import SparseGPTSolver

__all__ = ["GPTQSolver", "RTNSolver"]


@register_solver
class GPTQSolver(SparseGPTSolver):
    """The ``gptq`` method (see the module docstring)."""

    name = "gptq"

    @dataclass(frozen=True)
    class Options(SparseGPTSolver.Options):
        quantize: str | None = "int4"
        act_order: bool = False  # columns by decreasing Hessian diagonal, static grids; no pruning

        def check(self):
            if self.quantize is None:
                raise ConfigError("gptq: quantize must be 'int4' or 'int8' (gptq always quantises)")
            self.check_sweep("gptq")

    def _sweep_options(self) -> dict:
        return {"act_order": self.options.act_order}

    def check_targets(self, layers, sparsity):
        if self.options.act_order and (sparsity or any(p.fixed_sparsity for _, p in layers)):
            raise ConfigError("gptq option act_order quantises only (sparsity 0, no pattern); prune first "
                              "or drop act_order")
        super().check_targets(layers, sparsity)


@register_solver
class RTNSolver(Solver):
    """The ``rtn`` method: round to nearest with the option ``quantize`` (default int4)."""

    name = "rtn"
    updates_weights = True
    patterns = (Unstructured,)

    @dataclass(frozen=True)
    class Options(QuantOptions):
        quantize: str | None = "int4"

        def check(self):
            if self.quantize is None:
                raise ConfigError("rtn: quantize must be 'int4' or 'int8' (rtn always quantises)")
            self.check_quant("rtn")

    def quantization(self):
        return self.options

    def check_targets(self, layers, sparsity):
        if sparsity:
            raise ConfigError(f"rtn quantises only (sparsity 0); got sparsity {sparsity}: prune first, or use "
                              f"gptq with a pattern and a sparsity to prune and quantise jointly")
        for t, pattern in layers:
            check_quant_layer(self.options.spec(), reduction_view(t.param).shape[1], pattern, False, t.name)

    def solve(self, ctx, pattern, sparsity):
        if sparsity:
            raise ConfigError(f"layer '{ctx.name}': rtn quantises only; got sparsity {sparsity}")
        weight = ctx.param.detach()
        qweight = rtn_quantize(reduction_view(weight), self.options.spec(), layer=ctx.name)
        keep = torch.ones_like(weight, dtype=torch.bool)
        new = qweight.dequantize().to(device=weight.device, dtype=weight.dtype).reshape(weight.shape)
        return LayerResult(keep, new, quant=qweight)
