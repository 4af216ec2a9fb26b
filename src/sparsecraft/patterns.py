"""Sparsity patterns: importance scores + a sparsity level -> a boolean keep-mask.

A pattern decides what shape the zeros may take. It never looks at weights, only at the
scores a criterion produced, so every criterion works with every pattern.

All patterns work on the 2-D *reduction view* of a weight: ``scores.reshape(shape[0], -1)``.
For a ``Linear`` weight ``[out, in]`` that is the weight itself; for a convolution
``[out, in/groups, *kernel]`` the columns run over ``in_channels x kernel`` in PyTorch's
memory order, the reduction dimension of the convolution seen as a matrix product.

Rounding rule (the same everywhere): a sparsity ``s`` over ``u`` prunable units prunes
``floor(s * u + 0.5)`` units, the nearest whole number with halves rounded up. Units are
elements (unstructured), blocks (block r x c), rows (rows) or, per row, groups (group:G). The realised sparsity is
therefore exact up to one unit, and it is exactly ``k / u`` for the ``k`` reported.

Tie rule: among equal scores the element (group, block, row) with the lower flat index is
pruned first. Sorting is stable, so the same scores always give the same mask.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError, TargetError

__all__ = [
    "Pattern",
    "Unstructured",
    "NM",
    "Block",
    "Rows",
    "Group",
    "PatternMismatch",
    "parse_pattern",
    "num_to_prune",
    "reduction_view",
]


class PatternMismatch(TargetError):
    """A layer's shape cannot be tiled by the pattern (e.g. in_features % M != 0)."""


def num_to_prune(sparsity: float, units: int) -> int:
    """Units to prune for ``sparsity`` over ``units``: nearest integer, halves rounded up."""
    return min(units, max(0, math.floor(sparsity * units + 0.5)))


def reduction_view(t: torch.Tensor) -> torch.Tensor:
    """The 2-D [outputs, reduction] view of a weight-shaped tensor."""
    if t.dim() == 0:
        raise TargetError("cannot apply a pattern to a scalar parameter")
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor, as a 0-d tensor."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        # numpy's introselect is ~30x faster than torch.kthvalue on CPU for large layers
        flat = scores.detach().contiguous().numpy()
        return torch.tensor(np.partition(flat, k - 1)[k - 1], dtype=scores.dtype)
    return torch.kthvalue(scores, k).values


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over a 1-D score vector that prunes the ``k`` lowest (ties: lower index).

    Selection, not a sort: the k-th smallest value ``v`` splits the scores; everything
    below ``v`` goes, and of the scores equal to ``v`` the ones with the lowest indices go
    until ``k`` are pruned. Same result as a stable sort, in linear time.
    """
    n = scores.numel()
    if k <= 0:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    v = _kth_smallest(scores, k)
    pruned = scores <= v
    if int(pruned.sum()) != k:  # entries equal to v straddle the cut: the lowest indices go
        below = scores < v
        ties = scores == v
        need = k - int(below.sum())
        pruned = below | (ties & (torch.cumsum(ties, 0) <= need))
    return ~pruned


class Pattern:
    """Base class: turns scores and a sparsity into a keep-mask of the scores' shape."""

    #: Sparsity the pattern imposes by itself (N:M), or None when the caller chooses.
    fixed_sparsity: float | None = None

    def check(self, shape: tuple[int, ...], layer: str = "") -> None:
        """Raise :class:`PatternMismatch` naming ``layer`` if the shape cannot be tiled."""

    def units(self, shape: tuple[int, ...]) -> int:
        """Number of prunable units for a tensor of ``shape``."""
        raise NotImplementedError

    def keep_mask(
        self,
        scores: torch.Tensor,
        sparsity: float | None = None,
        *,
        num_pruned: int | None = None,
        layer: str = "",
    ) -> torch.Tensor:
        """Boolean mask of ``scores.shape``; True marks a weight that stays."""
        raise NotImplementedError

    def is_valid(self, mask: torch.Tensor) -> bool:
        """Whether a keep-mask has this pattern's shape (not its sparsity)."""
        return True

    def _count(self, shape, sparsity, num_pruned) -> int:
        units = self.units(tuple(shape))
        if num_pruned is not None:
            if not 0 <= num_pruned <= units:
                raise ConfigError(f"num_pruned={num_pruned} outside [0, {units}]")
            return int(num_pruned)
        if sparsity is None:
            raise ConfigError(f"pattern {self} needs a sparsity")
        return num_to_prune(float(sparsity), units)

    def __str__(self) -> str:  # the spelling parse_pattern accepts
        raise NotImplementedError


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any element may be pruned; the ``k`` lowest scores go."""

    def units(self, shape):
        return math.prod(shape)

    def keep_mask(self, scores, sparsity=None, *, num_pruned=None, layer=""):
        k = self._count(scores.shape, sparsity, num_pruned)
        return _prune_lowest(scores.reshape(-1), k).reshape(scores.shape)

    def __str__(self):
        return "unstructured"


@dataclass(frozen=True)
class NM(Pattern):
    """N:M: in every group of M consecutive weights along the reduction dim, N stay."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise ConfigError(f"N:M needs integers, got {self.n!r}:{self.m!r}")
        if self.m < 2 or not 1 <= self.n < self.m:
            raise ConfigError(f"N:M pattern {self.n}:{self.m} needs 1 <= N < M")

    @property
    def fixed_sparsity(self) -> float:  # type: ignore[override]
        return 1.0 - self.n / self.m

    def check(self, shape, layer=""):
        cols = _view_shape(tuple(shape))[1]
        if cols % self.m:
            raise PatternMismatch(
                f"layer '{layer}': N:M {self} needs the reduction size {cols} "
                f"(shape {tuple(shape)}) to be divisible by M={self.m}"
            )

    def units(self, shape):
        return math.prod(shape)

    def keep_mask(self, scores, sparsity=None, *, num_pruned=None, layer=""):
        self.check(scores.shape, layer)
        if sparsity is not None and abs(sparsity - self.fixed_sparsity) > 1e-9:
            raise ConfigError(
                f"layer '{layer}': pattern {self} fixes sparsity at {self.fixed_sparsity:.4f}, "
                f"but {sparsity:.4f} was asked; leave sparsity unset or use the same value"
            )
        groups = reduction_view(scores).reshape(-1, self.m)
        order = torch.sort(groups, dim=1, stable=True).indices
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(1, order[:, : self.m - self.n], False)
        return keep.reshape(scores.shape)

    def choices(self) -> torch.Tensor:
        """Every keep pattern of one group, ``[C(M, N), M]`` booleans, in lexicographic order."""
        rows = [[j in kept for j in range(self.m)] for kept in itertools.combinations(range(self.m), self.n)]
        return torch.tensor(rows, dtype=torch.bool)

    def is_valid(self, mask):
        cols = reduction_view(mask).shape[1]
        if cols % self.m:
            return False
        per_group = reduction_view(mask).reshape(-1, self.m).sum(dim=1)
        return bool((per_group == self.n).all())

    def __str__(self):
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block(Pattern):
    """Whole r x c tiles of the reduction view are pruned; a tile's score is its sum."""

    rows: int
    cols: int

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ConfigError(f"block pattern needs positive sizes, got {self.rows}x{self.cols}")

    def check(self, shape, layer=""):
        out, red = _view_shape(tuple(shape))
        if out % self.rows or red % self.cols:
            raise PatternMismatch(
                f"layer '{layer}': block {self.rows}x{self.cols} does not tile the "
                f"{out}x{red} reduction view of shape {tuple(shape)}"
            )

    def units(self, shape):
        out, red = _view_shape(tuple(shape))
        return (out // self.rows) * (red // self.cols)

    def _tiles(self, t: torch.Tensor) -> torch.Tensor:
        out, red = reduction_view(t).shape
        return (
            reduction_view(t)
            .reshape(out // self.rows, self.rows, red // self.cols, self.cols)
            .permute(0, 2, 1, 3)
        )

    def keep_mask(self, scores, sparsity=None, *, num_pruned=None, layer=""):
        self.check(scores.shape, layer)
        k = self._count(scores.shape, sparsity, num_pruned)
        tiles = self._tiles(scores)
        block_scores = tiles.sum(dim=(2, 3), dtype=torch.float64)
        keep_blocks = _prune_lowest(block_scores.reshape(-1), k).reshape(block_scores.shape)
        keep = keep_blocks[:, :, None, None].expand_as(tiles).permute(0, 2, 1, 3)
        return keep.reshape(scores.shape).contiguous()

    def is_valid(self, mask):
        tiles = self._tiles(mask)
        kept = tiles.sum(dim=(2, 3))
        return bool(((kept == 0) | (kept == self.rows * self.cols)).all())

    def __str__(self):
        return f"block:{self.rows}x{self.cols}"


@dataclass(frozen=True)
class Rows(Pattern):
    """Whole output rows (Linear output features, conv filters); a row's score is its sum."""

    def units(self, shape):
        return _view_shape(tuple(shape))[0]

    def keep_mask(self, scores, sparsity=None, *, num_pruned=None, layer=""):
        k = self._count(scores.shape, sparsity, num_pruned)
        view = reduction_view(scores)
        row_scores = view.sum(dim=1, dtype=torch.float64)
        keep_rows = _prune_lowest(row_scores, k)
        return keep_rows[:, None].expand_as(view).reshape(scores.shape).contiguous()

    def is_valid(self, mask):
        kept = reduction_view(mask).sum(dim=1)
        return bool(((kept == 0) | (kept == reduction_view(mask).shape[1])).all())

    def __str__(self):
        return "rows"


@dataclass(frozen=True)
class Group(Pattern):
    """group:G: whole runs of G consecutive weights of a row (along the reduction dim) are
    pruned, and every row keeps the same number of runs (row-balanced, N:M at the level of
    groups), so kernels can skip groups with balanced work and the sparsity is exact.

    A group's score is the sum of its scores. Rounding: each row prunes
    ``floor(s * C/G + 0.5)`` of its ``C/G`` groups (ties: lower index first), so the realised
    sparsity is that count over ``C/G`` for every row.
    """

    size: int

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 2:
            raise ConfigError(f"group pattern needs a group size G >= 2, got {self.size!r}")

    def check(self, shape, layer=""):
        cols = _view_shape(tuple(shape))[1]
        if cols % self.size:
            raise PatternMismatch(
                f"layer '{layer}': group:{self.size} needs the reduction size {cols} "
                f"(shape {tuple(shape)}) to be divisible by G={self.size}"
            )

    def units(self, shape):
        out, red = _view_shape(tuple(shape))
        return out * (red // self.size)

    def per_row(self, shape, sparsity=None, num_pruned=None) -> int:
        """Groups each row prunes (``num_pruned`` counts groups over the whole layer)."""
        out, red = _view_shape(tuple(shape))
        groups = red // self.size
        if num_pruned is not None:
            if not 0 <= num_pruned <= out * groups or num_pruned % out:
                raise ConfigError(
                    f"group:{self.size} prunes the same number of groups in each of the {out} rows; "
                    f"num_pruned={num_pruned} is not a multiple of {out} in [0, {out * groups}]"
                )
            return int(num_pruned) // out
        if sparsity is None:
            raise ConfigError(f"pattern {self} needs a sparsity")
        return num_to_prune(float(sparsity), groups)

    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``[rows, C/G]`` sums of the scores of each group (float64)."""
        view = reduction_view(scores)
        return view.reshape(view.shape[0], -1, self.size).sum(dim=2, dtype=torch.float64)

    def keep_groups(self, group_scores: torch.Tensor, k: int) -> torch.Tensor:
        """Boolean ``[rows, groups]``: each row drops its ``k`` lowest groups (ties: lower index)."""
        keep = torch.ones_like(group_scores, dtype=torch.bool)
        if k > 0:
            order = torch.sort(group_scores, dim=1, stable=True).indices
            keep.scatter_(1, order[:, :k], False)
        return keep

    def keep_mask(self, scores, sparsity=None, *, num_pruned=None, layer=""):
        self.check(scores.shape, layer)
        k = self.per_row(scores.shape, sparsity, num_pruned)
        keep = self.keep_groups(self.group_scores(scores), k)
        return keep.repeat_interleave(self.size, dim=1).reshape(scores.shape).contiguous()

    def is_valid(self, mask):
        view = reduction_view(mask)
        if view.shape[1] % self.size:
            return False
        runs = view.reshape(view.shape[0], -1, self.size).sum(dim=2)
        whole = bool(((runs == 0) | (runs == self.size)).all())
        kept = (runs == self.size).sum(dim=1)
        return whole and bool((kept == kept[0]).all())

    def __str__(self):
        return f"group:{self.size}"


_NM_RE = re.compile(r"^(\d+):(\d+)$")
_BLOCK_RE = re.compile(r"^(?:block:)?(\d+)x(\d+)$")
_GROUP_RE = re.compile(r"^group:(\d+)$")
_ALIASES = {"unstructured": Unstructured, "rows": Rows, "channels": Rows, "filters": Rows}


def parse_pattern(spec: str | Pattern) -> Pattern:
    """Build a pattern from its spelling: ``unstructured``, ``2:4``, ``block:4x4``, ``rows``,
    ``group:16``."""
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        # YAML 1.1 (yaml.safe_load) reads an unquoted 2:4 as the base-60 number 124
        raise ConfigError(
            f"pattern must be a string, got the number {spec!r}; if it came from YAML, quote it "
            f"(pattern: \"2:4\"): YAML 1.1 reads 2:4 as 2*60+4 = 124"
        )
    if not isinstance(spec, str):
        raise ConfigError(f"pattern must be a string or Pattern, got {type(spec).__name__}")
    text = spec.strip().lower()
    if text in _ALIASES:
        return _ALIASES[text]()
    if m := _NM_RE.match(text):
        return NM(int(m.group(1)), int(m.group(2)))
    if m := _BLOCK_RE.match(text):
        return Block(int(m.group(1)), int(m.group(2)))
    if m := _GROUP_RE.match(text):
        return Group(int(m.group(1)))
    raise ConfigError(
        f"unknown pattern '{spec}'; use 'unstructured', 'N:M' (e.g. '2:4'), "
        f"'block:RxC' (e.g. 'block:4x4'), 'group:G' (e.g. 'group:16') or 'rows'"
    )
