"""YAML recipes for one-shot pruning: the same fields as the ``sparsecraft prune`` flags.

```yaml
model: smollm2-135m            # named model or a folder
out: pruned/                   # where the compressed model goes
format: sparsecraft            # or dense-hf: dense safetensors shards transformers loads
overwrite: false
prune:                         # a PruneConfig, field for field
  method: sparsegpt
  sparsity: 0.5
  pattern: unstructured
  allocation: owl
  options: {dsnot: true}
calibration:                   # used by calibrated methods (wanda, sparsegpt, owl, dsnot)
  file: null                   # text or JSONL file; null = a built-in corpus (calibration part)
  corpus: lee                  # built-in corpus: lee (news) or wiki (Wikipedia); also used to evaluate
  samples: 128
  seq_len: 512
  seed: 0
evaluate: true                 # perplexity (causal LM) or embedding similarity (encoder) before/after
stream: null                   # Hugging Face folder with safetensors: prune block by block (null: when possible)
resume: true                   # a streamed run continues an interrupted one (same config and input)
```

Streaming (:mod:`sparsecraft.streaming`): a Hugging Face folder with safetensors
weights is pruned block by block, never whole in memory, unless the recipe needs the whole
model (``evaluate``, a single ``.safetensors`` output, or a config that is not streamable);
then it loads whole, as for any other model, and says why in the log. ``stream: true``
makes that an error instead; ``stream: false`` always loads the model whole.

A quantising method (``gptq``, ``rtn``, or ``sparsegpt`` with ``options: {quantize: int4}``)
works the same way: ``examples/quantize.yaml`` prunes and quantises SmolLM2 jointly (GQSA);
without ``sparsity``, ``gptq`` and ``rtn`` only quantise.

Everything is validated before the model is loaded (field types, values, whether the
method can run without gradients, the output path); an error names the field. Patterns
such as ``2:4`` may be written unquoted: recipes are read with :mod:`sparsecraft.yaml_io`.

Under ``torchrun`` (``torch.distributed`` initialised) :func:`execute` runs in every process:
each loads the model and the calibration set, ``prune_`` splits the calibration over them,
and rank 0 alone evaluates and writes the output while the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, config_fields
from .prune import PruneConfig
from .yaml_io import check_types, load_yaml_file

__all__ = ["Recipe", "CalibrationSpec", "load_recipe"]


@dataclass
class CalibrationSpec:
    file: str | None = None
    corpus: str = "lee"  # built-in corpus when no file is given: lee or wiki
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.file, os.PathLike):
            self.file = os.fspath(self.file)
        check_types(CalibrationSpec, self.__dict__, "calibration")
        if self.seed < 0:
            raise ConfigError(f"calibration.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("samples", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"calibration.{name} must be a positive integer, got {value!r}")
        if self.corpus not in ("lee", "wiki"):
            raise ConfigError(f"calibration.corpus must be 'lee' or 'wiki', got {self.corpus!r}")
        if self.file is not None and not Path(self.file).is_file():
            raise ConfigError(f"calibration.file '{self.file}' does not exist")


def _build(cls, data: Any, where: str):
    if data is None:
        return cls()
    kwargs = config_fields(cls, data, where, f"{where}: unknown keys")
    check_types(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(f"{where}:") else f"{where}: {message}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass
class Recipe:
    model: str
    out: str
    prune: PruneConfig = field(default_factory=PruneConfig)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluate: bool = True
    overwrite: bool = False
    format: str = "sparsecraft"  # or "dense-hf" (see sparsecraft.checkpoint.save)
    stream: bool | None = None
    resume: bool = True

    def __post_init__(self):
        # Python callers may pass plain mappings, as a YAML file would
        if isinstance(self.prune, Mapping):
            self.prune = PruneConfig.from_dict(self.prune)
        if isinstance(self.calibration, Mapping):
            self.calibration = _build(CalibrationSpec, self.calibration, "calibration")
        check_format(self.format, self.out)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError("a recipe must be a YAML mapping with at least 'model' and 'out'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"recipe: unknown keys {sorted(unknown)}; allowed: {sorted(names)}")
        for key in ("model", "out"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ConfigError(f"recipe: '{key}' is required and must be a string")
        for key in ("evaluate", "overwrite", "resume"):
            if key in data and not isinstance(data[key], bool):
                raise ConfigError(f"recipe: '{key}' must be true or false, got {data[key]!r}")
        if "format" in data and not isinstance(data["format"], str):
            raise ConfigError(f"recipe: 'format' must be a string, got {data['format']!r}")
        if data.get("stream") is not None and not isinstance(data["stream"], bool):
            raise ConfigError(f"recipe: 'stream' must be true, false or null, got {data['stream']!r}")
        prune_data = data.get("prune") or {}
        try:
            check_types(PruneConfig, config_fields(PruneConfig, prune_data, "prune config",
                                                   "unknown prune config keys"), "prune")
            prune = PruneConfig.from_dict(prune_data)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith("prune") else f"prune: {message}") from None
        return cls(
            model=data["model"],
            out=data["out"],
            prune=prune,
            calibration=_build(CalibrationSpec, data.get("calibration"), "calibration"),
            evaluate=data.get("evaluate", True),
            overwrite=data.get("overwrite", False),
            format=data.get("format", "sparsecraft"),
            stream=data.get("stream"),
            resume=data.get("resume", True),
        )


def check_format(fmt: str, out: str) -> None:
    """ConfigError for an unknown output format, or dense-hf into a single file."""
    from .checkpoint import FORMATS

    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "dense-hf" and str(out).endswith(".safetensors"):
        raise ConfigError(f"format dense-hf writes a folder (shards, config.json, tokenizer); out '{out}' "
                          f"names a single .safetensors file")


def load_recipe(path: str | Path) -> Recipe:
    return Recipe.from_dict(load_yaml_file(path, "recipe"))


def _quality(model, tok, reference, eval_docs) -> dict:
    from . import data, evaluate

    if evaluate.is_causal_lm(model):
        tokens = data.tokenize(tok, eval_docs)
        return {"perplexity": evaluate.perplexity(model, tokens, 512, progress=False)}
    sentences = evaluate.split_sentences(eval_docs)
    return evaluate.embedding_similarity(model, reference, tok, sentences)


def execute(recipe: Recipe, *, progress: bool = True) -> dict:
    """Run a recipe: load, (calibrate), evaluate, prune, evaluate, save. Returns the results."""
    import copy
    import json
    import logging
    import time

    from . import data, models
    from .checkpoint import save
    from .distributed import current
    from .outputs import MARKER, check_output, marker_text
    from .prune import prune_
    from .report import report

    log = logging.getLogger(__name__)
    out = check_output(recipe.out, overwrite=recipe.overwrite, flag="out", kind="model",
                       how="pass --overwrite (in a recipe: overwrite: true)")
    config = recipe.prune
    if _streams(recipe):
        return _execute_streamed(recipe, out, progress)
    start = time.perf_counter()
    model, tok = models.load(recipe.model)
    log.info("loaded %s in %.1f s", recipe.model, time.perf_counter() - start)
    if recipe.format == "dense-hf":  # pruning keeps shapes: what transformers cannot express is known now
        from .hf_export import check_dense_hf

        check_dense_hf(model)
    ranks = current()
    main = ranks is None or ranks.main  # rank 0 evaluates and writes; the others wait for it

    results: dict[str, Any] = {"model": recipe.model, "prune": config.to_dict()}
    calibration = None
    if config.needs_calibration:
        calibration, results["calibration"] = build_calibration(recipe.calibration, tok, recipe.model)
    corpus = recipe.calibration.corpus
    eval_docs = data.builtin_texts(corpus)["evaluation"] if recipe.evaluate and tok is not None and main else None
    reference = None
    if eval_docs is not None:
        results["evaluation_text"] = f"built-in {corpus} corpus, evaluation part (disjoint from its calibration part)"
        from .evaluate import is_causal_lm

        reference = None if is_causal_lm(model) else copy.deepcopy(model)
        results["dense"] = _quality(model, tok, model if reference is None else reference, eval_docs)

    start = time.perf_counter()
    state = prune_(model, config, calibration, progress=progress)
    results["prune_seconds"] = time.perf_counter() - start
    state.finalize_()
    if eval_docs is not None:
        results["pruned"] = _quality(model, tok, reference, eval_docs)
    rep = report(model)
    results["sparsity"] = rep.totals["sparsity"]
    results["compressed_bytes"] = rep.totals["compressed_bytes"]
    results["model_bytes"], results["fp32_bytes"] = rep.totals["model_bytes"], rep.totals["fp32_bytes"]
    # one .safetensors file holds tensors only; a folder also gets the results and the marker
    if ranks is not None:
        results["processes"] = ranks.world
    extra = None if out.suffix == ".safetensors" else {
        "prune_results.json": json.dumps(results, indent=2) + "\n", MARKER: marker_text("prune")}
    if main:
        save(model, out, overwrite=recipe.overwrite, tokenizer=tok, extra_files=extra, format=recipe.format)
    if ranks is not None:
        ranks.barrier()
    return results


def build_calibration(spec: CalibrationSpec, tok, model_name: str) -> tuple[Any, dict]:
    """Calibration token ids from ``spec`` (a text file or a built-in corpus's calibration
    part), and the record of where they came from."""
    from . import data
    from .errors import SparsecraftError

    if tok is None:
        raise SparsecraftError(f"'{model_name}' has no tokenizer to build calibration samples")
    docs = data.load_texts(spec.file) if spec.file else data.builtin_texts(spec.corpus)["calibration"]
    calibration = data.calibration(tok, spec.samples, spec.seq_len, spec.seed, docs=docs)
    record = {"source": spec.file or f"built-in {spec.corpus} corpus, calibration part",
              "samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed}
    return calibration, record


def _stream_obstacle(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot be pruned block by block, or None when it can."""
    from .errors import ConfigError
    from .streaming import check_streamable, whole_model_reason

    why = whole_model_reason(recipe.model, recipe.out, recipe.evaluate, recipe.format)
    if why is not None:
        return why
    from .distributed import current

    if current() is not None:
        return "calibration is split over processes (a streamed run is one process)"
    try:
        check_streamable(recipe.prune)
    except ConfigError as exc:
        return str(exc).split("; load the model whole")[0].removeprefix("cannot prune block by block: ")
    return None


def _streams(recipe: Recipe) -> bool:
    """Whether to stream (see the module docstring); ``stream: true`` that cannot is an error."""
    import logging

    from .errors import ConfigError

    if recipe.stream is False:
        return False
    why = _stream_obstacle(recipe)
    if why is None:
        return True
    if recipe.stream:
        raise ConfigError(f"stream: cannot prune '{recipe.model}' block by block: {why}")
    if "safetensors weights" not in why:
        logging.getLogger(__name__).info("loading the whole model: %s", why)
    return False


def _execute_streamed(recipe: Recipe, out: Path, progress: bool) -> dict:
    """:func:`execute` for a streamed run: calibration from the folder's tokenizer, then
    :func:`~sparsecraft.streaming.prune_pretrained`. The results file holds nothing
    that changes from run to run (no timings), so a resumed run writes the same bytes."""
    import json
    import time

    from .models import _local_tokenizer, _offline
    from .outputs import MARKER, marker_text
    from .streaming import prune_pretrained

    config = recipe.prune
    results: dict[str, Any] = {"model": recipe.model, "prune": config.to_dict(), "streamed": True}
    calibration = None
    if config.needs_calibration:
        _offline()
        tok = _local_tokenizer(Path(recipe.model))
        calibration, results["calibration"] = build_calibration(recipe.calibration, tok, recipe.model)
    start = time.perf_counter()

    def files(result) -> dict[str, str]:  # what the run decides: not its timing, nor whether it resumed
        saved = {**results, "sparsity": result.sparsity, "checkpoint_bytes": result.checkpoint_bytes,
                 "blocks": result.blocks}
        return {"prune_results.json": json.dumps(saved, indent=2) + "\n", MARKER: marker_text("prune")}

    result = prune_pretrained(recipe.model, config, calibration, out, overwrite=recipe.overwrite,
                              resume=recipe.resume, extra_files=files, progress=progress)
    results["prune_seconds"] = time.perf_counter() - start
    results.update(sparsity=result.sparsity, checkpoint_bytes=result.checkpoint_bytes, blocks=result.blocks,
                   resumed_from=result.resumed_from)
    return results
