"""Unit tests of the pure per-layer math of one-shot pruning (sparsecraft.oneshot)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from sparsecraft.criteria import LayerContext, get_criterion
from sparsecraft.errors import ConfigError, SparsecraftError, TargetError
from sparsecraft.oneshot import (
    HessianAccumulator,
    InputNormAccumulator,
    SolverError,
    dsnot_refine,
    expected_row_error,
    outlier_ratio,
    owl_counts,
    owl_sparsities,
    relative_reconstruction_error,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from sparsecraft.patterns import NM, Unstructured, num_to_prune

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def correlated_inputs(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Inputs with correlated channels and uneven channel scales."""
    g = gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64) / d**0.5 + torch.eye(d, dtype=F64)
    scale = torch.exp(torch.randn(d, generator=g, dtype=F64))
    return ((torch.randn(n, d, generator=g, dtype=F64) @ mix) * scale).to(dtype)


def stats(x: torch.Tensor, hess_dtype=torch.float32):
    norms, hess = InputNormAccumulator(), HessianAccumulator(dtype=hess_dtype)
    norms.add(x)
    hess.add(x)
    return norms, hess


def magnitude_mask(w: torch.Tensor, sparsity: float | None, pattern="unstructured"):
    if pattern == "unstructured":
        return Unstructured().keep_mask(w.abs(), sparsity)
    return NM(*map(int, pattern.split(":"))).keep_mask(w.abs())


def err(w, w_new, x) -> float:
    return relative_reconstruction_error(w, w_new, x)


# ---------------------------------------------------------------- statistics -------


def test_accumulators_match_direct_computation():
    x = correlated_inputs(300, 12, seed=1, dtype=F64)
    norms = InputNormAccumulator()
    hess = HessianAccumulator(dtype=F64)
    # Uneven batches with extra leading dims: only the token rows matter.
    for chunk in (x[:7].reshape(1, 7, 12), x[7:100], x[100:].reshape(4, 50, 12)):
        norms.add(chunk)
        hess.add(chunk)
    assert norms.count == hess.count == 300
    torch.testing.assert_close(norms.sq_norm, (x * x).sum(0))
    torch.testing.assert_close(norms.mean, x.mean(0))
    torch.testing.assert_close(norms.var, x.var(0, unbiased=False))
    torch.testing.assert_close(hess.hessian, 2.0 / 300 * x.t() @ x)


def test_input_norms_summed_a_few_rows_at_a_time_match_direct_computation(monkeypatch):
    """The accumulator widens its input a slice of rows at a time (memory); every row must
    count once, the last short slice included."""
    monkeypatch.setattr(InputNormAccumulator, "_CHUNK_ELEMENTS", 25)  # 2 rows of 12 per slice
    x = correlated_inputs(301, 12, seed=3, dtype=torch.float32)
    norms = InputNormAccumulator()
    norms.add(x[:7].reshape(1, 7, 12))
    norms.add(x[7:])
    wide = x.double()
    assert norms.count == 301
    torch.testing.assert_close(norms.sq_norm, (wide * wide).sum(0), rtol=1e-6, atol=0)  # float32 slices
    torch.testing.assert_close(norms.var, wide.var(0, unbiased=False), rtol=1e-6, atol=0)


def test_input_norms_keep_the_variance_of_a_channel_with_a_large_mean():
    """Slices are reduced in float32 after a per-channel shift: a channel at mean 1e4 and spread
    1 keeps its variance (unshifted float32 sums would lose it entirely), and undoing the shift
    (as before summing over processes) changes no property."""
    g = gen(5)
    x = (torch.randn(4000, 3, generator=g, dtype=F64) + torch.tensor([1e4, 0.0, -3e3], dtype=F64)).float()
    norms = InputNormAccumulator()
    for part in x.split(700):
        norms.add(part)
    wide = x.double()
    torch.testing.assert_close(norms.var, wide.var(0, unbiased=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(norms.mean, wide.mean(0), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(norms.sq_norm, (wide * wide).sum(0), rtol=1e-9, atol=0)
    before = (norms.var, norms.mean, norms.sq_norm)
    norms._unshift_()
    for a, b in zip(before, (norms.var, norms.mean, norms.sq_norm)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    with pytest.raises(TargetError, match="NaN"):
        norms.add(torch.tensor([[1.0, float("inf"), 0.0]]))
    huge = InputNormAccumulator()  # squares beyond float32's range are summed in float64 instead
    huge.add(torch.tensor([[1e20, 1.0], [3e20, 2.0]]))
    torch.testing.assert_close(huge.sq_norm, torch.tensor([1e40 + 9e40, 5.0], dtype=F64), rtol=1e-6, atol=0)
    huger = InputNormAccumulator()  # values near float32's limit: the shift stays finite
    huger.add(torch.tensor([[3e38, 1.0], [3e38, 2.0]]))
    torch.testing.assert_close(huger.mean, torch.tensor([3e38, 1.5], dtype=F64), rtol=1e-6, atol=0)


def test_accumulators_refuse_bad_input():
    acc = HessianAccumulator(4)
    with pytest.raises(TargetError, match="features"):
        acc.add(torch.zeros(3, 5))
    with pytest.raises(TargetError, match="NaN"):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(TargetError, match="no calibration"):
        _ = InputNormAccumulator().sq_norm


# ---------------------------------------------------------------- Wanda ------------


def test_wanda_scores_and_criterion():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    sq = torch.tensor([4.0, 9.0])
    expected = torch.tensor([[2.0, 6.0], [6.0, 1.5]])
    torch.testing.assert_close(wanda_scores(w, sq), expected)
    crit = get_criterion("wanda")
    assert crit.requires == ("input_sq_norm",)
    ctx = LayerContext("l.weight", nn.Linear(2, 2), w, stats={"input_sq_norm": sq})
    torch.testing.assert_close(crit(ctx), expected)
    with pytest.raises(ConfigError, match="input_sq_norm"):
        crit(LayerContext("l.weight", nn.Linear(2, 2), w))


def test_wanda_compares_within_rows_and_breaks_ties_by_index():
    # Row 0 has all small scores, row 1 all large: a layer-wide comparison would empty
    # row 0; Wanda prunes half of each row. Equal scores: lower index pruned first.
    w = torch.tensor([[0.1, 0.2, 0.1, 0.3], [5.0, 6.0, 7.0, 8.0]])
    keep = wanda_mask(w, torch.ones(4), "unstructured", 0.5)
    assert keep.tolist() == [[False, True, False, True], [False, False, True, True]]


# ---------------------------------------------------------------- crafted case -----


def test_magnitude_loses_when_small_weights_sit_on_large_inputs():
    g = gen(2)
    n, d_in, d_out, big = 512, 32, 16, 4
    x = torch.randn(n, d_in, generator=g)
    x[:, :big] *= 50.0  # a few channels with huge norms
    w = (torch.rand(d_out, d_in, generator=g) + 0.5) * torch.sign(torch.randn(d_out, d_in, generator=g))
    w[:, :big] = 0.1 * torch.sign(torch.randn(d_out, big, generator=g))  # small but important
    norms, hess = stats(x)

    mag = magnitude_mask(w, 0.5)
    wanda = wanda_mask(w, norms.sq_norm, "unstructured", 0.5)
    new_w, sgpt, _ = sparsegpt_prune(w, hess.hessian, 0.5)

    assert not mag[:, :big].any()  # magnitude throws the important weights away
    assert wanda[:, :big].all() and sgpt[:, :big].all()  # the others keep every one
    e_mag, e_wanda, e_sgpt = err(w, w * mag, x), err(w, w * wanda, x), err(w, new_w, x)
    assert e_wanda < 0.5 * e_mag
    assert e_sgpt < e_wanda


# ---------------------------------------------------------------- SparseGPT --------


def naive_sequential_obs(w0: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Independent reference: columns left to right; pruning column j sets it to 0 and
    re-solves the columns right of j exactly, with columns <= j frozen (no Cholesky
    tricks, no lazy updates)."""
    w = w0.clone()
    cols = w.shape[1]
    for r in range(w.shape[0]):
        for j in range(cols):
            if keep[r, j]:
                continue
            w[r, j] = 0.0
            rest = slice(j + 1, cols)
            if j + 1 < cols:
                rhs = -h[rest, : j + 1] @ (w[r, : j + 1] - w0[r, : j + 1])
                w[r, rest] = w0[r, rest] + torch.linalg.solve(h[rest, rest], rhs)
    return w


def least_squares(w0: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Optimal weights on the kept support: H_KK w_K = (H w0)_K per row."""
    w = torch.zeros_like(w0)
    for r in range(w0.shape[0]):
        k = keep[r]
        w[r, k] = torch.linalg.solve(h[k][:, k], (h @ w0[r])[k])
    return w


def quad_loss(w0, w, h):
    d = w0 - w
    return 0.5 * ((d @ h) * d).sum(dim=1)


@pytest.mark.parametrize("pattern,blocksize", [("unstructured", 16), ("unstructured", 3), ("2:4", 4), ("2:4", 8)])
def test_sparsegpt_matches_exact_sequential_obs(pattern, blocksize):
    # Float64, no damping: the solver (Cholesky of H^-1, lazy block updates, adaptive
    # mask) must equal the naive sequential OBS reference given the mask it chose, and
    # its reported per-row loss must equal 1/2 (w0-w) H (w0-w)^T exactly (OBS theory).
    x = correlated_inputs(200, 16, seed=3, dtype=F64)
    w0 = torch.randn(8, 16, generator=gen(4), dtype=F64)
    h = 2.0 / 200 * x.t() @ x
    sparsity = 0.5 if pattern == "unstructured" else None
    w, keep, info = sparsegpt_prune(
        w0, h, sparsity, pattern, blocksize=blocksize, percdamp=0.0, dtype=F64
    )
    ref = naive_sequential_obs(w0, h, keep)
    torch.testing.assert_close(w, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(info["row_losses"], quad_loss(w0, w, h), rtol=1e-9, atol=1e-12)
    # With the mask fixed, the solver reproduces its own result.
    w_fixed, keep_fixed, _ = sparsegpt_prune(
        w0, h, keep_mask=keep, blocksize=blocksize, percdamp=0.0, dtype=F64
    )
    assert torch.equal(keep_fixed, keep)
    torch.testing.assert_close(w_fixed, w, rtol=1e-12, atol=1e-12)


def test_sparsegpt_versus_least_squares():
    x = correlated_inputs(200, 16, seed=5, dtype=F64)
    w0 = torch.randn(8, 16, generator=gen(6), dtype=F64)
    h = 2.0 / 200 * x.t() @ x
    # (1) When the pruned columns come first, sequential OBS is exactly least squares
    # over the kept weights: every prune re-solves all kept columns.
    prefix = torch.ones(8, 16, dtype=torch.bool)
    prefix[:, :6] = False
    w, _, _ = sparsegpt_prune(w0, h, keep_mask=prefix, blocksize=4, percdamp=0.0, dtype=F64)
    torch.testing.assert_close(w, least_squares(w0, h, prefix), rtol=1e-9, atol=1e-9)
    # (2) For a mask it chooses, least squares is the optimum and is never beaten. SparseGPT
    # is greedy (kept columns left of a later prune are frozen), so it is not equal to
    # it; what it must do is recover most of what the optimal update recovers over
    # plain masking. Strongly correlated (rank-2 + noise) inputs make that gap large.
    closure = []
    for seed in range(5):
        g = gen(100 + seed)
        x = torch.randn(400, 2, generator=g, dtype=F64) @ torch.randn(2, 16, generator=g, dtype=F64)
        x += 0.1 * torch.randn(400, 16, generator=g, dtype=F64)
        w0 = torch.randn(8, 16, generator=g, dtype=F64)
        h = 2.0 / 400 * x.t() @ x
        w, keep, _ = sparsegpt_prune(w0, h, 0.5, blocksize=16, percdamp=0.0, dtype=F64)
        e_sgpt, e_mask = err(w0, w, x), err(w0, w0 * keep, x)
        e_ls = err(w0, least_squares(w0, h, keep), x)
        assert e_ls <= e_sgpt * (1 + 1e-9) and e_sgpt < e_mask
        closure.append((e_mask - e_sgpt) / (e_mask - e_ls))
    assert min(closure) > 0.6, closure
    assert sorted(closure)[2] > 0.8, closure  # median


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs(pattern):
    x = correlated_inputs(1024, 64, seed=7)
    w = torch.randn(32, 64, generator=gen(8))
    norms, hess = stats(x)
    s = 0.5 if pattern == "unstructured" else None
    new_w, _, _ = sparsegpt_prune(w, hess.hessian, s, pattern, blocksize=32)
    e_sgpt = err(w, new_w, x)
    e_wanda = err(w, w * wanda_mask(w, norms.sq_norm, pattern, s), x)
    e_mag = err(w, w * magnitude_mask(w, s, pattern), x)
    assert e_sgpt < 0.9 * e_wanda
    assert e_sgpt < 0.9 * e_mag


# ---------------------------------------------------------------- patterns ---------


@pytest.mark.parametrize("spec", ["2:4", "1:4", "4:8"])
def test_nm_validity_after_wanda_and_sparsegpt(spec):
    pattern = NM(*map(int, spec.split(":")))
    x = correlated_inputs(256, 32, seed=9)
    w = torch.randn(12, 32, generator=gen(10))
    norms, hess = stats(x)
    assert pattern.is_valid(wanda_mask(w, norms.sq_norm, spec))
    # blocksize 6 is not a multiple of M: the solver rounds it down so groups fit.
    for bs in (6, 128):
        new_w, keep, info = sparsegpt_prune(w, hess.hessian, pattern=spec, blocksize=bs)
        assert pattern.is_valid(keep)
        assert (new_w[~keep] == 0).all() and info["blocksize"] % pattern.m == 0
    with pytest.raises(ConfigError, match="fixes sparsity"):
        sparsegpt_prune(w, hess.hessian, 0.3, spec)


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.77])
def test_exact_unstructured_counts(sparsity):
    # 7 x 13 so neither the per-row nor the per-block share is a whole number.
    x = correlated_inputs(128, 13, seed=11)
    w = torch.randn(7, 13, generator=gen(12))
    norms, hess = stats(x)
    k = num_to_prune(sparsity, 91)
    keep = wanda_mask(w, norms.sq_norm, "unstructured", sparsity)
    assert int((~keep).sum()) == k
    per_row = (~keep).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1
    for bs in (5, 13, 128):
        new_w, keep, info = sparsegpt_prune(w, hess.hessian, sparsity, blocksize=bs)
        assert int((~keep).sum()) == k == info["num_pruned"]
        assert (new_w[~keep] == 0).all()


# ---------------------------------------------------------------- robustness -------


def test_dead_input_channel_and_rank_deficient_hessian():
    x = correlated_inputs(256, 16, seed=13)
    x[:, 3] = 0.0
    x[:, 10] = 0.0  # two channels that never fire: zero rows/cols in H
    w = torch.randn(8, 16, generator=gen(14))
    norms, hess = stats(x)
    assert (hess.hessian.diagonal() == 0).sum() == 2
    for percdamp in (0.01, 0.0):
        new_w, keep, info = sparsegpt_prune(w, hess.hessian, 0.5, percdamp=percdamp)
        assert torch.isfinite(new_w).all() and info["dead_inputs"] == 2 and info["tries"] == 1
        assert (new_w[:, [3, 10]] == 0).all()
        assert int((~keep).sum()) == 64
    keep = wanda_mask(w, norms.sq_norm, "2:4")
    assert not keep[:, [3, 10]].any() or NM(2, 4).is_valid(keep)
    # Fewer samples than inputs: H is singular everywhere, damping makes it factor.
    few = correlated_inputs(5, 16, seed=15)
    _, hess = stats(few)
    new_w, keep, info = sparsegpt_prune(w, hess.hessian, pattern="2:4")
    assert torch.isfinite(new_w).all() and NM(2, 4).is_valid(keep)


def test_input_weight_and_hessian_never_modified():
    x = correlated_inputs(64, 8, seed=16)
    x[:, 0] = 0
    w = torch.randn(4, 8, generator=gen(17))
    _, hess = stats(x)
    h = hess.hessian
    w_before, h_before = w.clone(), h.clone()
    new_w, _, _ = sparsegpt_prune(w, h, 0.5)
    assert torch.equal(w, w_before) and torch.equal(h, h_before)
    assert new_w.data_ptr() != w.data_ptr()


def test_negative_eigenvalue_escalates_damping(caplog):
    x = correlated_inputs(256, 16, seed=18, dtype=F64)
    w = torch.randn(8, 16, generator=gen(19))
    g = 2.0 / 256 * x.t() @ x
    md = float(g.diagonal().mean())
    h = (g - 0.3 * md * torch.eye(16, dtype=F64)).float()  # indefinite
    assert float(torch.linalg.eigvalsh(h.double()).min()) < 0
    with caplog.at_level(logging.WARNING, logger="sparsecraft.oneshot.sparsegpt"):
        new_w, keep, info = sparsegpt_prune(w, h, 0.5, layer="fc")
    # mean diag(h) = 0.7 md: percdamp 0.01 and 0.1 cannot lift -0.3 md; 1.0 can.
    assert info["tries"] == 3 and info["percdamp"] == pytest.approx(1.0)
    fails = [r.getMessage() for r in caplog.records if "Cholesky" in r.getMessage()]
    assert len(fails) == 2
    assert "percdamp=0.01" in fails[0] and "retrying with percdamp=0.1" in fails[0]
    assert "percdamp=0.1" in fails[1] and "retrying with percdamp=1" in fails[1]
    assert torch.isfinite(new_w).all() and int((~keep).sum()) == 64


def test_cholesky_failure_first_calls_then_give_up(monkeypatch):
    x = correlated_inputs(128, 8, seed=20)
    w = torch.randn(4, 8, generator=gen(21))
    _, hess = stats(x)
    real = torch.linalg.cholesky_ex
    calls = {"n": 0, "fail": 2}

    def flaky(a, *args, **kwargs):
        calls["n"] += 1
        out, info = real(a, *args, **kwargs)
        if calls["n"] <= calls["fail"]:
            return out, torch.ones_like(info)
        return out, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    new_w, keep, info = sparsegpt_prune(w, hess.hessian, 0.5, max_damp_tries=4)
    assert info["tries"] == 3 and info["percdamp"] == pytest.approx(1.0)
    assert torch.isfinite(new_w).all()

    calls.update(n=0, fail=10**9)
    w_before = w.clone()
    with pytest.raises(SolverError, match="could not factor the Hessian after 4 tries.*unchanged"):
        sparsegpt_prune(w, hess.hessian, 0.5, max_damp_tries=4, layer="mlp.up")
    assert torch.equal(w, w_before)
    assert calls["n"] == 4


def test_reconstruction_error_from_x_and_hessian_agree():
    x = correlated_inputs(100, 8, seed=22, dtype=F64)
    w = torch.randn(4, 8, generator=gen(23), dtype=F64)
    w2 = w * (torch.rand(4, 8, generator=gen(24)) > 0.5)
    direct = torch.linalg.norm((w - w2) @ x.t()) / torch.linalg.norm(w @ x.t())
    assert err(w, w2, x) == pytest.approx(float(direct), rel=1e-10)
    h = 2.0 / 100 * x.t() @ x
    assert relative_reconstruction_error(w, w2, hessian=h) == pytest.approx(float(direct), rel=1e-8)
    assert err(w, w, x) == 0.0
    with pytest.raises(ConfigError):
        relative_reconstruction_error(w, w2)


# ---------------------------------------------------------------- DSnoT ------------


def test_dsnot_rules_on_a_single_row():
    # c = W * E[x] = [1, 1, -0.1, -0.2, 1.5]; columns 0, 1 pruned -> E[error] = +2.
    w = torch.tensor([[1.0, 1.0, 1.0, 2.0, 0.5]])
    mean = torch.tensor([1.0, 1.0, -0.1, -0.1, 3.0])
    var = torch.tensor([1.0, 0.01, 1.0, 1.0, 1.0])
    sq = torch.ones(5)
    keep0 = torch.tensor([[False, False, True, True, True]])
    keep, info = dsnot_refine(w, keep0, mean, var, sq, max_cycles=1, threshold=0.0)
    # Grow: equal contributions, column 1 has the lower variance. Prune: column 4 is the
    # least important but would push the error up; of the two that pull it down,
    # column 2 has the lower Wanda importance.
    assert keep.tolist() == [[False, True, False, True, True]]
    assert info["swaps"] == 1
    assert float(expected_row_error(w, keep, mean)) == pytest.approx(0.9)
    # Without the variance term the tie goes to the lower index.
    keep, _ = dsnot_refine(w, keep0, mean, var, sq, max_cycles=1, threshold=0.0, var_power=0.0)
    assert keep.tolist() == [[True, False, False, True, True]]
    # Above the threshold nothing moves; the inputs are never modified.
    keep, info = dsnot_refine(w, keep0, mean, var, sq, threshold=2.5)
    assert torch.equal(keep, keep0) and info["swaps"] == 0
    assert keep0.tolist() == [[False, False, True, True, True]]


def test_dsnot_never_overshoots_and_nm_prefers_the_helpful_prune():
    ones = torch.ones(4)
    # Unstructured: c = [3, -1, -0.5, 1]; pruned 0, 1 -> E[error] = +2. The only swap
    # (grow 0, prune 2) gives -1.5: smaller in size but past zero, which the paper's rule
    # (keep the sign) rejects.
    w = torch.tensor([[3.0, -1.0, -0.5, 1.0]])
    keep0 = torch.tensor([[False, False, True, True]])
    keep, info = dsnot_refine(w, keep0, ones, ones, ones, threshold=0.0)
    assert info["swaps"] == 0 and torch.equal(keep, keep0)
    # 2:4, one group: c = [2, 0.5, 0.1, -0.2], E[error] = +2.5. Grow column 0; in the
    # group, column 2 is the least important but pruning it pushes the error up, so
    # column 3 (which pulls it down) goes.
    w = torch.tensor([[2.0, 0.5, 0.1, 1.0]])
    mean = torch.tensor([1.0, 1.0, 1.0, -0.2])
    keep, info = dsnot_refine(w, keep0, mean, ones, ones, pattern="2:4", threshold=0.0)
    assert keep.tolist() == [[True, False, True, False]]
    assert float(expected_row_error(w, keep, mean)) == pytest.approx(0.3)


def shifted_inputs(seed: int) -> torch.Tensor:
    """Inputs with large per-channel means and small spread: the error's mean dominates."""
    g = gen(seed)
    mean = (torch.rand(64, generator=g) * 1.5 + 0.5) * torch.sign(torch.randn(64, generator=g))
    return mean + 0.2 * torch.randn(512, 64, generator=g)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:4", "4:8"])
@pytest.mark.parametrize("start", ["wanda", "magnitude"])
def test_dsnot_reduces_reconstruction_error_and_keeps_counts(pattern, start):
    x = shifted_inputs(30)
    w = torch.randn(32, 64, generator=gen(31))
    norms = InputNormAccumulator()
    norms.add(x)
    s = 0.5 if pattern == "unstructured" else None
    if start == "wanda":
        keep0 = wanda_mask(w, norms.sq_norm, pattern, s)
    else:
        keep0 = magnitude_mask(w, s, pattern)
    keep, info = dsnot_refine(
        w, keep0, norms.mean, norms.var, norms.sq_norm, pattern=pattern, threshold=0.0
    )
    assert info["swaps"] > 0
    e0, e1 = err(w, w * keep0, x), err(w, w * keep, x)
    assert e1 < 0.5 * e0
    assert torch.equal(keep.sum(dim=1), keep0.sum(dim=1))  # per-row counts unchanged
    if pattern != "unstructured":
        assert NM(*map(int, pattern.split(":"))).is_valid(keep)
    before = expected_row_error(w, keep0, norms.mean).abs()
    after = expected_row_error(w, keep, norms.mean).abs()
    assert (after <= before + 1e-5).all()


def test_dsnot_exact_unstructured_counts_on_odd_shape():
    x = shifted_inputs(32)[:, :13]
    w = torch.randn(7, 13, generator=gen(33))
    norms = InputNormAccumulator()
    norms.add(x)
    keep0 = wanda_mask(w, norms.sq_norm, "unstructured", 0.37)
    keep, _ = dsnot_refine(w, keep0, norms.mean, norms.var, norms.sq_norm, threshold=0.0)
    assert int((~keep).sum()) == num_to_prune(0.37, 91)
    assert torch.equal(keep.sum(dim=1), keep0.sum(dim=1))
    with pytest.raises(ConfigError, match="not a valid 2:4"):
        dsnot_refine(w[:, :12], keep0[:, :12], norms.mean[:12], norms.var[:12],
                     norms.sq_norm[:12], pattern="2:4")


# ---------------------------------------------------------------- OWL --------------


def owl_layers():
    """Four layers of different sizes whose scores hold more and more outliers."""
    g = gen(40)
    scores, numels = {}, {}
    for i, (frac, shape) in enumerate([(0.0, (32, 64)), (0.01, (64, 64)), (0.03, (48, 32)), (0.06, (16, 129))]):
        s = torch.rand(shape, generator=g)
        s[torch.rand(shape, generator=g) < frac] *= 40.0
        scores[f"layer{i}"], numels[f"layer{i}"] = s, s.numel()
    return scores, numels


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.05), (0.6, 0.2)])
def test_owl_sparsities(target, lam):
    scores, numels = owl_layers()
    ratios = [outlier_ratio(s) for s in scores.values()]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
    sp = owl_sparsities(scores, numels, target, lam=lam)
    counts = owl_counts(scores, numels, target, lam=lam)
    total = sum(numels.values())
    # Parameter-weighted mean is the target, exactly to the rounding rule.
    assert sum(counts.values()) == num_to_prune(target, total)
    assert all(num_to_prune(sp[n], numels[n]) == counts[n] for n in sp)
    values = list(sp.values())
    assert all(target - lam - 1e-12 <= v <= target + lam + 1e-12 for v in values)
    # More outliers, lower sparsity.
    assert values == sorted(values, reverse=True) and values[0] > values[-1] + lam / 2


def test_owl_inputs_groups_and_degenerate_cases():
    scores, numels = owl_layers()
    a, b = scores["layer1"], scores["layer2"]
    assert outlier_ratio([a, b]) == outlier_ratio(torch.cat([a.reshape(-1), b.reshape(-1)]))
    # Precomputed ratios give the same answer as scores.
    ratios = {n: outlier_ratio(s) for n, s in scores.items()}
    assert owl_sparsities(ratios, numels, 0.5) == owl_sparsities(scores, numels, 0.5)
    # Equal outlier ratios: uniform (up to whole counts), total still exact.
    flat = owl_counts({n: 0.1 for n in numels}, numels, 0.5)
    assert sum(flat.values()) == num_to_prune(0.5, sum(numels.values()))
    assert all(abs(flat[n] - 0.5 * numels[n]) <= 1 for n in numels)
    with pytest.raises(ConfigError, match="numels"):
        owl_sparsities(scores, {"layer0": 1}, 0.5)
    with pytest.raises(ConfigError, match="max_sparsity"):
        owl_sparsities(scores, numels, 0.995)


# ---- SparseGPT N:M: each group chosen from the weights the earlier columns already moved ----

def _reference_sparsegpt_nm(w, h, n, m, blocksize, percdamp=0.01, at_block_start=False):
    """A plain transcription of SparseGPT's column sweep (float64), written independently:
    at column j with j % m == 0, the group's m - n lowest ``W[:, j:j+m]^2 / diag(U)^2`` are
    pruned, ``W`` being the weights already updated by the OBS steps of columns < j.
    ``at_block_start=True`` instead picks every group of a lazy block from the block's
    weights before its sweep (the variant the test rules out)."""
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        start = w[:, b0:b1].clone()
        for j in range(b0, b1):
            if (j - b0) % m == 0:
                src = start[:, j - b0 : j - b0 + m] if at_block_start else w[:, j : j + m]
                score = src.pow(2) / u.diagonal()[j : j + m].pow(2)
                low = torch.topk(score, m - n, dim=1, largest=False).indices
                pruned[:, j : j + m].scatter_(1, low, True)
            err = w[:, j] * pruned[:, j] / u[j, j]
            w[:, j:] -= err[:, None] * u[j, j:][None, :]  # the exact OBS step (lazy batching is an identity)
        w[:, b0:b1][pruned[:, b0:b1]] = 0
    w[pruned] = 0
    return w, ~pruned


def _layer_error(w0, w, h):
    d = (w0.double() - w.double())
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_equals_a_straightforward_reference(n, m):
    worse = 0
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(400, 48, generator=gen, dtype=torch.float64) @ torch.randn(48, 48, generator=gen, dtype=torch.float64)
        h = 2 / 400 * x.T @ x
        w = torch.randn(24, 48, generator=gen, dtype=torch.float64)
        ref_w, ref_keep = _reference_sparsegpt_nm(w, h, n, m, blocksize=16)
        new, keep, _ = sparsegpt_prune(w, h, pattern=f"{n}:{m}", blocksize=16, dtype=torch.float64,
                                       nm_choice="greedy")
        assert torch.equal(keep, ref_keep)
        assert torch.allclose(new, ref_w, atol=1e-9, rtol=1e-9)
        stale_w, _ = _reference_sparsegpt_nm(w, h, n, m, blocksize=16, at_block_start=True)
        worse += _layer_error(w, stale_w, h) > _layer_error(w, new, h) * (1 + 1e-9)
    # choosing from the block-start weights loses on most seeded problems
    assert worse >= 6


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_exact_nm_choice_is_the_best_subset_of_each_group(n, m):
    # One group per row and no damping: the exact rule must find, per row, the kept subset whose
    # sweep loses least (brute force: the same sweep with each subset's mask fixed), and report
    # that loss; the reference's diagonal score misses it on some rows.
    import itertools

    greedy_worse = 0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(300, m, generator=g, dtype=F64) @ torch.randn(m, m, generator=g, dtype=F64)
        h = 2 / 300 * x.T @ x
        w0 = torch.randn(40, m, generator=g, dtype=F64)
        best = torch.full((40,), float("inf"), dtype=F64)
        for kept in itertools.combinations(range(m), n):
            keep = torch.zeros(40, m, dtype=torch.bool)
            keep[:, list(kept)] = True
            wk, _, _ = sparsegpt_prune(w0, h, keep_mask=keep, percdamp=0.0, dtype=F64)
            best = torch.minimum(best, quad_loss(w0, wk, h))
        w, keep, info = sparsegpt_prune(w0, h, pattern=f"{n}:{m}", percdamp=0.0, dtype=F64, nm_choice="exact")
        assert NM(n, m).is_valid(keep)
        torch.testing.assert_close(quad_loss(w0, w, h), best, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(info["row_losses"], best, rtol=1e-9, atol=1e-12)
        wg, _, _ = sparsegpt_prune(w0, h, pattern=f"{n}:{m}", percdamp=0.0, dtype=F64)
        greedy_worse += int((quad_loss(w0, wg, h) > best * (1 + 1e-9)).sum())
    assert greedy_worse > 0


def test_sparsegpt_nm_choice_is_validated():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ConfigError, match="nm_choice"):
        sparsegpt_prune(w, h, pattern="2:4", nm_choice="best")


def test_hessian_in_column_slices_and_closed_matches_direct_computation(monkeypatch):
    """Each batch's product is added a slice of columns at a time (memory), the last short
    slice included; ``close`` gives the same Hessian, frees the sum and refuses more samples."""
    x = correlated_inputs(40, 12, seed=4, dtype=F64)
    whole = HessianAccumulator(dtype=F64)
    sliced = HessianAccumulator(dtype=F64)
    whole.add(x[:12])  # one product per batch
    whole.add(x[12:])
    monkeypatch.setattr(HessianAccumulator, "_CHUNK_ELEMENTS", 5 * 12)  # 5 columns of 12 per slice
    sliced.add(x[:12])
    sliced.add(x[12:])
    torch.testing.assert_close(sliced.hessian, 2.0 / 40 * x.t() @ x, rtol=1e-13, atol=0)
    expected = whole.hessian.clone()
    assert torch.equal(whole.close(), expected) and whole._sum is None
    with pytest.raises(SparsecraftError, match="closed"):
        whole.add(x)
    fresh = HessianAccumulator(dtype=torch.float32)
    fresh.add(x.float())
    direct = fresh.hessian.clone()
    fresh._h = None  # close computes it from the sum itself, in place
    assert torch.equal(fresh.close(), direct)
