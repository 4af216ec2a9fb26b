"""``QuantLinear`` and ``QuantEmbedding``: layers holding a :class:`~.tensor.QuantizedWeight`.

Both keep the layout's tensors as buffers, so ``state_dict`` (and ``sparsecraft.save``)
store exactly what the kernels read: ``packed`` (uint8 codes), ``scale`` and ``offset``
(float16) and, for group sparsity, ``group_mask`` (one bit per group, packed); the group
index the kernels use is rebuilt from the bits (a buffer that is not saved).

**The kernel dispatch point is :func:`quant_linear`**: every quantised matrix product
(``QuantLinear.forward``, also the output head tied to a quantised embedding) goes through it.
Fast kernels plug in with :func:`register_quant_kernel`; the runtime's compiled kernels
(:func:`sparsecraft.runtime.qkernels.quant_kernel`: float32 on CPU, outside autograd) are
registered here. When every registered kernel declines it runs the pure-torch reference:
dequantise, then ``F.linear``.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError
from .grid import QuantSpec
from .tensor import QuantizedWeight

__all__ = ["QuantLinear", "QuantEmbedding", "quant_linear", "register_quant_kernel", "QUANT_KERNELS"]

log = logging.getLogger(__name__)

#: Fast paths, tried in order: ``kernel(x2d, qweight, bias) -> y2d``, or None to decline
#: (unsupported shape, dtype, device, missing extension). See :func:`quant_linear`.
QUANT_KERNELS: list[Callable[[torch.Tensor, QuantizedWeight, torch.Tensor | None], torch.Tensor | None]] = []


def register_quant_kernel(kernel: Callable) -> Callable:
    """Add a fast path to :func:`quant_linear` (tried before the ones registered earlier)."""
    QUANT_KERNELS.insert(0, kernel)
    return kernel


@register_quant_kernel
def _compiled_kernels(x2: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The runtime's compiled int8 / int4 / group-sparse kernels (imported on first use; they
    fall back to the reference themselves, logged once, when the extension cannot be built)."""
    from ..runtime.qkernels import quant_kernel

    return quant_kernel(x2, qweight, bias)


def quant_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a quantised ``W``: the single dispatch point of the kernels.

    ``x`` is ``[..., in]``; the registered kernels see it flattened to 2-D (rows = tokens). The
    reference (and the fallback) dequantises ``W`` (:meth:`QuantizedWeight.dequantize`) to
    ``x``'s dtype and calls ``F.linear``.
    """
    if QUANT_KERNELS:
        out, cols = qweight.shape
        x2 = x.reshape(-1, cols)
        for kernel in QUANT_KERNELS:
            y = kernel(x2, qweight, bias)
            if y is not None:
                return y.reshape(*x.shape[:-1], out)
    return F.linear(x, qweight.dequantize().to(x.dtype), bias)


def _group_index(bits: torch.Tensor, out: int, groups: int, kept: int, where: str) -> torch.Tensor:
    """int32 ``[out, kept]`` ascending kept groups from the packed mask bits (checked)."""
    if bits.numel() != (out * groups + 7) // 8:
        raise FormatError(f"{where}: group_mask has {bits.numel()} bytes, {out} x {groups} groups need "
                          f"{(out * groups + 7) // 8}")
    mask = np.unpackbits(bits.cpu().numpy(), count=out * groups, bitorder="little").reshape(out, groups)
    counts = mask.sum(axis=1)
    if out and not (counts == kept).all():
        row = int(np.argmax(counts != kept))
        raise FormatError(f"{where}: every row must keep {kept} groups; row {row} keeps {int(counts[row])}")
    index = np.nonzero(mask)[1].reshape(out, kept)
    return torch.from_numpy(index.astype(np.int32)).to(bits.device)


class _QuantBase(nn.Module):
    """The buffers and the record shared by the quantised modules."""

    def _setup(self, qweight: QuantizedWeight, dtype: torch.dtype) -> None:
        self.spec = qweight.spec
        self.weight_shape = tuple(qweight.shape)
        self.sparse_group = qweight.sparse_group
        self.kept = qweight.kept_groups
        self.dtype = dtype  # of the weight it replaced: the dtype of its outputs
        self.register_buffer("packed", qweight.packed)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("offset", qweight.offset)
        if qweight.group_index is not None:
            device = qweight.packed.device
            if device.type == "meta":  # a skeleton for a checkpoint: the right size, no data
                out, cols = qweight.shape
                bits = torch.empty((out * (cols // qweight.sparse_group) + 7) // 8, dtype=torch.uint8, device=device)
            else:
                bits = qweight.group_bits().to(device)
            self.register_buffer("group_mask", bits)
            self.register_buffer("group_index", qweight.group_index, persistent=False)

    def quantized(self) -> QuantizedWeight:
        """The layer's weight as a :class:`QuantizedWeight` (views of the buffers, no copy)."""
        return QuantizedWeight(self.spec, self.weight_shape, self.packed, self.scale, self.offset,
                               self.sparse_group, getattr(self, "group_index", None))

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 ``[out, in]``."""
        return self.quantized().dequantize()

    def record(self) -> dict:
        """What a checkpoint needs to rebuild this module (see :mod:`.convert`)."""
        return {"bits": self.spec.bits, "group": self.spec.group, "symmetric": self.spec.symmetric,
                "shape": list(self.weight_shape), "sparse_group": self.sparse_group, "kept": self.kept,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.sparse_group is not None and self.group_mask.device.type != "meta":
            out, cols = self.weight_shape
            self.group_index = _group_index(self.group_mask, out, cols // self.sparse_group, self.kept,
                                            f"tensor '{prefix}group_mask'")
        if self.packed.device.type != "meta":
            self.quantized().check(f"layer '{prefix.rstrip('.')}'")


class QuantLinear(_QuantBase):
    """``nn.Linear`` with a quantised weight; ``forward`` is :func:`quant_linear`."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._setup(qweight, dtype)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def tied_to(cls, embedding: "QuantEmbedding", bias: torch.Tensor | None = None) -> "QuantLinear":
        """An output head sharing ``embedding``'s buffers (tied input and output embeddings)."""
        return cls(embedding.quantized(), bias, embedding.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quantized(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quantized().describe()}")


class QuantEmbedding(_QuantBase):
    """``nn.Embedding`` with a quantised table: a lookup dequantises only the rows it reads."""

    def __init__(self, qweight: QuantizedWeight, dtype: torch.dtype = torch.float32, padding_idx: int | None = None):
        super().__init__()
        if qweight.group_index is not None:
            raise ValueError("a quantised embedding cannot be group-sparse")
        self._setup(qweight, dtype)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.quantized().rows(ids.reshape(-1))
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.quantized().describe()}"


def spec_of(record: dict) -> QuantSpec:
    return QuantSpec(record["bits"], record["group"], record["symmetric"])
