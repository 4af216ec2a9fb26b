"""Training-time sparsity: schedules, methods, resuming, and bad input."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsecraft as sc
from sparsecraft.errors import ConfigError, SparsecraftError
from sparsecraft.patterns import NM, num_to_prune
from sparsecraft.train import (
    GMP,
    IMP,
    SET,
    SRSTE,
    CubicSchedule,
    DecayingNM,
    RigL,
    StateMismatch,
    StaticSparsity,
    UpdateSchedule,
    average_models,
    drop_and_grow,
    sparse_soup,
    sr_ste,
)

from conftest import assert_unchanged, snapshot


def mlp(seed=0, inputs=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))


def data(seed=1, n=128, inputs=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(model, sparsity, opt, steps, x, y, start=0):
    for i in range(start, start + steps):
        xb, yb = x[(i * 32) % len(x):][:32], y[(i * 32) % len(y):][:32]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if sparsity is not None:
            sparsity.step()


def make_opt(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


METHODS = {
    "static": lambda m, o: StaticSparsity(m, 0.8, o),
    "gmp": lambda m, o: GMP(m, 0.8, start=2, end=17, frequency=4, optimizer=o),
    "imp": lambda m, o: IMP(m, 0.8, rounds=2, round_steps=8, rewind_step=2, optimizer=o),
    "set": lambda m, o: SET(m, 0.8, 3, 20, o),
    "rigl": lambda m, o: RigL(m, 0.8, 3, 20, o),
}


# -- schedules -------------------------------------------------------------------------------
def test_cubic_schedule_hits_target_at_last_pruning_step():
    s = CubicSchedule(final=0.9, start=10, end=95, frequency=20)
    assert s.pruning_steps() == [10, 30, 50, 70, 90, 95]
    assert s.sparsity(95) == 0.9 and s.sparsity(10) == 0.0
    values = [s.sparsity(t) for t in s.pruning_steps()]
    assert values == sorted(values)
    assert s.sparsity(50) == pytest.approx(0.9 + (0.0 - 0.9) * (1 - 40 / 85) ** 3)
    assert not s.is_pruning_step(96) and not s.is_pruning_step(11) and s.is_pruning_step(95)


@pytest.mark.parametrize("bad", [
    dict(final=0.5, start=10, end=5), dict(final=0.5, start=0, end=10, frequency=0),
    dict(final=0.3, start=0, end=10, initial=0.5), dict(final=1.0, start=0, end=10),
])
def test_bad_cubic_schedules(bad):
    with pytest.raises(ConfigError):
        CubicSchedule(**bad)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_update_fraction_must_be_in_open_closed_unit_interval(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        UpdateSchedule(every=10, end=100, fraction=fraction)
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="fraction"):
        RigL(model, 0.8, update_every=10, end=100, fraction=fraction)
    assert_unchanged(model, before)


def test_update_fraction_decays_to_zero():
    s = UpdateSchedule(every=10, end=100, fraction=0.3)
    assert s.fraction_at(0) == pytest.approx(0.3) and s.fraction_at(50) == pytest.approx(0.15)
    assert s.fraction_at(100) == 0.0 and not s.is_update_step(100) and s.is_update_step(90)


# -- exact sparsity and zeros ------------------------------------------------------------------
def test_gmp_exact_sparsity_at_every_scheduled_step():
    model, (x, y) = mlp(), data()
    opt = make_opt(model, "sgd")
    gmp = GMP(model, 0.85, start=3, end=23, frequency=5, optimizer=opt)
    previous = {n: torch.ones_like(k) for n, k in gmp.masks.items()}
    seen = []
    for step in range(1, 30):
        train(model, None, opt, 1, x, y, start=step)
        event = gmp.step()
        if gmp.schedule.is_pruning_step(step):
            seen.append(step)
            target = gmp.schedule.sparsity(step)
            for t in gmp.targets:
                assert int((t.param == 0).sum()) == num_to_prune(target, t.param.numel()), (step, t.name)
            assert event["pruned"]
        for n, keep in gmp.masks.items():
            assert not (keep & ~previous[n]).any(), "a pruned weight came back"
            previous[n] = keep.clone()
    assert seen == [3, 8, 13, 18, 23]
    for t in gmp.targets:
        assert int((t.param == 0).sum()) == num_to_prune(0.85, t.param.numel())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_pruned_weights_stay_exactly_zero(method, kind):
    model, (x, y) = mlp(), data()
    opt = make_opt(model, kind)
    sparsity = METHODS[method](model, opt)
    for _ in range(30):
        train(model, sparsity, opt, 1, x, y)
        for t in sparsity.targets:
            keep = sparsity.masks[t.name]
            assert torch.all(t.param[~keep] == 0)
            # nothing pruned has optimizer state that could push it
            st = opt.state.get(t.param, {})
            for key in ("momentum_buffer", "exp_avg"):
                if key in st:
                    assert torch.all(st[key][~keep] == 0), key
    assert sparsity.sparsity() == pytest.approx(0.8, abs=2e-3)
    total = sum(t.param.numel() for t in sparsity.targets)
    # exact count of pruned positions (grown connections may still sit at zero)
    assert sum(int((~sparsity.masks[t.name]).sum()) for t in sparsity.targets) == round(0.8 * total)


def test_dynamic_methods_keep_each_layer_count_and_move_connections():
    model, (x, y) = mlp(), data()
    opt = make_opt(model, "sgd")
    rigl = RigL(model, 0.8, 3, 20, opt, fraction=0.5)
    counts = {n: int(k.sum()) for n, k in rigl.masks.items()}
    first = {n: k.clone() for n, k in rigl.masks.items()}
    train(model, rigl, opt, 19, x, y)
    assert {n: int(k.sum()) for n, k in rigl.masks.items()} == counts
    assert any(not torch.equal(first[n], k) for n, k in rigl.masks.items())


# -- RigL and SET decisions --------------------------------------------------------------------
def test_drop_and_grow_on_crafted_case():
    keep = torch.tensor([True, True, True, False, False, False])
    weight = torch.tensor([0.5, -0.1, 2.0, 0.0, 0.0, 0.0])
    grads = torch.tensor([9.0, 9.0, 9.0, 0.2, -3.0, 1.0])
    new, grown = drop_and_grow(keep, weight, grads, 2)
    # drops |w| = 0.1 and 0.5; grows |g| = 9 (just dropped position 1 or 0) ... the largest
    # among inactive-after-drop are positions 0 and 1 (9.0), before 4 (3.0)
    assert new.tolist() == [True, True, True, False, False, False]
    assert grown.tolist() == [True, True, False, False, False, False]
    grads2 = torch.tensor([0.0, 0.0, 9.0, 0.2, -3.0, 1.0])
    new2, grown2 = drop_and_grow(keep, weight, grads2.abs(), 2)
    assert new2.tolist() == [False, False, True, False, True, True]
    assert grown2.tolist() == [False, False, False, False, True, True]


def test_rigl_regrows_largest_dense_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 2))
    rigl = RigL(model, 0.5, update_every=1, end=100, fraction=0.25, allocation="uniform")
    name = "0.weight"
    keep = rigl.masks[name].clone()
    # a loss whose gradient on layer 0 is a known matrix G: L = sum(G * W_eff)
    G = torch.arange(64, dtype=torch.float32).reshape(8, 8).flip(1)
    w = model[0].weight
    (G * w).sum().backward()
    with torch.no_grad():
        before = w.detach().clone()
    event = rigl.step()
    count = int(rigl.schedule.fraction_at(1) * 32 + 0.5)
    expected, grown = drop_and_grow(keep, before, G, count)
    assert torch.equal(rigl.masks[name], expected)
    # the grown positions are the largest |G| among the inactive ones after the drop
    # independent reference: drop the `count` smallest |w| among the active weights...
    flat_keep = keep.flatten()
    active_idx = flat_keep.nonzero().flatten()
    order = torch.argsort(before.abs().flatten()[active_idx])
    after_drop = flat_keep.clone()
    after_drop[active_idx[order[:count]]] = False
    # ...then grow the `count` largest |G| among everything inactive after the drop
    candidates = G.abs().flatten().masked_fill(after_drop, -1)
    top = set(torch.topk(candidates, count).indices.tolist())
    assert set(grown.flatten().nonzero().flatten().tolist()) == top
    assert torch.all(w[grown] == 0)  # grown connections start at zero
    assert event["updated"] and event["moved"] >= count


def test_rigl_without_a_backward_pass_says_so():
    model = mlp()
    rigl = RigL(model, 0.8, update_every=1, end=10)
    with pytest.raises(SparsecraftError, match="no dense gradient"):
        rigl.step()


# -- N:M training ------------------------------------------------------------------------------
def test_sr_ste_gradient_differs_from_ste_by_the_regulariser():
    torch.manual_seed(0)
    w = torch.randn(4, 8, requires_grad=True)
    keep = NM(2, 4).keep_mask(w.detach().abs())
    x = torch.randn(3, 8)
    lam = 0.3
    (x @ sr_ste(w, keep, 0.0).T).pow(2).sum().backward()
    g_ste = w.grad.clone()
    w.grad = None
    (x @ sr_ste(w, keep, lam).T).pow(2).sum().backward()
    assert torch.allclose(w.grad - g_ste, lam * w.detach() * (~keep))
    # plain STE passes the gradient of the masked weight to every dense weight
    w2 = (w.detach() * keep).requires_grad_(True)
    (x @ w2.T).pow(2).sum().backward()
    assert torch.allclose(g_ste, w2.grad)


def test_srste_masks_are_valid_nm_after_training_and_finalize():
    model, (x, y) = mlp(), data()
    opt = make_opt(model, "adamw")
    srste = SRSTE(model, "2:4", opt, decay=2e-4)
    train(model, srste, opt, 10, x, y)
    for t in srste.targets:
        assert NM(2, 4).is_valid(srste.masks[t.name])
        assert NM(2, 4).is_valid(t.module.weight != 0)  # the effective weight is N:M
    srste.finalize_()
    for name, _ in model.named_parameters():
        assert "original" not in name
    assert NM(2, 4).is_valid(model[0].weight != 0) and NM(2, 4).is_valid(model[2].weight != 0)
    assert sc.get_meta(model)["0.weight"]["pattern"] == "2:4"


def test_decaying_nm_gradient_share_and_tightening():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(8, 2))
    d = DecayingNM(model, "1:8", start=0, end=8, tighten=True)
    assert [(s, str(p)) for s, p in d.stages] == [(0, "4:8"), (2, "2:8"), (5, "1:8")]
    dense = model[0].parametrizations.weight.original
    x = torch.randn(5, 16)
    # beta = 1 at the start: the layer computes with the dense weight
    assert torch.equal(model[0].weight, dense.detach())
    for _ in range(4):
        d.step()
    beta = d.beta.factor(d.step_count)
    assert 0 < beta < 1
    keep = d.masks["0.weight"]
    model(x).sum().backward()
    grad = dense.grad
    # the gradient reaching the dense weight is the effective weight's, scaled by beta where pruned
    w_eff = model[0].weight.detach().clone().requires_grad_(True)
    model[1](x @ w_eff.T).sum().backward()
    base = w_eff.grad
    assert torch.allclose(grad, torch.where(keep, base, beta * base))
    for _ in range(10):
        d.step()
    assert d.beta.factor(d.step_count) == 0.0
    assert NM(1, 8).is_valid(model[0].weight != 0)
    assert d.sparsity() == pytest.approx(0.875)


def test_decaying_nm_rejects_loosening_stages():
    with pytest.raises(ConfigError, match="tighten"):
        DecayingNM(mlp(inputs=16), "1:8", end=10, stages=[(0, "1:8"), (5, "2:8"), (8, "1:8")])


# -- IMP -----------------------------------------------------------------------------------------
def test_imp_rewind_restores_step_k_weights_on_kept_positions():
    model, (x, y) = mlp(), data()
    opt = make_opt(model, "sgd")
    imp = IMP(model, 0.75, rounds=2, round_steps=6, rewind_step=2, optimizer=opt)
    train(model, imp, opt, 2, x, y)
    at_k = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, imp, opt, 4, x, y, start=2)  # step 6: end of round 1
    assert imp.rounds_done == 1
    for name, p in model.named_parameters():
        if name in imp.masks:
            keep = imp.masks[name]
            assert torch.equal(p[keep], at_k[name][keep])
            assert torch.all(p[~keep] == 0)
        else:
            assert torch.equal(p, at_k[name])
    assert imp.sparsity() == pytest.approx(imp.round_sparsity(1), abs=2e-3)
    assert not opt.state  # optimizer state cleared at the rewind
    assert imp.schedule_step == 2
    train(model, imp, opt, 6, x, y, start=6)
    assert imp.rounds_done == 2 and imp.sparsity() == pytest.approx(0.75, abs=2e-3)


# -- static ---------------------------------------------------------------------------------------
def test_snip_keeps_the_most_sensitive_connections():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, 5.0, 5.0, 5.0]] * 4))
        model[0].weight[:, 3] = 0.01  # tiny weight, huge input: SNIP keeps it, magnitude not
    x = torch.tensor([[0.0, 0.0, 0.001, 1000.0]])

    def loss_fn(m, batch):
        return m(batch).sum()

    snip = StaticSparsity(copy.deepcopy(model), 0.75, criterion="snip", allocation="uniform",
                          loss_fn=loss_fn, batches=[x])
    mag = StaticSparsity(copy.deepcopy(model), 0.75, criterion="magnitude", allocation="uniform")
    assert snip.masks["0.weight"][:, 3].all() and not mag.masks["0.weight"][:, 3].any()


def test_static_existing_keeps_a_pruned_models_mask_through_fine_tuning():
    model, (x, y) = mlp(), data()
    state = sc.prune_(model, sc.Magnitude(sparsity=0.6))
    state.finalize_()
    zeros = {n: p == 0 for n, p in model.named_parameters() if n.endswith("weight")}
    opt = make_opt(model, "adamw")
    static = StaticSparsity(model, optimizer=opt, criterion="existing")
    train(model, static, opt, 20, x, y)
    for t in static.targets:
        assert torch.equal(t.param == 0, zeros[t.name])


# -- resuming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS) + ["srste", "decay"])
def test_resume_from_state_dict_equals_uninterrupted_run(method):
    build = dict(METHODS)
    build["srste"] = lambda m, o: SRSTE(m, "2:4", o)
    build["decay"] = lambda m, o: DecayingNM(m, "1:4", o, end=15, tighten=True)
    x, y = data()
    full = mlp()
    opt = make_opt(full, "adamw")
    s_full = build[method](full, opt)
    train(full, s_full, opt, 24, x, y)

    part = mlp()
    opt_p = make_opt(part, "adamw")
    s_part = build[method](part, opt_p)
    train(part, s_part, opt_p, 10, x, y)
    ckpt = copy.deepcopy({"model": part.state_dict(), "opt": opt_p.state_dict(), "s": s_part.state_dict()})

    fresh = mlp(seed=5)  # different initial weights: everything must come from the checkpoint
    opt_f = make_opt(fresh, "adamw")
    s_fresh = build[method](fresh, opt_f)
    fresh.load_state_dict(ckpt["model"])
    opt_f.load_state_dict(ckpt["opt"])
    s_fresh.load_state_dict(ckpt["s"])
    train(fresh, s_fresh, opt_f, 14, x, y, start=10)
    for (n, a), b in zip(full.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    for n in s_full.masks:
        assert torch.equal(s_full.masks[n], s_fresh.masks[n])


def test_checkpoint_from_a_different_method_or_model_is_refused():
    model = mlp()
    rigl = RigL(model, 0.8, update_every=5, end=50)
    other = mlp()
    set_state = SET(other, 0.8, update_every=5, end=50).state_dict()
    before = snapshot(model)
    masks_before = {n: k.clone() for n, k in rigl.masks.items()}
    with pytest.raises(StateMismatch, match="method 'set'"):
        rigl.load_state_dict(set_state)
    bigger = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(StateMismatch, match="different model"):
        rigl.load_state_dict(RigL(bigger, 0.8, update_every=5, end=50).state_dict())
    with pytest.raises(StateMismatch, match="settings differ"):
        rigl.load_state_dict(RigL(mlp(), 0.7, update_every=5, end=50).state_dict())
    with pytest.raises(StateMismatch):
        rigl.load_state_dict({"weights": 1})
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    assert all(torch.equal(masks_before[n], k) for n, k in rigl.masks.items())
    assert rigl.step_count == 0


def test_gmp_target_below_current_sparsity_is_refused():
    model = mlp()
    sc.prune_(model, sc.Magnitude(sparsity=0.7)).finalize_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="below the model's current sparsity"):
        GMP(model, 0.5, start=0, end=10)
    with pytest.raises(ConfigError, match="before start"):
        GMP(model, 0.9, start=10, end=5)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    assert not getattr(model, "_sparsecraft_open_states", None) or not sc.masks.has_open_state(model)


def test_finalize_leaves_plain_zero_weights():
    model, (x, y) = mlp(), data()
    opt = make_opt(model, "sgd")
    rigl = RigL(model, 0.8, update_every=3, end=20, optimizer=opt)
    train(model, rigl, opt, 5, x, y)
    masks = {n: k.clone() for n, k in rigl.masks.items()}
    rigl.finalize_()
    train(model, None, opt, 1, x, y)  # no hooks anymore: weights may move
    assert any((p[~masks[n]] != 0).any() for n, p in model.named_parameters() if n in masks)
    with pytest.raises(SparsecraftError, match="finalized"):
        rigl.step()


# -- soups ---------------------------------------------------------------------------------------
def test_sparse_soup_keeps_the_shared_mask_and_averages():
    x, y = data()
    model = mlp()
    sc.prune_(model, sc.Magnitude(sparsity=0.7)).finalize_()
    mask = {n: p != 0 for n, p in model.named_parameters() if n.endswith("weight")}

    def retrain(m, seed, round_):
        torch.manual_seed(seed)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        static = StaticSparsity(m, optimizer=opt, criterion="existing")
        perm = torch.randperm(len(x))
        train(m, static, opt, 6, x[perm], y[perm])
        return static.finalize_()

    soup, ingredients = sparse_soup(model, retrain, seeds=[0, 1, 2])
    assert len(ingredients) == 1 and len(ingredients[0]) == 3
    for name, p in soup.named_parameters():
        stack = torch.stack([dict(m.named_parameters())[name].detach() for m in ingredients[0]])
        assert torch.allclose(p, stack.mean(0), atol=1e-7)
        if name in mask and name != "4.weight":
            assert torch.equal(p != 0, mask[name])
    # two rounds, each pruning further from the previous soup
    soup2, rounds = sparse_soup(
        model, retrain, seeds=[0, 1], rounds=2,
        prune=lambda m, r: (sc.prune_(m, sc.Magnitude(sparsity=0.7 + 0.1 * r)).finalize_()),
    )
    assert len(rounds) == 2
    assert (soup2[0].weight == 0).float().mean().item() == pytest.approx(0.8, abs=1e-3)


def test_soup_of_models_with_different_masks_is_refused():
    a, b = mlp(0), mlp(1)
    sc.prune_(a, sc.Magnitude(sparsity=0.5)).finalize_()
    sc.prune_(b, sc.Magnitude(sparsity=0.5)).finalize_()
    with pytest.raises(SparsecraftError, match="different mask"):
        average_models([a, b])
