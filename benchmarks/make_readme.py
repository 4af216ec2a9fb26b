"""Assemble benchmarks/results/README.md from the per-benchmark tables.

Each benchmark script writes its own ``results/<name>.md`` with the command that produced
it; this script only concatenates them under headings, so no number is typed by hand. The
recovery section keeps the markers between which ``recovery/make_report.py`` rewrites it.

    python benchmarks/make_readme.py
"""

import argparse
import importlib.util
import json
from pathlib import Path

from _common import RESULTS, write_text


def _report_markers() -> tuple[str, str]:
    """The markers of recovery/make_report.py (loaded by path: ``recovery`` is a common name)."""
    spec = importlib.util.spec_from_file_location("_recovery_make_report",
                                                  Path(__file__).parent / "recovery" / "make_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BEGIN, module.END


RECOVERY_BEGIN, RECOVERY_END = _report_markers()

SECTIONS = [
    ("prune.md", "One-shot magnitude pruning: time and extra memory (issue: Foundation)"),
    ("formats.md", "Storage formats: file size and save/load time (issue: Foundation)"),
    ("oneshot.md", "Calibrated one-shot pruning of real models (issue: One-shot)"),
    ("reconstruct.md", "Block reconstruction settings (issue 18)"),
    ("learned_masks.md", "Learned 2:4 masks against reconstruction alone at equal time (issue 18)"),
    ("quant.md", "Sparse + quantised weights: GPTQ, GQSA, file sizes (issue 17)"),
    ("decode.md", "Decoding SmolLM2 on the CPU: the fused step, W4, W4 + group sparsity, llama.cpp (issue 17)"),
    ("lrp.md", "Relevance (LRP) pruning without fine-tuning (issue 15)"),
    ("select.md", "QuickSelection against scikit-learn's feature selectors (issue 15)"),
    ("mfac.md", "Second-order (M-FAC) pruning against magnitude GMP and Wanda (issue 15)"),
    ("bayes.md", "Bayesian sparsification: SSVI (issue 14)"),
    ("recovery_kron_fresh.md", "KroSBL on fresh random draws (issue 16)"),
    ("recovery_kron_identifiability.md", "KroSBL at M1 = 6: what the remaining failures are (issue 16)"),
    ("recovery_peers.md", "Sparse recovery against scikit-learn, skglm, celer, abess (issue 16)"),
    ("recovery_peers_discovery.md", "Equation discovery against PySINDy (issue 16)"),
    ("recovery_batched.md", "Batched recovery: many problems, one dictionary, one call (issue 16)"),
    ("train.md", "Sparse training on real data (issue: Sparse training)"),
    ("sparse_ift.md", "Sparse-IFT wide against the dense model of equal FLOPs (issue 15)"),
    ("shrink.md", "Structured shrinking: smaller and faster tensors (issue 5)"),
    ("runtime.md", "Runtime: sparse kernels, the measuring planner, activation sparsity (issue 5)"),
    ("scale.md", "Models bigger than memory: streamed pruning against depth (issue 13)"),
    ("distributed.md", "Distributed calibration: one process against two (issue 13)"),
    ("recovery.md", "Sparse recovery (issue: Sparse recovery)"),
]


RUNNING = """## Running the benchmarks

Each runs on the real models and takes minutes to hours; every script that measures time holds
`benchmarks/results/.train.lock` while it measures, so two never share the CPU (`make -j` is safe;
`bench_sparse_ift.py` measures accuracy only and takes no lock).
Each JSON result records the commit that produced it (`git_commit`).

| command | script | writes |
|---|---|---|
| `make bench-prune` | `bench_prune.py` | `prune.json`, `prune.md` |
| `make bench-formats` | `bench_formats.py` | `formats.json`, `formats.md` |
| `make bench-oneshot` | `bench_oneshot.py` (resumable; `--only NAME`, `--fresh`) | `oneshot.json`, `oneshot.md`, `.png` |
| `make bench-reconstruct` | `bench_reconstruct.py` | `reconstruct.json`, `reconstruct.md` |
| `make bench-learned-masks` | `bench_learned_masks.py` | `learned_masks.json`, `learned_masks.md` |
| `make bench-quant` | `bench_quant.py` (resumable; `--only NAME`, `--fresh`) | `quant.json`, `quant.md` |
| `make bench-train` | `bench_train.py` (resumable; `--part`) | `train.json`, `train.md`, `.png` |
| `make bench-sparse-ift` | `bench_sparse_ift.py` (resumable; accuracy only, takes no lock) | `sparse_ift.json`, `sparse_ift.md`, `.png` |
| `make bench-shrink` | `bench_shrink.py` | `shrink.json`, `shrink.md`, `.png` |
| `make bench-runtime` | `bench_runtime.py layers`, `model`, `model --threads 1` | `runtime_*.json`, `runtime.md`, `.png` |
| `make bench-decode` | `bench_decode.py --install-llama-cpp` (builds llama-cpp-python once), `profile_decode.py` | `decode.json`, `decode.md` |
| `make bench-scale` | `bench_scale.py` (synthetic Llama models of 4-32 layers, streamed) | `scale.json`, `scale.md`, `.png` |
| `make bench-distributed` | `bench_distributed.py` (1 vs 2 processes, `torchrun`) | `distributed.json`, `distributed.md` |
| `make bench-lrp` | `bench_lrp.py` | `lrp.json`, `lrp.md` |
| `make bench-select` | `bench_select.py` | `select.json`, `select.md` |
| `make bench-mfac` | `bench_mfac.py` (resumable; `--part`) | `mfac.json`, `mfac.md` |
| `make bench-bayes` | `bench_bayes.py` (resumable; `--part`) | `bayes.json`, `bayes.md`, `.png` |
| `make bench-recovery` | `recovery/bench_*.py` with the trial counts below | `recovery_*.json`, `.png` |
| `make bench-readme` | `make_readme.py`, `recovery/make_report.py` | this page, `recovery.md` |
| `make bench` | all of the above, then `bench-readme` | |

A script's own options: `.venv/bin/python benchmarks/SCRIPT.py --help`; most rewrite their table
from the JSON alone with `--table`.
"""


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    parts = [
        "# Benchmark results\n",
        "Every table below was written by the script named in it; this page is assembled by "
        "`python benchmarks/make_readme.py`. The machine is a shared 2-core CPU box, so the "
        "load average is recorded where times matter.\n",
        RUNNING,
    ]
    for name, title in SECTIONS:
        path = RESULTS / name
        if not path.exists():
            parts.append(f"## {title}\n\nNot run yet.\n")
            continue
        body = path.read_text().strip()
        if body.startswith("# "):  # drop the file's own title
            body = body.split("\n", 1)[1].strip()
        if name == "recovery.md":
            body = f"{RECOVERY_BEGIN}{body}\n{RECOVERY_END}".rstrip("\n")
        parts.append(f"## {title}\n\n{body}\n")
    write_text(RESULTS / "README.md", "\n".join(parts))
    _headline()


def _headline() -> None:
    """The short table in the project README, between its results markers."""
    readme = RESULTS.parent.parent / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        return
    lines = []
    oneshot = RESULTS / "oneshot.json"
    if oneshot.exists():
        data = json.loads(oneshot.read_text())
        runs, settings = data["runs"], data.get("settings", {})
        rows = [n for n in ("dense", "magnitude-0.5", "wanda-0.5", "sparsegpt-0.5", "sparsegpt+refit-0.5", "admm-0.5",
                            "admm+rec-0.5", "magnitude-2:4", "wanda-2:4", "sparsegpt-2:4", "sparsegpt+refit-2:4",
                            "admm-2:4", "admm+rec-2:4") if n in runs]
        lines += [
            f"SmolLM2-135M (real weights), perplexity on held-out Lee news text and on held-out Wikipedia text "
            f"(neither used for calibration); calibration {settings.get('samples')} x {settings.get('seq_len')} "
            f"Lee tokens (`benchmarks/bench_oneshot.py`; `-` where a row was measured before the Wikipedia column). "
            f"`sparsegpt`: the reference algorithm's weights (`refit=False`); `sparsegpt+refit`: the default, "
            f"least-squares weights on the same mask:",
            "",
            "| model | sparsity | perplexity | wiki perplexity | prune time (s) |",
            "|---|---|---|---|---|",
        ]
        for n in rows:
            r = runs[n]
            wiki = f"{r['perplexity_wiki']:.1f}" if "perplexity_wiki" in r else "-"
            lines.append(f"| {n} | {r.get('sparsity', 0.0):.2f} | {r['perplexity']:.1f} | {wiki} | "
                         f"{r.get('prune_seconds', 0.0):.1f} |")
    formats = RESULTS / "formats.json"
    if formats.exists():
        data = json.loads(formats.read_text())
        auto = [r for r in data["sizes"] if r["encoding"] == "auto"]
        lines += ["", "File size of the 210 pruned Linear weights, `sparsecraft.save` (automatic encoding) "
                  "against dense (`benchmarks/bench_formats.py`):", "",
                  "| dtype | pattern | encoding chosen | size / dense |", "|---|---|---|---|"]
        for r in auto:
            lines.append(f"| {r['dtype']} | {r['pattern']} | {', '.join(r['chosen'])} | {r['file_over_dense_data']:.3f} |")
    body = "\n".join(lines) + "\n" if lines else "Not run yet.\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    write_text(readme, f"{head}{start}\n{body}{end}{tail}")


if __name__ == "__main__":
    main()
