"""What transformers can load of our outputs: dense-hf folders and shrunk models' config.json."""

import json

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft.cli import main
from sparsecraft.errors import FormatError
from sparsecraft.structured import ShrinkConfig, shrink_


def _tiny_llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _hf_load(path):
    """transformers' own loader; a missing or mismatched tensor is a failure, not a warning."""
    from transformers import AutoModelForCausalLM

    model, report = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(report.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), report
    return model.eval()


def _same_logits(a, b):
    ids = _ids()
    with torch.inference_mode():
        assert torch.equal(a(ids).logits, b(ids).logits)


def _calibration():
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))


# -- dense-hf ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie,pattern", [(True, "unstructured"), (False, "2:4")])
def test_dense_hf_loads_in_transformers_with_the_pruned_logits(tmp_path, tie, pattern):
    model = _tiny_llama(tie)
    sc.prune_(model, sc.Wanda(sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern),
              _calibration(), progress=False).finalize_()
    out = sc.save(model, tmp_path / "hf", format="dense-hf", extra_files={"notes.txt": "x\n"})
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors" in names and "notes.txt" in names
    assert not sc.checkpoint.claims_checkpoint(out)  # plain safetensors, nothing of ours
    loaded = _hf_load(out)
    _same_logits(model, loaded)
    w = loaded.model.layers[0].mlp.up_proj.weight
    assert float((w == 0).float().mean()) == 0.5
    # and our own loader reads it as a Hugging Face folder
    again, _ = sc.models.load(str(out))
    _same_logits(model, again)


def test_dense_hf_shards_with_an_index(tmp_path):
    model = _tiny_llama()
    sc.prune_(model, sc.Magnitude(sparsity=0.5), progress=False).finalize_()
    out = sc.save(model, tmp_path / "hf", format="dense-hf", max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    _same_logits(model, _hf_load(out))


def test_dense_hf_refuses_what_transformers_cannot_express(tmp_path):
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(FormatError, match="dense-hf needs a transformers model; Sequential"):
        sc.save(plain, tmp_path / "plain", format="dense-hf")
    with pytest.raises(FormatError, match="writes a folder"):
        sc.save(_tiny_llama(), tmp_path / "one.safetensors", format="dense-hf")
    with pytest.raises(FormatError, match="unknown format 'hf'"):
        sc.save(_tiny_llama(), tmp_path / "x", format="hf")
    uneven = _tiny_llama()
    shrink_(uneven, ShrinkConfig(mlp=0.25, overrides={"model.layers.0.mlp": 0.5}), progress=False)
    with pytest.raises(FormatError, match=r"non-uniform shrink: the blocks have different sizes \(intermediate_size "
                                          r"32, 48\)"):
        sc.save(uneven, tmp_path / "uneven", format="dense-hf")
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left


# -- shrunk models ---------------------------------------------------------------------------------
def test_uniform_shrink_gets_a_config_transformers_loads(tmp_path, capsys):
    model = _tiny_llama()
    shrink_(model, ShrinkConfig(mlp=0.25, heads=0.5), progress=False)
    out = sc.save(model, tmp_path / "shrunk")
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (48, 2, 1, 8)
    _same_logits(model, _hf_load(out))  # the sparsecraft folder itself: dense tensors, new sizes
    _same_logits(model, sc.load(out))
    header = sc.formats.read_header(out / "model.safetensors")
    assert header["extra"]["shrink"]["uniform"] is True and header["extra"]["shrink"]["hf_config"] is True
    assert main(["info", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("structurally shrunk (uniform, intermediate_size 48, num_attention_heads 2, "
                           "num_key_value_heads 1): config.json holds the new sizes")
    # the dense-hf form of the same model
    _same_logits(model, _hf_load(sc.save(model, tmp_path / "shrunk-hf", format="dense-hf")))


def test_query_head_shrink_keeps_head_dim_explicit(tmp_path):
    model = _tiny_llama()
    shrink_(model, ShrinkConfig(query_heads=0.5), progress=False)  # 1 of 2 query heads per group
    out = sc.save(model, tmp_path / "q", format="dense-hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 8)
    _same_logits(model, _hf_load(out))


def test_non_uniform_shrink_says_so_and_loads_with_sparsecraft(tmp_path, capsys):
    model = _tiny_llama()
    shrink_(model, ShrinkConfig(mlp=0.25, overrides={"model.layers.0.mlp": 0.5}), progress=False)
    out = sc.save(model, tmp_path / "uneven")
    shrink = sc.formats.read_header(out / "model.safetensors")["extra"]["shrink"]
    assert shrink["uniform"] is False and shrink["hf_config"] is False
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 64  # the original sizes, and a note why
    assert "non-uniform shrink" in config["sparsecraft_note"] and "sparsecraft.load" in config["sparsecraft_note"]
    _same_logits(model, sc.load(out))
    assert main(["info", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("structurally shrunk (non-uniform): non-uniform shrink: the blocks have different sizes "
                           "(intermediate_size 32, 48)")
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception, match="size mismatch|mismatch"):  # never a silent load
        AutoModelForCausalLM.from_pretrained(out)


def test_bert_head_shrink_cannot_be_expressed(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()
    shrink_(bert, ShrinkConfig(mlp=0.5, heads=0.25), progress=False)
    found = sc.hf_export.hf_config(bert)
    assert found.config is None and found.uniform
    assert "BertConfig cannot express this shrink" in found.reason
    out = sc.save(bert, tmp_path / "bert")
    assert sc.formats.read_header(out / "model.safetensors")["extra"]["shrink"]["uniform"] is True
    fresh = sc.load(out)
    with torch.inference_mode():
        assert torch.equal(bert(_ids()).last_hidden_state, fresh(_ids()).last_hidden_state)


# -- command line ------------------------------------------------------------------------------------
def test_cli_prune_dense_hf(tmp_path, tiny_llama_tok_dir, capsys):
    out = tmp_path / "hf"
    assert main(["-q", "prune", str(tiny_llama_tok_dir), "--method", "wanda", "--samples", "4", "--seq-len", "16",
                 "--format", "dense-hf", "--out", str(out)]) == 0
    assert (out / "tokenizer_config.json").is_file() and (out / "prune_results.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(tiny_llama_tok_dir).vocab_size
    loaded = _hf_load(out)
    w = loaded.model.layers[1].self_attn.q_proj.weight
    assert float((w == 0).float().mean()) == 0.5
    # --overwrite replaces the folder (it holds the marker)
    assert main(["-q", "prune", str(tiny_llama_tok_dir), "--format", "dense-hf", "--overwrite",
                 "--out", str(out)]) == 0


def test_cli_dense_hf_bad_input_is_one_line(tmp_path, capsys):
    uneven = _tiny_llama()
    shrink_(uneven, ShrinkConfig(mlp=0.25, overrides={"model.layers.0.mlp": 0.5}), progress=False)
    ckpt = sc.save(uneven, tmp_path / "uneven")
    assert main(["prune", str(ckpt), "--format", "dense-hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format dense-hf: non-uniform shrink" in err[0], err
    assert not (tmp_path / "o").exists()
    assert main(["prune", str(ckpt), "--format", "dense-hf", "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format dense-hf writes a folder" in err[0], err
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err
    assert main(["shrink", str(ckpt), "--mlp", "0.25", "--format", "dense-hf", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-uniform shrink" in err[0], err
    assert not (tmp_path / "s").exists()
