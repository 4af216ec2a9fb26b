"""Gaussian N(0, 1/M) dictionary, N=512, M=128: NMSE / support F1 / time vs K at 20 dB and noiseless.

Ours (OMP, FISTA, AMP, SBL) against scikit-learn's OrthogonalMatchingPursuit, Lasso (LassoCV)
and ARDRegression in the same run, plus the oracle least squares on the true support.

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_gaussian.py --trials 50
"""

from __future__ import annotations

import argparse
import logging
import warnings

import numpy as np
import torch

import sparsecraft.recovery as R

import _bench as B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 15, 20, 25, 30, 35, 40])
    ap.add_argument("--snrs", type=str, nargs="+", default=["20", "inf"])
    ap.add_argument("--no-sklearn-lasso", action="store_true")
    args = ap.parse_args()
    B.setup_threads()
    warnings.filterwarnings("ignore")
    from sklearn.linear_model import ARDRegression, LassoCV, OrthogonalMatchingPursuit

    N, M = 512, 128
    results = {}
    for snr in args.snrs:
        for K in args.ks:
            rows: dict[str, list] = {}
            for t in range(args.trials):
                rng = np.random.default_rng(1000 * K + t)
                A = rng.standard_normal((M, N)) / np.sqrt(M)
                x = np.zeros(N)
                x[rng.choice(N, K, replace=False)] = rng.standard_normal(K)
                y0 = A @ x
                nv = 0.0 if snr == "inf" else float(np.mean(y0 ** 2) / 10 ** (float(snr) / 10))
                y = y0 + np.sqrt(nv) * rng.standard_normal(M)
                meths = {
                    "oracle": lambda: B.oracle_ls(A, y, x),
                    "omp": lambda: R.omp(A, y, K),
                    "fista": lambda: R.fista(A, y, lam="universal", noise_var=nv) if nv > 0
                    else R.fista(A, y, lam=1e-4 * R.lambda_max(R.as_operator(A), torch.from_numpy(y)), max_iter=5000),
                    "amp": lambda: R.amp(A, y, on_divergence="return", max_iter=1000),
                    "sbl_fast": lambda: R.sbl(A, y, update="fast", record_cost=False),
                    "sbl": lambda: R.sbl(A, y, update="em", record_cost=False),
                    "sbl_mackay": lambda: R.sbl(A, y, update="mackay"),
                    "sbl_prune1e-2": lambda: R.sbl(A, y, update="em", prune=1e-2),
                    "sk_omp": lambda: OrthogonalMatchingPursuit(n_nonzero_coefs=K, fit_intercept=False).fit(A, y),
                    "sk_ard": lambda: ARDRegression(fit_intercept=False).fit(A, y),
                }
                if not args.no_sklearn_lasso:
                    meths["sk_lassocv"] = lambda: LassoCV(fit_intercept=False, cv=5, alphas=20).fit(A, y)
                for name, fn in meths.items():
                    out, dt = B.timed(fn)
                    xh, it = B.solution(out)
                    rows.setdefault(name, []).append({"nmse_db": B.nmse_db(xh, x), "f1": B.support_f1(xh, x), "time": dt,
                                                      "iters": it})
            res = {name: B.summarize(r) for name, r in rows.items()}
            for name, s in res.items():
                if name != "oracle":
                    s["gap_to_oracle_db_mean"] = s["nmse_db_mean"] - res["oracle"]["nmse_db_mean"]
            results[f"snr={snr},K={K}"] = res
            logging.info("snr=%s K=%d %s", snr, K, {n: round(s["nmse_db_mean"], 1) for n, s in res.items()})
            print(f"snr={snr} K={K} " + " ".join(f"{n}:{s['nmse_db_mean']:.1f}dB/{s['time_mean']*1e3:.1f}ms"
                                                 for n, s in res.items()), flush=True)
            B.write_json("gaussian", {"N": N, "M": M, "trials": args.trials, "results": results})
    _plot(results, args)


def _plot(results, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.snrs), figsize=(6 * len(args.snrs), 4.5))
    axes = np.atleast_1d(axes)
    for ax, snr in zip(axes, args.snrs):
        names = list(results[f"snr={snr},K={args.ks[0]}"].keys())
        for n in names:
            ax.plot(args.ks, [results[f"snr={snr},K={k}"][n]["nmse_db_mean"] for k in args.ks], "-o", label=n, ms=3)
        ax.set_xlabel("K"); ax.set_ylabel("mean NMSE (dB)"); ax.set_title(f"Gaussian N=512 M=128, SNR={snr} dB")
        ax.grid(True); ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(B.RESULTS / "recovery_gaussian.png", dpi=110)


if __name__ == "__main__":
    main()
