"""Quantised weights: int8 / int4 group quantisation, group sparsity (GQSA), their layers.

* :mod:`.grid`: the grids (symmetric, asymmetric), codes, int4 packing: pure tensor math.
* :mod:`.tensor`: :class:`QuantizedWeight`, one weight in the layout the kernels read.
* :mod:`.rtn`: round to nearest.
* :mod:`.modules`: :class:`QuantLinear` / :class:`QuantEmbedding` and :func:`quant_linear`,
  the one dispatch point of the quantised kernels.
* :mod:`.convert`: swapping layers, quantising the token embedding, the checkpoint record.
* :mod:`.tuning`: block reconstruction of the grids (scales, offsets) with codes and masks fixed.

The error-compensating solver (GPTQ, and SparseGPT with ``quantize=``) is the SparseGPT
column sweep in :mod:`sparsecraft.oneshot.sparsegpt`; the methods ``gptq`` and ``rtn`` are
registered in :mod:`sparsecraft.oneshot.gptq`; ``sparsecraft.quantize_`` runs them.
"""

from .convert import quantize_embeddings_, quantized_modules, swap_linear_
from .grid import QuantSpec, dequantize_codes, fit_grid, pack_int4, quantize_codes, unpack_int4
from .modules import QuantEmbedding, QuantLinear, quant_linear, register_quant_kernel
from .rtn import rtn_quantize
from .tensor import SPARSE_GROUPS, QuantizedWeight

__all__ = [
    "QuantSpec", "QuantizedWeight", "QuantLinear", "QuantEmbedding", "quant_linear", "register_quant_kernel",
    "rtn_quantize", "fit_grid", "quantize_codes", "dequantize_codes", "pack_int4", "unpack_int4",
    "quantize_embeddings_", "quantized_modules", "swap_linear_", "SPARSE_GROUPS",
]
