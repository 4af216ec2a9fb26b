"""``sparsecraft compile`` and ``sparsecraft bench`` (registered through cli.COMMAND_MODULES).

This module only builds parsers: torch, transformers and the runtime load inside the
handlers, so ``sparsecraft --help`` stays fast.

* ``compile MODEL``: plan kernels for the sparse Linear layers of MODEL on a prompt of
  ``--prompt-len`` tokens and on one decoded token, and print the plan. With ``--out DIR``
  also save the model (same dense-named, compressed checkpoint as ``prune --out``) plus the
  plan (``runtime_plan.json``); ``sparsecraft.runtime.load_compiled(DIR)`` applies it
  without measuring again.
* ``bench MODEL``: prefill latency (one pass over ``--prompt-len`` tokens) and decode speed
  (batch 1, KV cache, greedy: ``--new-tokens`` tokens, the first from the prefill, then one
  decode step per token) of the dense model, of the planned
  kernels when MODEL has sparse weights, and with activation sparsity (``--act-sparsity``).
"""

from __future__ import annotations

import argparse
import json
import logging

from ..cli_args import add_overwrite, check_output, fraction_arg, int_arg, write_line

log = logging.getLogger("sparsecraft.runtime.commands")

EPILOG_COMPILE = """examples:
  sparsecraft prune smollm2-135m --sparsity 0.9 --include '*.mlp.*' --out mlp90/
  sparsecraft compile mlp90/                    # print the plan
  sparsecraft compile mlp90/ --out mlp90-compiled/
"""

EPILOG_BENCH = """examples:
  sparsecraft bench smollm2-135m --act-sparsity 0.5
  sparsecraft bench mlp90/ --prompt-len 512 --new-tokens 64 --eval
  sparsecraft quantize smollm2-135m --bits 4 --pattern group:16 --sparsity 0.5 --out gqsa/ && sparsecraft bench gqsa/

Llama-family models also get a row for the fused decode step (sparsecraft.runtime.decoder:
static KV cache, one compiled call per token, the quantised kernels for int4/int8 layers); its
perplexity is the dense row's (the same weights; its logits equal the eager model's within 1e-4).
"""


_fraction = fraction_arg("fraction")
# one token comes from the prefill, at least one from a decode step
_new_tokens = int_arg("new-tokens", minimum=2)


def register(subparsers) -> dict:
    c = subparsers.add_parser(
        "compile", help="measure sparse kernels per layer and plan the fastest (never slower than dense)",
        description="Time dense and sparse kernels on the input shapes each sparse Linear layer of MODEL "
        "sees (a prompt and one decoded token), and print the plan. MODEL must be finalised "
        "(a checkpoint from `sparsecraft prune`, a folder, or a named model).",
        epilog=EPILOG_COMPILE, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", help="checkpoint folder, Hugging Face folder or named model")
    c.add_argument("--out", help="also save the model and its plan (runtime_plan.json) to this folder "
                   "(a folder: the plan cannot ride in one .safetensors file)")
    c.add_argument("--prompt-len", type=int_arg("prompt-len"), default=128, help="prompt tokens to plan for (default 128)")
    c.add_argument("--batch", type=int_arg("batch"), default=1, help="batch size to plan for (default 1)")
    c.add_argument("--no-decode", action="store_true", help="plan for the prompt only, not for one decoded token")
    c.add_argument("--min-sparsity", type=_fraction, default=0.5, help="consider layers at least this sparse (default 0.5)")
    c.add_argument("--repeats", type=int_arg("repeats"), default=7, help="timed samples per kernel (default 7)")
    c.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    add_overwrite(c)

    b = subparsers.add_parser(
        "bench", help="prefill latency and decode tokens/s: dense, planned sparse kernels, activation sparsity",
        description="Measure a causal LM: one prefill pass over --prompt-len tokens and --new-tokens greedy "
        "tokens (batch 1, KV cache; decode tokens/s counts the one-token steps after the prefill), dense and "
        "sparse. The prompt is held-out text.",
        epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model", help="checkpoint folder, Hugging Face folder or named model")
    b.add_argument("--act-sparsity", type=_fraction, default=None, metavar="S",
                   help="also measure activation sparsity S (fraction of inputs skipped per layer)")
    b.add_argument("--act-method", choices=("teal", "wina"), default="teal", help="activation scores (default teal)")
    b.add_argument("--prompt-len", type=int_arg("prompt-len"), default=512, help="prompt tokens (default 512)")
    b.add_argument("--new-tokens", type=_new_tokens, default=64, help="tokens to generate greedily (default 64)")
    b.add_argument("--repeats", type=int_arg("repeats"), default=3, help="measurements per configuration; medians (default 3)")
    b.add_argument("--calib-samples", type=int_arg("calib-samples"), default=16, help="calibration windows for thresholds (default 16)")
    b.add_argument("--calib-len", type=int_arg("calib-len"), default=512, help="tokens per calibration window (default 512)")
    b.add_argument("--no-compile", action="store_true", help="skip the kernel planner even if MODEL has sparse weights")
    b.add_argument("--eval", action="store_true", help="also measure perplexity of each configuration (slower)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_overwrite(b)
    return {"compile": _cmd_compile, "bench": _cmd_bench}


def _example_ids(model, tok, length: int, batch: int = 1):
    """A prompt: held-out text when a tokenizer is there (random ids otherwise)."""
    import torch

    from .. import data

    if tok is not None:
        try:
            stream = data.evaluation_tokens(tok)
            if stream.numel() >= length * batch:
                return stream[: length * batch].reshape(batch, length)
        except Exception as exc:  # no corpus installed: shapes are what matters here
            log.info("no held-out text (%s); using random token ids", exc)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _cmd_compile(args) -> int:
    from .. import models
    from ..checkpoint import save
    from ..errors import ConfigError
    from ..formats.io import atomic_write
    from ..outputs import MARKER, marker_text
    from . import PLAN_FILE, compile_

    # outputs are checked before the model loads
    json_out = None if args.json is None else check_output(args.json, overwrite=args.overwrite,
                                                           flag="--json", kind="file")
    out = None
    if args.out is not None:
        if args.out.endswith(".safetensors"):
            raise ConfigError(f"--out '{args.out}': compile saves a folder (model + {PLAN_FILE}); "
                              f"give a folder name")
        out = check_output(args.out, overwrite=args.overwrite, kind="folder")
    model, tok = models.load(args.model)
    ids = _example_ids(model, tok, args.prompt_len, args.batch)
    inputs = [ids] if args.no_decode else [ids, ids[:, :1]]
    report = compile_(model, *inputs, min_sparsity=args.min_sparsity, repeats=args.repeats)
    write_line(str(report))
    if not report.layers:
        write_line(f"no Linear layer of {args.model} is at least {args.min_sparsity:g} sparse: nothing to compile")
    if json_out is not None:
        atomic_write(json_out, lambda tmp: tmp.write_text(report.to_json() + "\n"))
    if out is not None:
        # the checkpoint speaks dense names (SparseLinear's state dict), the plan rides beside it
        save(model, out, overwrite=args.overwrite, tokenizer=tok,
             extra_files={PLAN_FILE: report.to_json() + "\n", MARKER: marker_text("compile")})
        write_line(f"saved model and plan to {args.out} (load with sparsecraft.runtime.load_compiled)")
    return 0


def _measure(model, ids, new_tokens: int, repeats: int) -> dict:
    from .timing import greedy_decode, prefill_seconds

    prefill = prefill_seconds(model, ids, repeats=repeats)
    runs = [greedy_decode(model, ids[:1], new_tokens) for _ in range(repeats)]
    rates = sorted(r.tokens_per_second for r in runs)
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": rates[len(rates) // 2], "tokens": runs[0].tokens}


def _measure_decoder(dec, ids, new_tokens: int, repeats: int) -> dict:
    """:func:`_measure` for a :func:`~sparsecraft.runtime.decode.decoder`: its prefill (the
    model's own pass plus filling the static cache) and its decode steps, medians."""
    runs = [dec.generate(ids[:1], new_tokens) for _ in range(repeats)]
    rates = sorted(r.tokens_per_second for r in runs)
    prefills = sorted(r.prefill_seconds for r in runs)
    return {"prefill_ms": prefills[len(prefills) // 2] * 1e3, "decode_tok_s": rates[len(rates) // 2],
            "tokens": runs[0].tokens}


def _perplexity(model, tok) -> float:
    from .. import data, evaluate

    return evaluate.perplexity(model, data.evaluation_tokens(tok), 512, progress=False)


def _cmd_bench(args) -> int:
    import torch

    from .. import data, evaluate, models
    from ..errors import SparsecraftError
    from ..formats.io import atomic_write
    from . import compile_, sparsify_activations_
    from .decode import decoder

    json_out = None if args.json is None else check_output(args.json, overwrite=args.overwrite,
                                                           flag="--json", kind="file")
    model, tok = models.load(args.model)
    if not evaluate.is_causal_lm(model):
        raise SparsecraftError(f"bench measures causal language models; '{args.model}' is {type(model).__name__}")
    if args.eval and tok is None:
        raise SparsecraftError(f"'{args.model}' has no tokenizer; --eval needs one")
    ids = _example_ids(model, tok, args.prompt_len)
    rows: dict[str, dict] = {}

    def run(name: str, before_eval=None, after_eval=None, measure=None, same_model_as=None) -> None:
        r = (measure or _measure)(model, ids, args.new_tokens, args.repeats)
        if args.eval and same_model_as is not None:  # the same weights, computed another way
            r["perplexity"] = rows[same_model_as]["perplexity"]
        elif args.eval:
            if before_eval:
                before_eval()
            r["perplexity"] = _perplexity(model, tok)
            if after_eval:
                after_eval()
        dense = rows.get("dense")
        if dense is not None:
            r["same_tokens"] = sum(a == b for a, b in zip(r["tokens"], dense["tokens"]))
        rows[name] = r
        log.info("%s: %s", name, {k: v for k, v in r.items() if k != "tokens"})

    run("dense")
    fused = decoder(model)  # Llama-family models: the fused decode step (the log says why not)
    if fused.fast:
        run(f"fused decode step ({fused.backend})", measure=lambda m, i, n, k: _measure_decoder(fused, i, n, k),
            same_model_as="dense")
    if not args.no_compile:
        report = compile_(model, ids, ids[:, :1])
        if report.plan():
            write_line(str(report).splitlines()[-1])
            run(f"planned kernels ({len(report.plan())} layers)")
        elif report.layers:
            write_line("planner: no sparse kernel beat dense by the margin; model left dense")
    if args.act_sparsity is not None:
        calib = (data.calibration(tok, args.calib_samples, args.calib_len, seed=0) if tok is not None
                 else torch.randint(0, model.config.vocab_size, (args.calib_samples, args.calib_len)))
        handle = sparsify_activations_(model, calib, args.act_sparsity, args.act_method)
        # timed with dense prefill; perplexity with every token sparsified, as if decoded
        run(f"activation sparsity {args.act_sparsity:g} ({args.act_method}, {handle.kernel})",
            before_eval=lambda: handle.set_mode(prefill="masked"),
            after_eval=lambda: handle.set_mode(prefill="dense"))
        handle.remove()

    write_line(f"{args.model}: prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens (batch 1, greedy, KV cache), "
         f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    head = f"{'configuration':<44} {'prefill ms':>10} {'decode tok/s':>12} {'decode x':>8}"
    head += f" {'same tokens':>11}" + (f" {'perplexity':>10}" if args.eval else "")
    write_line(head)
    base = rows["dense"]["decode_tok_s"]
    for name, r in rows.items():
        line = (f"{name:<44} {r['prefill_ms']:>10.1f} {r['decode_tok_s']:>12.2f} {r['decode_tok_s'] / base:>7.2f}x"
                f" {str(r.get('same_tokens', '-')) + '/' + str(len(r['tokens'])):>11}")
        if args.eval:
            line += f" {r['perplexity']:>10.2f}"
        write_line(line)
    if json_out is not None:
        text = json.dumps({"model": args.model, "threads": torch.get_num_threads(), "prompt_len": ids.shape[1],
                           "new_tokens": args.new_tokens, "rows": rows}, indent=1) + "\n"
        atomic_write(json_out, lambda tmp: tmp.write_text(text))
    return 0
