"""scikit-learn on the published Kronecker configuration (real data, dense A of 1800 x 3375).

M1=10, M2=12, M3=15, N=3375, K_i=4, 25 dB, same problem generator and seeds as the classic-SBL
speed check of bench_kron.py. scikit-learn gets the explicit matrix; KroSBL the factors.

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_kron_sklearn.py --trials 2
"""

from __future__ import annotations

import argparse
import warnings

from bench_kron import problem

import sparsecraft.recovery as R

import _bench as B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    B.setup_threads()
    warnings.filterwarnings("ignore")
    from sklearn.linear_model import ARDRegression, LassoCV, OrthogonalMatchingPursuit

    K = 4
    rows: dict[str, list] = {}
    for t in range(args.trials):
        fs, op, x, y, nv = problem(10, K, 25, 90_000 + t)
        A = op.to_dense().numpy()
        meths = {
            "oracle": lambda: B.oracle_ls(A, y, x),
            "am_krosbl": lambda: R.krosbl(fs, y, method="am", noise_var=nv).x,
            "svd_krosbl": lambda: R.krosbl(fs, y, method="svd", noise_var=nv).x,
            "sk_omp": lambda: OrthogonalMatchingPursuit(n_nonzero_coefs=K ** 3, fit_intercept=False).fit(A, y).coef_,
            "sk_lassocv": lambda: LassoCV(fit_intercept=False, cv=5, alphas=20).fit(A, y).coef_,
            "sk_ard": lambda: ARDRegression(fit_intercept=False).fit(A, y).coef_,
        }
        for name, fn in meths.items():
            xh, dt = B.timed(fn)
            rows.setdefault(name, []).append({"nmse_db": B.nmse_db(xh, x), "f1": B.support_f1(xh, x), "time": dt})
            print(t, name, round(rows[name][-1]["nmse_db"], 1), round(dt, 2), flush=True)
    res = {n: B.summarize(r) for n, r in rows.items()}
    for n in ("am_krosbl", "svd_krosbl"):
        res[n]["speedup_vs_sk_ard"] = res["sk_ard"]["time_mean"] / res[n]["time_mean"]
    B.write_json("kron_sklearn", {"trials": args.trials, "M1": 10, "K": K, "snr": 25, "results": res})


if __name__ == "__main__":
    main()
