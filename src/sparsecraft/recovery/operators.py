"""Linear measurement operators ``A`` for ``y = A x + noise``.

All operators act on one vector of shape ``(N,)`` or a batch of shape ``(N, B)`` (columns are
vectors), in real or complex arithmetic, on the device of their data:

* :class:`DenseOperator` wraps an explicit ``M x N`` matrix;
* :class:`KroneckerOperator` is ``F_1 (x) F_2 (x) ... (x) F_k`` (``torch.kron`` ordering, the
  first factor varies slowest), applied mode by mode and never formed, so a product costs
  ``O(N sum_i M_i)`` instead of ``O(M N)``;
* :class:`PartialDFTOperator` is a row subset of the unitary DFT matrix, applied by FFT.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ._common import RecoveryError, to_tensor


class LinearOperator:
    """Base class: a linear map from ``C^N`` (or ``R^N``) to ``C^M`` given by products."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    @property
    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for ``x`` of shape ``(N,)`` or ``(N, B)``."""
        raise NotImplementedError

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """``A^H @ y`` for ``y`` of shape ``(M,)`` or ``(M, B)``."""
        raise NotImplementedError

    def column(self, j: int) -> torch.Tensor:
        """Column ``j`` of ``A`` as a length-``M`` vector."""
        e = torch.zeros(self.shape[1], dtype=self.dtype, device=self.device)
        e[j] = 1
        return self.matvec(e)

    def columns(self, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The ``M x len(idx)`` submatrix of the chosen columns."""
        idx = torch.as_tensor(idx, dtype=torch.long).tolist()
        if not idx:
            return torch.zeros(self.shape[0], 0, dtype=self.dtype, device=self.device)
        return torch.stack([self.column(j) for j in idx], dim=1)

    def column_norms(self) -> torch.Tensor:
        """Euclidean norm of every column (real tensor of length ``N``)."""
        return self.to_dense().abs().pow(2).sum(0).sqrt()

    def to_dense(self) -> torch.Tensor:
        """The explicit ``M x N`` matrix (memory ``M N``: only for moderate sizes)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self.matvec(eye)

    def norm_estimate(self, n_iter: int = 50, seed: int = 0) -> float:
        """Largest singular value by power iteration on ``A^H A``."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(self.shape[1], generator=g, dtype=torch.float64).to(self.device, self.dtype)
        v = v / torch.linalg.vector_norm(v)
        s = 0.0
        for _ in range(n_iter):
            w = self.rmatvec(self.matvec(v))
            s_new = float(torch.linalg.vector_norm(w))
            if s_new == 0.0:
                return 0.0
            v = w / s_new
            if abs(s_new - s) <= 1e-6 * s_new:
                s = s_new
                break
            s = s_new
        return math.sqrt(s)

    def __matmul__(self, x):
        return self.matvec(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class DenseOperator(LinearOperator):
    """An explicit matrix ``A`` (numpy or torch), shape ``(M, N)``."""

    def __init__(self, matrix, name: str = "A"):
        self.matrix = to_tensor(matrix, name, ndim=(2,))
        self.shape = tuple(self.matrix.shape)
        self.dtype = self.matrix.dtype
        self.device = self.matrix.device

    def matvec(self, x):
        return self.matrix @ x

    def rmatvec(self, y):
        return self.matrix.mH @ y

    def column(self, j):
        return self.matrix[:, j]

    def columns(self, idx):
        return self.matrix[:, torch.as_tensor(idx, dtype=torch.long, device=self.device)]

    def column_norms(self):
        # at recovery sizes (128 x 512) torch's norm costs several times numpy's, its complex
        # norm most: OMP's fixed cost per call was mostly this
        if self.device.type == "cpu":
            return torch.from_numpy(np.linalg.norm(self.matrix.detach().resolve_conj().numpy(), axis=0))
        if self.matrix.is_complex():
            return torch.linalg.vector_norm(torch.view_as_real(self.matrix.resolve_conj()), dim=(0, 2))
        return torch.linalg.vector_norm(self.matrix, dim=0)

    def to_dense(self):
        return self.matrix

    def to(self, dtype=None, device=None) -> "DenseOperator":
        return DenseOperator(self.matrix.to(dtype=dtype or self.dtype, device=device or self.device))


def _mode_product(t: torch.Tensor, mat: torch.Tensor, mode: int) -> torch.Tensor:
    """Multiply tensor ``t`` along axis ``mode`` by ``mat`` (``mat @ t`` on that axis)."""
    out = torch.tensordot(mat, t, dims=([1], [mode]))
    return torch.movedim(out, 0, mode)


def kron_apply(factors: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(F_1 (x) ... (x) F_k) @ x`` without forming the product; ``x`` is ``(N,)`` or ``(N, B)``."""
    squeeze = x.ndim == 1
    xb = x.reshape(x.shape[0], -1)
    b = xb.shape[1]
    t = xb.reshape(*[f.shape[1] for f in factors], b)
    for i, f in enumerate(factors):
        t = _mode_product(t, f, i)
    out = t.reshape(-1, b)
    return out[:, 0] if squeeze else out


class KroneckerOperator(LinearOperator):
    """``A = F_1 (x) F_2 (x) ... (x) F_k`` (k >= 2), never formed.

    Args:
        factors: matrices ``F_i`` of shape ``(M_i, N_i)``, numpy or torch, real or complex.
            They are promoted to a common dtype and must share a device.
    """

    def __init__(self, factors: Sequence):
        if isinstance(factors, (np.ndarray, torch.Tensor)) or not isinstance(factors, (list, tuple)):
            raise RecoveryError("factors must be a list or tuple of 2-D matrices")
        if len(factors) < 2:
            raise RecoveryError(f"factors must hold at least 2 matrices, got {len(factors)}")
        fs = [to_tensor(f, f"factors[{i}]", ndim=(2,)) for i, f in enumerate(factors)]
        dev = fs[0].device
        for i, f in enumerate(fs):
            if f.device != dev:
                raise RecoveryError(f"factors[{i}] is on {f.device}, factors[0] on {dev}")
        dt = fs[0].dtype
        for f in fs[1:]:
            dt = torch.promote_types(dt, f.dtype)
        self.factors = [f.to(dt) for f in fs]
        self.in_dims = [f.shape[1] for f in self.factors]
        self.out_dims = [f.shape[0] for f in self.factors]
        self.shape = (math.prod(self.out_dims), math.prod(self.in_dims))
        self.dtype = dt
        self.device = dev

    def matvec(self, x):
        return kron_apply(self.factors, x)

    def rmatvec(self, y):
        return kron_apply([f.mH for f in self.factors], y)

    def column(self, j):
        idx = np.unravel_index(int(j), self.in_dims)
        col = self.factors[0][:, int(idx[0])]
        for f, i in zip(self.factors[1:], idx[1:]):
            col = torch.kron(col, f[:, int(i)])
        return col

    def column_norms(self):
        norms = torch.linalg.vector_norm(self.factors[0], dim=0)
        for f in self.factors[1:]:
            norms = torch.kron(norms, torch.linalg.vector_norm(f, dim=0))
        return norms

    def to_dense(self):
        out = self.factors[0]
        for f in self.factors[1:]:
            out = torch.kron(out, f)
        return out

    def norm_estimate(self, n_iter: int = 50, seed: int = 0) -> float:
        # The spectral norm of a Kronecker product is the product of the factors' norms.
        return float(math.prod(float(torch.linalg.matrix_norm(f, ord=2)) for f in self.factors))


class PartialDFTOperator(LinearOperator):
    """Rows ``rows`` of the unitary ``n x n`` DFT matrix, applied by FFT (complex).

    Args:
        n: signal length ``N``.
        rows: the ``M`` kept frequency indices (distinct integers in ``[0, n)``).
        dtype: complex dtype of the operator (default complex128).
        device: torch device.
    """

    def __init__(self, n: int, rows, dtype: torch.dtype = torch.complex128, device=None):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise RecoveryError(f"n must be a positive integer, got {n!r}")
        if not dtype.is_complex:
            raise RecoveryError(f"dtype must be complex for a DFT operator, got {dtype}")
        r = torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows)
        if r.ndim != 1 or r.is_floating_point() or r.is_complex():
            raise RecoveryError("rows must be a 1-D sequence of integers")
        r = r.to(torch.long)
        if r.numel() == 0 or int(r.min()) < 0 or int(r.max()) >= n or r.unique().numel() != r.numel():
            raise RecoveryError(f"rows must be distinct integers in [0, {n})")
        self.n = int(n)
        self.device = torch.device(device) if device is not None else r.device
        self.rows = r.to(self.device)
        self.shape = (int(r.numel()), self.n)
        self.dtype = dtype

    def matvec(self, x):
        return torch.fft.fft(x.to(self.dtype), dim=0, norm="ortho")[self.rows]

    def rmatvec(self, y):
        full = torch.zeros((self.n,) + tuple(y.shape[1:]), dtype=self.dtype, device=self.device)
        full[self.rows] = y.to(self.dtype)
        # The adjoint of the unitary DFT is its inverse.
        return torch.fft.ifft(full, dim=0, norm="ortho")

    def column(self, j):
        k = self.rows.to(torch.float64)
        ang = -2.0 * math.pi * k * int(j) / self.n
        return (torch.polar(torch.ones_like(ang), ang) / math.sqrt(self.n)).to(self.dtype)

    def column_norms(self):
        real = torch.float32 if self.dtype == torch.complex64 else torch.float64
        return torch.full((self.n,), math.sqrt(self.shape[0] / self.n), dtype=real, device=self.device)

    def norm_estimate(self, n_iter: int = 50, seed: int = 0) -> float:
        return 1.0


def as_operator(A, name: str = "A") -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator` (matrices are wrapped, operators passed through)."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, (np.ndarray, torch.Tensor)):
        return DenseOperator(A, name)
    raise RecoveryError(f"{name} must be a matrix (numpy/torch) or a LinearOperator, "
                        f"got {type(A).__name__}")


def prepare(A, y, *, allow_complex: bool = True, dtype=None):
    """Validate ``A`` and ``y`` together.

    Returns ``(op, y_tensor, as_numpy)``: ``op`` a :class:`LinearOperator` and ``y`` a tensor
    of shape ``(M,)`` or ``(M, B)`` on the operator's device, both in a common dtype (complex
    if either is). ``as_numpy`` tells whether the caller passed numpy arrays.
    """
    as_numpy = isinstance(y, np.ndarray) or isinstance(A, np.ndarray)
    op = as_operator(A)
    yt = to_tensor(y, "y", ndim=(1, 2), device=op.device)
    if not allow_complex and (op.is_complex or yt.is_complex()):
        which = "A" if op.is_complex else "y"
        raise RecoveryError(f"{which} is complex but this method supports real data only")
    if yt.shape[0] != op.shape[0]:
        if isinstance(op, KroneckerOperator):
            raise RecoveryError(
                f"factors do not match y: the product of the factors' row counts "
                f"{' x '.join(map(str, op.out_dims))} = {op.shape[0]} but y has length {yt.shape[0]}")
        raise RecoveryError(f"shape mismatch: A has {op.shape[0]} rows but y has length {yt.shape[0]}")
    dt = dtype or torch.promote_types(op.dtype, yt.dtype)
    if dt != op.dtype:
        op = _cast(op, dt)
    return op, yt.to(dt), as_numpy


def _cast(op: LinearOperator, dtype: torch.dtype) -> LinearOperator:
    if isinstance(op, DenseOperator):
        return DenseOperator(op.matrix.to(dtype))
    if isinstance(op, KroneckerOperator):
        return KroneckerOperator([f.to(dtype) for f in op.factors])
    if isinstance(op, PartialDFTOperator):
        if not dtype.is_complex:
            return op
        return PartialDFTOperator(op.n, op.rows, dtype=dtype, device=op.device)
    # A user-defined operator: trust it to accept inputs of the promoted dtype.
    return op
