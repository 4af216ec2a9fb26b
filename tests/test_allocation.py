import math

import pytest
import torch

from sparsecraft import ConfigError, TargetError, allocate, select_targets
from sparsecraft.allocation import erk_counts, global_counts


def _magnitude(t):
    return t.param.detach().abs()


def test_uniform(tiny_lm):
    targets = select_targets(tiny_lm)
    assert set(allocate(targets, 0.6).values()) == {0.6}


def test_global_is_one_threshold_and_exact(tiny_lm):
    targets = select_targets(tiny_lm)
    counts = global_counts(targets, 0.7, _magnitude, max_sparsity=1.0)
    total = sum(t.param.numel() for t in targets)
    assert sum(counts.values()) == math.floor(0.7 * total + 0.5)
    # same as sorting all magnitudes together
    allw = torch.cat([t.param.detach().abs().flatten() for t in targets])
    threshold = torch.sort(allw).values[sum(counts.values()) - 1]
    for t in targets:
        assert counts[t.name] == int((t.param.detach().abs() <= threshold).sum())


def test_global_cap_keeps_every_layer_alive(tiny_lm):
    targets = select_targets(tiny_lm)
    with torch.no_grad():
        targets[0].param.mul_(1e-6)  # this layer would be emptied without a cap
    counts = global_counts(targets, 0.5, _magnitude, max_sparsity=0.9)
    n0 = targets[0].param.numel()
    assert counts[targets[0].name] == math.floor(0.9 * n0)
    assert sum(counts.values()) == math.floor(0.5 * sum(t.param.numel() for t in targets) + 0.5)


def test_global_handles_ties_exactly(tiny_lm):
    targets = select_targets(tiny_lm)
    with torch.no_grad():
        for t in targets:
            t.param.fill_(1.0)
    counts = global_counts(targets, 0.3, _magnitude, max_sparsity=1.0)
    assert sum(counts.values()) == math.floor(0.3 * sum(t.param.numel() for t in targets) + 0.5)


def test_erk_densities_follow_formula_and_total_is_exact(cnn):
    targets = select_targets(cnn)
    counts = erk_counts(targets, 0.8)
    total = sum(t.param.numel() for t in targets)
    assert sum(counts.values()) == math.floor(0.8 * total + 0.5)
    density = {t.name: 1 - counts[t.name] / t.param.numel() for t in targets}
    raw = {t.name: sum(t.shape) / math.prod(t.shape) for t in targets}
    free = [t.name for t in targets if density[t.name] < 1]
    ratios = [density[n] / raw[n] for n in free]
    assert max(ratios) / min(ratios) < 1.05  # density proportional to the ERK score
    assert density["conv1.weight"] > density["fc.weight"]  # small layers stay denser


def test_overrides_pin_layers_first_rule_wins(tiny_lm):
    targets = select_targets(tiny_lm)
    out = allocate(targets, 0.5, overrides={"blocks.0.*": 0.9, "*.up.*": 0.1})
    assert out["blocks.0.up.weight"] == 0.9 and out["blocks.0.down.weight"] == 0.9
    assert out["blocks.1.up.weight"] == 0.1 and out["blocks.1.down.weight"] == 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half", True])
def test_bad_sparsity(tiny_lm, bad):
    with pytest.raises(ConfigError, match="sparsity"):
        allocate(select_targets(tiny_lm), bad)


def test_bad_override_and_method(tiny_lm):
    targets = select_targets(tiny_lm)
    with pytest.raises(TargetError, match="override rule 'nope' matches no target"):
        allocate(targets, 0.5, overrides={"nope": 0.5})
    with pytest.raises(ConfigError, match="unknown allocation 'magic'"):
        allocate(targets, 0.5, "magic")


def test_sampled_bracket_and_full_bisection_agree(tiny_lm, monkeypatch):
    import sparsecraft.allocation as alloc

    targets = select_targets(tiny_lm)
    with torch.no_grad():
        targets[1].param.mul_(1e-3)  # make the cap bind on one layer
    fast = global_counts(targets, 0.6, _magnitude, max_sparsity=0.95)
    monkeypatch.setattr(alloc, "_counts_in_bracket", lambda *a, **k: None)  # force the fallback
    slow = global_counts(targets, 0.6, _magnitude, max_sparsity=0.95)
    assert fast == slow
    # a bracket that misses the threshold is detected, not trusted
    sizes = [t.param.numel() for t in targets]
    caps = [int(0.95 * n) for n in sizes]
    k = int(0.6 * sum(sizes) + 0.5)
    high = alloc._sortable_keys(torch.tensor([10.0])).item()
    monkeypatch.undo()
    assert alloc._counts_in_bracket(targets, _magnitude, caps, k, high, high + 5) is None


def test_one_registry_and_owl_declares_its_statistic(tiny_lm):
    import sparsecraft.oneshot  # noqa: F401  (registers owl)
    from sparsecraft.allocation import ALLOCATIONS, get_allocation

    assert list(ALLOCATIONS)[:4] == ["uniform", "global", "erk", "owl"]
    assert get_allocation("owl").requires == ("input_sq_norm",)
    targets = select_targets(tiny_lm)
    with pytest.raises(ConfigError, match="allocation 'owl' needs calibration statistics"):
        allocate(targets, 0.5, "owl")
    with pytest.raises(ConfigError, match="allocation 'erk' has no option 'owl_m'"):
        allocate(targets, 0.5, "erk", options={"owl_m": 3.0})
    # with the statistic supplied, OWL gives exact totals without the driver
    stats = {t.name: {"input_sq_norm": torch.rand(t.param.shape[1], generator=torch.Generator().manual_seed(i))}
             for i, t in enumerate(targets)}
    out = allocate(targets, 0.5, "owl", stats=stats, options={"owl_lambda": 0.1})
    pruned = sum(round(out[t.name] * t.param.numel()) for t in targets)
    assert pruned == math.floor(0.5 * sum(t.param.numel() for t in targets) + 0.5)
