"""Block reconstruction with fixed masks: zeros kept, loss falls, early stopping keeps the best."""

import pytest
import torch

from sparsecraft.errors import ConfigError
from sparsecraft.oneshot.block_tuning import tune_block_
from sparsecraft.patterns import NM


@pytest.fixture
def pruned_block(llama_block):
    block, batches, targets = llama_block
    with torch.no_grad():
        masks = {}
        for name, p in block.named_parameters():
            if name.endswith("proj.weight"):
                keep = p.abs() > p.abs().flatten().kthvalue(p.numel() // 2).values
                p.mul_(keep)
                masks[name] = keep
    return block, batches, targets, masks


def test_tuning_keeps_masks_and_lowers_the_loss(pruned_block):
    block, batches, targets, masks = pruned_block
    summary = tune_block_(block, batches, targets, masks, lr=1e-3, epochs=4, holdout=2)
    params = dict(block.named_parameters())
    for name, keep in masks.items():
        assert torch.all(params[name][~keep] == 0), name  # exact zeros where pruned
    assert summary["train_last"] < summary["train_first"]
    assert summary["val_best"] < summary["val_before"] and summary["best_epoch"] >= 1


def test_early_stopping_restores_the_best_weights(pruned_block):
    block, batches, targets, masks = pruned_block
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    # a learning rate this large only makes things worse: the untouched weights must come back
    summary = tune_block_(block, batches, targets, masks, lr=10.0, epochs=3, holdout=2, patience=1)
    assert summary["best_epoch"] == 0 and summary["stopped"] == "early stop"
    for n, p in block.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad  # restored flags


def test_norms_and_biases_are_tuned_on_request(pruned_block):
    block, batches, targets, masks = pruned_block
    norm_before = block.input_layernorm.weight.detach().clone()
    tune_block_(block, batches, targets, masks, lr=1e-3, epochs=2, holdout=2, tune="weights+norms",
                micro_batch=None)
    assert not torch.equal(block.input_layernorm.weight, norm_before)


def test_bad_settings_are_refused_before_any_change(pruned_block):
    block, batches, targets, masks = pruned_block
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    for kwargs, match in (({"lr": 0}, "lr"), ({"epochs": 0}, "epochs"), ({"time_budget": 0}, "time budget"),
                          ({"holdout": 6}, "needs at least one more"), ({"tune": "all"}, "tune")):
        with pytest.raises(ConfigError, match=match):
            tune_block_(block, batches, targets, masks, **kwargs)
    with pytest.raises(ConfigError, match="targets"):
        tune_block_(block, batches, targets[:-1], masks)
    for n, p in block.named_parameters():
        assert torch.equal(p, before[n])


# -- the `reconstruct` and `learn_mask` stages through prune_ ------------------------------------
def _tiny(tiny_llama_tok_dir):
    import sparsecraft as sc

    model, _ = sc.models.load(str(tiny_llama_tok_dir))
    calib = torch.randint(0, 1000, (48, 32), generator=torch.Generator().manual_seed(0))
    return model, calib


def _held_out_error(model, dense, ids):
    with torch.no_grad():
        return float((model(ids).logits - dense(ids).logits).pow(2).mean())


def test_reconstruct_stage_keeps_masks_and_beats_plain_sparsegpt(tiny_llama_tok_dir):
    import copy

    import sparsecraft as sc

    model, calib = _tiny(tiny_llama_tok_dir)
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    sc.prune_(plain, sc.method_config("sparsegpt", sparsity=0.5), calib, progress=False).finalize_()
    state = sc.prune_(model, sc.method_config("sparsegpt", sparsity=0.5, reconstruct={"lr": 1e-3, "epochs": 4, "patience": 2}),
                      calib, progress=False)
    params = dict(model.named_parameters())
    for name, keep in state.masks.items():
        assert torch.all(params[name][~keep] == 0) and int((~keep).sum()) == keep.numel() // 2, name
        summary = state.info[name]["reconstruct"]
        assert summary["val_best"] < summary["val_before"]
    held_out = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(9))
    assert _held_out_error(model, dense, held_out) < _held_out_error(plain, dense, held_out)


def test_learned_masks_stage_gives_valid_groups(tiny_llama_tok_dir):
    import sparsecraft as sc

    model, calib = _tiny(tiny_llama_tok_dir)
    state = sc.prune_(model, sc.method_config("sparsegpt", pattern="2:4", learn_mask={"epochs": 1},
                                              reconstruct={"epochs": 1}), calib, progress=False)
    params = dict(model.named_parameters())
    for name, keep in state.masks.items():
        assert NM(2, 4).is_valid(keep) and torch.all(params[name][~keep] == 0), name
        assert "learn_mask" in state.info[name] and "reconstruct" in state.info[name]


def test_stage_bad_input_and_failure_leave_the_model_unchanged(tiny_llama_tok_dir, monkeypatch):
    import sparsecraft as sc
    from sparsecraft.oneshot import block_tuning

    model, calib = _tiny(tiny_llama_tok_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="at least one more"):  # 8 samples = one batch of 8
        sc.prune_(model, sc.method_config("sparsegpt", sparsity=0.5, reconstruct=True), calib[:8], progress=False)
    with pytest.raises(ConfigError, match="calibration"):
        sc.prune_(model, sc.method_config("sparsegpt", sparsity=0.5, reconstruct=True), None, progress=False)
    with pytest.raises(ConfigError, match="time_budget"):
        sc.method_config("sparsegpt", sparsity=0.5, reconstruct={"time_budget": 0})
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    real = block_tuning.tune_block_
    monkeypatch.setattr(block_tuning, "tune_block_", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        sc.prune_(model, sc.method_config("sparsegpt", sparsity=0.5, reconstruct=True), calib, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_cli_reconstruct_and_options(tiny_llama_tok_dir, tmp_path, capsys):
    from sparsecraft.checkpoint import is_checkpoint
    from sparsecraft.cli import main

    base = ["-q", "prune", str(tiny_llama_tok_dir), "--samples", "16", "--seq-len", "16"]
    out = tmp_path / "r"
    assert main([*base, "--method", "admm", "--pattern", "2:4", "--reconstruct", "--sequential",
                 "--option", "reconstruct={epochs: 1, lr: 1e-4}", "--option", "rho=0.2", "--out", str(out)]) == 0
    assert is_checkpoint(out)
    capsys.readouterr()
    for extra, words in ((["--option", "rho=0.2", "--method", "sparsegpt"], "'rho'"),
                         (["--learn-mask"], "reconstruct"),
                         (["--reconstruct", "--option", "reconstruct={lr: -1}"], "lr"),
                         (["--reconstruct", "--option", "learn_mask={method: gradient}"], "method")):
        assert main([*base, "--pattern", "2:4", *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / "bad").exists()


def test_micro_batches_are_exact_slices_of_the_calibration_batches(llama_block):
    from sparsecraft.oneshot.block_tuning import _forward, _micro_batches

    block, batches, targets = llama_block
    pieces, piece_targets = _micro_batches(batches, targets, 1)
    assert len(pieces) == sum(b.hidden.shape[0] for b in batches)
    with torch.no_grad():
        whole = torch.cat([_forward(block, b) for b in batches])
        cut = torch.cat([_forward(block, b) for b in pieces])
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat(piece_targets), torch.cat(targets))


def test_one_step_per_micro_batch(pruned_block):
    block, batches, targets, masks = pruned_block
    samples = sum(b.hidden.shape[0] for b in batches[:-2])
    one = tune_block_(block, batches, targets, masks, lr=1e-3, epochs=1, holdout=2, micro_batch=1)
    assert one["steps"] == samples
    whole = tune_block_(block, batches, targets, masks, lr=1e-3, epochs=1, holdout=2, micro_batch=None)
    assert whole["steps"] == len(batches) - 2
    with pytest.raises(ConfigError, match="micro_batch"):
        tune_block_(block, batches, targets, masks, micro_batch=0)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_reconstruct_can_tune_only_some_layers():
    import sparsecraft as sc

    from conftest import assert_unchanged, snapshot

    calib = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    plain, tuned = _tiny_llama(), _tiny_llama()
    sc.prune_(plain, sc.SparseGPT(sparsity=0.5, batch_size=2), calib, progress=False)
    state = sc.prune_(tuned, sc.SparseGPT(sparsity=0.5, batch_size=2, reconstruct={"layers": ["mlp.*"]}),
                      calib, progress=False)
    a, b = dict(plain.named_parameters()), dict(tuned.named_parameters())
    for name in state.masks:
        if name.startswith("model.layers.0.self_attn."):  # not tuned: SparseGPT's weights exactly
            assert torch.equal(a[name], b[name]), name
        if name.startswith("model.layers.0.mlp."):
            assert not torch.equal(a[name], b[name]), name
    fresh = _tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(ConfigError, match="match none"):
        sc.prune_(fresh, sc.SparseGPT(sparsity=0.5, batch_size=2, reconstruct={"layers": ["nothing.*"]}), calib,
                  progress=False)
    assert_unchanged(fresh, before)


def test_a_total_time_budget_is_shared_over_the_blocks():
    import sparsecraft as sc

    calib = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    state = sc.prune_(_tiny_llama(), sc.SparseGPT(sparsity=0.5, batch_size=2, reconstruct={
        "total_time_budget": 0.4, "epochs": 10_000, "patience": 10_000}), calib, progress=False)
    per_block = {n.split(".")[2]: i["reconstruct"] for n, i in state.info.items()}
    assert set(per_block) == {"0", "1"}
    assert all(s["stopped"] == "time budget" for s in per_block.values())
    # each block stops after the step that passes its share: the total stays near the budget
    assert sum(s["seconds"] for s in per_block.values()) < 0.4 + 0.5
    with pytest.raises(ConfigError, match="total_time_budget"):
        sc.SparseGPT(sparsity=0.5, reconstruct={"total_time_budget": 0}).validate()
