"""Round to nearest: every group's grid from its own weights, each weight to its nearest level."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .grid import QuantSpec, fit_grid, quantize_codes
from .tensor import QuantizedWeight

__all__ = ["rtn_quantize"]


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None,
                 sparse_group: int | None = None, layer: str = "") -> QuantizedWeight:
    """Quantise ``weight [out, in]`` round-to-nearest.

    ``keep`` (bool, the weight's shape) marks pruned weights: they get no say in their group's
    grid and get the zero code (exactly 0 on a symmetric grid; asymmetric grids refuse element
    masks, see :mod:`.grid`). With ``sparse_group`` G, ``keep`` must prune whole runs of G,
    the same number per row, and only the kept groups are stored.
    """
    w = weight.detach().float()
    if w.dim() != 2:
        raise ConfigError(f"layer '{layer}': quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    out, cols = w.shape
    spec.check_width(cols, layer)
    if keep is not None and not spec.symmetric and sparse_group is None and not bool(keep.all()):
        raise ConfigError(f"layer '{layer}': asymmetric grids cannot hold pruned weights at exactly 0; "
                          "use symmetric quantisation or a group:G pattern")
    g = spec.group
    groups = w.reshape(out, cols // g, g)
    k = None if keep is None else keep.reshape(out, cols // g, g)
    scale, offset = fit_grid(groups, spec, k, layer)
    codes = quantize_codes(groups, scale[..., None], offset[..., None], spec)
    if k is not None:
        codes = torch.where(k, codes, torch.full_like(codes, spec.zero))
    codes = codes.reshape(out, cols)
    group_keep = None
    if sparse_group is not None:
        if keep is None:
            raise ConfigError(f"layer '{layer}': a group-sparse weight needs its keep mask")
        group_keep = keep.reshape(out, cols // sparse_group, sparse_group)[..., 0]
    return QuantizedWeight.from_codes(codes, scale, offset, spec, group_keep, sparse_group)
