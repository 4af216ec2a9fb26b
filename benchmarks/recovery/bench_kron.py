"""Kronecker Gaussian dictionary, the published KroSBL configuration (He and Joseph, TSP 2024).

Factors A_i of size M_i x 15 with N(0, 1/M_i) entries, N = 15^3 = 3375, M2 = 12, M3 = 15;
x = x1 (x) x2 (x) x3 with K_i Gaussian non-zeros per mode; known noise variance.
Sweeps: M1 in {6..14} at 25 dB (K_i = 4); SNR 5..30 dB at M1 = 10; K_i 2..6 at M1 = 10, 25 dB.
Methods: AM-KroSBL, SVD-KroSBL (library defaults, and without factor restarts), Kronecker OMP (K_i known), OMP (K known, matrix-free
operator), FISTA (universal penalty), oracle least squares on the true support. Classic SBL
(dense, EM) runs on a few trials only, to measure the speed-up.

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_kron.py --trials 200 --sbl-trials 2 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing

import numpy as np
import torch

import sparsecraft.recovery as R

import _bench as B


def problem(M1, K, snr, seed, M2=12, M3=15, n=15):
    rng = np.random.default_rng(seed)
    fs = [rng.standard_normal((m, n)) / np.sqrt(m) for m in (M1, M2, M3)]
    xs = []
    for _ in range(3):
        v = np.zeros(n)
        v[rng.choice(n, K, replace=False)] = rng.standard_normal(K)
        xs.append(v)
    x = np.kron(np.kron(xs[0], xs[1]), xs[2])
    op = R.KroneckerOperator(fs)
    y0 = op.matvec(torch.from_numpy(x)).numpy()
    nv = float(np.mean(y0 ** 2) / 10 ** (snr / 10))
    y = y0 + np.sqrt(nv) * rng.standard_normal(y0.shape)
    return fs, op, x, y, nv


def one_trial(args):
    """All methods back to back on one problem (so per-trial time ratios are like for like)."""
    M1, K, snr, seed, with_sbl, draws = args
    B.setup_threads()
    fs, op, x, y, nv = problem(M1, K, snr, seed)
    A = op.to_dense().numpy()

    def krosbl(**kw):
        r = R.krosbl(fs, y, noise_var=nv, **kw)
        return r.x, r.n_iter

    meths = {
        "oracle": lambda: (B.oracle_ls(A, y, x), None),
        "am_krosbl": lambda: krosbl(method="am"),
        "svd_krosbl": lambda: krosbl(method="svd"),
        # The same without factor restarts (restarts=0): what the restarts change.
        "am_krosbl_r0": lambda: krosbl(method="am", restarts=0),
        "svd_krosbl_r0": lambda: krosbl(method="svd", restarts=0),
        **({f"am_krosbl_draws{draws}": lambda: krosbl(method="am", restart_draws=draws),
            f"svd_krosbl_draws{draws}": lambda: krosbl(method="svd", restart_draws=draws)} if draws else {}),
        "kron_omp": lambda: (lambda r: (r.x, r.n_iter))(R.kron_omp(fs, y, [K, K, K])),
        "omp": lambda: (lambda r: (r.x, r.n_iter))(R.omp(op, y, K ** 3)),
        "fista": lambda: (lambda r: (r.x, r.n_iter))(R.fista(op, y, lam="universal", noise_var=nv, max_iter=2000)),
    }
    if with_sbl:
        # Classic SBL on the dense 1800 x 3375 matrix: EM with the library's pruning (1e-3) to
        # convergence; EM without effective pruning (1e-6, as the published classic SBL keeps
        # every column) capped at 50 iterations (several seconds each); MacKay updates.
        def classic(**kw):
            r = R.sbl(A, y, noise_var=nv, tol=1e-4, **kw)
            return r.x, r.n_iter
        meths["classic_sbl"] = lambda: classic(max_iter=1000, update="em")
        meths["classic_sbl_prune1e-6"] = lambda: classic(max_iter=50, update="em", prune=1e-6)
        meths["classic_sbl_mackay"] = lambda: classic(max_iter=200, update="mackay")
    rows = {}
    for name, fn in meths.items():
        (xh, it), dt = B.timed(fn)
        rows[name] = {"nmse_db": B.nmse_db(xh, x), "f1": B.support_f1(xh, x), "time": dt, "iters": it}
    for r in rows.values():
        r["gap_db"] = r["nmse_db"] - rows["oracle"]["nmse_db"]
    return rows


def run(M1, K, snr, trials, seed0, pool, with_sbl=False, draws=0):
    jobs = [(M1, K, snr, seed0 + t, with_sbl, draws) for t in range(trials)]
    per_trial = list(pool.imap(one_trial, jobs)) if pool is not None else [one_trial(j) for j in jobs]
    rows: dict[str, list] = {}
    for tr in per_trial:
        for name, r in tr.items():
            rows.setdefault(name, []).append(r)
    res = {n: B.summarize(r) for n, r in rows.items()}
    for n, s in res.items():
        if n != "oracle":
            s["gap_to_oracle_db_mean"] = s["nmse_db_mean"] - res["oracle"]["nmse_db_mean"]
            s["gap_to_oracle_db_median"] = s["nmse_db_median"] - res["oracle"]["nmse_db_median"]
            s["trials_over_1db"] = int(sum(r["gap_db"] > 1.0 for r in rows[n]))
    return res


SWEEPS = {
    # name: (list of (M1, K, snr), seed of the first trial at each point)
    "M1": ([(m, 4, 25) for m in (6, 8, 10, 12, 14)], lambda M1, K, snr: 10_000 * M1),
    "snr": ([(10, 4, s) for s in (5, 10, 15, 20, 25, 30)], lambda M1, K, snr: 100_000 + 1000 * snr),
    "K": ([(10, k, 25) for k in (2, 3, 4, 5, 6)], lambda M1, K, snr: 200_000 + 1000 * K),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sbl-trials", type=int, default=2)
    ap.add_argument("--sweeps", nargs="+", default=["classic", *SWEEPS], choices=["classic", *SWEEPS])
    ap.add_argument("--tag", default="", help="suffix of the output file, e.g. _classic")
    ap.add_argument("--draws", type=int, default=0, help="also run KroSBL with this many random restart draws")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes, one thread each; a trial's methods always run back to back in one process")
    args = ap.parse_args()
    B.setup_threads()
    out = {"trials": args.trials, "sbl_trials": args.sbl_trials, "workers": args.workers, "draws": args.draws,
           "sweeps": {}}
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None

    def log(tag, res):
        print(tag + " " + " ".join(f"{n}:{s['nmse_db_mean']:.1f}/{s['nmse_db_median']:.1f}dB/{s['time_mean']:.3f}s"
                                   + (f"/fail{s['trials_over_1db']}" if "trials_over_1db" in s else "")
                                   for n, s in res.items()), flush=True)

    # The speed comparison with classic SBL first: it is the slowest part.
    if args.sbl_trials and "classic" in args.sweeps:
        res = run(10, 4, 25, args.sbl_trials, 90_000, pool, with_sbl=True)
        out["sweeps"]["classic"] = {"M1=10_K=4_snr=25": res}
        for n in ("am_krosbl", "svd_krosbl", "am_krosbl_r0", "svd_krosbl_r0"):
            for c in ("classic_sbl", "classic_sbl_prune1e-6", "classic_sbl_mackay"):
                res[n][f"speedup_vs_{c}"] = res[c]["time_mean"] / res[n]["time_mean"]
        log("classic", res)
        B.write_json("kron" + args.tag, out)
    for sweep, (points, seed_of) in SWEEPS.items():
        if sweep not in args.sweeps:
            continue
        out["sweeps"][sweep] = {}
        for M1, K, snr in points:
            key = f"M1={M1}_K={K}_snr={snr}"
            res = run(M1, K, snr, args.trials, seed_of(M1, K, snr), pool, draws=args.draws)
            out["sweeps"][sweep][key] = res
            log(f"{sweep} {key}", res)
            B.write_json("kron" + args.tag, out)
    if all(s in out["sweeps"] for s in SWEEPS):
        _plot(out)


def _plot(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = out["sweeps"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (sweep, xs, key, xl) in zip(axes, [("M1", (6, 8, 10, 12, 14), "M1={}_K=4_snr=25", "M1"),
                                               ("snr", (5, 10, 15, 20, 25, 30), "M1=10_K=4_snr={}", "SNR (dB)"),
                                               ("K", (2, 3, 4, 5, 6), "M1=10_K={}_snr=25", "K per mode")]):
        for n in ("oracle", "am_krosbl", "svd_krosbl", "am_krosbl_r0", "svd_krosbl_r0", "kron_omp", "omp", "fista"):
            ax.plot(xs, [sw[sweep][key.format(v)][n]["nmse_db_mean"] for v in xs], "--" if n.endswith("_r0") else "-o",
                    ms=3, label=n)
        ax.set_xlabel(xl); ax.set_ylabel("mean NMSE (dB)"); ax.grid(True); ax.legend(fontsize=7)
    fig.suptitle("Kronecker Gaussian, N=3375 (published KroSBL configuration)")
    fig.tight_layout()
    fig.savefig(B.RESULTS / "recovery_kron.png", dpi=110)


if __name__ == "__main__":
    main()
