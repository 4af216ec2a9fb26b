"""Input checking, numpy/torch conversion and the result record shared by the solvers.

Every solver works in torch on the device of its inputs. Numpy inputs are converted to
tensors on the CPU and the arrays in the returned result are converted back to numpy, so a
caller gets back the kind of array it gave.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from sparsecraft import memory
from sparsecraft.errors import SparsecraftError

logger = logging.getLogger("sparsecraft.recovery")


class RecoveryError(SparsecraftError):
    """Bad input to a sparse-recovery routine (shape, non-finite values, dtype, sparsity)."""


class DivergenceError(RecoveryError, ArithmeticError):
    """An iterative solver diverged; its iterate is not a usable estimate."""


@dataclasses.dataclass
class RecoveryResult:
    """What every solver returns.

    Attributes:
        x: estimate, shape ``(N,)`` (or ``(N, B)`` for a batch of measurement vectors).
        support: sorted indices of the non-zero entries of ``x`` (a list per column for a batch).
        n_iter: iterations run (a list for a batch).
        converged: whether the stopping rule was met before ``max_iter`` (a list for a batch).
        info: solver-specific diagnostics (cost history, noise variance, hyperparameters, ...).
    """

    x: Any
    support: Any
    n_iter: Any
    converged: Any
    info: dict = dataclasses.field(default_factory=dict)


def is_array_like(obj) -> bool:
    return isinstance(obj, (np.ndarray, torch.Tensor))


def to_tensor(obj, name: str, *, device=None, dtype=None, allow_complex: bool = True,
              ndim: tuple[int, ...] | None = None) -> torch.Tensor:
    """Convert ``obj`` to a floating/complex tensor and check it.

    Integer and bool inputs are promoted to the default float64; float16/bfloat16 to float32.
    Raises :class:`RecoveryError` naming ``name`` for wrong rank, non-finite values or
    complex data where only real is allowed.
    """
    if isinstance(obj, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(obj))
    elif isinstance(obj, torch.Tensor):
        t = obj
    elif isinstance(obj, (list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(obj))
        except (TypeError, ValueError) as exc:
            raise RecoveryError(f"{name} could not be converted to an array: {exc}") from None
    else:
        raise RecoveryError(f"{name} must be a numpy array or torch tensor, got {type(obj).__name__}")
    if t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float64)
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    if dtype is not None:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    if ndim is not None and t.ndim not in ndim:
        raise RecoveryError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, "
                            f"got shape {tuple(t.shape)}")
    if t.is_complex() and not allow_complex:
        raise RecoveryError(f"{name} is complex but this method supports real data only")
    if t.numel() and not _all_finite(t):
        raise RecoveryError(f"{name} contains NaN or inf")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    # A NaN or an inf makes the sum non-finite, so a finite sum settles it with one cheap
    # reduction; only a sum that overflowed needs the element-wise check.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def noise_floor(signal_power: float, dtype: torch.dtype) -> float:
    """Smallest noise variance the SBL solvers use: keeps ``C = sigma2 I + ...`` invertible.

    ``1e-12`` of the measurement power, raised to ``100 eps`` of the dtype (float32 cannot
    resolve a smaller relative floor).
    """
    return signal_power * max(1e-12, 100.0 * torch.finfo(dtype).eps)


def output(value, as_numpy: bool):
    """Convert tensors (possibly nested in lists/dicts) back to numpy when the caller gave numpy."""
    if not as_numpy:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, list):
        return [output(v, True) for v in value]
    if isinstance(value, tuple):
        return tuple(output(v, True) for v in value)
    if isinstance(value, dict):
        return {k: output(v, True) for k, v in value.items()}
    return value


def finish(result: RecoveryResult, as_numpy: bool) -> RecoveryResult:
    result.x = output(result.x, as_numpy)
    result.support = output(result.support, as_numpy)
    result.info = output(result.info, as_numpy)
    return result


def support_of(x: torch.Tensor, rel_tol: float = 0.0) -> torch.Tensor:
    """Indices of entries of a 1-D ``x`` whose magnitude exceeds ``rel_tol * max|x|``."""
    mag = x.abs()
    if mag.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    thr = rel_tol * float(mag.max())
    return torch.nonzero(mag > thr).flatten()


def check_positive(value, name: str, *, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RecoveryError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise RecoveryError(f"{name} must be {'non-negative' if allow_zero else 'positive'} "
                            f"and finite, got {value!r}")


def check_int(value, name: str, *, minimum: int = 1, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise RecoveryError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_memory(nbytes: float, what: str, error=None) -> None:
    """:func:`sparsecraft.memory.check_memory` raising :class:`RecoveryError` unless told otherwise."""
    memory.check_memory(nbytes, what, error or RecoveryError)


def run_batched(solve_one, y: torch.Tensor) -> RecoveryResult:
    """Run ``solve_one(y_col) -> RecoveryResult`` on each column of a 2-D ``y`` and stack.

    Each column is an independent problem (its own support and hyperparameters).
    """
    if y.ndim == 1:
        return solve_one(y)
    results = [solve_one(y[:, b]) for b in range(y.shape[1])]
    info = {k: [r.info.get(k) for r in results] for k in results[0].info}
    return RecoveryResult(
        x=torch.stack([r.x for r in results], dim=1),
        support=[r.support for r in results],
        n_iter=[r.n_iter for r in results],
        converged=[r.converged for r in results],
        info=info,
    )
