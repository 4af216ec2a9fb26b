"""Real text for calibration and evaluation, shipped by PyPI packages (offline).

Built-in corpora come from the test data that the ``gensim`` wheel carries (read as files;
gensim is never imported):

* ``lee`` (default): the Lee news corpus. Calibration: ``lee_background.cor`` (300 news
  articles); evaluation: ``lee.cor`` (50 other articles), minus any article that also
  appears in the calibration file, so the two are disjoint.
* ``wiki``: a shortened English Wikipedia dump (about 200 pages). Wiki markup is removed
  (templates, tables, references, links, emphasis, headings); redirects and pages shorter
  than 200 characters are dropped. The first 80% of the articles calibrate, the rest
  evaluate.

Users can pass their own text or JSONL file instead (``load_texts``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from .errors import SparsecraftError

__all__ = ["builtin_texts", "load_texts", "tokenize", "calibration", "evaluation_tokens"]

log = logging.getLogger(__name__)


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SparsecraftError(
            "the built-in text corpus needs the 'gensim' wheel's test data: "
            "pip install --no-deps gensim"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not folder.is_dir():
        raise SparsecraftError(f"gensim is installed but has no test data at {folder}")
    return folder


def _read_docs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans, nesting included (templates, tables)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup (good enough for calibration and perplexity)."""
    import html
    import re

    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)  # [[target|label]] -> label
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)  # [[target]] -> target
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"<[^>]+>", "", text)
    lines = [l.strip() for l in text.splitlines()]
    lines = [l.lstrip("*#:; ").strip() for l in lines if l and not l.startswith(("|", "!"))]
    return "\n".join(l for l in lines if l)


def _wiki_articles(folder: Path) -> list[str]:
    import bz2
    import xml.etree.ElementTree as ET

    articles = []
    with bz2.open(folder / _WIKI_FILE) as f:
        for _event, elem in ET.iterparse(f):
            if elem.tag.endswith("}text") or elem.tag == "text":
                raw = elem.text or ""
                if not raw.lstrip().upper().startswith("#REDIRECT"):
                    clean = clean_wikitext(raw)
                    if len(clean) >= 200:
                        articles.append(clean)
                elem.clear()
    return articles


def builtin_texts(name: str = "lee") -> dict[str, list[str]]:
    """``{"calibration": [...], "evaluation": [...]}`` documents of a built-in corpus."""
    if name not in ("lee", "wiki"):
        raise SparsecraftError(f"unknown built-in corpus '{name}'; known: lee, wiki")
    folder = _gensim_test_data()
    if name == "wiki":
        articles = _wiki_articles(folder)
        cut = int(0.8 * len(articles))
        return {"calibration": articles[:cut], "evaluation": articles[cut:]}
    calib = _read_docs(folder / "lee_background.cor")
    seen = set(calib)
    evaluation = [d for d in _read_docs(folder / "lee.cor") if d not in seen]
    return {"calibration": calib, "evaluation": evaluation}


def load_texts(path: str | Path) -> list[str]:
    """Documents from a text file (blank-line or one-per-line) or JSONL with a ``text`` key."""
    path = Path(path)
    if not path.is_file():
        raise SparsecraftError(f"text file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SparsecraftError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SparsecraftError(f"{path}:{i}: each JSONL row needs a string 'text' field")
            docs.append(row["text"])
    else:
        docs = _read_docs(path)
    if not docs:
        raise SparsecraftError(f"{path} contains no text")
    return docs


def tokenize(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long 1-D token stream: documents joined by the end-of-sequence token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def calibration(
    tokenizer, samples: int = 128, seq_len: int = 512, seed: int = 0, docs: list[str] | None = None
) -> torch.Tensor:
    """``[samples, seq_len]`` random windows of the calibration stream (seeded)."""
    if samples < 1 or seq_len < 1:
        raise SparsecraftError(f"calibration needs samples >= 1 and seq_len >= 1, got {samples}, {seq_len}")
    docs = docs if docs is not None else builtin_texts()["calibration"]
    stream = tokenize(tokenizer, docs)
    if stream.numel() < seq_len:
        raise SparsecraftError(
            f"calibration text has {stream.numel()} tokens, shorter than one sample of {seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def evaluation_tokens(tokenizer, docs: list[str] | None = None) -> torch.Tensor:
    """The held-out evaluation stream (1-D)."""
    docs = docs if docs is not None else builtin_texts()["evaluation"]
    return tokenize(tokenizer, docs)
