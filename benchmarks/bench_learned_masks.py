"""Do learned N:M masks pay for their time inside one block? (issue 18, the learned-mask aim)

One SmolLM2-135M block at a time, pruned 2:4 by the ADMM solver from its dense inputs (the
blocks before it stay dense). Then, at the same total seconds per block, the block's output is
fitted to the dense block's output on the calibration windows in one of these ways:

* ``reconstruct``: block reconstruction alone (masks fixed) for all the seconds;
* ``mask-only + rec``: Gumbel-softmax learned masks with the weights frozen (the solver's weights in groups
  that keep their choice, the dense ones in groups that change; MaskLLM's setting) for half
  the seconds, then reconstruction;
* ``joint + rec``: learned masks trained together with the weights (the default) for half the
  seconds, then reconstruction;
* ``joint (strong prior) + rec``: the same with the prior's logit lead 10 and the
  temperature starting at 0.5, so the soft mask starts close to the solver's;
* ``ste + rec``: the straight-through learner (weights trained through each group's N largest
  magnitudes, pruned positions starting at zero) for half the seconds, then reconstruction;
* ``ste (decay 0.05) + rec``: the same, with 5% taken off every pruned weight after each step.

The score is the block's output error (mean squared error over the target's mean square) on
held-out Lee windows that neither the fitting nor its early stopping saw; "changed" is the
share of N:M groups whose choice differs from the solver's.

    .venv/bin/python benchmarks/bench_learned_masks.py            # blocks 3 and 15, 30 s and 90 s
    .venv/bin/python benchmarks/bench_learned_masks.py --variants reconstruct "ste + rec"
    .venv/bin/python benchmarks/bench_learned_masks.py --table    # rewrite the table

A run adds its rows to the earlier runs' rows (same calibration and held-out sizes); each row
records its run and command, and is compared with the reconstruct row of its own run.

Writes benchmarks/results/learned_masks.json and learned_masks.md; holds the benchmark lock.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

from _common import RESULTS, bench_lock, command_line, load_average, read_json, write_json, write_text

OUT = RESULTS / "learned_masks.json"

VARIANTS = {
    "reconstruct": None,
    "mask-only + rec": {"method": "gumbel", "tune_weights": False},
    "joint + rec": {"method": "gumbel"},
    "joint (strong prior) + rec": {"method": "gumbel", "strength": 10.0, "tau": 0.5},
    "ste + rec": {"method": "ste"},
    "ste (decay 0.05) + rec": {"method": "ste", "decay": 0.05},
}


def setup(block_index: int, samples: int, eval_windows: int):
    """The dense and the ADMM-pruned block, with calibration and held-out inputs and targets."""
    import torch

    import sparsecraft as sc
    from sparsecraft import data, models
    from sparsecraft.blocks import BlockBatch, capture_block_inputs, run_block

    torch.manual_seed(0)
    model, tok = models.load("smollm2-135m")
    model.model.layers = model.model.layers[: block_index + 1]
    model.config.num_hidden_layers = block_index + 1
    dense = copy.deepcopy(model)
    calib = data.calibration(tok, samples, 512, seed=0)
    held_out = data.evaluation_tokens(tok)[: eval_windows * 512].reshape(eval_windows, 512)
    config = sc.PruneConfig(method="admm", sparsity=None, pattern="2:4",
                            targets={"include": [f"model.layers.{block_index}.*"]})
    state = sc.prune_(model, config, calib, progress=False)
    blocks = dense.model.layers

    def inputs(tokens):
        batches = capture_block_inputs(dense, blocks, tokens, 8)
        for i in range(block_index):
            outs = run_block(blocks[i], batches)
            batches = [BlockBatch(o, b.args, b.kwargs) for o, b in zip(outs, batches)]
        return batches

    cal, ev = inputs(calib), inputs(held_out)
    prefix = f"model.layers.{block_index}."
    masks = {n[len(prefix):]: m for n, m in state.masks.items()}
    return (blocks[block_index], model.model.layers[block_index], masks,
            (cal, run_block(blocks[block_index], cal)), (ev, run_block(blocks[block_index], ev)))


def run(blocks: list[int], budgets: list[float], samples: int, eval_windows: int, variants: list[str]) -> dict:
    import torch

    from sparsecraft.oneshot.block_tuning import _forward, _loss, tune_block_
    from sparsecraft.oneshot.learned_masks import learn_nm_masks
    from sparsecraft.patterns import NM

    torch.set_num_threads(2)
    rows = []
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")  # rows are compared with the reconstruct row of their run
    for b in blocks:
        dense_block, pruned, masks, (cal_b, cal_t), (ev_b, ev_t) = setup(b, samples, eval_windows)
        dense_w = {n: p.detach().clone() for n, p in dense_block.named_parameters() if n in masks}

        def held_out(block) -> float:
            with torch.no_grad():
                return sum(float(_loss(_forward(block, x), t)) for x, t in zip(ev_b, ev_t)) / len(ev_b)

        start_error = held_out(pruned)
        for seconds in budgets:
            for name in variants:
                learn = VARIANTS[name]
                block = copy.deepcopy(pruned)
                params = dict(block.named_parameters())
                keep, summary = masks, {}
                t0 = time.perf_counter()
                if learn is not None:
                    keep, weights, summary = learn_nm_masks(block, cal_b, cal_t, masks, NM(2, 4), dense=dense_w,
                                                            time_budget=seconds / 2, epochs=1000, **learn)
                    with torch.no_grad():
                        for n in keep:
                            params[n].copy_(weights[n])
                after_learning = held_out(block)
                # what learning left of the seconds (never zero: learning stops after the step past its half)
                rec = tune_block_(block, cal_b, cal_t, keep, epochs=1000, patience=2,
                                  time_budget=max(1.0, seconds - (time.perf_counter() - t0)))
                row = {"block": b, "seconds": seconds, "variant": name, "error_start": start_error,
                       "error_after_learning": after_learning, "error": held_out(block),
                       "changed": summary.get("changed", 0.0), "learn_steps": summary.get("steps", 0),
                       "rec_steps": rec["steps"], "wall_seconds": time.perf_counter() - t0,
                       "command": command_line(__file__), "run": run_id,
                       "load_avg_start": load_average()}
                rows.append(row)
                sys.stdout.write(f"{row}\n")
                sys.stdout.flush()
    return {"rows": rows, "samples": samples, "eval_windows": eval_windows, "load_avg_start": load_average(),
            "command": command_line(__file__)}


def write_table(res: dict) -> str:
    lines = ["# Learned 2:4 masks against reconstruction alone, at equal time per block", "",
             f"SmolLM2-135M, one block at a time pruned 2:4 by ADMM from dense inputs; {res['samples']} x 512 "
             f"calibration tokens (Lee); error = the block's output MSE over the target's mean square on "
             f"{res['eval_windows']} held-out Lee windows of 512. Learning variants spend half the seconds "
             "learning and the rest reconstructing. Each row's ratio is against the reconstruct row of the same "
             "run. Commands: " + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", res["command"])
                                                                        for r in res["rows"])) + ".", "",
             "| run | block | seconds | variant | error after ADMM | after learning | final error | / reconstruct | "
             "groups changed | learn steps | rec steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["block"], r["seconds"], r.get("run")): r["error"] for r in res["rows"] if r["variant"] == "reconstruct"}
    for r in res["rows"]:
        ratio = r["error"] / base[(r["block"], r["seconds"], r.get("run"))]
        lines.append(f"| {r.get('run', 'earlier')} | {r['block']} | {r['seconds']:g} | {r['variant']} | {r['error_start']:.4g} | "
                     f"{r['error_after_learning']:.4g} | {r['error']:.4g} | "
                     f"{ratio:.3f} | {r['changed']:.2%} | {r['learn_steps']} | {r['rec_steps']} |")
    text = "\n".join(lines) + "\n"
    write_text(RESULTS / "learned_masks.md", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 15])
    parser.add_argument("--seconds", type=float, nargs="+", default=[30.0, 90.0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to run (reconstruct is always run too: the others are judged against it)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.table:
        sys.stdout.write(write_table(read_json(OUT)))
        return
    variants = ["reconstruct"] + [v for v in args.variants if v != "reconstruct"]
    with bench_lock():
        res = run(args.blocks, args.seconds, args.samples, args.eval_windows, variants)
    if OUT.exists():  # earlier runs' rows stay, each beside its own run's reconstruct row
        old = read_json(OUT)
        if (old["samples"], old["eval_windows"]) == (res["samples"], res["eval_windows"]):
            earlier = old.get("load_avg_start")
            res["rows"] = [dict(r, command=r.get("command", old["command"]), run=r.get("run", "earlier"),
                                load_avg_start=r.get("load_avg_start", earlier)) for r in old["rows"]] + res["rows"]
    write_json(OUT, res)
    sys.stdout.write(write_table(res))


if __name__ == "__main__":
    main()
