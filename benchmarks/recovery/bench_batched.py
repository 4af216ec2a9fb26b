"""Batched recovery: many problems with one dictionary in one call against a loop of single calls.

N = 512, M = 128. SBL: fast SBL (``sbl_batch``, noise learned per problem, the defaults of
``sbl``) on a Gaussian N(0, 1/M) dictionary, K = 10 Gaussian non-zeros per problem, 20 dB;
against a loop of the library's ``sbl`` (numpy, one problem per call) and of ``sbl_batch`` on one
problem (the batch of one). KroSBL on A = A_1 (x) A_2 with A_1 8 x 16, A_2 16 x 32 (x = u (x) v with 2 and
4 non-zeros, 25 dB, known noise), OMP on the same dense dictionary (K = 8). One call of
``krosbl_batch`` / ``omp_batch`` on all ``--problems``; single calls (the batch of one, the same
code) on the first ``--loop`` problems, whose mean time per problem is the loop's cost per
problem; the library's ``krosbl`` (with restarts) on ``--loop`` problems for reference.

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_batched.py --problems 1000 --loop 50
"""

from __future__ import annotations

import argparse

import numpy as np

import sparsecraft.recovery as R

import _bench as B


def problems(n, seed=31_000):
    rng = np.random.default_rng(seed)
    fs = [rng.standard_normal((8, 16)) / np.sqrt(8), rng.standard_normal((16, 32)) / 4]
    X = np.zeros((n, 16, 32))
    for b in range(n):
        u, v = np.zeros(16), np.zeros(32)
        u[rng.choice(16, 2, replace=False)] = rng.standard_normal(2)
        v[rng.choice(32, 4, replace=False)] = rng.standard_normal(4)
        X[b] = np.outer(u, v)
    X = X.reshape(n, -1)
    Y0 = X @ np.kron(fs[0], fs[1]).T
    nv = float(np.mean(Y0 ** 2) / 10 ** 2.5)
    return fs, X, Y0 + np.sqrt(nv) * rng.standard_normal(Y0.shape), nv


def sbl_problems(n, K=10, snr=20.0, seed=32_000, N=512, M=128):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((M, N)) / np.sqrt(M)
    X = np.zeros((n, N))
    for b in range(n):
        X[b, rng.choice(N, K, replace=False)] = rng.standard_normal(K)
    Y0 = X @ A.T
    nv = np.mean(Y0 ** 2, axis=1, keepdims=True) / 10 ** (snr / 10)
    return A, X, Y0 + np.sqrt(nv) * rng.standard_normal(Y0.shape)


def nmse_db(Xh, X):
    return [B.nmse_db(a, b) for a, b in zip(Xh, X)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--loop", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["sbl", "krosbl", "omp"])
    B.add_lock_option(ap)
    args = ap.parse_args()
    B.setup_threads()
    fs, X, Y, nv = problems(args.problems)
    A = np.kron(fs[0], fs[1])
    out = {"problems": args.problems, "loop_problems": args.loop, "N": 512, "M": 128,
           "command": B._common.command_line(), "results": {}}
    rows = {}
    with B.lock(args, out):
        if "sbl" in args.methods:
            As, Xs, Ys = sbl_problems(args.problems)
            batch, tb = B.timed(lambda: R.sbl_batch(As, Ys))
            singles, tl = B.timed(lambda: [R.sbl_batch(As, Ys[b]) for b in range(args.loop)])
            lib, tk = B.timed(lambda: [R.sbl(As, Ys[b], record_cost=False) for b in range(args.loop)])
            rel = [float(np.abs(r.x - batch.x[b]).max() / max(np.abs(r.x).max(), 1e-300)) for b, r in enumerate(lib)]
            rows["sbl"] = {"batch_per_problem_s": tb / args.problems, "loop_per_problem_s": tl / args.loop,
                           "speedup": (tl / args.loop) / (tb / args.problems),
                           "identical_to_single_calls": all(np.array_equal(s.x, batch.x[b])
                                                            for b, s in enumerate(singles)),
                           "nmse_db_median": float(np.median(nmse_db(batch.x, Xs))),
                           "library_sbl_per_problem_s": tk / args.loop,
                           "speedup_vs_library": (tk / args.loop) / (tb / args.problems),
                           "library_same_support": sum(np.array_equal(np.asarray(r.support), np.asarray(batch.support[b]))
                                                       for b, r in enumerate(lib)),
                           "library_same_n_iter": sum(r.n_iter == batch.n_iter[b] for b, r in enumerate(lib)),
                           "library_max_rel_diff": max(rel)}
            print("sbl", rows["sbl"], flush=True)
        if "krosbl" in args.methods:
            batch, tb = B.timed(lambda: R.krosbl_batch(fs, Y, noise_var=nv))
            singles, tl = B.timed(lambda: [R.krosbl_batch(fs, Y[b], noise_var=nv) for b in range(args.loop)])
            lib, tk = B.timed(lambda: [R.krosbl(fs, Y[b], noise_var=nv) for b in range(args.loop)])
            same = all(np.array_equal(s.x, batch.x[b]) for b, s in enumerate(singles))
            rows["krosbl"] = {"batch_per_problem_s": tb / args.problems, "loop_per_problem_s": tl / args.loop,
                              "speedup": (tl / args.loop) / (tb / args.problems), "identical_to_single_calls": same,
                              "nmse_db_median": float(np.median(nmse_db(batch.x, X))),
                              "library_krosbl_per_problem_s": tk / args.loop,
                              "library_krosbl_nmse_db_median": float(np.median(nmse_db([r.x for r in lib],
                                                                                       X[:args.loop]))),
                              "batch_nmse_db_median_same_problems": float(np.median(nmse_db(batch.x[:args.loop],
                                                                                             X[:args.loop])))}
        if "omp" in args.methods:
            ob, tob = B.timed(lambda: R.omp_batch(A, Y, 8))
            os_, tos = B.timed(lambda: [R.omp_batch(A, Y[b], 8) for b in range(args.loop)])
            _, tlib = B.timed(lambda: [R.omp(A, Y[b], 8) for b in range(args.loop)])
            rows["omp"] = {"batch_per_problem_s": tob / args.problems, "loop_per_problem_s": tos / args.loop,
                           "speedup": (tos / args.loop) / (tob / args.problems),
                           "identical_to_single_calls": all(np.array_equal(s.x, ob.x[b]) for b, s in enumerate(os_)),
                           "nmse_db_median": float(np.median(nmse_db(ob.x, X))),
                           "library_omp_per_problem_s": tlib / args.loop}
    out["results"] = rows
    for n, r in rows.items():
        print(n, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    B.write_json("batched", out)
    lines = ["# Batched recovery (one dictionary, many problems)", "", f"Command: `{out['command']}`", "",
             f"{args.problems} problems of N = 512, M = 128 in one call; single calls (the batch of one, same code) "
             f"and the library's single-problem function timed on the first {args.loop}; per-problem times in ms."]
    note = B.timing_note(out)
    if note:
        lines += ["", note]
    lines += ["", "| method | batch ms/problem | batch-of-one loop ms/problem | speed-up | identical to the batch of one "
              "| median NMSE dB | library single call ms/problem | speed-up vs library |", "|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lib_t = r.get(f"library_{n}_per_problem_s")
        lines.append(f"| {n}_batch | {1e3 * r['batch_per_problem_s']:.2f} | {1e3 * r['loop_per_problem_s']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['identical_to_single_calls']} | {r['nmse_db_median']:.2f} | "
                     f"{1e3 * lib_t:.2f} | {lib_t / r['batch_per_problem_s']:.1f}x |")
    if "sbl" in rows:
        s_ = rows["sbl"]
        lines += ["", f"SBL against the library's `sbl` on the first {args.loop} problems: the same support in "
                  f"{s_['library_same_support']}, the same iteration count in {s_['library_same_n_iter']}; largest "
                  f"relative difference of x {s_['library_max_rel_diff']:.1e} (round-off: the steps are the same, "
                  "the arithmetic is torch's batched kernels instead of numpy's)."]
    if "krosbl" in rows:
        k = rows["krosbl"]
        lines += ["", f"KroSBL on the first {args.loop} problems: batch median NMSE "
                  f"{k['batch_nmse_db_median_same_problems']:.2f} dB, library `krosbl` (restarts) "
                  f"{k['library_krosbl_nmse_db_median']:.2f} dB."]
    B._common.write_text(B.RESULTS / "recovery_batched.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
