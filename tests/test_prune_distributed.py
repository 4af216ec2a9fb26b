"""Calibration split over two gloo processes on CPU: the same masks and weights as one process."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsecraft as sc
from sparsecraft.errors import ConfigError

WORLD = 2

# name -> (config, calibration samples, batch_size); 12 samples in batches of 2 split 3 + 3,
# 10 in batches of 4 make 3 batches split 1 + 2 (the last one short)
CASES = {
    "wanda": (dict(method="wanda", sparsity=0.5), 12, 2),
    "wanda-uneven": (dict(method="wanda", sparsity=0.5), 10, 4),
    "sparsegpt": (dict(method="sparsegpt", sparsity=0.5), 12, 2),
    "sparsegpt-2:4-uneven": (dict(method="sparsegpt", pattern="2:4"), 10, 4),
    "sparsegpt-sequential": (dict(method="sparsegpt", sparsity=0.5, sequential=True), 12, 2),
    "wanda-owl-dsnot": (dict(method="wanda", sparsity=0.6, allocation="owl", dsnot=True, owl_lambda=0.1), 12, 2),
    "sparsegpt-error": (dict(method="sparsegpt", sparsity=0.5, measure_error=True), 12, 2),
    "snip": (dict(method="snip", sparsity=0.5), 12, 2),
    # block and model stages train on every batch: each rank runs the whole set
    "sparsegpt-stages": (dict(method="sparsegpt", sparsity=0.5, reconstruct={"epochs": 1},
                              distill={"holdout": 2, "epochs": 1}), 12, 2),
}


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _calibration(samples):
    return torch.randint(0, 64, (samples, 16), generator=torch.Generator().manual_seed(1))


def _prune(name):
    from sparsecraft.oneshot import driver

    kwargs, samples, batch_size = CASES[name]
    model = _model()
    seen = []  # the samples this process runs through the blocks
    capture = driver.capture_block_inputs
    driver.capture_block_inputs = lambda m, b, calibration, bs: seen.append(calibration.clone()) or capture(
        m, b, calibration, bs)
    try:
        state = sc.prune_(model, sc.method_config(options={"batch_size": batch_size}, **kwargs),
                          _calibration(samples), progress=False)
    finally:
        driver.capture_block_inputs = capture
    masks = {n: k.clone() for n, k in state.masks.items()}
    info = {n: {k: v for k, v in i.items() if isinstance(v, (int, float, str))} for n, i in state.info.items()}
    state.finalize_()
    return {"masks": masks, "weights": {k: v.clone() for k, v in model.state_dict().items()}, "info": info,
            "seen": seen}


def _error(fn) -> str:
    try:
        fn()
    except ConfigError as e:
        return str(e)
    return "no error"


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {name: _prune(name) for name in CASES}
        # bad input: every rank must raise, none may hang
        results["mismatch"] = _error(lambda: sc.prune_(
            _model(), sc.Wanda(sparsity=0.5 + 0.1 * rank), _calibration(12), progress=False))
        results["too-few"] = _error(lambda: sc.prune_(_model(), sc.Wanda(sparsity=0.5), _calibration(1),
                                                      progress=False))
        results["few-batches"] = _error(lambda: sc.prune_(_model(), sc.Wanda(sparsity=0.5, batch_size=8),
                                                          _calibration(6), progress=False))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(WORLD)]
        try:
            mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        except mp.ProcessExitedException:
            # gloo may abort a worker while the group is torn down, after it saved its results
            # (see test_train_ddp.py); only that case is let through
            if not all(os.path.exists(p) for p in paths):
                raise
        return [torch.load(p, weights_only=False) for p in paths]


@pytest.fixture(scope="module")
def single_results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, the same rounding
    try:
        return {name: _prune(name) for name in CASES}
    finally:
        torch.set_num_threads(threads)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_masks_and_weights_of_one(name, distributed_results, single_results):
    one = single_results[name]
    for rank, results in enumerate(distributed_results):
        got = results[name]
        assert got["masks"].keys() == one["masks"].keys() and got["masks"]
        for layer, keep in one["masks"].items():
            assert torch.equal(got["masks"][layer], keep), f"rank {rank}: mask of {layer} differs"
        for key, w in one["weights"].items():
            assert _relative(got["weights"][key], w) <= 1e-5, f"rank {rank}: {key} differs"
            assert torch.equal(got["weights"][key] == 0, w == 0), f"rank {rank}: zeros of {key} differ"
    # the ranks ran contiguous runs of whole batches, together the whole set once
    kwargs, samples, batch_size = CASES[name]
    if name == "sparsegpt-stages":
        assert all(torch.equal(r[name]["seen"][0], _calibration(samples)) for r in distributed_results)
    elif name != "snip":  # a model-level statistic only: no block inputs
        parts = [r[name]["seen"][0] for r in distributed_results]
        assert torch.equal(torch.cat(parts), _calibration(samples))
        batches = -(-samples // batch_size)
        assert [p.shape[0] for p in parts] == [min(samples, (batches // 2) * batch_size),
                                               samples - min(samples, (batches // 2) * batch_size)]
    # every rank holds exactly the same model
    for key, w in distributed_results[0][name]["weights"].items():
        assert torch.equal(distributed_results[1][name]["weights"][key], w)
    if name == "sparsegpt-error":  # the error is measured against the global Hessian
        for layer, info in one["info"].items():
            if "reconstruction_error" in info:
                got = distributed_results[0][name]["info"][layer]["reconstruction_error"]
                assert got == pytest.approx(info["reconstruction_error"], rel=1e-4)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_distributed_bad_input_is_refused_on_every_rank(distributed_results):
    for results in distributed_results:
        assert "rank(s) 1 have a different config than rank 0" in results["mismatch"]
        assert "1 calibration sample(s) cannot be split over 2 processes" in results["too-few"]
        assert "6 samples make 1 batch(es) of batch_size 8, fewer than the 2 processes" in results["few-batches"]
        assert "use batch_size <= 3" in results["few-batches"]


def _run(command, tmp_path, threads=1):
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=1200)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_torchrun_cli_prunes_like_one_process(tmp_path, tiny_llama_tok_dir):
    import json

    prune = ["-m", "sparsecraft", "prune", str(tiny_llama_tok_dir), "--method", "sparsegpt", "--samples", "8",
             "--seq-len", "16", "--option", "batch_size=2"]
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *prune,
                "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    one = _run([*prune, "--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    # rank 0 alone prints and writes
    printed = [line for line in two.stdout.splitlines() if line.startswith("pruned ")]
    assert len(printed) == 1 and "calibration split over 2 processes" in two.stdout
    assert json.loads((tmp_path / "two" / "prune_results.json").read_text())["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no staging left behind
    a, b = sc.load(tmp_path / "two"), sc.load(tmp_path / "one")
    pruned = sc.get_meta(b)
    assert set(sc.get_meta(a)) == set(pruned) and pruned
    wa, wb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, w in wb.items():
        assert _relative(wa[name], w) <= 1e-5, name
        if name in pruned:
            assert torch.equal(wa[name] == 0, w == 0), name


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_torchrun_environment_is_checked(tmp_path, tiny_llama_tok_dir, monkeypatch, capsys):
    from sparsecraft.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    out = tmp_path / "o"
    assert main(["-q", "prune", str(tiny_llama_tok_dir), "--method", "wanda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsecraft prune: error: environment: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set; "
                   "launch with torchrun"]
    monkeypatch.setenv("RANK", "5")
    assert main(["-q", "prune", str(tiny_llama_tok_dir), "--out", str(out)]) == 2
    assert "RANK=5 is outside 0..1" in capsys.readouterr().err
    assert not out.exists() and not dist.is_initialized()
    # commands that do not split their work refuse to run in several processes
    assert main(["shrink", str(tiny_llama_tok_dir), "--mlp", "0.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sparsecraft shrink: error: shrink does not split its work over processes (WORLD_SIZE=2); run it in one "
        "process (prune and run take torchrun)"]
    assert not out.exists()
