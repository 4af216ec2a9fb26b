"""Bayesian sparsification on real data: SSVI against dense VI and RigL, variational dropout,
ARD and Turbo-VBI structured compression (``sparsecraft.bayes``).

    python benchmarks/bench_bayes.py --part ssvi --seeds 0        # one part, some seeds (resumable)
    python benchmarks/bench_bayes.py --part compress --seeds 0 1 2
    python benchmarks/bench_bayes.py --table                      # rewrite the tables and the PNG only

Every run goes through ``sparsecraft.train.run_training`` with a recipe (the same as
``sparsecraft train``), on MNIST-5k (4,000 training / 1,000 test digits) with LeNet-300-100,
AdamW lr 1e-3 (cosine), no weight decay, batch 64, ``--steps`` steps. Uncertainty on the
1,000 test digits: Bayesian models average 10 Monte-Carlo draws, point estimates predict
once; out-of-distribution set: the test digits rotated 90 degrees (see
``sparsecraft.bayes.measures`` for why), AUROC of in- vs out-of-distribution by predictive
entropy. Results accumulate in benchmarks/results/bayes.json (a finished run is skipped);
the table is benchmarks/results/bayes.md, the weight-structure picture bayes_structure.png.
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
from sparsecraft import bayes  # noqa: E402
from sparsecraft.train.runner import TrainRecipe, load_dataset, run_training  # noqa: E402

from _common import RESULTS, bench_lock, command_line, merge_json, read_json, save_figure, write_text  # noqa: E402

OUT = RESULTS / "bayes.json"
MD = RESULTS / "bayes.md"
PNG = RESULTS / "bayes_structure.png"
SAMPLES = 10
BASE = {"data": "mnist", "model": "lenet300", "batch_size": 64, "optimizer": "adamw", "lr": 1e-3,
        "weight_decay": 0.0, "lr_schedule": "cosine"}
log = logging.getLogger("bench_bayes")


def _recipe(steps: int, seed: int, method: str, sparsity=None, **options) -> TrainRecipe:
    return TrainRecipe(**BASE, steps=steps, seed=seed, method=method, sparsity=sparsity, options=options)


def _measures(model, x, y, bayesian: bool) -> dict:
    ood = bayes.ood_inputs(x, "rotated")
    return bayes.uncertainty_report(model, x, y, ood, samples=SAMPLES if bayesian else None)


def _nonzeros(model) -> tuple[int, int]:
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return sum(int(m.weight.count_nonzero()) for m in layers), sum(m.weight.numel() for m in layers)


def _train(results, key, recipe, data, *, bayesian, start=None):
    """Train (or reuse a stored run) and measure; returns (result, model or None)."""
    if key in results and start is None:
        return results[key], None
    t = time.perf_counter()
    r = run_training(recipe, progress=False, return_model=True, model=start)
    model = r.pop("model")
    r.pop("layer_sparsity", None)
    nz, total = _nonzeros(model)
    r.update(_measures(model, data[2], data[3], bayesian), nonzeros=nz, weights=total,
             wall_seconds=time.perf_counter() - t)
    results[key] = r
    results.update(merge_json(OUT, {key: r}))
    log.info("%s: accuracy %.4f, nll %.4f, ece %.4f, nonzeros %d (%.1f s)", key, r["accuracy"], r["nll"], r["ece"],
             nz, r["wall_seconds"])
    return r, model


# -- part 1: SSVI against dense VI and RigL ----------------------------------------------------------
def part_ssvi(results, seeds, steps):
    data = load_dataset("mnist")
    for seed in seeds:
        tag = f"ssvi/lenet300/{steps}/{seed}"
        _train(results, f"{tag}/dense", _recipe(steps, seed, "dense"), data, bayesian=False)
        _train(results, f"{tag}/vi", _recipe(steps, seed, "vi", kl_warmup=0.3), data, bayesian=True)
        for s in (0.9, 0.95):
            _train(results, f"{tag}/ssvi-{s}", _recipe(steps, seed, "ssvi", s, kl_warmup=0.3), data, bayesian=True)
            _train(results, f"{tag}/rigl-{s}", _recipe(steps, seed, "rigl", s), data, bayesian=False)


# -- part 2: VD, ARD, Turbo-VBI: compression, structure, speed ---------------------------------------------
def _equal_count_neurons(model, keep: int) -> dict:
    """Whole hidden neurons left empty when only the ``keep`` most relevant weights (lowest
    log alpha) of the variational layers stay: unstructured methods at a given count."""
    layers = bayes.bayes_layers(model)
    scores = torch.cat([(-m.log_alpha()).masked_fill(m.weight.detach() == 0, -1e9).flatten() for _, m in layers])
    cut = torch.sort(scores, descending=True).values[keep - 1]
    heads = {layers[-1][0]}
    dead = 0
    units = 0
    for name, m in layers:
        if name in heads:
            continue
        kept = ((-m.log_alpha()) >= cut) & (m.weight.detach() != 0)
        dead += int((~kept.reshape(kept.shape[0], -1).any(1)).sum())
        units += kept.shape[0]
    return {"neurons_removed": dead, "hidden_neurons": units}


def _time_forward(dense_model, small_model, x) -> dict:
    """Median seconds of a batch-64 forward pass, dense vs shrunk, sampled in turns, and the
    runtime planner's per-layer view of the shrunk model."""
    from sparsecraft.runtime import compile_, decompile_, interleaved_medians

    dense_model.eval()
    small_model.eval()
    with torch.no_grad():
        times = interleaved_medians({"dense": lambda: dense_model(x), "shrunk": lambda: small_model(x)},
                                    repeats=31, min_seconds=5e-3)
        report = compile_(small_model, x)
        planned = interleaved_medians({"dense": lambda: dense_model(x), "planned": lambda: small_model(x)},
                                      repeats=31, min_seconds=5e-3)
        decompile_(small_model)
    return {"dense_ms": times["dense"] * 1e3, "shrunk_ms": times["shrunk"] * 1e3,
            "speedup": times["dense"] / times["shrunk"], "planned_ms": planned["planned"] * 1e3,
            "planned_speedup": planned["dense"] / planned["planned"],
            "planner_kernels": {p.layer: p.chosen for p in report.layers}}


def _structure(model) -> list:
    return [(name, (m.weight.detach() != 0).reshape(m.weight.shape[0], -1).float()) for name, m in
            bayes.bayes_layers(model)]


def part_compress(results, seeds, steps, pictures):
    import copy

    from sparsecraft import save
    from sparsecraft.train.zoo import build_model

    data = load_dataset("mnist")
    x_test, y_test = data[2], data[3]
    for seed in seeds:
        tag = f"compress/lenet300/{steps}/{seed}"
        if all(f"{tag}/{k}" in results for k in ("dense", "vd", "ard", "turbo-vbi")) and seed not in pictures:
            continue
        torch.manual_seed(seed)
        dense_r, dense = _train(results, f"{tag}/dense", _recipe(steps, seed, "dense"), data, bayesian=False,
                                start=build_model("lenet300", data[0][:1]))
        models = {}
        for method, options in (("vd", {"kl_warmup": 0.3}), ("ard", {"kl_warmup": 0.3}),
                                ("turbo-vbi", {"kl_warmup": 0.3})):
            r, models[method] = _train(results, f"{tag}/{method}", _recipe(steps, seed, method, **options), data,
                                       bayesian=True, start=dense)
        turbo = models["turbo-vbi"]
        keep = results[f"{tag}/turbo-vbi"]["nonzeros"]
        extra = {}
        for method in ("vd", "ard"):
            extra[f"{tag}/{method}"] = {**results[f"{tag}/{method}"],
                                        "at_turbo_count": _equal_count_neurons(models[method], keep)}
        # Turbo-VBI: remove the dead neurons for real, save, time against dense
        small = copy.deepcopy(turbo)
        dead = {}
        for name, m in bayes.bayes_layers(small):
            if name == bayes.bayes_layers(small)[-1][0]:
                continue
            dead[name] = ~(m.weight.detach().reshape(m.weight.shape[0], -1) != 0).any(1)
        bayes.deterministic_(small)
        report = bayes.shrink_neurons_(small, dead)
        acc_shrunk = bayes.uncertainty_report(small, x_test, y_test)["accuracy"]
        tmp = RESULTS / f".bayes-{seed}"
        tmp.mkdir(exist_ok=True)
        dense_file, small_file = tmp / "dense.safetensors", tmp / "shrunk.safetensors"
        save(dense, dense_file, overwrite=True)
        save(small, small_file, overwrite=True)
        timing = _time_forward(dense, small, x_test[:64])
        t = results[f"{tag}/turbo-vbi"]
        extra[f"{tag}/turbo-vbi"] = {
            **t, "neurons_removed": sum(int(d.sum()) for d in dead.values()),
            "hidden_neurons": sum(len(d) for d in dead.values()),
            "shrunk_accuracy": acc_shrunk, "shrunk_parameters": sum(p.numel() for p in small.parameters()),
            "dense_parameters": sum(p.numel() for p in dense.parameters()),
            "dense_file_bytes": dense_file.stat().st_size, "shrunk_file_bytes": small_file.stat().st_size,
            "shrink_report": str(report), **timing,
        }
        for f in (dense_file, small_file):
            f.unlink()
        tmp.rmdir()
        results.update(merge_json(OUT, extra))
        if seed in pictures:
            _picture({"Turbo-VBI": _structure(turbo), "ARD": _structure(models["ard"]),
                      "VD": _structure(models["vd"])})


def _picture(structures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(structures)
    cols = max(len(v) for v in structures.values())
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for r, (method, layers) in enumerate(structures.items()):
        for c, (name, keep) in enumerate(layers):
            ax = axes[r][c]
            ax.imshow(keep.numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
            ax.set_title(f"{method} {name}: {int(keep.sum())} kept, "
                         f"{int((keep.sum(1) == 0).sum())}/{keep.shape[0]} neurons empty", fontsize=8)
            ax.set_xlabel("input", fontsize=7)
            ax.set_ylabel("neuron", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle("LeNet-300-100 on MNIST-5k: kept weights (black) per layer", fontsize=10)
    fig.tight_layout()
    save_figure(fig, PNG)
    plt.close(fig)


# -- tables ----------------------------------------------------------------------------------------------
def _median(rows, key):
    values = [r[key] for r in rows if key in r and r[key] is not None]
    return statistics.median(values) if values else float("nan")


def _group(results, prefix):
    out: dict[str, list] = {}
    for key, r in results.items():
        if not key.startswith(prefix) or not isinstance(r, dict):
            continue
        parts = key.split("/")
        out.setdefault(parts[-1], []).append(r)
    return out


def table(results) -> str:
    lines = ["# Bayesian sparsification (`sparsecraft.bayes`)", "",
             "Produced by `python benchmarks/bench_bayes.py` (parts `ssvi`, `compress`); MNIST-5k, LeNet-300-100, "
             "AdamW lr 1e-3 cosine, batch 64. Medians over the seeds listed; Bayesian models: 10 MC draws; "
             "OOD: test digits rotated 90 degrees.", ""]
    for part in ("ssvi", "compress"):
        seeds = sorted({k.split("/")[3] for k in results if k.startswith(f"{part}/")})
        if seeds:
            lines.append(f"- part `{part}`: seeds {', '.join(seeds)} "
                         f"(`python benchmarks/bench_bayes.py --part {part} --seeds {' '.join(seeds)}`)")
        else:
            lines.append(f"- part `{part}`: not run yet (`python benchmarks/bench_bayes.py --part {part}`)")
    lines.append("")
    for steps in sorted({k.split("/")[2] for k in results if k.startswith("ssvi/")}):
        g = _group(results, f"ssvi/lenet300/{steps}/")
        lines += [f"## SSVI vs dense VI vs RigL ({steps} steps)", "",
                  "| model | seeds | accuracy | NLL | ECE | Brier | OOD AUROC | sparsity | train FLOPs / dense VI |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name in ("dense", "vi", "ssvi-0.9", "rigl-0.9", "ssvi-0.95", "rigl-0.95"):
            rows = g.get(name, [])
            if not rows:
                continue
            flops = _median(rows, "train_flops_ratio")
            lines.append(f"| {name} | {len(rows)} | {_median(rows, 'accuracy'):.4f} | {_median(rows, 'nll'):.4f} | "
                         f"{_median(rows, 'ece'):.4f} | {_median(rows, 'brier'):.4f} | "
                         f"{_median(rows, 'auroc_ood'):.4f} | {_median(rows, 'sparsity'):.3f} | "
                         f"{'-' if flops != flops else f'{flops:.3f}'} |")
        lines.append("")
        lines += _ssvi_aims(g)
    for steps in sorted({k.split("/")[2] for k in results if k.startswith("compress/")}):
        g = _group(results, f"compress/lenet300/{steps}/")
        lines += [f"## Variational dropout, ARD, Turbo-VBI ({steps} steps, each from the dense model)", "",
                  "| model | seeds | accuracy | NLL | ECE | nonzero weights | compression | hidden neurons removed | "
                  "neurons removed at Turbo-VBI's count |", "|---|---|---|---|---|---|---|---|---|"]
        for name in ("dense", "vd", "ard", "turbo-vbi"):
            rows = g.get(name, [])
            if not rows:
                continue
            at = [r["at_turbo_count"]["neurons_removed"] for r in rows if "at_turbo_count" in r]
            removed = _median(rows, "neurons_removed")
            lines.append(
                f"| {name} | {len(rows)} | {_median(rows, 'accuracy'):.4f} | {_median(rows, 'nll'):.4f} | "
                f"{_median(rows, 'ece'):.4f} | {_median(rows, 'nonzeros'):.0f} | "
                f"{_median(rows, 'weights') / max(1, _median(rows, 'nonzeros')):.1f}x | "
                f"{'-' if removed != removed else f'{removed:.0f}'} | "
                f"{statistics.median(at) if at else '-'} |")
        t = g.get("turbo-vbi", [])
        if t and "speedup" in t[0]:
            lines += ["", "Turbo-VBI after `structured.shrink_` (dead neurons removed), batch 64 forward on CPU:", "",
                      "| seeds | accuracy shrunk | parameters dense -> shrunk | file bytes dense -> shrunk | "
                      "dense ms | shrunk ms | speedup | with planner kernels ms | speedup |", "|---|---|---|---|---|---|---|---|---|",
                      f"| {len(t)} | {_median(t, 'shrunk_accuracy'):.4f} | {_median(t, 'dense_parameters'):.0f} -> "
                      f"{_median(t, 'shrunk_parameters'):.0f} | {_median(t, 'dense_file_bytes'):.0f} -> "
                      f"{_median(t, 'shrunk_file_bytes'):.0f} | {_median(t, 'dense_ms'):.3f} | "
                      f"{_median(t, 'shrunk_ms'):.3f} | {_median(t, 'speedup'):.2f}x | {_median(t, 'planned_ms'):.3f} | "
                      f"{_median(t, 'planned_speedup'):.2f}x |"]
        lines.append("")
        lines += _compress_aims(g)
    if PNG.exists():
        lines += ["", f"Weight structure (seed 0): ![structure]({PNG.name})", ""]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ssvi_aims(g) -> list[str]:
    out = ["Aims (medians):", ""]
    vi = g.get("vi", [])
    if not vi:
        return []
    for s in ("0.9", "0.95"):
        ss, rl = g.get(f"ssvi-{s}", []), g.get(f"rigl-{s}", [])
        if not ss:
            continue
        da = _median(vi, "accuracy") - _median(ss, "accuracy")
        out.append(f"- SSVI {s}: accuracy {100 * da:+.2f} points below dense VI (aim <= 1.5): {_verdict(da <= 0.015)}; "
                   f"NLL {_median(ss, 'nll'):.4f} vs VI {_median(vi, 'nll'):.4f}: "
                   f"{_verdict(_median(ss, 'nll') <= _median(vi, 'nll'))}; ECE {_median(ss, 'ece'):.4f} vs VI "
                   f"{_median(vi, 'ece'):.4f}: {_verdict(_median(ss, 'ece') <= _median(vi, 'ece'))}")
        if s == "0.9":
            r = _median(ss, "train_flops_ratio")
            out.append(f"- SSVI 0.9 training FLOPs {r:.3f}x dense VI (aim <= 0.2): {_verdict(r <= 0.2)}")
        if rl:
            out.append(f"- SSVI {s} vs RigL {s} (same sparsity, same steps): NLL {_median(ss, 'nll'):.4f} vs {_median(rl, 'nll'):.4f} "
                       f"({_verdict(_median(ss, 'nll') < _median(rl, 'nll'))}), ECE {_median(ss, 'ece'):.4f} vs "
                       f"{_median(rl, 'ece'):.4f} ({_verdict(_median(ss, 'ece') < _median(rl, 'ece'))})")
    return out + ["", "Tried for SSVI: one setting only (ERK random subspace, SNR removal, gradient growth, "
                  "update every 50 steps until 75% of the run, KL warm-up over 30%, starting log sigma^2 -10, "
                  "AdamW 1e-3, 600 steps); no tuning yet.", ""]


def _compress_aims(g) -> list[str]:
    out = ["Aims (medians):", ""]
    dense, vd, t = g.get("dense", []), g.get("vd", []), g.get("turbo-vbi", [])
    if dense and vd:
        ratio = _median(vd, "weights") / max(1, _median(vd, "nonzeros"))
        da = _median(dense, "accuracy") - _median(vd, "accuracy")
        out.append(f"- VD: {ratio:.1f}x fewer nonzero weights (aim >= 20x) at {100 * da:+.2f} points below dense "
                   f"(aim <= 1): {_verdict(ratio >= 20 and da <= 0.01)}")
    if t and "speedup" in t[0]:
        mine = _median(t, "neurons_removed")
        for other in ("ard", "vd"):
            rows = [r["at_turbo_count"]["neurons_removed"] for r in g.get(other, []) if "at_turbo_count" in r]
            if rows:
                out.append(f"- Turbo-VBI removes {mine:.0f} whole hidden neurons vs {other.upper()} "
                           f"{statistics.median(rows)} at the same nonzero count: {_verdict(mine > statistics.median(rows))}")
        sp = _median(t, "speedup")
        da = _median(dense, "accuracy") - _median(t, "shrunk_accuracy") if dense else float("nan")
        out.append(f"- Turbo-VBI shrunk: {sp:.2f}x faster at batch 64 (aim >= 2x): {_verdict(sp >= 2)}; accuracy "
                   f"{100 * da:+.2f} points below dense (aim <= 1.5): {_verdict(da <= 0.015)}")
    return out + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("ssvi", "compress"), action="append", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--table", action="store_true", help="only rewrite the table from stored results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = read_json(OUT, {})
    if not args.table:
        with bench_lock():
            for part in args.part or ["ssvi", "compress"]:
                if part == "ssvi":
                    part_ssvi(results, args.seeds, args.steps)
                else:
                    part_compress(results, args.seeds, args.steps, pictures={0})
    results = read_json(OUT, {})
    write_text(MD, table(results) + f"\nCommand: `{command_line()}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
