"""``sparsecraft prune``, ``quantize`` and ``run`` (registered through ``cli.COMMAND_MODULES``).

Each builds a :class:`~sparsecraft.recipe.Recipe` (validated: config, method, calibration,
output path) and hands it to :func:`sparsecraft.recipe.execute`, which checks the output
path before it loads the model. ``quantize`` is ``prune`` with a quantising method (``gptq``
or ``rtn``) and no sparsity unless a pattern asks for one.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment), they join the process
group (:func:`sparsecraft.distributed.init_from_env`, gloo on CPU), split the calibration over
the processes, and only rank 0 logs below errors, shows progress, prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

from ..cli_args import (
    add_format,
    add_overwrite,
    assignment_arg,
    check_output,
    int_arg,
    number_arg,
    override_arg,
    write_line,
)

EPILOG_PRUNE = """examples:
  sparsecraft prune smollm2-135m --sparsity 0.5 --out pruned/
  sparsecraft prune smollm2-135m --pattern 2:4 --out pruned-24/
  sparsecraft prune smollm2-135m --method wanda --dsnot --allocation owl \\
      --sparsity 0.6 --samples 64 --seq-len 256 --eval --out pruned-wanda/
  sparsecraft prune ./my-hf-model --allocation global --sparsity 0.7 \\
      --exclude 're:.*self_attn.*' --override '*.down_proj.*=0.5' --out pruned/
  sparsecraft prune smollm2-135m --sparsity 0.5 --out pruned.safetensors   # one file, tensors only
  sparsecraft prune smollm2-135m --method admm --pattern 2:4 --reconstruct --eval --out pruned-admm/
  sparsecraft prune smollm2-135m --method sparsegpt --pattern 2:4 --learn-mask --reconstruct \
      --option 'reconstruct={lr: 1e-3, epochs: 3}' --out pruned-learned/
  sparsecraft prune smollm2-135m --method wanda --format dense-hf --out pruned-hf/   # for transformers
  torchrun --nproc-per-node 2 -m sparsecraft prune smollm2-135m --method sparsegpt --out pruned/
  sparsecraft prune ./llama-7b --method sparsegpt --samples 32 --out llama-7b-50/   # block by block
  sparsecraft prune ./llama-7b --method sparsegpt --samples 32 --out llama-7b-50/   # again: resumes
  sparsecraft prune smollm2-135m --method sparsegpt --pattern 2:4 --quantize int4 --group 64 --out w4-24/

A Hugging Face folder with safetensors weights (model.safetensors, or an index and shards) is
pruned block by block: only one block is in memory at a time, weights keep their dtype
(bf16 stays bf16), and the output (a sharded checkpoint) appears when the last block is
written. An interrupted run leaves .OUT.partial beside OUT; the same command resumes it.
--eval, --distill, a .safetensors output and the allocations global and owl need the whole
model: then the folder is loaded whole (--stream makes that an error, --no-stream forces it).
"""

EPILOG_QUANTIZE = """examples:
  sparsecraft quantize smollm2-135m --bits 4 --group 64 --out w4/                  # GPTQ
  sparsecraft quantize smollm2-135m --bits 8 --group 64 --method rtn --out w8/     # no calibration
  sparsecraft quantize smollm2-135m --bits 4 --group 64 --pattern group:16 --sparsity 0.5 \
      --reconstruct --eval --out gqsa/                                              # GQSA
"""


def known_allocations() -> tuple[str, ...]:
    """Allocation names PruneConfig accepts: the allocation registry plus OWL (which the
    calibrated driver computes; a no-op once OWL is in the registry)."""
    from ..allocation import ALLOCATIONS

    return tuple(ALLOCATIONS) + tuple(a for a in ("owl",) if a not in ALLOCATIONS)


def register(sub) -> dict:
    from ..criteria import method_names

    p = sub.add_parser(
        "prune",
        help="prune a model once and save it compressed",
        description="Prune MODEL (a named model such as smollm2-135m, a Hugging Face folder, "
        "or a sparsecraft checkpoint) and save the result compressed to --out.",
        epilog=EPILOG_PRUNE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="named model (smollm2-135m, minilm-l6) or a folder")
    p.add_argument("--out", required=True,
                   help="output folder, or one file ending in .safetensors (model only: no tokenizer "
                        "or results file)")
    p.add_argument("--method", default="magnitude",
                   help=f"{' | '.join(method_names())} (default: magnitude)")
    p.add_argument("--sparsity", type=number_arg("sparsity"), default=None,
                   help="fraction of weights to remove, in [0, 1) (default 0.5; N:M fixes it)")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured | N:M (e.g. 2:4) | block:RxC | group:G (e.g. group:16) | rows "
                        "(default: unstructured)")
    p.add_argument("--allocation", default="uniform",
                   help=f"{' | '.join(known_allocations())} (default: uniform)")
    p.add_argument("--include", action="append", default=[], metavar="RULE",
                   help="only these parameters (glob or re:regex); repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="RULE",
                   help="skip these parameters (glob or re:regex); repeatable")
    p.add_argument("--override", action="append", default=[], type=override_arg("sparsity"), metavar="RULE=S",
                   help="pin the sparsity of matching layers; repeatable")
    p.add_argument("--max-sparsity", type=number_arg("max sparsity", minimum=0.0, exclusive=True, below=1.0), default=0.99,
                   help="per-layer cap for global allocation")
    p.add_argument("--fallback", default="error", help="error | skip | unstructured for layers the pattern cannot tile")
    p.add_argument("--seed", type=int_arg("seed", minimum=0), default=0,
                   help="seed for random methods and calibration sampling")
    p.add_argument("--dsnot", action="store_true", help="refine masks with DSnoT (needs calibration)")
    p.add_argument("--sequential", action="store_true",
                   help="prune the layers of a block in order, each from the outputs of the pruned ones before it")
    p.add_argument("--reconstruct", action="store_true",
                   help="after each block is pruned, tune its kept weights to the dense block's output "
                        "(masks fixed; one calibration batch held out for early stopping)")
    p.add_argument("--learn-mask", action="store_true",
                   help="learn N:M masks per block from the method's masks (needs --reconstruct)")
    p.add_argument("--distill", action="store_true",
                   help="after pruning, fine-tune the whole model towards the dense one on the calibration text "
                        "(KL of next-token distributions, masks kept, held-out samples keep the best weights)")
    p.add_argument("--quantize", default=None, metavar="int4|int8",
                   help="also quantise the kept weights (methods sparsegpt, gptq, rtn): int4 | int8")
    _add_quant_args(p)
    _add_run_args(p)

    q = sub.add_parser(
        "quantize",
        help="quantise a model (int4 / int8 groups; GPTQ or round to nearest) and save it",
        description="Quantise the Linear layers of MODEL (and its token embedding, with a head tied to it) "
        "to int4 or int8 with one float16 grid per group of --group input weights, and save it compressed "
        "to --out. gptq compensates the rounding error with calibration data; rtn rounds to nearest. "
        "With --pattern (N:M or group:G) and --sparsity it prunes and quantises jointly.",
        epilog=EPILOG_QUANTIZE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("model", help="named model (smollm2-135m) or a folder")
    q.add_argument("--out", required=True, help="output folder, or one file ending in .safetensors")
    q.add_argument("--bits", type=int_arg("bits"), default=4, help="4 or 8 (default 4)")
    q.add_argument("--method", default="gptq", help="gptq | rtn (default: gptq, needs calibration)")
    q.add_argument("--pattern", default="unstructured",
                   help="prune jointly: N:M (e.g. 2:4) or group:G (e.g. group:16) (default: no pruning)")
    q.add_argument("--sparsity", type=number_arg("sparsity"), default=None,
                   help="fraction to prune with --pattern group:G or unstructured (default 0; N:M fixes it)")
    q.add_argument("--include", action="append", default=[], metavar="RULE",
                   help="only these parameters (glob or re:regex); repeatable")
    q.add_argument("--exclude", action="append", default=[], metavar="RULE",
                   help="skip these parameters (glob or re:regex); repeatable")
    q.add_argument("--seed", type=int_arg("seed", minimum=0), default=0, help="seed for calibration sampling")
    q.add_argument("--sequential", action="store_true",
                   help="quantise the layers of a block in order, each from the outputs of the quantised ones before it")
    q.add_argument("--reconstruct", action="store_true",
                   help="after each block, tune its grids (scales) to the dense block's output; codes and masks fixed")
    _add_quant_args(q)
    _add_run_args(q)

    r = sub.add_parser("run", help="run a YAML recipe (the same fields as prune's flags)",
                       description="Run a one-shot pruning recipe; see sparsecraft.recipe for the fields. "
                       "The recipe's 'overwrite' or --overwrite allows replacing its 'out'.")
    r.add_argument("recipe", help="YAML file")
    add_overwrite(r)
    return {"prune": cmd_prune, "quantize": cmd_quantize, "run": cmd_run}


def _add_quant_args(p) -> None:
    p.add_argument("--group", type=int_arg("group"), default=None,
                   help="weights per quantisation grid along the input: 32 | 64 | 128 (default 64)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric grids (min/max) instead of symmetric")
    emb = p.add_mutually_exclusive_group()
    emb.add_argument("--no-embeddings", action="store_true",
                     help="leave the token embedding (and a head tied to it) unquantised")
    emb.add_argument("--embeddings", choices=["int4", "int8"], default=None,
                     help="quantise the token embedding (and a tied head) with these bits (default: as the layers)")


def _add_run_args(p) -> None:
    """Options, calibration, evaluation and overwriting: shared by prune and quantize."""
    p.add_argument("--option", action="append", default=[], type=assignment_arg, metavar="KEY=VALUE",
                   help="a setting of the method, allocation, driver or a stage (YAML value), e.g. "
                        "rho=0.2, blocksize=64, 'reconstruct={lr: 1e-3, epochs: 2}'; repeatable")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text (.txt) or JSONL with a 'text' field; default: built-in Lee corpus")
    p.add_argument("--corpus", default="lee", choices=("lee", "wiki"),
                   help="built-in text for calibration (when no --calib) and for --eval (default: lee)")
    p.add_argument("--samples", type=int_arg("samples"), default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int_arg("seq-len"), default=512,
                   help="tokens per calibration sample (default 512)")
    p.add_argument("--eval", action="store_true",
                   help="measure quality before and after on held-out text (perplexity or embedding cosine)")
    add_format(p)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="prune a Hugging Face safetensors folder block by block (default: when the run allows it)")
    p.add_argument("--no-resume", action="store_true",
                   help="a streamed run starts over instead of continuing an interrupted one (.OUT.partial)")
    add_overwrite(p)


@contextlib.contextmanager
def distributed_run(args):
    """Under torchrun: join the process group for the command, quiet every rank but 0; yields
    whether this process is the one that prints."""
    from ..distributed import init_from_env, shutdown

    ranks = init_from_env()
    try:
        if ranks is not None and not ranks.main:  # rank 0 speaks for all
            import transformers

            logging.getLogger().setLevel(logging.ERROR)
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
            args.quiet = True  # and no progress bars of ours
        yield ranks is None or ranks.main
    finally:
        shutdown()


def _finish(results: dict, recipe) -> None:
    how = ""
    if results.get("streamed"):
        how = f" block by block ({results['blocks']} blocks" + (
            f", resumed at block {results['resumed_from']})" if results.get("resumed_from") else ")")
    quant = recipe.prune.solver().quantization()
    if quant is None:
        write_line(f"pruned {recipe.model} with {recipe.prune.method} ({recipe.prune.pattern_obj}){how}: "
                   f"sparsity {results['sparsity']:.4f} in {results['prune_seconds']:.1f} s; saved to {recipe.out}")
    else:
        write_line(f"quantised {recipe.model} with {recipe.prune.method} ({quant.spec()}, {recipe.prune.pattern_obj}): "
                   f"sparsity {results['sparsity']:.4f} in {results['prune_seconds']:.1f} s; model "
                   f"{results['model_bytes']:,} bytes, {results['model_bytes'] / results['fp32_bytes']:.3f} of "
                   f"float32; saved to {recipe.out}")
    if "processes" in results:
        write_line(f"  calibration split over {results['processes']} processes")
    for key in ("dense", "pruned"):
        if key in results:
            write_line(f"  {key}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in results[key].items()))


def _options(args) -> dict:
    """``--option KEY=VALUE`` settings plus the switches and values that stand for options."""
    from ..yaml_io import load_yaml

    options = {key: load_yaml(value, f"--option {key}") for key, value in args.option}
    for name in ("dsnot", "sequential", "reconstruct", "learn_mask", "distill"):
        if getattr(args, name, False):
            options.setdefault(name, True)
    for key, value in (("quantize", getattr(args, "quantize", None)), ("group", args.group),
                       ("symmetric", False if args.asymmetric else None),
                       ("embeddings", False if args.no_embeddings else args.embeddings)):
        if value is not None:
            options.setdefault(key, value)
    return options


def cmd_prune(args) -> int:
    from ..prune import PruneConfig, default_sparsity
    from ..recipe import CalibrationSpec, Recipe, execute

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
        options=_options(args),
    )
    recipe = Recipe(
        model=args.model, out=args.out, prune=config, evaluate=args.eval, overwrite=args.overwrite,
        stream=args.stream, resume=not args.no_resume,
        calibration=CalibrationSpec(file=args.calib, corpus=args.corpus, samples=args.samples,
                                    seq_len=args.seq_len, seed=args.seed),
        format=args.format,
    )
    check_output(args.out, overwrite=args.overwrite, kind="model")  # execute checks again, as 'out'
    with distributed_run(args) as main:
        results = execute(recipe, progress=not args.quiet)
        if main:
            _finish(results, recipe)
    return 0


cmd_prune.distributed = True  # type: ignore[attr-defined]  # see cli._dispatch


def cmd_quantize(args) -> int:
    from ..errors import ConfigError
    from ..prune import PruneConfig, default_sparsity, method_default_sparsity
    from ..recipe import CalibrationSpec, Recipe, execute

    if args.method not in ("gptq", "rtn"):
        raise ConfigError(f"quantize --method must be gptq or rtn, got '{args.method}' (other methods quantise "
                          f"with: sparsecraft prune --method M --quantize int4)")
    if args.bits not in (4, 8):
        raise ConfigError(f"quantize --bits must be 4 or 8, got {args.bits} (int{args.bits} is not supported)")
    options = _options(args)
    options.setdefault("quantize", f"int{args.bits}")
    sparsity = default_sparsity(args.pattern, args.sparsity, default=method_default_sparsity(args.method))
    config = PruneConfig(method=args.method, sparsity=sparsity, pattern=args.pattern,
                         targets={"include": args.include, "exclude": args.exclude}, seed=args.seed, options=options)
    recipe = Recipe(
        model=args.model, out=args.out, prune=config, evaluate=args.eval, overwrite=args.overwrite,
        stream=args.stream, resume=not args.no_resume,
        calibration=CalibrationSpec(file=args.calib, corpus=args.corpus, samples=args.samples,
                                    seq_len=args.seq_len, seed=args.seed),
        format=args.format,
    )
    check_output(args.out, overwrite=args.overwrite, kind="model")
    _finish(execute(recipe, progress=not args.quiet), recipe)
    return 0


def cmd_run(args) -> int:
    import dataclasses

    from ..recipe import execute, load_recipe

    recipe = load_recipe(args.recipe)
    if args.overwrite:
        recipe = dataclasses.replace(recipe, overwrite=True)
    with distributed_run(args) as main:
        results = execute(recipe, progress=not args.quiet)
        if main:
            _finish(results, recipe)
    return 0


cmd_run.distributed = True  # type: ignore[attr-defined]
