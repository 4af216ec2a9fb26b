"""Structured shrinking of a Hugging Face folder block by block (sparsecraft.structured.stream):
the same units and tensors as the in-memory shrink_, resumable, and refused when it cannot."""

import json

import pytest
import torch
from test_streaming import CALIB, _files, _llama, save_sharded

import sparsecraft as sc
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.streaming import MANIFEST, _Run, staging_folder
from sparsecraft.structured import ShrinkConfig, shrink_, shrink_pretrained


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_sharded(_llama(layers=3), tmp_path_factory.mktemp("shrink") / "model")


def _in_memory(folder, config, calibration=None):
    model, _ = sc.models.load(str(folder))
    report = shrink_(model, config, calibration, progress=False)
    return model, report


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit-exact: the same units removed, the same values


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_streamed_shrink_equals_in_memory(criterion, hf_dir, tmp_path):
    config = ShrinkConfig(mlp=0.5, heads=0.5, criterion=criterion, batch_size=4)
    calib = CALIB if criterion == "wanda" else None
    want, want_report = _in_memory(hf_dir, config, calib)
    report = shrink_pretrained(hf_dir, config, calib, tmp_path / "out", progress=False)
    assert [(l.name, l.removed, l.removed_buckets) for l in report.layers] == \
        [(l.name, l.removed, l.removed_buckets) for l in want_report.layers]
    assert (report.params_before, report.params_after) == (want_report.params_before, want_report.params_after)
    got = sc.load(tmp_path / "out")
    _assert_same(got, want)
    assert got.model.layers[0].mlp.up_proj.weight.shape == (64, 64)  # half of 128 channels
    # a uniform shrink: config.json holds the new sizes, and transformers loads the folder itself
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] == 64 and cfg["num_key_value_heads"] == 1
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = CALIB[:2]
    assert torch.allclose(hf(ids).logits, want(ids).logits, atol=1e-5)


def test_non_uniform_shrink_keeps_the_config_and_says_why(hf_dir, tmp_path):
    config = ShrinkConfig(mlp=0.5, overrides={"model.layers.0.mlp": 0.25})
    shrink_pretrained(hf_dir, config, None, tmp_path / "out", progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] == 128 and "non-uniform shrink" in cfg["sparsecraft_note"]
    got = sc.load(tmp_path / "out")
    want, _ = _in_memory(hf_dir, config)
    _assert_same(got, want)
    assert "non-uniform" in sc.checkpoint.describe(tmp_path / "out")


def test_resume_after_a_failure_gives_the_same_bytes(hf_dir, tmp_path, monkeypatch):
    config = ShrinkConfig(mlp=0.5, criterion="wanda", batch_size=4)
    shrink_pretrained(hf_dir, config, CALIB, tmp_path / "whole", progress=False)
    out = tmp_path / "out"
    real_load, loaded = _Run.load, []

    def fail_at_block_2(self, index, block, targets):
        loaded.append(index)
        if index == 2 and loaded.count(2) == 1:
            raise RuntimeError("power cut in block 2")
        real_load(self, index, block, targets)

    monkeypatch.setattr(_Run, "load", fail_at_block_2)
    with pytest.raises(RuntimeError, match="power cut"):
        shrink_pretrained(hf_dir, config, CALIB, out, progress=False)
    assert not out.exists()
    assert json.loads((staging_folder(out) / MANIFEST).read_text())["done"] == 2
    shrink_pretrained(hf_dir, config, CALIB, out, progress=False)
    assert loaded == [0, 1, 2, 2]  # blocks 0 and 1 were not run again
    assert _files(out) == _files(tmp_path / "whole")
    assert not staging_folder(out).exists()


def test_what_cannot_stream_is_refused_before_anything_is_written(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="criterion 'taylor' needs gradients"):
        shrink_pretrained(hf_dir, ShrinkConfig(mlp=0.5, criterion="taylor"), CALIB, tmp_path / "out")
    with pytest.raises(ConfigError, match="needs calibration"):
        shrink_pretrained(hf_dir, ShrinkConfig(mlp=0.5, criterion="wanda"), None, tmp_path / "out")
    with pytest.raises(ConfigError, match="override 'nothing.*' matches no shrinkable layer"):
        shrink_pretrained(hf_dir, ShrinkConfig(mlp=0.5, overrides={"nothing.*": 0.1}), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_shrinks_a_folder_block_by_block(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["shrink", str(hf_dir), "--mlp", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "block by block" in printed
    results = json.loads((out / "shrink_results.json").read_text())
    assert results["streamed"] and results["report"]["params_after"] < results["report"]["params_before"]
    want, _ = _in_memory(hf_dir, ShrinkConfig(mlp=0.5))
    _assert_same(sc.load(out), want)
    capsys.readouterr()  # the in-memory load's progress bars
    # --stream where it cannot: exit code 2 and one line
    code = main(["shrink", str(hf_dir), "--mlp", "0.5", "--criterion", "taylor", "--stream",
                 "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot shrink" in err and "taylor" in err and len(err.strip().splitlines()) == 1
