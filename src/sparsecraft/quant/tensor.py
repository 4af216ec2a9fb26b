"""``QuantizedWeight``: one quantised Linear weight in the layout the kernels read.

For ``W [out, in]``, group size ``g`` (dividing ``in``) and, for group sparsity (GQSA), a
sparsity group size ``G`` (8 or 16, dividing ``g``):

* ``scale``, ``offset``: float16 ``[out, in // g]``; ``w[r, c] = code[r, c] * scale[r, c // g]
  + offset[r, c // g]`` (symmetric grids have ``offset = -zero * scale`` with ``zero`` 8 for
  int4 and 128 for int8; :mod:`.grid`).
* ``packed``: uint8. int4: ``[out, n // 2]`` with column ``2j`` in the low nibble of byte ``j``
  and column ``2j + 1`` in the high nibble; int8: the codes ``[out, n]``. ``n = in`` for a
  dense weight.
* group sparsity: every row keeps the same number ``kept`` of its ``in // G`` groups;
  ``group_index`` int32 ``[out, kept]`` lists them in ascending order and ``packed`` holds
  only their codes, compacted in that order (``n = kept * G``). Pruned groups are exactly 0
  in ``W``; their scales are never read. On disk the groups are one bit each
  (:meth:`group_bits`, little-endian bit order over the row-major ``[out, in // G]`` mask).

Reference semantics (what the kernels are compared with): :meth:`dequantize` gives float32
``W``; ``y = x @ W.T + bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ConfigError, FormatError
from .grid import QuantSpec, dequantize_codes, pack_int4, unpack_int4

__all__ = ["QuantizedWeight", "SPARSE_GROUPS"]

#: sparsity group sizes G the quantised layout supports
SPARSE_GROUPS = (8, 16)


@dataclass
class QuantizedWeight:
    spec: QuantSpec
    shape: tuple[int, int]  # (out, in)
    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    sparse_group: int | None = None  # G, or None for a dense weight
    group_index: torch.Tensor | None = None  # int32 [out, kept]

    # -- building -------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec,
                   group_keep: torch.Tensor | None = None, sparse_group: int | None = None) -> "QuantizedWeight":
        """From full ``[out, in]`` codes and float ``[out, in // g]`` grids; with ``group_keep``
        (bool ``[out, in // G]``, the same count per row) only the kept groups' codes are kept."""
        out, cols = codes.shape
        index = None
        if group_keep is not None:
            if sparse_group is None:
                raise ConfigError("a group mask needs its group size G")
            kept = group_keep.sum(dim=1)
            if out and not bool((kept == kept[0]).all()):
                raise ConfigError("group sparsity must keep the same number of groups in every row")
            k = int(kept[0]) if out else 0
            # ascending positions of the kept groups, row by row
            index = torch.sort(torch.where(group_keep, torch.arange(group_keep.shape[1], device=group_keep.device),
                                           group_keep.shape[1]),
                               dim=1).values[:, :k].to(torch.int32)
            codes = codes.reshape(out, cols // sparse_group, sparse_group).gather(
                1, index.long()[:, :, None].expand(-1, -1, sparse_group)).reshape(out, k * sparse_group)
        codes = codes.to(torch.uint8)
        packed = pack_int4(codes) if spec.bits == 4 else codes.contiguous()
        return cls(spec, (out, cols), packed, scale.half().contiguous(), offset.half().contiguous(),
                   sparse_group if group_keep is not None else None, index)

    # -- reading --------------------------------------------------------------------
    @property
    def kept_groups(self) -> int | None:
        return None if self.group_index is None else int(self.group_index.shape[1])

    def codes(self) -> torch.Tensor:
        """uint8 codes ``[out, n]`` (the kept groups only when group-sparse)."""
        return unpack_int4(self.packed) if self.spec.bits == 4 else self.packed

    def group_mask(self) -> torch.Tensor | None:
        """Boolean ``[out, in // G]``: True for a kept group (None for a dense weight)."""
        if self.group_index is None:
            return None
        out, cols = self.shape
        mask = torch.zeros(out, cols // self.sparse_group, dtype=torch.bool, device=self.packed.device)
        return mask.scatter_(1, self.group_index.long(), True)

    def keep_mask(self) -> torch.Tensor | None:
        """Boolean ``[out, in]`` of the weights a group mask keeps (None for a dense weight)."""
        mask = self.group_mask()
        return None if mask is None else mask.repeat_interleave(self.sparse_group, dim=1)

    def dequantize(self) -> torch.Tensor:
        """float32 ``W [out, in]`` (see the module docstring)."""
        out, cols = self.shape
        g = self.spec.group
        if self.group_index is None:
            codes = self.codes().reshape(out, cols // g, g)
            return dequantize_codes(codes, self.scale[..., None], self.offset[..., None]).reshape(out, cols)
        big = self.sparse_group
        k = self.kept_groups
        codes = self.codes().reshape(out, k, big)
        grid = (self.group_index.long() * big) // g  # the quantisation group of each kept group
        values = dequantize_codes(codes, self.scale.gather(1, grid)[..., None], self.offset.gather(1, grid)[..., None])
        w = torch.zeros(out, cols // big, big, dtype=torch.float32, device=self.packed.device)
        w.scatter_(1, self.group_index.long()[:, :, None].expand(-1, -1, big), values)
        return w.reshape(out, cols)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 rows ``W[index]`` (an embedding lookup), dequantising only those rows."""
        if self.group_index is not None:
            raise ConfigError("row lookups of group-sparse weights are not supported")
        sub = replace(self, shape=(int(index.numel()), self.shape[1]), packed=self.packed[index],
                      scale=self.scale[index], offset=self.offset[index])
        return sub.dequantize()

    # -- sizes ------------------------------------------------------------------------
    def group_bits(self) -> torch.Tensor | None:
        """The group mask as packed bits (uint8, little-endian bit order), as stored on disk."""
        mask = self.group_mask()
        if mask is None:
            return None
        return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy(), bitorder="little"))

    @property
    def nbytes(self) -> int:
        """Bytes stored on disk: codes, scales, offsets and one bit per group."""
        out, cols = self.shape
        total = sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))
        if self.group_index is not None:
            total += (out * (cols // self.sparse_group) + 7) // 8
        return total

    def theoretical_nbytes(self) -> float:
        """The ideal size: ``bits`` per stored code, 2 + 2 bytes per grid, 1 bit per group."""
        out, cols = self.shape
        n = cols if self.group_index is None else self.kept_groups * self.sparse_group
        ideal = out * n * self.spec.bits / 8 + out * (cols // self.spec.group) * 4
        if self.group_index is not None:
            ideal += out * (cols // self.sparse_group) / 8
        return ideal

    def sparsity(self) -> float:
        """Fraction of ``W`` the group mask prunes (0 for a dense weight)."""
        if self.group_index is None:
            return 0.0
        return 1.0 - self.kept_groups * self.sparse_group / self.shape[1]

    def to(self, device) -> "QuantizedWeight":
        return replace(self, packed=self.packed.to(device), scale=self.scale.to(device),
                       offset=self.offset.to(device),
                       group_index=None if self.group_index is None else self.group_index.to(device))

    def check(self, where: str = "") -> None:
        """FormatError when the tensors do not fit the layout (shapes, dtypes, the group index)."""
        out, cols = self.shape
        g, big = self.spec.group, self.sparse_group
        prefix = f"{where}: " if where else ""
        if cols % g or (big is not None and (g % big or big not in SPARSE_GROUPS)):
            raise FormatError(f"{prefix}group sizes g={g}, G={big} do not fit {cols} input columns")
        n = cols if self.group_index is None else self.kept_groups * big
        want = {"packed": (torch.uint8, (out, n // 2 if self.spec.bits == 4 else n)),
                "scale": (torch.float16, (out, cols // g)), "offset": (torch.float16, (out, cols // g))}
        if self.group_index is not None:
            want["group_index"] = (torch.int32, (out, self.kept_groups))
        for name, (dtype, shape) in want.items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise FormatError(f"{prefix}{name} is {t.dtype} {tuple(t.shape)}, the layout needs {dtype} {shape}")
        if self.group_index is not None and self.group_index.numel():
            idx = self.group_index.long()
            if int(idx.min()) < 0 or int(idx.max()) >= cols // big or bool((idx[:, 1:] <= idx[:, :-1]).any()):
                raise FormatError(f"{prefix}group_index must hold ascending groups in 0..{cols // big - 1}")

    def describe(self) -> str:
        text = str(self.spec)
        if self.group_index is not None:
            text += f" group:{self.sparse_group} ({self.kept_groups} of {self.shape[1] // self.sparse_group} kept)"
        return text
