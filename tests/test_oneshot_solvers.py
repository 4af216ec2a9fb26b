"""The solver interface: methods registered from outside the library, typed options, the
requires route (gradients for SNIP), N:M configs without a sparsity, sequential blocks."""

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import sparsecraft as sc
from sparsecraft import ConfigError
from sparsecraft.criteria import SOLVERS, LayerResult, Solver, register_solver
from sparsecraft.recipe import Recipe

from conftest import assert_unchanged, snapshot


def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture
def calib():
    return torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def toy():
    """A method defined only here: |W| * |mean input| ** power, recording what it saw."""

    @register_solver
    class Toy(Solver):
        name = "toy-mean"
        requires = ("mean_var",)
        seen: dict = {}

        @dataclass(frozen=True)
        class Options:
            power: float = 1.0

        def solve(self, ctx, pattern, sparsity):
            mean = ctx.stats["input_mean"]
            assert mean.shape == (ctx.param.shape[1],) and "hessian" not in ctx.stats
            scores = ctx.param.detach().abs() * mean.abs().float()[None, :] ** self.options.power
            keep = pattern.keep_mask(scores, sparsity, layer=ctx.name)
            Toy.seen[ctx.name] = keep
            return LayerResult(keep)

    yield Toy
    SOLVERS.pop("toy-mean")


def _check_toy(state, toy, model):
    assert set(state.masks) == set(toy.seen) and len(toy.seen) == 14
    params = dict(model.named_parameters())
    for name, keep in state.masks.items():
        assert torch.equal(keep, toy.seen[name])
        assert (params[name][~keep] == 0).all()


def test_toy_solver_registered_in_a_test_works_through_prune(toy, calib):
    model = _llama()
    state = sc.prune_(model, sc.method_config("toy-mean", sparsity=0.5, power=2.0), calib, progress=False)
    _check_toy(state, toy, model)
    assert "toy-mean" in sc.criteria.method_names()
    with pytest.raises(ConfigError, match="method 'toy-mean' has no option 'blocksize'"):
        sc.PruneConfig(method="toy-mean", options={"blocksize": 64})


def test_toy_solver_through_a_recipe_dict(toy, calib):
    recipe = Recipe.from_dict({"model": "m", "out": "o", "prune": {
        "method": "toy-mean", "pattern": "2:4", "options": {"power": 0.5, "sequential": True}}})
    assert recipe.prune.needs_calibration and recipe.prune.solver().options.power == 0.5
    model = _llama()
    state = sc.prune_(model, recipe.prune, calib, progress=False)
    _check_toy(state, toy, model)
    assert all(sc.NM(2, 4).is_valid(k) for k in state.masks.values())


def test_toy_solver_through_the_cli_with_its_option(toy, tiny_llama_tok_dir, tmp_path):
    from sparsecraft.checkpoint import is_checkpoint, read_checkpoint_header
    from sparsecraft.cli import main

    out = tmp_path / "toy"
    argv = ["-q", "prune", str(tiny_llama_tok_dir), "--method", "toy-mean", "--sparsity", "0.5",
            "--option", "power=2.0", "--samples", "4", "--seq-len", "16", "--out", str(out)]
    assert main(argv) == 0
    assert len(toy.seen) == 14 and is_checkpoint(out)
    header = read_checkpoint_header(out)  # a streamed run: one shard per block
    assert header["tensors"]["model.layers.1.mlp.down_proj.weight"]["attrs"]["method"] == "toy-mean"


# ---- typed options ------------------------------------------------------------------------

def test_typed_configs_equal_dicts_and_python():
    a = sc.SparseGPT(sparsity=0.5, pattern="2:4", blocksize=128, percdamp=0.01)
    b = sc.PruneConfig(method="sparsegpt", sparsity=0.5, pattern="2:4", options={"blocksize": 128, "percdamp": 0.01})
    c = sc.PruneConfig.from_dict({"method": "sparsegpt", "pattern": "2:4", "options": {"blocksize": 128, "percdamp": 0.01}})
    assert a == b
    assert c.sparsity is None and c.solver().options == a.solver().options
    assert a.solver().options.blocksize == 128
    w = sc.Wanda(sparsity=0.6, dsnot={"max_cycles": 3}, allocation="owl", owl_lambda=0.1)
    assert [r.options.max_cycles for r in w.refiners()] == [3] and w.allocation_obj().options.owl_lambda == 0.1


@pytest.mark.parametrize("method,options,match", [
    ("wanda", {"blocksize": 64}, "method 'wanda' has no option 'blocksize'"),
    ("magnitude", {"percdamp": 0.1}, "method 'magnitude' has no option 'percdamp'"),
    ("sparsegpt", {"blocksize": "big"}, "option 'blocksize' must be int"),
    ("sparsegpt", {"blocksize": 0}, "blocksize must be >= 1"),
    ("sparsegpt", {"percdamp": True}, "option 'percdamp' must be float"),
    ("wanda", {"dsnot": {"cycles": 2}}, "refiner 'dsnot' has no option 'cycles'"),
    ("wanda", {"dsnot": "yes"}, "must be true/false or a mapping"),
    ("wanda", {"owl_m": 3.0}, "method 'wanda' has no option 'owl_m'"),  # only with allocation owl
    ("wanda", {"batch_size": 0}, "batch_size must be >= 1"),
])
def test_unknown_or_bad_option_names_option_and_method(method, options, match):
    with pytest.raises(ConfigError, match=match):
        sc.PruneConfig(method=method, sparsity=0.5, options=options)


def test_bad_option_leaves_model_unchanged(calib):
    model = _llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="no option 'blocksize'"):
        sc.prune_(model, {"method": "wanda", "sparsity": 0.5, "options": {"blocksize": 64}}, calib)
    assert_unchanged(model, before)


@pytest.mark.parametrize("factory", [sc.Magnitude, sc.RandomPrune])
def test_nm_config_needs_no_sparsity(factory, tiny_lm):
    config = factory(pattern="1:4")
    assert config.sparsity is None and config.target_sparsity == 0.75
    state = sc.prune_(tiny_lm, config, progress=False)
    assert all(sc.NM(1, 4).is_valid(k) for k in state.masks.values())
    assert sc.Magnitude().sparsity == 0.5  # a free pattern keeps the default
    with pytest.raises(ConfigError, match="fixes sparsity"):
        sc.Magnitude(pattern="1:4", sparsity=0.5)


# ---- the requires route: gradients (SNIP) -------------------------------------------------

def test_snip_works_in_prune_with_gradients_of_the_lm_loss(calib):
    import sparsecraft.train.pruning  # noqa: F401  registers the snip criterion

    model = _llama()
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    out = model(input_ids=calib, labels=calib)  # one batch: the driver's default batch_size is 8
    grads = dict(zip(names, torch.autograd.grad(out.loss, [dict(model.named_parameters())[n] for n in names])))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    state = sc.prune_(model, sc.PruneConfig(method="snip", sparsity=0.5, allocation="global", max_sparsity=1.0), calib, progress=False)
    expected = sc.prune_(_llama(), sc.PruneConfig(method="magnitude", sparsity=0.5), progress=False)  # shapes only
    assert set(state.masks) == set(expected.masks)
    # global threshold on |w * g|: every kept score >= every pruned score
    scores = {n: (grads[n] * params[n]).abs() for n in state.masks}
    kept = min(float(scores[n][k].min()) for n, k in state.masks.items())
    pruned = max(float(scores[n][~k].max()) for n, k in state.masks.items())
    assert kept >= pruned * (1 - 1e-5)
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


def test_snip_without_calibration_is_a_clear_error():
    import sparsecraft.train.pruning  # noqa: F401

    model = _llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="needs calibration data"):
        sc.prune_(model, sc.PruneConfig(method="snip", sparsity=0.5), None, progress=False)
    assert_unchanged(model, before)


# ---- sequential blocks --------------------------------------------------------------------

def test_sequential_blocks_prune_later_layers_from_pruned_inputs(calib):
    two = _llama()
    seq = _llama()
    a = sc.prune_(two, sc.SparseGPT(sparsity=0.5, measure_error=True), calib, progress=False)
    b = sc.prune_(seq, sc.SparseGPT(sparsity=0.5, measure_error=True, sequential=True), calib, progress=False)
    first = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    for name in first:  # the first group sees the same (dense) inputs either way
        assert torch.equal(a.masks[name], b.masks[name])
    later = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(dict(two.named_parameters())[later], dict(seq.named_parameters())[later])
    for keep in b.masks.values():
        assert int((~keep).sum()) == keep.numel() // 2


def _block_forwards(model):
    """Counts the forward calls of every decoder block."""
    counts = [0] * len(model.model.layers)
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("sequential,passes", [(False, 2), (True, 1)])
def test_sequential_blocks_take_one_forward_pass(calib, sequential, passes):
    model = _llama()
    counts = _block_forwards(model)
    sc.prune_(model, sc.Wanda(sparsity=0.5, batch_size=2, sequential=sequential), calib, progress=False)
    batches = calib.shape[0] // 2
    # block 0 also sees the capture (stopped before it runs); then `passes` passes per block
    assert counts == [(passes + 1) * batches, passes * batches]


def test_sequential_statistics_come_from_the_pruned_earlier_layers(calib):
    from sparsecraft.oneshot.sparsegpt import sparsegpt_prune
    from sparsecraft.oneshot.stats import HessianAccumulator

    model, dense = _llama(), _llama()
    state = sc.prune_(model, sc.SparseGPT(sparsity=0.5, batch_size=2, sequential=True), calib, progress=False)
    pruned = dict(model.named_parameters())
    original = dict(dense.named_parameters())
    # Each layer's inputs, with the final (pruned) model: earlier layers and earlier blocks
    # pruned. The layer's mask and weights must be SparseGPT's on exactly those inputs.
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        module = model.get_submodule(name)
        acc = HessianAccumulator()
        handle = module.register_forward_hook(lambda _m, inputs, _o: acc.add(inputs[0]))
        with torch.no_grad():
            for start in range(0, calib.shape[0], 2):
                model(calib[start:start + 2], use_cache=False)
        handle.remove()
        weight, keep, _ = sparsegpt_prune(original[name + ".weight"].detach(), acc.hessian, 0.5, "unstructured",
                                          refit=True)  # the solver refits by default
        assert torch.equal(keep, state.masks[name + ".weight"]), name
        torch.testing.assert_close(weight * keep, pruned[name + ".weight"].detach(), rtol=1e-4, atol=1e-6)


def test_sequential_failure_half_way_restores_the_model(calib, monkeypatch):
    from sparsecraft.oneshot import sparsegpt as sg

    model = _llama()
    before = snapshot(model)
    real = sg.sparsegpt_prune

    def failing(weight, hessian, *args, layer="", **kwargs):
        if layer == "model.layers.1.mlp.up_proj.weight":
            raise RuntimeError("solver failed on purpose")
        return real(weight, hessian, *args, layer=layer, **kwargs)

    monkeypatch.setattr(sg, "sparsegpt_prune", failing)
    with pytest.raises(RuntimeError, match="on purpose"):
        sc.prune_(model, sc.SparseGPT(sparsity=0.5, batch_size=2, sequential=True), calib, progress=False)
    assert_unchanged(model, before)


# ---- import structure ---------------------------------------------------------------------

def test_no_import_cycle_between_prune_and_the_driver():
    import ast
    import importlib

    def imported(module):
        tree = ast.parse(open(importlib.import_module(module).__file__).read())
        return {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert not any("calibrate" in m for m in imported("sparsecraft.prune"))
    for module in ("sparsecraft.oneshot.driver", "sparsecraft.blocks", "sparsecraft.criteria",
                   "sparsecraft.allocation"):
        assert not any(m.endswith("prune") for m in imported(module)), module
    run = subprocess.run([sys.executable, "-c", "import sparsecraft.blocks, sparsecraft.oneshot.driver"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("sequential,passes", [(False, 2), (True, 3)])
def test_block_stages_reuse_the_statistics_pass_for_the_dense_outputs(calib, sequential, passes):
    # two passes: the one that collects statistics gives the dense outputs that reconstruction
    # targets, then the tuned block's outputs; the lock-step variant needs the dense outputs
    # apart (its own pass prunes as it goes) and its outputs are stale once the block is tuned
    model = _llama()
    counts = [0] * len(model.model.layers)
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(
            lambda *_a, i=i: counts.__setitem__(i, counts[i] + torch.is_inference_mode_enabled()))
    config = sc.SparseGPT(pattern="2:4", batch_size=2, sequential=sequential,
                          reconstruct={"epochs": 1, "holdout": 1})
    sc.prune_(model, config, calib, progress=False)
    batches = calib.shape[0] // 2
    assert counts == [(passes + 1) * batches, passes * batches]
