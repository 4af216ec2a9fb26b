"""YAML recipes and the calibrated CLI path on a tiny Llama with a real tokenizer."""

import json

import pytest
import yaml

from sparsecraft import ConfigError
from sparsecraft.cli import main
from sparsecraft.recipe import Recipe, load_recipe


@pytest.fixture
def tiny_dir(tiny_llama_tok_dir):
    return tiny_llama_tok_dir


def _write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_yaml_equals_python(tmp_path):
    data = {"model": "smollm2-135m", "out": "o", "prune": {"method": "wanda", "sparsity": 0.6,
            "allocation": "owl", "options": {"dsnot": True}}, "calibration": {"samples": 16, "seq_len": 64}}
    a = load_recipe(_write(tmp_path, data))
    assert a == Recipe.from_dict(data)
    assert a.prune.needs_calibration and a.calibration.samples == 16


@pytest.mark.parametrize("data,match", [
    ({"out": "o"}, "'model' is required"),
    ({"model": "m", "out": "o", "prune": {"method": "lottery"}}, "prune: unknown method 'lottery'"),
    ({"model": "m", "out": "o", "prune": {"sparsity": 2}}, "prune: sparsity must be in"),
    ({"model": "m", "out": "o", "calibration": {"samples": 0}}, "calibration: calibration.samples must be a positive"),
    ({"model": "m", "out": "o", "calibration": {"file": "/no/file.txt"}}, "does not exist"),
    ({"model": "m", "out": "o", "colour": "red"}, "unknown keys \\['colour'\\]"),
    ({"model": "m", "out": "o", "evaluate": "yes"}, "'evaluate' must be true or false"),
])
def test_recipe_errors_name_the_field(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(_write(tmp_path, data))


def test_recipe_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(path)


def test_cli_prune_wanda_with_calibration_file_and_eval(tmp_path, tiny_dir, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"Sentence number {i} about the weather and the news."})
                               for i in range(200)))
    out = tmp_path / "pruned"
    code = main(["-q", "prune", str(tiny_dir), "--method", "wanda", "--dsnot", "--pattern", "2:4",
                 "--calib", str(calib), "--samples", "8", "--seq-len", "32", "--eval", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "sparsity 0.5000" in text and "perplexity" in text
    results = json.loads((out / "prune_results.json").read_text())
    assert results["calibration"]["source"] == str(calib)
    assert results["pruned"]["perplexity"] > 0 and results["prune"]["options"] == {"dsnot": True}
    assert main(["-q", "eval", str(out), "--seq-len", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_run_recipe_owl_sparsegpt(tmp_path, tiny_dir, capsys):
    out = tmp_path / "o"
    recipe = _write(tmp_path, {"model": str(tiny_dir), "out": str(out), "evaluate": False,
                               "prune": {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl"},
                               "calibration": {"samples": 8, "seq_len": 32}})
    assert main(["-q", "run", str(recipe)]) == 0
    assert "sparsity 0.6000" in capsys.readouterr().out


def test_cli_run_bad_recipe_exit_2(tmp_path, capsys):
    recipe = _write(tmp_path, {"model": "m", "out": "o", "prune": {"pattern": "5:4"}})
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 <= N < M" in err[0]


def test_cli_prune_wrong_tokenizer_vocabulary(tmp_path, tiny_dir, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(small)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(small)  # 30k-token tokenizer on a 100-token model
    code = main(["-q", "prune", str(small), "--method", "wanda", "--samples", "2", "--seq-len", "16",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "vocabulary has 100 entries" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_example_recipe_is_valid():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parent.parent / "examples" / "recipe.yaml")
    assert recipe.prune.method == "sparsegpt" and recipe.prune.allocation == "owl"


def test_recipe_from_python_mappings_and_unquoted_pattern(tmp_path):
    """A Recipe built from plain mappings is the one YAML builds; YAML's 2:4 stays a pattern."""
    r = Recipe(model="m", out="o", prune={"pattern": "2:4", "sparsity": None}, calibration={"samples": 4})
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nout: o\nprune:\n  pattern: 2:4\n  sparsity: null\ncalibration:\n  samples: 4\n")
    assert load_recipe(path) == r
    assert str(r.prune.pattern_obj) == "2:4"


def test_yaml_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-4 as text; a learning rate written that way must be a number."""
    from sparsecraft.yaml_io import load_yaml

    assert load_yaml("lr: 1e-4\nn: 3E5\nneg: -2e-3\npattern: 2:4\nname: 1e", "t") == {
        "lr": 1e-4, "n": 3e5, "neg": -2e-3, "pattern": "2:4", "name": "1e"}
