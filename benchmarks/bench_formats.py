"""File size per encoding against its theoretical size, and save/load time against torch.

Question: do sparsecraft files keep the zeros out (how close is each encoding to its ideal
size), and what does writing/reading them cost next to ``torch.save``/``torch.load`` of the
same weights stored densely?

Tensors: the Linear weights of the transformer blocks of the real SmolLM2-135M
(``sparsecraft.models.load("smollm2-135m")``; the tied embedding/lm_head is left out), or with
``--source random`` (or if the model cannot be loaded) random tensors of its shapes plus
2048x2048. Each is sparsified by magnitude per tensor: unstructured 50% and 90% (exact counts)
and 2:4 along the input dimension; pruned weights are +0.0.

For each dtype (fp32, fp16), pattern and encoding the script writes one file with
``write_tensors`` and records its size, the encoded component bytes, and the ideal size from
``theoretical_nbytes``. Then, for ``encoding="auto"``, it times save and load (median of
``--repeats`` interleaved runs) against ``torch.save``/``torch.load`` of the dense state dict;
both saves are followed by fsync, both loads read from the page cache.

    .venv/bin/python benchmarks/bench_formats.py [--source auto|real|random] [--repeats 5]

Writes benchmarks/results/formats.json and benchmarks/results/formats.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import sparsecraft.formats as fmt

from _common import RESULTS, bench_lock, git_commit, load_average, machine, write_json, write_text

log = logging.getLogger("bench_formats")

RANDOM_SHAPES = [(576, 1536), (1536, 576), (576, 576), (2048, 2048)]
PATTERNS = ["unstructured50", "unstructured90", "2:4"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ENCODINGS = ["dense", "bitmask", "csr", "nm", "auto"]


def load_weights(source: str) -> tuple[str, dict[str, torch.Tensor]]:
    if source in ("auto", "real"):
        try:
            from sparsecraft.models import load

            model, _ = load("smollm2-135m")
            weights = {n: p.detach().float().clone() for n, p in model.named_parameters()
                       if p.dim() == 2 and ".layers." in n}
            return "smollm2-135m (real weights, Linear layers of the 30 blocks)", weights
        except Exception as e:  # the benchmark still answers the size question without it
            if source == "real":
                raise
            log.warning("could not load smollm2-135m (%s); using random tensors", e)
    g = torch.Generator().manual_seed(0)
    weights = {f"random.{i}.{r}x{c}": torch.randn(r, c, generator=g) for i, (r, c) in enumerate(RANDOM_SHAPES)}
    return "random tensors " + ", ".join(f"{r}x{c}" for r, c in RANDOM_SHAPES), weights


def sparsify(w: torch.Tensor, pattern: str) -> torch.Tensor:
    """Magnitude pruning of one tensor; ties broken by position (stable sort)."""
    mag = w.abs()
    if pattern == "2:4":
        groups = mag.reshape(w.shape[0], -1, 4)
        order = groups.argsort(dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
        keep = keep.reshape(w.shape)
    else:
        sparsity = {"unstructured50": 0.5, "unstructured90": 0.9}[pattern]
        n_prune = round(sparsity * w.numel())
        order = mag.reshape(-1).argsort(stable=True)
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[order[:n_prune]] = False
        keep = keep.reshape(w.shape)
    return w.masked_fill(~keep, 0.0)  # +0.0, unlike w * mask which gives -0.0


def theoretical(tensors: dict[str, torch.Tensor], encoding: str, nm) -> float:
    total = 0.0
    for t in tensors.values():
        nnz = fmt.tensor_stats(t).nnz
        total += fmt.theoretical_nbytes(t.shape, t.dtype, encoding, nnz, nm=nm)
    return total


def entropy_bound(tensors: dict[str, torch.Tensor]) -> float:
    """Values plus the Shannon entropy of each tensor's mask: no unstructured format beats it."""
    total = 0.0
    for t in tensors.values():
        n, nnz = t.numel(), fmt.tensor_stats(t).nnz
        p = nnz / n
        h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        total += nnz * t.element_size() + n * h / 8
    return total


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(ints[a.element_size()]), b.reshape(-1).view(ints[b.element_size()]))


def measure_sizes(tensors, pattern, dtype_name, workdir: Path) -> list[dict]:
    rows = []
    nm = (2, 4) if pattern == "2:4" else None
    info = {n: {"pattern": "2:4" if nm else "unstructured"} for n in tensors}
    dense_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    for enc in ENCODINGS:
        if enc == "nm" and nm is None:
            continue
        path = workdir / f"{dtype_name}-{pattern}-{enc}.safetensors"
        header = fmt.write_tensors(path, tensors, info=info, encoding=enc, overwrite=True)
        file_bytes = path.stat().st_size
        comp_bytes = sum(e["nbytes"] for e in header["tensors"].values())
        chosen = sorted({e["encoding"] for e in header["tensors"].values()})
        ideal = None
        if enc != "auto":
            ideal = theoretical(tensors, enc, nm)
        path.unlink()
        rows.append({
            "dtype": dtype_name, "pattern": pattern, "encoding": enc, "chosen": chosen,
            "file_bytes": file_bytes, "component_bytes": comp_bytes,
            "theoretical_bytes": ideal, "container_overhead_bytes": file_bytes - comp_bytes,
            "file_over_theoretical": file_bytes / ideal if ideal else None,
            "file_over_dense_data": file_bytes / dense_bytes,
        })
        log.info("%s %-14s %-8s file %12d  components %12d  theoretical %14s  file/ideal %s  file/dense %.3f",
                 dtype_name, pattern, enc, file_bytes, comp_bytes,
                 f"{ideal:.0f}" if ideal else "-",
                 f"{file_bytes / ideal:.4f}" if ideal else "-", file_bytes / dense_bytes)
    return rows


def measure_times(tensors, pattern, dtype_name, workdir: Path, repeats: int) -> dict:
    nm_info = {n: {"pattern": "2:4" if pattern == "2:4" else "unstructured"} for n in tensors}
    sc_path = workdir / "sc.safetensors"
    pt_path = workdir / "dense.pt"
    times = {"sc_save": [], "sc_load": [], "torch_save": [], "torch_load": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        fmt.write_tensors(sc_path, tensors, info=nm_info, overwrite=True)
        times["sc_save"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        torch.save(tensors, pt_path)
        fsync_file(pt_path)
        times["torch_save"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        got, _, _ = fmt.read_tensors(sc_path)
        times["sc_load"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        ref = torch.load(pt_path, weights_only=True)
        times["torch_load"].append(time.perf_counter() - t0)
        assert all(bit_equal(got[n], t) for n, t in tensors.items()), "sparsecraft round trip differs"
        assert all(bit_equal(ref[n], t) for n, t in tensors.items()), "torch round trip differs"
        del got, ref
    header = fmt.read_header(sc_path)
    counts: dict[str, int] = {}
    for e in header["tensors"].values():
        key = e["encoding"] + (f" {e['nm'][0]}:{e['nm'][1]}" if e["nm"] else "")
        counts[key] = counts.get(key, 0) + 1
    row = {"dtype": dtype_name, "pattern": pattern, "repeats": repeats,
           **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
           "times_s": times, "sc_file_bytes": sc_path.stat().st_size,
           "torch_file_bytes": pt_path.stat().st_size, "auto_encodings": counts}
    log.info("%s %-14s save sc %.3f s / torch %.3f s   load sc %.3f s / torch %.3f s   "
             "file sc %d / torch %d bytes   %s", dtype_name, pattern, row["sc_save_median_s"],
             row["torch_save_median_s"], row["sc_load_median_s"], row["torch_load_median_s"],
             row["sc_file_bytes"], row["torch_file_bytes"], counts)
    sc_path.unlink()
    pt_path.unlink()
    return row


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def to_markdown(result: dict) -> str:
    lines = [
        "# Storage formats: file size and save/load time",
        "",
        f"Produced by `{result['command']}` ({result['source']}; {result['n_tensors']} tensors, "
        f"{result['n_params']:,} parameters; commit {result['git_commit']}; torch {result['torch']}, "
        f"{result['machine']}; "
        f"1-min load average {result['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} "
        "at end: the machine was shared, so times are inflated and noisy).",
        "",
        "Pruned by magnitude per tensor; pruned weights are +0.0. *theoretical* = ideal size of the "
        "encoding with exact-width index fields and no container (see "
        "`sparsecraft.formats.encodings.theoretical_nbytes`); *file* = bytes on disk, including the "
        "safetensors header and the JSON metadata with checksums. *entropy bound* = values + "
        "Shannon entropy of the mask, the floor for any unstructured format.",
        "",
        "## File size (MiB)",
        "",
        "| dtype | pattern | encoding | file | components | theoretical | file / theoretical | file / dense data |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        enc = r["encoding"] + (f" ({', '.join(r['chosen'])})" if r["encoding"] == "auto" else "")
        ideal = mib(r["theoretical_bytes"]) if r["theoretical_bytes"] else "-"
        ratio = f"{r['file_over_theoretical']:.4f}" if r["file_over_theoretical"] else "-"
        lines.append(f"| {r['dtype']} | {r['pattern']} | {enc} | {mib(r['file_bytes'])} | "
                     f"{mib(r['component_bytes'])} | {ideal} | {ratio} | {r['file_over_dense_data']:.3f} |")
    lines += ["", "Entropy bound (MiB): " + ", ".join(
        f"{k} {mib(v)}" for k, v in result["entropy_bound_bytes"].items()), ""]
    lines += [
        "Reading the table: packed N:M stores ceil(log2 M) index bits per kept value, so 2:4 costs "
        "1 index bit per element, exactly a bitmask; at exactly 2 of 4 the two tie and `auto` "
        "prefers nm. The weights held "
        f"{result['zeros_before_pruning']:,} exact zeros before pruning; groups that contain one "
        "keep fewer than 2 non-zeros, nm stores a padding value for them and bitmask does not, so "
        "`auto` picks bitmask for tensors with such groups. CSR's gap to its ideal is the index "
        "dtype: int16 column indices where 10-11 bits would do.",
        "",
    ]
    lines += [
        "## Save / load time (median of runs, seconds)",
        "",
        "sparsecraft = `write_tensors(encoding=\"auto\")` (choose, encode, SHA-256, fsync, rename) and "
        "`read_tensors` (parse, SHA-256 of every component and tensor, decode); torch = "
        "`torch.save` + fsync and `torch.load(weights_only=True)` of the dense state dict. Loads read "
        "from the page cache.",
        "",
        "| dtype | pattern | sparsecraft save | torch.save | sparsecraft load | torch.load | "
        "sparsecraft file (MiB) | torch file (MiB) | encodings chosen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["timing"]:
        chosen = ", ".join(f"{k} x{v}" for k, v in r["auto_encodings"].items())
        lines.append(f"| {r['dtype']} | {r['pattern']} | {r['sc_save_median_s']:.3f} | "
                     f"{r['torch_save_median_s']:.3f} | {r['sc_load_median_s']:.3f} | "
                     f"{r['torch_load_median_s']:.3f} | {mib(r['sc_file_bytes'])} | "
                     f"{mib(r['torch_file_bytes'])} | {chosen} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["auto", "real", "random"], default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with bench_lock():
        result = run(args)
    write_json(args.out_dir / "formats.json", result, indent=2)
    write_text(args.out_dir / "formats.md", to_markdown(result))
    log.info("wrote %s and %s", args.out_dir / "formats.json", args.out_dir / "formats.md")
    return 0


def run(args) -> dict:
    torch.manual_seed(0)
    source, weights = load_weights(args.source)
    log.info("%s: %d tensors, %d parameters", source, len(weights), sum(w.numel() for w in weights.values()))
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_formats.py", *sys.argv[1:]]),
        "source": source, "n_tensors": len(weights),
        "n_params": sum(w.numel() for w in weights.values()),
        # exact zeros already in the weights (a dequantized GGUF holds some): they make groups
        # of a 2:4 tensor short, which is why bitmask can beat packed 2:4 by a few bytes
        "zeros_before_pruning": sum(int(fmt.tensor_stats(w).numel - fmt.tensor_stats(w).nnz) for w in weights.values()),
        "git_commit": git_commit(),
        "torch": torch.__version__, "machine": machine(),
        "sizes": [], "timing": [], "entropy_bound_bytes": {},
        # The machine is shared: load averages put the timings in context.
        "loadavg_start": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_formats.") as tmp:
        workdir = Path(tmp)
        for pattern in PATTERNS:
            pruned32 = {n: sparsify(w, pattern) for n, w in weights.items()}
            for dtype_name, dtype in DTYPES.items():
                tensors = {n: w.to(dtype) for n, w in pruned32.items()}
                result["sizes"] += measure_sizes(tensors, pattern, dtype_name, workdir)
                if pattern != "2:4":
                    result["entropy_bound_bytes"][f"{dtype_name} {pattern}"] = entropy_bound(tensors)
                result["timing"].append(measure_times(tensors, pattern, dtype_name, workdir, args.repeats))
                del tensors
    result["loadavg_end"] = load_average()
    return result


if __name__ == "__main__":
    sys.exit(main())
