"""Batched recovery: many problems with one dictionary in one call against a loop of single calls.

N = 512, M = 128: KroSBL on A = A_1 (x) A_2 with A_1 8 x 16, A_2 16 x 32 (x = u (x) v with 2 and
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


def nmse_db(Xh, X):
    return [B.nmse_db(a, b) for a, b in zip(Xh, X)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--loop", type=int, default=50)
    args = ap.parse_args()
    B.setup_threads()
    fs, X, Y, nv = problems(args.problems)
    A = np.kron(fs[0], fs[1])
    out = {"problems": args.problems, "loop_problems": args.loop, "N": 512, "M": 128,
           "command": B._common.command_line(), "results": {}}
    with B._common.bench_lock():
        rows = {}
        batch, tb = B.timed(lambda: R.krosbl_batch(fs, Y, noise_var=nv))
        singles, tl = B.timed(lambda: [R.krosbl_batch(fs, Y[b], noise_var=nv) for b in range(args.loop)])
        lib, tk = B.timed(lambda: [R.krosbl(fs, Y[b], noise_var=nv) for b in range(args.loop)])
        same = all(np.array_equal(s.x, batch.x[b]) for b, s in enumerate(singles))
        rows["krosbl"] = {"batch_per_problem_s": tb / args.problems, "loop_per_problem_s": tl / args.loop,
                          "speedup": (tl / args.loop) / (tb / args.problems), "identical_to_single_calls": same,
                          "nmse_db_median": float(np.median(nmse_db(batch.x, X))),
                          "library_krosbl_per_problem_s": tk / args.loop,
                          "library_krosbl_nmse_db_median": float(np.median(nmse_db([r.x for r in lib], X[:args.loop]))),
                          "batch_nmse_db_median_same_problems": float(np.median(nmse_db(batch.x[:args.loop],
                                                                                         X[:args.loop])))}
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
             f"{args.problems} problems in one call; single calls (the batch of one, same code) timed on the first "
             f"{args.loop}; per-problem times in ms.", "",
             "| method | batch ms/problem | single-call loop ms/problem | speed-up | identical to single calls | "
             "median NMSE dB | library single call ms/problem |", "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lib_t = r.get("library_krosbl_per_problem_s", r.get("library_omp_per_problem_s"))
        lines.append(f"| {n}_batch | {1e3 * r['batch_per_problem_s']:.2f} | {1e3 * r['loop_per_problem_s']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['identical_to_single_calls']} | {r['nmse_db_median']:.2f} | "
                     f"{1e3 * lib_t:.2f} |")
    k = rows["krosbl"]
    lines += ["", f"KroSBL on the first {args.loop} problems: batch median NMSE "
              f"{k['batch_nmse_db_median_same_problems']:.2f} dB, library `krosbl` (restarts) "
              f"{k['library_krosbl_nmse_db_median']:.2f} dB."]
    B._common.write_text(B.RESULTS / "recovery_batched.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
