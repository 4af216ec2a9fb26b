"""The block-by-block calibrated driver on small random transformers of three families."""

import copy
from pathlib import Path

import pytest
import torch

import sparsecraft as sc
from sparsecraft import ConfigError, SparsecraftError
from sparsecraft import blocks as block_finder
from sparsecraft.oneshot import driver

from conftest import assert_unchanged, snapshot


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=32, max_position_embeddings=64)).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4), add_pooling_layer=False).eval()


FAMILIES = {"llama": (_llama, "model.layers", 7), "opt": (_opt, "model.decoder.layers", 6), "bert": (_bert, "encoder.layer", 6)}


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))


def _final_hidden(model, ids):
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_found_by_structure(family):
    build, name, _ = FAMILIES[family]
    found, blocks = block_finder.find_blocks(build())
    assert found == name and len(blocks) >= 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_methods_exact_sparsity_and_valid_nm(family, method, pattern, calib):
    build, _, per_block = FAMILIES[family]
    model = build()
    nm = ":" in pattern
    state = sc.prune_(model, sc.PruneConfig(method=method, sparsity=None if nm else 0.6, pattern=pattern),
                      calib, progress=False)
    params = dict(model.named_parameters())
    assert len(state.masks) == per_block * len(block_finder.find_blocks(model)[1])
    for name, keep in state.masks.items():
        w = params[name].detach()
        assert (w[~keep] == 0).all()
        if nm:
            n, m = map(int, pattern.split(":"))
            assert sc.NM(n, m).is_valid(keep)
        else:
            assert int((~keep).sum()) == int(0.6 * keep.numel() + 0.5)
        assert torch.isfinite(w).all()


def test_solvers_track_the_dense_model_better_than_magnitude(calib):
    dense = _llama()
    # a few large-norm input channels, the case where magnitude must lose
    with torch.no_grad():
        dense.model.embed_tokens.weight[:, :3] *= 25.0
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))
    ref = _final_hidden(dense, ids)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        sc.prune_(model, sc.PruneConfig(method=method, sparsity=0.6), calib, progress=False)
        errors[method] = ((_final_hidden(model, ids) - ref).norm() / ref.norm()).item()
    assert errors["wanda"] < errors["magnitude"]
    assert errors["sparsegpt"] < errors["magnitude"]


def test_owl_and_dsnot_options(calib):
    model = _llama()
    state = sc.prune_(model, sc.PruneConfig(method="wanda", sparsity=0.6, allocation="owl",
                                            options={"dsnot": True, "owl_lambda": 0.1}), calib, progress=False)
    total = sum(m.numel() for m in state.masks.values())
    pruned = sum(int((~m).sum()) for m in state.masks.values())
    assert pruned == int(0.6 * total + 0.5)  # exact: block counts split over layers
    per_layer = state.layer_sparsity()
    assert max(per_layer.values()) - min(per_layer.values()) > 0.0  # OWL moved budgets between blocks
    assert all(0.5 - 1e-9 <= s <= 0.7 + 1e-9 for s in per_layer.values())


# ---- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("calibration,match", [
    (None, "needs calibration data"),
    (torch.zeros(0, 8, dtype=torch.long), "non-empty"),
    (torch.zeros(4, dtype=torch.long), "non-empty"),
    (torch.full((2, 8), 500, dtype=torch.long), "vocabulary has 64"),
    (torch.rand(2, 8), "integer token ids"),
])
def test_bad_calibration_leaves_model_unchanged(calibration, match):
    model = _llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        sc.prune_(model, sc.PruneConfig(method="wanda", sparsity=0.5), calibration, progress=False)
    assert_unchanged(model, before)


def test_calibration_text_shorter_than_one_sample():
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * len(text.split())}

    with pytest.raises(SparsecraftError, match="shorter than one sample"):
        sc.data.calibration(Tok(), samples=2, seq_len=100, docs=["only five words here now"])


def test_refuses_when_memory_will_not_fit(monkeypatch, calib):
    model = _llama()
    before = snapshot(model)
    monkeypatch.setattr(driver, "available_memory", lambda: 1000)
    with pytest.raises(SparsecraftError, match="GiB is available"):
        sc.prune_(model, sc.PruneConfig(method="sparsegpt", sparsity=0.5), calib, progress=False)
    assert_unchanged(model, before)


def test_calibrated_pruning_returns_freed_memory_and_refusal_comes_first(monkeypatch, calib):
    """In-memory runs free block-sized activations and statistics over and over, like streamed
    ones: the driver fixes glibc's mmap threshold too (after its checks, so a refused run
    changes nothing in the process)."""
    calls = []
    monkeypatch.setattr(driver, "return_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(driver, "available_memory", lambda: 1000)
    with pytest.raises(SparsecraftError, match="GiB is available"):
        sc.prune_(_llama(), sc.PruneConfig(method="wanda", sparsity=0.5), calib, progress=False)
    assert calls == []
    monkeypatch.setattr(driver, "available_memory", lambda: None)
    sc.prune_(_llama(), sc.PruneConfig(method="wanda", sparsity=0.5), calib, progress=False)
    assert calls == [1]


def test_failure_half_way_restores_every_block(monkeypatch, calib):
    model = _llama()
    before = snapshot(model)
    real = driver.prune_layer
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 9:  # fails inside the second block, after the first was changed
            raise SparsecraftError("solver gave up")
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "prune_layer", flaky)
    with pytest.raises(SparsecraftError, match="solver gave up"):
        sc.prune_(model, sc.PruneConfig(method="sparsegpt", sparsity=0.5), calib, progress=False)
    assert_unchanged(model, before)


def test_unknown_calibrated_option():
    with pytest.raises(ConfigError, match="method 'wanda' has no option 'bogus'"):
        sc.PruneConfig(method="wanda", sparsity=0.5, options={"bogus": 1})


def test_measured_reconstruction_error_orders_methods(calib):
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _llama()
        state = sc.prune_(model, sc.PruneConfig(method=method, sparsity=0.6, options={"measure_error": True}),
                          calib, progress=False)
        errors[method] = {n: i["reconstruction_error"] for n, i in state.info.items()}
        assert all(0.0 < e < 1.5 for e in errors[method].values())
    # the solver minimises exactly this error, so it must win on (nearly) every layer
    wins = sum(errors["sparsegpt"][n] <= min(errors["wanda"][n], errors["magnitude"][n]) for n in errors["wanda"])
    assert wins >= 0.9 * len(errors["wanda"])


@pytest.mark.parametrize("fallback", ["error", "skip", "unstructured"])
def test_calibrated_fallback_for_layers_the_pattern_cannot_tile(fallback, calib):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=60, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    config = sc.PruneConfig(method="wanda", sparsity=None, pattern="4:8", fallback=fallback)
    if fallback == "error":
        before = snapshot(model)
        with pytest.raises(sc.TargetError, match="layer 'model.layers.0.mlp.down_proj.weight'.*divisible by M=8"):
            sc.prune_(model, config, calib, progress=False)
        assert_unchanged(model, before)
        return
    state = sc.prune_(model, config, calib, progress=False)
    meta = sc.get_meta(model)
    down = "model.layers.1.mlp.down_proj.weight"
    if fallback == "skip":
        assert down not in state.masks and meta[down]["pattern"] == "dense"
        assert (dict(model.named_parameters())[down] != 0).all()
    else:
        assert meta[down]["pattern"] == "unstructured"
        assert int((~state.masks[down]).sum()) == state.masks[down].numel() // 2
    assert sc.NM(4, 8).is_valid(state.masks["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("sequential", [False, True])
def test_activations_on_disk_give_the_same_result(calib, sequential, monkeypatch, tmp_path):
    from sparsecraft.blocks import DiskActivations

    seen = []
    real_run = DiskActivations.run

    def run(self, block, batches):
        seen.extend(b.hidden.untyped_storage().filename for b in batches)
        return real_run(self, block, batches)

    monkeypatch.setattr(DiskActivations, "run", run)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    a, b = _llama(), _llama()
    config = dict(sparsity=0.5, batch_size=2, sequential=sequential, reconstruct={"epochs": 1})
    sa = sc.prune_(a, sc.SparseGPT(**config), calib, progress=False)
    sb = sc.prune_(b, sc.SparseGPT(**config, activations="disk"), calib, progress=False)
    for name, keep in sa.masks.items():
        assert torch.equal(keep, sb.masks[name]), name
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert seen and all(f and f.startswith(str(tmp_path)) for f in seen)  # the inputs were file-backed
    # and the files are gone (torch may leave its own compile cache in the same TMPDIR)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("sparsecraft")]


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc" or not Path("/proc/self/status").is_file(),
                    reason="madvise through glibc, measured in /proc")
def test_disk_activations_release_drops_resident_pages_and_keeps_the_data(tmp_path):
    """A pass over activations on disk keeps about one batch resident: ``release`` unmaps a
    batch's pages from the process, and what the files hold (written pages included) is
    read back unchanged."""
    from sparsecraft.blocks import BlockBatch, DiskActivations

    def rss_file():
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024

    values = [torch.randn(64, 16384, generator=torch.Generator().manual_seed(i)) for i in range(4)]  # 4 MiB each
    batches = [BlockBatch(v.clone(), (), {}) for v in values]
    store = DiskActivations(batches, tmp_path)
    for i, view in enumerate(store.buffers[1]):  # the other file too, as a block's outputs fill it
        view.copy_(values[i] * 2)
    resident = rss_file()
    for i in range(len(batches)):
        store.release(i)
    assert resident - rss_file() > 0.9 * 2 * 4 * 4 * 2**20  # both files' pages left the process
    for i, b in enumerate(batches):
        assert torch.equal(b.hidden, values[i])
        assert torch.equal(store.buffers[1][i], values[i] * 2)


def test_two_passes_in_memory_hold_the_inputs_and_one_batch(calib):
    """Without block stages the statistics pass drops its outputs and the second pass replaces
    each batch's input by its output as it goes: at most every batch's hidden state plus the
    one being computed are alive, not inputs and outputs of every batch."""
    import weakref

    model = _llama()
    seen: list = []
    peak = [0]

    def note(t):
        t = t[0] if isinstance(t, (tuple, list)) else t
        seen.append(weakref.ref(t.untyped_storage()))  # alive while any view of the data is
        peak[0] = max(peak[0], len({id(r()) for r in seen if r() is not None}))  # each storage once

    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args, kwargs: note(args[0] if args
                                                                                    else kwargs["hidden_states"]),
                                                       with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, args, out: note(out)))
    sc.prune_(model, sc.Wanda(sparsity=0.5, batch_size=2), calib, progress=False)
    for h in handles:
        h.remove()
    batches = calib.shape[0] // 2
    # 3 blocks, 2 passes, an input and an output per batch; and the capture of block 0's inputs
    assert len(seen) == 3 * 2 * 2 * batches + batches
    assert peak[0] <= batches + 1


def test_auto_puts_activations_on_disk_when_memory_is_short(monkeypatch, calib):
    from sparsecraft.blocks import DiskActivations

    used = []
    real_init = DiskActivations.__init__
    monkeypatch.setattr(DiskActivations, "__init__", lambda self, *a: (used.append(1), real_init(self, *a))[1])
    # in memory needs more than there is; on disk fits
    monkeypatch.setattr(driver, "_estimate_bytes", lambda *a, on_disk=False, **k: 1 if on_disk else 10**12)
    monkeypatch.setattr(driver, "available_memory", lambda: 10**9)
    sc.prune_(_llama(), sc.SparseGPT(sparsity=0.5, batch_size=2), calib, progress=False)
    assert used == [1]
    model = _llama()
    before = snapshot(model)
    with pytest.raises(SparsecraftError, match="or activations='disk'"):
        sc.prune_(model, sc.SparseGPT(sparsity=0.5, activations="memory"), calib, progress=False)
    assert_unchanged(model, before)
    with pytest.raises(ConfigError, match="activations must be"):
        sc.SparseGPT(sparsity=0.5, activations="ram").driver_options()
