"""Sparse-IFT wide against the dense model of equal FLOPs, at equal training steps.

    python benchmarks/bench_sparse_ift.py                    # every run (resumable), then table and plot
    python benchmarks/bench_sparse_ift.py --table            # rewrite table and plot only
    python benchmarks/bench_sparse_ift.py --steps 30 --seeds 0 --results /tmp/ift   # a smoke test

Settings: the LeNet-5-like CNN on MNIST-5k (4,000 training digits, 1,000 held out) and
LeNet-300-100 on mnist1d (4,000 / 1,000). Each model is trained dense, and transformed by
Sparse-IFT wide at 75% and 90% sparsity (hidden widths x2 and x3.16, every widened layer
keeping its dense number of weights) and trained with RigL, all with the recipe defaults of
``sparsecraft train``: SGD momentum 0.9, lr 0.05 cosine, weight decay 1e-4, batch 64, 1,500
steps; RigL updates every 50 steps until step 1,125, moving 30% (cosine decay). The FLOPs
column is the report's effective FLOPs of the trained model over every Linear/Conv weight
(head included) divided by the dense model's.

Accuracy only: no time is measured, so the script does not take the benchmark lock and can
run niced beside a timing run. Results accumulate in ``sparse_ift.json`` (a finished run is
skipped on re-run) with the commit that produced each.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import sparsecraft.train.loop as train_loop  # noqa: E402
from sparsecraft.report import report  # noqa: E402
from sparsecraft.train.runner import TrainRecipe, run_training  # noqa: E402

from _common import RESULTS, git_commit, merge_json, read_json, save_figure, write_text  # noqa: E402

SETTINGS = [("mnist1d", "lenet300"), ("mnist", "cnn")]
SPARSITIES = (0.75, 0.9)
SEEDS = (0, 1, 2)
STEPS = 1500
AIM_POINTS = 0.5  # on mnist1d: above the dense model of equal FLOPs by at least this
EVERY_LAYER = {"include_head": True}
INPUT_SHAPES = {"mnist1d": (1, 1, 40), "mnist": (1, 1, 28, 28)}

# each data set is built once per process (mnist1d is generated): the loop only reads it
train_loop.load_dataset = functools.lru_cache(maxsize=None)(train_loop.load_dataset)

log = logging.getLogger("bench_sparse_ift")


def _flops(model, data: str) -> int:
    return report(model, input_shape=INPUT_SHAPES[data], targets=EVERY_LAYER).totals["effective_flops"]


def run_one(results: dict, path: Path, data: str, model: str, sparsity: float | None, seed: int, steps: int) -> dict:
    key = f"{data}/{model}/{'dense' if sparsity is None else f'wide-{sparsity}'}/{steps}/{seed}"
    if key in results:
        return results[key]
    method = "dense" if sparsity is None else "sparse-ift-wide"
    # the recipe default (every 50 steps) unless a short run (a smoke test) would end first
    options = {} if sparsity is None else {"dst": "rigl", "update_every": max(1, min(50, steps // 10))}
    recipe = TrainRecipe(data=data, model=model, method=method, sparsity=sparsity, steps=steps, seed=seed,
                         options=options)
    t = time.perf_counter()
    r = run_training(recipe, progress=False, return_model=True)
    trained = r.pop("model")
    out = {k: r[k] for k in ("test_accuracy", "train_accuracy", "final_loss")}
    out.update({"flops_effective": _flops(trained, data), "wall_seconds": time.perf_counter() - t,
                "nonzero_weights": sum(int(p.count_nonzero()) for n, p in trained.named_parameters()
                                       if n.endswith("weight") and p.dim() > 1),
                "git_commit": git_commit(), "recipe": recipe.to_dict()})
    results[key] = out
    results.update(merge_json(path, {key: out}, sort_keys=True))
    log.info("%s: test %.4f train %.4f (%.0f s)", key, out["test_accuracy"], out["train_accuracy"], out["wall_seconds"])
    return out


def _groups(results: dict, steps: int) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for key, r in results.items():
        parts = key.split("/")
        if len(parts) == 5 and parts[3] == str(steps) and isinstance(r, dict):
            groups.setdefault((parts[0], parts[1], parts[2]), []).append(r)
    return groups


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_table(results: dict, folder: Path, steps: int, seeds: tuple[int, ...]) -> None:
    groups = _groups(results, steps)
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_sparse_ift.py" + (f" --steps {steps}" if steps != STEPS else "")
    lines = [f"Command: `{command}`. Test accuracy in %, mean ± standard deviation over seeds "
             f"{', '.join(map(str, seeds))} (the number of seeds finished in brackets when fewer); {steps} "
             "training steps for every model. Sparse-IFT wide trains with RigL; FLOPs: the report's effective "
             "FLOPs of the trained model over every Linear/Conv weight, over the dense model's; weights: nonzero "
             "Linear/Conv weights.", ""]
    for data, model in SETTINGS:
        dense = groups.get((data, model, "dense"))
        if not dense:
            continue
        dm, ds = _mean_sd([100 * r["test_accuracy"] for r in dense])
        base_flops = statistics.mean(r["flops_effective"] for r in dense)
        lines += [f"**{model} on {data}**", "",
                  "| model | test accuracy % | vs dense (points) | train accuracy % | FLOPs / dense | weights |",
                  "|---|---|---|---|---|---|"]
        rows = [("dense", dense)] + [(f"Sparse-IFT wide {int(100 * s)}% + RigL", groups.get((data, model, f"wide-{s}")))
                                     for s in SPARSITIES]
        verdicts = []
        for label, runs in rows:
            if not runs:
                continue
            m, sd = _mean_sd([100 * r["test_accuracy"] for r in runs])
            tm, _ = _mean_sd([100 * r["train_accuracy"] for r in runs])
            note = f" [{len(runs)}]" if len(runs) < len(seeds) else ""
            ratio = statistics.mean(r["flops_effective"] for r in runs) / base_flops
            weights = statistics.mean(r["nonzero_weights"] for r in runs)
            diff = "" if label == "dense" else f"{m - dm:+.2f}"
            lines.append(f"| {label} | {m:.2f} ± {sd:.2f}{note} | {diff} | {tm:.2f} | {ratio:.4f} | {weights:,.0f} |")
            if label != "dense" and data == "mnist1d":
                verdicts.append(f"{label}: {m - dm:+.2f} points ({'met' if m - dm >= AIM_POINTS else 'missed'})")
        lines.append("")
        if verdicts:
            lines += [f"Aim on mnist1d (above the dense model of equal FLOPs by at least {AIM_POINTS} point): "
                      + "; ".join(verdicts) + ".", ""]
    write_text(folder / "sparse_ift.md", "\n".join(lines) + "\n")


def write_plot(results: dict, folder: Path, steps: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = _groups(results, steps)
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(5 * len(SETTINGS), 4))
    for ax, (data, model) in zip(axes, SETTINGS):
        dense = groups.get((data, model, "dense"))
        if dense:
            m, sd = _mean_sd([100 * r["test_accuracy"] for r in dense])
            ax.axhline(m, color="k", ls="--", label="dense (equal FLOPs)")
            ax.axhspan(m - sd, m + sd, color="k", alpha=0.08)
        xs, ms, sds = [], [], []
        for s in SPARSITIES:
            runs = groups.get((data, model, f"wide-{s}"))
            if runs:
                m, sd = _mean_sd([100 * r["test_accuracy"] for r in runs])
                xs.append(100 * s)
                ms.append(m)
                sds.append(sd)
        if xs:
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label="Sparse-IFT wide + RigL")
        ax.set_title(f"{model} on {data}, {steps} steps")
        ax.set_xlabel("Sparse-IFT sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, folder / "sparse_ift.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="only rewrite the table and plot")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--setting", action="append", help="only DATA/MODEL, e.g. mnist1d/lenet300")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of sparse_ift.json/.md/.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = args.results / "sparse_ift.json"
    results = read_json(path, {})
    settings = [tuple(s.split("/")) for s in args.setting] if args.setting else SETTINGS
    if not args.table:
        for data, model in settings:  # mnist1d, where the aim is stated, first
            for seed in args.seeds:
                for sparsity in (None, *SPARSITIES):
                    run_one(results, path, data, model, sparsity, seed, args.steps)
    write_table(results, args.results, args.steps, tuple(args.seeds))
    write_plot(results, args.results, args.steps)


if __name__ == "__main__":
    main()
