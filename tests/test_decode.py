"""sparsecraft.runtime.decode: the fused Llama-family decode step against the eager model."""

import logging

import pytest
import torch
from torch import nn

from sparsecraft.errors import ConfigError
from sparsecraft.patterns import Group
from sparsecraft.quant import QuantSpec, rtn_quantize, swap_linear_
from sparsecraft.runtime import decode, extension
from sparsecraft.runtime import qkernels as qk
from sparsecraft.runtime.timing import greedy_decode


def _tiny_llama(seed=0, **overrides):
    """A random fp32 Llama with GQA whose logits are peaked enough for a stable argmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _prompt(n=11, vocab=96, seed=1):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _quantise_(model, sparse_group=0, keep=1.0):
    """Every block linear and the head -> QuantLinear with RTN int4 (g 32, asymmetric); with
    ``sparse_group`` G the block linears keep the fraction ``keep`` of their runs of G inputs
    (those of largest norm, the same number per row)."""
    spec = QuantSpec(4, 32, symmetric=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            if sparse_group and name != "lm_head":
                mask = Group(sparse_group).keep_mask(w.square(), 1.0 - keep)
                q = rtn_quantize(w, spec, keep=mask, sparse_group=sparse_group)
            else:
                q = rtn_quantize(w, spec)
            swap_linear_(model, name, q)
    return model


@pytest.fixture(scope="module")
def ext():
    module = extension.get_quant_extension()
    if module is None:
        pytest.skip(f"compiled quantised kernels unavailable: {extension.quant_extension_status()}")
    return module


def _eager_logits(model, ids, steps):
    """Logits of the eager model: the prefill's last position, then one per fed-back token."""
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        logits, cache = [out.logits[0, -1]], out.past_key_values
        for _ in range(steps):
            nxt = logits[-1].argmax().view(1, 1)
            out = model(nxt, past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = out.past_key_values
    return torch.stack(logits)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_fast_decode_equals_eager_on_a_tiny_llama(backend, request):
    if backend == "cpp":
        request.getfixturevalue("ext")
    model, ids = _tiny_llama(), _prompt()
    dec = decode.FastDecoder(model, backend=backend)
    assert dec.backend == backend
    new = 20
    fast = dec.generate(ids, new)
    assert fast.tokens == greedy_decode(model, ids, new).tokens
    # the logits themselves, step by step
    want = _eager_logits(model, ids, 6)
    got = [dec.prefill(ids)]
    for _ in range(6):
        got.append(dec.step(int(got[-1].argmax())))
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("hidden,heads,kv_heads", [(80, 4, 2), (256, 2, 1), (96, 3, 3)])
def test_fast_decode_attention_for_other_head_sizes(ext, hidden, heads, kv_heads):
    """Head sizes 20 (not a multiple of the 8-float vector), 128 (two 64-column passes over V)
    and 32, at positions that are not multiples of the four-row score loop."""
    model = _tiny_llama(seed=4, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads)
    ids = _prompt(n=13, seed=5)
    dec = decode.FastDecoder(model, backend="cpp")
    want = _eager_logits(model, ids, 6)
    got = [dec.prefill(ids)]
    for _ in range(6):
        got.append(dec.step(int(got[-1].argmax())))
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("sparse_group,keep", [(0, 1.0), (16, 0.5), (8, 0.5)])
def test_fast_decode_with_quantised_layers_equals_eager_quantised(ext, sparse_group, keep):
    model = _quantise_(_tiny_llama(seed=2), sparse_group, keep)
    ids = _prompt(seed=3)
    dec = decode.FastDecoder(model)
    assert dec.blocks[0]["q_proj"]["kind"] == decode.KIND[(4, sparse_group)]
    assert dec.generate(ids, 12).tokens == greedy_decode(model, ids, 12).tokens


@pytest.mark.parametrize("layer", ["lm_head", "q_proj", "o_proj", "gate_proj", "down_proj"])
def test_int8_activations_in_the_fast_decoder(ext, layer, monkeypatch):
    """One layer at a time on int8 activations: the compiled step equals the torch step (the
    same rounding) and differs from the float kernels. All layers at once cannot be compared
    this way: rounding to int8 is discontinuous, so the two steps' last-bit differences in
    norms and attention flip a code now and then, and a random tiny model amplifies that."""
    model = _quantise_(_tiny_llama(seed=2))
    ids = _prompt(seed=3)
    real = decode.FastDecoder._uses_int8_activations

    def only(self, p):
        target = self.head if layer == "lm_head" else self.blocks[1][layer]
        return real(self, p) and p is target

    monkeypatch.setattr(decode.FastDecoder, "_uses_int8_activations", only)
    cpp = decode.FastDecoder(model, activations="int8")
    torch_step = decode.FastDecoder(model, backend="torch", activations="int8")
    plain = decode.FastDecoder(model)
    a, b, c = cpp.prefill(ids), torch_step.prefill(ids), plain.prefill(ids)
    for _ in range(4):
        token = int(a.argmax())
        a, b, c = cpp.step(token), torch_step.step(token), plain.step(token)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        assert not torch.equal(a, c)


def test_int8_activations_context_puts_eager_quantised_layers_on_the_same_path(ext):
    model = _quantise_(_tiny_llama(seed=2))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    q = layer.quantized()
    with torch.inference_mode():
        plain = layer(x)
        with qk.int8_activations():
            rounded = layer(x)
        again = layer(x)
    want = qk.qlinear_int8_activations(x, q.packed, q.scale, q.offset, None, group_size=q.spec.group)
    assert torch.equal(rounded, want) and torch.equal(plain, again) and not torch.equal(plain, rounded)


def test_int8_activations_bad_input(ext):
    model = _quantise_(_tiny_llama(seed=2))
    with pytest.raises(ConfigError, match="activations must be float32 or int8"):
        decode.FastDecoder(model, activations="int4")
    q = rtn_quantize(torch.randn(8, 64), QuantSpec(8, 32))
    with pytest.raises(RuntimeError, match="int8 activations need dense int4 codes"):
        ext.make_linear("x", 0, q.packed, q.scale, q.offset, None, None, None, 32, 0, True)


def test_biases_and_tied_embeddings(ext):
    model = _tiny_llama(seed=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    ids = _prompt(seed=5)
    assert decode.FastDecoder(model).generate(ids, 10).tokens == greedy_decode(model, ids, 10).tokens


def test_phase_profile_adds_up(ext):
    dec = decode.FastDecoder(_tiny_llama())
    dec.prefill(_prompt())
    dec.set_profiling(True)
    dec.step(3)
    prof = dec.profile()
    assert set(prof) >= {"qkv_proj", "attention", "lm_head", "rmsnorm", "silu_mul"}
    assert all(v >= 0 for v in prof.values()) and sum(prof.values()) > 0


def test_other_models_fall_back_to_eager_with_the_reason(tiny_lm, caplog):
    with caplog.at_level(logging.WARNING):
        dec = decode.decoder(tiny_lm)
    assert isinstance(dec, decode.EagerDecoder)
    assert "fast decoder not used (no model.model.layers / lm_head" in caplog.text
    with pytest.raises(ConfigError, match="needs a Llama-family model: activation 'gelu'"):
        decode.FastDecoder(_tiny_llama(hidden_act="gelu"))


def test_eager_decoder_matches_greedy_decode():
    model, ids = _tiny_llama(), _prompt()
    model.config.hidden_act = "gelu_new"  # structure check says no; the eager path still decodes
    dec = decode.decoder(model)
    assert not dec.fast
    assert dec.generate(ids, 8).tokens == greedy_decode(model, ids, 8).tokens


def test_without_the_compiled_library_the_torch_step_runs_and_logs(monkeypatch, caplog):
    monkeypatch.setattr(extension, "_why_not", lambda: "no C++ compiler (test)")
    extension._reset_for_tests()
    try:
        model, ids = _tiny_llama(), _prompt()
        with caplog.at_level(logging.WARNING):
            dec = decode.decoder(model)
        assert dec.fast and dec.backend == "torch"
        assert "compiled step unavailable (no C++ compiler (test)); running the pure-torch step" in caplog.text
        assert dec.generate(ids, 8).tokens == greedy_decode(model, ids, 8).tokens
        with pytest.raises(ConfigError, match="compiled decode step unavailable: no C\\+\\+ compiler"):
            decode.FastDecoder(model, backend="cpp")
    finally:
        extension._reset_for_tests()


def test_bad_input_is_refused():
    model = _tiny_llama()
    dec = decode.FastDecoder(model, max_len=16, backend="torch")
    with pytest.raises(ConfigError, match="step\\(\\) before prefill\\(\\)"):
        dec.step(1)
    with pytest.raises(ConfigError, match="prompt of 16 tokens does not fit the static cache of 16 positions"):
        dec.prefill(_prompt(16))
    with pytest.raises(ConfigError, match="ids must be \\[1, T\\]"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    dec.prefill(_prompt(14))
    dec.step(1)
    dec.step(1)
    with pytest.raises(ConfigError, match="static cache of 16 positions is full"):
        dec.step(1)
    model.model.layers[0].mlp.up_proj = nn.Identity()
    with pytest.raises(ConfigError, match="layer 0.mlp.up_proj: Identity is neither nn.Linear nor a quantised layer"):
        decode.FastDecoder(model)


@pytest.mark.slow
def test_smollm2_fast_decode_equals_eager_fp32_and_w4():
    from sparsecraft import models

    model, tok = models.load("smollm2-135m")
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    assert decode.FastDecoder(model).generate(ids, 6).tokens == greedy_decode(model, ids, 6).tokens
    _quantise_(model)
    w4 = decode.FastDecoder(model)
    assert w4.blocks[0]["q_proj"]["kind"] == decode.KIND[(4, 0)]
    assert w4.generate(ids, 6).tokens == greedy_decode(model, ids, 6).tokens


def test_models_quantised_by_sparsecraft_quant_run_on_the_kernels_and_the_fast_decoder(ext):
    """sc.quantize_ builds QuantLinear / QuantEmbedding layers (sparsecraft.quant); their products
    go through the compiled kernels, and the fast decoder takes them as they are."""
    import sparsecraft as sc
    from sparsecraft.quant import QuantEmbedding, QuantLinear, quant_linear

    model, ids = _tiny_llama(), _prompt()
    sc.quantize_(model, sc.RTN(bits=4, group=32))
    assert isinstance(model.model.embed_tokens, QuantEmbedding)  # the decoder reads its rows dequantised
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear)
    x = torch.randn(5, layer.in_features)
    fast = qk.quant_kernel(x, layer.quantized(), None)
    assert fast is not None  # taken, not declined
    ref = x @ layer.dequantize().T
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    torch.testing.assert_close(quant_linear(x, layer.quantized()), fast, rtol=0, atol=0)
    with torch.enable_grad():  # autograd: declined, the reference runs
        assert qk.quant_kernel(x.requires_grad_(), layer.quantized(), None) is None

    dec = decode.FastDecoder(model)
    assert dec.backend == "cpp" and dec.blocks[0]["q_proj"]["kind"] == decode.KIND[(4, 0)]
    assert dec.generate(ids, 12).tokens == greedy_decode(model, ids, 12).tokens
