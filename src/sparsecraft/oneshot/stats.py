"""Calibration statistics of a layer's input, accumulated batch by batch.

The driver feeds each batch of a layer's input ``x`` (shape ``[..., in_features]``, any
leading dims: batch, sequence) to ``add``. Every row of the flattened ``x`` is one sample
(one token), so the statistics do not depend on how the calibration set was batched.

* :class:`InputNormAccumulator`: per input channel the sum, the sum of squares and the
  count, hence ``sq_norm`` (``||X_j||^2``, Wanda), ``mean`` and ``var`` (DSnoT).
* :class:`HessianAccumulator`: ``H = 2/n * sum_t x_t x_t^T`` as a running average, as in
  SparseGPT, so the scale does not grow with the number of samples.

Linear inputs only for now; a convolution's input would first be unfolded so that the
columns match the weight's reduction view (``in_channels x kernel``).
"""

from __future__ import annotations

import math

import torch

from ..errors import TargetError

__all__ = ["InputNormAccumulator", "HessianAccumulator"]


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
        x = x.to(device=self._sum.device, dtype=self.dtype)
        self._sum += x.sum(dim=0)
        self._sq += (x * x).sum(dim=0)
        self.count += x.shape[0]

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
    """``H = 2/n * sum_t x_t x_t^T`` over all ``n`` samples seen, kept as a running mean.

    ``dtype`` float32 (default) or float64; the result lives on ``device`` (default: the
    device of the first batch). ``hessian`` returns the accumulator's own tensor (no copy;
    the solvers copy before they change anything).
    """

    def __init__(self, in_features: int | None = None, *, dtype=torch.float32, device=None):
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self.count = 0
        self._h: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features, "HessianAccumulator")
        if self._h is None:
            self.in_features = x.shape[1]
            device = self.device if self.device is not None else x.device
            self._h = torch.zeros(
                self.in_features, self.in_features, dtype=self.dtype, device=device
            )
        b = x.shape[0]
        if b == 0:
            return
        # Rescale the old mean before adding, so H never holds an unnormalised sum.
        self._h *= self.count / (self.count + b)
        self.count += b
        x = x.to(device=self._h.device, dtype=self.dtype) * math.sqrt(2.0 / self.count)
        self._h.addmm_(x.t(), x)

    @property
    def hessian(self) -> torch.Tensor:
        if self._h is None or self.count == 0:
            raise TargetError("HessianAccumulator: no calibration samples were added")
        return self._h
