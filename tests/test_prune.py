import math

import pytest
import torch

import sparsecraft as sc
from sparsecraft import NM, ConfigError, TargetError

from conftest import assert_unchanged, snapshot


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "1:8", "2:8"])
def test_prune_nm_on_linear_and_conv(cnn, pattern):
    # conv1 reduction = 4*3*3 = 36 is not divisible by 8, so M=8 falls back for that layer
    fallback = "error" if pattern.endswith(":4") else "unstructured"
    state = sc.prune_(cnn, sc.Magnitude(sparsity=None, pattern=pattern, fallback=fallback))
    n, m = map(int, pattern.split(":"))
    params = dict(cnn.named_parameters())
    for name, keep in state.masks.items():
        w = params[name].detach()
        if w.reshape(w.shape[0], -1).shape[1] % m == 0:
            assert NM(n, m).is_valid(keep)
            assert ((w.reshape(w.shape[0], -1).reshape(-1, m) != 0).sum(1) <= n).all()
        else:
            assert state.info[name]["pattern"] == "unstructured"
            assert int((~keep).sum()) == math.floor((1 - n / m) * w.numel() + 0.5)


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_exact_overall_sparsity(cnn, method, allocation):
    state = sc.prune_(cnn, sc.PruneConfig(method=method, sparsity=0.8, allocation=allocation))
    total = sum(m.numel() for m in state.masks.values())
    pruned = sum(int((~m).sum()) for m in state.masks.values())
    if allocation == "uniform":
        assert pruned == sum(math.floor(0.8 * m.numel() + 0.5) for m in state.masks.values())
    else:
        assert pruned == math.floor(0.8 * total + 0.5)
    params = dict(cnn.named_parameters())
    for name, keep in state.masks.items():
        assert (params[name][~keep] == 0).all()


def test_random_is_seeded_and_differs_from_magnitude(cnn):
    import copy

    a, b, c = copy.deepcopy(cnn), copy.deepcopy(cnn), copy.deepcopy(cnn)
    ma = sc.prune_(a, sc.RandomPrune(sparsity=0.5, seed=3)).masks
    mb = sc.prune_(b, sc.RandomPrune(sparsity=0.5, seed=3)).masks
    mc = sc.prune_(c, sc.Magnitude(sparsity=0.5)).masks
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert not all(torch.equal(ma[n], mc[n]) for n in ma)


def test_block_and_rows_patterns(cnn):
    import copy

    rows = sc.prune_(copy.deepcopy(cnn), sc.Magnitude(sparsity=0.5, pattern="rows"))
    for keep in rows.masks.values():
        assert sc.Rows().is_valid(keep)
    blocks = sc.prune_(copy.deepcopy(cnn), sc.Magnitude(sparsity=0.5, pattern="block:4x4"))
    for keep in blocks.masks.values():
        assert sc.Block(4, 4).is_valid(keep)
        assert int((~keep).sum()) == 16 * math.floor(0.5 * keep.numel() / 16 + 0.5)


def test_fallback_skip_leaves_layer_dense_and_records_it(cnn):
    state = sc.prune_(cnn, sc.Magnitude(sparsity=None, pattern="1:8", fallback="skip"))
    assert "conv1.weight" not in state.masks
    assert (cnn.conv1.weight != 0).all()
    assert sc.get_meta(cnn)["conv1.weight"]["pattern"] == "dense"


def test_config_from_dict_matches_python():
    a = sc.PruneConfig.from_dict({"method": "magnitude", "sparsity": 0.6, "pattern": "block:2x2",
                                  "targets": {"include": "*.up.*"}, "overrides": {"x": 0.1}})
    b = sc.PruneConfig(method="magnitude", sparsity=0.6, pattern="block:2x2",
                       targets=sc.TargetSpec(include=["*.up.*"]), overrides={"x": 0.1})
    assert a == b


# ---- bad input: each fails before anything changes --------------------------------------

BAD_CONFIGS = [
    (dict(sparsity=1.0), ConfigError, "sparsity must be in"),
    (dict(sparsity=-0.1), ConfigError, "sparsity must be in"),
    (dict(sparsity=None, pattern="4:4"), ConfigError, "1 <= N < M"),
    (dict(sparsity=None, pattern="0:4"), ConfigError, "1 <= N < M"),
    (dict(method="lottery"), ConfigError, "unknown method 'lottery'"),
    (dict(pattern="diagonal"), ConfigError, "unknown pattern 'diagonal'"),
    (dict(allocation="magic"), ConfigError, "unknown allocation 'magic'"),
    (dict(sparsity=0.3, pattern="2:4"), ConfigError, "fixes sparsity"),
    (dict(sparsity=None, pattern="2:4", allocation="global"), ConfigError, "only with uniform"),
    (dict(fallback="pray"), ConfigError, "unknown fallback"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CONFIGS)
def test_bad_config_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sc.PruneConfig(**{"method": "magnitude", **kwargs})


@pytest.mark.parametrize("kwargs,exc,match", BAD_CONFIGS + [
    (dict(sparsty=0.5), ConfigError, "unknown prune config keys"),
])
def test_bad_config_dict_leaves_model_unchanged(cnn, kwargs, exc, match):
    before = snapshot(cnn)
    with pytest.raises(exc, match=match):
        sc.prune_(cnn, {"method": "magnitude", **kwargs})
    assert_unchanged(cnn, before)


def test_pattern_not_fitting_a_layer_leaves_model_unchanged(cnn):
    before = snapshot(cnn)
    with pytest.raises(TargetError, match="layer 'conv1.weight'.*divisible by M=8"):
        sc.prune_(cnn, sc.Magnitude(sparsity=None, pattern="2:8"))
    assert_unchanged(cnn, before)


def test_nan_or_inf_weight_leaves_model_unchanged(cnn):
    with torch.no_grad():
        cnn.fc.weight[3, 7] = float("nan")
    before = snapshot(cnn)
    with pytest.raises(TargetError, match="layer 'fc.weight'.*NaN or inf"):
        sc.prune_(cnn, sc.Magnitude(sparsity=0.5))
    assert torch.isnan(cnn.fc.weight[3, 7])
    cnn.fc.weight.data[3, 7] = 0.0
    before["fc.weight"][3, 7] = 0.0
    assert_unchanged(cnn, before)
    with torch.no_grad():
        cnn.conv2.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(TargetError, match="conv2.weight"):
        sc.prune_(cnn, sc.Magnitude(sparsity=0.5))


def test_rule_matching_nothing_leaves_model_unchanged(cnn):
    before = snapshot(cnn)
    with pytest.raises(TargetError, match="matches no parameter"):
        sc.prune_(cnn, sc.Magnitude(sparsity=0.5, targets={"include": ["*.attn.*"]}))
    with pytest.raises(TargetError, match="override rule"):
        sc.prune_(cnn, sc.Magnitude(sparsity=0.5, overrides={"*.attn.*": 0.2}))
    assert_unchanged(cnn, before)
