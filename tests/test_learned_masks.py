"""Learned N:M masks: valid groups after hardening, never worse than the prior, bad input refused."""

import pytest
import torch

from sparsecraft.errors import ConfigError
from sparsecraft.oneshot.learned_masks import learn_nm_masks, nm_choices
from sparsecraft.patterns import NM


def test_choices_enumerate_every_valid_group():
    c = nm_choices(2, 4)
    assert c.shape == (6, 4) and torch.all(c.sum(1) == 2) and len({tuple(r.tolist()) for r in c}) == 6
    assert nm_choices(4, 8).shape == (70, 8)


@pytest.fixture
def block_data(llama_block):
    block, batches, targets = llama_block
    names = [n for n, _ in block.named_parameters() if n.endswith("proj.weight")]
    return block, batches, targets, names


def test_learning_repairs_a_bad_prior_and_every_group_is_valid(block_data):
    block, batches, targets, names = block_data
    params = dict(block.named_parameters())
    pattern = NM(2, 4)
    # the worst prior: keep the two SMALLEST weights of every group
    prior = {n: pattern.keep_mask(-params[n].detach().abs()) for n in names}
    before = {n: p.detach().clone() for n, p in params.items()}
    for tune_weights in (True, False):
        masks, weights, summary = learn_nm_masks(block, batches, targets, prior, pattern, epochs=3, holdout=1,
                                                 tune_weights=tune_weights, method="gumbel")
        for n in names:
            assert pattern.is_valid(masks[n]) and masks[n].shape == params[n].shape
            assert torch.all(weights[n][~masks[n]] == 0)
        assert summary["val_best"] < summary["val_prior"] and summary["changed"] > 0.1, tune_weights
        for n, p in block.named_parameters():
            assert torch.equal(p, before[n])  # the block itself is untouched


def test_result_never_worse_than_the_prior_on_held_out(block_data):
    block, batches, targets, names = block_data
    params = dict(block.named_parameters())
    pattern = NM(2, 4)
    prior = {n: pattern.keep_mask(params[n].detach().abs()) for n in names}
    masks, weights, summary = learn_nm_masks(block, batches, targets, prior, pattern, epochs=1, lr=5.0, seed=3,
                                             method="gumbel")
    assert summary["val_best"] <= summary["val_prior"]
    if summary["best_epoch"] == 0:
        assert all(torch.equal(masks[n], prior[n]) for n in names)
        assert all(torch.equal(weights[n], params[n].detach() * prior[n]) for n in names)


def test_candidates_are_judged_with_the_weights_they_hand_on(block_data):
    """The prior is judged with the solver's weights (what reconstruction would start from),
    not with the dense weights under its mask: a block holding solved weights that match the
    targets exactly cannot be beaten, so the prior and its weights come back unchanged."""
    from sparsecraft.oneshot.block_tuning import _forward

    block, batches, targets, names = block_data
    params = dict(block.named_parameters())
    pattern = NM(2, 4)
    prior = {n: pattern.keep_mask(params[n].detach().abs()) for n in names}
    dense = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            params[n].mul_(prior[n])  # the block now holds the "solved" weights
        exact = [_forward(block, b).detach() for b in batches]  # targets the solved block meets exactly
    for tune_weights in (True, False):
        masks, weights, summary = learn_nm_masks(block, batches, exact, prior, pattern, dense=dense, epochs=1,
                                                 tune_weights=tune_weights, method="gumbel")
        assert summary["val_prior"] == pytest.approx(0.0, abs=1e-12) and summary["best_epoch"] == 0
        for n in names:
            assert torch.equal(masks[n], prior[n]) and torch.equal(weights[n], params[n].detach())


def test_straight_through_repairs_a_bad_prior(block_data):
    """The straight-through learner grows pruned weights whose gradient asks for them: from the
    worst prior it changes many groups and beats the prior on held-out batches; every group is
    valid and the weights handed on are zero where pruned."""
    block, batches, targets, names = block_data
    params = dict(block.named_parameters())
    pattern = NM(2, 4)
    prior = {n: pattern.keep_mask(-params[n].detach().abs()) for n in names}
    masks, weights, summary = learn_nm_masks(block, batches, targets, prior, pattern, epochs=3, method="ste",
                                             decay=0.05)
    for n in names:
        assert pattern.is_valid(masks[n])
        assert torch.all(weights[n][~masks[n]] == 0)
    assert summary["val_best"] < summary["val_prior"] and summary["changed"] > 0.1


def test_straight_through_starts_from_the_prior_and_without_swaps_is_reconstruction(block_data):
    """Pruned positions start at zero, so the first mask is the prior's even where a kept weight
    is zero (ties go to the prior); with a step too small to swap anything, the masks come
    back as the prior's."""
    block, batches, targets, names = block_data
    params = dict(block.named_parameters())
    pattern = NM(2, 4)
    prior = {n: pattern.keep_mask(params[n].detach().abs()) for n in names}
    with torch.no_grad():
        params[names[0]].mul_(prior[names[0]])
        params[names[0]].view(-1)[:8].zero_()  # kept weights at zero: a tie with the pruned ones
    masks, weights, summary = learn_nm_masks(block, batches, targets, prior, pattern, epochs=1, method="ste",
                                             weight_lr=1e-12)
    assert summary["changed"] == 0.0
    assert all(torch.equal(masks[n], prior[n]) for n in names)


def test_bad_input(block_data):
    block, batches, targets, names = block_data
    params = dict(block.named_parameters())
    pattern = NM(2, 4)
    prior = {n: pattern.keep_mask(params[n].detach().abs()) for n in names}
    with pytest.raises(ConfigError, match="N:M"):
        learn_nm_masks(block, batches, targets, prior, "unstructured")
    with pytest.raises(ConfigError, match="time budget"):
        learn_nm_masks(block, batches, targets, prior, pattern, time_budget=0)
    with pytest.raises(ConfigError, match="weight_lr"):
        learn_nm_masks(block, batches, targets, prior, pattern, weight_lr=0)
    with pytest.raises(ConfigError, match="method"):
        learn_nm_masks(block, batches, targets, prior, pattern, method="gradient")
    with pytest.raises(ConfigError, match="decay"):
        learn_nm_masks(block, batches, targets, prior, pattern, method="ste", decay=1.0)
    with pytest.raises(ConfigError, match="at least one more"):
        learn_nm_masks(block, batches[:1], targets[:1], prior, pattern)
    bad = dict(prior)
    bad[names[0]] = torch.ones_like(prior[names[0]])
    with pytest.raises(ConfigError, match="not a valid 2:4"):
        learn_nm_masks(block, batches, targets, bad, pattern)


def test_the_temperature_anneals_over_the_time_budget_when_it_runs_out_first():
    from sparsecraft.oneshot.learned_masks import temperature

    assert temperature(2.0, 0.05, 0.0) == 2.0
    assert temperature(2.0, 0.05, 1.0) == pytest.approx(0.05)
    # a tenth of the steps done but the whole budget spent: already at the end temperature
    assert temperature(2.0, 0.05, 0.1, 1.0) == pytest.approx(0.05)
    assert temperature(2.0, 0.05, 0.1, 0.5) == pytest.approx(2.0 * (0.05 / 2.0) ** 0.5)
    assert temperature(2.0, 0.05, 0.9, 0.5) == pytest.approx(2.0 * (0.05 / 2.0) ** 0.9)
    assert temperature(2.0, 0.05, 0.1, 3.0) == pytest.approx(0.05)  # never below tau_end
