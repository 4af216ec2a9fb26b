"""Group quantisation (int4 / int8), GQSA group sparsity, GPTQ, storage and the CLI."""

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft import ConfigError, Group, TargetError
from sparsecraft.cli import main
from sparsecraft.oneshot.sparsegpt import sparsegpt_prune
from sparsecraft.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    fit_grid,
    pack_int4,
    quant_linear,
    quantize_codes,
    register_quant_kernel,
    rtn_quantize,
    swap_linear_,
    unpack_int4,
)
from sparsecraft.quant import modules as qmodules

# ---- grids: exact scales and codes on crafted tensors ------------------------------------------

def _reference(x, bits, g, symmetric):
    """The documented rule, element by element in Python floats (float16 via torch)."""
    levels, zero = 2**bits, (2 ** (bits - 1) if symmetric else 0)
    codes, scales, offsets = [], [], []
    for row in x.tolist():
        c_row, s_row, o_row = [], [], []
        for j in range(0, len(row), g):
            grp = row[j:j + g]
            # float32 arithmetic (torch scalars), then float16, as documented
            if symmetric:
                e = max(grp, key=abs)  # first of the largest magnitudes
                s = float(torch.tensor(-e / zero).half())
                o = -zero * s
            else:
                s = float(((torch.tensor(max(grp)) - torch.tensor(min(grp))) / (levels - 1)).half())
                o = float(torch.tensor(min(grp)).half())
            for v in grp:
                code = torch.round((torch.tensor(v) - torch.tensor(o)) / torch.tensor(s)) if s else zero
                c_row.append(min(levels - 1, max(0, int(code))))
            s_row.append(s)
            o_row.append(o)
        codes.append(c_row), scales.append(s_row), offsets.append(o_row)
    return torch.tensor(codes), torch.tensor(scales), torch.tensor(offsets)


def test_symmetric_int4_exact_scales_and_codes():
    x = torch.zeros(2, 32)
    x[0, :6] = torch.tensor([-4.0, 2.0, 1.0, 0.0, 4.0, -0.25])  # -4 first: it maps to code 0
    x[1, :3] = torch.tensor([3.0, -1.5, 0.75])
    q = rtn_quantize(x, QuantSpec(4, 32))
    assert q.scale.dtype == torch.float16 and q.offset.dtype == torch.float16
    assert q.scale[:, 0].tolist() == [0.5, -0.375] and q.offset[:, 0].tolist() == [-4.0, 3.0]
    codes = q.codes()
    # (x - offset) / scale, rounded half to even, clamped to 0..15; 0 is code 8 exactly
    assert codes[0, :6].tolist() == [0, 12, 10, 8, 15, 8]  # +4 clamps to 15 (3.5); -0.25 -> 7.5 -> 8
    assert codes[1, :3].tolist() == [0, 12, 6]
    w = q.dequantize()
    assert w[0, :6].tolist() == [-4.0, 2.0, 1.0, 0.0, 3.5, 0.0]
    assert w[1, :3].tolist() == [3.0, -1.5, 0.75]
    assert (w[:, 6:] == 0).all() and not torch.signbit(w[:, 6:]).any()


def test_asymmetric_and_int8_exact():
    x = torch.linspace(-1.0, 0.875, 16).repeat(2, 2)  # min -1, max 0.875: scale 1.875 / 15 = 0.125
    q = rtn_quantize(x, QuantSpec(4, 32, symmetric=False))
    assert q.scale.unique().tolist() == [0.125] and q.offset.unique().tolist() == [-1.0]
    assert torch.equal(q.dequantize(), x)
    assert q.codes()[0, :16].tolist() == list(range(16))
    y = torch.zeros(1, 64)
    y[0, :3] = torch.tensor([2.0, -1.0, 0.5])
    q8 = rtn_quantize(y, QuantSpec(8, 64))
    assert q8.scale.item() == -2 / 128 and q8.offset.item() == 2.0
    assert q8.codes()[0, :4].tolist() == [0, 192, 96, 128]
    assert torch.equal(q8.dequantize(), y)
    assert q8.packed.shape == (1, 64)  # int8: the codes are the bytes


@pytest.mark.parametrize("bits,g,symmetric", [(4, 32, True), (4, 64, False), (8, 128, True), (8, 32, False)])
def test_rtn_matches_the_reference_rule(bits, g, symmetric):
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(bits + g)) * 3
    x[0, :g] = 0  # an all-zero group: scale 0, the zero code
    q = rtn_quantize(x, QuantSpec(bits, g, symmetric))
    codes, scales, offsets = _reference(x, bits, g, symmetric)
    assert torch.equal(q.codes().long(), codes)
    assert torch.equal(q.scale.float(), scales) and torch.equal(q.offset.float(), offsets)
    expect = codes.float() * scales.repeat_interleave(g, 1) + offsets.repeat_interleave(g, 1)
    assert torch.equal(q.dequantize(), expect)
    if symmetric:
        assert (q.dequantize()[0, :g] == 0).all()


def test_grid_ignores_pruned_entries_and_zero_stays_exact():
    x = torch.tensor([[10.0, -1.0, 0.5, 0.25] + [0.0] * 28])
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[0, 0] = False
    scale, offset = fit_grid(x, QuantSpec(4, 32), keep)
    assert scale.item() == 1 / 8 and offset.item() == -1.0  # -1 is the largest kept magnitude
    codes = quantize_codes(torch.zeros(1), scale, offset, QuantSpec(4, 32))
    assert codes.item() == 8


def test_int4_packing_order():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]  # low nibble = even column
    assert torch.equal(unpack_int4(packed), codes)
    x = torch.randn(3, 64)
    q = rtn_quantize(x, QuantSpec(4, 32))
    c = q.codes()
    assert torch.equal(q.packed & 0x0F, c[:, 0::2]) and torch.equal(q.packed >> 4, c[:, 1::2])


def test_spec_refuses_bad_values():
    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        QuantSpec(3, 64)
    with pytest.raises(ConfigError, match="group must be one of 32, 64, 128"):
        QuantSpec(4, 48)
    with pytest.raises(ConfigError, match="group 128 does not divide its 576 input columns; groups that divide it: 32, 64"):
        rtn_quantize(torch.randn(2, 576), QuantSpec(4, 128), layer="l")


# ---- group sparsity --------------------------------------------------------------------------

def test_group_pattern_masks_are_exact():
    scores = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    scores[1] = scores[1].flip(0)
    p = sc.parse_pattern("group:8")
    assert p == Group(8) and str(p) == "group:8"
    keep = p.keep_mask(scores, 0.5)
    assert p.is_valid(keep)
    assert keep[0].tolist() == [False] * 32 + [True] * 32  # the low groups of row 0
    assert keep[1].tolist() == [True] * 32 + [False] * 32
    # rounding per row: floor(0.3 * 8 + 0.5) = 2 groups of 8 pruned in each row
    assert (~p.keep_mask(torch.rand(3, 64), 0.3)).sum(dim=1).tolist() == [16, 16, 16]
    ties = p.keep_mask(torch.ones(1, 32), 0.5)  # equal scores: lower groups pruned first
    assert ties.tolist() == [[False] * 16 + [True] * 16]
    bad = keep.clone()
    bad[0, 0] = True  # a partial group
    assert not p.is_valid(bad)
    uneven = torch.ones(2, 64, dtype=torch.bool)
    uneven[0, :8] = False  # whole groups, but the rows keep different counts
    assert not p.is_valid(uneven)
    with pytest.raises(TargetError, match="divisible by G=16"):
        Group(16).keep_mask(torch.rand(2, 40), 0.5, layer="x")
    with pytest.raises(ConfigError, match="not a multiple of 2"):
        Group(8).keep_mask(torch.rand(2, 64), num_pruned=3)


def _problem(seed, rows=24, cols=128, n=400):
    """Strongly correlated inputs (a few directions dominate): rounding errors can be
    compensated by the other columns, which is what GPTQ does and round to nearest cannot."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen) @ torch.randn(16, cols, generator=gen) + 0.1 * torch.randn(n, cols, generator=gen)
    return torch.randn(rows, cols, generator=gen), 2 / n * x.T @ x


def _err(w0, w, h):
    d = w0.double() - w.double()
    return float(((d @ h.double()) * d).sum())


def test_group_sparse_sweep_is_row_balanced_whole_groups_and_compacted():
    w, h = _problem(0)
    new, keep, info = sparsegpt_prune(w, h, 0.5, "group:16", quantize=QuantSpec(4, 64), blocksize=64)
    q = info["qweight"]
    assert Group(16).is_valid(keep) and (~keep).sum() == keep.numel() // 2
    assert q.sparse_group == 16 and q.kept_groups == 4 and q.group_index.dtype == torch.int32
    assert (q.group_index[:, 1:] > q.group_index[:, :-1]).all()
    assert torch.equal(q.keep_mask(), keep) and torch.equal(q.dequantize(), new)
    assert (new[~keep] == 0).all()
    assert q.packed.shape == (24, 4 * 16 // 2)  # only the kept groups' codes
    # the compacted codes are the kept groups' codes in group_index order
    full = rtn_quantize(new, QuantSpec(4, 64), keep, 16)
    assert torch.equal(full.group_index, q.group_index)
    # each row drops the 4 groups of least joint sweep loss w_g^T (U_gg^T U_gg)^-1 w_g over
    # the whole row (U: upper Cholesky factor of the damped H^-1), computed here in float64
    hd = h.double() + 0.01 * float(h.double().diagonal().mean()) * torch.eye(128, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    loss = torch.empty(24, 8, dtype=torch.float64)
    for g in range(8):
        ug = u[16 * g:16 * (g + 1), 16 * g:16 * (g + 1)]
        wg = w.double()[:, 16 * g:16 * (g + 1)]
        loss[:, g] = ((wg @ torch.linalg.inv(ug.T @ ug)) * wg).sum(1)
    want = torch.ones(24, 8, dtype=torch.bool).scatter_(1, loss.argsort(dim=1)[:, :4], False)
    assert torch.equal(keep.reshape(24, 8, 16)[..., 0], want)


# ---- GPTQ against round to nearest; joint pruning ----------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False), QuantSpec(8, 128)])
def test_gptq_layer_error_below_rtn(spec):
    for seed in range(4):
        w, h = _problem(seed)
        new, keep, info = sparsegpt_prune(w, h, 0.0, quantize=spec)
        assert keep.all() and torch.equal(info["qweight"].dequantize(), new)
        rtn = rtn_quantize(w, spec).dequantize()
        assert _err(w, new, h) < 0.8 * _err(w, rtn, h)


def test_gptq_act_order_wins_when_the_loudest_inputs_come_last_and_keeps_static_grids():
    spec = QuantSpec(4, 32)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(400, 16, generator=gen) @ torch.randn(16, 128, generator=gen)
        x = x + 0.1 * torch.randn(400, 128, generator=gen)
        x[:, -8:] *= 20  # the loudest inputs last: in place, nothing is left to absorb their error
        w, h = torch.randn(24, 128, generator=gen), 2 / 400 * x.T @ x
        plain, _, _ = sparsegpt_prune(w, h, 0.0, quantize=spec)
        ordered, keep, info = sparsegpt_prune(w, h, 0.0, quantize=spec, act_order=True)
        q = info["qweight"]
        assert keep.all() and info["act_order"] and torch.equal(q.dequantize(), ordered)
        rtn = rtn_quantize(w, spec)  # static grids: fitted on the original weights, group by group
        assert torch.equal(q.scale, rtn.scale) and torch.equal(q.offset, rtn.offset)
        assert _err(w, ordered, h) < 0.7 * _err(w, plain, h)
    with pytest.raises(ConfigError, match="act_order quantises without pruning"):
        sparsegpt_prune(w, h, None, "2:4", quantize=spec, act_order=True)
    with pytest.raises(ConfigError, match="act_order quantises only"):
        sc.quantize_(_llama(), sc.GPTQ(bits=4, group=32, act_order=True, pattern="2:4"), CALIB, progress=False)


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("4:8", None), ("unstructured", 0.5), ("group:8", 0.25)])
def test_joint_prune_and_quantise_masks(pattern, sparsity):
    w, h = _problem(1)
    spec = QuantSpec(4, 32)
    new, keep, info = sparsegpt_prune(w, h, sparsity, pattern, quantize=spec)
    q = info["qweight"]
    assert sc.parse_pattern(pattern).is_valid(keep)
    assert abs((~keep).float().mean().item() - (sparsity or 0.5)) < 1e-9
    assert torch.equal(q.dequantize(), new) and (new[~keep] == 0).all()
    if not pattern.startswith("group"):
        assert (q.codes()[~keep] == spec.zero).all()
    # jointly beats pruning first, then rounding the kept weights to nearest
    plain, plain_keep, _ = sparsegpt_prune(w, h, sparsity, pattern)
    group = int(pattern[6:]) if pattern.startswith("group") else None
    after = rtn_quantize(plain, spec, plain_keep, group).dequantize()
    assert _err(w, new, h) < _err(w, after, h)


def test_sparsegpt_without_quantize_is_unchanged_by_the_refactor():
    # the N:M reference of test_oneshot_math covers the sweep; here: the info keys are the old ones
    w, h = _problem(2)
    _, _, info = sparsegpt_prune(w, h, 0.5)
    assert "qweight" not in info


# ---- modules, dispatch, models -----------------------------------------------------------------

def test_quant_linear_dispatch_and_fallback(monkeypatch):
    q = rtn_quantize(torch.randn(6, 64), QuantSpec(4, 32))
    x = torch.randn(3, 2, 64)
    ref = x @ q.dequantize().T
    assert torch.allclose(quant_linear(x, q), ref, atol=1e-6)
    monkeypatch.setattr(qmodules, "QUANT_KERNELS", [])
    calls = []
    register_quant_kernel(lambda x2, qw, b: calls.append(x2.shape) or None)  # declines
    assert torch.allclose(QuantLinear(q)(x), ref, atol=1e-6)
    register_quant_kernel(lambda x2, qw, b: torch.zeros(x2.shape[0], qw.shape[0]))
    assert (QuantLinear(q)(x) == 0).all() and x.shape[:-1] == QuantLinear(q)(x).shape[:-1]
    assert calls == [(6, 64)]


def _llama(tie=True, hidden=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


CALIB = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", [
    sc.GPTQ(bits=4, group=32),
    sc.GPTQ(bits=4, group=32, pattern="group:16", sparsity=0.5),
    sc.SparseGPT(pattern="2:4", quantize="int4", group=32),
    sc.RTN(bits=8, group=64, symmetric=False),
], ids=["gptq", "gqsa", "sparsegpt-2:4-int4", "rtn-int8-asym"])
def test_quantised_model_save_load_bit_exact(tmp_path, config):
    model = _llama()
    sc.quantize_(model, config, CALIB, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 15  # 14 block layers and the head tied to the embedding
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.packed is model.model.embed_tokens.packed
    out = model(IDS).logits
    path = sc.save(model, tmp_path / "q")
    again = sc.load(path)
    assert _same(_state(model), _state(again))
    assert torch.equal(out, again(IDS).logits)
    assert again.lm_head.packed is again.model.embed_tokens.packed
    meta = sc.get_meta(again)["model.layers.0.mlp.up_proj.weight"]
    assert meta["method"] == config.method and meta["quant"].startswith(("int4", "int8"))


def test_file_size_within_two_percent_of_theory(tmp_path):
    sizes = {}
    for pattern, sparsity in (("unstructured", 0.0), ("group:16", 0.5)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 512, bias=False), nn.ReLU(), nn.Linear(512, 1024, bias=False))
        for i in ("0", "2"):
            w = model.get_submodule(i).weight
            x = torch.randn(256, w.shape[1])
            _, _, info = sparsegpt_prune(w, 2 / 256 * x.T @ x, sparsity, pattern, quantize=QuantSpec(4, 64))
            swap_linear_(model, i, info["qweight"])
        theory = sum(m.quantized().theoretical_nbytes() for m in model.modules() if isinstance(m, QuantLinear))
        file = sc.save(model, tmp_path / f"{sparsity}.safetensors")
        size = file.stat().st_size
        # (below theory when whole grids are pruned: the file stores their zero scales sparsely)
        assert 0.9 * theory <= size <= 1.02 * theory, (size, theory)
        # theory: 4 bits per stored code, 2 + 2 bytes per grid of 64, one bit per group of 16
        kept = 1 - sparsity
        assert theory == 2 * 512 * 1024 * (kept * 0.5 + 4 / 64 + (1 / 128 if sparsity else 0))
        sizes[pattern] = size
        loaded = sc.load(file, model=nn.Sequential(nn.Linear(1024, 512, bias=False), nn.ReLU(),
                                                   nn.Linear(512, 1024, bias=False)))
        assert _same(_state(model), _state(loaded))
    assert sizes["group:16"] < 0.6 * sizes["unstructured"]


# ---- bad input: clear errors, model unchanged ---------------------------------------------------

@pytest.mark.parametrize("config,calib,match", [
    (lambda: sc.GPTQ(bits=4, group=128), True, "group 128 does not divide its 64 input columns"),
    (lambda: sc.GPTQ(bits=3), True, "bits must be 4 or 8, got 3 \\(int3 is not supported\\)"),
    (lambda: sc.SparseGPT(pattern="2:4", quantize="int3"), True, "int3 is not supported"),
    (lambda: sc.GPTQ(bits=4, group=32), False, "method 'gptq' needs calibration data.*'rtn'\\) quantises without"),
    (lambda: sc.GPTQ(bits=4, group=32, pattern="group:12", sparsity=0.5), True,
     "does not tile quantisation groups of 32 \\(12 does not divide 32\\)"),
    (lambda: sc.GPTQ(bits=4, group=64, pattern="group:32", sparsity=0.5), True, "needs G in 8, 16"),
    (lambda: sc.GPTQ(bits=4, group=32, pattern="2:4", symmetric=False), True, "asymmetric grids cannot hold"),
    (lambda: sc.RTN(bits=4, group=32, sparsity=0.5), False, "rtn quantises only"),
    (lambda: sc.GPTQ(bits=4, group=32, dsnot=True), True, "dsnot would move weights off their grids"),
    (lambda: sc.GPTQ(bits=4, group=32, pattern="2:4", learn_mask=True, reconstruct=True), True,
     "learn_mask would move"),
    (lambda: sc.GPTQ(bits=4, group=32, embeddings=True, targets={"include": ["*mlp*"]}), True, None),
    (lambda: sc.GPTQ(bits=4, group=32, colour="red"), True, "method 'gptq' has no option 'colour'"),
])
def test_bad_input_is_refused_and_the_model_unchanged(config, calib, match):
    model = _llama(hidden=64)
    before = _state(model)
    if match is None:  # a valid config for contrast: embeddings=True with a group that fits
        sc.quantize_(model, config(), CALIB, progress=False)
        assert isinstance(model.model.embed_tokens, QuantEmbedding)
        return
    with pytest.raises(ConfigError, match=match):
        sc.quantize_(model, config(), CALIB if calib else None, progress=False)
    assert _same(before, _state(model))
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def test_embeddings_true_refused_when_the_group_does_not_fit_the_embedding():
    model = _llama(hidden=96)  # 96 = 3 x 32: g=64 fits only the down projections (128 inputs)
    before = _state(model)
    config = sc.RTN(bits=4, group=64, embeddings=True, targets={"include": ["*down_proj*"]})
    with pytest.raises(ConfigError, match="embeddings=true: quantisation group 64 does not divide the embedding width 96"):
        sc.quantize_(model, config, progress=False)
    assert _same(before, _state(model))


def test_quantize_refuses_a_method_that_does_not_quantise_and_recipes_default_to_no_pruning():
    with pytest.raises(ConfigError, match="method 'wanda' does not quantise"):
        sc.quantize_(_llama(), sc.Wanda(sparsity=0.5), CALIB)
    assert sc.PruneConfig.from_dict({"method": "gptq"}).sparsity == 0.0
    assert sc.PruneConfig.from_dict({"method": "sparsegpt", "options": {"quantize": "int4"}}).sparsity == 0.5
    assert sc.GPTQ(bits=8).options == {"quantize": "int8", "group": 64}


def test_reconstruction_tunes_grids_and_keeps_codes_and_masks():
    plain, tuned = _llama(), _llama()
    common = dict(bits=4, group=32, pattern="group:16", sparsity=0.5, batch_size=2, embeddings=False)
    sc.quantize_(plain, sc.GPTQ(**common), CALIB, progress=False)
    sc.quantize_(tuned, sc.GPTQ(**common, reconstruct={"epochs": 2, "lr": 3e-3}), CALIB, progress=False)
    changed = 0
    for (name, a), b in zip(plain.named_modules(), tuned.modules()):
        if isinstance(a, QuantLinear) and name.startswith("model.layers.0."):  # the same inputs in both runs
            assert isinstance(b, QuantLinear), name
            assert torch.equal(a.packed, b.packed) and torch.equal(a.group_mask, b.group_mask)  # codes, masks
            changed += not torch.equal(a.scale, b.scale)
        if isinstance(b, QuantLinear):
            assert torch.equal(b.offset, (-8 * b.scale.float()).half())  # still a symmetric grid
    assert changed > 0


def test_report_counts_quantised_bytes_against_fp32_and_fp16():
    model = _llama()
    sc.quantize_(model, sc.RTN(bits=4, group=32), progress=False)
    rep = sc.report(model, input_shape=(1, 8))
    rows = {r.name: r for r in rep.layers}
    assert "lm_head.weight" not in rows  # tied to the embedding: one row
    emb = rows["model.embed_tokens.weight"]
    assert emb.compressed_bytes == 64 * 64 // 2 + 64 * 2 * 4 and emb.dense_bytes == 64 * 64 * 4
    assert emb.dense_flops == 2 * 8 * 64 * 64  # the tied head's products
    t = rep.totals
    fp32 = 4 * sum(p.numel() for p in _llama().parameters())
    assert t["fp32_bytes"] == fp32 and t["fp16_bytes"] == fp32 // 2
    assert t["model_bytes"] == sum(r.compressed_bytes for r in rep.layers) + t["other_params_bytes"]
    assert "of float32" in str(rep)


# ---- CLI -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--bits", "3"], "bits must be 4 or 8, got 3"),
    (["--group", "48"], "group must be one of 32, 64, 128"),
    (["--method", "wanda"], "--method must be gptq or rtn"),
    (["--method", "rtn", "--pattern", "group:16", "--sparsity", "0.5"], "rtn quantises only"),
])
def test_cli_quantize_bad_input_one_line_exit_2(tmp_path, tiny_llama_tok_dir, capsys, args, match):
    out = tmp_path / "q"
    code = main(["-q", "quantize", str(tiny_llama_tok_dir), "--out", str(out), "--samples", "2", "--seq-len", "8",
                 *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists()


def test_cli_quantize_and_prune_quantize_write_quantised_checkpoints(tmp_path, tiny_llama_tok_dir, capsys):
    out = tmp_path / "w4"
    assert main(["-q", "quantize", str(tiny_llama_tok_dir), "--bits", "4", "--group", "32", "--samples", "4",
                 "--seq-len", "16", "--embeddings", "int8", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "quantised" in line and "int4 g32 sym" in line and "of float32" in line
    model, _ = sc.models.load(str(out))
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.model.embed_tokens.quantized().spec.bits == 8
    out2 = tmp_path / "p24"
    assert main(["-q", "prune", str(tiny_llama_tok_dir), "--method", "sparsegpt", "--pattern", "2:4",
                 "--quantize", "int4", "--group", "32", "--no-embeddings", "--samples", "4", "--seq-len", "16",
                 "--out", str(out2)]) == 0
    model, _ = sc.models.load(str(out2))
    layer = model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, QuantLinear) and ((layer.dequantize() != 0).reshape(-1, 4).sum(dim=1) <= 2).all()
    assert not isinstance(model.model.embed_tokens, QuantEmbedding)
    assert main(["-q", "prune", str(tiny_llama_tok_dir), "--method", "wanda", "--quantize", "int4",
                 "--samples", "4", "--seq-len", "16", "--out", str(tmp_path / "x")]) == 2
    assert "method 'wanda' has no option 'quantize'" in capsys.readouterr().err


def test_example_quantize_recipe_is_valid():
    from pathlib import Path

    from sparsecraft.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "examples" / "quantize.yaml")
    assert recipe.prune.solver().quantization().spec() == QuantSpec(4, 64)
    assert recipe.prune.pattern_obj == Group(16)


def test_embeddings_int8_beside_int4_layers_round_trips_and_is_checked(tmp_path):
    model = _llama()
    state = sc.quantize_(model, sc.RTN(bits=4, group=32, embeddings="int8"), progress=False)
    assert state is not None
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and emb.quantized().spec.bits == 8
    assert head.packed is emb.packed
    assert model.model.layers[0].mlp.up_proj.quantized().spec.bits == 4
    assert sc.get_meta(model)["model.embed_tokens.weight"]["quant"].startswith("int8")
    again = sc.load(sc.save(model, tmp_path / "q"))
    assert _same(_state(model), _state(again)) and torch.equal(model(IDS).logits, again(IDS).logits)
    for bad, match in (("int3", "option embeddings: quantize must be 'int4' or 'int8'; int3"),
                       (8, "option 'embeddings' must be")):
        with pytest.raises(ConfigError, match=match):
            sc.RTN(bits=4, group=32, embeddings=bad)
    with pytest.raises(ConfigError, match="embeddings='int8' needs the option quantize"):
        sc.method_config("sparsegpt", sparsity=0.5, embeddings="int8")


# ---- the tied embedding through the solver --------------------------------------------------------

def test_gptq_head_beats_rounding_on_correlated_inputs():
    # the head's inputs lie near a 4-dimensional subspace of 64: rounding each weight ignores
    # that the errors of correlated columns can cancel, GPTQ moves them so they do
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 64, generator=gen)
    x = torch.randn(2048, 4, generator=gen) @ basis + 0.01 * torch.randn(2048, 64, generator=gen)
    hessian = 2 / x.shape[0] * x.T @ x
    w = torch.randn(48, 64, generator=gen)
    spec = QuantSpec(4, 32, False)
    gptq = sc.GPTQ(bits=4, group=32, symmetric=False).solver().quantize_head(w, hessian, spec, "head")
    rtn = rtn_quantize(w, spec, layer="head")
    assert sc.RTN(bits=4).solver().quantize_head(w, hessian, spec, "head") is None  # no solver: rounding

    def error(q):
        d = q.dequantize() - w
        return float(torch.trace(d @ hessian @ d.T))

    assert gptq.spec == spec and tuple(gptq.shape) == tuple(w.shape)
    assert error(gptq) < 0.5 * error(rtn)


def test_tied_embedding_goes_through_the_solver_and_round_trips(tmp_path):
    reference = _llama()
    with torch.no_grad():
        dense = reference(CALIB).logits
    runs = {}
    for solver in (True, False):
        model = _llama()
        sc.quantize_(model, sc.GPTQ(bits=4, group=32, embeddings_solver=solver), CALIB, progress=False)
        runs[solver] = model
    solved, rounded = runs[True], runs[False]
    assert sc.get_meta(solved)["model.embed_tokens.weight"]["method"] == "gptq"
    assert sc.get_meta(rounded)["model.embed_tokens.weight"]["method"] == "rtn"
    assert solved.lm_head.packed is solved.model.embed_tokens.packed  # still one tied tensor
    assert not torch.equal(solved.model.embed_tokens.packed, rounded.model.embed_tokens.packed)
    for name, layer in solved.named_modules():  # the layers before it are the same in both runs
        if isinstance(layer, QuantLinear) and name != "lm_head":
            assert torch.equal(layer.packed, rounded.get_submodule(name).packed), name
    with torch.no_grad():
        errors = {k: float((m(CALIB).logits - dense).pow(2).mean()) for k, m in runs.items()}
    assert errors[True] < errors[False]
    again = sc.load(sc.save(solved, tmp_path / "q"))
    assert _same(_state(solved), _state(again)) and torch.equal(solved(IDS).logits, again(IDS).logits)
    default = _llama()
    sc.quantize_(default, sc.GPTQ(bits=4, group=32), CALIB, progress=False)
    assert torch.equal(default.model.embed_tokens.packed, solved.model.embed_tokens.packed)  # the default


@pytest.mark.parametrize("make,tie,match", [
    (lambda: sc.RTN(bits=4, group=32, embeddings_solver=True), True, "method 'rtn' has no error-compensating"),
    (lambda: sc.GPTQ(bits=4, group=32, embeddings_solver=True), False, "not tied to an output head"),
])
def test_embeddings_solver_true_refused_when_it_cannot_be_honoured(make, tie, match):
    model = _llama(tie=tie)
    before = _state(model)
    with pytest.raises(ConfigError, match=f"option embeddings_solver=true: .*{match}"):
        sc.quantize_(model, make(), CALIB, progress=False)
    assert _same(before, _state(model))
    with pytest.raises(ConfigError, match="embeddings_solver=true needs the token embedding quantised"):
        sc.GPTQ(bits=4, group=32, embeddings=False, embeddings_solver=True)
    with pytest.raises(ConfigError, match="option 'embeddings_solver' must be"):
        sc.GPTQ(bits=4, group=32, embeddings_solver="yes")


def test_cli_embeddings_solver_option(tmp_path, tiny_llama_tok_dir, capsys):
    common = ["-q", "quantize", str(tiny_llama_tok_dir), "--bits", "4", "--group", "32", "--samples", "4",
              "--seq-len", "16"]
    out = tmp_path / "rtn-embedding"
    assert main([*common, "--option", "embeddings_solver=false", "--out", str(out)]) == 0
    capsys.readouterr()
    assert sc.get_meta(sc.load(out / "model.safetensors"))["model.embed_tokens.weight"]["method"] == "rtn"
    bad = tmp_path / "bad"
    code = main([*common, "--option", "embeddings_solver=maybe", "--out", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "embeddings_solver" in err[0], err
    assert not bad.exists()


def test_a_failed_head_solve_rounds_the_embedding_and_says_so(monkeypatch, caplog):
    from sparsecraft.oneshot.gptq import GPTQSolver
    from sparsecraft.oneshot.sparsegpt import SolverError

    def fail(self, weight, hessian, spec, layer):
        raise SolverError(f"layer '{layer}': the Hessian stayed singular")

    monkeypatch.setattr(GPTQSolver, "quantize_head", fail)
    model = _llama()
    with caplog.at_level("WARNING", logger="sparsecraft.prune"):
        sc.quantize_(model, sc.GPTQ(bits=4, group=32), CALIB, progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.lm_head.packed is model.model.embed_tokens.packed
    assert sc.get_meta(model)["model.embed_tokens.weight"]["method"] == "rtn"
    assert "rounded to nearest instead" in caplog.text
