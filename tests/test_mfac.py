"""M-FAC / oBERT: the block inverse-Fisher equals the exact inverse; OBS update; prune_ and GMP."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsecraft as sc
from sparsecraft.errors import ConfigError
from sparsecraft.oneshot.mfac import (
    damping,
    gradient_samples,
    inverse_fisher_blocks,
    inverse_fisher_diag,
    mfac_scores,
    obs_update,
)
from sparsecraft.targets import select_targets
from sparsecraft.train import GMP, StateMismatch


def _exact_blocks(g: torch.Tensor, block: int, lam: float) -> list[torch.Tensor]:
    fisher = lam * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / g.shape[0]
    return [torch.linalg.inv(fisher[s:s + block, s:s + block]) for s in range(0, g.shape[1], block)]


@pytest.mark.parametrize("m,n,block", [(5, 10, 4), (12, 8, 8), (3, 7, 7), (20, 33, 16)])
def test_inverse_fisher_equals_exact_inverse(m, n, block):
    g = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(m * n))
    lam = 0.37
    exact = _exact_blocks(g, block, lam)
    diag = inverse_fisher_diag(g, block, lam)
    assert torch.allclose(diag, torch.cat([torch.diagonal(b) for b in exact]), rtol=1e-9, atol=1e-12)
    blocks = inverse_fisher_blocks(g, block, lam)
    for i, b in enumerate(exact):
        k = b.shape[0]
        assert torch.allclose(blocks[i, :k, :k], b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m", [6, 30])  # fewer gradients than block weights (Woodbury), and more (direct)
def test_obs_update_is_the_exact_constrained_minimiser(m):
    g = torch.randn(m, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    lam = 0.2
    new = obs_update(w, keep, g, 12, lam)
    fisher = lam * torch.eye(12, dtype=torch.float64) + g.T @ g / m
    # min d^T F d subject to d_Q = -w_Q: d_K = -F_KK^-1 F_KQ d_Q
    d_k = torch.linalg.solve(fisher[keep][:, keep], fisher[keep][:, ~keep] @ w[~keep])
    assert torch.equal(new[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
    assert torch.allclose(new[keep], w[keep] + d_k)
    # blocks are independent: block 4 uses only its own entries of the Fisher
    blocks = obs_update(w, keep, g, 4, lam)
    for s in range(0, 12, 4):
        sub = obs_update(w[s:s + 4], keep[s:s + 4], g[:, s:s + 4], 4, lam)
        assert torch.allclose(blocks[s:s + 4], sub)


def test_scores_prefer_weights_with_low_curvature():
    w = torch.ones(4, dtype=torch.float64)
    g = torch.zeros(50, 4, dtype=torch.float64)
    g[:, 0] = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 10  # high Fisher for weight 0
    lam = damping(g, 1e-3)
    scores = mfac_scores(w, inverse_fisher_diag(g, 4, lam))
    assert scores.argmax() == 0 and torch.allclose(scores[1:], scores[1:].mean().expand(3))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 6))


def test_gradient_samples_one_per_batch_and_model_unchanged():
    net = _mlp()
    x = torch.randn(12, 10)
    targets = select_targets(net)
    grads = gradient_samples(net, targets, x, batch_size=3)
    assert grads[targets[0].name].shape == (4, targets[0].param.numel())
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_mfac_one_shot_prunes_and_updates_weights():
    net = _mlp()
    x = torch.randn(32, 10, generator=torch.Generator().manual_seed(2))
    dense = net(x).detach()
    plain, updated = _mlp(), _mlp()
    opts = {"sparsity": 0.5, "batch_size": 1, "damp": 1e-3, "block": 24, "targets": {"include": ["2.weight"]}}
    sc.prune_(plain, sc.method_config("mfac", **opts), x, progress=False)
    state = sc.prune_(updated, sc.method_config("mfac", update=True, **opts), x, progress=False)
    assert torch.equal(state.masks["2.weight"], plain[2].weight != 0)
    assert abs(state.sparsity() - 0.5) < 1e-3
    # the OBS update compensates: outputs closer to the dense ones than the same mask without it
    err_plain = (plain(x) - dense).pow(2).mean()
    err_updated = (updated(x) - dense).pow(2).mean()
    assert err_updated < err_plain


_DATA = [(torch.randn(16, 10, generator=torch.Generator().manual_seed(i)),
          torch.randint(0, 6, (16,), generator=torch.Generator().manual_seed(100 + i))) for i in range(64)]


def loss_fn(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def batches(i):
    return _DATA[i % len(_DATA)]


def test_gmp_with_mfac_reaches_target_and_round_trips():
    torch.manual_seed(0)
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)

    gmp = GMP(net, 0.8, start=2, end=10, frequency=2, optimizer=opt, criterion="mfac", loss_fn=loss_fn,
              batches=batches, fisher_samples=4, fisher_block=8)
    events = []
    for step in range(12):
        loss = loss_fn(net, batches(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        events.append(gmp.step())
    assert abs(gmp.sparsity() - 0.8) < 1e-2
    costs = [e for e in events if "seconds" in e]
    assert costs and all(e["bytes"] > 0 for e in costs)
    state = gmp.state_dict()
    other = GMP(_mlp(), 0.8, start=2, end=10, frequency=2, criterion="mfac", loss_fn=loss_fn, batches=batches,
                fisher_samples=4, fisher_block=8)
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[k], v) for k, v in gmp.masks.items())
    magnitude = GMP(_mlp(), 0.8, start=2, end=10, frequency=2)
    with pytest.raises(StateMismatch, match="fisher"):
        magnitude.load_state_dict(state)


def test_bad_mfac_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="needs loss_fn and batches"):
        GMP(_mlp(), 0.5, start=1, end=4, criterion="mfac")
    with pytest.raises(ConfigError, match="criterion must be"):
        GMP(_mlp(), 0.5, start=1, end=4, criterion="fisher")
    with pytest.raises(ConfigError, match="option block"):
        sc.method_config("mfac", block=0)
    from sparsecraft.train.recipe import TrainRecipe

    with pytest.raises(ConfigError, match="criterion 'mfac' only"):
        TrainRecipe(method="gmp", options={"fisher_samples": 4})
    TrainRecipe(method="gmp", options={"criterion": "mfac", "fisher_samples": 4})


# -- fisher="token": the diagonal Fisher of per-token (per-example) gradients -----------------
def test_token_squares_are_the_per_example_squared_gradients():
    """A batch through the hooks gives sum_i (dL_i/dW)^2 of the examples' own gradients, also for
    a layer applied at every position of a sequence whose positions do not interact."""
    from sparsecraft.oneshot.mfac import token_squares

    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = torch.randn(4, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = select_targets(net)
    params = [t.param for t in targets]
    with token_squares(targets) as sums:
        torch.autograd.grad((net(x) * e).sum(), params)
    for t, p in zip(targets, params):
        expected = torch.zeros_like(p)
        for i in range(4):
            for pos in range(6):
                (g,) = torch.autograd.grad((net(x[i, pos]) * e[i, pos]).sum(), [p])
                expected += g * g
        assert torch.allclose(sums[t.name], expected, rtol=1e-12, atol=1e-14)
    # the hooks are gone afterwards
    assert all(not m._forward_hooks for m in net.modules())


def test_token_fisher_prunes_what_the_output_does_not_see_where_wanda_cannot():
    """Hidden units 0-7 feed nothing downstream; their input weights are the largest. Wanda
    (|w| times input norm) keeps them; the token Fisher sees the zero output gradient and keeps
    the weights the output depends on, so the output does not change at all."""
    def net():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
        with torch.no_grad():
            m[0].weight[:8] *= 10.0
            m[2].weight[:, :8] = 0.0
        return m

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    dense = net()(x).detach()
    m = net()
    config = sc.method_config("mfac", sparsity=0.5, fisher="token", damp=1e-12, targets={"include": ["0.weight"]})
    state = sc.prune_(m, config, x, progress=False)
    assert abs(state.sparsity() - 0.5) < 1e-9
    assert torch.equal(m[0].weight[:8], torch.zeros(8, 16)) and (m[0].weight[8:] != 0).all()
    errors = {"token": float((m(x) - dense).detach().pow(2).mean())}
    # Wanda's score on the same layer (Wanda's driver reads token ids, so it is applied by hand):
    # the 128 weights of lowest |w| * ||x_j|| go, the whole layer ranked as one (like the solver)
    wanda = net()
    with torch.no_grad():
        w = wanda[0].weight
        score = w.abs() * x.norm(dim=0)
        w.view(-1)[score.view(-1).argsort()[:128]] = 0.0
    errors["wanda"] = float((wanda(x) - dense).detach().pow(2).mean())
    assert errors["token"] < 1e-12 < errors["wanda"]


def test_token_fisher_sums_and_model_unchanged():
    from sparsecraft.oneshot.mfac import token_fisher

    net = _mlp()
    x = torch.randn(12, 10)
    targets = select_targets(net)
    sums = token_fisher(net, targets, x, batch_size=5)
    assert sums[targets[0].name].shape == targets[0].param.shape and (sums[targets[0].name] > 0).any()
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())


def test_gmp_with_token_fisher_reaches_target():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gmp = GMP(net, 0.8, start=2, end=10, frequency=2, optimizer=opt, criterion="mfac", fisher="token",
              loss_fn=loss_fn, batches=batches, fisher_samples=4)
    for step in range(12):
        loss = loss_fn(net, batches(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        gmp.step()
    assert abs(gmp.sparsity() - 0.8) < 1e-2
    assert all(torch.equal(t.param != 0, gmp.masks[t.name]) for t in gmp.targets)
    assert gmp.config_dict()["fisher_kind"] == "token"


def test_bad_token_fisher_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="diagonal Fisher"):
        sc.method_config("mfac", fisher="token", block=8)
    with pytest.raises(ConfigError, match="diagonal Fisher"):
        sc.method_config("mfac", fisher="token", update=True)
    with pytest.raises(ConfigError, match="fisher must be"):
        sc.method_config("mfac", fisher="kfac")
    with pytest.raises(ConfigError, match="diagonal Fisher"):
        GMP(_mlp(), 0.5, start=1, end=4, criterion="mfac", fisher="token", obs_update=True,
            loss_fn=lambda m, b: m(b).sum(), batches=lambda i: torch.randn(2, 10))
    from sparsecraft.train.recipe import TrainRecipe

    TrainRecipe(method="gmp", options={"criterion": "mfac", "fisher": "token", "fisher_samples": 64})
    with pytest.raises(ConfigError, match="fisher"):
        TrainRecipe(method="gmp", options={"criterion": "mfac", "fisher": "kfac"})
    with pytest.raises(ConfigError, match="criterion 'mfac' only"):
        TrainRecipe(method="gmp", options={"fisher": "token"})
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    with pytest.raises(ConfigError, match="layer '0.weight'.*nn.Linear weights only"):
        sc.prune_(cnn, sc.method_config("mfac", fisher="token"), torch.randn(4, 1, 8, 8), progress=False)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_cli_prunes_a_causal_lm_with_the_token_fisher_and_refuses_bad_options(tiny_llama_tok_dir, tmp_path, capsys):
    from sparsecraft.cli import main

    out = tmp_path / "p"
    base = ["-q", "prune", str(tiny_llama_tok_dir), "--method", "mfac", "--samples", "4", "--seq-len", "16"]
    assert main([*base, "--option", "fisher=token", "--out", str(out)]) == 0
    model = sc.load(out)
    metas = sc.get_meta(model)
    params = dict(model.named_parameters())
    assert metas and all(abs(float((params[n] == 0).float().mean()) - 0.5) < 0.02 for n in metas)
    capsys.readouterr()
    for bad, message in ((["--option", "fisher=kfac"], "fisher must be"),
                         (["--option", "fisher=token", "--option", "block=8"], "diagonal Fisher")):
        assert main([*base, *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()


def _captured_fisher_grads(monkeypatch, **options):
    """Run a GMP with M-FAC through its pruning steps 2, 4 and 6 (sparsity 0, some, 0.8);
    returns the model, the GMP, the gradient stacks its Fisher got and the masks after each call."""
    from sparsecraft.oneshot import mfac

    seen = []
    real = mfac.inverse_fisher_diag

    def spy(grads, block, lam, *args, **kwargs):
        seen.append(grads.clone())
        return real(grads, block, lam, *args, **kwargs)

    monkeypatch.setattr(mfac, "inverse_fisher_diag", spy)
    net = _mlp()
    gmp = GMP(net, 0.8, start=2, end=6, frequency=2, criterion="mfac", loss_fn=loss_fn, batches=batches,
              fisher_samples=2, fisher_block=8, obs_update=False, **options)
    masks = []
    for _ in range(7):
        gmp.step()
        masks.append({k: v.clone() for k, v in gmp.masks.items()})
    return net, gmp, seen, masks


def test_gmp_mfac_fisher_from_examples_and_without_pruned_weights(monkeypatch):
    _, gmp, seen, masks = _captured_fisher_grads(monkeypatch, fisher="examples")
    b = _DATA[0][0].shape[0]
    assert len(seen) == 3  # one target layer (the head is left dense), three pruning steps
    first, second = seen[0], seen[2]
    assert first.shape == (2 * b, 24 * 10)  # one gradient per example of the 2 batches
    # the second pruning step: the weights pruned at the first get no gradient in the Fisher
    pruned = ~masks[3]["0.weight"].reshape(-1)  # after the pruning step at step 4
    assert pruned.any() and torch.equal(second[:, pruned], torch.zeros_like(second[:, pruned]))
    assert (second[:, ~pruned] != 0).any()
    assert abs(gmp.sparsity() - 0.8) < 1e-2
    assert gmp.config_dict()["fisher_kind"] == "examples"
    with pytest.raises(ConfigError, match="fisher must be one of blocks, examples, token"):
        GMP(_mlp(), 0.8, start=2, end=4, frequency=2, criterion="mfac", loss_fn=loss_fn, batches=batches,
            fisher="example")


def test_gmp_mfac_per_example_gradients_are_the_examples_own():
    from sparsecraft.train.pruning import _examples, accumulate_gradients

    net = _mlp()
    x, y = batches(0)
    parts = _examples((x, y))
    assert len(parts) == x.shape[0] and isinstance(parts[0], tuple) and parts[0][0].shape == (1, *x.shape[1:])
    total = sum(accumulate_gradients(net, loss_fn, [p], ["0.weight"])["0.weight"] for p in parts)
    mean = accumulate_gradients(net, loss_fn, [(x, y)], ["0.weight"])["0.weight"]
    assert torch.allclose(total / x.shape[0], mean, atol=1e-6)  # cross-entropy averages the examples
    with pytest.raises(ConfigError, match="fisher='examples' needs batches"):
        _examples({"x": x})
    with pytest.raises(ConfigError, match="fisher='examples' needs batches"):  # at construction
        GMP(_mlp(), 0.8, start=2, end=4, frequency=2, criterion="mfac", loss_fn=loss_fn,
            batches=lambda i: {"x": x}, fisher="examples")


def test_gmp_mfac_batch_fisher_has_no_gradient_of_pruned_weights(monkeypatch):
    _, _, seen, masks = _captured_fisher_grads(monkeypatch)
    assert seen[0].shape == (2, 24 * 10)  # one gradient per batch
    pruned = ~masks[3]["0.weight"].reshape(-1)
    assert pruned.any() and not seen[2][:, pruned].any() and seen[2][:, ~pruned].any()
