import json

import pytest

import sparsecraft as sc
from sparsecraft.cli import main


@pytest.fixture
def hf_dir(tiny_llama_dir):
    return tiny_llama_dir


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_prune_report_info_end_to_end(tmp_path, hf_dir, capsys):
    out = tmp_path / "pruned"
    assert main(["-q", "prune", str(hf_dir), "--pattern", "2:4", "--out", str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    model = sc.load(out)
    for name, meta in sc.get_meta(model).items():
        assert meta["pattern"] == "2:4"
        w = dict(model.named_parameters())[name]
        assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["-q", "report", str(out), "--input-shape", "1,16", "--json", str(js), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "2:4" in text and "total (14 targets)" in text
    data = json.loads(js.read_text())
    assert abs(data["totals"]["sparsity"] - 0.5) < 1e-9
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in info and " nm " in info


def test_existing_out_refused(tmp_path, hf_dir, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["prune", str(hf_dir), "--out", str(out)]) == 2
    assert "exists" in _one_line_error(capsys)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["prune", "m", "--out", "o", "--sparsity", "lots"], "sparsity must be a number"),
    (["prune", "m", "--out", "o", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["prune", "m", "--out", "o", "--pattern", "4:4"], "1 <= N < M"),
    (["prune", "m", "--out", "o", "--method", "lottery"], "unknown method 'lottery'"),
    (["prune", "m", "--out", "o", "--pattern", "hexagon"], "unknown pattern 'hexagon'"),
    (["prune", "m"], "--out"),
    (["report", "/no/such/model"], "neither a named model"),
    (["info", "/no/such/file"], "no checkpoint"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert needle in _one_line_error(capsys)


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--sparsity", "--pattern", "2:4", "--allocation", "examples:"):
        assert word in text


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a model" in _one_line_error(capsys)


def test_block_pattern_gets_the_default_sparsity(tmp_path, hf_dir, capsys):
    out = tmp_path / "blocks"
    assert main(["-q", "prune", str(hf_dir), "--pattern", "block:4x4", "--out", str(out)]) == 0
    assert "sparsity 0.5000" in capsys.readouterr().out
