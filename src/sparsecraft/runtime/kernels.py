"""Kernels for ``y = x @ W^T + b`` with a weight full of zeros.

A kernel packs a dense weight once into the tensors it needs (``pack``), computes the layer
from them (``run``, on a 2-D input: tokens x in_features, returning a contiguous 2-D output
like ``F.linear``) and gives the dense weight back (``unpack``). Kernels are pure tensor
math; which one a layer uses is the planner's business (:mod:`.planner`).

=============  ==============================================================================
``dense``      ``F.linear``: the reference every other kernel must beat.
``csr``        torch CSR in its fast orientation, ``(W_csr @ x^T)^T`` (``F.linear`` with a
               CSR weight is slower than dense).
``csr_embag``  CSR evaluated by ``F.embedding_bag``: bag ``o`` sums the rows ``col`` of
               ``x^T`` weighted by the values of weight row ``o``, i.e. ``(W x^T)[o]``.
               Pure torch, with fbgemm's fused gather-FMA behind it: strong for many tokens,
               weak for one (a bag of 1-wide rows).
``csr_cpp``    the compiled kernel (:mod:`.extension`): 16-bit column indices, a gather per
               non-zero for up to 4 tokens, a register-tiled broadcast-FMA over ``x^T`` for
               more. Float32 on CPU only.
=============  ==============================================================================
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

__all__ = ["Kernel", "KERNELS", "KernelUnavailable", "get_kernel", "register_kernel"]

log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
    """This kernel cannot run this weight here (dtype, device, missing extension)."""


class Kernel:
    """Base class: ``pack`` once, ``run`` many times, ``unpack`` to get the weight back."""

    name = "base"

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def run(self, packed: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
            out_features: int) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


def _csr_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row pointers, column indices, values) of ``weight``; exact zeros (also -0.0) dropped."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
    return csr.crow_indices(), csr.col_indices(), csr.values().contiguous()


def _transposed_add(yt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Contiguous ``yt^T (+ bias)``: the layout ``F.linear`` returns."""
    y = torch.empty(yt.shape[1], yt.shape[0], dtype=yt.dtype, device=yt.device).copy_(yt.t())
    return y if bias is None else y.add_(bias)


class Dense(Kernel):
    name = "dense"

    def pack(self, weight):
        return {"weight": weight.detach()}

    def run(self, packed, x, bias, out_features):
        return F.linear(x, packed["weight"], bias)

    def unpack(self, packed, shape):
        return packed["weight"]


class TorchCSR(Kernel):
    name = "csr"

    def pack(self, weight):
        crow, col, val = _csr_parts(weight)
        return {"crow": crow, "col": col, "val": val}

    @staticmethod
    def _matrix(packed, shape):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(packed["crow"], packed["col"], packed["val"], shape,
                                           check_invariants=False)

    def run(self, packed, x, bias, out_features):
        w = self._matrix(packed, (out_features, x.shape[1]))
        return _transposed_add(w @ x.t(), bias)

    def unpack(self, packed, shape):
        return self._matrix(packed, shape).to_dense()


class EmbagCSR(TorchCSR):
    name = "csr_embag"  # same packing as csr

    def run(self, packed, x, bias, out_features):
        # bag o = the rows col[crow[o]:crow[o+1]] of x^T, weighted by the values of row o
        yt = F.embedding_bag(packed["col"], x.t().contiguous(), packed["crow"],
                             per_sample_weights=packed["val"], mode="sum", include_last_offset=True)
        return _transposed_add(yt, bias)


class CppCSR(Kernel):
    name = "csr_cpp"

    def _ext(self):
        from .extension import get_extension

        ext = get_extension()
        if ext is None:
            raise KernelUnavailable("compiled kernels unavailable (see the log)")
        return ext

    def pack(self, weight):
        self._ext()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise KernelUnavailable(f"csr_cpp runs float32 on CPU, not {weight.dtype} on {weight.device}")
        crow, col, val = _csr_parts(weight)
        if val.numel() >= 2**31:
            raise KernelUnavailable("more than 2^31 non-zeros")
        index = torch.int16 if weight.shape[1] <= 65536 else torch.int32
        # int16 storage holds indices up to 65535: the C++ side reads them as uint16
        return {"crow": crow.to(torch.int32), "col": col.to(torch.int32).to(index), "val": val}

    def run(self, packed, x, bias, out_features):
        return self._ext().csr_linear(x, packed["crow"], packed["col"], packed["val"], bias, out_features)

    def unpack(self, packed, shape):
        col = packed["col"].to(torch.int64)
        if packed["col"].dtype == torch.int16:
            col = col & 0xFFFF  # undo the sign of indices >= 32768
        parts = {"crow": packed["crow"].to(torch.int64), "col": col, "val": packed["val"]}
        return TorchCSR._matrix(parts, shape).to_dense()


#: name -> kernel; ``dense`` must stay. Register more with :func:`register_kernel`.
KERNELS: dict[str, Kernel] = {k.name: k for k in (Dense(), TorchCSR(), EmbagCSR(), CppCSR())}


def register_kernel(kernel: Kernel) -> Kernel:
    KERNELS[kernel.name] = kernel
    return kernel


def get_kernel(name: str) -> Kernel:
    from ..errors import ConfigError

    try:
        return KERNELS[name]
    except KeyError:
        raise ConfigError(f"unknown kernel '{name}'; known: {', '.join(KERNELS)}") from None
