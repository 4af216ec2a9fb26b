"""sparsecraft.runtime.qkernels: the quantised-weight layout, its kernels and custom ops.

Every kernel is compared with dequantise-then-matmul (``dequantize`` is the reference
semantics of notes/quant_layout.md), on every instruction set this CPU runs, with and without
the compiled library. The library is built on first use (about a minute, once).
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from sparsecraft.errors import ConfigError
from sparsecraft.quant import QuantizedWeight, QuantLinear, QuantSpec, pack_int4, rtn_quantize, unpack_int4
from sparsecraft.runtime import extension
from sparsecraft.runtime import qkernels as qk

KINDS = {  # name -> (bits, sparse_group)
    "int8": (8, 0),
    "int4": (4, 0),
    "int4-group8": (4, 8),
    "int4-group16": (4, 16),
}


def _random_qweight(out, n_in, g, bits, sparse_group, keep=0.5, seed=0):
    """Random codes, fp16 scales and offsets in the layout (no quantiser involved)."""
    gen = torch.Generator().manual_seed(seed)
    scale = (torch.rand(out, n_in // g, generator=gen) * 0.02 + 0.001).to(torch.float16)
    offset = (torch.randn(out, n_in // g, generator=gen) * 0.05).to(torch.float16)
    group_index = None
    if sparse_group:
        n_groups = n_in // sparse_group
        kept = max(1, round(keep * n_groups))
        group_index = torch.stack([torch.randperm(n_groups, generator=gen)[:kept].sort().values
                                   for _ in range(out)]).to(torch.int32)
        codes = torch.randint(0, 16, (out, kept * sparse_group), generator=gen, dtype=torch.uint8)
    else:
        codes = torch.randint(0, 2 ** bits, (out, n_in), generator=gen, dtype=torch.uint8)
    if bits == 4:
        codes = pack_int4(codes)
    return QuantizedWeight(QuantSpec(bits, g), (out, n_in), codes, scale, offset, sparse_group or None, group_index)


def _reference(qw, x, bias, w=None):
    w = (qw.dequantize() if w is None else w).double()
    return (x.double() @ w.t() + (0 if bias is None else bias.double())).float()


def _assert_close(y, ref):
    # 1e-4 relative to the output's scale: a float32 dot product of up to 1536 terms
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def ext():
    module = extension.get_quant_extension()
    if module is None:
        pytest.skip(f"compiled quantised kernels unavailable: {extension.quant_extension_status()}")
    yield module
    qk.set_kernel_isa("avx512")  # back to the best this CPU has


def _isas(ext):
    best = qk.ISAS.index(qk._apply_isa(ext, "avx512"))
    return qk.ISAS[: best + 1]


# -- the layout ------------------------------------------------------------------------------------
def test_int4_nibble_order_and_dequantize_exact():
    codes = torch.tensor([[1, 2, 3, 4] * 8, [15, 0, 7, 8] * 8], dtype=torch.uint8)  # [2, 32]
    packed = pack_int4(codes)
    assert packed[0, :2].tolist() == [0x21, 0x43]  # column 2j low nibble, 2j + 1 high
    assert packed[1, :2].tolist() == [0x0F, 0x87]
    assert torch.equal(unpack_int4(packed), codes)
    scale = torch.tensor([[0.5], [0.25]], dtype=torch.float16)
    offset = torch.tensor([[-1.0], [2.0]], dtype=torch.float16)
    w = qk.dequantize(packed, scale, offset, 32, bits=4)
    assert torch.equal(w, codes.float() * scale.float() + offset.float())
    assert w[0, :4].tolist() == [-0.5, 0.0, 0.5, 1.0]


def test_group_sparse_dequantize_is_the_scattered_dense_reference():
    out, n_in, g, G = 3, 64, 32, 8
    qw = _random_qweight(out, n_in, g, 4, G, keep=0.25, seed=3)
    codes = qw.codes()  # [out, kept * G]
    dense = torch.zeros(out, n_in, dtype=torch.uint8)
    mask = torch.zeros(out, n_in, dtype=torch.bool)
    for r in range(out):
        for k, idx in enumerate(qw.group_index[r].tolist()):
            dense[r, idx * G:(idx + 1) * G] = codes[r, k * G:(k + 1) * G]
            mask[r, idx * G:(idx + 1) * G] = True
    want = (dense.float() * qw.scale.float().repeat_interleave(g, 1) + qw.offset.float().repeat_interleave(g, 1)) * mask
    assert torch.equal(qw.dequantize(), want)
    assert int((qw.dequantize() != 0).sum(1).max()) <= 2 * G  # 2 of 8 groups kept per row


# -- kernels against the reference -------------------------------------------------------------------
SHAPES = [(37, 96, 32), (129, 576, 64), (64, 1536, 128), (5, 160, 32)]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("out,n_in,g", SHAPES)
def test_kernels_equal_dequantize_then_matmul(ext, kind, out, n_in, g):
    bits, sparse_group = KINDS[kind]
    qw = _random_qweight(out, n_in, g, bits, sparse_group, keep=0.4, seed=out)
    bias, w = torch.randn(out), qw.dequantize()
    gen = torch.Generator().manual_seed(1)
    for isa in _isas(ext):
        assert qk.set_kernel_isa(isa) == isa
        for batch in (1, 2, 3, 5, 8, 13, 40):  # 13: two passes of <= 8 rows; 40: dequantise + GEMM
            x = torch.randn(batch, n_in, generator=gen)
            for b in (bias, None):
                _assert_close(qk.quantized_linear(x, qw, b), _reference(qw, x, b, w))


def test_ops_take_leading_dims_and_strided_input(ext):
    qw = _random_qweight(24, 128, 64, 4, 0)
    x = torch.randn(2, 3, 256)[..., ::2]  # [2, 3, 128], not contiguous
    y = torch.ops.sparsecraft.qlinear_int4(x, qw.packed, qw.scale, qw.offset, None, 64)
    assert y.shape == (2, 3, 24)
    _assert_close(y.reshape(6, 24), _reference(qw, x.reshape(6, 128), None))


def test_float_gemv_of_the_decode_step(ext):
    w, x, b = torch.randn(77, 200), torch.randn(3, 200), torch.randn(77)
    for isa in _isas(ext):
        qk.set_kernel_isa(isa)
        _assert_close(ext.linear_f32(x, w, b), F.linear(x.double(), w.double(), b.double()).float())


def test_large_batches_reuse_one_dequantisation_buffer_without_stale_values(ext):
    """Batches over 32 rows dequantise into a buffer the thread reuses: a group-sparse layer
    after a dense one of more weights must see zeros where its groups are pruned, not the
    dense layer's values, and a layer over the reuse limit (4M weights) gets its own."""
    x = torch.randn(40, 256)
    for bits, sparse_group, out in ((4, 0, 300), (4, 16, 100), (8, 0, 50), (4, 8, 120), (4, 0, 16400)):
        qw = _random_qweight(out, 256, 64, bits, sparse_group, seed=out)
        _assert_close(qk.quantized_linear(x, qw, None), _reference(qw, x, None))


def test_compiled_dequantize_equals_reference(ext):
    """Bit for bit on every instruction set (a multiply then an add, never fused)."""
    for isa in _isas(ext):
        qk.set_kernel_isa(isa)
        for kind, (bits, sparse_group) in KINDS.items():
            for out, n_in, g in ((9, 256, 64), (5, 160, 32)):
                qw = _random_qweight(out, n_in, g, bits, sparse_group)
                got = ext.dequantize(qw.packed, qw.scale, qw.offset, qw.group_index, bits, g, sparse_group)
                assert torch.equal(got, qw.dequantize()), (isa, kind, n_in)


def test_isa_is_capped_and_reported(ext):
    assert qk.kernel_isa() in qk.ISAS
    assert ext.detected_isa() in qk.ISAS
    best = qk.set_kernel_isa("avx512")
    assert qk.ISAS.index(best) <= qk.ISAS.index(ext.detected_isa())
    assert qk.set_kernel_isa("generic") == "generic" == qk.kernel_isa()
    with pytest.raises(ConfigError, match="must be one of generic, avx2, avx512"):
        qk.set_kernel_isa("sse9")


def test_activation_rounding_is_the_documented_rule():
    x = torch.zeros(2, 64)
    x[0, :32] = torch.arange(32) - 15.5  # max |x| 15.5: codes round(x * (127 / 15.5)) in float32
    x[0, 32:] = torch.tensor([127.0, -63.5, 0.5, -0.5] * 8)  # halves round away from zero
    codes, scales = qk.quantize_activations(x)
    assert codes.dtype == torch.int8 and scales.shape == (2, 2)
    products = (x[0, :32] * (torch.tensor(127.0) / torch.tensor(15.5))).tolist()  # float32 products
    want = [int(abs(v) + 0.5) * (1 if v > 0 else -1) for v in products]
    assert codes[0, :32].tolist() == want and want[0] == -127 and want[-1] == 127
    assert codes[0, 32:36].tolist() == [127, -64, 1, -1] and float(scales[0, 1]) == 1.0
    assert (codes[1] == 0).all() and (scales[1] == 0).all()  # an all-zero block


def _x8_reference(qw, x, bias):
    """The int8-activation product in float64: codes . rounded x, offsets . float x."""
    codes, scales = qk.quantize_activations(x)
    rounded = (codes.double().reshape(x.shape[0], -1, 32) * scales.double()[..., None]).reshape(x.shape)
    off = qw.offset.double().repeat_interleave(qw.spec.group, dim=1)
    y = rounded @ (qw.dequantize().double() - off).t() + x.double() @ off.t()
    return (y + (0 if bias is None else bias.double())).float()


@pytest.mark.parametrize("out,n_in,g", SHAPES)
def test_int8_activation_kernel_equals_its_reference_and_stays_near_float(ext, out, n_in, g):
    qw = _random_qweight(out, n_in, g, 4, 0, seed=out + 1)
    bias = torch.randn(out)
    gen = torch.Generator().manual_seed(2)
    for isa in _isas(ext):
        assert qk.set_kernel_isa(isa) == isa
        for batch in (1, 3, 8, 13, 40):
            x = torch.randn(batch, n_in, generator=gen)
            x[0, :32] = 0  # a block of zeros
            y = qk.qlinear_int8_activations(x, qw.packed, qw.scale, qw.offset, bias, group_size=g)
            _assert_close(y, _x8_reference(qw, x, bias))
            exact = _reference(qw, x, bias)
            assert float((y - exact).abs().max()) < 0.05 * float(exact.abs().max())


def test_int8_activations_without_the_library_compute_the_same_rounding(monkeypatch):
    monkeypatch.setattr(extension, "_why_not", lambda: "no C++ compiler (test)")
    extension._reset_for_tests()
    try:
        qw = _random_qweight(33, 192, 64, 4, 0)
        x = torch.randn(3, 192)
        y = qk.qlinear_int8_activations(x, qw.packed, qw.scale, qw.offset, None, group_size=64)
        _assert_close(y, _x8_reference(qw, x, None))
    finally:
        extension._reset_for_tests()


def test_without_the_compiled_library_the_ops_fall_back_and_log(monkeypatch, caplog):
    monkeypatch.setattr(extension, "_why_not", lambda: "no C++ compiler (test)")
    extension._reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING):
            for bits, sparse_group in KINDS.values():
                qw = _random_qweight(33, 192, 64, bits, sparse_group)
                x = torch.randn(3, 192)
                _assert_close(qk.quantized_linear(x, qw, None), _reference(qw, x, None))
        assert qk.kernel_isa() is None
        assert "quantised kernels unavailable (no C++ compiler (test))" in caplog.text
        assert extension.quant_extension_status() == "no C++ compiler (test)"
    finally:
        extension._reset_for_tests()


# -- ops in torch.compile -------------------------------------------------------------------------------
def test_ops_pass_opcheck_and_compile_fullgraph():
    for bits, sparse_group in KINDS.values():
        qw = _random_qweight(16, 64, 32, bits, sparse_group)
        x, b = torch.randn(2, 64), torch.randn(16)
        if sparse_group:
            op, args = torch.ops.sparsecraft.qlinear_int4_gs, (x, qw.packed, qw.group_index, qw.scale, qw.offset, b,
                                                               32, sparse_group)
        else:
            op = torch.ops.sparsecraft.qlinear_int4 if bits == 4 else torch.ops.sparsecraft.qlinear_int8
            args = (x, qw.packed, qw.scale, qw.offset, b, 32)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        layer = QuantLinear(qw, b, torch.float32)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        _assert_close(compiled(x), _reference(qw, x, b))


# -- bad input ---------------------------------------------------------------------------------------------
def test_group_size_not_dividing_the_width_is_refused():
    with pytest.raises(ConfigError, match="quantisation group 64 does not divide its 96 input columns"):
        rtn_quantize(torch.randn(4, 96), QuantSpec(4, 64))
    with pytest.raises(ConfigError, match="group size 48 must be one of 32, 64, 128"):
        qk.check_layout(torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 2, dtype=torch.float16),
                        torch.zeros(4, 2, dtype=torch.float16), 48, bits=4)
    qw = _random_qweight(4, 128, 64, 4, 0)
    with pytest.raises(ConfigError, match="group size 64 does not divide the input width 100"):
        qk.quantized_linear(torch.randn(1, 100), qw)
    with pytest.raises(ConfigError, match="input width 192 but the scales cover 128 columns"):
        qk.quantized_linear(torch.randn(1, 192), qw)


def test_bad_layouts_are_refused_with_the_rule():
    qw = _random_qweight(4, 128, 64, 4, 16)
    with pytest.raises(ConfigError, match="bits must be 4 or 8, got 3"):
        qk.check_layout(qw.packed, qw.scale, qw.offset, 64, bits=3)
    with pytest.raises(ConfigError, match="sparse group 12 must be 8 or 16"):
        qk.check_layout(qw.packed, qw.scale, qw.offset, 64, bits=4, group_index=qw.group_index, sparse_group=12)
    with pytest.raises(ConfigError, match="group sparsity needs int4 codes"):
        qk.check_layout(qw.packed, qw.scale, qw.offset, 64, bits=8, group_index=qw.group_index, sparse_group=16)
    with pytest.raises(ConfigError, match="int4 codes for 128 inputs must be"):
        qk.check_layout(qw.packed, qw.scale, qw.offset, 64, bits=4)
    with pytest.raises(ConfigError, match="scale and offset must be float16"):
        qk.check_layout(qw.packed, qw.scale.float(), qw.offset, 64, bits=4, group_index=qw.group_index,
                        sparse_group=16)
    with pytest.raises(ConfigError, match="x must be float32"):
        qk.quantized_linear(torch.randn(1, 128, dtype=torch.float64), qw)


def test_out_of_range_group_index_is_refused_by_the_kernel(ext):
    qw = _random_qweight(4, 128, 64, 4, 16)
    bad = qw.group_index.clone()
    bad[0, -1] = 8  # 128 / 16 = 8 groups: indices 0..7
    with pytest.raises(RuntimeError, match=r"group_index values must lie in \[0, 8\)"):
        ext.qlinear(torch.randn(1, 128), qw.packed, qw.scale, qw.offset, bad, None, 4, 64, 16)
