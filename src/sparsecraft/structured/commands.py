"""The ``sparsecraft shrink`` command (registered through ``cli.COMMAND_MODULES``).

Light on imports on purpose: the CLI imports this module to build its parser; torch,
transformers and the shrinking code load inside the handler.
"""

from __future__ import annotations

import argparse

from ..cli_args import add_format, add_overwrite, check_output, int_arg, number_arg, override_arg, write_line
from .config import CRITERIA

EPILOG = """examples:
  sparsecraft shrink smollm2-135m --mlp 0.3 --out shrunk/
  sparsecraft shrink smollm2-135m --mlp 0.5 --heads 0.33 --criterion wanda \\
      --samples 32 --seq-len 512 --eval --out shrunk-wanda/
  sparsecraft shrink minilm-l6 --heads 0.25 --mlp 0.25 --eval --out minilm-small/
  sparsecraft shrink ./my-hf-model --mlp 0.5 --override 'model.layers.0.*=0' --out shrunk/
  sparsecraft shrink ./llama-7b --mlp 0.3 --out llama-7b-shrunk/   # block by block; again: resumes

A Hugging Face folder with safetensors weights is shrunk block by block (magnitude and wanda):
one block in memory at a time, the output (a sharded checkpoint) appears when the last block
is written, an interrupted run resumes from .OUT.partial. --eval, a .safetensors output,
--format dense-hf and the criteria taylor/lrp-* need the whole model: then it loads whole
(--stream makes that an error, --no-stream forces it).

--heads removes whole key/value groups under GQA (with all their query heads);
--query-heads removes the same number of query heads inside every group.
"""


_fraction = number_arg("fraction")
_override = override_arg("fraction")


def register(subparsers) -> dict:
    p = subparsers.add_parser(
        "shrink",
        help="remove whole MLP channels / attention heads / conv filters; tensors get smaller",
        description="Shrink MODEL structurally (named model, Hugging Face folder or sparsecraft "
        "checkpoint) and save it to --out; sparsecraft.load and `sparsecraft eval` reopen it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="named model (smollm2-135m, minilm-l6) or a folder")
    p.add_argument("--out", required=True,
                   help="output folder, or one file ending in .safetensors (tensors and shapes only)")
    p.add_argument("--mlp", type=_fraction, default=0.0, help="fraction of MLP channels to remove per block")
    p.add_argument("--heads", type=_fraction, default=0.0,
                   help="fraction of attention heads to remove per block (k/v groups under GQA)")
    p.add_argument("--query-heads", type=_fraction, default=0.0,
                   help="fraction of query heads to remove inside every k/v group (GQA only)")
    p.add_argument("--criterion", default="magnitude", choices=CRITERIA,
                   help="unit importance (default: magnitude; wanda and taylor use calibration text; "
                        "lrp-epsilon/lrp-zplus need a Linear/Conv/ReLU network, not a transformer)")
    p.add_argument("--override", action="append", default=[], type=_override, metavar="RULE=F",
                   help="fraction for layers matching RULE (glob or re:, on e.g. model.layers.0.mlp); repeatable")
    p.add_argument("--round-to", type=int_arg("round-to"), default=1, help="keep a multiple of this many MLP channels")
    p.add_argument("--calib", metavar="FILE", default=None, help="calibration text (.txt or JSONL with 'text')")
    p.add_argument("--corpus", default="lee", choices=("lee", "wiki"),
                   help="built-in text for calibration (when no --calib) and for --eval (default: lee)")
    p.add_argument("--samples", type=int_arg("samples"), default=32, help="calibration samples (default 32)")
    p.add_argument("--seq-len", type=int_arg("seq-len"), default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--batch-size", type=int_arg("batch-size"), default=4, help="calibration samples per forward pass (default 4)")
    p.add_argument("--seed", type=int_arg("seed", minimum=0), default=0, help="seed for calibration sampling")
    p.add_argument("--eval", action="store_true",
                   help="quality before and after on held-out text (perplexity or embedding cosine)")
    add_format(p)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="shrink a Hugging Face safetensors folder block by block (default: when the run allows it)")
    p.add_argument("--no-resume", action="store_true",
                   help="a streamed run starts over instead of continuing an interrupted one (.OUT.partial)")
    add_overwrite(p)
    return {"shrink": run}


def _stream_obstacle(args) -> str | None:
    """Why this shrink cannot run block by block, or None when it can."""
    from ..streaming import whole_model_reason
    from .stream import STREAMABLE_CRITERIA

    why = whole_model_reason(args.model, args.out, args.eval, args.format)
    if why is not None:
        return why
    if args.criterion not in STREAMABLE_CRITERIA:
        return f"criterion {args.criterion} needs the whole model"
    return None


def _streams(args) -> bool:
    import logging

    from ..errors import ConfigError

    if args.stream is False:
        return False
    why = _stream_obstacle(args)
    if why is None:
        return True
    if args.stream:
        raise ConfigError(f"--stream: cannot shrink '{args.model}' block by block: {why}")
    if "safetensors weights" not in why:
        logging.getLogger("sparsecraft.cli").info("loading the whole model: %s", why)
    return False


def _quality(model, tok, reference, docs) -> dict:
    from .. import data, evaluate

    if evaluate.is_causal_lm(model):
        return {"perplexity": evaluate.perplexity(model, data.tokenize(tok, docs), 512, progress=False)}
    return evaluate.embedding_similarity(model, reference, tok, evaluate.split_sentences(docs))


def run(args) -> int:
    import copy
    import json
    import logging
    import time

    from .. import data, evaluate, models
    from ..checkpoint import save
    from ..outputs import MARKER, marker_text
    from ..recipe import CalibrationSpec, build_calibration, check_format
    from .config import ShrinkConfig
    from .shrink import shrink_

    log = logging.getLogger("sparsecraft.cli")
    # everything the user typed is checked before the model loads
    config = ShrinkConfig(mlp=args.mlp, heads=args.heads, query_heads=args.query_heads,
                          criterion=args.criterion, overrides=dict(args.override),
                          round_to=args.round_to, batch_size=args.batch_size)
    spec = CalibrationSpec(file=args.calib, corpus=args.corpus, samples=args.samples,
                           seq_len=args.seq_len, seed=args.seed)
    check_format(args.format, args.out)
    out = check_output(args.out, overwrite=args.overwrite, kind="model")

    if _streams(args):
        return _run_streamed(args, config, spec, out)
    start = time.perf_counter()
    model, tok = models.load(args.model)
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - start)
    results: dict = {"model": args.model, "shrink": config.to_dict()}
    calibration = None
    if config.needs_calibration:
        calibration, results["calibration"] = build_calibration(spec, tok, args.model)
    eval_docs = data.builtin_texts(args.corpus)["evaluation"] if args.eval and tok is not None else None
    if args.eval and tok is None:
        log.warning("'%s' has no tokenizer; --eval skipped", args.model)
    reference = None
    if eval_docs is not None:
        reference = None if evaluate.is_causal_lm(model) else copy.deepcopy(model)
        results["dense"] = _quality(model, tok, reference, eval_docs)

    start = time.perf_counter()
    rep = shrink_(model, config, calibration, progress=not args.quiet)
    results["shrink_seconds"] = time.perf_counter() - start
    results["report"] = rep.to_dict()
    if eval_docs is not None:
        results["shrunk"] = _quality(model, tok, reference, eval_docs)
    save(model, out, overwrite=args.overwrite, tokenizer=tok, format=args.format,
         extra_files=None if out.suffix == ".safetensors" else
         {"shrink_results.json": json.dumps(results, indent=2) + "\n", MARKER: marker_text("shrink")})

    write_line(str(rep))
    write_line(f"shrunk {args.model} with {config.criterion} in {results['shrink_seconds']:.1f} s: "
         f"{rep.params_before:,} -> {rep.params_after:,} parameters; saved to {out}")
    for key in ("dense", "shrunk"):
        if key in results:
            write_line(f"  {key}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in results[key].items()))
    return 0


def _run_streamed(args, config, spec, out) -> int:
    """``run`` for a Hugging Face folder, block by block (:func:`.stream.shrink_pretrained`);
    the results file holds nothing that changes from run to run, so a resumed run writes the
    same bytes."""
    import json
    import time
    from pathlib import Path

    from ..models import _local_tokenizer, _offline
    from ..outputs import MARKER, marker_text
    from ..recipe import build_calibration
    from .stream import shrink_pretrained

    results: dict = {"model": args.model, "shrink": config.to_dict(), "streamed": True}
    calibration = None
    if config.needs_calibration:
        _offline()
        calibration, results["calibration"] = build_calibration(spec, _local_tokenizer(Path(args.model)), args.model)
    start = time.perf_counter()

    def files(rep) -> dict[str, str]:  # nothing that changes from run to run (no timings)
        return {"shrink_results.json": json.dumps({**results, "report": rep.to_dict()}, indent=2) + "\n",
                MARKER: marker_text("shrink")}

    rep = shrink_pretrained(args.model, config, calibration, out, overwrite=args.overwrite,
                            resume=not args.no_resume, extra_files=files, progress=not args.quiet)
    seconds = time.perf_counter() - start
    write_line(str(rep))
    write_line(f"shrunk {args.model} with {config.criterion} block by block in {seconds:.1f} s: "
               f"{rep.params_before:,} -> {rep.params_after:,} parameters; saved to {out}")
    return 0

