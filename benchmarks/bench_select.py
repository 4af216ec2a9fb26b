"""QuickSelection against variance, mutual information and Laplacian score, 50 features.

On scikit-learn's digits, MNIST-5k and mnist1d (the train splits of
``sparsecraft.train.datasets``, flattened): each selector picks 50 features from the training
set; an extra-trees classifier (100 trees, seeded) trained on those features is scored on
the test split. Time and peak memory of each selector's fit are measured in the same run
(peak memory: ``tracemalloc`` peak of Python/numpy allocations plus, for QuickSelection, the
bytes of its stored connections; torch allocations are not traced by tracemalloc). Seeds
change the selectors' and the classifier's randomness.

    nice -n 19 .venv/bin/python benchmarks/bench_select.py [--seeds 0 1 2]

Writes benchmarks/results/select.json and select.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc

from _common import RESULTS, bench_lock, command_line, git_commit, write_json, write_text

DATASETS = ("digits", "mnist", "mnist1d")
METHODS = ("quickselection", "variance", "mutual_info", "laplacian")


def laplacian_scores(X, k: int = 5):
    """He et al. (2005) Laplacian score (lower = better) with a heat-kernel kNN graph."""
    import numpy as np
    from sklearn.neighbors import kneighbors_graph

    dist = kneighbors_graph(X, k, mode="distance", include_self=False)
    t = float(np.mean(dist.data ** 2)) or 1.0
    dist.data = np.exp(-dist.data ** 2 / t)
    S = 0.5 * (dist + dist.T)
    d = np.asarray(S.sum(1)).ravel()
    Xc = X - (X.T @ d / d.sum())[None, :]
    num = (Xc * Xc * d[:, None]).sum(0) - np.einsum("ij,ij->j", Xc, S @ Xc)
    den = (Xc * Xc * d[:, None]).sum(0)
    score = np.full(X.shape[1], np.inf)
    ok = den > 1e-12
    score[ok] = num[ok] / den[ok]
    return score


def select(method: str, X, y, k: int, seed: int):
    import numpy as np

    if method == "quickselection":
        from sparsecraft.select import QuickSelection

        qs = QuickSelection(n_features_to_select=k, hidden=200, epsilon=13, epochs=20, random_state=seed).fit(X)
        return qs.get_support(indices=True), qs.n_connections_ * 16  # two int64 indices and a float32 value + momentum
    if method == "variance":
        return np.argsort(-X.var(0), kind="stable")[:k], 0
    if method == "mutual_info":
        from sklearn.feature_selection import mutual_info_classif

        return np.argsort(-mutual_info_classif(X, y, random_state=seed), kind="stable")[:k], 0
    return np.argsort(laplacian_scores(X), kind="stable")[:k], 0


def run(dataset: str, seed: int, k: int) -> dict:
    from sklearn.ensemble import ExtraTreesClassifier

    from sparsecraft.train.datasets import load_dataset

    xtr, ytr, xte, yte = load_dataset(dataset)
    xtr, xte = xtr.flatten(1).numpy().astype("float64"), xte.flatten(1).numpy().astype("float64")
    ytr, yte = ytr.numpy(), yte.numpy()
    # mnist1d has 40 features: there the selectors pick half of them
    k = min(k, xtr.shape[1] // 2) if k >= xtr.shape[1] else k
    row: dict = {"dataset": dataset, "seed": seed, "features": xtr.shape[1], "k": k}
    for method in METHODS:
        tracemalloc.start()
        start = time.perf_counter()
        idx, extra = select(method, xtr, ytr, k, seed)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] + extra
        tracemalloc.stop()
        clf = ExtraTreesClassifier(n_estimators=100, random_state=seed, n_jobs=1).fit(xtr[:, idx], ytr)
        row[method] = {"accuracy": float(clf.score(xte[:, idx], yte)), "seconds": seconds, "peak_mb": peak / 2**20}
    clf = ExtraTreesClassifier(n_estimators=100, random_state=seed, n_jobs=1).fit(xtr, ytr)
    row["all_features"] = float(clf.score(xte, yte))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args(argv)
    with bench_lock():
        rows = [run(d, s, args.k) for d in DATASETS for s in args.seeds]
    summary: dict = {}
    for d in DATASETS:
        rs = [r for r in rows if r["dataset"] == d]
        summary[d] = {m: {key: statistics.median(r[m][key] for r in rs) for key in ("accuracy", "seconds", "peak_mb")}
                      for m in METHODS}
        summary[d]["all_features"] = statistics.median(r["all_features"] for r in rs)
        summary[d]["k"] = rs[0]["k"]
    n_features = {r["dataset"]: r["features"] for r in rows}
    aims = {d: summary[d]["quickselection"]["accuracy"] >= max(summary[d][m]["accuracy"] for m in METHODS[1:])
            for d in DATASETS}
    result = {"command": command_line(), "commit": git_commit(), "settings": vars(args), "runs": rows,
              "median": summary, "aims": aims}
    write_json(RESULTS / "select.json", result)
    lines = [f"Command: `{result['command']}`", "",
             f"{args.k} features selected on the training split (on a data set with no more than {args.k} "
             "features, half of them); extra-trees (100 trees) on them, test accuracy; "
             f"medians over seeds {args.seeds}. QuickSelection: 200 hidden, epsilon 13, 20 epochs.", "",
             "| data set | features | selected | selector | accuracy | fit s | peak MB |", "|---|---|---|---|---|---|---|"]
    for d in DATASETS:
        for m in METHODS:
            s = summary[d][m]
            lines.append(f"| {d} | {n_features[d]} | {summary[d]['k']} | {m} | {s['accuracy']:.4f} | {s['seconds']:.2f} "
                         f"| {s['peak_mb']:.1f} |")
        lines.append(f"| {d} | {n_features[d]} | all | (all features) | {summary[d]['all_features']:.4f} | | |")
    lines += ["", "Aim (QuickSelection at least the best of the others): "
              + "; ".join(f"{d}: {'met' if v else 'MISSED'}" for d, v in aims.items())]
    write_text(RESULTS / "select.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
