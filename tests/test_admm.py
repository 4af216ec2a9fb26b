"""The ADMM layer solver: exact back-solve, never worse than SparseGPT, valid patterns."""

import pytest
import torch

from sparsecraft.errors import ConfigError, TargetError
from sparsecraft.oneshot import sparsegpt_prune
from sparsecraft.oneshot.admm import admm_prune, layer_error, solve_on_support
from sparsecraft.patterns import NM


def _problem(seed: int, rows: int = 24, cols: int = 32, n: int = 256):
    """A layer whose inputs have very different scales and correlations (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(cols, generator=g))
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(n, cols, generator=g) @ mix) * scales
    w = torch.randn(rows, cols, generator=g)
    return w.double(), (2 / n * x.T @ x).double()


def _brute_force(w, h, keep):
    """Row by row, the least-squares optimum on the support by a direct solve."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        s = keep[r].nonzero().flatten()
        if s.numel():
            out[r, s] = torch.linalg.solve(h[s][:, s], h[s] @ w[r])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_back_solve_equals_brute_force(seed):
    w, h = _problem(seed)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    solved, info = solve_on_support(w, h, keep, tol=1e-13, max_iter=1000)
    exact = _brute_force(w, h, keep)
    assert torch.equal(solved != 0, keep & (exact != 0))
    e_cg, e_exact = layer_error(w, solved, h), layer_error(w, exact, h)
    assert abs(e_cg - e_exact) <= 1e-6 * e_exact
    assert torch.allclose(solved, exact, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7)])
def test_admm_result_is_the_exact_optimum_on_its_support(pattern, sparsity):
    w, h = _problem(11)
    new, keep, info = admm_prune(w, h, sparsity, pattern, percdamp=0.0, dtype=torch.float64, cg_tol=1e-13)
    exact = _brute_force(w, h, keep)
    assert abs(layer_error(w, new, h) - layer_error(w, exact, h)) <= 1e-6 * layer_error(w, exact, h)
    assert torch.all(new[~keep] == 0)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("4:8", None), ("unstructured", 0.7)])
def test_admm_never_above_sparsegpt_and_usually_well_below(pattern, sparsity):
    """With SparseGPT's result as a candidate the solver can never be worse on the layer
    error; on inputs of very different scales its own ADMM support should win clearly."""
    ratios, admm_wins = [], 0
    for seed in range(20):
        w, h = _problem(100 + seed)
        ws, ks, _ = sparsegpt_prune(w, h, sparsity, pattern, dtype=torch.float64)
        new, keep, info = admm_prune(w, h, sparsity, pattern, candidates=[(ws, ks)], dtype=torch.float64)
        e_sgpt, e_ours = layer_error(w, ws, h), layer_error(w, new, h)
        assert e_ours <= e_sgpt * (1 + 1e-9), f"seed {seed}: {e_ours} > SparseGPT {e_sgpt}"
        assert abs(info["error"] - e_ours) <= 1e-6 * e_ours
        ratios.append(e_ours / e_sgpt)
        admm_wins += info["source"] == "admm"
        if pattern == "unstructured":
            assert int((~keep).sum()) == int(sparsity * w.numel() + 0.5)  # exact count
        else:
            assert NM(*map(int, pattern.split(":"))).is_valid(keep)
    assert admm_wins >= 15
    assert sorted(ratios)[10] < 0.9  # the median layer error is at least 10% below SparseGPT's


def test_dead_inputs_and_fp32():
    w, h = _problem(3)
    h[:, 5] = 0
    h[5, :] = 0
    new, keep, info = admm_prune(w.float(), h.float(), 0.5)
    assert new.dtype == torch.float32 and info["dead_inputs"] == 1
    assert torch.all(new[:, 5] == 0) and torch.isfinite(new).all()


def test_bad_input_is_refused_before_work():
    w, h = _problem(0)
    with pytest.raises(TargetError, match="Hessian shape"):
        admm_prune(w, h[:-1, :-1], 0.5)
    with pytest.raises(ConfigError, match="fixes sparsity"):
        admm_prune(w, h, 0.3, "2:4")
    with pytest.raises(ConfigError, match="rho"):
        admm_prune(w, h, 0.5, rho=0.0)
    with pytest.raises(ConfigError, match="max_iter"):
        admm_prune(w, h, 0.5, max_iter=0)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(TargetError, match="NaN"):
        admm_prune(bad, h, 0.5)
    with pytest.raises(ConfigError, match="unstructured and N:M"):
        admm_prune(w, h, 0.5, "block:2x2")


def test_admm_through_prune_and_the_cli(tiny_llama_tok_dir, tmp_path):
    """The registered `admm` method: every layer valid 2:4 and never above SparseGPT's layer error."""
    import sparsecraft as sc
    from sparsecraft.cli import main

    model, _ = sc.models.load(str(tiny_llama_tok_dir))
    calib = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    state = sc.prune_(model, sc.method_config("admm", pattern="2:4"), calib, progress=False)
    assert len(state.masks) == 14
    for name, keep in state.masks.items():
        assert NM(2, 4).is_valid(keep), name
        info = state.info[name]
        assert info["method"] == "admm" and info["layer_error"] <= info["sparsegpt_layer_error"] * (1 + 1e-9)
    assert sum(state.info[n]["layer_error"] for n in state.masks) < sum(
        state.info[n]["sparsegpt_layer_error"] for n in state.masks)
    with pytest.raises(ConfigError, match="admm.*blocksize|blocksize.*admm"):
        sc.method_config("admm", blocksize=64)
    out = tmp_path / "pruned"
    argv = ["-q", "prune", str(tiny_llama_tok_dir), "--method", "admm", "--pattern", "2:4", "--samples", "4",
            "--seq-len", "16", "--out", str(out)]
    assert main(argv) == 0
    from sparsecraft.checkpoint import read_checkpoint_header

    header = read_checkpoint_header(out)  # a streamed run: one shard per block
    assert header["tensors"]["model.layers.0.mlp.up_proj.weight"]["pattern"] == "2:4"


def test_layers_with_one_input_share_one_eigendecomposition(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparsecraft as sc
    from sparsecraft.oneshot import admm

    calls = []
    real = admm.prepare_hessian
    monkeypatch.setattr(admm, "prepare_hessian", lambda h, *a, **k: calls.append(h) or real(h, *a, **k))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    calib = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    state = sc.prune_(model, sc.method_config("admm", pattern="2:4", max_iter=30), calib, progress=False)
    # per block: q/k/v, o, gate/up, down
    assert len(calls) == 8 and len(state.masks) == 14
    # and sharing changes nothing: k_proj's result equals a solve of its own
    from sparsecraft.oneshot.stats import HessianAccumulator

    torch.manual_seed(0)
    dense = LlamaForCausalLM(model.config).eval()
    acc = HessianAccumulator()
    k_proj = dense.model.layers[0].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda _m, inputs, _o: acc.add(inputs[0]))
    with torch.no_grad():
        dense(calib)
    handle.remove()
    w = k_proj.weight.detach()
    sw, sk, _ = sparsegpt_prune(w, acc.hessian, None, "2:4")
    own, keep, _ = admm_prune(w, acc.hessian, None, "2:4", max_iter=30, candidates=[(sw, sk)])
    assert torch.equal(keep, state.masks["model.layers.0.self_attn.k_proj.weight"])
    torch.testing.assert_close(own, dict(model.named_parameters())["model.layers.0.self_attn.k_proj.weight"].detach())
