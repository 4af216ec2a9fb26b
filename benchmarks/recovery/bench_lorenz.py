"""Lorenz-63 equation discovery from noisy trajectories.

For each noise level (Gaussian, standard deviation = level x the state's standard deviation)
and trial (random initial condition and noise), derivatives are estimated by a Savitzky-Golay
fit (window 51, order 3) and the states smoothed the same way; a degree-2 polynomial library
(10 terms) is regressed by STLSQ, SBL/RVM with thresholding and the Lasso (CV penalty,
threshold, refit). Reported: the rate of recovering exactly the 7 true terms, and the relative
coefficient error ||Xi - Xi_true|| / ||Xi_true||.

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_lorenz.py --trials 20
"""

from __future__ import annotations

import argparse

import numpy as np

from sparsecraft.recovery import discovery as D

import _bench as B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    B.setup_threads()
    dt, n = 0.002, 5000
    out = {"trials": args.trials, "threshold": args.threshold, "dt": dt, "n_steps": n, "results": {}}
    for lvl in args.levels:
        rows: dict[str, list] = {}
        for t in range(args.trials):
            rng = np.random.default_rng(500 + t)
            x0 = rng.uniform([-15, -15, 10], [15, 15, 40])
            _, X, _ = D.lorenz63(n, dt, tuple(x0))
            X = X.numpy()
            Xn = X + lvl * X.std(0) * rng.standard_normal(X.shape)
            dXn = D.derivative(Xn, dt, window=51)
            Th, names = D.polynomial_library(D.smooth(Xn, window=51), 2)
            true = D.lorenz63_coefficients(names)
            for name, fn in {"stlsq": lambda: D.stlsq(Th, dXn, args.threshold),
                             "sbl_rvm": lambda: D.sbl_threshold(Th, dXn, args.threshold),
                             "lasso": lambda: D.lasso_discovery(Th, dXn, threshold=args.threshold)}.items():
                Xi, tm = B.timed(fn)
                rows.setdefault(name, []).append({
                    "exact": float(np.array_equal(Xi != 0, true != 0)),
                    "coef_err": float(np.linalg.norm(Xi - true) / np.linalg.norm(true)), "time": tm})
        res = {nm: B.summarize(r, keys=("exact", "coef_err", "time")) for nm, r in rows.items()}
        out["results"][f"noise={lvl}"] = res
        print(f"noise={lvl} " + " ".join(f"{nm}:exact={s['exact_mean']:.2f},err={s['coef_err_median']:.4f}"
                                          for nm, s in res.items()), flush=True)
        B.write_json("lorenz", out)


if __name__ == "__main__":
    main()
