"""Calibration statistics of a layer's input, accumulated batch by batch.

The driver feeds each batch of a layer's input ``x`` (shape ``[..., in_features]``, any
leading dims: batch, sequence) to ``add``. Every row of the flattened ``x`` is one sample
(one token), so the statistics do not depend on how the calibration set was batched.

* :class:`InputNormAccumulator`: per input channel the sum, the sum of squares and the
  count, hence ``sq_norm`` (``||X_j||^2``, Wanda), ``mean`` and ``var`` (DSnoT).
* :class:`HessianAccumulator`: ``H = 2/n * sum_t x_t x_t^T`` as in SparseGPT.

Both keep raw sums and a sample count, so accumulators of disjoint parts of the calibration
set combine exactly by adding them: ``all_reduce_`` sums them over the processes of a
``torch.distributed`` group (:mod:`sparsecraft.distributed`) and the normalisation then uses
the global count. The sums are float64: the per-batch terms (float32 products for the
Hessian) add up to the same number, to float64 rounding, whichever way the batches are
grouped, so the float32 statistics a solver reads match one process's.

Linear inputs only for now; a convolution's input would first be unfolded so that the
columns match the weight's reduction view (``in_channels x kernel``).
"""

from __future__ import annotations

import torch

from ..errors import SparsecraftError, TargetError

__all__ = ["InputNormAccumulator", "HessianAccumulator"]


def _sum_over_ranks(ranks, count: int, width: int | None, tensors: list[torch.Tensor] | None,
                    make) -> tuple[int, int | None, list[torch.Tensor] | None]:
    """Sum ``count`` and ``tensors`` (raw sums) over ``ranks``; a rank that saw no sample
    (``tensors`` None) takes part with zeros of the ``width`` the others report."""
    fed = tensors is not None
    header = ranks.sum_(torch.tensor([count, int(fed), (width or 0) * fed], dtype=torch.int64))
    count, fed_ranks, widths = (int(v) for v in header)
    if fed_ranks == 0:
        return 0, width, None
    if widths % fed_ranks or (fed and widths != width * fed_ranks):
        raise TargetError("calibration statistics: the processes saw inputs of different widths")
    if tensors is None:
        tensors = make(widths // fed_ranks)
    for t in tensors:
        ranks.sum_(t)
    return count, widths // fed_ranks, tensors


def _rows(x: torch.Tensor, features: int | None, who: str) -> torch.Tensor:
    """Flatten ``x`` to ``[samples, in_features]`` and check it."""
    if not isinstance(x, torch.Tensor):
        raise TargetError(f"{who}: expected a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise TargetError(f"{who}: input is a scalar; expected shape [..., in_features]")
    if features is not None and x.shape[-1] != features:
        raise TargetError(
            f"{who}: input has {x.shape[-1]} features in its last dim, expected {features}"
        )
    x = x.detach().reshape(-1, x.shape[-1])
    if not torch.isfinite(x).all():
        raise TargetError(f"{who}: calibration input contains NaN or inf")
    return x


class InputNormAccumulator:
    """Per-input-channel sum, sum of squares and sample count.

    Accumulates in float64 by default: these are small vectors, and ``var`` is a
    difference of two sums that float32 would cancel badly over many tokens.
    """

    _CHUNK_ELEMENTS = 1 << 22  # per widened slice of the input (32 MiB in float64)

    def __init__(self, in_features: int | None = None, *, dtype=torch.float64, device=None):
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features, "InputNormAccumulator")
        if self._sum is None:
            self.in_features = x.shape[1]
            device = self.device if self.device is not None else x.device
            self._sum = torch.zeros(self.in_features, dtype=self.dtype, device=device)
            self._sq = torch.zeros_like(self._sum)
        # a few rows at a time: a widened copy of a wide layer's whole input (and its square)
        # would be the largest allocation of a calibration pass
        step = max(1, self._CHUNK_ELEMENTS // x.shape[1])
        for part in x.split(step):
            part = part.to(device=self._sum.device, dtype=self.dtype)
            self._sum += part.sum(dim=0)
            self._sq += (part * part).sum(dim=0)
        self.count += x.shape[0]

    def all_reduce_(self, ranks) -> None:
        """Sum the sums and counts over the processes of ``ranks``
        (:class:`sparsecraft.distributed.Ranks`); afterwards every process holds the totals."""
        def zeros(width):
            device = self.device if self.device is not None else torch.device("cpu")
            return [torch.zeros(width, dtype=self.dtype, device=device) for _ in range(2)]

        parts = None if self._sum is None else [self._sum, self._sq]
        self.count, self.in_features, parts = _sum_over_ranks(ranks, self.count, self.in_features, parts, zeros)
        if parts is not None:
            self._sum, self._sq = parts

    def _need(self) -> None:
        if self._sum is None or self.count == 0:
            raise TargetError("InputNormAccumulator: no calibration samples were added")

    @property
    def sq_norm(self) -> torch.Tensor:
        """``||X_j||_2^2`` per input channel (sum over all samples)."""
        self._need()
        return self._sq.clone()

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input channel over the samples."""
        self._need()
        return self._sum / self.count

    @property
    def mean_sq(self) -> torch.Tensor:
        """Mean of the squared input per channel (``sq_norm / count``)."""
        self._need()
        return self._sq / self.count

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each input channel (clamped at 0 against rounding)."""
        mean = self.mean
        return (self._sq / self.count - mean * mean).clamp_min(0)


class HessianAccumulator:
    """``H = 2/n * sum_t x_t x_t^T`` over all ``n`` samples seen.

    Each batch's ``X^T X`` is computed in ``dtype`` (float32 by default, or float64) and added
    to a float64 sum; ``hessian`` is ``2/n`` times that sum in ``dtype``, on ``device``
    (default: the device of the first batch). It is computed once and kept until the next
    ``add``: the solvers get the accumulator's own tensor and copy before they change it.
    The calibration driver calls :meth:`close` when it takes the Hessian, which frees the sum.
    """

    _CHUNK_ELEMENTS = 1 << 22  # per slice of a batch's product (16 MiB in float32)

    def __init__(self, in_features: int | None = None, *, dtype=torch.float32, device=None):
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self.count = 0
        self._sum: torch.Tensor | None = None  # float64 sum of the per-batch products
        self._h: torch.Tensor | None = None
        self.closed = False

    def add(self, x: torch.Tensor) -> None:
        self._check_open()
        x = _rows(x, self.in_features, "HessianAccumulator")
        if self._sum is None:
            self.in_features = x.shape[1]
            device = self.device if self.device is not None else x.device
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        if x.shape[0] == 0:
            return
        x = x.to(device=self._sum.device, dtype=self.dtype)
        # a slice of columns at a time: the whole product of a wide layer (5632^2 floats) would
        # be the largest allocation of a calibration pass; narrow layers take one product
        step = max(1, self._CHUNK_ELEMENTS // x.shape[1])
        for j in range(0, x.shape[1], step):
            self._sum[:, j:j + step] += x.t() @ x[:, j:j + step]
        self.count += x.shape[0]
        self._h = None

    def all_reduce_(self, ranks) -> None:
        """Sum the sums and counts over the processes of ``ranks``
        (:class:`sparsecraft.distributed.Ranks`); ``hessian`` then uses the global count."""
        self._check_open()

        def zeros(width):
            device = self.device if self.device is not None else torch.device("cpu")
            return [torch.zeros(width, width, dtype=torch.float64, device=device)]

        parts = None if self._sum is None else [self._sum]
        self.count, self.in_features, parts = _sum_over_ranks(ranks, self.count, self.in_features, parts, zeros)
        if parts is not None:
            self._sum = parts[0]
        self._h = None

    def _check_open(self) -> None:
        if self.closed:
            raise SparsecraftError("HessianAccumulator: closed (its Hessian was taken); it takes no more samples")

    @property
    def hessian(self) -> torch.Tensor:
        if self._h is None and (self._sum is None or self.count == 0):
            raise TargetError("HessianAccumulator: no calibration samples were added")
        if self._h is None:
            self._h = (self._sum * (2.0 / self.count)).to(self.dtype)
        return self._h

    def close(self) -> torch.Tensor:
        """No more samples: the Hessian is computed in the float64 sum's own memory and the
        sum is freed (for a wide layer the sum is twice the Hessian's size, and both would be
        alive while the solver works). The same values as :attr:`hessian`; ``add`` and
        ``all_reduce_`` are refused afterwards."""
        if not self.closed:
            if self._h is None:
                if self._sum is None or self.count == 0:
                    raise TargetError("HessianAccumulator: no calibration samples were added")
                with torch.inference_mode(self._sum.is_inference()):  # the sum may come from hooks run there
                    self._sum.mul_(2.0 / self.count)
                h = self._sum.to(self.dtype)
                self._h = h.clone() if h.is_inference() else h  # a plain tensor, as `hessian` gives
            self._sum, self.closed = None, True
        return self._h
