import pytest
import torch

import sparsecraft as sc
from sparsecraft import SparsecraftError


def _train(model, opt, steps=5):
    for _ in range(steps):
        x = torch.randn(8, 4, 8, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masks_survive_optimizer_steps_even_with_stale_moments(cnn, opt_name):
    opt = (torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.AdamW(cnn.parameters(), lr=0.01))
    _train(cnn, opt)  # build non-zero momentum / Adam moments for every weight first
    state = sc.prune_(cnn, sc.Magnitude(sparsity=0.6))
    state.attach_optimizer(opt)
    masks = {n: m.clone() for n, m in state.masks.items()}
    params = dict(cnn.named_parameters())
    for name, keep in masks.items():  # gradients left from before pruning are masked too
        assert (params[name].grad[~keep] == 0).all()
    opt.zero_grad()
    x = torch.randn(8, 4, 8, 8)
    cnn(x).pow(2).mean().backward()
    for name, keep in masks.items():
        assert (params[name].grad[~keep] == 0).all(), "gradient of pruned weight"
        assert (params[name].grad[keep] != 0).any()
    opt.zero_grad()
    _train(cnn, opt, steps=5)
    for name, keep in masks.items():
        assert (params[name][~keep] == 0).all()
        assert abs((params[name] == 0).float().mean().item() - 0.6) < 0.01


def test_finalize_removes_hooks_and_keeps_zeros(cnn):
    state = sc.prune_(cnn, sc.Magnitude(sparsity=0.5))
    w = cnn.conv2.weight
    zeros = (w == 0).clone()
    state.finalize_()
    assert not state.masks
    cnn(torch.randn(2, 4, 8, 8)).sum().backward()
    assert (w.grad[zeros] != 0).any()  # no more gradient masking
    assert sc.get_meta(cnn)["conv2.weight"]["pattern"] == "unstructured"
    with pytest.raises(SparsecraftError, match="finalized"):
        state.apply_()
    with pytest.raises(SparsecraftError, match="finalized"):
        state.sparsity()  # no silent 0.0 once the masks are gone


def test_state_dict_round_trip(cnn):
    import copy

    other = copy.deepcopy(cnn)
    state = sc.prune_(cnn, sc.Magnitude(sparsity=0.7, pattern="rows"))
    saved = state.state_dict()
    fresh = sc.SparsityState(other)
    fresh.load_state_dict(saved)
    for name in saved["masks"]:
        assert torch.equal(fresh.masks[name], state.masks[name])
        assert torch.equal(dict(other.named_parameters())[name], dict(cnn.named_parameters())[name])
    assert fresh.info == state.info


def test_load_state_dict_rejects_wrong_shape_without_change(cnn):
    state = sc.prune_(cnn, sc.Magnitude(sparsity=0.5))
    before = {n: m.clone() for n, m in state.masks.items()}
    bad = state.state_dict()
    bad["masks"]["conv1.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(SparsecraftError, match="conv1.weight"):
        state.load_state_dict(bad)
    for n in before:
        assert torch.equal(before[n], state.masks[n])


def test_pruned_weights_are_positive_zero(cnn):
    with torch.no_grad():
        cnn.conv2.weight.copy_(-cnn.conv2.weight.abs() - 0.1)  # all negative
    state = sc.prune_(cnn, sc.Magnitude(sparsity=0.5))
    pruned = cnn.conv2.weight[~state.masks["conv2.weight"]]
    assert not torch.signbit(pruned).any()  # no -0.0, which would cost bits in files


def test_finalize_writes_positive_zero_even_after_a_weight_was_moved_negative(cnn):
    state = sc.prune_(cnn, sc.Magnitude(sparsity=0.5))
    name = "conv1.weight"
    keep = state.masks[name]
    with torch.no_grad():
        cnn.conv1.weight[~keep] = -1.0  # something moved pruned weights (not our optimizers)
    state.apply_()
    assert torch.all(cnn.conv1.weight[~keep] == 0)
    state.finalize_()
    assert not torch.signbit(cnn.conv1.weight[~keep]).any()
