"""Whole-model distillation after pruning: masks kept, held-out loss never rises, bad input refused."""

import pytest
import torch

import sparsecraft as sc
from sparsecraft import ConfigError

from conftest import assert_unchanged, snapshot


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture
def calib():
    return torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))


def test_distillation_keeps_masks_and_lowers_the_held_out_loss(calib):
    model = _llama()
    state = sc.prune_(model, sc.Wanda(sparsity=0.5, batch_size=4,
                                      distill={"lr": 1e-4, "epochs": 3, "holdout": 4, "batch_size": 2}),
                      calib, progress=False)
    params = dict(model.named_parameters())
    summary = state.info["model.layers.0.mlp.up_proj.weight"]["distill"]
    assert summary["steps"] == 3 * 4 and summary["best_step"] > 0
    assert summary["val_best"] < summary["val_before"]
    for name, keep in state.masks.items():
        assert torch.all(params[name][~keep] == 0), name  # exact zeros where pruned
        assert int((~keep).sum()) == keep.numel() // 2


def test_distillation_keeps_the_untouched_weights_when_training_only_hurts(calib):
    from sparsecraft.oneshot.distill import distill_

    model, teacher = _llama(), _llama()
    state = sc.prune_(model, sc.Wanda(sparsity=0.5, batch_size=4), calib, progress=False)
    before = snapshot(model)
    summary = distill_(model, teacher, calib, state, lr=10.0, epochs=1, holdout=4, batch_size=4)
    assert summary["best_step"] == 0 and summary["val_best"] == summary["val_before"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("options,match", [
    ({"holdout": 12}, "needs at least one more"),
    ({"lr": 0}, "lr must be"),
    ({"time_budget": 0}, "time_budget"),
    ({"epochs": 0}, "epochs"),
    ({"steps": 3}, "steps"),
])
def test_bad_distillation_settings_are_refused_before_any_change(calib, options, match):
    model = _llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        sc.prune_(model, sc.Wanda(sparsity=0.5, distill=options), calib, progress=False)
    assert_unchanged(model, before)


def test_distillation_needs_calibration():
    model = _llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="calibration"):
        sc.prune_(model, sc.Magnitude(sparsity=0.5, distill=True), None, progress=False)
    assert_unchanged(model, before)


def test_distill_through_the_cli(tiny_llama_tok_dir, tmp_path):
    from sparsecraft.cli import main

    out = tmp_path / "out"
    assert main(["prune", str(tiny_llama_tok_dir), "--method", "wanda", "--sparsity", "0.5", "--distill",
                 "--option", "distill={epochs: 1, holdout: 2}", "--samples", "6", "--seq-len", "16",
                 "--out", str(out)]) == 0
    loaded = sc.load(out)
    weights = [p for n, p in loaded.named_parameters() if n.endswith("proj.weight")]
    assert all(abs(float((w == 0).float().mean()) - 0.5) < 1e-6 for w in weights)
