"""Quality of a pruned model: perplexity for causal LMs, embedding similarity for encoders.

* ``perplexity``: non-overlapping windows of ``seq_len`` tokens (stride = ``seq_len``) over
  the held-out stream; the last partial window is dropped.
* ``embedding_similarity``: mean-pooled (attention-masked) last hidden states of the pruned
  and the dense model on held-out sentences; the mean cosine similarity over sentences.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

from .errors import SparsecraftError
from .models import perplexity

__all__ = ["perplexity", "sentence_embeddings", "embedding_similarity", "split_sentences", "is_causal_lm"]

log = logging.getLogger(__name__)


def is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def split_sentences(docs: list[str], limit: int = 256, min_words: int = 4) -> list[str]:
    """Sentences of ``docs`` (split at . ! ? followed by space), at most ``limit``."""
    out = []
    for doc in docs:
        for sentence in re.split(r"(?<=[.!?])\s+", doc):
            if len(sentence.split()) >= min_words:
                out.append(sentence.strip())
                if len(out) >= limit:
                    return out
    return out


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``[len(sentences), hidden]``."""
    if not sentences:
        raise SparsecraftError("no sentences to embed")
    device = next(model.parameters()).device
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=256,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        chunks.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(chunks)


def embedding_similarity(model, reference, tokenizer, sentences: list[str]) -> dict:
    """Cosine similarity between ``model``'s and ``reference``'s sentence embeddings."""
    a = sentence_embeddings(model, tokenizer, sentences)
    b = sentence_embeddings(reference, tokenizer, sentences)
    cos = (a * b).sum(-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sentences": len(sentences)}
