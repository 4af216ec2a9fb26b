"""Pruning a sharded Hugging Face folder block by block (sparsecraft.streaming).

Tiny random Llamas (GQA, tied embeddings) are written by the test itself over three
safetensors shards with an index; streaming must equal the in-memory path bit for bit, keep
bf16/fp16, resume to the same bytes, show the output only when it is complete, and refuse
every bad input before anything is read or written."""

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsecraft as sc
from sparsecraft import streaming
from sparsecraft.blocks import cast_batches_
from sparsecraft.checkpoint import INDEX_FILE, is_checkpoint, read_checkpoint_header
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError, FormatError, SparsecraftError, TargetError
from sparsecraft.streaming import MANIFEST, prune_pretrained, staging_folder

CALIB = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))


def _llama(dtype=torch.float32, layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def save_sharded(model, folder: Path, shards: int = 3) -> Path:
    """The model as Hugging Face writes it: config.json, ``shards`` safetensors files (tied
    tensors once) and model.safetensors.index.json."""
    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue  # a tied tensor: stored under its first name
        seen.add(t.data_ptr())
        state[name] = t.contiguous()
    names = list(state)
    size = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * size:(i + 1) * size]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    return save_sharded(_llama(), tmp_path_factory.mktemp("fp32") / "model")


def _in_memory(folder, config, dtype=None):
    model, _ = sc.models.load(str(folder), dtype=dtype)
    sc.prune_(model, config, CALIB, progress=False).finalize_()
    return model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k  # bit-exact (zeros included: same masks)
    meta_a, meta_b = sc.get_meta(a), sc.get_meta(b)
    assert meta_a.keys() == meta_b.keys() and meta_a
    for k in meta_a:
        assert (meta_a[k]["pattern"], meta_a[k]["method"]) == (meta_b[k]["pattern"], meta_b[k]["method"])
        assert meta_a[k]["sparsity"] == pytest.approx(meta_b[k]["sparsity"], abs=1e-12)


# ---------------------------------------------------------------- equal to the in-memory path

@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streaming_equals_in_memory_fp32(method, fp32_dir, tmp_path, monkeypatch):
    config = sc.method_config(method, sparsity=0.5, batch_size=4)
    loaded = []
    real_load = streaming._Run.load

    def one_block_at_a_time(self, index, block, targets):
        real_load(self, index, block, targets)
        loaded.append(index)
        blocks = self.model.model.layers
        in_memory = [i for i, b in enumerate(blocks) if not next(b.parameters()).is_meta]
        assert in_memory == [index]  # every other block is on the meta device
        assert self.model.model.embed_tokens.weight.is_meta  # the embeddings are gone too

    monkeypatch.setattr(streaming._Run, "load", one_block_at_a_time)
    out = tmp_path / "out"
    result = prune_pretrained(fp32_dir, config, CALIB, out, progress=False)
    assert loaded == [0, 1, 2] and result.blocks == 3 and result.resumed_from == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", *[f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)], INDEX_FILE]
    streamed = sc.load(out)
    reference = _in_memory(fp32_dir, config)
    _assert_same_model(streamed, reference)
    assert result.sparsity == pytest.approx(0.5)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied, stored once
    assert not staging_folder(out).exists()


def test_methods_without_calibration_stream_too(fp32_dir, tmp_path):
    config = sc.Magnitude(pattern="2:4")
    prune_pretrained(fp32_dir, config, None, tmp_path / "out", progress=False)
    _assert_same_model(sc.load(tmp_path / "out"), _in_memory(fp32_dir, config))


@pytest.mark.parametrize("dtype,compute", [(torch.bfloat16, "auto"), (torch.float16, "auto"),
                                           (torch.bfloat16, "model")])
def test_half_precision_stays_half_and_statistics_accumulate_in_fp32(dtype, compute, tmp_path, monkeypatch):
    from sparsecraft.oneshot import sparsegpt

    folder = save_sharded(_llama(dtype), tmp_path / "model")
    seen = []
    real = sparsegpt.sparsegpt_prune

    def spy(weight, hessian, *args, **kwargs):
        seen.append((weight.dtype, hessian.dtype))
        new, keep, info = real(weight, hessian, *args, **kwargs)
        seen.append((new.dtype, None))
        return new, keep, info

    monkeypatch.setattr(sparsegpt, "sparsegpt_prune", spy)
    config = sc.SparseGPT(sparsity=0.5, batch_size=4, compute_dtype=compute)
    prune_pretrained(folder, config, CALIB, tmp_path / "out", progress=False)
    # on CPU the blocks compute in fp32 unless told to keep the model's dtype; Hessians always fp32
    wide = torch.float32 if compute == "auto" else dtype
    assert seen and all(w == wide and h in (torch.float32, None) for w, h in seen)
    header = read_checkpoint_header(tmp_path / "out")
    assert {e["dtype"] for e in header["tensors"].values()} == {str(dtype).removeprefix("torch.")}
    streamed = sc.load(tmp_path / "out")
    assert {p.dtype for p in streamed.parameters()} == {dtype}
    _assert_same_model(streamed, _in_memory(folder, config))  # the in-memory path keeps the dtype too


@pytest.mark.parametrize("compute", ["auto", "model"])
def test_in_memory_prune_keeps_bf16_and_wanda_norms_are_wide(compute, monkeypatch):
    from sparsecraft.oneshot import wanda

    model = _llama(torch.bfloat16, layers=2)
    params = dict(model.named_parameters())
    norms = []
    real = wanda.wanda_mask

    def spy(weight, input_sq_norm, *args, **kwargs):
        norms.append((weight.dtype, input_sq_norm.dtype))
        return real(weight, input_sq_norm, *args, **kwargs)

    monkeypatch.setattr(wanda, "wanda_mask", spy)
    state = sc.prune_(model, sc.Wanda(sparsity=0.5, compute_dtype=compute), CALIB, progress=False)
    assert state.sparsity() == pytest.approx(0.5)
    wide = torch.float32 if compute == "auto" else torch.bfloat16
    assert norms and all(w == wide and n == torch.float64 for w, n in norms)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects


def _bf16_reference_of_widened_prune(model, config):
    """What a widened run must give: the same model in fp32 pruned with its weights rounded
    to bf16 after each block's solve, the activations left in fp32."""
    from sparsecraft.oneshot import driver

    wide = copy.deepcopy(model).float()
    real_solve, real_capture = driver._solve_layers, driver.capture_block_inputs

    def rounding(targets, stats_of, **kw):
        real_solve(targets, stats_of, **kw)
        with torch.no_grad():
            for t in targets:
                t.param.copy_(t.param.to(torch.bfloat16))

    def captured_as_bf16(*args):  # the bf16 model's embeddings, masks and rotary tables
        batches = real_capture(*args)
        cast_batches_(batches, torch.bfloat16)
        cast_batches_(batches, torch.float32)
        return batches

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "_solve_layers", rounding)
        mp.setattr(driver, "capture_block_inputs", captured_as_bf16)
        sc.prune_(wide, config, CALIB, progress=False)
    return wide.to(torch.bfloat16)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_widened_bf16_prune_is_the_fp32_prune_with_weights_rounded_to_bf16(sequential):
    model = _llama(torch.bfloat16, layers=2)
    config = sc.SparseGPT(sparsity=0.5, batch_size=4, sequential=sequential)
    reference = _bf16_reference_of_widened_prune(model, config)
    sc.prune_(model, config, CALIB, progress=False)
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, reference_params[name]), name


def test_a_failure_in_a_widened_block_restores_the_bf16_model_exactly(monkeypatch):
    from sparsecraft.oneshot import sparsegpt

    model = _llama(torch.bfloat16, layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    real = sparsegpt.sparsegpt_prune

    def fail_in_block_1(weight, hessian, *args, **kwargs):
        calls.append(1)
        if len(calls) > 8:  # block 0 has 7 layers: block 1's second layer fails
            raise RuntimeError("boom")
        return real(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(sparsegpt, "sparsegpt_prune", fail_in_block_1)
    with pytest.raises(RuntimeError, match="boom"):
        sc.prune_(model, sc.SparseGPT(sparsity=0.5, batch_size=4), CALIB, progress=False)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name


# ---------------------------------------------------------------- resume and atomicity

def test_resume_after_a_failure_in_block_k_gives_the_same_bytes(fp32_dir, tmp_path, monkeypatch):
    config = sc.SparseGPT(sparsity=0.5, batch_size=4)
    whole = tmp_path / "whole"
    prune_pretrained(fp32_dir, config, CALIB, whole, progress=False)

    out = tmp_path / "out"
    real_load = streaming._Run.load
    loaded = []

    def fail_at_block_2(self, index, block, targets):
        loaded.append(index)
        if index == 2 and loaded.count(2) == 1:
            raise RuntimeError("power cut in block 2")
        real_load(self, index, block, targets)

    monkeypatch.setattr(streaming._Run, "load", fail_at_block_2)
    with pytest.raises(RuntimeError, match="power cut"):
        prune_pretrained(fp32_dir, config, CALIB, out, progress=False)
    assert not out.exists()
    manifest = json.loads((staging_folder(out) / MANIFEST).read_text())
    assert manifest["done"] == 2
    result = prune_pretrained(fp32_dir, config, CALIB, out, progress=False)
    assert result.resumed_from == 2 and loaded == [0, 1, 2, 2]  # blocks 0 and 1 were not run again
    assert _files(out) == _files(whole)
    assert not staging_folder(out).exists()


def test_the_output_appears_only_when_complete(fp32_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_done = streaming._Run.done
    seen = []

    def check(self, index, block, masks, info):
        real_done(self, index, block, masks, info)
        seen.append(index)
        assert not out.exists() and staging_folder(out).is_dir()

    monkeypatch.setattr(streaming._Run, "done", check)
    prune_pretrained(fp32_dir, sc.Wanda(sparsity=0.5), CALIB, out, progress=False)
    assert seen == [0, 1, 2] and is_checkpoint(out)


def test_a_resume_must_match_the_config_calibration_and_input(fp32_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(fp32_dir, folder)
    out = tmp_path / "out"
    config = sc.Wanda(sparsity=0.5, batch_size=4)
    real_done = streaming._Run.done

    def stop_after_block_0(self, index, *args):
        real_done(self, index, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming._Run, "done", stop_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        prune_pretrained(folder, config, CALIB, out, progress=False)
    monkeypatch.setattr(streaming._Run, "done", real_done)
    staged = _digest(staging_folder(out))
    with pytest.raises(SparsecraftError, match="another config"):
        prune_pretrained(folder, sc.Wanda(sparsity=0.6, batch_size=4), CALIB, out, progress=False)
    with pytest.raises(SparsecraftError, match="another calibration data"):
        prune_pretrained(folder, config, CALIB.flip(0), out, progress=False)
    manifest = staging_folder(out) / MANIFEST
    text = manifest.read_text()
    record = json.loads(text)
    assert record["activations"] == "float32"
    record["activations"] = "bfloat16"  # staged when the blocks computed in another dtype
    manifest.write_text(json.dumps(record))
    with pytest.raises(SparsecraftError, match="another activation dtype"):
        prune_pretrained(folder, config, CALIB, out, progress=False)
    manifest.write_text(text)
    shard = folder / "model-00002-of-00003.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(SparsecraftError, match="another input model"):
        prune_pretrained(folder, config, CALIB, out, progress=False)
    assert _digest(staging_folder(out)) == staged and not out.exists()  # refusals change nothing
    result = prune_pretrained(folder, config, CALIB, out, resume=False, progress=False)
    assert result.resumed_from == 0 and is_checkpoint(out)


# ---------------------------------------------------------------- bad input

def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _broken_copy(fp32_dir, tmp_path, damage) -> Path:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(fp32_dir, folder)
    damage(folder)
    return folder


def _truncate(folder):
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _edit_index(edit):
    def damage(folder):
        index = json.loads((folder / INDEX_FILE).read_text())
        edit(index["weight_map"])
        (folder / INDEX_FILE).write_text(json.dumps(index))
    return damage


def _long_header(folder):
    shard = folder / "model-00003-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    shard.write_bytes(bytes(data))


def _weight_dtype(dtype):
    def damage(folder):
        from safetensors.torch import load_file

        shard = folder / "model-00001-of-00003.safetensors"
        state = load_file(shard)
        name = next(n for n in state if n.endswith("q_proj.weight"))
        state[name] = state[name].to(dtype)
        save_file(state, shard, metadata={"format": "pt"})
    return damage


BAD_INPUT = {
    "a shard missing": (lambda f: (f / "model-00002-of-00003.safetensors").unlink(),
                        FormatError, r"shard '.*model-00002-of-00003.safetensors' is missing"),
    "a shard truncated": (_truncate, FormatError, r"model-00002-of-00003.safetensors' is truncated"),
    "a header longer than its file": (_long_header, FormatError,
                                      r"model-00003-of-00003.safetensors' is truncated: its header needs"),
    "the index names a tensor no shard has": (
        _edit_index(lambda m: m.update({"model.layers.0.mlp.gate_proj.weight": "model-00003-of-00003.safetensors"})),
        FormatError, r"index.json' names tensor 'model.layers.0.mlp.gate_proj.weight' in shard .*00003.*not hold it"),
    "the index misses a tensor": (_edit_index(lambda m: m.pop("model.norm.weight")), FormatError,
                                  r"index.json': tensor 'model.norm.weight' .* is in no shard"),
    "a weight dtype the method cannot handle": (_weight_dtype(torch.int8), TargetError,
                                                r"model-00001-of-00003.safetensors': weight .*q_proj.weight' is int8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_before_anything_is_written(case, fp32_dir, tmp_path, monkeypatch):
    damage, error, message = BAD_INPUT[case]
    folder = _broken_copy(fp32_dir, tmp_path, damage)
    read = []
    monkeypatch.setattr(streaming.ShardedWeights, "read", lambda self, names: read.append(names))
    before = _tree(tmp_path)
    with pytest.raises(error, match=message):
        prune_pretrained(folder, sc.Wanda(sparsity=0.5), CALIB, tmp_path / "out", progress=False)
    assert _tree(tmp_path) == before and not read  # no tensor read, nothing written


def test_an_existing_output_is_replaced_only_with_overwrite(fp32_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):
        prune_pretrained(fp32_dir, sc.Magnitude(sparsity=0.5), None, out, progress=False)
    with pytest.raises(ConfigError, match="not a sparsecraft output"):  # not ours: never replaced
        prune_pretrained(fp32_dir, sc.Magnitude(sparsity=0.5), None, out, overwrite=True, progress=False)
    (out / "mine.txt").unlink()
    sc.save(torch.nn.Linear(2, 2), out, overwrite=True)  # a sparsecraft checkpoint of another model
    prune_pretrained(fp32_dir, sc.Magnitude(sparsity=0.5), None, out, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup left
    assert sc.get_meta(sc.load(out))


def test_not_enough_disk_for_the_activations_is_refused_first(fp32_dir, tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SparsecraftError, match=f"not enough disk space in '{tmp_path}': the activations and the "
                                               "output need about"):
        prune_pretrained(fp32_dir, sc.Wanda(sparsity=0.5), CALIB, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_runs_that_need_the_whole_model_are_refused(fp32_dir, tmp_path):
    for config, words in ((sc.Wanda(sparsity=0.5, allocation="owl"), "scans every block"),
                          (sc.Magnitude(sparsity=0.5, allocation="global"), "compares the scores"),
                          (sc.Wanda(sparsity=0.5, activations="memory"), "activations='memory'"),
                          (sc.method_config("snip", sparsity=0.5), "gradients")):
        with pytest.raises(ConfigError, match=words):
            prune_pretrained(fp32_dir, config, CALIB, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="writes a folder"):
        prune_pretrained(fp32_dir, sc.Magnitude(), None, tmp_path / "out.safetensors", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_in_memory_prune_refuses_weights_it_cannot_handle():
    # two layers: the last Linear of a plain Sequential is its output head, which is not a target
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TargetError, match="layer '0.weight': weight dtype int8 is not supported"):
        sc.prune_(model, sc.Magnitude(sparsity=0.5), progress=False)


# ---------------------------------------------------------------- checkpoints: sharded and single

def test_sharded_and_single_file_checkpoints_both_load(tmp_path):
    model = _llama(layers=2)
    sc.prune_(model, sc.Magnitude(sparsity=0.5), progress=False).finalize_()
    sc.save(model, tmp_path / "single")  # the layout every earlier checkpoint has
    sc.save(model, tmp_path / "sharded", max_shard_bytes=50_000)
    assert (tmp_path / "single" / "model.safetensors").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 3
    for name in ("single", "sharded"):
        _assert_same_model(sc.load(tmp_path / name), model)
    assert "shards, format version 1" in sc.checkpoint.describe(tmp_path / "sharded")


def test_a_sharded_checkpoint_refuses_a_swapped_shard_or_an_edited_index(tmp_path):
    model = _llama(layers=2)
    sc.save(model, tmp_path / "a", max_shard_bytes=50_000)
    sc.save(_llama(layers=2, seed=1), tmp_path / "b", max_shard_bytes=50_000)
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*-of-*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "b").glob("model-*-of-*.safetensors")) and len(shards) > 2
    shard = shards[1]
    (tmp_path / "a" / shard).write_bytes((tmp_path / "b" / shard).read_bytes())
    with pytest.raises(FormatError, match=f"shard '.*{shard}' is not the shard .* lists"):
        sc.load(tmp_path / "a")
    index = json.loads((tmp_path / "b" / INDEX_FILE).read_text())
    index["sparsecraft"]["extra"]["model"]["class"] = "BertModel"
    (tmp_path / "b" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FormatError, match="index checksum mismatch"):
        sc.load(tmp_path / "b")


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def bf16_tok_dir(tmp_path_factory):
    """A sharded bf16 Llama with the MiniLM tokenizer (the CLI builds calibration from it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsecraft.models import NAMED_MODELS, _package_dir

    module, sub, dist = NAMED_MODELS["minilm-l6"]
    tok = AutoTokenizer.from_pretrained(_package_dir(module, dist) / sub)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.sep_token_id)
    folder = save_sharded(LlamaForCausalLM(cfg).to(torch.bfloat16), tmp_path_factory.mktemp("cli") / "model")
    tok.save_pretrained(folder)
    return folder


def test_cli_streams_a_bf16_folder_and_eval_report_read_it(bf16_tok_dir, tmp_path, capsys):
    out = tmp_path / "p"
    base = ["-q", "prune", str(bf16_tok_dir), "--method", "sparsegpt", "--samples", "8", "--seq-len", "16"]
    assert main([*base, "--out", str(out)]) == 0
    assert "block by block (2 blocks)" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / "sparsecraft-output.json").is_file()
    assert json.loads((out / "prune_results.json").read_text())["sparsity"] == pytest.approx(0.5)
    assert {p.dtype for p in sc.load(out).parameters()} == {torch.bfloat16}
    assert main(["-q", "eval", str(out), "--seq-len", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["-q", "report", str(out)]) == 0
    assert "total (14 targets)" in capsys.readouterr().out
    assert main(["-q", "eval", str(bf16_tok_dir), "--seq-len", "32"]) == 0  # the bf16 input itself
    # --eval needs the whole model: loaded whole (bf16 kept), or refused with --stream
    assert main([*base, "--eval", "--out", str(tmp_path / "whole")]) == 0
    assert "block by block" not in capsys.readouterr().out
    assert (tmp_path / "whole" / "model.safetensors").is_file()
    assert {p.dtype for p in sc.load(tmp_path / "whole").parameters()} == {torch.bfloat16}
    assert main([*base, "--eval", "--stream", "--out", str(tmp_path / "no")]) == 2
    assert "evaluation (--eval) needs the whole model" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
def test_a_killed_cli_run_resumes_to_the_same_bytes(bf16_tok_dir, tmp_path, capsys):
    """SIGTERM while block 1 is being written: exit 143, the finished blocks stay in
    .out.partial, and the same command finishes with the bytes of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import textwrap

    argv = ["-q", "prune", str(bf16_tok_dir), "--method", "wanda", "--samples", "8", "--seq-len", "16"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        import sparsecraft.formats as formats
        from sparsecraft.cli import main
        original, calls = formats.write_tensors, []
        def slow(*a, **k):
            calls.append(1)
            if len(calls) == 3:  # the embeddings' shard and block 0 are written; block 1 is not
                print("block 1", flush=True)
                time.sleep(120)
            return original(*a, **k)
        formats.write_tensors = slow
        sys.exit(main({[*argv, "--out", str(out)]!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(sc.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "block 1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert json.loads((staging_folder(out) / MANIFEST).read_text())["done"] == 1
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "resumed at block 1" in capsys.readouterr().out
    assert _files(out) == _files(tmp_path / "whole")


def test_compute_in_widens_one_block_rounds_and_always_restores():
    from torch import nn

    from sparsecraft.blocks import ComputeIn

    block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16)
    block[1].register_buffer("scale", torch.full((8,), 1 / 3).to(torch.bfloat16))
    weight = block[0].weight
    with pytest.raises(RuntimeError, match="inside"):
        with ComputeIn(block, torch.float32) as wide:
            assert weight.dtype == torch.float32 and block[1].scale.dtype == torch.float32
            with torch.no_grad():
                weight.add_(1e-3)  # values bf16 cannot hold
            expected = weight.detach().to(torch.bfloat16)
            wide.round_()
            assert weight.dtype == torch.float32 and torch.equal(weight.detach(), expected.float())
            raise RuntimeError("inside")
    assert block[0].weight is weight and weight.dtype == torch.bfloat16 and torch.equal(weight.detach(), expected)
    assert block[1].scale.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())


def test_perplexity_of_a_bf16_model_on_cpu_is_computed_in_fp32_and_leaves_the_model_as_it_was():
    from sparsecraft import models

    model = _llama(torch.bfloat16, layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 96, (4 * 32,), generator=torch.Generator().manual_seed(3))
    wide = models.perplexity(model, tokens, 32, progress=False)
    assert wide == models.perplexity(copy.deepcopy(model).float(), tokens, 32, progress=False)
    assert wide != models.perplexity(model, tokens, 32, progress=False, widen=False)  # bf16 arithmetic
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and not p.is_inference() and torch.equal(p, before[name]), name


_FRAGMENT = """
import sys, torch
from sparsecraft.memory import return_freed_memory
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
if sys.argv[1] == 'set':
    assert return_freed_memory() and return_freed_memory()  # idempotent
torch.set_num_threads(1)
big = torch.ones(4 << 20)  # 16 MiB freed: glibc's own threshold rises to it
del big
keep, base = [], anon()
for mib in range(1, 15):  # larger each time, each followed by a small tensor that stays
    big = torch.ones(mib << 18)
    keep.append(torch.ones(1024))
    del big
print((anon() - base) / 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file() or __import__("platform").libc_ver()[0] != "glibc",
                    reason="measures glibc's allocator through /proc")
def test_return_freed_memory_stops_heap_holes_from_staying_resident():
    """What keeps a streamed prune's peak flat in depth: freed tensors of 1 MiB or more go
    back to the system rather than staying as holes in the heap. The same allocations keep
    several MiB resident without the setting (the case is built to fragment the heap)."""
    import subprocess
    import sys

    def retained(mode):
        out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    assert retained("default") > 4.0
    assert retained("set") < 1.0
