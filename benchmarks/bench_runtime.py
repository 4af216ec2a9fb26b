"""Does sparsity buy speed? Layer kernels against density, and SmolLM2-135M end to end.

    .venv/bin/python benchmarks/bench_runtime.py layers
    .venv/bin/python benchmarks/bench_runtime.py model
    .venv/bin/python benchmarks/bench_runtime.py table     # rewrite runtime.md / the plot

``layers`` and ``model`` hold the benchmark lock (``benchmarks/_common.py``) while they run.

``layers``: y = x W^T + b for W of shape 2048x2048 and 576x1536 (out x in), unstructured
random zeros at 50..99% sparsity, x with 1, 16 and 256 rows. Every kernel is timed in the
same run as dense, in rounds (``interleaved_samples``: ``--repeats`` rounds, each timing every
kernel once for at least ``--min-seconds``, in a seeded random order); the speed-up is the median
of the same-round ratios. ``--cache cold`` (default) cycles each kernel through copies of its
tensors so every call reads them from DRAM, as inside a model; ``--cache warm`` reuses one copy.
``--shape/--sparsity/--batch`` rerun single cells (printed, nothing written). "planner" is the
kernel the planner's rule picks from that measurement (dense
unless a sparse kernel is >= 5% faster), re-timed against dense in a second, independent
measurement: that is the check that its choice is never slower than dense. At one row the
activation-sparse decode kernels are timed too (x-axis: the fraction of inputs skipped).

``model``: SmolLM2-135M (fp32): prefill latency of a 512-token prompt (one forward pass,
last-position logits only) and decode tokens/s (batch 1, KV cache, greedy, 64 tokens: one
from the prefill, 63 one-token steps timed) for dense; activation sparsity (TEAL) at 25, 40,
50% (and WINA at 50%), calibrated on 16 x 512 Lee-corpus tokens; a control with every input
kept but the gather kernel used; and the MLP weights (gate/up/down) magnitude-pruned to 90%
unstructured, finalised, run with dense kernels and then with the planner's kernels.
Perplexity: held-out Lee text, windows of 512; activation sparsity applied to every token
(prefill="masked"), as if each were decoded.

Results: benchmarks/results/runtime_layers.json, runtime_model.json (runtime_layers_Nthread.json,
runtime_model_Nthread.json for other --threads), runtime.md, runtime_layers.png. The script sets torch's thread count (``--threads``, default 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import LOCK, RESULTS, ROOT, bench_lock, cpu_info, git_commit, save_figure, write_json, write_text

LAYERS_OUT = RESULTS / "runtime_layers.json"  # 2 threads; other counts: runtime_layers_Nthread.json
SHAPES = [(2048, 2048), (576, 1536)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCHES = [1, 16, 256]
MAX_COPIES = 512

log = logging.getLogger("bench_runtime")


def _env(threads: int) -> dict:
    commit = git_commit()
    from sparsecraft.runtime.extension import extension_status

    return {"commit": commit, "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "cpu": cpu_info(), "threads": threads, "load_avg_start": os.getloadavg()[0],
            "extension": extension_status(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "lock": str(LOCK.relative_to(ROOT))}


# -- layers ------------------------------------------------------------------------------
def _layers_file(threads: int) -> Path:
    return LAYERS_OUT if threads == 2 else RESULTS / f"runtime_layers_{threads}thread.json"


def _weight(shape, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) / shape[1] ** 0.5
    return w.masked_fill(torch.rand(*shape, generator=g) < sparsity, 0.0)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copies(nbytes: int, cache: str) -> int:
    """How many copies of a kernel's tensors to cycle through: 1 when warm; when cold, enough
    that one cycle streams 3x the last-level cache (so every call reads its weight from DRAM,
    as a layer inside a model does), at most MAX_COPIES."""
    if cache == "warm":
        return 1
    llc = max(cpu_info()["caches"].values(), default=32 << 20)
    return max(2, min(MAX_COPIES, math.ceil(3 * llc / max(nbytes, 1))))


def _rotating(make, tensors: dict, cache: str):
    """A call that runs ``make(copy)()`` on the next of ``_copies`` copies of ``tensors``."""
    n = _copies(_nbytes(tensors.values()), cache)
    calls = [make(tensors)] + [make({k: v.clone() for k, v in tensors.items()}) for _ in range(n - 1)]
    state = [0]

    def call():
        i = state[0]
        state[0] = (i + 1) % n
        return calls[i]()

    call.copies = n
    return call


def _paired(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per kernel: median and quartiles of dense / kernel over same-round samples."""
    out = {}
    for k, ts in samples.items():
        if k == "dense":
            continue
        ratios = [d / t for d, t in zip(samples["dense"], ts)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        out[k] = [q2, q1, q3]
    return out


def run_layers(repeats: int, min_seconds: float, cache: str, shapes, sparsities, batches, margin: float = 0.05,
               activation: bool = True) -> dict:
    from sparsecraft.runtime import KERNELS, interleaved_samples
    from sparsecraft.runtime import activation as act
    from sparsecraft.runtime.extension import get_extension

    ext = get_extension()
    rows = []
    sample = dict(repeats=repeats, min_seconds=min_seconds)
    for out_f, in_f in shapes:
        bias = torch.randn(out_f) * 0.01
        for s in sparsities:
            w = _weight((out_f, in_f), s)
            packed = {k: kern.pack(w) for k, kern in KERNELS.items() if k != "csr_cpp" or ext is not None}
            for n in batches:
                x = torch.randn(n, in_f)
                fns = {k: _rotating(lambda p, k=k: (lambda: KERNELS[k].run(p, x, bias, out_f)), p, cache)
                       for k, p in packed.items()}
                samples = interleaved_samples(fns, shuffle_seed=0, **sample)
                times = {k: statistics.median(v) for k, v in samples.items()}
                speedup = _paired(samples)
                best = min(times, key=times.get)
                choice = best if best == "dense" or times[best] <= (1 - margin) * times["dense"] else "dense"
                check = interleaved_samples({"dense": fns["dense"], "chosen": fns[choice]}, shuffle_seed=1, **sample)
                row = {"shape": [out_f, in_f], "sparsity": s, "batch": n, "times": times, "speedup": speedup,
                       "copies": {k: f.copies for k, f in fns.items()}, "planner": choice,
                       "planner_recheck": _paired(check)["chosen"][0]}
                rows.append(row)
                print(f"{out_f}x{in_f} s={s} n={n}: dense {times['dense'] * 1e3:.3f} ms; "
                      + ", ".join(f"{k} {v[0]:.2f}x ({v[1]:.2f}-{v[2]:.2f})" for k, v in speedup.items())
                      + f"; planner {choice} (re-check {row['planner_recheck']:.2f}x)", flush=True)
    # activation sparsity, one token: the weight stays dense, a fraction s of inputs is skipped
    act_rows = []
    for out_f, in_f in shapes if activation else []:
        w, bias = _weight((out_f, in_f), 0.0), torch.randn(out_f) * 0.01
        x = torch.randn(in_f)
        for s in [0.0, 0.25, 0.4, 0.5] + SPARSITIES[1:]:
            thr = float(x.abs().kthvalue(max(1, round(s * in_f))).values) if s > 0 else -1.0
            fns = {"dense": _rotating(lambda p: (lambda: F.linear(x.unsqueeze(0), p["w"], bias)), {"w": w}, cache),
                   "act_embag": _rotating(lambda p, thr=thr: (lambda: act.gather_decode(x, p["wt"], bias, thr)),
                                          {"wt": w.t().contiguous()}, cache)}
            if ext is not None:
                fns["act_cpp"] = _rotating(lambda p, thr=thr: (lambda: ext.act_gemv(x, p["wt"], None, thr, bias)),
                                           {"wt": w.t().contiguous()}, cache)
            samples = interleaved_samples(fns, shuffle_seed=0, **sample)
            times = {k: statistics.median(v) for k, v in samples.items()}
            act_rows.append({"shape": [out_f, in_f], "skipped": s, "times": times, "speedup": _paired(samples)})
            print(f"act {out_f}x{in_f} skip={s}: dense {times['dense'] * 1e3:.3f} ms; "
                  + ", ".join(f"{k} {v[0]:.2f}x" for k, v in _paired(samples).items()), flush=True)
    return {"rows": rows, "activation": act_rows,
            "settings": {"repeats": repeats, "min_seconds": min_seconds, "cache": cache, "shuffled": True,
                         "max_copies": MAX_COPIES}}


# -- SmolLM2 end to end -------------------------------------------------------------------
def run_model(prompt_len: int, new_tokens: int, repeats: int, calib_samples: int) -> dict:
    import sparsecraft as sc
    from sparsecraft import data, evaluate, models
    from sparsecraft import runtime as rt

    model, tok = models.load("smollm2-135m")
    eval_tokens = data.evaluation_tokens(tok)
    ids = eval_tokens[:prompt_len].unsqueeze(0)
    calib = data.calibration(tok, calib_samples, 512, seed=0)
    results: dict = {"settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                                  "calibration": [calib_samples, 512], "eval_tokens": int(eval_tokens.numel())},
                     "runs": {}}

    def measure(name: str, ppl_hook=None, quality: bool = True, **extra) -> None:
        start = time.perf_counter()
        prefill = rt.prefill_seconds(model, ids, repeats=repeats)
        decodes = [rt.greedy_decode(model, ids, new_tokens) for _ in range(repeats)]
        rates = sorted(d.tokens_per_second for d in decodes)
        run = {"prefill_ms": prefill * 1e3, "decode_tok_s": rates[len(rates) // 2], "decode_tok_s_all": rates,
               "tokens": decodes[0].tokens, **extra}
        if quality:
            if ppl_hook is not None:
                ppl_hook(True)
            run["perplexity"] = evaluate.perplexity(model, eval_tokens, 512, progress=False)
            if ppl_hook is not None:
                ppl_hook(False)
        dense = results["runs"].get("dense")
        if dense:
            run["same_tokens"] = sum(a == b for a, b in zip(run["tokens"], dense["tokens"]))
            run["decode_speedup"] = run["decode_tok_s"] / dense["decode_tok_s"]
            run["prefill_speedup"] = dense["prefill_ms"] / run["prefill_ms"]
        run["load_avg"] = os.getloadavg()[0]
        run["seconds"] = time.perf_counter() - start
        results["runs"][name] = run
        print(f"{name}: " + json.dumps({k: v for k, v in run.items() if k not in ("tokens",)}), flush=True)

    measure("dense")
    for method, s in [("teal", 0.25), ("teal", 0.4), ("teal", 0.5), ("wina", 0.5)]:
        handle = rt.sparsify_activations_(model, calib, s, method)
        reached = handle.measure_sparsity(eval_tokens[: 4 * 512].reshape(4, 512))["overall"]
        measure(f"act-{method}-{s:g}", ppl_hook=lambda on: handle.set_mode(prefill="masked" if on else "dense"),
                kind="activation", method=method, target=s, reached_held_out=reached, kernel=handle.kernel)
        handle.remove()
    # control: the gather kernel with every input kept (threshold below every score)
    handle = rt.sparsify_activations_(model, calib, 0.0)
    for m in handle.modules.values():
        m.threshold = -1.0
    measure("act-control-0", kind="activation", method="teal", target=0.0, kernel=handle.kernel)
    handle.remove()

    state = sc.prune_(model, sc.Magnitude(sparsity=0.9, targets={"include": ["*.mlp.*"]}), progress=False)
    sparsity = state.sparsity()
    state.finalize_()
    measure("mlp90-dense-kernels", kind="weights", sparsity=sparsity)
    start = time.perf_counter()
    report = rt.compile_(model, ids, ids[:, :1])
    plan_seconds = time.perf_counter() - start
    print(report, flush=True)
    chosen: dict[str, int] = {}
    for p in report.layers:
        chosen[f"{p.rows} rows: {p.chosen}"] = chosen.get(f"{p.rows} rows: {p.chosen}", 0) + 1
    measure("mlp90-planner", kind="weights", sparsity=sparsity, plan_seconds=plan_seconds, chosen=chosen,
            planned_layer_ms={str(r): t for r, t in report.totals().items()})
    results["plan"] = report.to_dict()

    # floors: what a decode step costs besides the block linears (and besides the head too)
    class Zero(torch.nn.Module):
        def __init__(self, out_features):
            super().__init__()
            self.out_features = out_features

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.out_features)

    for name, module in list(model.named_modules()):
        if isinstance(module, (torch.nn.Linear, rt.SparseLinear)) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Zero(module.out_features))
    measure("floor-no-block-linears", quality=False, kind="floor")
    model.lm_head = Zero(model.lm_head.out_features)
    measure("floor-no-linears-no-head", quality=False, kind="floor")
    return results


# -- tables and plot ------------------------------------------------------------------------
def _f(x, spec=".2f"):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def _speedups(r: dict) -> dict[str, list[float]]:
    """[median, q1, q3] of the paired dense/kernel ratios (older files: ratio of medians)."""
    if "speedup" in r:
        return r["speedup"]
    t = r["times"]
    return {k: [t["dense"] / v] * 3 for k, v in t.items() if k != "dense"}


METHOD = """**Method.** Layer `y = x W^T + b`, W unstructured random zeros, x with *batch* rows. Each
kernel is timed in rounds: every round times each kernel once (a sample loops it for >= the sample
length), in a seeded random order, so no kernel always follows the same neighbour; the speed-up is the
median over rounds of (dense sample / kernel sample) of the same round, with its interquartile range
in brackets; *dense ms* is the median dense sample. **Cold** (the default) gives every kernel enough
copies of its tensors that one cycle through them streams 3x the last-level cache, so each call reads
its weight from DRAM, as a layer inside a decoding model does (SmolLM2's fp32 weights are 540 MB, 17x
a 32 MB L3); **warm** reuses one copy, which then may or may not stay in the last-level cache. *ideal* =
1/density. *planner* = the kernel the planner's rule picks from these times (dense unless >= 5% faster),
re-timed against dense in a second measurement.

Why this method: the first version of this table (warm, the four kernels always in one order,
ratio of medians) reported 5.46x / 12.2x for csr_cpp at 90% / 95% zeros (2048x2048, batch 1), and an
independent rerun got 3.5x / 7.0x. In that table dense's own time, the same operation in every cell,
ranged from 0.385 ms (50% zeros) to 0.482 ms and 0.574 ms (the 90% and 95% cells), so those two
ratios were inflated by a slow dense sample, not by a fast kernel (against the 0.385 ms dense of the
first cell they would have been 4.4x / 8.2x). The likely cause is the cache: dense's 16.8 MB weight
sits at the edge of a 32 MB last-level cache shared with whatever else runs on the host, so it was
cache-resident in some cells and streamed from DRAM in others, while csr_cpp's 2.5 MB (90%) stayed
cached; the four kernels' fixed order and the ratio of separately taken medians let such drift through.
With the cold method every kernel reads DRAM on every call, which is also what a decoding model sees,
and the same-round ratios cancel drift that hits all kernels alike. Compare `--cache warm` and
`--cache cold` on one cell to see the cache's share. Rerun one cell with one command:
`python benchmarks/bench_runtime.py layers --shape 2048x2048 --sparsity 0.9 0.95 --batch 1 --threads 2`."""


def _layers_section(res: dict) -> list[str]:
    env, st = res["env"], res.get("settings", {})
    cpu = env.get("cpu", {})
    caches = ", ".join(f"{k} {v >> 10} KiB" for k, v in cpu.get("caches", {}).items())
    lines = [f"## Layers, torch threads {env['threads']}", "",
             f"Produced by `{env['command']}` under `flock {env.get('lock', '/tmp/sparsecraft-bench.lock')}` "
             f"(commit {env['commit']}, torch {env['torch']}, {env['cpus']} CPUs {cpu.get('model', '')} "
             f"[{caches}], **torch threads {env['threads']}**, compiled kernels: {env['extension']}; 1-min load "
             f"average {env['load_avg_start']:.1f} at start, {env.get('load_avg_end', float('nan')):.1f} at end). "
             f"Caches **{st.get('cache', 'warm')}**; {st.get('repeats', '?')} rounds of samples of >= "
             f"{st.get('min_seconds', 0) * 1e3:g} ms" + ("" if st.get("shuffled") else
                                                          " (kernels in a fixed order, ratio of medians)") + ".", ""]
    for shape in SHAPES:
        for n in BATCHES:
            rows = [r for r in res["rows"] if tuple(r["shape"]) == shape and r["batch"] == n]
            if not rows:
                continue
            kernels = [k for k in rows[0]["times"] if k != "dense"]
            lines += [f"**W {shape[0]}x{shape[1]}, batch {n}**", "",
                      "| sparsity | dense ms | " + " | ".join(kernels) + " | ideal | planner (re-check) |",
                      "|---|---|" + "---|" * len(kernels) + "---|---|"]
            for r in rows:
                sp = _speedups(r)
                lines.append(f"| {r['sparsity']:.2f} | {r['times']['dense'] * 1e3:.3f} | "
                             + " | ".join(f"{sp[k][0]:.2f}x ({sp[k][1]:.2f}-{sp[k][2]:.2f})" for k in kernels)
                             + f" | {1 / (1 - r['sparsity']):.0f}x | {r['planner']} ({r['planner_recheck']:.2f}x) |")
            dense_ms = [r["times"]["dense"] * 1e3 for r in rows]
            lines += ["", f"Dense, the same operation in every row: {min(dense_ms):.3f}-{max(dense_ms):.3f} ms "
                      f"({max(dense_ms) / min(dense_ms):.2f}x spread; the noise floor of this block).", ""]
    sparse = [r for r in res["rows"] if r["planner"] != "dense"]
    dense = [r["planner_recheck"] for r in res["rows"] if r["planner"] == "dense"]
    if sparse:
        worst = min(sparse, key=lambda r: r["planner_recheck"])
        lines.append(f"The planner chose a sparse kernel in {len(sparse)} of {len(res['rows'])} cells; lowest "
                     f"re-checked speed-up among them {worst['planner_recheck']:.2f}x (W {worst['shape'][0]}x"
                     f"{worst['shape'][1]}, sparsity {worst['sparsity']}, batch {worst['batch']}, {worst['planner']}).")
    if dense:
        lines.append(f"Where it kept dense, the re-check times dense against itself, which shows the noise of "
                     f"these measurements: {min(dense):.2f}x to {max(dense):.2f}x.")
    lines.append("")
    if res.get("activation"):
        lines += ["**Activation-sparse decode (one token, dense weight, a fraction of inputs skipped)**: "
                  "speed-up over dense `F.linear`; *act_embag* = `F.embedding_bag` over the active rows of "
                  "W^T, *act_cpp* = the compiled gather-GEMV. Skip 0 keeps every input (kernel only).", "",
                  "| W | skipped | dense ms | act_embag | act_cpp | ideal |", "|---|---|---|---|---|---|"]
        for r in res["activation"]:
            sp = _speedups(r)
            cpp = f"{sp['act_cpp'][0]:.2f}x" if "act_cpp" in sp else "-"
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['skipped']:.2f} | {r['times']['dense'] * 1e3:.3f} | "
                         f"{sp['act_embag'][0]:.2f}x | {cpp} | {1 / (1 - r['skipped']):.1f}x |")
        lines.append("")
    return lines


def write_table() -> str:
    lines = ["# Runtime: sparse kernels and activation sparsity", ""]
    layer_files = sorted(RESULTS.glob("runtime_layers*.json"), key=lambda p: (len(p.name), p.name))
    if layer_files:
        lines += [METHOD, ""]
        for path in layer_files:
            lines += _layers_section(json.loads(path.read_text()))
        lines += ["Plot (2 threads): `runtime_layers.png`.", ""]
    for path in sorted(RESULTS.glob("runtime_model*.json"), key=lambda p: (len(p.name), p.name)):
        lines += _model_section(json.loads(path.read_text()))
    text = "\n".join(lines)
    write_text(RESULTS / "runtime.md", text)
    _plot()
    return text


def _model_section(res: dict) -> list[str]:
    lines: list[str] = []
    env, st = res["env"], res["settings"]
    lines += [f"### SmolLM2-135M end to end, torch threads {res['env']['threads']}", "",
              f"Produced by `{env['command']}` under `flock {env.get('lock', '/tmp/sparsecraft-bench.lock')}` (commit {env['commit']}, "
              f"**torch threads {env['threads']}**, compiled kernels: {env['extension']}; 1-min load average "
              f"{env['load_avg_start']:.1f} at start, {env.get('load_avg_end', float('nan')):.1f} at end). "
              f"fp32; prompt {st['prompt_len']} tokens of held-out Lee text; prefill = one forward pass "
              f"(last-position logits), median of {st['repeats']}; decode = {st['new_tokens']} greedy tokens with "
              f"a KV cache, batch 1, tokens/s over the {st['new_tokens'] - 1} one-token steps, median of "
              f"{st['repeats']}; *same tokens* = greedy tokens equal to dense's, position by position. "
              f"Perplexity on {st['eval_tokens']} held-out tokens (windows of 512); activation sparsity is applied "
              f"to every token there. Thresholds calibrated on {st['calibration'][0]} x {st['calibration'][1]} "
              f"Lee-corpus tokens. *load* = 1-min load average after the row (2 cores: above ~{env['threads']} "
              "someone else was running too, and times are inflated).", "",
              "| configuration | kernel | sparsity | prefill ms | prefill x | decode tok/s | (min-max) | decode x | same tokens | perplexity | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        if r.get("kind") == "activation":
            sp = (f"act {r['target']:.2f} (held-out {r['reached_held_out']:.3f})" if "reached_held_out" in r
                  else "act 0 (all inputs kept)")
        elif r.get("kind") == "weights":
            sp = f"MLP weights {r['sparsity']:.2f}"
        elif r.get("kind") == "floor":
            sp = "no compute (floor)"
        else:
            sp = "-"
        kernel = r.get("kernel", {"weights": "planner" if name.endswith("planner") else "dense",
                                  "floor": "-"}.get(r.get("kind"), "dense"))
        lines.append(f"| {name} | {kernel} | {sp} | {r['prefill_ms']:.1f} | {_f(r.get('prefill_speedup'))} | "
                     f"{r['decode_tok_s']:.2f} | {min(r['decode_tok_s_all']):.1f}-{max(r['decode_tok_s_all']):.1f} | "
                     f"{_f(r.get('decode_speedup'))} | "
                     f"{r.get('same_tokens', '-')}/{len(r['tokens'])} | {_f(r.get('perplexity'))} | {r['load_avg']:.1f} |")
    runs = res["runs"]
    notes = []
    if "act-control-0" in runs:
        ctl = runs["act-control-0"]["decode_tok_s"]
        notes.append("Against the control (the same gather kernel, every input kept), activation sparsity "
                     "changes decode speed by " + ", ".join(
                         f"{r['target']:.2f}: {r['decode_tok_s'] / ctl:.2f}x" for n, r in runs.items()
                         if r.get("kind") == "activation" and r.get("target")) + " (TEAL, WINA in table order); "
                     f"the control itself is {ctl / runs['dense']['decode_tok_s']:.2f}x dense, i.e. that much of "
                     "the gain is the kernel, not the skipped inputs.")
    if "floor-no-block-linears" in runs:
        f1, f2 = runs["floor-no-block-linears"], runs["floor-no-linears-no-head"]
        ms = lambda r: 1e3 / r["decode_tok_s"]
        notes.append(f"Floors: with the 210 block linears replaced by zeros a decode step still takes "
                     f"{ms(f1):.1f} ms ({f1['decode_tok_s']:.1f} tok/s; the dense lm_head and everything else), "
                     f"{ms(f2):.1f} ms without the lm_head as well; dense takes {ms(runs['dense']):.1f} ms. "
                     "Sparsity in the block linears can only shrink the difference.")
    if "mlp90-planner" in runs:
        notes.append("The mlp90 rows measure speed only: magnitude pruning 90% of the MLP weights without "
                     "calibration or retraining destroys the model (their perplexity); the point is what the "
                     "planner makes of such zeros. Prefill runs dense in the activation-sparsity rows.")
    if notes:
        lines += [""] + notes
    planner = res["runs"].get("mlp90-planner")
    if planner:
        lines += ["", f"Planner on the 90% model: {planner['plan_seconds']:.0f} s to measure; choices "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(planner["chosen"].items()))
                  + "; summed layer times (dense -> chosen) "
                  + ", ".join(f"{r} rows {t['dense'] * 1e3:.1f} -> {t['chosen'] * 1e3:.1f} ms"
                              for r, t in planner["planned_layer_ms"].items()) + "."]
    lines.append("")
    return lines


def _plot() -> None:
    if not LAYERS_OUT.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(LAYERS_OUT.read_text())
    fig, axes = plt.subplots(len(SHAPES), len(BATCHES), figsize=(13, 7.5), sharex=True, squeeze=False)
    colors = {"csr": "#888", "csr_embag": "#3a6ea5", "csr_cpp": "#c03", "planner": "#2a2"}
    for i, shape in enumerate(SHAPES):
        for j, n in enumerate(BATCHES):
            ax = axes[i][j]
            rows = [r for r in res["rows"] if tuple(r["shape"]) == shape and r["batch"] == n]
            dens = [1 - r["sparsity"] for r in rows]
            ax.plot(dens, [1 / d for d in dens], "k--", lw=1, label="ideal 1/density")
            ax.axhline(1.0, color="k", lw=0.6)
            for k in rows[0]["times"]:
                if k != "dense":
                    ax.plot(dens, [_speedups(r)[k][0] for r in rows], "o-", ms=3,
                            color=colors.get(k), label=k)
            ax.plot(dens, [r["planner_recheck"] for r in rows], "s", ms=6, mfc="none", color=colors["planner"],
                    label="planner (re-check)")
            if n == 1 and res.get("activation"):
                acts = [r for r in res["activation"] if tuple(r["shape"]) == shape and r["skipped"] > 0]
                for k, c in (("act_cpp", "#e80"), ("act_embag", "#a6c")):
                    if acts and k in acts[0]["times"]:
                        ax.plot([1 - r["skipped"] for r in acts], [_speedups(r)[k][0] for r in acts],
                                "^:", ms=4, color=c, label=f"{k} (x = active inputs)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"W {shape[0]}x{shape[1]}, batch {n}", fontsize=9)
            if i == len(SHAPES) - 1:
                ax.set_xlabel("density (1 - sparsity)")
            if j == 0:
                ax.set_ylabel("speed-up over dense")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Sparse kernels against density (torch threads {res['env']['threads']}, medians)")
    fig.tight_layout()
    save_figure(fig, RESULTS / "runtime_layers.png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("layers", "model", "table"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: 15 for layers, 3 for model")
    parser.add_argument("--min-seconds", type=float, default=0.01, help="layers: length of one timed sample")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold",
                        help="layers: cold = every call reads its weight from DRAM (as in a model; default), "
                             "warm = the same weight copy every call (it may stay in the last-level cache)")
    parser.add_argument("--shape", nargs="+", default=None, help="layers: only these OUTxIN shapes (a check: "
                        "prints the cells, writes nothing)")
    parser.add_argument("--sparsity", nargs="+", type=float, default=None, help="layers: only these (a check)")
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="layers: only these (a check)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.what == "table":
        sys.stdout.write(write_table())
        return
    torch.set_num_threads(args.threads)
    check = any(v is not None for v in (args.shape, args.sparsity, args.batch))
    with bench_lock():
        env = _env(args.threads)
        if env["load_avg_start"] > 0.5:
            log.warning("1-min load average %.1f at start: another process is running, times will be inflated",
                        env["load_avg_start"])
        if args.what == "layers":
            shapes = [tuple(int(d) for d in sh.lower().split("x")) for sh in args.shape] if args.shape else SHAPES
            res = run_layers(args.repeats or 15, args.min_seconds, args.cache, shapes, args.sparsity or SPARSITIES,
                             args.batch or BATCHES, activation=not check)
            if check:
                return
            out = _layers_file(args.threads)
        else:
            res = run_model(args.prompt_len, args.new_tokens, args.repeats or 3, args.calib_samples)
            out = RESULTS / f"runtime_model{'' if args.threads == 2 else f'_{args.threads}thread'}.json"
        from sparsecraft.runtime.extension import extension_status

        env["extension"] = extension_status()
        env["load_avg_end"] = os.getloadavg()[0]
    res["env"] = env
    write_json(out, res)
    sys.stdout.write(write_table())


if __name__ == "__main__":
    main()
