"""Equation discovery side by side with PySINDy (installed at run time by ``_peers.ensure``).

Systems: Lorenz-63 (degree-2 library, 7 true terms), Van der Pol (mu = 2, degree 3, 4 terms),
Lotka-Volterra (degree 2, 4 terms). Per trial: a random initial condition, the trajectory by
``scipy.integrate.solve_ivp`` (rtol = atol = 1e-10), Gaussian noise of ``level`` times each
state's standard deviation, Savitzky-Golay derivatives and smoothed states (ours, window 51),
one library; every method regresses the same library on the same derivatives, so differences
come from the solvers. Methods: ours (STLSQ, SBL/RVM with thresholding) at the system's
threshold, and our STLSQ with the threshold chosen by cross-validation; PySINDy's STLSQ with its
documented defaults (threshold 0.1, ridge alpha 0.05), PySINDy's STLSQ at our settings (same
threshold, no ridge), PySINDy's SR3 with its defaults (L0, lambda 0.005), and PySINDy's STLSQ
and SR3 with their threshold (SR3: lambda = threshold^2 / 2) chosen by cross-validation.
Cross-validation (the same for every method): 5 contiguous blocks of the trajectory, held-out
mean squared derivative error, 15 thresholds from 0.01 to 1 (log-spaced), refit on all data.
Reported: exact-terms rate, median relative coefficient error, median time (a CV row's time
includes its search).

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_peers_discovery.py --trials 20
"""

from __future__ import annotations

import argparse
import warnings

import _peers
import numpy as np

from sparsecraft.recovery import discovery as D

import _bench as B


def lorenz(t, s):
    x, y, z = s
    return [10 * (y - x), x * (28 - z) - y, x * y - 8 / 3 * z]


def vdp(t, s, mu=2.0):
    x, y = s
    return [y, mu * (1 - x * x) * y - x]


def lotka(t, s):
    x, y = s
    return [1.0 * x - 0.5 * x * y, -1.5 * y + 0.75 * x * y]


# name: (rhs, degree, threshold, dt, steps, initial-condition sampler, true terms per equation)
SYSTEMS = {
    "lorenz63": (lorenz, 2, 0.5, 0.002, 5000, lambda r: r.uniform([-15, -15, 10], [15, 15, 40]),
                 [{"x": -10, "y": 10}, {"x": 28, "y": -1, "x z": -1}, {"x y": 1, "z": -8 / 3}]),
    "van_der_pol": (vdp, 3, 0.2, 0.005, 4000, lambda r: r.uniform([-2, -2], [2, 2]),
                    [{"y": 1}, {"x": -1, "y": 2, "x x y": -2}]),
    "lotka_volterra": (lotka, 2, 0.1, 0.005, 4000, lambda r: r.uniform([1, 0.5], [3, 2]),
                       [{"x": 1, "x y": -0.5}, {"y": -1.5, "x y": 0.75}]),
}


def truth(names, terms):
    Xi = np.zeros((len(names), len(terms)))
    for j, eq in enumerate(terms):
        for name, c in eq.items():
            Xi[names.index(name), j] = c
    return Xi


CV_GRID = np.geomspace(0.01, 1.0, 15)


def cv_threshold(fit, Th, dX, grid=CV_GRID, folds=5):
    """``fit(Th, dX, threshold) -> Xi`` at the threshold with the least held-out derivative error
    over ``folds`` contiguous blocks, refitted on all the data."""
    blocks = np.array_split(np.arange(Th.shape[0]), folds)
    err = []
    for thr in grid:
        e = 0.0
        for blk in blocks:
            train = np.setdiff1d(np.arange(Th.shape[0]), blk)
            Xi = np.asarray(fit(Th[train], dX[train], thr))
            e += float(np.mean((Th[blk] @ Xi - dX[blk]) ** 2))
        err.append(e)
    return np.asarray(fit(Th, dX, float(grid[int(np.argmin(err))])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    B.add_lock_option(ap)
    args = ap.parse_args()
    if args.table:
        _report(B._common.read_json(B.RESULTS / "recovery_peers_discovery.json"))
        return
    B.setup_threads()
    warnings.filterwarnings("ignore")
    from scipy.integrate import solve_ivp

    ps, note = _peers.ensure("pysindy")
    out = {"trials": args.trials, "pysindy": note if ps is None else f"{ps.__version__} ({note})",
           "command": B._common.command_line(), "results": {}}
    with B.lock(args, out):
        for sysname, (rhs, degree, thr, dt, steps, x0, terms) in SYSTEMS.items():
            for lvl in args.levels:
                rows: dict[str, list] = {}
                for t in range(args.trials):
                    rng = np.random.default_rng(8_000 + t)
                    ts = np.arange(steps) * dt
                    sol = solve_ivp(rhs, (0, ts[-1]), x0(rng), t_eval=ts, rtol=1e-10, atol=1e-10)
                    X = sol.y.T
                    Xn = X + lvl * X.std(0) * rng.standard_normal(X.shape)
                    dX = np.asarray(D.derivative(Xn, dt, window=51))
                    Th, names = D.polynomial_library(D.smooth(Xn, window=51), degree, names="xyz"[:X.shape[1]])
                    Th = np.asarray(Th)
                    true = truth(names, terms)
                    meths = {"ours_stlsq": lambda: D.stlsq(Th, dX, thr),
                             "ours_sbl_rvm": lambda: D.sbl_threshold(Th, dX, thr),
                             "ours_stlsq_cv": lambda: cv_threshold(D.stlsq, Th, dX)}
                    if ps is not None:
                        def peer(opt):
                            return lambda: opt.fit(Th, dX).coef_.T
                        meths["pysindy_stlsq_default"] = peer(ps.STLSQ())
                        meths["pysindy_stlsq_our_settings"] = peer(ps.STLSQ(threshold=thr, alpha=0.0))
                        meths["pysindy_sr3_default"] = peer(ps.SR3())
                        meths["pysindy_stlsq_cv"] = lambda: cv_threshold(
                            lambda T, d, t: ps.STLSQ(threshold=t).fit(T, d).coef_.T, Th, dX)
                        meths["pysindy_sr3_cv"] = lambda: cv_threshold(
                            lambda T, d, t: ps.SR3(reg_weight_lam=t * t / 2).fit(T, d).coef_.T, Th, dX)
                    for name, fn in meths.items():
                        Xi, tm = B.timed(fn)
                        Xi = np.asarray(Xi)
                        rows.setdefault(name, []).append({
                            "exact": float(np.array_equal(Xi != 0, true != 0)),
                            "coef_err": float(np.linalg.norm(Xi - true) / np.linalg.norm(true)), "time": tm})
                res = {n: B.summarize(r, keys=("exact", "coef_err", "time")) for n, r in rows.items()}
                out["results"][f"{sysname},noise={lvl}"] = res
                print(f"{sysname} noise={lvl} " + " ".join(
                    f"{n}:exact={s['exact_mean']:.2f},err={s['coef_err_median']:.4f},{1e3 * s['time_median']:.1f}ms"
                    for n, s in res.items()), flush=True)
                B.write_json("peers_discovery", out)
    _report(out)


def _report(out):
    lines = ["# Equation discovery: ours against PySINDy", "", f"Command: `{out['command']}`  ",
             f"PySINDy: {out['pysindy']}; {out['trials']} trials per row; same library and derivatives for all.", "",
             B.timing_note(out), "",
             "exact-terms rate / median relative coefficient error / median time (ms)", ""]
    methods = list(next(iter(out["results"].values())))
    lines += ["| system, noise | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for key, res in out["results"].items():
        lines.append(f"| {key} | " + " | ".join(
            f"{res[m]['exact_mean']:.2f} / {res[m]['coef_err_median']:.4f} / {1e3 * res[m]['time_median']:.1f}"
            for m in methods) + " |")
    B._common.write_text(B.RESULTS / "recovery_peers_discovery.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
