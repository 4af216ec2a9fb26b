"""Quantised linear kernels: ``torch.library`` custom ops, and their pure-torch references.

The weight layout is the one ``sparsecraft.quant`` writes (``notes/quant_layout.md``): for a
Linear weight ``W [out, in]``, group size ``g`` (a multiple of 32 dividing ``in``)::

    W[r, c] = code[r, c] * scale[r, c // g] + offset[r, c // g]      scale, offset: fp16 [out, in // g]

* int8: ``codes`` uint8 ``[out, in]``;
* int4: ``codes`` uint8 ``[out, in // 2]``, byte ``j`` holding column ``2j`` in its low nibble
  and ``2j + 1`` in its high nibble;
* int4 group-sparse (GQSA, ``sparse_group`` G = 8 or 16 dividing ``g``): every row keeps the same
  number of runs of G columns; ``group_index`` int32 ``[out, kept]`` (ascending) names them and
  ``codes`` uint8 ``[out, kept * G // 2]`` packs their codes in that order.

Ops (CPU; each takes ``x`` float32 ``[..., in]`` and returns ``[..., out]``)::

    torch.ops.sparsecraft.qlinear_int8(x, codes, scale, offset, bias, group_size)
    torch.ops.sparsecraft.qlinear_int4(x, codes, scale, offset, bias, group_size)
    torch.ops.sparsecraft.qlinear_int4_gs(x, codes, group_index, scale, offset, bias, group_size, sparse_group)

Each has a fake (meta) implementation, so it composes with ``torch.compile``. The real one runs
the compiled kernels (:func:`.extension.get_quant_extension`: AVX2 / AVX-512 / generic loops
chosen at load time, 1..8 rows decoded per pass over the codes, more rows dequantised once then
one GEMM) and falls back to the pure-torch path (dequantise, then ``F.linear``), logged once,
when the library is unavailable. ``dequantize`` here is the reference both are tested against.

:func:`qlinear` calls the same implementation directly in eager mode (the dispatcher adds a few
microseconds per call, which a decode step of 211 layers feels) and through the op when
``torch.compile`` traces it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["QuantizedWeight", "QLinear", "dequantize", "qlinear", "quantize_rtn", "pack_int4", "unpack_int4",
           "from_quantized", "quant_kernel",
           "check_layout", "kernel_isa", "set_kernel_isa", "ISAS"]

log = logging.getLogger(__name__)

ISAS = ("generic", "avx2", "avx512")


# -- layout ------------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 ``[rows, n]`` (n even) -> ``[rows, n // 2]``, column 2j low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 ``[rows, 2 n]``."""
    low, high = packed & 15, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def check_layout(codes, scale, offset, group_size: int, *, bits: int, group_index=None, sparse_group: int = 0,
                 in_features: int | None = None, what: str = "quantised weight") -> int:
    """Check shapes and dtypes against the layout; returns ``in_features``. Errors name ``what``."""
    if bits not in (4, 8):
        raise ConfigError(f"{what}: bits must be 4 or 8, got {bits}")
    if scale.dim() != 2 or scale.dtype != torch.float16 or offset.shape != scale.shape or offset.dtype != torch.float16:
        raise ConfigError(f"{what}: scale and offset must be float16 [out, in / group_size] of one shape, got "
                          f"{tuple(scale.shape)} {scale.dtype} and {tuple(offset.shape)} {offset.dtype}")
    if group_size <= 0 or group_size % 32:
        raise ConfigError(f"{what}: group size {group_size} must be a positive multiple of 32 (32, 64 or 128)")
    n_in = scale.shape[1] * group_size
    if in_features is not None and in_features != n_in:
        raise ConfigError(f"{what}: group size {group_size} does not divide the input width {in_features} "
                          f"into the {scale.shape[1]} groups of its scales" if in_features % group_size
                          else f"{what}: input width {in_features} but the scales cover {n_in} columns")
    if codes.dim() != 2 or codes.dtype != torch.uint8 or codes.shape[0] != scale.shape[0]:
        raise ConfigError(f"{what}: codes must be uint8 [{scale.shape[0]}, ...], got {tuple(codes.shape)} {codes.dtype}")
    if sparse_group:
        if bits != 4:
            raise ConfigError(f"{what}: group sparsity needs int4 codes, got int{bits}")
        if sparse_group not in (8, 16) or group_size % sparse_group:
            raise ConfigError(f"{what}: sparse group {sparse_group} must be 8 or 16 and divide the group size "
                              f"{group_size}")
        if (group_index is None or group_index.dim() != 2 or group_index.dtype != torch.int32
                or group_index.shape[0] != codes.shape[0]):
            raise ConfigError(f"{what}: group_index must be int32 [out, kept]")
        want = group_index.shape[1] * sparse_group // 2
        if codes.shape[1] != want:
            raise ConfigError(f"{what}: packed kept groups must be [out, {want}], got width {codes.shape[1]}")
    else:
        want = n_in // 2 if bits == 4 else n_in
        if codes.shape[1] != want:
            raise ConfigError(f"{what}: int{bits} codes for {n_in} inputs must be [out, {want}], got width "
                              f"{codes.shape[1]}")
    return n_in


def dequantize(codes, scale, offset, group_size: int, *, bits: int = 4, group_index=None,
               sparse_group: int = 0) -> torch.Tensor:
    """float32 ``[out, in]`` from the layout (the reference every kernel is tested against).
    Group-sparse: the kept groups are scattered into zeros, then scaled like dense ones."""
    n_in = check_layout(codes, scale, offset, group_size, bits=bits, group_index=group_index,
                        sparse_group=sparse_group)
    out = codes.shape[0]
    q = (unpack_int4(codes) if bits == 4 else codes).to(torch.float32)
    if sparse_group:
        dense = torch.zeros(out, n_in // sparse_group, sparse_group, dtype=torch.float32, device=codes.device)
        index = group_index.to(torch.int64)[..., None].expand(-1, -1, sparse_group)
        dense.scatter_(1, index, q.view(out, -1, sparse_group))
        q = dense.view(out, n_in)
        kept = torch.zeros(out, n_in // sparse_group, dtype=torch.bool, device=codes.device)
        kept.scatter_(1, group_index.to(torch.int64), True)
        mask = kept.repeat_interleave(sparse_group, dim=1)
    s = scale.to(torch.float32).repeat_interleave(group_size, dim=1)
    z = offset.to(torch.float32).repeat_interleave(group_size, dim=1)
    w = q * s + z
    return w * mask if sparse_group else w


# -- running ---------------------------------------------------------------------------------
def _ext():
    from .extension import get_quant_extension

    return get_quant_extension()


def _run(x, codes, scale, offset, group_index, bias, bits: int, group_size: int, sparse_group: int):
    n_in = check_layout(codes, scale, offset, group_size, bits=bits, group_index=group_index,
                        sparse_group=sparse_group, in_features=x.shape[-1], what="qlinear")
    if x.dtype != torch.float32:
        raise ConfigError(f"qlinear: x must be float32, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    ext = _ext() if x.device.type == "cpu" else None
    if ext is not None:
        y = ext.qlinear(x2, codes, scale, offset, group_index, bias, bits, group_size, sparse_group)
    else:
        w = dequantize(codes, scale, offset, group_size, bits=bits, group_index=group_index,
                       sparse_group=sparse_group)
        y = F.linear(x2, w, bias)
    return y.view(*lead, codes.shape[0])


def qlinear(x, codes, scale, offset, bias=None, *, group_size: int, bits: int = 4, group_index=None,
            sparse_group: int = 0) -> torch.Tensor:
    """``x @ dequantize(...).T + bias``: directly in eager mode, through the op under ``torch.compile``."""
    if torch.compiler.is_compiling():
        if sparse_group:
            return torch.ops.sparsecraft.qlinear_int4_gs(x, codes, group_index, scale, offset, bias, group_size,
                                                         sparse_group)
        op = torch.ops.sparsecraft.qlinear_int4 if bits == 4 else torch.ops.sparsecraft.qlinear_int8
        return op(x, codes, scale, offset, bias, group_size)
    return _run(x, codes, scale, offset, group_index, bias, bits, group_size, sparse_group)


# -- torch.library registration ---------------------------------------------------------------
_LIB = torch.library.Library("sparsecraft", "FRAGMENT")
_LIB.define("qlinear_int8(Tensor x, Tensor codes, Tensor scale, Tensor offset, Tensor? bias, int group_size) -> Tensor")
_LIB.define("qlinear_int4(Tensor x, Tensor codes, Tensor scale, Tensor offset, Tensor? bias, int group_size) -> Tensor")
_LIB.define("qlinear_int4_gs(Tensor x, Tensor codes, Tensor group_index, Tensor scale, Tensor offset, Tensor? bias, "
            "int group_size, int sparse_group) -> Tensor")


def _int8(x, codes, scale, offset, bias, group_size):
    return _run(x, codes, scale, offset, None, bias, 8, group_size, 0)


def _int4(x, codes, scale, offset, bias, group_size):
    return _run(x, codes, scale, offset, None, bias, 4, group_size, 0)


def _int4_gs(x, codes, group_index, scale, offset, bias, group_size, sparse_group):
    return _run(x, codes, scale, offset, group_index, bias, 4, group_size, sparse_group)


def _fake(x, codes, *args):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


for _name, _impl in (("qlinear_int8", _int8), ("qlinear_int4", _int4), ("qlinear_int4_gs", _int4_gs)):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"sparsecraft::{_name}", _fake, lib=_LIB)


# -- instruction set -------------------------------------------------------------------------------
def _torch_cap() -> str:
    """The best of ISAS that torch's CPU capability (cpuid + OS support) allows."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "generic"


def _apply_isa(module, wanted: str | None = None) -> str:
    wanted = wanted or os.environ.get("SPARSECRAFT_ISA") or "avx512"
    if wanted not in ISAS:
        raise ConfigError(f"SPARSECRAFT_ISA / instruction set must be one of {', '.join(ISAS)}, got '{wanted}'")
    cap = _torch_cap()
    chosen = module.set_isa(ISAS[min(ISAS.index(wanted), ISAS.index(cap))])
    log.info("quantised kernels use %s loops (cpuid: %s, torch: %s, asked: %s)", chosen,
             module.detected_isa(), cap, wanted)
    return chosen


def kernel_isa() -> str | None:
    """The loops the compiled kernels use ('generic', 'avx2', 'avx512'), None without them."""
    ext = _ext()
    return None if ext is None else ext.isa()


def set_kernel_isa(name: str) -> str:
    """Use the ``name`` loops (capped at what the CPU and OS support); returns the ones used."""
    ext = _ext()
    if ext is None:
        raise ConfigError("the compiled quantised kernels are unavailable (see the log)")
    return _apply_isa(ext, name)


def _on_load(module) -> None:
    _apply_isa(module)


from . import extension as _extension  # noqa: E402  (the hook needs this module's function)

_extension._hooks.append(_on_load)


# -- a weight in the layout, a module, and the reference quantiser --------------------------------------
@dataclass
class QuantizedWeight:
    """One Linear weight in the layout above (tensors on CPU)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int
    bits: int = 4
    group_index: torch.Tensor | None = None
    sparse_group: int = 0

    def __post_init__(self):
        self.in_features = check_layout(self.codes, self.scale, self.offset, self.group_size, bits=self.bits,
                                        group_index=self.group_index, sparse_group=self.sparse_group)
        self.out_features = int(self.codes.shape[0])

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.offset, self.group_size, bits=self.bits,
                          group_index=self.group_index, sparse_group=self.sparse_group)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return qlinear(x, self.codes, self.scale, self.offset, bias, group_size=self.group_size, bits=self.bits,
                       group_index=self.group_index, sparse_group=self.sparse_group)

    def nbytes(self) -> int:
        tensors = (self.codes, self.scale, self.offset) + ((self.group_index,) if self.group_index is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)


def from_quantized(qweight) -> QuantizedWeight:
    """The runtime's view of a :class:`sparsecraft.quant.QuantizedWeight` (what ``sc.quantize_``
    and the ``QuantLinear`` layers hold): the same tensors, no copy; the layout is shared."""
    return QuantizedWeight(qweight.packed, qweight.scale, qweight.offset, qweight.spec.group, qweight.spec.bits,
                           qweight.group_index, qweight.sparse_group or 0)


def quant_kernel(x2: torch.Tensor, qweight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The compiled kernels as :mod:`sparsecraft.quant`'s fast path (see
    ``sparsecraft.quant.register_quant_kernel``): float32 inputs on CPU outside autograd, grids
    of a multiple of 32 columns; anything else is declined (None) and runs the reference."""
    if (x2.dtype != torch.float32 or x2.device.type != "cpu" or qweight.spec.group % 32
            or (torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad)))):
        return None
    q = from_quantized(qweight)
    return q.linear(x2, None if bias is None else bias.detach().to(torch.float32))


class QLinear(nn.Module):
    """A Linear computed by the quantised kernels (inference only).

    The runtime's thin module over the layout: buffers ``codes``, ``scale``, ``offset`` (and
    ``group_index``), attributes ``bits``, ``group_size``, ``sparse_group``; ``sparsecraft.quant``
    builds the quantised weights. ``weight`` returns the dequantised float32 weight (a new tensor
    each time); ``qweight`` the layout as a :class:`QuantizedWeight` over the same tensors.
    """

    group_index: torch.Tensor | None

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group_size, self.sparse_group = qweight.bits, qweight.group_size, qweight.sparse_group
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("offset", qweight.offset)
        self.register_buffer("group_index", qweight.group_index)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, self.offset, self.group_size, self.bits, self.group_index,
                               self.sparse_group)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.codes, self.scale, self.offset, self.bias, group_size=self.group_size, bits=self.bits,
                       group_index=self.group_index, sparse_group=self.sparse_group)

    def extra_repr(self) -> str:
        kind = f"int{self.bits}, group {self.group_size}" + (
            f", group:{self.sparse_group} sparse" if self.sparse_group else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


def quantize_rtn(weight: torch.Tensor, *, bits: int = 4, group_size: int = 64, symmetric: bool = False,
                 sparse_group: int = 0, keep: float = 1.0) -> QuantizedWeight:
    """Round-to-nearest quantisation into the layout: the baseline the kernels are benchmarked with.

    Asymmetric: per group, codes ``round((w - min) / scale)`` with ``scale = (max - min) / (2^bits - 1)``
    (1 when max == min), ``offset = min``. Symmetric: ``scale = absmax / (2^(bits-1) - 1)``, codes
    ``round(w / scale) + zero`` (zero 8 / 128), ``offset = -zero * scale``. With ``sparse_group``,
    every row keeps its ``round(keep * in / G)`` runs of G columns of largest L2 norm (row-balanced;
    ties to the lower index) and min/max are taken over the kept columns of each group only.
    The error-compensating quantisers live in ``sparsecraft.quant``.
    """
    if weight.dim() != 2:
        raise ConfigError(f"quantize_rtn: weight must be 2-D, got shape {tuple(weight.shape)}")
    out, n_in = weight.shape
    if bits not in (4, 8):
        raise ConfigError(f"quantize_rtn: bits must be 4 or 8, got {bits}")
    if group_size <= 0 or group_size % 32 or n_in % group_size:
        raise ConfigError(f"quantize_rtn: group size {group_size} must be a multiple of 32 that divides the input "
                          f"width {n_in}")
    w = weight.detach().to(torch.float32)
    kept_mask = torch.ones_like(w, dtype=torch.bool)
    group_index = None
    if sparse_group:
        if bits != 4 or sparse_group not in (8, 16) or group_size % sparse_group:
            raise ConfigError(f"quantize_rtn: group sparsity needs int4 and a sparse group of 8 or 16 dividing "
                              f"{group_size}, got int{bits}, {sparse_group}")
        if not 0.0 < keep <= 1.0:
            raise ConfigError(f"quantize_rtn: keep must lie in (0, 1], got {keep}")
        n_groups = n_in // sparse_group
        kept = max(1, round(keep * n_groups))
        norms = w.view(out, n_groups, sparse_group).norm(dim=2)
        # stable descending sort: equal norms keep the lower index first
        order = torch.sort(norms, dim=1, descending=True, stable=True).indices[:, :kept]
        group_index = order.sort(dim=1).values.to(torch.int32)
        gmask = torch.zeros(out, n_groups, dtype=torch.bool).scatter_(1, group_index.long(), True)
        kept_mask = gmask.repeat_interleave(sparse_group, dim=1)
    levels = 2 ** bits - 1
    wg = w.view(out, -1, group_size)
    mg = kept_mask.view(out, -1, group_size)
    if symmetric:
        zero = 2 ** (bits - 1)
        amax = wg.abs().masked_fill(~mg, 0).amax(dim=2)
        scale = torch.where(amax > 0, amax / (zero - 1), torch.ones_like(amax)).to(torch.float16)
        offset = (-zero * scale.float()).to(torch.float16)
    else:
        lo = wg.masked_fill(~mg, float("inf")).amin(dim=2)
        hi = wg.masked_fill(~mg, float("-inf")).amax(dim=2)
        empty = ~mg.any(dim=2)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
        scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(lo)).to(torch.float16)
        offset = lo.to(torch.float16)
    # round against the fp16 scale and offset the kernels will read
    s, z = scale.float()[..., None], offset.float()[..., None]
    codes = torch.round((wg - z) / s).clamp_(0, levels).to(torch.uint8).view(out, n_in)
    if sparse_group:
        codes = codes[kept_mask].view(out, -1)
    if bits == 4:
        codes = pack_int4(codes)
    return QuantizedWeight(codes.contiguous(), scale.contiguous(), offset.contiguous(), group_size, bits,
                           group_index, sparse_group)
