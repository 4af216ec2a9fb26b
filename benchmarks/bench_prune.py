"""Pruning time and extra memory of one-shot magnitude pruning on the real SmolLM2-135M.

For each configuration: load a fresh model, record the resident set size (RSS), prune,
and sample RSS every 5 ms in a thread during pruning. "extra" is the peak during pruning
minus RSS just before it, against the size of one fp32 copy of the model's parameters.
Each configuration runs in a fresh process, under the benchmark lock (``benchmarks/_common.py``).
Writes benchmarks/results/prune.json and prune.md.

    python benchmarks/bench_prune.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time

import torch

import sparsecraft as sc
from sparsecraft import models

from _common import RESULTS, bench_lock, emit_result, read_json, run_config, write_json, write_text


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRSS:
    """Samples RSS in a background thread while the block runs."""

    def __enter__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


CONFIGS = {
    "global magnitude 50%": dict(method="magnitude", sparsity=0.5, allocation="global"),
    "uniform magnitude 50%": dict(method="magnitude", sparsity=0.5),
    "uniform magnitude 2:4": dict(method="magnitude", sparsity=None, pattern="2:4"),
    "ERK random 90%": dict(method="random", sparsity=0.9, allocation="erk"),
}


def measure(label: str, repeats: int) -> dict:
    """One configuration in this (fresh) process: the first run's extra memory, median time."""
    torch.set_num_threads(2)
    model, _ = models.load("smollm2-135m")
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    times, extras = [], []
    for _ in range(repeats):
        model.load_state_dict(pristine)
        if hasattr(model, "sparsecraft_meta"):
            del model.sparsecraft_meta
        gc.collect()
        before = rss_bytes()
        with PeakRSS() as peak:
            start = time.perf_counter()
            state = sc.prune_(model, sc.PruneConfig(**CONFIGS[label]), progress=False)
            seconds = time.perf_counter() - start
        times.append(seconds)
        extras.append(peak.peak - before)
        sparsity = state.sparsity()
        state.finalize_()
        del state
    return {
        "config": label,
        "median_seconds": statistics.median(times),
        "seconds": times,
        # later repeats reuse memory the allocator kept from the first: only the first counts
        "first_run_extra_bytes": extras[0],
        "extra_bytes": extras,
        "model_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "realised_sparsity": sparsity,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="rewrite prune.md from prune.json")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # child process: one configuration
    args = parser.parse_args()
    if args.table:
        sys.stdout.write(write_table(read_json(RESULTS / "prune.json")))
        return
    if args.config:
        emit_result(measure(args.config, args.repeats))
        return
    with bench_lock():
        # a fresh process per configuration, so memory is not shared
        rows = [run_config(__file__, ["--config", label, "--repeats", str(args.repeats)]) for label in CONFIGS]
    out = {
        "load_average_after": os.getloadavg(),
        "model": "SmolLM2-135M (fp32)",
        "model_param_bytes": rows[0]["model_param_bytes"],
        "torch_threads": 2,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_json(RESULTS / "prune.json", out, indent=2)
    sys.stdout.write(write_table(out))


def write_table(out: dict) -> str:
    lines = [
        "| configuration | median time (s) | extra peak RSS (MB) | extra / one model copy | realised sparsity |",
        "|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['config']} | {r['median_seconds']:.2f} | {r['first_run_extra_bytes'] / 2**20:.0f} | "
            f"{r['first_run_extra_bytes'] / out['model_param_bytes']:.2f} | {r['realised_sparsity']:.4f} |"
        )
    header = (
        f"Produced by `python benchmarks/bench_prune.py --repeats {out['repeats']}` on SmolLM2-135M "
        f"(fp32 parameters {out['model_param_bytes'] / 2**20:.0f} MB, torch threads {out['torch_threads']}); "
        f"median time of {out['repeats']} runs in one process per configuration; \"extra\" is the peak RSS "
        f"during the first run minus the RSS just before it (it includes the masks, 1 byte per weight). "
        f"1-min load average after the run: {out['load_average_after'][0]:.1f} (a shared machine: times are "
        f"inflated when it is above 2).\n\n"
    )
    table = header + "\n".join(lines) + "\n"
    write_text(RESULTS / "prune.md", table)
    return table


if __name__ == "__main__":
    main()
