"""sparsecraft.bayes: variational layers, KL terms, uncertainty measures, VD/ARD, SSVI, Turbo-VBI."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsecraft import bayes
from sparsecraft.bayes.priors import log_uniform_kl
from sparsecraft.bayes.turbo import TurboPrior
from sparsecraft.errors import ConfigError, TargetError
from sparsecraft.masks import SparsityState
from sparsecraft.train.base import StateMismatch
from sparsecraft.train.runner import TrainRecipe, run_training


def _mlp(seed=0, sizes=(20, 16, 4)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# -- KL terms -----------------------------------------------------------------------------------
def test_gaussian_kl_matches_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, log_s2 = torch.randn(50, generator=g), torch.randn(50, generator=g) - 2
    for var in (0.3, 1.0, 4.0):
        mine = bayes.gaussian_kl(mu, log_s2, var)
        ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * log_s2)),
                                                torch.distributions.Normal(0.0, math.sqrt(var)))
        assert torch.allclose(mine, ref, atol=1e-5)


def test_log_uniform_kl_is_molchanovs_approximation():
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    mu = torch.tensor([1.0, 1.0, 1.0])
    log_s2 = torch.tensor([0.0, -4.0, 2.0])  # log alpha = 0, -4, 2
    la = log_s2
    expected = -(k1 * torch.sigmoid(k2 + k3 * la) - 0.5 * torch.log1p(torch.exp(-la)) - k1)
    assert torch.allclose(log_uniform_kl(mu, log_s2), expected, atol=1e-5)
    # the KL falls as the weight becomes noise (alpha up) and vanishes in the limit
    big = log_uniform_kl(torch.tensor([1e-4]), torch.tensor([5.0]))
    assert float(big) < 1e-3 and float(expected[1]) > float(expected[0]) > float(expected[2])


def test_layer_kl_sums_over_kept_weights_only_and_masks_apply():
    model = _mlp()
    bayes.bayesian_(model, "gaussian", var=0.5, init_log_sigma2=-6.0)
    layer = model[0]
    full = layer.kl()
    ref = bayes.gaussian_kl(layer.weight, layer.log_sigma2, 0.5).sum()
    assert torch.allclose(full, ref)
    keep = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    state = SparsityState(model)
    state.attach("0.weight", keep)  # the library's masks zero the mean ...
    masked = bayes.gaussian_kl(layer.weight, layer.log_sigma2, 0.5)[keep].sum()
    assert torch.allclose(layer.kl(), masked)  # ... and the pruned weights leave the KL
    x = torch.randn(7, 20)
    var = F.linear(x * x, torch.exp(layer.log_sigma2) * keep)
    assert torch.allclose(F.linear(x * x, layer.weight_var()), var)


# -- local reparameterisation ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_local_reparameterisation_matches_sampled_weights(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = bayes.BayesLinear(6, 3, init_log_sigma2=-2.0)
        x = torch.randn(1, 6)
        op = lambda w, b: F.linear(x, w, b)  # noqa: E731
    else:
        layer = bayes.BayesConv2d(2, 3, 3, init_log_sigma2=-2.0)
        x = torch.randn(1, 2, 3, 3)  # one output position per filter
        op = lambda w, b: F.conv2d(x, w, b)  # noqa: E731
    with torch.no_grad():
        layer.log_sigma2.add_(torch.rand(layer.log_sigma2.shape))
    n = 20000
    layer.noise_generator = torch.Generator().manual_seed(1)
    with torch.no_grad(), bayes.sampling(layer):
        local = layer(x.expand(n, *x.shape[1:])).reshape(n, -1)
        # sampling whole weight tensors: one output position, so a product with the flat input
        g = torch.Generator().manual_seed(2)
        sigma = torch.exp(0.5 * layer.log_sigma2).reshape(layer.weight.shape[0], -1)
        mu = layer.weight.reshape(layer.weight.shape[0], -1)
        w = mu + sigma * torch.randn(n, *mu.shape, generator=g)
        direct = torch.einsum("noi,i->no", w, x.reshape(-1)) + layer.bias
    exact_mean = op(layer.weight, layer.bias).reshape(-1)
    var_op = F.linear if kind == "linear" else F.conv2d
    exact_var = var_op(x * x, torch.exp(layer.log_sigma2)).reshape(-1).detach()
    exact_mean = exact_mean.detach()
    for draws in (local, direct):
        se = torch.sqrt(exact_var / n)
        assert ((draws.mean(0) - exact_mean).abs() < 4 * se).all()
        assert torch.allclose(draws.var(0), exact_var, rtol=0.05)
    # the mean prediction (eval, no sampling) uses the mean weights
    layer.eval()
    assert torch.equal(layer(x).reshape(-1), exact_mean.detach())


def test_bayesian_and_deterministic_conversion_keep_parameters():
    model = _mlp()
    weight = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    new = bayes.bayesian_(model)
    assert model[0].weight is weight and len(new) == 2 and isinstance(model[2], bayes.BayesLinear)
    opt.add_param_group({"params": new})
    x = torch.randn(5, 20)
    model.eval()
    before = model(x)
    bayes.deterministic_(model)
    assert type(model[0]) is nn.Linear and model[0].weight is weight
    assert torch.equal(model(x), before)


# -- measures ------------------------------------------------------------------------------------------
def test_measures_against_hand_values():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    y = torch.tensor([0, 1, 1])
    assert bayes.nll(probs, y) == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7)) / 3, rel=1e-6)
    # confidences 0.9, 0.6, 0.7 fall into three different bins of 15: |1-.9| + |0-.6| + |1-.7|
    assert bayes.ece(probs, y) == pytest.approx((0.1 + 0.6 + 0.3) / 3, rel=1e-5)
    # one bin: |accuracy 2/3 - mean confidence 2.2/3|
    assert bayes.ece(probs, y, bins=1) == pytest.approx(abs(2 / 3 - 2.2 / 3), rel=1e-5)
    assert bayes.brier(probs, y) == pytest.approx((0.02 + 0.72 + 0.18) / 3, rel=1e-5)
    assert bayes.entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2))
    assert bayes.auroc(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.5, 0.4])) == pytest.approx(4.5 / 6)
    # a confidence exactly on a bin edge belongs to the bin below it
    assert bayes.ece(torch.tensor([[0.6, 0.4]]), torch.tensor([0]), bins=5) == pytest.approx(0.4)


def test_uncertainty_report_and_ood_sets():
    model = _mlp(sizes=(16, 8, 3))
    bayes.bayesian_(model, init_log_sigma2=-1.0)
    x = torch.randn(40, 1, 4, 4)
    flat = nn.Sequential(nn.Flatten(), model)
    y = torch.randint(0, 3, (40,))
    ood = bayes.ood_inputs(x, "rotated")
    assert torch.equal(ood[0, 0], torch.rot90(x[0, 0]))
    a = bayes.uncertainty_report(flat, x, y, ood, samples=5)
    b = bayes.uncertainty_report(flat, x, y, ood, samples=5)
    assert a == b  # seeded draws, independent of the global generator
    assert set(a) == {"accuracy", "nll", "ece", "brier", "entropy_in", "entropy_ood", "auroc_ood"}
    mean = bayes.uncertainty_report(flat, x, y, samples=None)
    assert mean["nll"] != a["nll"]


# -- bad input: clear errors, model unchanged ----------------------------------------------------------
def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    types, state = snap
    assert [type(m) for m in model.modules()] == types
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("build,match", [
    (lambda m: bayes.SSVI(m, 1.0, 2, 10, train_size=10), "sparsity"),
    (lambda m: bayes.SSVI(m, -0.1, 2, 10, train_size=10), "sparsity"),
    (lambda m: bayes.SSVI(m, 0.5, 2, 10, train_size=10, prior_var=0.0), "var"),
    (lambda m: bayes.SSVI(m, 0.5, 2, 10, train_size=10, criterion="loud"), "criterion"),
    (lambda m: bayes.SSVI(m, 0.5, 2, 10, train_size=10, samples=0), "samples"),
    (lambda m: bayes.SSVI(m, 0.5, 2, 10, train_size=10, grow_sigma="wide"), "grow_sigma"),
    (lambda m: bayes.VariationalTraining(m, train_size=10, prior_options={"var": -1.0}), "var"),
    (lambda m: bayes.ARD(m, train_size=10, init_var=0.0), "init_var"),
    (lambda m: bayes.VariationalDropout(m, train_size=0), "train_size"),
    (lambda m: bayes.TurboVBI(m, train_size=10, prior_options={"var_active": 0.0}), "var_active"),
    (lambda m: bayes.TurboVBI(m, train_size=10, prior_options={"neuron_prior": 1.5}), "neuron_prior"),
])
def test_bad_settings_are_refused_before_the_model_changes(build, match):
    model = _mlp()
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=match):
        build(model)
    _unchanged(model, snap)


def test_bad_samples_and_ood_shape_are_refused():
    model = _mlp()
    bayes.bayesian_(model)
    snap = _snapshot(model)
    x, y = torch.randn(10, 20), torch.randint(0, 4, (10,))
    with pytest.raises(ConfigError, match="samples"):
        bayes.predict_probs(model, x, samples=0)
    with pytest.raises(ConfigError, match="x_ood"):
        bayes.uncertainty_report(model, x, y, torch.randn(10, 21), samples=2)
    with pytest.raises(ConfigError, match="probs"):
        bayes.nll(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(TargetError, match="no nn.Linear"):
        bayes.bayesian_(nn.Sequential(nn.ReLU()))
    _unchanged(model, snap)


# -- SSVI ---------------------------------------------------------------------------------------------
def _ssvi_run(steps, model=None, **kw):
    torch.manual_seed(0)
    model = model or _mlp(sizes=(20, 32, 32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ssvi = bayes.SSVI(model, 0.8, 3, 20, opt, train_size=64, **kw)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 4, (64,), generator=g)
    return model, opt, ssvi, x, y


def _train_steps(model, opt, ssvi, x, y, steps, counts=None):
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y) + ssvi.loss_term()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ssvi.step()
        if counts is not None:
            counts.append({t.name: int(t.param.count_nonzero()) for t in ssvi.targets})


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_ssvi_keeps_exact_counts_after_every_update(grow):
    model, opt, ssvi, x, y = _ssvi_run(0, grow=grow)
    first = {t.name: int(ssvi.masks[t.name].sum()) for t in ssvi.targets}
    assert {t.name: int(t.param.count_nonzero()) for t in ssvi.targets} == first
    assert ssvi.sparsity() == pytest.approx(0.8, abs=0.01)
    counts = []
    before = {k: v.clone() for k, v in ssvi.masks.items()}
    _train_steps(model, opt, ssvi, x, y, 21, counts)
    assert all(c == first for c in counts)
    assert any(not torch.equal(before[k], ssvi.masks[k]) for k in before)  # the subspace moved
    assert ssvi.flops.ratio() < 0.5


def test_ssvi_removes_the_lowest_snr_weights():
    model, opt, ssvi, x, y = _ssvi_run(0, grow="random", fraction=0.25, decay="constant")
    t = ssvi.targets[0]
    keep = ssvi.masks[t.name]
    layer = t.module
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # SNR order differs from magnitude order: big means with bigger noise rank low
        layer.weight.copy_((torch.rand(keep.shape, generator=g) + 0.1) * keep)
        layer.log_sigma2.copy_(torch.log(layer.weight.abs() * torch.rand(keep.shape, generator=g) * 4 + 1e-3))
    snr = bayes.subspace_scores(layer.weight, layer.log_sigma2, "snr")
    n = int(keep.sum())
    count = int(0.25 * n + 0.5)
    lowest = torch.sort(snr.masked_fill(~keep, float("inf")).flatten(), stable=True).indices[:count]
    ssvi.step_count = 2  # the next step (3) is an update step
    ssvi.step()
    new = ssvi.masks[t.name].flatten()
    still = new[lowest]
    kept_before = keep.flatten().nonzero().flatten()
    others = kept_before[~torch.isin(kept_before, lowest)]
    assert new[others].all()  # every higher-SNR weight stays
    assert int(new.sum()) == n  # the exact count
    # the dropped ones may only come back by random regrowth, as fresh weights
    regrown = lowest[still]
    assert torch.all(layer.weight.detach().flatten()[regrown].abs() < 0.01)


def test_folded_normal_moments_against_closed_forms_and_sampling():
    sigma = torch.tensor([0.5, 2.0, 1e-3, 0.3], dtype=torch.float64)
    mu = torch.tensor([0.0, 0.0, 1.0, -0.4], dtype=torch.float64)
    mean, var = bayes.folded_normal_moments(mu, sigma)
    # mu = 0: a half-normal; |mu| >> sigma: |theta| is theta's normal
    assert mean[:2].tolist() == pytest.approx((sigma[:2] * math.sqrt(2 / math.pi)).tolist(), rel=1e-12)
    assert var[:2].tolist() == pytest.approx((sigma[:2] ** 2 * (1 - 2 / math.pi)).tolist(), rel=1e-12)
    assert (mean[2].item(), var[2].item()) == pytest.approx((1.0, 1e-6), rel=1e-9)
    draws = (mu[3] + sigma[3] * torch.randn(400_000, generator=torch.Generator().manual_seed(0),
                                             dtype=torch.float64)).abs()
    assert mean[3].item() == pytest.approx(float(draws.mean()), abs=2e-3)
    assert var[3].item() == pytest.approx(float(draws.var()), rel=1e-2)


def test_ssvi_paper_criteria_rank_as_their_definitions():
    g = torch.Generator().manual_seed(1)
    mu, log_s2 = torch.randn(200, generator=g) * 0.1, torch.randn(200, generator=g) - 5
    snr = bayes.subspace_scores(mu, log_s2, "snr")
    # SNR of |theta| depends on |mu| / sigma alone and grows with it: the same removal order
    assert torch.equal(torch.argsort(bayes.subspace_scores(mu, log_s2, "snr_abs"), stable=True),
                       torch.argsort(snr, stable=True))
    mean, _ = bayes.folded_normal_moments(mu, torch.exp(0.5 * log_s2))
    assert torch.allclose(bayes.subspace_scores(mu, log_s2, "mean_abs"), mean.float())


def test_ssvi_grown_weights_take_the_layers_mean_variance():
    model, opt, ssvi, x, y = _ssvi_run(0, grow="random", grow_sigma="mean", fraction=0.25, decay="constant")
    t = ssvi.targets[0]
    keep = ssvi.masks[t.name]
    with torch.no_grad():
        t.module.log_sigma2.copy_(torch.linspace(-9, -3, keep.numel()).reshape(keep.shape))
    before = t.module.log_sigma2.detach().clone()
    ssvi.step_count = 2  # the next step (3) is an update step
    ssvi.step()
    new, after = ssvi.masks[t.name], t.module.log_sigma2.detach()
    grown = new & (after != before)  # new positions, and dropped ones grown back as fresh weights
    assert (new & ~keep).any() and not (new & ~keep & ~grown).any()
    expected = before[new & ~grown].mean()
    assert torch.all(after[grown] == expected)
    assert float(expected) != pytest.approx(ssvi.elbo.init_log_sigma2)


def test_ssvi_state_round_trip_and_bit_exact_resume():
    model, opt, ssvi, x, y = _ssvi_run(0)
    _train_steps(model, opt, ssvi, x, y, 8)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
             "ssvi": ssvi.state_dict()}
    import copy

    saved = copy.deepcopy(saved)
    _train_steps(model, opt, ssvi, x, y, 10)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, ssvi2, _, _ = _ssvi_run(0)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    ssvi2.load_state_dict(saved["ssvi"])
    assert ssvi2.step_count == 8
    _train_steps(model2, opt2, ssvi2, x, y, 10)
    for k, v in final.items():
        assert torch.equal(model2.state_dict()[k], v), k
    # a state from another method or setting is refused before anything changes
    model3, _, ssvi3, _, _ = _ssvi_run(0, criterion="magnitude")
    with pytest.raises(StateMismatch):
        ssvi3.load_state_dict(saved["ssvi"])
    assert ssvi3.step_count == 0


@pytest.mark.parametrize("method,extra", [
    ("ssvi", {"sparsity": 0.9, "options": {"update_every": 10}}),
    ("vd", {"sparsity": None}),
    ("turbo-vbi", {"sparsity": None, "options": {"update_every": 7}}),
])
def test_variational_recipes_resume_bit_exact(tmp_path, method, extra):
    recipe = TrainRecipe(data="digits", method=method, steps=40, checkpoint_every=15, batch_size=32,
                         optimizer="adamw", lr=1e-3, weight_decay=0.0, **extra)
    full = run_training(recipe, tmp_path / "full", progress=False, return_model=True)
    part = run_training(recipe, tmp_path / "part", progress=False, stop_after=30)
    assert part["step"] == 30
    resumed = run_training(recipe, tmp_path / "part", progress=False, return_model=True)
    for (name, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("mc_nll", "mc_ece", "mc_brier", "mc_auroc_ood"):
        assert full[key] == resumed[key]
    if method == "ssvi":
        assert resumed["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert 0 < full["train_flops_ratio"] < 0.3


# -- VD and ARD ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [bayes.VariationalDropout, bayes.ARD])
def test_vd_and_ard_prune_irrelevant_inputs(cls):
    # y depends on the first 3 of 12 inputs: the posterior must call the other inputs noise
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 12, generator=g)
    y = (x[:, :3] @ torch.tensor([2.0, -3.0, 1.5]) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    kwargs = {"em_every": 10} if cls is bayes.ARD else {}
    vi = cls(model, opt, train_size=512, init_log_sigma2=-6.0, **kwargs)
    for _ in range(400):
        loss = F.cross_entropy(model(x), y) + vi.loss_term()
        opt.zero_grad()
        loss.backward()
        opt.step()
        vi.step()
    vi.finalize_()
    kept = (model[0].weight != 0).any(0)
    assert kept[:3].all() and int(kept[3:].sum()) <= 1  # (ARD's EM may leave one noise input at 400 steps)
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.95


# -- Turbo-VBI ---------------------------------------------------------------------------------------
def test_support_posterior_finds_clustered_neurons():
    llr = torch.full((6, 30), -3.0)
    llr[1, 5:15] = 4.0  # neuron 1: one run of strong evidence
    llr[4, 10:25] = 2.0
    llr[3, ::6] = 3.0  # scattered evidence: weaker support under the clustered prior
    p_c, pi = bayes.support_posterior(llr, 0.5, 0.05, 0.05, 0.5)
    assert p_c[1] > 0.99 and p_c[4] > 0.99 and (p_c[[0, 2, 5]] < 0.2).all()
    assert (pi[1, 5:15] > 0.9).all() and (pi[1, :4] < 0.1).all()
    free, _ = bayes.support_posterior(llr, 0.5, 0.05, 0.05, 0.5, neuron_free=True)
    assert (free == 1).all()


def test_turbo_vbi_recovers_the_true_neurons():
    # teacher: 12 hidden neurons, only 0, 5 and 9 connected; the student starts from the teacher
    # plus noise on every weight (a dense "pretrained" model) and must find the three again
    g = torch.Generator().manual_seed(0)
    w1 = torch.zeros(12, 10)
    w2 = torch.zeros(3, 12)
    true = [0, 5, 9]
    w1[true] = torch.randn(3, 10, generator=g) * 1.5
    w2[:, true] = torch.randn(3, 3, generator=g) * 2
    x = torch.randn(1024, 10, generator=g)
    y = (F.relu(x @ w1.T) @ w2.T).argmax(1)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        model[0].weight.copy_(w1 + 0.3 * torch.randn(12, 10, generator=g))
        model[2].weight.copy_(w2 + 0.3 * torch.randn(3, 12, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    turbo = bayes.TurboVBI(model, opt, train_size=1024, update_every=10, init_log_sigma2=-6.0)
    for _ in range(300):
        loss = F.cross_entropy(model(x), y) + turbo.loss_term()
        opt.zero_grad()
        loss.backward()
        opt.step()
        turbo.step()
    dead = turbo.dead_neurons()["0"]
    turbo.finalize_()
    assert sorted((~dead).nonzero().flatten().tolist()) == true
    model.eval()
    before = model(x)
    assert (before.argmax(1) == y).float().mean() > 0.9
    bayes.deterministic_(model)
    report = bayes.shrink_neurons_(model, {"0": dead})
    assert model[0].out_features == 3 and report is not None
    assert torch.allclose(model(x), before, atol=1e-5)  # removing the zeroed neurons changes nothing


def test_turbo_prior_rejects_bad_settings():
    with pytest.raises(ConfigError, match="inactive_ratio"):
        TurboPrior(var_active=0.1, inactive_ratio=2.0)
    with pytest.raises(ConfigError, match="p01"):
        TurboPrior(p01=1.0)


def test_train_cli_runs_a_variational_recipe(tmp_path, capsys):
    from sparsecraft.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nmodel: mlp\nmethod: vd\nsparsity: null\nsteps: 20\noptimizer: adamw\n"
                      "lr: 0.001\nweight_decay: 0.0\n")
    assert main(["-q", "train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    import json

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {"mc_nll", "mc_ece", "mc_brier", "mc_auroc_ood"} <= set(report)
    code = main(["-q", "train", str(recipe), "--out", str(tmp_path / "bad"), "--set", "method=ssvi",
                 "--set", "sparsity=1.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "sparsity" in err
