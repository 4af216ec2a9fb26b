"""Sparse training on real data: accuracy against sparsity, N:M recipes, a soup, step overhead.

    python benchmarks/bench_train.py                  # everything (resumable)
    python benchmarks/bench_train.py --part grid      # one part: grid, nm, soup, overhead
    python benchmarks/bench_train.py --table          # rewrite tables and plots only

Results accumulate in benchmarks/results/train.json (a finished run is skipped on re-run;
each run records the commit that produced it). The grid, N:M and soup parts run with one
thread (OMP_NUM_THREADS=1); the overhead part times steps side by side. A run holds the
benchmark lock (``benchmarks/_common.py``) while it trains, so it cannot disturb a timing run.

Set-up (every run): SGD with momentum 0.9, lr 0.05 cosine, weight decay 1e-4, batch 64,
1,500 steps (24 epochs of the 4,000 MNIST training digits); IMP trains 3 prune-rewind rounds
plus a final round of 1,500 steps each (rewind to step 75). Accuracy on the 1,000 held-out
digits (mnist) / 1,000 test samples (mnist1d).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsecraft.train.runner import TrainRecipe, run_training  # noqa: E402

from _common import RESULTS, bench_lock, git_commit, merge_json, read_json, save_figure, write_text  # noqa: E402

OUT = RESULTS / "train.json"
SEEDS = (0, 1, 2)
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
METHODS = ("static", "snip", "gmp", "imp", "set", "rigl")
SETTINGS = [("mnist", "lenet300"), ("mnist", "cnn"), ("mnist1d", "lenet300")]
NM_PATTERNS = ("2:4", "1:4", "1:8")
SOUP_STEPS, SOUP_LR = 1500, 0.05  # each ingredient retrains with the full schedule
SOUP_SPARSITIES = (0.9, 0.95)

log = logging.getLogger("bench_train")


def _load() -> dict:
    return read_json(OUT, {})


def _store(results: dict) -> None:
    """Merge ``results`` into the file (several processes may run different parts at once)."""
    results.update(merge_json(OUT, results, sort_keys=True))


def _run(results, key, recipe: TrainRecipe, **kwargs):
    if key in results:
        return results[key]
    t = time.perf_counter()
    r = run_training(recipe, progress=False, **kwargs)
    r.pop("model", None)
    r["wall_seconds"] = time.perf_counter() - t
    results[key] = {k: v for k, v in r.items() if k != "layer_sparsity"}
    results[key]["git_commit"] = git_commit()
    _store(results)
    log.info("%s: acc %.4f sparsity %.4f (%.1fs)", key, r["test_accuracy"], r["sparsity"], r["wall_seconds"])
    return results[key]


def part_grid(results, settings=None):
    settings = settings or SETTINGS
    for data, model in settings:
        for seed in SEEDS:
            _run(results, f"grid/{data}/{model}/dense/0/{seed}",
                 TrainRecipe(data=data, model=model, method="dense", sparsity=None, seed=seed))
    # 90% first: the aim is stated there; then the rest of the curve
    for s in sorted(SPARSITIES, key=lambda v: (v != 0.9, v)):
        for data, model in settings:
            for method in METHODS:
                for seed in SEEDS:
                    _run(results, f"grid/{data}/{model}/{method}/{s}/{seed}",
                         TrainRecipe(data=data, model=model, method=method, sparsity=s, seed=seed))


LONG_STEPS = 6000


def part_long(results):
    """mnist1d at 90% with 4x the training steps: do the from-scratch methods catch up?"""
    for method in ("dense", "static", "set", "rigl", "gmp"):
        for seed in SEEDS:
            _run(results, f"long/mnist1d/lenet300/{method}/0.9/{seed}",
                 TrainRecipe(data="mnist1d", model="lenet300", method=method,
                             sparsity=None if method == "dense" else 0.9, steps=LONG_STEPS, seed=seed))


def part_nm(results):
    for seed in SEEDS:
        _run(results, f"nm/mnist/mlp/dense/-/{seed}",
             TrainRecipe(data="mnist", model="mlp", method="dense", sparsity=None, seed=seed))
    for pattern in NM_PATTERNS:
        for method in ("srste", "decaying-nm"):
            for seed in SEEDS:
                _run(results, f"nm/mnist/mlp/{method}/{pattern}/{seed}",
                     TrainRecipe(data="mnist", model="mlp", method=method, pattern=pattern, sparsity=None, seed=seed))


def part_soup(results):
    """Sparse model soup: train LeNet-300-100 dense, then two rounds of (magnitude-prune to
    90% / 95%, retrain 3 copies with different data orders under the shared mask, average);
    each round starts from the previous soup. Each ingredient and soup is evaluated."""
    if "soup_v4" in results:
        return
    import sparsecraft as sc
    from sparsecraft.train import sparse_soup
    from sparsecraft.train.runner import accuracy, load_dataset

    base = run_training(TrainRecipe(method="dense", sparsity=None, seed=0), progress=False, return_model=True)
    _, _, x_test, y_test = load_dataset("mnist")

    def prune(model, round_):
        sc.prune_(model, sc.Magnitude(sparsity=SOUP_SPARSITIES[round_])).finalize_()
        return model

    def retrain(model, seed, round_):
        r = run_training(
            TrainRecipe(method="static", sparsity=None, seed=100 * (round_ + 1) + seed, steps=SOUP_STEPS,
                        lr=SOUP_LR, options={"criterion": "existing"}),
            progress=False, model=model, return_model=True,
        )
        return r["model"]

    def test_loss(m):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(x_test), y_test))

    def distance(a, b):
        with torch.no_grad():
            return float(sum((p - q).pow(2).sum() for p, q in zip(a.parameters(), b.parameters())).sqrt())

    rounds_out, current = [], base["model"]
    for r in range(len(SOUP_SPARSITIES)):
        # one round at a time, so every round's soup is evaluated too
        soup, ingredients = sparse_soup(current, retrain, seeds=SEEDS, prune=lambda m, _r, r=r: prune(m, r))
        models = ingredients[0]
        rounds_out.append({
            "sparsity": SOUP_SPARSITIES[r],
            "ingredients": [accuracy(m, x_test, y_test) for m in models],
            "ingredient_losses": [test_loss(m) for m in models],
            "ingredient_distance_to_first": [distance(models[0], m) for m in models[1:]],
            "soup": accuracy(soup, x_test, y_test),
            "soup_loss": test_loss(soup),
        })
        current = soup
    results["soup_v4"] = {"dense": base["test_accuracy"], "dense_loss": test_loss(base["model"]),
                          "rounds": rounds_out, "git_commit": git_commit()}
    _store(results)


def part_overhead(results, repeats: int = 7, steps: int = 60):
    """Median time of one training step, dense vs a static 90% mask, alternating blocks."""
    from torch.nn import functional as F

    from sparsecraft.train import StaticSparsity
    from sparsecraft.train.runner import build_model, load_dataset

    x, y, _, _ = load_dataset("mnist")
    out = {}
    for model_name in ("lenet300", "cnn"):
        times = {"dense": [], "static": []}
        runs = {}
        for kind in ("dense", "static"):
            torch.manual_seed(0)
            model = build_model(model_name, x[:1])
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            sp = StaticSparsity(model, 0.9, opt) if kind == "static" else None
            runs[kind] = (model, opt, sp)

        def block(kind):
            model, opt, sp = runs[kind]
            t = time.perf_counter()
            for i in range(steps):
                xb, yb = x[(i * 64) % 3968:][:64], y[(i * 64) % 3968:][:64]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                if sp is not None:
                    sp.step()
            return (time.perf_counter() - t) / steps

        block("dense"), block("static")  # warm-up
        for _ in range(repeats):
            for kind in ("dense", "static"):
                times[kind].append(block(kind))
        d, s = statistics.median(times["dense"]), statistics.median(times["static"])
        out[model_name] = {"dense_ms": d * 1e3, "static_ms": s * 1e3, "overhead": s / d - 1.0,
                           "threads": torch.get_num_threads(), "repeats": repeats, "steps_per_block": steps}
        log.info("overhead %s: dense %.3f ms, static %.3f ms (%+.1f%%)", model_name, d * 1e3, s * 1e3,
                 100 * (s / d - 1))
    results["overhead"] = out
    _store(results)


# -- tables and plots -------------------------------------------------------------------------
def _stats(values):
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def _collect(results, prefix):
    groups: dict[tuple, list[float]] = {}
    for key, r in results.items():
        if key.startswith(prefix) and isinstance(r, dict) and "test_accuracy" in r:
            parts = key.split("/")
            groups.setdefault(tuple(parts[1:-1]), []).append(100 * r["test_accuracy"])
    return groups


def write_table(results) -> None:
    lines = ["Command: `OMP_NUM_THREADS=1 python benchmarks/bench_train.py` (all parts). This run used "
             "`--part nm --part soup`, then `--part grid --setting mnist/lenet300 --setting mnist1d/lenet300` and "
             "`--part grid --setting mnist/cnn` as two processes at once, `--part long`, and `--part overhead` "
             "with `OMP_NUM_THREADS=2` under `flock /tmp/sparsecraft-bench.lock` (no other timing run at the "
             "same time). Test accuracy in %, mean ± standard deviation over seeds "
             f"{', '.join(map(str, SEEDS))}; the number of seeds finished is in brackets when fewer.", ""]
    grid = _collect(results, "grid/")
    for data, model in SETTINGS:
        dense = grid.get((data, model, "dense", "0"))
        if not dense:
            continue
        dm, ds = _stats(dense)
        lines += [f"**{model} on {data}** (dense {dm:.2f} ± {ds:.2f})", "",
                  "| method | " + " | ".join(f"{int(s * 100)}%" for s in SPARSITIES) + " |",
                  "|---|" + "---|" * len(SPARSITIES)]
        for method in METHODS:
            cells = []
            for s in SPARSITIES:
                vals = grid.get((data, model, method, str(s)))
                if not vals:
                    cells.append("")
                    continue
                m, sd = _stats(vals)
                note = f" [{len(vals)}]" if len(vals) < len(SEEDS) else ""
                cells.append(f"{m:.2f} ± {sd:.2f}{note}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        at90 = {m: _stats(grid[(data, model, m, "0.9")])[0] for m in ("gmp", "rigl")
                if (data, model, m, "0.9") in grid}
        if at90:
            lines += ["", "At 90%: " + ", ".join(
                f"{m} {v:.2f} ({v - dm:+.2f} points vs dense; aim within -1.5)" for m, v in at90.items())]
        lines.append("")
    long = _collect(results, "long/")
    if long:
        lines += [f"**Longer training: lenet300 on mnist1d, 90% sparsity, {LONG_STEPS} steps** (4x the grid's)", "",
                  "| method | accuracy % |", "|---|---|"]
        for method in ("dense", "static", "set", "rigl", "gmp"):
            vals = long.get(("mnist1d", "lenet300", method, "0.9"))
            if vals:
                m, sd = _stats(vals)
                note = f" [{len(vals)}]" if len(vals) < len(SEEDS) else ""
                lines.append(f"| {method} | {m:.2f} ± {sd:.2f}{note} |")
        lines.append("")
    nm = _collect(results, "nm/")
    if nm:
        dense = nm.get(("mnist", "mlp", "dense", "-"))
        head = f" (dense {_stats(dense)[0]:.2f} ± {_stats(dense)[1]:.2f})" if dense else ""
        lines += [f"**N:M training, MLP 784-256-256-10 on mnist**{head}", "",
                  "| pattern | SR-STE | decaying gradient flow |", "|---|---|---|"]
        for p in NM_PATTERNS:
            cells = []
            for method in ("srste", "decaying-nm"):
                vals = nm.get(("mnist", "mlp", method, p))
                cells.append(f"{_stats(vals)[0]:.2f} ± {_stats(vals)[1]:.2f}" if vals else "")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    soup = results.get("soup_v4")
    if soup:
        lines += [f"**Sparse model soups** (LeNet-300-100 on mnist: dense {100 * soup['dense']:.2f}; each round "
                  f"magnitude-prunes the previous model, retrains 3 copies for {SOUP_STEPS} steps (lr {SOUP_LR}, "
                  "cosine) with different data orders under the shared mask, and averages them)", "",
                  "| round | sparsity | ingredients: accuracy % (test loss) | soup: accuracy % (test loss) | "
                  "ingredient distance to the first |", "|---|---|---|---|---|"]
        for i, r in enumerate(soup["rounds"], start=1):
            ing = ", ".join(f"{100 * a:.2f} ({l:.4f})" for a, l in zip(r["ingredients"], r["ingredient_losses"]))
            dist = ", ".join(f"{d:.2f}" for d in r["ingredient_distance_to_first"])
            lines.append(f"| {i} | {100 * r['sparsity']:.0f}% | {ing} | {100 * r['soup']:.2f} ({r['soup_loss']:.4f}) "
                         f"| {dist} |")
        lines.append("")
    over = results.get("overhead")
    if over:
        lines += ["**Training-step overhead of a static 90% mask** (median of 7 blocks of 60 steps, "
                  "dense and masked alternating; aim < 15%)", "",
                  "| model | dense ms/step | masked ms/step | overhead |", "|---|---|---|---|"]
        for name, o in over.items():
            lines.append(f"| {name} | {o['dense_ms']:.3f} | {o['static_ms']:.3f} | {100 * o['overhead']:+.1f}% |")
        lines.append("")
    write_text(RESULTS / "train.md", "\n".join(lines) + "\n")


def write_plot(results) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    grid = _collect(results, "grid/")
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(5 * len(SETTINGS), 4))
    for ax, (data, model) in zip(axes, SETTINGS):
        dense = grid.get((data, model, "dense", "0"))
        if dense:
            ax.axhline(_stats(dense)[0], color="k", ls="--", label="dense")
        for method in METHODS:
            xs, ms, sds = [], [], []
            for s in SPARSITIES:
                vals = grid.get((data, model, method, str(s)))
                if vals:
                    xs.append(100 * s)
                    m, sd = _stats(vals)
                    ms.append(m)
                    sds.append(sd)
            if xs:
                ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=method)
        ax.set_title(f"{model} on {data}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / "train.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("grid", "nm", "soup", "long", "overhead"), action="append")
    parser.add_argument("--table", action="store_true", help="only rewrite the table and plot")
    parser.add_argument("--setting", action="append", help="grid part: only DATA/MODEL, e.g. mnist/cnn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = _load()
    if not args.table:
        with bench_lock():
            for part in args.part or ("nm", "soup", "grid", "long", "overhead"):
                if part == "grid":
                    part_grid(results, [tuple(x.split("/")) for x in args.setting] if args.setting else None)
                else:
                    globals()[f"part_{part}"](results)
    write_table(results)
    write_plot(results)


if __name__ == "__main__":
    main()
