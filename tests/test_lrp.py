"""LRP: conservation, the rules, and pruning/shrinking by relevance."""

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft.errors import ConfigError
from sparsecraft.oneshot.lrp import relevance
from sparsecraft.structured import ShrinkConfig, shrink_
from sparsecraft.train.zoo import LeNet5


def _relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32, bias=False), nn.ReLU(), nn.Linear(32, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 5, bias=False))


def test_epsilon_rule_conserves_relevance_without_biases():
    net, x = _relu_net(), torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    rel = relevance(net, x, rule="epsilon", epsilon=1e-12)
    logits = net(x)
    assert torch.allclose(rel.outputs, logits.max(1).values, atol=1e-6)
    for name, total in rel.totals.items():  # each layer's input relevance sums to the explained logit
        assert torch.allclose(total, rel.outputs, atol=1e-5), name
    assert torch.allclose(rel.inputs.sum(1), rel.outputs, atol=1e-5)
    for name, w in rel.weights.items():  # so do each layer's weight relevances (over all samples)
        assert abs(float(w.sum()) - float(rel.outputs.sum())) < 1e-4, name


def test_large_epsilon_absorbs_relevance_and_target_selects_class():
    net, x = _relu_net(), torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    small = relevance(net, x, rule="epsilon", epsilon=1e-9).inputs.sum()
    large = relevance(net, x, rule="epsilon", epsilon=10.0).inputs.sum()
    assert abs(float(large)) < abs(float(small))
    target = torch.zeros(16, dtype=torch.long)
    rel = relevance(net, x, target=target)
    assert torch.allclose(rel.outputs, net(x)[:, 0], atol=1e-6)


def test_zplus_relevance_is_non_negative_and_conserved_on_a_cnn():
    torch.manual_seed(0)
    net = LeNet5(28, 10)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rel = relevance(net, x, rule="zplus", epsilon=1e-9)
    keep = rel.outputs > 0  # z+ explains positive evidence
    for name, w in rel.weights.items():
        assert (w >= -1e-7).all(), name
    for name, total in rel.totals.items():
        assert torch.allclose(total[keep], rel.outputs[keep], rtol=1e-3, atol=1e-5), name
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_lrp_prunes_through_prune_with_image_calibration():
    torch.manual_seed(0)
    net = LeNet5(28, 10)
    x = torch.randn(20, 1, 28, 28)
    state = sc.prune_(net, sc.method_config("lrp", sparsity=0.5, rule="zplus"), x, progress=False)
    assert abs(state.sparsity() - 0.5) < 1e-3
    rel = relevance(LeNet5(28, 10), x)  # another model: just the shapes
    assert set(rel.weights) == {"conv1.weight", "conv2.weight", "fc.weight", "head.weight"}


def test_lrp_keeps_the_most_relevant_weights():
    net = _relu_net()
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(3))
    scores = relevance(net, x, rule="zplus").weights["2.weight"]
    state = sc.prune_(net, sc.method_config("lrp", sparsity=0.75, rule="zplus",
                                            targets={"include": ["2.weight"]}), x, progress=False)
    kept = state.masks["2.weight"]
    assert scores[kept].min() >= scores[~kept].max()


def test_lrp_shrinks_conv_filters_by_relevance():
    torch.manual_seed(0)
    net = LeNet5(28, 10)
    x = torch.randn(20, 1, 28, 28)
    rel = relevance(net, x, rule="zplus")
    report = shrink_(net, ShrinkConfig(conv=0.5, criterion="lrp-zplus", batch_size=20), x, progress=False)
    conv1 = next(l for l in report.layers if l.name == "conv1")
    filters = rel.weights["conv1.weight"].sum((1, 2, 3))
    assert sorted(conv1.removed) == sorted(torch.argsort(filters)[:4].tolist())
    assert net.conv1.out_channels == 4 and net(x).shape == (20, 10)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(x + self.a(x))


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_layers_lrp_cannot_handle_are_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="function add at node .add."):
        relevance(_Residual(), x)
    with pytest.raises(ConfigError, match=r"module 'act' \(GELU\)"):
        relevance(_Gelu(), x)
    with pytest.raises(ConfigError, match="unknown LRP rule"):
        relevance(_relu_net(), torch.randn(4, 12), rule="alpha")
    with pytest.raises(ConfigError, match="rule must be one of"):
        sc.method_config("lrp", rule="alpha")
    with pytest.raises(ConfigError, match="real-valued"):
        relevance(_relu_net(), torch.ones(4, 12, dtype=torch.long))
    net = _relu_net()
    with pytest.raises(ConfigError, match="calibration"):
        sc.prune_(net, sc.method_config("lrp", sparsity=0.5), None, progress=False)
    with pytest.raises(ConfigError, match="NaN"):
        sc.prune_(net, sc.method_config("lrp", sparsity=0.5), torch.full((4, 12), float("nan")), progress=False)
