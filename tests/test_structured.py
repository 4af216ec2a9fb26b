"""Structured shrinking: equivalence with masking, GQA rules, criteria, save/reload, errors."""

import copy
import json

import pytest
import torch
import yaml
from torch import nn

import sparsecraft as sc
from sparsecraft import ConfigError, SparsecraftError, TargetError
from sparsecraft.structured import ShrinkConfig, ShrinkError, get_shapes, plan_shrink, shrink_, zero_units_
from sparsecraft.structured.scores import select_units, unit_sums, wanda_map

from conftest import SmallCNN, assert_unchanged, snapshot


def _tiny_llama(layers=2, heads=4, kv=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def _ids(n=2, length=12, seed=1):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def _layer(report, name):
    return next(l for l in report.layers if l.name == name)


def _bit_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


# -- the shrunk model computes what the masked model computes ---------------------------------
def _mask_llama_by_hand(model, report):
    """Zero removed units with explicit module names (independent of zero_units_)."""
    hd = model.config.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            mlp = _layer(report, f"model.layers.{i}.mlp").removed if any(
                l.name == f"model.layers.{i}.mlp" for l in report.layers) else []
            for c in mlp:
                layer.mlp.gate_proj.weight[c] = 0
                layer.mlp.up_proj.weight[c] = 0
                layer.mlp.down_proj.weight[:, c] = 0
            name = f"model.layers.{i}.self_attn"
            if any(l.name == name for l in report.layers):
                for h in _layer(report, name).removed:  # o_proj columns alone silence a head
                    layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    return model


@pytest.mark.parametrize("cfg", [dict(mlp=0.5), dict(heads=0.5), dict(query_heads=0.5),
                                 dict(mlp=0.25, heads=0.5, query_heads=0.5)])
def test_llama_shrink_equals_masking(cfg):
    model = _tiny_llama(heads=8, kv=2) if cfg.get("query_heads") and cfg.get("heads") else _tiny_llama()
    dense = copy.deepcopy(model)
    report = shrink_(model, ShrinkConfig(**cfg), progress=False)
    masked = _mask_llama_by_hand(copy.deepcopy(dense), report)
    via_helper = zero_units_(copy.deepcopy(dense), report)
    ids = _ids()
    with torch.inference_mode():
        out, ref, ref2 = model(ids).logits, masked(ids).logits, via_helper(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref2, rtol=1e-5, atol=1e-5)
    assert report.params_after < report.params_before == sum(p.numel() for p in dense.parameters())


def test_gqa_groups_stay_consistent():
    model = _tiny_llama(heads=8, kv=2)  # 4 query heads per k/v head, head_dim 4
    report = shrink_(model, ShrinkConfig(heads=0.5, query_heads=0.5), progress=False)
    hd = model.config.head_dim
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        assert (q, kv) == (2, 1) and attn.v_proj.out_features == kv * hd
        assert kv * attn.num_key_value_groups == q and attn.o_proj.in_features == q * hd
        entry = _layer(report, f"model.layers.{i}.self_attn")
        assert (entry.before, entry.after, entry.buckets_before, entry.buckets_after) == (8, 2, 2, 1)
        # the kept query heads all belong to the kept k/v group
        kept_group = ({0, 1} - set(entry.removed_buckets)).pop()
        kept_heads = sorted(set(range(8)) - set(entry.removed))
        assert all(h // 4 == kept_group for h in kept_heads)
    shapes = get_shapes(model)
    assert shapes["model.layers.0.self_attn"]["attrs"]["num_key_value_groups"] == 2


def test_query_heads_keep_the_same_count_in_every_group():
    model = _tiny_llama(heads=8, kv=2)
    report = shrink_(model, ShrinkConfig(query_heads=0.25), progress=False)  # 1 of 4 per group
    entry = report.layers[0]
    assert entry.buckets_after == 2 and entry.after == 6
    assert sorted(h // 4 for h in entry.removed) == [0, 1]
    assert model.model.layers[0].self_attn.num_key_value_groups == 3


def test_greedy_decoding_with_kv_cache_matches_masked_model():
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    report = shrink_(model, ShrinkConfig(mlp=0.5, heads=0.5), progress=False)
    masked = zero_units_(dense, report)
    prompt = _ids(1, 6)
    a = model.generate(prompt, max_new_tokens=8, do_sample=False)
    b = masked.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_bert_heads_and_mlp_equal_masking():
    model = _tiny_bert()
    dense = copy.deepcopy(model)
    report = shrink_(model, ShrinkConfig(mlp=0.25, heads=0.5), progress=False)
    att = model.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 16, 16)
    assert model.encoder.layer[0].attention.output.dense.in_features == 16
    assert model.encoder.layer[0].intermediate.dense.out_features == 48
    masked = zero_units_(copy.deepcopy(dense), report)
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).last_hidden_state, masked(ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_cnn_filters_follow_batchnorm_and_flatten():
    model = SmallCNN().eval()
    dense = copy.deepcopy(model)
    report = shrink_(model, ShrinkConfig(conv=0.5), progress=False)
    assert {l.name for l in report.layers} == {"conv1", "conv2", "conv1d"}
    assert model.conv1.out_channels == 8 and model.conv1.weight.shape == (8, 4, 3, 3)
    assert model.bn1.num_features == 8 and model.bn1.running_var.shape == (8,)
    assert model.conv2.weight.shape == (16, 8, 3, 3) and model.conv2.in_channels == 8
    assert model.conv1d.weight.shape == (8, 16, 1) and model.fc.weight.shape == (64, 64)
    assert model.fc.in_features == 64
    # set non-trivial BatchNorm statistics so removing their channels matters
    x = torch.randn(3, 4, 8, 8)
    masked = zero_units_(copy.deepcopy(dense), report)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


def test_fx_skips_what_it_cannot_follow():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = y + self.b(y)  # a and b are coupled by the add
            return self.head(y)

    model = Residual()
    before = snapshot(model)
    with pytest.raises(TargetError, match="can lose filters.*combines"):
        shrink_(model, ShrinkConfig(conv=0.5), progress=False)
    assert_unchanged(model, before)
    plan = plan_shrink(SmallCNN(), ShrinkConfig(conv=0.5))
    assert plan.skipped == {}


# -- criteria pick the right unit -----------------------------------------------------------------
def test_unit_math_on_known_values():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    assert unit_sums(w, 0, 2, 2).tolist() == [10.0, 3.0]
    assert unit_sums(w, 1, 2, 1).tolist() == [5.0, 8.0]
    assert wanda_map(w, torch.tensor([4.0, 0.0])).tolist() == [[2, 0], [6, 0], [0, 0], [2, 0]]
    kept, buckets = select_units(torch.tensor([5.0, 1.0, 3.0, 3.0]), torch.tensor([6.0, 6.0]), 2, 1, 1)
    assert buckets.tolist() == [1] and kept.tolist() == [3]  # tie: the lower index goes first


def _cnn_with_loud_quiet_filter(c=3):
    """Filter ``c`` of conv1 has tiny weights but BatchNorm amplifies its output 1e5 times."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        model.conv1.weight[c] *= 0.01
        model.conv1.bias[c] = 0.0  # (a negative bias would keep the channel dead after ReLU)
        model.conv2.weight[:, c] *= 0.01
        model.bn1.weight[c] = 1e5  # huge activations into conv2
    return model


def test_wanda_keeps_small_weights_with_huge_activations_magnitude_drops_them():
    x = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mag = shrink_(_cnn_with_loud_quiet_filter(), ShrinkConfig(conv=0.25), progress=False)
    wanda = shrink_(_cnn_with_loud_quiet_filter(), ShrinkConfig(conv=0.25, criterion="wanda"), x,
                    progress=False)
    assert 3 in _layer(mag, "conv1").removed
    assert 3 not in _layer(wanda, "conv1").removed


def test_taylor_drops_a_dead_filter_with_large_weights():
    def dead_model():
        model = SmallCNN().eval()
        with torch.no_grad():
            model.conv2.weight[5] *= 10.0  # the largest filter ...
            model.conv2.bias[5] = -1e4  # ... whose ReLU output is always zero
        return model

    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch), labels[: batch.shape[0]])

    model = dead_model()
    model.train()  # Taylor scoring runs in eval mode and restores the mode
    stats = model.bn1.running_mean.clone()
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)  # survives scoring
    plan_before = _layer(shrink_(dead_model(), ShrinkConfig(conv=0.1), progress=False), "conv2")
    assert 5 not in plan_before.removed  # magnitude keeps the big dead filter
    report = shrink_(model, ShrinkConfig(conv=0.1, criterion="taylor", batch_size=8), x, loss_fn=loss_fn,
                     progress=False)
    assert 5 in _layer(report, "conv2").removed
    assert model.training and torch.equal(model.bn1.running_mean, stats[torch.tensor(
        sorted(set(range(16)) - set(_layer(report, "conv1").removed)))])
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))


def test_taylor_uses_the_lm_loss_and_restores_flags():
    model = _tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    calib = _ids(4, 16, seed=3)
    report = shrink_(model, ShrinkConfig(mlp=0.5, heads=0.5, criterion="taylor"), calib, progress=False)
    assert len(report.layers) == 4
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed" not in n)


def test_wanda_on_llama_reads_activations():
    model = _tiny_llama()
    c = 7
    with torch.no_grad():  # channel c: tiny down_proj column, huge activation (large gate/up rows)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, c] *= 1e-3
            layer.mlp.gate_proj.weight[c] *= 100
            layer.mlp.up_proj.weight[c] *= 100
    calib = _ids(4, 16, seed=3)
    wanda = shrink_(copy.deepcopy(model), ShrinkConfig(mlp=0.5, criterion="wanda"), calib, progress=False)
    assert c not in wanda.layers[0].removed


# -- save and reload -------------------------------------------------------------------------------
def test_llama_reload_is_exact(tmp_path):
    model = _tiny_llama()
    shrink_(model, ShrinkConfig(mlp=0.5, heads=0.5), progress=False)
    path = sc.save(model, tmp_path / "llama")
    header = sc.formats.read_header(path / "model.safetensors")
    assert header["extra"]["shapes"]["model.layers.0.mlp.down_proj"]["tensors"]["weight"] == [32, 32]
    fresh = sc.load(path)
    _bit_equal(model, fresh)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    assert fresh.model.layers[1].self_attn.num_key_value_groups == 2
    assert fresh.model.layers[1].mlp.intermediate_size == 32
    ids = _ids()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    # models.load goes through the checkpoint too; saving the reloaded model keeps the record
    again, tok = sc.models.load(str(path))
    assert tok is None
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)
    twice = sc.load(sc.save(again, tmp_path / "again"))
    _bit_equal(model, twice)


def test_bert_and_cnn_reload_are_exact(tmp_path):
    bert = _tiny_bert()
    shrink_(bert, ShrinkConfig(mlp=0.5, heads=0.25), progress=False)
    fresh = sc.load(sc.save(bert, tmp_path / "bert"))
    _bit_equal(bert, fresh)
    assert fresh.encoder.layer[0].attention.self.num_attention_heads == 3
    ids = _ids()
    with torch.inference_mode():
        assert torch.equal(bert(ids).last_hidden_state, fresh(ids).last_hidden_state)

    cnn = SmallCNN().eval()
    shrink_(cnn, ShrinkConfig(conv=0.5, overrides={"conv1d": 0.25}), progress=False)
    assert cnn.conv1d.out_channels == 12 and cnn.fc.in_features == 96
    loaded = sc.load(sc.save(cnn, tmp_path / "cnn.safetensors"), model=SmallCNN()).eval()
    _bit_equal(cnn, loaded)
    assert loaded.bn1.num_features == 8 and loaded.conv2.in_channels == 8
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        assert torch.equal(cnn(x), loaded(x))


def test_pruned_then_shrunk_drops_stale_sparsity_records(tmp_path):
    model = _tiny_llama()
    sc.prune_(model, sc.Magnitude(sparsity=None, pattern="2:4"), progress=False).finalize_()
    shrink_(model, ShrinkConfig(mlp=0.5), progress=False)
    meta = sc.get_meta(model)
    assert "model.layers.0.mlp.down_proj.weight" not in meta
    assert meta["model.layers.0.self_attn.q_proj.weight"]["pattern"] == "2:4"
    fresh = sc.load(sc.save(model, tmp_path / "m"))
    _bit_equal(model, fresh)


# -- config and counts -------------------------------------------------------------------------------
def test_config_from_yaml_and_exact_counts():
    cfg = ShrinkConfig.from_dict(yaml.safe_load(
        "mlp: 0.3\ncriterion: magnitude\nround_to: 16\noverrides: {'model.layers.0.mlp': 0.5}\n"))
    assert cfg.to_dict()["overrides"] == {"model.layers.0.mlp": 0.5}
    model = _tiny_llama()
    report = shrink_(model, cfg, progress=False)
    # 64 channels: override 0.5 -> 32 kept; 0.3 -> 19 removed, 45 kept, rounded to 48
    assert [(l.name, l.after) for l in report.layers] == [("model.layers.0.mlp", 32), ("model.layers.1.mlp", 48)]
    assert "model.layers.1.mlp" in str(report) and json.dumps(report.to_dict())
    with pytest.raises(ConfigError, match="unknown shrink config keys"):
        ShrinkConfig.from_dict({"mlp": 0.5, "sparsity": 0.5})


# -- bad input: clear errors, model unchanged --------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(mlp=1.0), "mlp must be in \\[0, 1\\)"),
    (dict(heads=-0.1), "heads must be in"),
    (dict(mlp="half"), "must be a number"),
    (dict(mlp=0.5, criterion="l1"), "unknown criterion 'l1'"),
    (dict(), "nothing to shrink"),
    (dict(mlp=0.5, overrides={"x": 1.5}), "override 'x'"),
    (dict(mlp=0.5, round_to=0), "round_to"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ShrinkConfig(**kwargs)


@pytest.mark.parametrize("which,cfg,kwargs,error,match", [
    ("llama", dict(query_heads=0.9), {}, ShrinkError,
     "self_attn': query_heads=0.9 removes 2 of the 2 query heads.*same number"),
    ("llama", dict(heads=0.9), {}, ShrinkError, "self_attn': heads=0.9 removes all 2 key/value groups"),
    ("bert", dict(query_heads=0.5), {}, ShrinkError, "attention': query_heads needs grouped-query"),
    ("cnn", dict(conv=0.5, overrides={"conv1": 0.99}), {}, ShrinkError,
     "layer 'conv1': removing 0.99 of its 16 filters would leave none"),
    ("llama", dict(mlp=0.5, criterion="wanda"), {}, ConfigError, "needs calibration"),
    ("llama", dict(mlp=0.5, criterion="wanda"), dict(calibration=torch.full((2, 8), 99)), ConfigError,
     "vocabulary"),
    ("bert", dict(mlp=0.5, criterion="taylor"), dict(calibration=torch.zeros(2, 8, dtype=torch.long)),
     ConfigError, "taylor needs a loss"),
    ("llama", dict(mlp=0.5, overrides={"model.layers.9.*": 0.2}), {}, ConfigError, "matches no shrinkable layer"),
    ("cnn", dict(mlp=0.5), {}, TargetError, "needs repeated transformer blocks"),
    ("llama", dict(conv=0.5), {}, TargetError, "does not trace|can lose filters"),
    ("cnn", dict(conv=0.5, criterion="taylor"), dict(calibration=torch.randn(2, 4, 8, 8)), ConfigError,
     "loss_fn"),
])
def test_bad_input_leaves_model_unchanged(which, cfg, kwargs, error, match):
    model = {"llama": _tiny_llama, "bert": _tiny_bert, "cnn": lambda: SmallCNN().eval()}[which]()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        shrink_(model, ShrinkConfig(**cfg), progress=False, **kwargs)
    assert_unchanged(model, before)
    assert not get_shapes(model)
    assert issubclass(error, SparsecraftError)


def test_open_masks_are_refused():
    model = _tiny_llama()
    state = sc.prune_(model, sc.Magnitude(sparsity=0.5), progress=False)
    before = snapshot(model)
    with pytest.raises(ShrinkError, match="finalize_"):
        shrink_(model, ShrinkConfig(mlp=0.5), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    state.finalize_()


# -- command line -------------------------------------------------------------------------------------
def test_cli_shrink_end_to_end(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from sparsecraft.cli import main

    src = tmp_path / "tiny"
    _tiny_llama().save_pretrained(src)
    out = tmp_path / "shrunk"
    assert main(["-q", "shrink", str(src), "--mlp", "0.5", "--heads", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "64->32" in text and "saved to" in text
    model = sc.load(out)
    assert isinstance(model, LlamaForCausalLM) and model.model.layers[0].mlp.down_proj.in_features == 32
    results = json.loads((out / "shrink_results.json").read_text())
    assert results["report"]["layers"][0]["after"] == 32
    assert main(["-q", "shrink", str(src), "--mlp", "0.5", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["-q", "shrink", str(src), "--query-heads", "0.9", "--out", str(tmp_path / "x")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("sparsecraft")]
    assert len(err) == 1 and "same number" in err[0]  # (transformers' load progress aside)
    assert not (tmp_path / "x").exists()
