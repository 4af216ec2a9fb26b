"""The ``sparsecraft`` command line.

Results go to standard output; diagnostics go through ``logging`` to standard error.
Bad arguments and bad input exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from .cli_args import number_arg, override_arg
from .errors import SparsecraftError

log = logging.getLogger("sparsecraft.cli")

EPILOG_PRUNE = """examples:
  sparsecraft prune smollm2-135m --sparsity 0.5 --out pruned/
  sparsecraft prune smollm2-135m --pattern 2:4 --out pruned-24/
  sparsecraft prune smollm2-135m --method wanda --dsnot --allocation owl \
      --sparsity 0.6 --samples 64 --seq-len 256 --eval --out pruned-wanda/
  sparsecraft prune ./my-hf-model --allocation global --sparsity 0.7 \\
      --exclude 're:.*self_attn.*' --override '*.down_proj.*=0.5' --out pruned/
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


_sparsity_arg = number_arg("sparsity")
_override_arg = override_arg("sparsity")


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 1,512, got '{text}'") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape needs positive sizes, got '{text}'")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparsecraft",
        description="Make neural networks sparse, keep them good, and ship them small.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "prune",
        help="prune a model once and save it compressed",
        description="Prune MODEL (a named model such as smollm2-135m, a Hugging Face folder, "
        "or a sparsecraft checkpoint) and save the result compressed to --out.",
        epilog=EPILOG_PRUNE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="named model (smollm2-135m, minilm-l6) or a folder")
    p.add_argument("--out", required=True, help="output folder (or file ending in .safetensors)")
    p.add_argument("--method", default="magnitude", help="pruning method (default: magnitude)")
    p.add_argument("--sparsity", type=_sparsity_arg, default=None,
                   help="fraction of weights to remove, in [0, 1) (default 0.5; N:M fixes it)")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured | N:M (e.g. 2:4) | block:RxC | rows (default: unstructured)")
    p.add_argument("--allocation", default="uniform", help="uniform | global | erk (default: uniform)")
    p.add_argument("--include", action="append", default=[], metavar="RULE",
                   help="only these parameters (glob or re:regex); repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="RULE",
                   help="skip these parameters (glob or re:regex); repeatable")
    p.add_argument("--override", action="append", default=[], type=_override_arg, metavar="RULE=S",
                   help="pin the sparsity of matching layers; repeatable")
    p.add_argument("--max-sparsity", type=float, default=0.99, help="per-layer cap for global allocation")
    p.add_argument("--fallback", default="error", help="error | skip | unstructured for layers the pattern cannot tile")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods and calibration sampling")
    p.add_argument("--dsnot", action="store_true", help="refine masks with DSnoT (needs calibration)")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text (.txt) or JSONL with a 'text' field; default: built-in Lee corpus")
    p.add_argument("--corpus", default="lee", choices=("lee", "wiki"),
                   help="built-in text for calibration (when no --calib) and for --eval (default: lee)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--eval", action="store_true",
                   help="measure quality before and after on held-out text (perplexity or embedding cosine)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    rr = sub.add_parser("run", help="run a YAML recipe (the same fields as prune's flags)",
                        description="Run a one-shot pruning recipe; see sparsecraft.recipe for the fields.")
    rr.add_argument("recipe", help="YAML file")

    e = sub.add_parser("eval", help="perplexity of a causal LM, or embedding similarity of an encoder",
                       description="Evaluate MODEL on held-out text (built-in Lee corpus evaluation part "
                       "unless --text is given). Encoders are compared with --reference.")
    e.add_argument("model", help="checkpoint folder, Hugging Face folder or named model")
    e.add_argument("--reference", help="dense model to compare an encoder's embeddings with")
    e.add_argument("--text", metavar="FILE", help="evaluation text (.txt or JSONL)")
    e.add_argument("--corpus", default="lee", choices=("lee", "wiki"),
                   help="built-in evaluation text when no --text (default: lee)")
    e.add_argument("--seq-len", type=int, default=512, help="perplexity window (default 512, stride = window)")

    r = sub.add_parser("report", help="per-layer sparsity, size and FLOPs of a model or checkpoint",
                       description="Print a per-layer report of MODEL (checkpoint, folder or named model).")
    r.add_argument("model", help="checkpoint folder, Hugging Face folder or named model")
    r.add_argument("--input-shape", type=_shape_arg, default=None, metavar="SHAPE",
                   help="input shape for FLOPs, e.g. 1,512 (token ids for language models)")
    r.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    r.add_argument("--plot", metavar="FILE", help="also write a PNG plot of per-layer sparsity")

    i = sub.add_parser("info", help="what a saved file holds (header only, fast)",
                       description="Show encoding, pattern, sparsity and size of every tensor in a checkpoint.")
    i.add_argument("path", help="checkpoint folder or .safetensors file")
    i.add_argument("--json", action="store_true", help="print the header as JSON")

    d = sub.add_parser("demo", help="the end-to-end demo on SmolLM2-135M",
                       description="Load SmolLM2-135M, measure perplexity, prune, save, reload, compare.")
    d.add_argument("--out", default="demo_out", help="folder for the demo's files (default: demo_out)")
    d.add_argument("--method", default="sparsegpt", help="pruning method (default: sparsegpt)")
    d.add_argument("--sparsity", type=_sparsity_arg, default=None, help="default 0.5; N:M fixes it")
    d.add_argument("--pattern", default="unstructured")
    d.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    d.add_argument("--no-baseline", action="store_true", help="skip the magnitude baseline row")
    for module_name in COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module_name).register(sub))
    return parser


def _configure_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _cmd_prune(args) -> int:
    from .prune import PruneConfig, default_sparsity
    from .recipe import CalibrationSpec, Recipe, execute

    config = PruneConfig(
        method=args.method,
        sparsity=default_sparsity(args.pattern, args.sparsity),
        pattern=args.pattern,
        allocation=args.allocation,
        targets={"include": args.include, "exclude": args.exclude},
        overrides=dict(args.override),
        max_sparsity=args.max_sparsity,
        fallback=args.fallback,
        seed=args.seed,
        options={"dsnot": True} if args.dsnot else {},
    )
    recipe = Recipe(
        model=args.model, out=args.out, prune=config, evaluate=args.eval, overwrite=args.overwrite,
        calibration=CalibrationSpec(file=args.calib, corpus=args.corpus, samples=args.samples,
                                    seq_len=args.seq_len, seed=args.seed),
    )
    _finish(execute(recipe, progress=not args.quiet), recipe)
    return 0


def _finish(results: dict, recipe) -> None:
    line = (f"pruned {recipe.model} with {recipe.prune.method} ({recipe.prune.pattern_obj}): "
            f"sparsity {results['sparsity']:.4f} in {results['prune_seconds']:.1f} s; saved to {recipe.out}")
    _out(line)
    for key in ("dense", "pruned"):
        if key in results:
            _out(f"  {key}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results[key].items()))


def _cmd_run(args) -> int:
    from .recipe import execute, load_recipe

    recipe = load_recipe(args.recipe)
    _finish(execute(recipe, progress=not args.quiet), recipe)
    return 0


def _cmd_eval(args) -> int:
    from . import data, evaluate, models

    model, tok = models.load(args.model)
    if tok is None:
        raise SparsecraftError(f"'{args.model}' has no tokenizer; evaluation needs one")
    docs = data.load_texts(args.text) if args.text else data.builtin_texts(args.corpus)["evaluation"]
    source = args.text or f"built-in {args.corpus} corpus, evaluation part"
    if evaluate.is_causal_lm(model):
        ppl = evaluate.perplexity(model, data.tokenize(tok, docs), args.seq_len, progress=not args.quiet)
        _out(f"perplexity {ppl:.4f} on {source} (windows of {args.seq_len}, stride {args.seq_len})")
        return 0
    if not args.reference:
        raise SparsecraftError("an encoder is evaluated against a dense model: pass --reference MODEL")
    reference, _ = models.load(args.reference)
    result = evaluate.embedding_similarity(model, reference, tok, evaluate.split_sentences(docs))
    _out(f"embedding cosine similarity to {args.reference}: mean {result['mean_cosine']:.4f}, "
         f"min {result['min_cosine']:.4f} over {result['sentences']} sentences of {source}")
    return 0


def _cmd_report(args) -> int:
    from . import models
    from .report import report

    model, _ = models.load(args.model)
    rep = report(model, input_shape=args.input_shape)
    _out(str(rep))
    if args.json:
        rep.to_json(args.json)
    if args.plot:
        rep.plot(args.plot)
    return 0


def _cmd_info(args) -> int:
    from .checkpoint import tensor_file
    from .formats import read_header

    path = tensor_file(Path(args.path))
    if not path.is_file():
        raise SparsecraftError(f"no checkpoint at '{args.path}'")
    header = read_header(path)
    if args.json:
        _out(json.dumps(header, indent=2, default=str))
        return 0
    tensors = header.get("tensors", {})
    _out(f"{path}  ({path.stat().st_size:,} bytes, format version {header.get('version', '?')})")
    width = max((len(n) for n in tensors), default=4)
    _out(f"{'tensor'.ljust(width)}  {'shape':>14}  {'dtype':>8}  {'encoding':>8}  {'pattern':>12}  {'sparsity':>8}")
    for name, t in tensors.items():
        shape = "x".join(map(str, t.get("shape", [])))
        sparsity = t.get("sparsity")
        _out(
            f"{name.ljust(width)}  {shape:>14}  {str(t.get('dtype', '')):>8}  {t.get('encoding', ''):>8}  "
            f"{str(t.get('pattern', '')):>12}  {'' if sparsity is None else f'{sparsity:.4f}':>8}"
        )
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), method=args.method, sparsity=args.sparsity, pattern=args.pattern,
             calib_samples=args.samples, calib_len=args.seq_len, baseline=not args.no_baseline,
             progress=not args.quiet)
    return 0


COMMANDS = {
    "prune": _cmd_prune, "run": _cmd_run, "eval": _cmd_eval,
    "report": _cmd_report, "info": _cmd_info, "demo": _cmd_demo,
}


# Sub-packages add their own commands: each module has ``register(subparsers)`` returning
# {command: handler}. Keep these modules light: heavy imports belong inside the handlers.
COMMAND_MODULES: list[str] = ["sparsecraft.train.commands", "sparsecraft.structured.commands", "sparsecraft.runtime.commands",
                              "sparsecraft.recovery.commands"]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args)
    try:
        return COMMANDS[args.command](args)
    except SparsecraftError as exc:
        sys.stderr.write(f"sparsecraft {args.command}: error: {' '.join(str(exc).split())}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
