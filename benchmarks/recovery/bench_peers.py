"""Sparse recovery side by side with the maintained tools, on the same problems in one run.

Problems (``--problem``):

* ``gaussian``: N(0, 1/M) dictionary, N = 512, M = 128, K = 5..40 Gaussian non-zeros, at 20 dB
  (``--snr 20``) or noiseless (``--snr inf``).
* ``dft``: partial unitary DFT (complex), N = 512, M = 128 random rows, complex Gaussian
  non-zeros, 20 dB. The peers are real-valued: they get the real embedding with each
  coefficient's real and imaginary parts as two adjacent columns; where a peer has groups
  (skglm, celer: group Lasso; abess: group best subset) the pair is one group, which makes the
  group Lasso exactly the complex Lasso.
* ``lorenz``: Lorenz-63 equation discovery as sparse regression: a trajectory (5000 steps of
  0.002, random start), Gaussian noise of ``level`` times each state's standard deviation,
  Savitzky-Golay derivatives and smoothed states (window 51), the degree-2 library (10 terms);
  every method regresses each of the 3 derivatives on the same library.

Methods. Ours: ``sbl`` (fast SBL, noise learned: the library default), ``omp`` told K (Gaussian,
DFT); on Lorenz STLSQ and SBL/RVM with thresholding at 0.5 (as ``bench_lorenz.py``). Peers, each
with its documented default (``*_default``) and its best cross-validated setting (``*_cv``)
where it has one: scikit-learn OrthogonalMatchingPursuit (default: 10% of the features; also
told K) and OrthogonalMatchingPursuitCV, Lasso (alpha = 1) and LassoCV, ARDRegression (its
hyperparameters are set by evidence maximisation: no CV setting); skglm MCPRegression (alpha = 1,
gamma = 3) and MCP with alpha by 5-fold CV over 20 values (skglm's GeneralizedLinearEstimatorCV);
celer Lasso, and
Lasso with alpha by 5-fold CV over 30 values (scikit-learn's GridSearchCV: celer's LassoCV fails with
scikit-learn >= 1.8); abess LinearRegression (default: support size by EBIC up to its
default ``s_max``) and abess with 5-fold CV over support sizes 0..M/2; L0Learn where pip can
install it. No intercept anywhere (``fit_intercept=False``: the problems have none). Peers are
installed at run time (``_peers.ensure``); a peer that cannot be is named in the results.

Per trial and method: NMSE (dB), support F1 and exact support (entries above 1e-3 of the
largest magnitude, against the true support), time. Reported: medians over the trials (and
the exact-support rate); a PNG per problem; ``recovery_peers.md`` (all problems run so far)
with, per point, the best of ours against the best peer and where a peer wins.

    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_peers.py --problem gaussian --snr 20 --trials 50
    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_peers.py --problem gaussian --snr inf --trials 50
    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_peers.py --problem dft --trials 50
    OMP_NUM_THREADS=1 python benchmarks/recovery/bench_peers.py --problem lorenz --trials 50
    python benchmarks/recovery/bench_peers.py --table      # figures and recovery_peers.md from the JSON files
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import warnings

import _peers
import numpy as np

import sparsecraft.recovery as R
from sparsecraft.recovery import discovery as D

import _bench as B

PEERS = {"sklearn": ("sklearn", "scikit-learn"), "skglm": ("skglm", None), "celer": ("celer", None),
         "abess": ("abess", None), "l0learn": ("l0learn", "l0learn"), "pysindy": ("pysindy", None)}
EXACT_DB = -100.0
TAGS = ("gaussian_snr20", "gaussian_snrinf", "dft_snr20", "lorenz")
# A peer is "of equal accuracy" when its median NMSE is within this many dB of ours.
EQUAL_DB = 1.0


# -- problems ------------------------------------------------------------------------------------
def gaussian_problem(K, snr, seed, N=512, M=128):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((M, N)) / np.sqrt(M)
    x = np.zeros(N)
    x[rng.choice(N, K, replace=False)] = rng.standard_normal(K)
    y0 = A @ x
    nv = 0.0 if snr == "inf" else float(np.mean(y0 ** 2) / 10 ** (float(snr) / 10))
    return A, y0 + np.sqrt(nv) * rng.standard_normal(M), x


def dft_problem(K, snr, seed, N=512, M=128):
    rng = np.random.default_rng(seed)
    op = R.PartialDFTOperator(N, np.sort(rng.choice(N, M, replace=False)))
    x = np.zeros(N, complex)
    x[rng.choice(N, K, replace=False)] = (rng.standard_normal(K) + 1j * rng.standard_normal(K)) / np.sqrt(2)
    A = op.to_dense().numpy()
    y0 = A @ x
    nv = float(np.mean(np.abs(y0) ** 2) / 10 ** (float(snr) / 10))
    return A, y0 + np.sqrt(nv / 2) * (rng.standard_normal(M) + 1j * rng.standard_normal(M)), x


def real_embedding(A, y):
    """``(A_r, y_r)`` with ``A_r [Re x_0, Im x_0, Re x_1, ...] = [Re y; Im y]`` (pairs adjacent)."""
    M, N = A.shape
    Ar = np.empty((2 * M, 2 * N))
    Ar[:M, 0::2], Ar[M:, 0::2] = A.real, A.imag
    Ar[:M, 1::2], Ar[M:, 1::2] = -A.imag, A.real
    return Ar, np.concatenate([y.real, y.imag])


def lorenz_problem(level, seed, dt=0.002, steps=5000):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform([-15, -15, 10], [15, 15, 40])
    _, X, _ = D.lorenz63(steps, dt, tuple(x0))
    X = X.numpy()
    Xn = X + level * X.std(0) * rng.standard_normal(X.shape)
    dX = np.asarray(D.derivative(Xn, dt, window=51))
    Th, names = D.polynomial_library(D.smooth(Xn, window=51), 2)
    return np.asarray(Th), dX, D.lorenz63_coefficients(names)


# -- methods -------------------------------------------------------------------------------------
def coef(est):
    return np.asarray(est.coef_).ravel()


def peer_methods(mods, K, M, groups=False):
    """``name -> fit(A, y) -> x`` for every installed peer (real data; ``groups``: pairs of columns)."""
    out = {}
    sk = mods.get("sklearn")
    if sk is not None:
        from sklearn.linear_model import (
            ARDRegression,
            Lasso,
            LassoCV,
            OrthogonalMatchingPursuit,
            OrthogonalMatchingPursuitCV,
        )
        kk = 2 * K if groups else K
        out["sk_omp_default"] = lambda A, y: coef(OrthogonalMatchingPursuit(fit_intercept=False).fit(A, y))
        if K is not None:
            out["sk_omp_told_K"] = lambda A, y: coef(OrthogonalMatchingPursuit(n_nonzero_coefs=kk,
                                                                                fit_intercept=False).fit(A, y))
        out["sk_omp_cv"] = lambda A, y: coef(OrthogonalMatchingPursuitCV(fit_intercept=False).fit(A, y))
        out["sk_lasso_default"] = lambda A, y: coef(Lasso(fit_intercept=False).fit(A, y))
        out["sk_lasso_cv"] = lambda A, y: coef(LassoCV(fit_intercept=False).fit(A, y))
        out["sk_ard_default"] = lambda A, y: coef(ARDRegression(fit_intercept=False).fit(A, y))
    sg = mods.get("skglm")
    if sg is not None:
        from skglm import GroupLasso, MCPRegression
        from skglm.cv import GeneralizedLinearEstimatorCV
        from skglm.datafits import Quadratic
        from skglm.penalties import MCPenalty
        from skglm.solvers import AndersonCD
        if groups:
            out["skglm_grouplasso_default"] = lambda A, y: coef(GroupLasso(groups=2, fit_intercept=False).fit(A, y))
            out["skglm_grouplasso_cv"] = lambda A, y: coef(grid_cv(GroupLasso(groups=2, fit_intercept=False), A, y,
                                                                   group_alpha_max(A, y), n_alphas=20))
        else:
            out["skglm_mcp_default"] = lambda A, y: coef(MCPRegression(fit_intercept=False).fit(A, y))
            out["skglm_mcp_cv"] = lambda A, y: coef(GeneralizedLinearEstimatorCV(
                Quadratic(), MCPenalty(alpha=1.0, gamma=3.0), AndersonCD(fit_intercept=False), cv=5, n_alphas=20,
                random_state=0).fit(A, y))
    ce = mods.get("celer")
    if ce is not None:
        # celer's own LassoCV / GroupLassoCV fail with scikit-learn >= 1.8 (they pass n_alphas,
        # which LinearModelCV no longer takes): alpha by scikit-learn's GridSearchCV instead.
        if groups:
            out["celer_grouplasso_default"] = lambda A, y: coef(ce.GroupLasso(groups=2, fit_intercept=False).fit(A, y))
            out["celer_grouplasso_cv"] = lambda A, y: coef(grid_cv(ce.GroupLasso(groups=2, fit_intercept=False),
                                                                   A, y, group_alpha_max(A, y)))
        else:
            out["celer_lasso_default"] = lambda A, y: coef(ce.Lasso(fit_intercept=False).fit(A, y))
            out["celer_lasso_cv"] = lambda A, y: coef(grid_cv(ce.Lasso(fit_intercept=False), A, y,
                                                              float(np.abs(A.T @ y).max()) / len(y)))
    ab = mods.get("abess")
    if ab is not None:
        from abess.linear import LinearRegression
        g = (lambda A: {"group": np.arange(A.shape[1]) // 2}) if groups else (lambda A: {})
        out["abess_default"] = lambda A, y: coef(LinearRegression(fit_intercept=False, **g(A)).fit(A, y))
        sizes = range(0, M // 2 + 1)
        out["abess_cv"] = lambda A, y: coef(LinearRegression(fit_intercept=False, cv=5, support_size=sizes,
                                                             **g(A)).fit(A, y))
    # L0Learn: pip finds no distribution of it for this Python (checked at run time and recorded
    # in the results); no method is written for it, untested.
    return out


def grid_cv(est, A, y, alpha_max, n_alphas=30, eps=1e-3):
    """``est`` refitted at the alpha (of ``n_alphas`` from ``alpha_max`` down to ``eps`` times it)
    with the best 5-fold cross-validated mean squared error."""
    from sklearn.model_selection import GridSearchCV, KFold

    grid = {"alpha": list(alpha_max * np.geomspace(1.0, eps, n_alphas))}
    return GridSearchCV(est, grid, cv=KFold(5, shuffle=True, random_state=0),
                        scoring="neg_mean_squared_error").fit(A, y).best_estimator_


def group_alpha_max(A, y):
    """The smallest group-Lasso alpha (pairs of columns, scikit-learn's scaling) that zeroes every group."""
    c = A.T @ y
    return float(np.sqrt(c[0::2] ** 2 + c[1::2] ** 2).max()) / len(y)


def methods_for(problem, mods, K):
    """``name -> (kind, fit)``; ``kind`` is 'ours' or 'peer'. ``fit(prob) -> x`` (complex for DFT)."""
    meths = {}
    if problem in ("gaussian", "dft"):
        meths["ours_sbl"] = ("ours", lambda p: R.sbl(p["A"], p["y"], record_cost=False).x)
        meths["ours_omp_told_K"] = ("ours", lambda p: R.omp(p["A"], p["y"], K).x)
        groups = problem == "dft"
        for name, fit in peer_methods(mods, K, 128, groups=groups).items():
            if groups:
                meths[name] = ("peer", lambda p, fit=fit: _from_real(fit(p["Ar"], p["yr"])))
            else:
                meths[name] = ("peer", lambda p, fit=fit: fit(p["A"], p["y"]))
    else:
        meths["ours_stlsq"] = ("ours", lambda p: np.asarray(D.stlsq(p["A"], p["Y"], 0.5)))
        meths["ours_sbl_rvm"] = ("ours", lambda p: np.asarray(D.sbl_threshold(p["A"], p["Y"], 0.5)))
        ps = mods.get("pysindy")
        if ps is not None:
            meths["pysindy_stlsq_default"] = ("peer", lambda p: ps.STLSQ().fit(p["A"], p["Y"]).coef_.T)
            meths["pysindy_sr3_default"] = ("peer", lambda p: ps.SR3().fit(p["A"], p["Y"]).coef_.T)
        for name, fit in peer_methods(mods, None, 10).items():
            meths[name] = ("peer", lambda p, fit=fit: np.stack([fit(p["A"], p["Y"][:, j]) for j in range(3)], 1))
    return meths


def _from_real(xr):
    return xr[0::2] + 1j * xr[1::2]


# -- metrics -------------------------------------------------------------------------------------
def support(v, rel=1e-3):
    mag = np.abs(v)
    return mag > rel * max(mag.max(), 1e-300)


def metrics(xh, x):
    xh = np.asarray(xh).reshape(x.shape)
    est, true = support(xh), x != 0
    return {"nmse_db": B.nmse_db(xh, x), "f1": B.support_f1(xh.ravel(), x.ravel()),
            "exact": float(np.array_equal(est, true))}


# -- one trial (all methods back to back, so a trial's times compare like with like) ---------------
_WARM: set = set()


def one_trial(job):
    """All methods on one problem; the first trial of a process runs them once untimed first
    (imports, numba compilation: skglm's first call compiles for minutes)."""
    problem, point, seed, peer_names = job
    B.setup_threads()
    warnings.filterwarnings("ignore")
    mods = {n: _peers.ensure(*PEERS[n])[0] for n in peer_names}
    if problem == "gaussian":
        K, snr = point
        A, y, x = gaussian_problem(K, snr, seed)
        prob = {"A": A, "y": y}
    elif problem == "dft":
        K, snr = point
        A, y, x = dft_problem(K, snr, seed)
        Ar, yr = real_embedding(A, y)
        prob = {"A": A, "y": y, "Ar": Ar, "yr": yr}
    else:
        K = None
        A, Y, x = lorenz_problem(point[0], seed)
        prob = {"A": A, "Y": Y}
    rows = {}
    meths = methods_for(problem, mods, K)
    if problem not in _WARM:
        _WARM.add(problem)
        for _, fit in meths.values():
            try:
                fit(prob)
            except Exception:  # noqa: BLE001 - reported by the timed run below
                pass
    for name, (_, fit) in meths.items():
        try:
            xh, dt = B.timed(lambda: fit(prob))
            rows[name] = {**metrics(xh, x), "time": dt}
        except Exception as exc:  # a peer failing on a trial is reported, not fatal
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return rows


def points(problem, args):
    if problem == "gaussian":
        return [(K, args.snr) for K in args.ks]
    if problem == "dft":
        return [(K, args.snr) for K in args.ks]
    return [(lvl,) for lvl in args.levels]


def point_key(problem, pt):
    return f"noise={pt[0]}" if problem == "lorenz" else f"snr={pt[1]},K={pt[0]}"


def summarize(rows):
    ok = [r for r in rows if "error" not in r]
    s = B.summarize(ok, keys=("nmse_db", "f1", "exact", "time"))
    s["errors"] = len(rows) - len(ok)
    if len(ok) < len(rows):
        s["first_error"] = next(r["error"] for r in rows if "error" in r)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", choices=["gaussian", "dft", "lorenz"], default="gaussian")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--snr", default="20", help="dB, or 'inf' (noiseless); gaussian and dft")
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.001, 0.01, 0.02, 0.05])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only rewrite recovery_peers.md from the JSON files")
    B.add_lock_option(ap)
    args = ap.parse_args()
    if args.table:
        for tag in TAGS:
            path = B.RESULTS / f"recovery_peers_{tag}.json"
            if path.exists():
                plot(json.loads(path.read_text()), tag)
        report()
        return
    if args.ks is None:
        args.ks = [5, 10, 20, 30, 40] if args.problem == "gaussian" else [5, 10, 20, 30]
    B.setup_threads()
    peers = {}
    for name, (module, package) in PEERS.items():
        if args.problem != "lorenz" and name == "pysindy":
            continue
        mod, note = _peers.ensure(module, package)
        peers[name] = {"available": mod is not None, "note": note,
                       "version": getattr(mod, "__version__", None) if mod is not None else None}
    available = [n for n, p in peers.items() if p["available"]]
    tag = args.problem + ("" if args.problem == "lorenz" else f"_snr{args.snr}")
    out = {"problem": args.problem, "trials": args.trials, "peers": peers, "equal_db": EQUAL_DB,
           "command": B._common.command_line(), "results": {}}
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    with B.lock(args, out):
        kinds = None
        for i, pt in enumerate(points(args.problem, args)):
            base = 70_000 + 1000 * i + (500 if args.snr == "inf" else 0)
            jobs = [(args.problem, pt, base + t, available) for t in range(args.trials)]
            got = list(pool.imap(one_trial, jobs)) if pool is not None else [one_trial(j) for j in jobs]
            if kinds is None:
                kinds = {n: k for n, (k, _) in methods_for(args.problem, {n: True for n in available},
                                                            pt[0] if args.problem != "lorenz" else None).items()}
                out["kinds"] = kinds
            res = {n: summarize([g[n] for g in got]) for n in got[0]}
            out["results"][point_key(args.problem, pt)] = res
            print(point_key(args.problem, pt) + " " + " ".join(
                f"{n}:{s.get('nmse_db_median', float('nan')):.1f}dB/f1={s.get('f1_median', float('nan')):.2f}/"
                f"exact={s.get('exact_mean', float('nan')):.2f}/{1e3 * s.get('time_median', float('nan')):.1f}ms"
                + (f"/errors={s['errors']}" if s["errors"] else "") for n, s in res.items()), flush=True)
            B.write_json(f"peers_{tag}", out)
    plot(out, tag)
    report()


# -- figures and the table -------------------------------------------------------------------------
def plot(out, tag):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(out["results"])
    xs = [float(k.split("=")[-1]) for k in keys]
    names = list(out["results"][keys[0]])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for n in names:
        style = "-o" if out["kinds"].get(n) == "ours" else "--."
        lw = 2.2 if out["kinds"].get(n) == "ours" else 1.0
        for ax, key in zip(axes, ("nmse_db_median", "f1_median", "time_median")):
            vals = [out["results"][k][n].get(key, np.nan) for k in keys]
            if key == "time_median":
                vals = [1e3 * v for v in vals]
            ax.plot(xs, vals, style, lw=lw, ms=4, label=n)
    xlabel = "noise level" if out["problem"] == "lorenz" else "K"
    for ax, lab in zip(axes, ("median NMSE (dB)", "median support F1", "median time (ms)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(lab)
        ax.grid(True)
    axes[2].set_yscale("log")
    if out["problem"] == "lorenz":
        for ax in axes:
            ax.set_xscale("log")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{tag}: ours (solid) against peers (dashed), {out['trials']} trials per point")
    fig.tight_layout()
    B._common.save_figure(fig, B.RESULTS / f"recovery_peers_{tag}.png")
    plt.close(fig)


def verdict(res, kinds):
    """At one point: the best of ours and the best peer (by median NMSE), who is more accurate,
    and the speed match-up at equal accuracy: the fastest of ours and the fastest peer among
    the methods whose median NMSE is within EQUAL_DB of our best (or better). A user wanting
    our best accuracy can take either of the two; the faster one wins the point."""
    def db(n):
        # Below EXACT_DB the difference is round-off: every such median counts as exact recovery.
        return max(res[n]["nmse_db_median"], EXACT_DB)

    def ran(kind):
        return [n for n, s in res.items() if kinds.get(n) == kind and "nmse_db_median" in s]

    o_db, o = min((db(n), n) for n in ran("ours"))
    peers = ran("peer")
    if not peers:
        return o, None, "no peer ran", None, None
    p_db, p = min((db(n), n) for n in peers)
    fastest_ours = min((res[n]["time_median"], n) for n in ran("ours") if db(n) <= o_db + EQUAL_DB)[1]
    eq = [(res[n]["time_median"], n) for n in peers if db(n) <= o_db + EQUAL_DB]
    fastest_eq = min(eq)[1] if eq else None
    if p_db < o_db - EQUAL_DB:
        acc = f"**peer wins**: {p} {o_db - p_db:.1f} dB more accurate"
    elif p_db < o_db:
        acc = f"tie (peer {p} {o_db - p_db:.1f} dB better, within {EQUAL_DB:g} dB)"
    else:
        acc = f"ours ({o_db - p_db:+.1f} dB against {p})"
    return o, p, acc, fastest_ours, fastest_eq


def report():
    lines = ["# Sparse recovery against the maintained tools (issue 16)", "",
             "Written by `benchmarks/recovery/bench_peers.py` (problems and settings in its docstring). Medians over "
             "the trials; NMSE in dB; exact = rate of trials whose support (entries above 1e-3 of the largest) is "
             f"exactly the true one. *Wins*: the best of ours against the best peer by median NMSE (a difference "
             f"under {EQUAL_DB:g} dB is a tie; medians below {EXACT_DB:g} dB count as exact recovery, equal); *speed*: among "
             f"the methods whose median NMSE is within {EQUAL_DB:g} dB of our best (or better), the fastest of ours against "
             "the fastest peer (median times, measured back to back in each trial).", ""]
    found = False
    tallies = {}
    for tag in TAGS:
        path = B.RESULTS / f"recovery_peers_{tag}.json"
        if not path.exists():
            continue
        found = True
        out = json.loads(path.read_text())
        kinds, res = out["kinds"], out["results"]
        lines += [f"## {tag} ({out['trials']} trials per point)", "", f"Command: `{out['command']}`  ",
                  "Peers: " + "; ".join(f"{n} {p['version'] or ''} ({p['note']})" if p["available"]
                                        else f"{n}: {p['note']}" for n, p in out["peers"].items()) + "  "]
        note = B.timing_note(out)
        if note:
            lines.append(note + "  ")
        lines += [f"Figure: `recovery_peers_{tag}.png`", "",
                  "| point | best of ours | best peer | accuracy | speed at equal accuracy: fastest peer vs fastest of ours |",
                  "|---|---|---|---|---|"]
        tally = tallies.setdefault(tag, {"points": 0, "accurate": 0, "faster": 0})
        for key, r in res.items():
            o, p, acc, fo, feq = verdict(r, kinds)
            if feq is None:
                speed = "no peer of equal accuracy"
            else:
                ratio = r[feq]["time_median"] / r[fo]["time_median"]
                speed = (f"{feq} {1e3 * r[feq]['time_median']:.1f} ms vs {fo} {1e3 * r[fo]['time_median']:.1f} ms: "
                         + (f"ours {ratio:.1f}x faster" if ratio >= 1 else f"**peer {1 / ratio:.1f}x faster**"))
            if p is None:
                lines.append(f"| {key} | {o} | - | {acc} | - |")
            else:
                lines.append(f"| {key} | {o} {r[o]['nmse_db_median']:.1f} dB | {p} {r[p]['nmse_db_median']:.1f} dB "
                             f"| {acc} | {speed} |")
            tally["points"] += 1
            tally["accurate"] += p is None or not acc.startswith("**peer")
            tally["faster"] += feq is None or r[feq]["time_median"] >= r[fo]["time_median"]
        names = list(next(iter(res.values())))
        lines += ["", "median NMSE dB / median support F1 / exact-support rate / median time ms", "",
                  "| method | " + " | ".join(res) + " |", "|---" * (len(res) + 1) + "|"]
        for n in names:
            cells = []
            for key in res:
                s = res[key][n]
                if "nmse_db_median" not in s:
                    cells.append(f"failed ({s.get('first_error', '')[:60]})")
                    continue
                cells.append(f"{s['nmse_db_median']:.1f} / {s['f1_median']:.2f} / {s['exact_mean']:.2f} / "
                             f"{1e3 * s['time_median']:.1f}" + (f" ({s['errors']} failed)" if s["errors"] else ""))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if found:
        lines += ["## Against the aims", "",
                  "Points where ours is at least as accurate as the best peer (a peer ahead by less than "
                  f"{EQUAL_DB:g} dB is a tie), and where the fastest of ours is at least as fast as the fastest "
                  "peer of equal accuracy (or no peer reaches our accuracy).", "",
                  "| problem | points | ours at least as accurate | ours faster at equal accuracy |", "|---|---|---|---|"]
        for tag, t in tallies.items():
            lines.append(f"| {tag} | {t['points']} | {t['accurate']} | {t['faster']} |")
        lines.append("")
        B._common.write_text(B.RESULTS / "recovery_peers.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
