"""Second-order (M-FAC / oBERT) pruning against magnitude GMP and Wanda.

1. Gradual, LeNet-300-100 on MNIST-5k, 90%: the recipe's GMP (cubic schedule) with the
   magnitude criterion, with M-FAC scores, and with M-FAC scores plus the OBS update; same
   steps, schedule and seed; test accuracy, and M-FAC's seconds and bytes per pruning step.
2. One-shot, all-MiniLM-L6-v2 at 50% unstructured: Wanda, magnitude, M-FAC (and M-FAC with
   the OBS update for the first seed); mean cosine of sentence embeddings to the dense model on
   held-out Lee sentences. Seeds are calibration draws.

    nice -n 19 .venv/bin/python benchmarks/bench_mfac.py [--seeds 0 1 2]

Writes benchmarks/results/mfac.json and mfac.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time

from _common import RESULTS, bench_lock, command_line, git_commit, write_json, write_text

GRADUAL = {"magnitude": {}, "mfac": {"criterion": "mfac", "obs_update": False},
           "mfac+obs": {"criterion": "mfac", "obs_update": True},
           "mfac-token": {"criterion": "mfac", "fisher": "token"},
           "mfac-token-64": {"criterion": "mfac", "fisher": "token", "fisher_samples": 64}}
MFAC_ROWS = ("mfac", "mfac+obs", "mfac-token", "mfac-token-64")


def gradual(seed: int, steps: int, with_update: bool) -> dict:
    from sparsecraft.train.loop import run_training
    from sparsecraft.train.recipe import TrainRecipe

    row: dict = {"seed": seed}
    for name, extra in GRADUAL.items():
        if name == "mfac+obs" and not with_update:
            continue
        options = {"start": steps // 10, "end": steps * 3 // 4, "frequency": steps // 12, **extra}
        recipe = TrainRecipe(data="mnist", model="lenet300", method="gmp", sparsity=0.9, steps=steps, seed=seed,
                             options=options)
        costs: list[dict] = []
        handler = _CostLog(costs)
        logging.getLogger("sparsecraft.train.pruning").addHandler(handler)
        start = time.perf_counter()
        try:
            r = run_training(recipe, progress=False)
        finally:
            logging.getLogger("sparsecraft.train.pruning").removeHandler(handler)
        row[name] = r["test_accuracy"]
        row[f"{name}_seconds"] = time.perf_counter() - start
        row[f"{name}_sparsity"] = r["sparsity"]
        if costs:
            row[f"{name}_step_seconds"] = statistics.median(c["seconds"] for c in costs)
            row[f"{name}_step_mb"] = max(c["mb"] for c in costs)
    return row


class _CostLog(logging.Handler):
    """Collects the seconds and MB that GMP logs at each M-FAC pruning step."""

    def __init__(self, out: list):
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record):
        if record.msg.startswith("GMP/M-FAC"):
            _, _, seconds, mb = record.args
            self.out.append({"seconds": seconds, "mb": mb})


def one_shot(seed: int, samples: int, seq_len: int, with_update: bool) -> dict:
    import sparsecraft as sc
    from sparsecraft import data, evaluate, models

    model, tok = models.load("minilm-l6")
    sentences = evaluate.split_sentences(data.builtin_texts()["evaluation"])
    calib = data.calibration(tok, samples, seq_len, seed=seed)
    configs = {"magnitude": sc.method_config("magnitude", sparsity=0.5),
               "wanda": sc.method_config("wanda", sparsity=0.5),
               "mfac": sc.method_config("mfac", sparsity=0.5, batch_size=1),
               "mfac-token": sc.method_config("mfac", sparsity=0.5, fisher="token", batch_size=1)}
    if with_update:
        configs["mfac+obs"] = sc.method_config("mfac", sparsity=0.5, batch_size=1, update=True, block=32)
    row: dict = {"seed": seed}
    for name, config in configs.items():
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        state = sc.prune_(pruned, config, calib, progress=False)
        row[f"{name}_seconds"] = time.perf_counter() - start
        state.finalize_()
        row[name] = evaluate.embedding_similarity(pruned, model, tok, sentences)["mean_cosine"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--samples", type=int, default=32, help="MiniLM calibration samples (= M-FAC gradients)")
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sparsecraft.train.pruning").setLevel(logging.INFO)
    with bench_lock():
        lenet = [gradual(s, args.steps, s == args.seeds[0]) for s in args.seeds]
        minilm = [one_shot(s, args.samples, args.seq_len, False) for s in args.seeds]
    med_g = {k: statistics.median(r[k] for r in lenet if k in r) for k in GRADUAL}
    med_o = {k: statistics.median(r[k] for r in minilm) for k in ("magnitude", "wanda", "mfac", "mfac-token")}
    aims = {"gradual_lenet_mfac_above_magnitude": med_g["mfac"] > med_g["magnitude"],
            "gradual_lenet_mfac_token_above_magnitude": med_g["mfac-token"] > med_g["magnitude"],
            "gradual_lenet_mfac_token_64_above_magnitude": med_g["mfac-token-64"] > med_g["magnitude"],
            "oneshot_minilm_mfac_above_wanda": med_o["mfac"] > med_o["wanda"],
            "oneshot_minilm_mfac_token_above_wanda": med_o["mfac-token"] > med_o["wanda"]}
    result = {"command": command_line(), "commit": git_commit(), "settings": vars(args), "lenet": lenet,
              "minilm": minilm, "median_lenet": med_g, "median_minilm": med_o, "aims": aims}
    write_json(RESULTS / "mfac.json", result)
    lines = [f"Command: `{result['command']}`", "",
             f"LeNet-300-100 on MNIST-5k, GMP to 90% (cubic, {args.steps} steps, pruning from step {args.steps // 10} "
             f"to {args.steps * 3 // 4} every {args.steps // 12}); M-FAC: 16 gradients of training batches per pruning "
             "step, blocks of 64, damp 1e-2; mfac-token: the diagonal Fisher of the per-example gradients of the "
             "same 16 batches (mfac-token-64: of 64 batches). Test accuracy:", "",
             "| criterion | median | " + " | ".join(f"seed {r['seed']}" for r in lenet)
             + " | median s per pruning step | peak MB per step |", "|---|---|" + "---|" * len(lenet) + "---|---|"]
    for k in GRADUAL:
        step_s = statistics.median(r.get(f"{k}_step_seconds", 0.0) for r in lenet if k in r)
        step_mb = max(r.get(f"{k}_step_mb", 0.0) for r in lenet)
        lines.append(f"| {k} | {med_g[k]:.4f} | " + " | ".join(f"{r[k]:.4f}" if k in r else "-" for r in lenet)
                     + (f" | {step_s:.2f} | {step_mb:.1f} |" if k in MFAC_ROWS else " | - | - |"))
    lines += ["", f"all-MiniLM-L6-v2, one-shot 50% unstructured, {args.samples} x {args.seq_len} calibration tokens "
              "(M-FAC: one gradient per sample of <output, e>, e ~ N(0, I); mfac-token: the diagonal Fisher of the "
              "per-token gradients of the same loss, 4 probes e per sample); mean cosine to the dense embeddings:", "",
              "| method | median | " + " | ".join(f"seed {r['seed']}" for r in minilm) + " | prune s (seed "
              f"{minilm[0]['seed']}) |", "|---|---|" + "---|" * len(minilm) + "---|"]
    for k in ("magnitude", "wanda", "mfac", "mfac-token", "mfac+obs"):
        if k not in minilm[0]:
            continue
        vals = [f"{r[k]:.4f}" if k in r else "-" for r in minilm]
        med = med_o.get(k, minilm[0][k])
        lines.append(f"| {k} | {med:.4f} | " + " | ".join(vals) + f" | {minilm[0][f'{k}_seconds']:.1f} |")
    lines += ["", "Aims: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in aims.items()),
              "(mfac+obs ran on the first seed only; M-FAC gradual pruning of MiniLM was not run.)"]
    write_text(RESULTS / "mfac.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
