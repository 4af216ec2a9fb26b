"""Partial unitary DFT (complex), N=1024, M=256 random rows, K from 10 to 60, 20 dB.

Ours only: scikit-learn's linear models reject complex data. OMP (K known), FISTA (universal
penalty, known noise), AMP, SBL (EM, estimated noise), oracle least squares on the support.

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_dft.py --trials 20
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import sparsecraft.recovery as R

import _bench as B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 20, 30, 40, 50, 60])
    ap.add_argument("--snr", type=float, default=20.0)
    args = ap.parse_args()
    B.setup_threads()
    N, M = 1024, 256
    out = {"N": N, "M": M, "snr": args.snr, "trials": args.trials, "results": {}}
    for K in args.ks:
        rows: dict[str, list] = {}
        for t in range(args.trials):
            rng = np.random.default_rng(5000 + 100 * K + t)
            op = R.PartialDFTOperator(N, np.sort(rng.choice(N, M, replace=False)))
            x = np.zeros(N, complex)
            x[rng.choice(N, K, replace=False)] = (rng.standard_normal(K) + 1j * rng.standard_normal(K)) / np.sqrt(2)
            y0 = op.matvec(torch.from_numpy(x)).numpy()
            nv = float(np.mean(np.abs(y0) ** 2) / 10 ** (args.snr / 10))
            y = y0 + np.sqrt(nv / 2) * (rng.standard_normal(M) + 1j * rng.standard_normal(M))
            A = op.to_dense().numpy()
            meths = {
                "oracle": lambda: B.oracle_ls(A, y, x),
                "omp": lambda: R.omp(op, y, K),
                "fista": lambda: R.fista(op, y, lam="universal", noise_var=nv),
                "amp": lambda: R.amp(op, y, on_divergence="return"),
                "sbl": lambda: R.sbl(op, y, update="em", record_cost=False),
                "sbl_fast": lambda: R.sbl(op, y, update="fast", record_cost=False),
            }
            for name, fn in meths.items():
                got, dt = B.timed(fn)
                xh, it = B.solution(got)
                rows.setdefault(name, []).append({"nmse_db": B.nmse_db(xh, x), "f1": B.support_f1(xh, x), "time": dt,
                                                  "iters": it})
        res = {n: B.summarize(r) for n, r in rows.items()}
        for n, s in res.items():
            if n != "oracle":
                s["gap_to_oracle_db_mean"] = s["nmse_db_mean"] - res["oracle"]["nmse_db_mean"]
        out["results"][f"K={K}"] = res
        print(f"K={K} " + " ".join(f"{n}:{s['nmse_db_mean']:.1f}dB/{s['time_mean']*1e3:.0f}ms" for n, s in res.items()), flush=True)
        B.write_json("dft", out)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for n in out["results"][f"K={args.ks[0]}"]:
        ax.plot(args.ks, [out["results"][f"K={k}"][n]["nmse_db_mean"] for k in args.ks], "-o", ms=3, label=n)
    ax.set_xlabel("K"); ax.set_ylabel("mean NMSE (dB)"); ax.grid(True); ax.legend(fontsize=8)
    ax.set_title(f"Partial DFT (complex) N=1024 M=256, {args.snr:g} dB")
    fig.tight_layout()
    fig.savefig(B.RESULTS / "recovery_dft.png", dpi=110)


if __name__ == "__main__":
    main()
