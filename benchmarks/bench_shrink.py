"""Structured shrinking of SmolLM2-135M: is the shrunk model faster, and how much worse?

For the dense model and MLP channels shrunk by each fraction (default 30% and 50%):

* prefill latency: one forward pass over 512 tokens at batch 1 with the KV cache on and
  logits for the last position only (what ``generate`` does before its first token); the
  median over repeats, the models measured in turn inside each repeat (side by side, so a
  change of machine load hits them alike);
* decode speed: greedy decoding of 64 new tokens after a 128-token prompt with the KV cache,
  batch 1, one token per forward pass; tokens per second from the median decode time
  (prefill excluded);
* perplexity: held-out Lee corpus text (``data.evaluation_tokens``), windows of 512, stride
  512 (``models.perplexity``), for every criterion asked for; the timed rows use the first
  criterion (timings depend on the shapes only, which every criterion shares).

Run it with two threads; it holds the benchmark lock (``benchmarks/_common.py``) while it runs:

    env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_shrink.py

Writes benchmarks/results/shrink.json, shrink.md and shrink.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from _common import LOCK, RESULTS, ROOT, bench_lock, git_commit, load_average, save_figure, write_json, write_text


def prefill_seconds(model, ids) -> float:
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        start = time.perf_counter()
        model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start


def decode_seconds(model, prompt, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for ``new_tokens`` greedy steps after the prompt's prefill; the tokens made."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        made = [int(token)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            made.append(int(token))
        # new_tokens - 1 decode steps are timed (the first token came from the prefill)
        return (time.perf_counter() - start) / (new_tokens - 1) * new_tokens, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--criteria", nargs="+", default=["wanda", "taylor", "magnitude"],
                        help="first one is timed; all get perplexity")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "shrink.json"))
    parser.add_argument("--timing-only", action="store_true",
                        help="keep the perplexity rows of --out, measure the timings again")
    parser.add_argument("--table", action="store_true", help="rewrite the table and plot from --out only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    if args.table:
        result = json.loads(out.read_text())
        sys.stdout.write(write_table(result, out.with_suffix(".md")))
        _plot(result, out.with_suffix(".png"))
        return
    with bench_lock():
        result = _run(args, out)
    write_json(out, result)
    table = write_table(result, out.with_suffix(".md"))
    sys.stdout.write(table)
    _plot(result, out.with_suffix(".png"))


def _run(args, out: Path) -> dict:
    import torch

    from sparsecraft import data, models

    torch.manual_seed(0)
    # the run holds LOCK itself: the command alone reproduces it
    command = f"env OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python " + \
        shlex.join(["benchmarks/bench_shrink.py", *sys.argv[1:]])
    dense, tok = models.load("smollm2-135m")
    eval_tokens = data.evaluation_tokens(tok)
    if args.timing_only:
        result = json.loads(out.read_text())
        timed = _timing_models(dense, result)
    else:
        result = {
            "command": command,
            "settings": {**vars(args), "torch": torch.__version__, "eval_tokens": int(eval_tokens.numel())},
            "rows": {},
        }
        timed = _quality(dense, tok, eval_tokens, args, result)
    result["timing"] = {
        "command": command, "torch_threads": torch.get_num_threads(),
        "shapes_from": "magnitude-shrunk copies (same shapes as every criterion)" if args.timing_only
        else f"the {args.criteria[0]} rows",
        **{k: getattr(args, k) for k in ("prefill_len", "repeats", "prompt_len", "new_tokens", "decode_repeats")},
        "load_average_start": load_average(), "lock": str(LOCK.relative_to(ROOT)),
    }
    _measure(timed, eval_tokens, args, result["rows"])
    result["timing"]["load_average_end"] = load_average()
    result["timing"]["git_commit"] = git_commit()
    return result


def _log(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _quality(dense, tok, eval_tokens, args, result) -> dict:
    """Perplexity rows for every fraction and criterion; returns the models to time."""
    import tempfile

    import torch

    import sparsecraft as sc
    from sparsecraft import data, models
    from sparsecraft.structured import ShrinkConfig, shrink_

    result["quality_run_load_average"] = {"start": load_average()}
    calib = data.calibration(tok, args.samples, args.seq_len, seed=0)
    rows = result["rows"]
    rows["dense"] = {"fraction": 0.0, "criterion": None, "params": _params(dense),
                     "perplexity": models.perplexity(dense, eval_tokens, 512, progress=False)}
    _log(f"dense: perplexity {rows['dense']['perplexity']:.2f}")
    timed = {"dense": dense}
    for frac in args.fractions:
        for i, criterion in enumerate(args.criteria):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = shrink_(model, ShrinkConfig(mlp=frac, criterion=criterion), calib, progress=False)
            name = f"mlp-{frac:g}-{criterion}"
            rows[name] = {
                "fraction": frac, "criterion": criterion, "params": _params(model),
                "shrink_seconds": time.perf_counter() - start,
                "mlp_channels": report.layers[0].after,
                "perplexity": models.perplexity(model, eval_tokens, 512, progress=False),
            }
            _log(f"{name}: {json.dumps(rows[name])}")
            if i == 0:
                timed[name] = model
            else:
                del model
    # a save/reload round trip of the largest shrink, checked bit for bit
    last = list(timed)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        path = sc.save(timed[last], Path(tmp) / "shrunk", tokenizer=tok)
        reloaded, _ = models.load(str(path))
        ids = calib[:1, :64]
        with torch.inference_mode():
            same = torch.equal(timed[last](ids).logits, reloaded(ids).logits)
        result["reload_identical_logits"] = {last: bool(same)}
        result["checkpoint_bytes"] = {last: (path / "model.safetensors").stat().st_size}
    result["quality_run_load_average"]["end"] = load_average()
    return timed


def _timing_models(dense, result) -> dict:
    """Models with the timed rows' shapes (magnitude needs no calibration; speed is shapes only)."""
    from sparsecraft.structured import ShrinkConfig, shrink_

    timed = {"dense": dense}
    criterion = result["settings"]["criteria"][0]
    for frac in result["settings"]["fractions"]:
        model = copy.deepcopy(dense)
        shrink_(model, ShrinkConfig(mlp=frac), progress=False)
        name = f"mlp-{frac:g}-{criterion}"
        assert result["rows"][name]["params"] == _params(model), name
        timed[name] = model
    return timed


def _measure(timed: dict, eval_tokens, args, rows: dict) -> None:
    """Prefill and decode timings, the models measured in turn inside every repeat."""
    ids = eval_tokens[: args.prefill_len].unsqueeze(0)
    for m in timed.values():
        prefill_seconds(m, ids)  # warm-up
    times = {n: [] for n in timed}
    for _ in range(args.repeats):
        for n, m in timed.items():
            times[n].append(prefill_seconds(m, ids))
    prompt = eval_tokens[: args.prompt_len].unsqueeze(0)
    dec = {n: [] for n in timed}
    for m in timed.values():
        decode_seconds(m, prompt, 4)  # warm-up
    for _ in range(args.decode_repeats):
        for n, m in timed.items():
            seconds, made = decode_seconds(m, prompt, args.new_tokens)
            dec[n].append(seconds)
            rows[n]["greedy_tokens_head"] = made[:8]
    base_prefill = statistics.median(times["dense"])
    base_decode = statistics.median(dec["dense"])
    for n in timed:
        rows[n]["prefill_ms_median"] = 1000 * statistics.median(times[n])
        rows[n]["prefill_ms_min"] = 1000 * min(times[n])
        rows[n]["prefill_ms_all"] = [round(1000 * t, 2) for t in times[n]]
        rows[n]["prefill_speedup"] = base_prefill / statistics.median(times[n])
        rows[n]["decode_tokens_per_s"] = args.new_tokens / statistics.median(dec[n])
        rows[n]["decode_tokens_per_s_all"] = [round(args.new_tokens / t, 2) for t in dec[n]]
        rows[n]["decode_speedup"] = base_decode / statistics.median(dec[n])
        _log(f"{n}: prefill {rows[n]['prefill_ms_median']:.1f} ms ({rows[n]['prefill_speedup']:.2f}x), "
             f"decode {rows[n]['decode_tokens_per_s']:.1f} tok/s ({rows[n]['decode_speedup']:.2f}x)")


def write_table(result: dict, path: Path = RESULTS / "shrink.md") -> str:
    s = result["settings"]
    t = result["timing"]
    rows = result["rows"]
    lines = [
        f"SmolLM2-135M (fp32, CPU, {t['torch_threads']} threads), MLP intermediate channels removed in every "
        f"block (1536 per block before). Calibration {s['samples']} x {s['seq_len']} tokens (Lee corpus); "
        f"perplexity on {s['eval_tokens']} held-out tokens (windows of 512). No fine-tuning after shrinking.",
        "",
        f"Prefill: {t['prefill_len']} tokens, batch 1, KV cache on, last-position logits only; median of "
        f"{t['repeats']} repeats with the models measured in turn (min in brackets). Decode: {t['new_tokens']} "
        f"greedy tokens after a {t['prompt_len']}-token prompt, KV cache, batch 1; median of {t['decode_repeats']} "
        f"runs. Timed: {t['shapes_from']}. Load average {t['load_average_start']} at start, "
        f"{t['load_average_end']} at end (the machine is shared; other jobs ran alongside).",
        "",
        "| model | criterion | MLP channels | parameters | perplexity | prefill (ms) | prefill speed-up | "
        "decode (tok/s) | decode speed-up | shrink time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        timed = "prefill_ms_median" in r
        label = "dense" if name == "dense" else f"MLP -{r['fraction']:.0%}"
        lines.append(
            f"| {label} | {r['criterion'] or '-'} | "
            f"{r.get('mlp_channels', 1536)} | {r['params'] / 1e6:.1f} M | {r['perplexity']:.2f} | "
            + (f"{r['prefill_ms_median']:.1f} ({r['prefill_ms_min']:.1f}) | {r['prefill_speedup']:.2f}x | {r['decode_tokens_per_s']:.1f} | "
               f"{r['decode_speedup']:.2f}x" if timed else "| | |")
            + f" | {r.get('shrink_seconds', 0.0):.1f} |"
        )
    for frac in s["fractions"]:
        by = {r["criterion"]: r["perplexity"] for r in rows.values() if r["fraction"] == frac}
        best = min(by, key=by.get)
        lines.append(f"\nAt {frac:.0%} the lowest perplexity comes from {best} "
                     f"({', '.join(f'{c} {p:.1f}' for c, p in sorted(by.items(), key=lambda kv: kv[1]))}).")
    lines.append(
        "\nMagnitude (L2 norm of a channel's weights) is catastrophic on this model: channels with small "
        "weights carry some of the largest activations (in block 0 the highest-Wanda channels are among the "
        "lowest-norm ones), which Wanda and Taylor see and magnitude cannot.")
    timed_rows = {n: r for n, r in rows.items() if "prefill_speedup" in r and r["fraction"] == 0.5}
    for r in timed_rows.values():
        verdict = "met" if r["prefill_speedup"] >= 1.3 else "missed"
        lines.append(f"\nAim: 50% MLP shrink gives >= 1.3x prefill speed-up: {verdict} "
                     f"({r['prefill_speedup']:.2f}x; decode {r['decode_speedup']:.2f}x).")
    for name, same in result.get("reload_identical_logits", {}).items():
        size = result.get("checkpoint_bytes", {}).get(name)
        lines.append(f"\n`sparsecraft.save` + `models.load` of {name}: identical logits {same}; "
                     f"checkpoint {size / 2**20:.0f} MiB.")
    lines.append(f"\nCommand: `{result['command']}`")
    if t["command"] != result["command"]:
        lines.append(f"\nTimings: `{t['command']}`")
    table = "\n".join(lines) + "\n"
    write_text(path, table)
    return table


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in result["rows"].items() if "prefill_ms_median" in r}
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("prefill_ms_median", "decode_tokens_per_s", "perplexity"),
                              ("prefill 512 tokens (ms)", "decode (tokens/s)", "perplexity")):
        ax.bar(range(len(names)), [rows[n][key] for n in names], color=["gray"] + ["C0"] * (len(names) - 1))
        ax.set_xticks(range(len(names)), [n.replace("-wanda", "").replace("-taylor", "").replace("-magnitude", "")
                                          for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("SmolLM2-135M, MLP channels shrunk (no fine-tuning)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
