"""Assemble benchmarks/results/README.md from the per-benchmark tables.

Each benchmark script writes its own ``results/<name>.md`` with the command that produced
it; this script only concatenates them under headings, so no number is typed by hand.

    python benchmarks/make_readme.py
"""

from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SECTIONS = [
    ("prune.md", "One-shot magnitude pruning: time and extra memory (issue: Foundation)"),
    ("formats.md", "Storage formats: file size and save/load time (issue: Foundation)"),
    ("oneshot.md", "Calibrated one-shot pruning of real models (issue: One-shot)"),
    ("recovery.md", "Sparse recovery (issue: Sparse recovery)"),
]


def main() -> None:
    parts = [
        "# Benchmark results\n",
        "Every table below was written by the script named in it; this page is assembled by "
        "`python benchmarks/make_readme.py`. The machine is a shared 2-core CPU box, so the "
        "load average is recorded where times matter.\n",
    ]
    for name, title in SECTIONS:
        path = RESULTS / name
        if not path.exists():
            parts.append(f"## {title}\n\nNot run yet.\n")
            continue
        body = path.read_text().strip()
        if body.startswith("# "):  # drop the file's own title
            body = body.split("\n", 1)[1].strip()
        parts.append(f"## {title}\n\n{body}\n")
    (RESULTS / "README.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
