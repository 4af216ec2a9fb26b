"""Pruning time and extra memory of one-shot magnitude pruning on the real SmolLM2-135M.

For each configuration: load a fresh model, record the resident set size (RSS), prune,
and sample RSS every 5 ms in a thread during pruning. "extra" is the peak during pruning
minus RSS just before it, against the size of one fp32 copy of the model's parameters.
Writes benchmarks/results/prune.json and prints a markdown table.

    python benchmarks/bench_prune.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import sparsecraft as sc
from sparsecraft import models

RESULTS = Path(__file__).parent / "results"


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="rewrite prune.md from prune.json")
    args = parser.parse_args()
    if args.table:
        sys.stdout.write(write_table(json.loads((RESULTS / "prune.json").read_text())))
        return
    torch.set_num_threads(2)
    model, _ = models.load("smollm2-135m")
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for label, kwargs in CONFIGS.items():
        times, extras = [], []
        for _ in range(args.repeats):
            model.load_state_dict(pristine)
            if hasattr(model, "sparsecraft_meta"):
                del model.sparsecraft_meta
            gc.collect()
            before = rss_bytes()
            with PeakRSS() as peak:
                start = time.perf_counter()
                state = sc.prune_(model, sc.PruneConfig(**kwargs), progress=False)
                seconds = time.perf_counter() - start
            times.append(seconds)
            extras.append(peak.peak - before)
            sparsity = state.sparsity()
            state.finalize_()
            del state
        rows.append({
            "config": label,
            "median_seconds": statistics.median(times),
            "seconds": times,
            "median_extra_bytes": statistics.median(extras),
            "extra_bytes": extras,
            "extra_vs_model_copy": statistics.median(extras) / model_bytes,
            "realised_sparsity": sparsity,
        })
    out = {
        "load_average_after": os.getloadavg(),
        "model": "SmolLM2-135M (fp32)",
        "model_param_bytes": model_bytes,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune.json").write_text(json.dumps(out, indent=2) + "\n")
    sys.stdout.write(write_table(out))


def write_table(out: dict) -> str:
    lines = [
        "| configuration | median time (s) | extra peak RSS (MB) | extra / one model copy | realised sparsity |",
        "|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['config']} | {r['median_seconds']:.2f} | {r['median_extra_bytes'] / 2**20:.0f} | "
            f"{r['extra_vs_model_copy']:.2f} | {r['realised_sparsity']:.4f} |"
        )
    header = (
        f"Produced by `python benchmarks/bench_prune.py --repeats {out['repeats']}` on SmolLM2-135M "
        f"(fp32 parameters {out['model_param_bytes'] / 2**20:.0f} MB, torch threads {out['torch_threads']}); "
        f"median of {out['repeats']} runs. \"extra\" is the peak RSS during pruning minus the RSS just before. "
        f"1-min load average after the run: {out['load_average_after'][0]:.1f} (a shared machine: times are "
        f"inflated when it is above 2).\n\n"
    )
    table = header + "\n".join(lines) + "\n"
    (RESULTS / "prune.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
