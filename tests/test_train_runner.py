"""The built-in training runner and ``sparsecraft train``: real data, checkpoints, resuming."""

import json

import pytest
import torch

from sparsecraft.cli import main
from sparsecraft.errors import ConfigError, SparsecraftError
from sparsecraft.patterns import NM
from sparsecraft.train.runner import TrainRecipe, load_dataset, run_training


def test_datasets_are_real_and_split_fixed():
    x, y, xt, yt = load_dataset("mnist")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    x2, _, _, _ = load_dataset("mnist")
    assert torch.equal(x, x2)
    x, y, xt, yt = load_dataset("digits")
    assert x.shape[0] == 1437 and xt.shape[0] == 360


@pytest.mark.parametrize("method,extra", [
    ("rigl", {"sparsity": 0.9, "options": {"update_every": 10}}),
    ("imp", {"sparsity": 0.8, "options": {"rounds": 2, "rewind_step": 5}}),
    ("srste", {"sparsity": None, "pattern": "2:4", "model": "mlp"}),
])
def test_resumed_run_equals_uninterrupted_run(tmp_path, method, extra):
    recipe = TrainRecipe(data="digits", method=method, steps=60, checkpoint_every=25, batch_size=32, **extra)
    full = run_training(recipe, tmp_path / "full", progress=False, return_model=True)
    part = run_training(recipe, tmp_path / "part", progress=False, stop_after=50)
    assert not part["finished"] and part["step"] == 50
    resumed = run_training(recipe, tmp_path / "part", progress=False, return_model=True)
    assert resumed["finished"]
    for (name, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    assert full["test_accuracy"] == resumed["test_accuracy"]
    if method == "srste":
        assert NM(2, 4).is_valid(resumed["model"].hidden[0].weight != 0)
    else:
        assert resumed["sparsity"] == pytest.approx(extra["sparsity"], abs=1e-3)


def test_recipe_validation_names_the_field():
    with pytest.raises(ConfigError, match="steps"):
        TrainRecipe(steps=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainRecipe.from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match="do not apply"):
        run_training(TrainRecipe(data="digits", method="gmp", options={"update_every": 3}), progress=False)
    with pytest.raises(ConfigError, match="image data"):
        run_training(TrainRecipe(data="mnist1d", model="cnn"), progress=False)


def test_cli_train_writes_model_report_and_refuses_a_foreign_checkpoint(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nmodel: lenet300\nmethod: gmp\nsparsity: 0.8\nsteps: 80\n"
                      "checkpoint_every: 40\noptions:\n  start: 0.1\n  end: 0.5\n")
    out = tmp_path / "run"
    assert main(["-q", "train", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3) and report["finished"]
    assert report["test_accuracy"] > 0.5
    assert (out / "model.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["-q", "train", str(recipe), "--out", str(out), "--set", "sparsity=0.7"]) == 2
    assert "different recipe" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    (out / "checkpoint.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(SparsecraftError, match="truncated"):
        run_training(TrainRecipe.from_dict({"data": "digits", "method": "gmp", "sparsity": 0.8, "steps": 80,
                                            "checkpoint_every": 40, "options": {"start": 0.1, "end": 0.5}}),
                     out, progress=False)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
