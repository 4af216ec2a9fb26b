"""sparsecraft.runtime: kernels, the measuring planner, activation sparsity, CLI.

The compiled kernels are built on first use (about a minute, once; cached in the repo's
.cache/). Set SPARSECRAFT_NO_EXTENSION=1 to skip the tests that need them.
"""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecraft as sc
from sparsecraft import runtime as rt
from sparsecraft.runtime import activation as act
from sparsecraft.runtime import extension
from sparsecraft.runtime.kernels import KERNELS

from conftest import assert_unchanged, snapshot


def _sparse_weight(shape, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    return w.masked_fill(torch.rand(*shape, generator=g) < sparsity, 0.0)


def _sparse_mlp(sparsity=0.9):
    """Two Linear layers with zeros set directly (no SparsityState, no meta)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 72), nn.ReLU(), nn.Linear(72, 24, bias=False))
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.weight.copy_(_sparse_weight(layer.weight.shape, sparsity))
    return m.eval()


def _fixed_timer(times):
    """Timer reporting ``times[kernel]`` seconds for every kernel it is given."""
    calls = []

    def timer(fns, *, layer, rows):
        calls.append((layer, rows, sorted(fns)))
        for fn in fns.values():
            fn()
        return {k: times.get(k, 1.0) for k in fns}

    timer.calls = calls
    return timer


@pytest.fixture(scope="module")
def ext():
    module = extension.get_extension()
    if module is None:
        pytest.skip(f"compiled kernels unavailable: {extension.extension_status()}")
    return module


# -- kernels ------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["dense", "csr", "csr_embag", "csr_cpp"])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 37])
def test_kernels_equal_dense(kernel, rows, request):
    if kernel == "csr_cpp":
        request.getfixturevalue("ext")
    w = _sparse_weight((33, 70), 0.8)
    w[5] = 0.0  # an empty row
    for bias in (None, torch.randn(33)):
        x = torch.randn(rows, 70)
        k = KERNELS[kernel]
        packed = k.pack(w)
        y = k.run(packed, x, bias, 33)
        assert y.is_contiguous() and y.shape == (rows, 33)
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(k.unpack(packed, (33, 70)), w)


def test_cpp_kernel_takes_transposed_input_and_wide_layers(ext):
    w = _sparse_weight((16, 40000), 0.99)  # in_features > 32767: 16-bit indices read unsigned
    packed = KERNELS["csr_cpp"].pack(w)
    assert packed["col"].dtype == torch.int16
    x = torch.randn(40000, 9).t()  # transposed layout, as another sparse layer may hand it over
    torch.testing.assert_close(KERNELS["csr_cpp"].run(packed, x, None, 16), F.linear(x, w), rtol=1e-4, atol=1e-4)
    assert torch.equal(KERNELS["csr_cpp"].unpack(packed, (16, 40000)), w)


# -- the planner --------------------------------------------------------------------------
def test_planner_falls_back_to_dense_when_sparse_is_slower():
    m = _sparse_mlp()
    before = snapshot(m)
    timer = _fixed_timer({"dense": 1.0, "csr": 2.0, "csr_embag": 3.0, "csr_cpp": 1.5})
    report = rt.compile_(m, torch.randn(4, 40), torch.randn(1, 40), timer=timer)
    assert all(type(layer) is not rt.SparseLinear for layer in m)
    assert report.plan() == {}
    assert {p.chosen for p in report.layers} == {"dense"}
    assert {(l, r) for l, r, _ in timer.calls} == {("0", 4), ("0", 1), ("2", 4), ("2", 1)}
    assert_unchanged(m, before)


def test_planner_needs_the_margin():
    m = _sparse_mlp()
    report = rt.compile_(m, torch.randn(4, 40), kernels=["csr"], timer=_fixed_timer({"dense": 1.0, "csr": 0.97}))
    assert report.plan() == {}  # 3% faster is noise
    report = rt.compile_(m, torch.randn(4, 40), kernels=["csr"], timer=_fixed_timer({"dense": 1.0, "csr": 0.9}))
    assert set(report.plan()) == {"0", "2"}


def test_planner_picks_sparse_when_faster_and_outputs_match():
    m = _sparse_mlp()
    x = torch.randn(2, 7, 40)
    ref = m(x)
    timer = _fixed_timer({"dense": 1.0, "csr": 0.5, "csr_embag": 0.4, "csr_cpp": 2.0})
    report = rt.compile_(m, x, timer=timer)
    assert isinstance(m[0], rt.SparseLinear) and isinstance(m[2], rt.SparseLinear)
    assert m[0].plan == {14: "csr_embag"}
    assert m[0].bias is not None and m[2].bias is None
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    row = report.layers[0]
    assert row.measured_speedup == pytest.approx(2.5)
    assert row.predicted_speedup == pytest.approx(1 / (1 - row.sparsity))
    assert "csr_embag" in str(report)
    json.loads(report.to_json())


def test_planner_plans_per_input_size():
    m = _sparse_mlp()
    prompt, token = torch.randn(1, 64, 40), torch.randn(1, 1, 40)
    ref_p, ref_t = m(prompt), m(token)

    def timer(fns, *, layer, rows):  # sparse wins for the prompt only
        return {k: (1.0 if k == "dense" else (0.5 if rows == 64 else 2.0)) for k in fns}

    rt.compile_(m, prompt, token, kernels=["csr"], timer=timer)
    assert m[0].plan == {1: "dense", 64: "csr"}
    assert m[0].kernel_for(1) == "dense" and m[0].kernel_for(50) == "csr"
    torch.testing.assert_close(m(prompt), ref_p, rtol=1e-5, atol=1e-5)
    assert torch.equal(m(token), ref_t)  # the dense kernel is F.linear itself


def test_planner_skips_too_dense_layers():
    m = _sparse_mlp(sparsity=0.3)
    report = rt.compile_(m, torch.randn(2, 40), timer=_fixed_timer({"dense": 1.0}))
    assert report.layers == [] and set(report.skipped) == {"0", "2"}
    assert "below min_sparsity" in report.skipped["0"]


def test_compile_refuses_open_sparsity_state():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    state = sc.prune_(m, sc.Magnitude(sparsity=0.9, targets={"include": ["*"]}), progress=False)
    before = snapshot(m)
    with pytest.raises(sc.SparsecraftError, match="finalize first"):
        rt.compile_(m, torch.randn(2, 16), timer=_fixed_timer({"dense": 1.0, "csr": 0.1}))
    assert all(type(layer) is not rt.SparseLinear for layer in m)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    state.finalize_()
    rt.compile_(m, torch.randn(2, 16), kernels=["csr"], timer=_fixed_timer({"dense": 1.0, "csr": 0.1}))
    assert isinstance(m[0], rt.SparseLinear)


def test_compile_wrong_example_input_names_the_layer():
    m = _sparse_mlp()
    before = snapshot(m)
    with pytest.raises(sc.SparsecraftError) as info:
        rt.compile_(m, torch.randn(3, 41), timer=_fixed_timer({"dense": 1.0, "csr": 0.1}))
    msg = str(info.value)
    assert "(3, 41)" in msg and "module '0'" in msg and "last dimension is 40" in msg
    assert all(type(layer) is not rt.SparseLinear for layer in m)
    assert_unchanged(m, before)
    # the second example input is checked as well, before anything changes
    with pytest.raises(sc.SparsecraftError, match="example input 2"):
        rt.compile_(m, torch.randn(3, 40), torch.randn(1, 39), timer=_fixed_timer({"dense": 1.0, "csr": 0.1}))
    assert_unchanged(m, before)


def test_compile_twice_and_bad_options():
    m = _sparse_mlp()
    with pytest.raises(sc.ConfigError, match="unknown kernel"):
        rt.compile_(m, torch.randn(2, 40), kernels=["bsr"])
    rt.compile_(m, torch.randn(2, 40), kernels=["csr"], timer=_fixed_timer({"dense": 1.0, "csr": 0.1}))
    with pytest.raises(sc.SparsecraftError, match="already compiled"):
        rt.compile_(m, torch.randn(2, 40))


def test_compiled_state_dict_save_load_and_decompile(tmp_path):
    m = _sparse_mlp()
    x = torch.randn(5, 40)
    ref, before = m(x), snapshot(m)
    rt.compile_(m, x, kernels=["csr"], timer=_fixed_timer({"dense": 1.0, "csr": 0.1}))
    sd = m.state_dict()
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in before)
    assert torch.equal(m[0].weight, before["0.weight"])
    # a compiled model saves like any other; the checkpoint loads into a plain one
    sc.save(m, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(40, 72), nn.ReLU(), nn.Linear(72, 24, bias=False))
    sc.load(tmp_path / "m.safetensors", model=fresh)
    assert torch.equal(fresh(x), ref)
    # and a state dict loads into a compiled model, repacking its kernels
    other = _sparse_mlp(sparsity=0.95)
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m(x), other(x), rtol=1e-5, atol=1e-5)
    rt.decompile_(m)
    assert type(m[0]) is nn.Linear and torch.equal(m(x), other(x))


def test_apply_saved_plan_and_unavailable_kernel_falls_back(monkeypatch, caplog):
    m = _sparse_mlp()
    x = torch.randn(3, 40)
    ref = m(x)
    report = rt.compile_(m, x, kernels=["csr"], timer=_fixed_timer({"dense": 1.0, "csr": 0.1}))
    plan = json.loads(report.to_json())["plan"]
    fresh = _sparse_mlp()
    assert rt.apply_plan_(fresh, plan) == ["0", "2"]
    torch.testing.assert_close(fresh(x), ref, rtol=1e-5, atol=1e-5)
    # a plan naming the compiled kernel on a machine without a compiler runs dense, with a warning
    monkeypatch.setattr(extension, "_why_not", lambda: "no C++ compiler (test)")
    extension._reset_for_tests()
    try:
        fresh = _sparse_mlp()
        with caplog.at_level(logging.WARNING):
            assert rt.apply_plan_(fresh, {"0": {"3": "csr_cpp"}}) == []
        assert "unavailable" in caplog.text and "no C++ compiler" in caplog.text
        assert type(fresh[0]) is nn.Linear
    finally:
        extension._reset_for_tests()


def test_planner_without_compiler_logs_and_uses_the_others(monkeypatch, caplog):
    monkeypatch.setattr(extension, "_why_not", lambda: "no C++ compiler (test)")
    extension._reset_for_tests()
    try:
        m = _sparse_mlp()
        with caplog.at_level(logging.WARNING):
            report = rt.compile_(m, torch.randn(2, 40), timer=_fixed_timer({"dense": 1.0, "csr_cpp": 0.1, "csr": 0.5}))
        assert "compiled sparse kernels unavailable (no C++ compiler (test))" in caplog.text
        assert "csr_cpp" in report.layers[0].rejected
        assert m[0].plan == {2: "csr"}
        assert "no C++ compiler" in report.extension
    finally:
        extension._reset_for_tests()


def test_planner_with_real_timer_is_not_slower_in_its_own_measurement():
    m = _sparse_mlp(sparsity=0.95)
    report = rt.compile_(m, torch.randn(8, 40), repeats=3)
    for p in report.layers:
        assert p.times[p.chosen] <= p.times["dense"]
        assert p.chosen == "dense" or p.times[p.chosen] <= 0.95 * p.times["dense"]


# -- activation sparsity -----------------------------------------------------------------
def _tokens(n, length=24, seed=0):
    return torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(seed))


def test_activation_sparsity_zero_is_exactly_dense(tiny_lm):
    prompt, token = _tokens(2), _tokens(1, 1, seed=3)
    ref_p, ref_t = tiny_lm(prompt), tiny_lm(token)
    handle = rt.sparsify_activations_(tiny_lm, _tokens(4, seed=1), sparsity=0.0)
    assert all(m.threshold == 0.0 for m in handle.modules.values())
    for prefill in ("dense", "masked"):
        handle.set_mode(prefill=prefill)
        assert torch.equal(tiny_lm(prompt), ref_p)
        assert torch.equal(tiny_lm(token), ref_t)


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_calibrated_thresholds_hit_target_on_held_out_tokens(tiny_lm, method):
    handle = rt.sparsify_activations_(tiny_lm, _tokens(16, seed=1), sparsity=0.5, method=method)
    reached = handle.measure_sparsity(_tokens(16, seed=2))
    assert reached["overall"] == pytest.approx(0.5, abs=0.03)
    for name in handle.modules:
        assert reached[name] == pytest.approx(0.5, abs=0.06), name
    if method == "wina":
        m = handle.modules["blocks.0.up"]
        torch.testing.assert_close(m.scale, m.weight.norm(dim=0))


@pytest.mark.parametrize("kernel", ["embag", "cpp"])
@pytest.mark.parametrize("method", ["teal", "wina"])
def test_gather_decode_equals_masked_dense(tiny_lm, kernel, method, request):
    if kernel == "cpp":
        request.getfixturevalue("ext")
    # one layer, pure math
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(32)
    scale = act.wina_scale(w) if method == "wina" else None
    thr = float(act.scores(x, scale).median())
    expected = act.masked_linear(x, w, b, thr, scale)
    wt = w.t().contiguous()
    if kernel == "cpp":
        got = extension.get_extension().act_gemv(x, wt, scale, thr, b)
    else:
        got = act.gather_decode(x, wt, b, thr, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # whole model, one decoded token: the gather path against the masked dense path
    handle = rt.sparsify_activations_(tiny_lm, _tokens(8, seed=1), sparsity=0.5, method=method, kernel=kernel)
    token = _tokens(1, 1, seed=5)
    gathered = tiny_lm(token)
    handle.set_mode(kernel="masked")
    torch.testing.assert_close(gathered, tiny_lm(token), rtol=1e-5, atol=1e-5)


def test_activation_sparsity_modes_and_remove(tiny_lm):
    prompt = _tokens(2, seed=4)
    before, ref = snapshot(tiny_lm), tiny_lm(prompt)
    handle = rt.sparsify_activations_(tiny_lm, _tokens(8, seed=1), sparsity=0.5)
    assert set(handle.modules) == {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"}  # no head
    assert set(tiny_lm.state_dict()) == set(before)
    assert torch.equal(tiny_lm(prompt), ref)  # prefill runs dense by default
    handle.set_mode(prefill="masked")
    assert not torch.allclose(tiny_lm(prompt), ref)
    assert handle.modules["blocks.0.up"].weight.t().is_contiguous()
    handle.remove()
    assert type(tiny_lm.blocks[0]["up"]) is nn.Linear and tiny_lm.blocks[0]["up"].weight.is_contiguous()
    assert_unchanged(tiny_lm, before)
    with pytest.raises(sc.SparsecraftError, match="already removed"):
        handle.remove()


def test_activation_sparsity_bad_input_leaves_model_unchanged(tiny_lm):
    before = snapshot(tiny_lm)
    with pytest.raises(sc.ConfigError, match="method"):
        rt.sparsify_activations_(tiny_lm, _tokens(2), method="chess")
    with pytest.raises(sc.ConfigError, match=r"\[0, 1\)"):
        rt.sparsify_activations_(tiny_lm, _tokens(2), sparsity=1.0)
    with pytest.raises(sc.SparsecraftError, match="calibration tokens"):
        rt.sparsify_activations_(tiny_lm, torch.randn(2, 8))  # floats are no token ids
    assert all(type(m) is not act.ActivationSparseLinear for m in tiny_lm.modules())
    assert_unchanged(tiny_lm, before)


# -- timing and the CLI ------------------------------------------------------------------
def test_greedy_decode_matches_generate(tiny_llama_dir):
    model, _ = sc.models.load(str(tiny_llama_dir))
    ids = _tokens(1, 8, seed=7)
    result = rt.greedy_decode(model, ids, 5)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, 8:].tolist()
    assert result.tokens == expected and result.decode_steps == 4
    assert result.tokens_per_second > 0 and rt.prefill_seconds(model, ids, repeats=1) > 0


def test_cli_compile_and_bench(tmp_path, tiny_llama_dir, capsys):
    from sparsecraft.cli import main

    pruned = tmp_path / "pruned"
    assert main(["-q", "prune", str(tiny_llama_dir), "--sparsity", "0.9", "--include", "*.mlp.*",
                 "--out", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["-q", "compile", str(pruned), "--prompt-len", "16", "--repeats", "1",
                 "--out", str(tmp_path / "compiled")]) == 0
    out = capsys.readouterr().out
    assert "16 rows" in out and "1 rows" in out and "saved model and plan" in out
    model, _ = rt.load_compiled(tmp_path / "compiled")
    plan = json.loads((tmp_path / "compiled" / rt.PLAN_FILE).read_text())["plan"]
    assert {n for n, m in model.named_modules() if isinstance(m, rt.SparseLinear)} == set(plan)
    assert main(["-q", "bench", str(pruned), "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1",
                 "--act-sparsity", "0.5", "--calib-samples", "2", "--calib-len", "16",
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "activation sparsity 0.5 (teal" in out and "decode tok/s" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows["dense"]["decode_tok_s"] > 0
    fused = [r for name, r in rows.items() if name.startswith("fused decode step")]  # a Llama: the fused row
    assert len(fused) == 1 and fused[0]["decode_tok_s"] > 0 and len(fused[0]["tokens"]) == 4


def test_cli_compile_refuses_existing_out(tmp_path, tiny_llama_dir, capsys):
    from sparsecraft.cli import main

    out = tmp_path / "exists"
    out.mkdir()
    assert main(["compile", str(tiny_llama_dir), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
