"""Distributed calibration on SmolLM2-135M: one process against two (``torchrun``).

For each method (default Wanda and SparseGPT, 50% unstructured, 128 x 512 calibration tokens
from the built-in Lee corpus) the same command runs three ways, each in fresh processes:

* ``1 process``: ``python -m sparsecraft prune ...`` with 2 threads (what a user runs on this
  2-core machine);
* ``2 processes``: ``torchrun --nproc-per-node 2 -m sparsecraft prune ...``, 1 thread each (so
  both runs use the 2 cores);
* ``1 process, 1 thread``: the reference for the comparison: every process of the 2-process
  run computes with 1 thread, and a float32 matrix product may round differently with
  another thread count (the kernels split the work differently), which would say nothing
  about the split of the calibration.

The checkpoints are compared tensor by tensor: the masks (the zeros of each pruned weight)
must be identical and every weight equal within 1e-5 relative (``||a - b|| / ||b||``). The
time of each run is the pruning alone (``prune_seconds`` that ``sparsecraft prune`` records,
rank 0's under torchrun) and the whole command (loading, calibration and saving included).

It holds the benchmark lock (``benchmarks/_common.py``) while it runs:

    .venv/bin/python benchmarks/bench_distributed.py

Writes benchmarks/results/distributed.json and distributed.md. ``--model`` takes any model
``sparsecraft prune`` takes (a tiny folder for a smoke test), ``--out`` another results file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, bench_lock, command_line, git_commit, load_average, machine, write_json, write_text

TOLERANCE = 1e-5
RUNS = {  # name -> (processes, threads per process)
    "1 process": (1, 2),
    "2 processes": (2, 1),
    "1 process, 1 thread": (1, 1),
}


def _prune(model: str, method: str, out: Path, processes: int, threads: int, args) -> dict:
    """Run one ``sparsecraft prune``; its results file plus the command's wall time."""
    prune = ["-q", "prune", model, "--method", method, "--sparsity", str(args.sparsity), "--samples",
             str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out)]
    if processes == 1:
        command = [sys.executable, "-m", "sparsecraft", *prune]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), "-m", "sparsecraft", *prune]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "prune_results.json").read_text())
    return {"prune_seconds": results["prune_seconds"], "command_seconds": wall,
            "processes": results.get("processes", 1), "threads_per_process": threads,
            "sparsity": results["sparsity"]}


def _compare(a: Path, b: Path) -> dict:
    """Masks and weights of two checkpoints of the same model."""
    import torch

    import sparsecraft as sc

    ma, mb = sc.load(a), sc.load(b)
    pruned = set(sc.get_meta(ma))
    wa = {n: p.detach() for n, p in ma.named_parameters()}
    wb = {n: p.detach() for n, p in mb.named_parameters()}
    mask_diffs, worst, worst_name = [], 0.0, None
    for name, x in wa.items():
        y = wb[name]
        if name in pruned and not torch.equal(x == 0, y == 0):
            mask_diffs.append({"tensor": name, "positions": int(((x == 0) != (y == 0)).sum())})
        rel = float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))
        if rel > worst:
            worst, worst_name = rel, name
    return {"pruned_tensors": len(pruned), "masks_identical": not mask_diffs, "mask_differences": mask_diffs[:10],
            "max_relative_difference": worst, "worst_tensor": worst_name,
            "weights_within_tolerance": worst <= TOLERANCE}


def _table(results: dict) -> str:
    lines = [
        "# Distributed calibration: one process against two",
        "",
        f"Model {results['settings']['model']}, {results['settings']['samples']} x {results['settings']['seq_len']} "
        f"calibration tokens, sparsity {results['settings']['sparsity']}; machine {results['machine']}, "
        f"commit {results['git_commit']}. Produced by `{results['command']}`.",
        "",
        "| method | run | processes x threads | prune s | command s | masks identical to 1 process, 1 thread "
        "| max relative weight difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in results["methods"].items():
        for name, run in row["runs"].items():
            cmp = row["comparisons"].get(name)
            lines.append(
                f"| {method} | {name} | {run['processes']} x {run['threads_per_process']} | "
                f"{run['prune_seconds']:.1f} | {run['command_seconds']:.1f} | "
                + ("reference | - |" if cmp is None else
                   f"{'yes' if cmp['masks_identical'] else 'NO'} | {cmp['max_relative_difference']:.2e} |"))
        lines.append(f"| {method} | speed-up of 2 processes over 1 (prune time) | | "
                     f"{row['speedup_prune']:.2f}x | {row['speedup_command']:.2f}x | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    results = {"settings": {"model": args.model, "sparsity": args.sparsity, "samples": args.samples,
                            "seq_len": args.seq_len, "tolerance": TOLERANCE},
               "machine": machine(), "command": command_line(), "methods": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        with bench_lock():
            results["load_before"] = load_average()
            for method in args.methods:
                runs, folders = {}, {}
                for name, (processes, threads) in RUNS.items():
                    folders[name] = work / f"{method}-{processes}x{threads}"
                    runs[name] = _prune(args.model, method, folders[name], processes, threads, args)
                    sys.stdout.write(f"{method} {name}: {json.dumps(runs[name])}\n")
                    sys.stdout.flush()
                reference = folders["1 process, 1 thread"]
                comparisons = {name: _compare(folders[name], reference) for name in RUNS
                               if name != "1 process, 1 thread"}
                for name, cmp in comparisons.items():
                    sys.stdout.write(f"{method} {name} vs 1 process, 1 thread: {json.dumps(cmp)}\n")
                results["methods"][method] = {
                    "runs": runs, "comparisons": comparisons,
                    "speedup_prune": runs["1 process"]["prune_seconds"] / runs["2 processes"]["prune_seconds"],
                    "speedup_command": runs["1 process"]["command_seconds"] / runs["2 processes"]["command_seconds"],
                }
                for folder in folders.values():
                    shutil.rmtree(folder, ignore_errors=True)
            results["load_after"] = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["git_commit"] = git_commit()
    write_json(out, results)
    write_text(out.with_suffix(".md"), _table(results))
    sys.stdout.write(_table(results))
    failed = [m for m, row in results["methods"].items() if not row["comparisons"]["2 processes"]["masks_identical"]
              or not row["comparisons"]["2 processes"]["weights_within_tolerance"]]
    if failed:
        raise SystemExit(f"2 processes differ from 1 process for {', '.join(failed)}")


if __name__ == "__main__":
    main()
