"""Shared helpers for the recovery benchmarks: metrics, oracle, timing; results are written
through ``benchmarks/_common.py`` (atomic, stamped with the git commit) like every benchmark's."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402

RESULTS = _common.RESULTS


def setup_threads():
    """One BLAS/torch thread per process: small problems run fastest that way."""
    n = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def add_lock_option(ap) -> None:
    """``--no-lock``: measure without the benchmark lock (beside another run; times then say so)."""
    ap.add_argument("--no-lock", action="store_true",
                    help="do not take benchmarks/results/.train.lock: times are then measured beside "
                         "whatever else runs and are marked so")


def lock(args, out: dict):
    """The benchmark lock, or (``--no-lock``) nothing, with ``out["timing"]`` saying which."""
    if getattr(args, "no_lock", False):
        out["timing"] = {"lock": False, "load_average_at_start": _common.load_average(),
                         "note": "times measured niced beside another benchmark, without the lock; ratios "
                                 "between rows of the same run remain comparable, absolute times do not"}
        return contextlib.nullcontext()
    out["timing"] = {"lock": True, "load_average_at_start": _common.load_average()}
    return _common.bench_lock()


def timing_note(out: dict) -> str:
    """One line for a table: how the times in it were measured."""
    t = out.get("timing", {})
    if t.get("lock", True):
        return ""
    return (f"**Times were measured niced beside another benchmark (no lock; load average "
            f"{t['load_average_at_start'][0]:.1f} at the start)**: ratios between rows of the same run remain "
            "comparable, absolute times do not. Accuracy columns are unaffected.")


def nmse_db(xhat, x) -> float:
    xhat = np.asarray(xhat)
    err = np.sum(np.abs(xhat - x) ** 2) / np.sum(np.abs(x) ** 2)
    return float(10 * np.log10(max(err, 1e-30)))


def support_f1(xhat, x, rel: float = 1e-3) -> float:
    """F1 of the estimated support (entries above ``rel * max|xhat|``) against the true one."""
    xhat = np.asarray(xhat)
    est = np.abs(xhat) > rel * max(np.abs(xhat).max(), 1e-300)
    true = x != 0
    tp = np.sum(est & true)
    if tp == 0:
        return 0.0
    p, r = tp / est.sum(), tp / true.sum()
    return float(2 * p * r / (p + r))


def oracle_ls(A, y, x):
    S = np.nonzero(x)[0]
    xo = np.zeros_like(x, dtype=np.result_type(A, y))
    xo[S] = np.linalg.lstsq(A[:, S], y, rcond=None)[0]
    return xo


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def solution(out):
    """``(x, iterations or None)`` from a RecoveryResult, a fitted scikit-learn estimator or an array."""
    if hasattr(out, "coef_"):
        it = getattr(out, "n_iter_", None)
        return np.asarray(out.coef_), None if it is None else int(np.max(it))
    if hasattr(out, "x") and hasattr(out, "n_iter"):
        x = out.x
        return (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)), int(out.n_iter)
    return (out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)), None


def summarize(rows: list[dict], keys=("nmse_db", "f1", "time", "iters")) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            out[k + "_mean"] = float(np.mean(vals))
            out[k + "_median"] = float(np.median(vals))
    out["n"] = len(rows)
    return out


def write_json(name: str, payload: dict):
    payload = dict(payload)
    payload["env"] = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                      "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    return _common.write_json(RESULTS / f"recovery_{name}.json", payload)
