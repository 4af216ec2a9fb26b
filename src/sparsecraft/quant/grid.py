"""Group quantisation grids: pure tensor math, no modules.

A weight ``W [out, in]`` is cut along its input dimension into groups of ``g`` consecutive
columns (``g`` in 32, 64, 128, dividing ``in``). Each group of each row has its own grid
``value = code * scale + offset`` with an unsigned ``code`` in ``0 .. 2^b - 1`` (``b`` = 4 or
8 bits) and ``scale``, ``offset`` stored as float16 (the layout the kernels share is spelled out in
:mod:`sparsecraft.quant.tensor`).

Grids (``fit_grid``), computed from the group's entries that are kept (a pruned entry needs
no level):

* **symmetric** (default): ``zero = 2^(b-1)`` (8 for int4, 128 for int8) and
  ``scale = -x_e / zero`` where ``x_e`` is the kept entry of largest magnitude (the first one
  on ties), so ``x_e`` itself is exactly code 0 and the step is ``|x_e| / zero`` (the
  llama.cpp Q4_0 rule: the sign of the scale gives the extreme entry the extra negative level);
  ``offset = -zero * scale``. Zero is always exactly representable: code ``zero``.
* **asymmetric**: ``scale = (max - min) / (2^b - 1)`` and ``offset = min`` over the kept
  entries (the Q4_1 rule): the extremes are the end levels. Zero is in general *not* on the
  grid, which is why asymmetric grids refuse element-wise pruning (a pruned weight must stay
  exactly zero).

``scale`` and ``offset`` are rounded to float16 first; codes are then computed with the
rounded values: ``code = clamp(round((x - offset) / scale), 0, 2^b - 1)`` (round half to
even), and a group whose float16 scale is 0 gets code ``zero`` (symmetric) or 0
(asymmetric). Dequantising is ``code * scale + offset`` in float32, a multiply then an add,
each rounded (:func:`dequantize_codes`): every implementation (the sweep, the modules, the
kernels' reference) uses this one function.

Packing (int4): two codes per byte, column ``2j`` in the low nibble of byte ``j`` and column
``2j + 1`` in its high nibble (:func:`pack_int4` / :func:`unpack_int4`). int8 codes are the
bytes themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError, TargetError

__all__ = [
    "QuantSpec", "BITS", "GROUPS", "parse_quantize", "fit_grid", "quantize_codes", "dequantize_codes",
    "pack_int4", "unpack_int4", "check_fp16",
]

BITS = (4, 8)
GROUPS = (32, 64, 128)
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantised: ``bits`` (4 or 8), group size ``group`` (32, 64 or 128)
    along the input dimension, symmetric or asymmetric grids."""

    bits: int = 4
    group: int = 64
    symmetric: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ConfigError(f"quantisation bits must be 4 or 8 (int4, int8), got {self.bits!r}")
        if isinstance(self.group, bool) or self.group not in GROUPS:
            raise ConfigError(f"quantisation group must be one of {', '.join(map(str, GROUPS))}, got {self.group!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"quantisation symmetric must be true or false, got {self.symmetric!r}")

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def zero(self) -> int:
        """The code of 0 in symmetric grids (and of pruned or empty entries)."""
        return (1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def check_width(self, cols: int, layer: str = "") -> None:
        """ConfigError naming ``layer`` when ``g`` does not divide the input width."""
        if cols % self.group:
            fits = [g for g in GROUPS if cols % g == 0]
            hint = f"; groups that divide it: {', '.join(map(str, fits))}" if fits else ""
            raise ConfigError(f"layer '{layer}': quantisation group {self.group} does not divide its "
                              f"{cols} input columns{hint}")

    def __str__(self) -> str:
        return f"{self.name} g{self.group} {'sym' if self.symmetric else 'asym'}"


_QUANT_RE = re.compile(r"^int(\d+)$")


def parse_quantize(value) -> int:
    """Bits from a ``quantize`` option: ``"int4"``, ``"int8"`` (or the numbers 4, 8)."""
    if isinstance(value, int) and not isinstance(value, bool):
        bits = value
    elif isinstance(value, str) and (m := _QUANT_RE.match(value.strip().lower())):
        bits = int(m.group(1))
    else:
        raise ConfigError(f"quantize must be 'int4' or 'int8', got {value!r}")
    if bits not in BITS:
        raise ConfigError(f"quantize must be 'int4' or 'int8'; int{bits} is not supported")
    return bits


def check_fp16(t: torch.Tensor, what: str, layer: str = "") -> None:
    """TargetError when float16 cannot hold ``t`` (a scale or offset of too large a weight)."""
    if not torch.isfinite(t).all() or t.abs().max() > _FP16_MAX:
        raise TargetError(f"layer '{layer}': a quantisation {what} exceeds float16's range "
                          f"({_FP16_MAX:g}); the weights are too large to quantise")


def fit_grid(x: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None,
             layer: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each group: ``x [..., n]`` (the last dimension is one group) -> float32
    ``(scale, offset)`` of shape ``[...]``, holding float16 values (see the module docstring).

    Only entries with ``keep`` True count; a group with none gets scale 0 and offset 0.
    """
    x = x.detach().float()
    keep = torch.ones_like(x, dtype=torch.bool) if keep is None else keep.to(device=x.device, dtype=torch.bool)
    any_kept = keep.any(dim=-1)
    if spec.symmetric:
        mag = torch.where(keep, x.abs(), torch.full_like(x, -1.0))
        extreme = x.gather(-1, mag.argmax(dim=-1, keepdim=True)).squeeze(-1)
        scale = torch.where(any_kept, -extreme / spec.zero, torch.zeros_like(extreme))
        check_fp16(scale, "scale", layer)
        scale = scale.half().float()
        offset = -spec.zero * scale  # exact: a power of two times a float16
    else:
        lo = torch.where(keep, x, torch.full_like(x, float("inf"))).amin(dim=-1)
        hi = torch.where(keep, x, torch.full_like(x, float("-inf"))).amax(dim=-1)
        lo = torch.where(any_kept, lo, torch.zeros_like(lo))
        hi = torch.where(any_kept, hi, torch.zeros_like(hi))
        scale = (hi - lo) / (spec.levels - 1)
        check_fp16(scale, "scale", layer)
        check_fp16(lo, "offset", layer)
        scale, offset = scale.half().float(), lo.half().float()
    return scale, offset


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """uint8 codes of ``x`` on the grid ``(scale, offset)``; ``scale`` and ``offset`` broadcast
    against ``x`` (e.g. ``[rows, 1]`` for ``x [rows, n]``)."""
    x = x.detach().float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((x - offset) / safe).clamp_(0, spec.levels - 1)
    codes = torch.where(scale == 0, torch.full_like(codes, spec.zero), codes)
    return codes.to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 ``code * scale + offset`` (a multiply, then an add, each rounded)."""
    return codes.float() * scale.float() + offset.float()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[rows, n]`` codes 0..15 (n even) -> uint8 ``[rows, n/2]``: low nibble = even column."""
    if codes.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[rows, n/2]`` -> uint8 codes ``[rows, n]``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
