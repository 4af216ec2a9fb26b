"""Block reconstruction settings on the first blocks of SmolLM2-135M: which layers, lr, step size.

SparseGPT 2:4 on the first BLOCKS blocks of the real model (the rest removed), calibration
SAMPLES x 512 tokens of the Lee corpus; each configuration tunes every block against the dense
block's outputs. Reported per block: the held-out loss (the last calibration batch, normalised
MSE to the dense output) before and after tuning, the epoch kept, the optimizer steps and the
seconds the tuning took. The defaults of the ``reconstruct`` stage come from this table.

    python benchmarks/bench_reconstruct.py            # writes results/reconstruct.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from _common import RESULTS, bench_lock, emit_result, git_commit, run_config, write_json, write_text

OUT = RESULTS / "reconstruct.json"

CONFIGS = {
    # which parts of the block are tuned (defaults otherwise: lr 1e-3, 4 samples a step)
    "whole block": {},
    "MLP only": {"layers": ["mlp.*"]},
    "attention only": {"layers": ["self_attn.*"]},
    # learning rate and samples per step
    "lr 1e-4, 8 a step": {"lr": 1e-4, "micro_batch": None},
    "lr 1e-4, 1 a step": {"lr": 1e-4, "micro_batch": 1},
    "lr 1e-3, 8 a step": {"lr": 1e-3, "micro_batch": None},
    "lr 2e-3, 8 a step": {"lr": 2e-3, "micro_batch": None},
    "lr 3e-3, 8 a step": {"lr": 3e-3, "micro_batch": None},
    "lr 1e-3, 4 a step, 6 epochs": {"epochs": 6, "patience": 2},
}


def run_one(options: dict, blocks: int, samples: int) -> dict:
    import torch

    import sparsecraft as sc
    from sparsecraft import data, models

    torch.manual_seed(0)
    model, tok = models.load("smollm2-135m")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    calib = data.calibration(tok, samples, 512, seed=0)
    state = sc.prune_(model, sc.SparseGPT(pattern="2:4", reconstruct=options), calib, progress=False)
    per_block = {}
    for name, info in state.info.items():
        if name.endswith("self_attn.q_proj.weight"):
            per_block[name.split(".")[2]] = info["reconstruct"]
    return {"options": options, "blocks": per_block}


def write_table(results: dict) -> str:
    meta = results["settings"]
    lines = [f"SmolLM2-135M, SparseGPT 2:4 on the first {meta['blocks']} blocks, calibration {meta['samples']} x 512 "
             f"tokens (Lee corpus), batches of 8, the last batch held out. Held-out loss of each block before -> "
             f"after tuning (normalised MSE to the dense block's output); commit {results.get('git_commit')}.",
             "", "| configuration | " + " | ".join(f"block {b}" for b in range(meta["blocks"]))
             + " | steps per block | seconds (all blocks) |", "|---|" + "---|" * (meta["blocks"] + 2)]
    for name, r in results["runs"].items():
        cells = [f"{s['val_before']:.4f} -> {s['val_best']:.4f} (epoch {s['best_epoch']})" for s in r["blocks"].values()]
        steps = next(iter(r["blocks"].values()))["steps"]
        seconds = sum(s["seconds"] for s in r["blocks"].values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {steps} | {seconds:.0f} |")
    lines += ["", "Command: `python benchmarks/bench_reconstruct.py`"]
    table = "\n".join(lines) + "\n"
    write_text(RESULTS / "reconstruct.md", table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit_result(run_one(json.loads(args.child), args.blocks, args.samples))
        return
    logging.basicConfig(level=logging.WARNING)
    results = {"settings": {"blocks": args.blocks, "samples": args.samples}, "runs": {}, "git_commit": git_commit()}
    with bench_lock():
        for name, options in CONFIGS.items():
            results["runs"][name] = run_config(__file__, ["--child", json.dumps(options), "--blocks", str(args.blocks),
                                                          "--samples", str(args.samples)],
                                               env={"OMP_NUM_THREADS": "2"})
            write_json(OUT, results)
            sys.stdout.write(f"{name}: {json.dumps(results['runs'][name]['blocks'])}\n")
            sys.stdout.flush()
    sys.stdout.write(write_table(results))


if __name__ == "__main__":
    main()
