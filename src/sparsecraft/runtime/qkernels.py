"""Quantised linear kernels: ``torch.library`` custom ops, and their pure-torch references.

The weight layout is the one ``sparsecraft.quant`` writes and holds in its
:class:`~sparsecraft.quant.QuantizedWeight` (``notes/quant_layout.md``): for a Linear weight
``W [out, in]``, group size ``g`` (32, 64 or 128, dividing ``in``)::

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
when the library is unavailable. ``dequantize`` here (``QuantizedWeight.dequantize`` over the
raw tensors) is the reference both are tested against.

:func:`qlinear` calls the same implementation directly in eager mode (the dispatcher adds a few
microseconds per call, which a decode step of 211 layers feels) and through the op when
``torch.compile`` traces it; :func:`quantized_linear` is the same for a ``QuantizedWeight``.
The layers that hold quantised weights, and the quantisers, are ``sparsecraft.quant``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..quant.grid import GROUPS, QuantSpec
from ..quant.tensor import QuantizedWeight

__all__ = ["dequantize", "qlinear", "quantized_linear", "quant_kernel", "check_layout", "kernel_isa",
           "set_kernel_isa", "ISAS", "quantize_activations", "qlinear_int8_activations", "int8_activations",
           "takes_int8_activations"]

log = logging.getLogger(__name__)

ISAS = ("generic", "avx2", "avx512")


# -- layout ------------------------------------------------------------------------------------
def check_layout(codes, scale, offset, group_size: int, *, bits: int, group_index=None, sparse_group: int = 0,
                 in_features: int | None = None, what: str = "quantised weight") -> int:
    """Check shapes and dtypes against the layout; returns ``in_features``. Errors name ``what``."""
    if bits not in (4, 8):
        raise ConfigError(f"{what}: bits must be 4 or 8, got {bits}")
    if scale.dim() != 2 or scale.dtype != torch.float16 or offset.shape != scale.shape or offset.dtype != torch.float16:
        raise ConfigError(f"{what}: scale and offset must be float16 [out, in / group_size] of one shape, got "
                          f"{tuple(scale.shape)} {scale.dtype} and {tuple(offset.shape)} {offset.dtype}")
    if group_size not in GROUPS:
        raise ConfigError(f"{what}: group size {group_size} must be one of {', '.join(map(str, GROUPS))}")
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


def _weight(codes, scale, offset, group_size: int, bits: int, group_index, sparse_group: int,
            n_in: int) -> QuantizedWeight:
    """The raw tensors as a :class:`~sparsecraft.quant.QuantizedWeight` (no copy; checked already)."""
    return QuantizedWeight(QuantSpec(bits, group_size), (int(codes.shape[0]), n_in), codes, scale, offset,
                           sparse_group or None, group_index)


def dequantize(codes, scale, offset, group_size: int, *, bits: int = 4, group_index=None,
               sparse_group: int = 0) -> torch.Tensor:
    """float32 ``[out, in]`` from the layout (the reference every kernel is tested against):
    ``QuantizedWeight.dequantize``; pruned groups of a group-sparse weight are exactly 0."""
    n_in = check_layout(codes, scale, offset, group_size, bits=bits, group_index=group_index,
                        sparse_group=sparse_group)
    return _weight(codes, scale, offset, group_size, bits, group_index, sparse_group, n_in).dequantize()


# -- running ---------------------------------------------------------------------------------
def _ext():
    from .extension import get_quant_extension

    return get_quant_extension()


def _rows(x: torch.Tensor, n_in: int, what: str) -> tuple[torch.Size, torch.Tensor, object]:
    """``x``'s leading shape, ``x`` as ``[rows, n_in]`` and the compiled library (None off CPU
    or when it is unavailable); float32 only."""
    if x.dtype != torch.float32:
        raise ConfigError(f"{what}: x must be float32, got {x.dtype}")
    return x.shape[:-1], x.reshape(-1, n_in), _ext() if x.device.type == "cpu" else None


def _run(x, codes, scale, offset, group_index, bias, bits: int, group_size: int, sparse_group: int):
    n_in = check_layout(codes, scale, offset, group_size, bits=bits, group_index=group_index,
                        sparse_group=sparse_group, in_features=x.shape[-1], what="qlinear")
    lead, x2, ext = _rows(x, n_in, "qlinear")
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


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, in]`` (``in`` a multiple of 32) rounded to int8 per block of 32 values, as the
    int8-activation kernel does (llama.cpp's Q8_0 rule): ``scale = max|x| / 127`` per block,
    ``code = round(x * (127 / max|x|))`` half away from zero (0 for an all-zero block).
    Returns ``(codes int8 [B, in], scales float32 [B, in / 32])``; ``codes * scale`` is the
    rounded input."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    v = (blocks * inv[..., None]).double()  # the float32 product, rounded exactly
    codes = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)
    return codes.reshape(x.shape), amax / 127.0


def qlinear_int8_activations(x, codes, scale, offset, bias=None, *, group_size: int) -> torch.Tensor:
    """Dense int4 ``qlinear`` with the input rounded to int8 per block of 32
    (:func:`quantize_activations`) and multiplied by the codes in integers, as llama.cpp's Q4
    kernels do: faster than the float kernel on AVX2 (about 1.5x per layer in a first
    measurement), at the cost of the input's rounding (on random data, errors up to about 1%
    of the output's scale instead of float rounding). The offsets multiply the float input's sums. Needs the compiled kernels; without them it
    computes the same rounding in torch."""
    n_in = check_layout(codes, scale, offset, group_size, bits=4, in_features=x.shape[-1],
                        what="qlinear_int8_activations")
    lead, x2, ext = _rows(x, n_in, "qlinear_int8_activations")
    if ext is not None:
        y = ext.qlinear_x8(x2, codes, scale, offset, bias, group_size)
    else:
        xq, xs = quantize_activations(x2)
        rounded = (xq.float().reshape(x2.shape[0], -1, 32) * xs[..., None]).reshape(x2.shape)
        qw = _weight(codes, scale, offset, group_size, 4, None, 0, n_in)
        grid = qw.dequantize()
        # the codes see the rounded input, the offsets the float input (as in the kernel)
        off = offset.float().repeat_interleave(group_size, dim=1)
        y = F.linear(rounded, grid - off) + F.linear(x2, off, bias)
    return y.view(*lead, codes.shape[0])


def takes_int8_activations(qweight: QuantizedWeight) -> bool:
    """Whether :func:`qlinear_int8_activations` computes this weight's product: dense int4
    (group-sparse and int8 weights keep their float-activation kernels)."""
    return qweight.spec.bits == 4 and not qweight.sparse_group


@contextlib.contextmanager
def int8_activations():
    """Inside, every dense int4 :class:`~sparsecraft.quant.QuantLinear` product (float32, CPU,
    outside autograd) runs :func:`qlinear_int8_activations`: the eager model, ``generate`` and
    perplexity see what ``FastDecoder(activations="int8")`` computes. Other layers are unchanged."""
    from ..quant.modules import QUANT_KERNELS

    def kernel(x2, qweight, bias):
        if not takes_int8_activations(qweight) or _declined(x2, bias):
            return None
        return qlinear_int8_activations(x2, qweight.packed, qweight.scale, qweight.offset, _float_bias(bias),
                                        group_size=qweight.spec.group)

    QUANT_KERNELS.insert(0, kernel)
    try:
        yield
    finally:
        QUANT_KERNELS.remove(kernel)


def quantized_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`qlinear` with the tensors of a :class:`~sparsecraft.quant.QuantizedWeight`."""
    return qlinear(x, qweight.packed, qweight.scale, qweight.offset, bias, group_size=qweight.spec.group,
                   bits=qweight.spec.bits, group_index=qweight.group_index, sparse_group=qweight.sparse_group or 0)


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


# -- sparsecraft.quant's fast path --------------------------------------------------------------
def quant_kernel(x2: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The compiled kernels as :mod:`sparsecraft.quant`'s fast path (see
    ``sparsecraft.quant.register_quant_kernel``): float32 inputs on CPU outside autograd; anything
    else is declined (None) and runs the reference."""
    if _declined(x2, bias):
        return None
    return quantized_linear(x2, qweight, _float_bias(bias))


def _declined(x2: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Products the compiled kernels leave to the reference: not float32 on CPU, or tracked
    by autograd (the kernels have no backward)."""
    return (x2.dtype != torch.float32 or x2.device.type != "cpu"
            or (torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad))))


def _float_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32)
