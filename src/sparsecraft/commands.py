"""``sparsecraft eval``, ``report``, ``info`` and ``demo`` (registered through ``cli.COMMAND_MODULES``).

Light on imports: the CLI imports this module to build its parser; models, data and the
report load inside the handlers.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli_args import add_overwrite, check_output, int_arg, number_arg, shape_arg, write_line

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def register(sub) -> dict:
    from .criteria import method_names

    e = sub.add_parser("eval", help="perplexity of a causal LM, or embedding similarity of an encoder",
                       description="Evaluate MODEL on held-out text (built-in Lee corpus evaluation part "
                       "unless --text is given). Encoders are compared with --reference.")
    e.add_argument("model", help="checkpoint folder, Hugging Face folder or named model")
    e.add_argument("--reference", help="dense model to compare an encoder's embeddings with")
    e.add_argument("--text", metavar="FILE", help="evaluation text (.txt or JSONL)")
    e.add_argument("--corpus", default="lee", choices=("lee", "wiki"),
                   help="built-in evaluation text when no --text (default: lee)")
    e.add_argument("--seq-len", type=int_arg("seq-len", minimum=2), default=512,
                   help="perplexity window (default 512, stride = window)")

    r = sub.add_parser("report", help="per-layer sparsity, size and FLOPs of a model or checkpoint",
                       description="Print a per-layer report of MODEL (checkpoint, folder or named model).")
    r.add_argument("model", help="checkpoint folder, Hugging Face folder or named model")
    r.add_argument("--input-shape", type=shape_arg, default=None, metavar="SHAPE",
                   help="input shape for FLOPs, e.g. 1,512 (token ids for language models)")
    r.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    r.add_argument("--plot", metavar="FILE", help=f"also write a plot of per-layer sparsity ({', '.join(PLOT_SUFFIXES)})")
    add_overwrite(r)

    i = sub.add_parser("info", help="what a saved file holds (header only, fast)",
                       description="Show encoding, pattern, sparsity and size of every tensor in a checkpoint.")
    i.add_argument("path", help="checkpoint folder or .safetensors file")
    i.add_argument("--json", action="store_true", help="print the header as JSON")

    d = sub.add_parser("demo", help="the end-to-end demo on SmolLM2-135M",
                       description="Load SmolLM2-135M, measure perplexity, prune, save, reload, compare.")
    d.add_argument("--out", default="demo_out", help="folder for the demo's files (default: demo_out)")
    d.add_argument("--method", default="sparsegpt",
                   help=f"{' | '.join(method_names())} (default: sparsegpt)")
    d.add_argument("--sparsity", type=number_arg("sparsity"), default=None, help="default 0.5; N:M fixes it")
    d.add_argument("--pattern", default="unstructured")
    d.add_argument("--samples", type=int_arg("samples"), default=32, help="calibration samples (default 32)")
    d.add_argument("--seq-len", type=int_arg("seq-len"), default=256,
                   help="tokens per calibration sample (default 256)")
    d.add_argument("--no-baseline", action="store_true", help="skip the magnitude baseline row")
    add_overwrite(d)
    return {"eval": cmd_eval, "report": cmd_report, "info": cmd_info, "demo": cmd_demo}


def cmd_eval(args) -> int:
    from . import data, evaluate, models
    from .errors import SparsecraftError

    model, tok = models.load(args.model)
    if tok is None:
        raise SparsecraftError(f"'{args.model}' has no tokenizer; evaluation needs one")
    docs = data.load_texts(args.text) if args.text else data.builtin_texts(args.corpus)["evaluation"]
    source = args.text or f"built-in {args.corpus} corpus, evaluation part"
    if evaluate.is_causal_lm(model):
        ppl = evaluate.perplexity(model, data.tokenize(tok, docs), args.seq_len, progress=not args.quiet)
        write_line(f"perplexity {ppl:.4f} on {source} (windows of {args.seq_len}, stride {args.seq_len})")
        return 0
    if not args.reference:
        raise SparsecraftError("an encoder is evaluated against a dense model: pass --reference MODEL")
    reference, _ = models.load(args.reference)
    result = evaluate.embedding_similarity(model, reference, tok, evaluate.split_sentences(docs))
    write_line(f"embedding cosine similarity to {args.reference}: mean {result['mean_cosine']:.4f}, "
               f"min {result['min_cosine']:.4f} over {result['sentences']} sentences of {source}")
    return 0


def _write_plot(rep, path: Path) -> None:
    """The plot, written next to ``path`` and moved into place (never half a file)."""
    import os
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        rep.plot(staging / f"plot{path.suffix}")
        os.replace(staging / f"plot{path.suffix}", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cmd_report(args) -> int:
    from . import models
    from .errors import ConfigError
    from .formats.io import atomic_write
    from .report import report

    outputs = {}
    for flag in ("json", "plot"):
        text = getattr(args, flag)
        if text is not None:
            outputs[flag] = check_output(text, overwrite=args.overwrite, flag=f"--{flag}", kind="file")
    if "plot" in outputs and outputs["plot"].suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"--plot '{args.plot}' must end in {', '.join(PLOT_SUFFIXES)}")
    if len({p.resolve() for p in outputs.values()}) < len(outputs):
        raise ConfigError("--json and --plot name the same file")

    model, _ = models.load(args.model)
    rep = report(model, input_shape=args.input_shape)
    write_line(str(rep))
    if "json" in outputs:
        atomic_write(outputs["json"], lambda tmp: tmp.write_text(rep.to_json() + "\n"))
    if "plot" in outputs:
        _write_plot(rep, outputs["plot"])
    return 0


def cmd_info(args) -> int:
    from .checkpoint import INDEX_FILE, describe, read_checkpoint_header, tensor_file
    from .errors import SparsecraftError

    path = Path(args.path)
    if not (tensor_file(path).is_file() or (path.is_dir() and (path / INDEX_FILE).is_file())):
        raise SparsecraftError(f"no checkpoint at '{args.path}'")
    if args.json:
        write_line(json.dumps(read_checkpoint_header(path), indent=2, default=str))
        return 0
    write_line(describe(path))  # its first line names the file (or index) and the format version; a shrink is noted
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .prune import PruneConfig, default_sparsity

    # the settings and the output folder are checked before the model loads
    PruneConfig(method=args.method, pattern=args.pattern, sparsity=default_sparsity(args.pattern, args.sparsity))
    out = check_output(args.out, overwrite=args.overwrite, kind="folder")
    run_demo(out, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
             calib_samples=args.samples, calib_len=args.seq_len, baseline=not args.no_baseline,
             progress=not args.quiet)
    return 0
