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


def _rows(x: torch.Tensor, features: int | None, who: str, check_finite: bool = True) -> torch.Tensor:
    """Flatten ``x`` to ``[samples, in_features]`` and check it (``check_finite=False``: the
    caller checks for NaN and inf itself)."""
    if not isinstance(x, torch.Tensor):
        raise TargetError(f"{who}: expected a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise TargetError(f"{who}: input is a scalar; expected shape [..., in_features]")
    if features is not None and x.shape[-1] != features:
        raise TargetError(
            f"{who}: input has {x.shape[-1]} features in its last dim, expected {features}"
        )
    x = x.detach().reshape(-1, x.shape[-1])
    if check_finite:
        _check_finite(x, who)
    return x


def _check_finite(x: torch.Tensor, who: str) -> None:
    if not torch.isfinite(x).all():
        raise TargetError(f"{who}: calibration input contains NaN or inf")


class InputNormAccumulator:
    """Per-input-channel sum, sum of squares and sample count.

    The totals are float64 (``dtype``): ``var`` is a difference of two sums. Each slice of a
    batch is reduced in float32, which is 6-7x faster than in float64 and is what makes the
    calibration pass's statistics cheap next to its forward pass; the values are first shifted
    by a per-channel constant (the first batch's mean), so a channel whose mean is large next
    to its spread keeps its variance (the sums are of ``x - shift``; the properties undo it).
    """

    _CHUNK_ELEMENTS = 1 << 22  # per slice of the input (16 MiB in float32)

    def __init__(self, in_features: int | None = None, *, dtype=torch.float64, device=None):
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self.count = 0
        self._sum: torch.Tensor | None = None  # sum of (x - shift)
        self._sq: torch.Tensor | None = None  # sum of (x - shift)^2
        self._shift: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features, "InputNormAccumulator", check_finite=False)
        if self._sum is None:
            self.in_features = x.shape[1]
            device = self.device if self.device is not None else x.device
            self._sum = torch.zeros(self.in_features, dtype=self.dtype, device=device)
            self._sq = torch.zeros_like(self._sum)
            head = x[: 1024].float()
            _check_finite(head, "InputNormAccumulator")
            self._shift = head.double().mean(0).float()  # summed in float64: no overflow near float32's limit
        step = max(1, self._CHUNK_ELEMENTS // x.shape[1])
        for part in x.split(step):
            shifted = part.float() - self._shift.to(part.device)
            total, squares = shifted.sum(0), shifted.square_().sum(0)
            if not (torch.isfinite(total).all() and torch.isfinite(squares).all()):
                _check_finite(part, "InputNormAccumulator")  # NaN or inf: the error
                shifted = part.to(torch.float64) - self._shift.to(part.device, torch.float64)  # overflowed float32
                total, squares = shifted.sum(0), shifted.square_().sum(0)
            self._sum += total.to(self._sum)
            self._sq += squares.to(self._sum)
        self.count += x.shape[0]

    def _unshift_(self) -> None:
        """Make the sums plain sums of ``x`` and ``x^2`` (shift 0), e.g. before adding other
        processes' sums, which were shifted by their own constants."""
        if self._shift is None or self._sum is None:
            return
        c = self._shift.to(self._sum)
        # out of place: the sums may be inference tensors (made inside torch.inference_mode)
        self._sq = self._sq + 2 * c * self._sum + self.count * c * c
        self._sum = self._sum + self.count * c
        self._shift = torch.zeros_like(self._shift)

    def all_reduce_(self, ranks) -> None:
        """Sum the sums and counts over the processes of ``ranks``
        (:class:`sparsecraft.distributed.Ranks`); afterwards every process holds the totals."""
        def zeros(width):
            device = self.device if self.device is not None else torch.device("cpu")
            return [torch.zeros(width, dtype=self.dtype, device=device) for _ in range(2)]

        self._unshift_()
        parts = None if self._sum is None else [self._sum, self._sq]
        self.count, self.in_features, parts = _sum_over_ranks(ranks, self.count, self.in_features, parts, zeros)
        if parts is not None:
            self._sum, self._sq = parts
            if self._shift is None:  # this process had no samples
                self._shift = torch.zeros(self.in_features, dtype=torch.float32, device=self._sum.device)

    def _need(self) -> None:
        if self._sum is None or self.count == 0:
            raise TargetError("InputNormAccumulator: no calibration samples were added")

    @property
    def sq_norm(self) -> torch.Tensor:
        """``||X_j||_2^2`` per input channel (sum over all samples)."""
        self._need()
        c = self._shift.to(self._sum)
        return (self._sq + 2 * c * self._sum + self.count * c * c).clamp_min(0)

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input channel over the samples."""
        self._need()
        return self._shift.to(self._sum) + self._sum / self.count

    @property
    def mean_sq(self) -> torch.Tensor:
        """Mean of the squared input per channel (``sq_norm / count``)."""
        return self.sq_norm / self.count

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each input channel (clamped at 0 against rounding)."""
        self._need()
        mean = self._sum / self.count  # of the shifted values: the variance is the same
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
