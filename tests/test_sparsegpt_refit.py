"""SparseGPT's refit: the least-squares weights on the sweep's mask (the solver's default)."""

import pytest
import torch
from test_admm import _brute_force, _problem

from sparsecraft.errors import ConfigError
from sparsecraft.oneshot import sparsegpt_prune
from sparsecraft.oneshot.admm import layer_error
from sparsecraft.oneshot.support import refit_on_support
from sparsecraft.patterns import NM
from sparsecraft.quant.grid import QuantSpec


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("4:8", None), ("group:4", 0.5)])
def test_refit_keeps_the_mask_and_reaches_the_optimum_on_it(pattern, sparsity):
    """The sweep's weights are optimal only given the columns it froze; the refit is the exact
    optimum on the same support, so it must be strictly better on inputs of unequal scales."""
    gains = []
    for seed in range(5):
        w, h = _problem(200 + seed)
        ws, ks, info_s = sparsegpt_prune(w, h, sparsity, pattern, dtype=torch.float64, percdamp=0.0)
        wr, kr, info_r = sparsegpt_prune(w, h, sparsity, pattern, dtype=torch.float64, percdamp=0.0, refit=True)
        assert torch.equal(ks, kr)  # the mask is the sweep's
        assert torch.all(wr[~kr] == 0)
        exact = _brute_force(w, h, kr)
        e_exact, e_refit, e_sweep = layer_error(w, exact, h), layer_error(w, wr, h), layer_error(w, ws, h)
        assert abs(e_refit - e_exact) <= 1e-6 * e_exact
        # info["loss"] is 1/2 (w - w') H (w - w')^T of the refitted weights; refit["sweep_loss"] the sweep's
        assert info_r["loss"] == pytest.approx(e_refit / 2, rel=1e-6)
        assert info_r["refit"]["sweep_loss"] == pytest.approx(info_s["loss"], rel=1e-9)
        assert info_s["loss"] == pytest.approx(e_sweep / 2, rel=1e-6)
        gains.append(e_refit / e_sweep)
    assert max(gains) <= 1 + 1e-9 and min(gains) < 0.99, gains


def test_refit_zeroes_dead_inputs_and_leaves_the_input_alone():
    w, h = _problem(7)
    h[:, 3] = 0
    h[3, :] = 0  # input 3 never fires
    before = w.clone()
    new, keep, _ = sparsegpt_prune(w.float(), h, None, "2:4", refit=True)
    assert torch.all(new[:, 3] == 0) and NM(2, 4).is_valid(keep)
    solved, info = refit_on_support(w, h, keep, percdamp=0.01, dtype=torch.float32)
    assert torch.equal(w, before) and solved.dtype == w.dtype and torch.all(solved[:, 3] == 0)
    assert info["iterations"] >= 1


def test_refit_is_the_solvers_default_and_refuses_quantised_weights(tiny_llama_tok_dir):
    import sparsecraft as sc

    model, _ = sc.models.load(str(tiny_llama_tok_dir))
    calib = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    state = sc.prune_(model, sc.method_config("sparsegpt", pattern="2:4"), calib, progress=False)
    assert all("refit" in info for info in state.info.values())
    assert all(NM(2, 4).is_valid(k) for k in state.masks.values())
    model, _ = sc.models.load(str(tiny_llama_tok_dir))
    state = sc.prune_(model, sc.method_config("sparsegpt", pattern="2:4", refit=False), calib, progress=False)
    assert not any("refit" in info for info in state.info.values())
    with pytest.raises(ConfigError, match="refit"):
        sc.method_config("sparsegpt", pattern="2:4", refit=True, quantize="int4")
    with pytest.raises(ConfigError, match="refit_iter"):
        sc.method_config("sparsegpt", pattern="2:4", refit_iter=5, quantize="int4")
    with pytest.raises(ConfigError, match="refit"):
        sparsegpt_prune(torch.randn(4, 32), torch.eye(32), None, "2:4", refit=True,
                        quantize=QuantSpec(bits=4, group=32))


def test_refit_option_on_the_cli(tiny_llama_tok_dir, tmp_path, capsys):
    from sparsecraft.cli import main

    argv = ["-q", "prune", str(tiny_llama_tok_dir), "--method", "sparsegpt", "--pattern", "2:4", "--samples", "4",
            "--seq-len", "16"]
    assert main(argv + ["--option", "refit=false", "--out", str(tmp_path / "sweep")]) == 0
    assert main(argv + ["--option", "refit=maybe", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "refit" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "bad").exists()


def test_refit_in_row_slices_equals_one_slice(monkeypatch):
    """Wide layers are refitted a slice of rows at a time; the rows are independent problems."""
    from sparsecraft.oneshot import support

    w, h = _problem(3, rows=24, cols=32)
    _, keep, _ = sparsegpt_prune(w, h, None, "2:4", dtype=torch.float64)
    whole, info = refit_on_support(w, h, keep, percdamp=0.01, dtype=torch.float64)
    monkeypatch.setattr(support, "ROW_SLICE_ELEMENTS", 5 * 32)  # 5 rows a slice, the last one shorter
    sliced, info_s = refit_on_support(w, h, keep, percdamp=0.01, dtype=torch.float64)
    torch.testing.assert_close(sliced, whole, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(info_s["row_losses"], info["row_losses"], rtol=1e-9, atol=1e-12)


def test_gptq_refuses_the_refit_options():
    import sparsecraft as sc

    for option in ({"refit": True}, {"refit_iter": 5}):
        with pytest.raises(ConfigError, match="gptq.*refit"):
            sc.method_config("gptq", **option)
