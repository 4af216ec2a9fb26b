"""Every bad input the command line can get: exit code 2, one line on stderr, no traceback,
nothing created or changed on disk, and (where the input can be judged without it) the
model is never loaded. A few cases run in a subprocess: SIGTERM, a closed pipe, --version."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsecraft as sc
from sparsecraft import models as sc_models
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.outputs import MARKER, check_output, check_train_out, write_marker

SRC = str(Path(sc.__file__).resolve().parent.parent)


def _tree(root: Path) -> dict:
    """Every path under root with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture
def place(tmp_path, tiny_llama_dir, monkeypatch):
    """tmp_path as the current folder, with a Hugging Face model, a user's folder, a file,
    a sparsecraft train run and a folder holding a (pretend) pruned model."""
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "exists.json").write_text("{}")
    pruned = tmp_path / "pruned-llm"
    pruned.mkdir()
    (pruned / "model.safetensors").write_bytes(b"weights")
    (pruned / "config.json").write_text("{}")
    write_marker(pruned, "prune")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"ckpt")
    write_marker(run, "train")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\nout: fresh\n")
    (tmp_path / "fresh").mkdir()
    return tmp_path


@pytest.fixture
def never_load(monkeypatch):
    """Fail if a command loads a model (bad input must be refused before that)."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(sc_models, "load", boom)


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def _assert_one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    return lines[0]


def _write_recipe(root: Path, text: str) -> str:
    path = root / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# (argv builder, needle). Paths are relative to the current folder (tmp_path).
CASES = {
    "eval --seq-len 0": (lambda m: ["eval", m, "--seq-len", "0"], "seq-len must be an integer >= 2"),
    "eval --seq-len abc": (lambda m: ["eval", m, "--seq-len", "abc"], "seq-len must be an integer"),
    "report --plot missing parent": (lambda m: ["report", m, "--plot", "/missing/x.png"],
                                     "parent folder '/missing' does not exist"),
    "report --json existing": (lambda m: ["report", m, "--json", "exists.json"], "exists; pass --overwrite"),
    "report --json a folder": (lambda m: ["report", m, "--json", "user", "--overwrite"], "is a folder"),
    "report --plot bad suffix": (lambda m: ["report", m, "--plot", "x.txt"], "must end in .png"),
    "report --json same as --plot": (lambda m: ["report", m, "--json", "a.png", "--plot", "a.png"], "same file"),
    "prune missing parent": (lambda m: ["prune", m, "--out", "no/such/dir/out"], "does not exist"),
    "prune --out .": (lambda m: ["prune", m, "--out", ".", "--overwrite"], "is or contains the current folder"),
    "prune --out ..": (lambda m: ["prune", m, "--out", "..", "--overwrite"], "is or contains the current folder"),
    "prune --out user folder": (lambda m: ["prune", m, "--out", "user"], "exists; pass --overwrite"),
    "prune --overwrite user folder": (lambda m: ["prune", m, "--out", "user", "--overwrite"],
                                      "is not a sparsecraft output"),
    "prune --overwrite HF model": (lambda m: ["prune", m, "--out", m, "--overwrite"], "is not a sparsecraft output"),
    "prune --overwrite foreign .safetensors": (lambda m: ["prune", m, "--out", "notes.safetensors", "--overwrite"],
                                               "is not a sparsecraft checkpoint"),
    "prune --out is a file": (lambda m: ["prune", m, "--out", "exists.json", "--overwrite"], "is a file"),
    "prune --method unknown": (lambda m: ["prune", m, "--out", "o", "--method", "nosuch"], "unknown method 'nosuch'"),
    "prune --seed abc": (lambda m: ["prune", m, "--out", "o", "--seed", "abc"], "seed must be an integer"),
    "prune --seed 1.5": (lambda m: ["prune", m, "--out", "o", "--seed", "1.5"], "seed must be an integer"),
    "prune --samples 0": (lambda m: ["prune", m, "--out", "o", "--samples", "0"], "samples must be an integer >= 1"),
    "prune --max-sparsity 2": (lambda m: ["prune", m, "--out", "o", "--max-sparsity", "2"], "max sparsity must be"),
    "prune --pattern 124": (lambda m: ["prune", m, "--out", "o", "--pattern", "124"], "unknown pattern '124'"),
    "run --out exists": (lambda m: ["run", "r.yaml"], "out 'fresh' exists; pass --overwrite"),
    "compile --out .safetensors": (lambda m: ["compile", m, "--out", "x.safetensors"], "compile saves a folder"),
    "compile --json missing parent": (lambda m: ["compile", m, "--json", "/missing/p.json"], "does not exist"),
    "bench --json existing": (lambda m: ["bench", m, "--json", "exists.json"], "exists; pass --overwrite"),
    "shrink --overwrite user folder": (lambda m: ["shrink", m, "--mlp", "0.5", "--out", "user", "--overwrite"],
                                       "is not a sparsecraft output"),
    "shrink --seed abc": (lambda m: ["shrink", m, "--mlp", "0.5", "--out", "o", "--seed", "abc"], "seed must be"),
    "demo --overwrite user folder": (lambda m: ["demo", "--out", "user", "--overwrite"], "is not a sparsecraft output"),
    "demo --method unknown": (lambda m: ["demo", "--out", "d", "--method", "nosuch"], "unknown method 'nosuch'"),
    "info not a checkpoint": (lambda m: ["info", "notes.safetensors"], "notes.safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_table(case, place, tiny_llama_dir, never_load, capsys):
    build, needle = CASES[case]
    argv = build(os.path.relpath(tiny_llama_dir, place))
    before = _tree(place)
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert needle in _assert_one_line(err)
    assert _tree(place) == before


RECIPES = {
    "prune options a list": ("prune: {options: [1]}", "prune: 'options' must be a mapping"),
    "prune seed a string": ("prune: {seed: abc}", "prune: 'seed' must be an integer"),
    "prune seed a float": ("prune: {seed: 1.5}", "prune: 'seed' must be an integer"),
    "prune overrides a list": ("prune: {overrides: [1]}", "'overrides' must be a mapping"),
    "prune overrides a word": ("prune: {overrides: {'*.up*': lots}}", "'overrides' must be a mapping of string to number"),
    "prune sparsity a string": ("prune: {sparsity: '0.5'}", "'sparsity' must be a number or null"),
    "prune targets a number": ("prune: {targets: 5}", "'targets' must be a mapping"),
    "prune method a list": ("prune: {method: [magnitude]}", "'method' must be a string"),
    "prune pattern a number": ("prune: {pattern: 124}", "quote it"),
    "calibration seed a string": ("calibration: {seed: x}", "calibration: 'seed' must be an integer"),
    "calibration corpus a list": ("calibration: {corpus: [lee]}", "'corpus' must be a string"),
    "evaluate a string": ("evaluate: maybe", "'evaluate' must be true or false"),
    "not a mapping": ("- 1\n- 2", "must be a YAML mapping"),
    "broken YAML": ("prune: {method: [", "is not valid YAML at line"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipe_table(case, place, tiny_llama_dir, never_load, capsys):
    body, needle = RECIPES[case]
    head = "" if case in ("not a mapping", "broken YAML") else f"model: {tiny_llama_dir}\nout: o\n"
    recipe = _write_recipe(place, head + body + "\n")
    before = _tree(place)
    code, err = _run(["run", recipe], capsys)
    assert code == 2, err
    assert needle in _assert_one_line(err)
    assert _tree(place) == before


TRAIN = {
    "seed a string": ([], "seed: abc", "train recipe: 'seed' must be an integer"),
    "steps a float": ([], "steps: 1.5", "'steps' must be an integer"),
    "options a list": ([], "options: [1]", "'options' must be a mapping"),
    "method a list": ([], "method: [gmp]", "'method' must be a string"),
    "lr a string": ([], "lr: fast", "'lr' must be a number"),
    "train block a list": ([], "train: [1]", "'train' must be a mapping"),
    "unknown field": ([], "colour: red", "unknown keys ['colour']"),
    "--set steps=[": (["--set", "steps=["], "", "--set steps is not valid YAML"),
    "--set seed=x": (["--set", "seed=x"], "", "'seed' must be an integer"),
    "--set without =": (["--set", "steps"], "", "--set needs KEY=VALUE"),
    "--out a pruned model": (["--out", "pruned-llm"], "", "not a sparsecraft training run"),
    "--out a pruned model, --overwrite": (["--out", "pruned-llm", "--overwrite"], "", "not a sparsecraft training run"),
    "--out the user's folder": (["--out", "user", "--overwrite"], "", "not a sparsecraft training run"),
    "--out a HF model": (["--out", "tiny-llama"], "", "not a sparsecraft training run"),
    "--out .": (["--out", "."], "", "is or contains the current folder"),
    "--out missing parent": (["--out", "a/b/c"], "", "does not exist"),
    "--no-resume over a run": (["--out", "run", "--no-resume"], "", "pass --overwrite with --no-resume"),
}


@pytest.mark.parametrize("case", list(TRAIN))
def test_bad_train_table(case, place, monkeypatch, capsys):
    from sparsecraft.train import runner

    def no_training(*a, **k):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(runner, "run_training", no_training)
    monkeypatch.setattr(runner, "load_dataset", no_training)
    flags, line, needle = TRAIN[case]
    recipe = _write_recipe(place, "data: digits\nmethod: gmp\nsteps: 20\n" + line + "\n")
    before = _tree(place)
    code, err = _run(["train", recipe, *flags], capsys)
    assert code == 2, err
    assert needle in _assert_one_line(err)
    assert _tree(place) == before


def test_read_only_output_folder(place, tiny_llama_dir, never_load, monkeypatch, capsys):
    locked = place / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere: pretend the folder is read-only
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else real(p, mode, **k))
    before = _tree(place)
    for argv in (["prune", str(tiny_llama_dir), "--out", "locked/out"],
                 ["report", str(tiny_llama_dir), "--json", "locked/r.json"],
                 ["shrink", str(tiny_llama_dir), "--mlp", "0.5", "--out", "locked/s"]):
        code, err = _run(argv, capsys)
        assert code == 2
        assert "folder" in _assert_one_line(err) and "is not writable" in err
    assert _tree(place) == before


def test_a_method_needing_what_no_driver_collects_is_refused_before_loading(place, tiny_llama_dir, never_load,
                                                                          monkeypatch, capsys):
    from sparsecraft.criteria import CRITERIA, Criterion

    class NeedsTelepathy(Criterion):
        name = "telepathy"
        requires = ("thoughts",)

    monkeypatch.setitem(CRITERIA, "telepathy", NeedsTelepathy)
    code, err = _run(["prune", str(tiny_llama_dir), "--out", "o", "--method", "telepathy"], capsys)
    assert code == 2
    line = _assert_one_line(err)
    assert "'thoughts'" in line and "cannot collect" in line and "hessian" in line
    assert not (place / "o").exists()


@pytest.mark.parametrize("how", ["whole", "streamed"])
def test_os_errors_exit_2_in_one_line(how, place, tiny_llama_dir, monkeypatch, capsys):
    import errno

    from sparsecraft import checkpoint, streaming

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(place / "out"))

    if how == "whole":
        monkeypatch.setattr(checkpoint, "save", full)
    else:
        monkeypatch.setattr(streaming, "write_tensors", full)
    code, err = _run(["-q", "prune", str(tiny_llama_dir), "--out", "out", *(["--no-stream"] if how == "whole" else [])],
                     capsys)
    assert code == 2
    assert "No space left on device" in _assert_one_line(err)
    assert not [p for p in place.iterdir() if p.name.startswith((".out", "out"))]


def test_unexpected_error_is_one_line_exit_1_with_traceback_only_with_v(place, monkeypatch, capsys):
    from sparsecraft import checkpoint

    def bug(*a, **k):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(checkpoint, "tensor_file", bug)
    code, err = _run(["info", "x"], capsys)
    assert code == 1
    assert "internal error: RuntimeError: a bug over two lines" in _assert_one_line(err)
    code, err = _run(["-v", "info", "x"], capsys)
    assert code == 1 and "Traceback" in err


# ---------------------------------------------------------------- outputs that work
def test_prune_to_one_safetensors_file_and_overwrite_own_outputs(place, tiny_llama_dir, capsys):
    model = str(tiny_llama_dir)
    assert main(["-q", "prune", model, "--out", "p.safetensors"]) == 0
    assert sc.load("p.safetensors") is not None
    assert main(["-q", "prune", model, "--out", "p.safetensors", "--overwrite", "--sparsity", "0.7"]) == 0
    assert main(["-q", "prune", model, "--out", "p"]) == 0
    assert (place / "p" / MARKER).is_file()
    assert main(["-q", "prune", model, "--out", "p", "--overwrite", "--pattern", "2:4"]) == 0
    assert sc.get_meta(sc.load("p"))  # replaced
    assert main(["-q", "report", "p", "--json", "r.json", "--plot", "r.png"]) == 0
    assert main(["-q", "report", "p", "--json", "r.json", "--plot", "r.png", "--overwrite"]) == 0
    assert not [p for p in place.iterdir() if p.name.endswith(".tmp")]
    capsys.readouterr()


def test_check_output_rules(place):
    with pytest.raises(ConfigError, match="current folder"):
        check_output(str(place), overwrite=True)
    with pytest.raises(ConfigError, match="current folder"):
        check_output(os.path.join("user", ".."), overwrite=True)
    (place / "empty").mkdir()
    assert check_output("empty", overwrite=True) == Path("empty")  # nothing to lose
    assert check_output("pruned-llm", overwrite=True) == Path("pruned-llm")  # sparsecraft wrote it
    with pytest.raises(ConfigError, match="exists"):
        check_output("pruned-llm", overwrite=False)
    # train continues its own run without --overwrite; starting over needs it
    assert check_train_out("run", overwrite=False, resume=True) == Path("run")
    assert check_train_out("run", overwrite=True, resume=False) == Path("run")
    legacy = place / "legacy"
    legacy.mkdir()
    (legacy / "checkpoint.pt").write_bytes(b"x")  # a run from before the marker
    assert check_train_out("legacy", overwrite=False, resume=True) == Path("legacy")
    (legacy / "config.json").write_text("{}")  # ... unless something else lives there
    with pytest.raises(ConfigError, match="not a sparsecraft training run"):
        check_train_out("legacy", overwrite=True, resume=True)


# ---------------------------------------------------------------- YAML: 2:4 stays a pattern
def test_yaml_reads_n_m_patterns_as_text(tmp_path, tiny_llama_dir):
    from sparsecraft.recipe import load_recipe
    from sparsecraft.yaml_io import load_yaml, parse_value

    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny_llama_dir}\nout: o\nprune:\n  pattern: 2:4\n")
    assert load_recipe(path).prune.pattern == "2:4"
    assert load_yaml("a: 4:8\nb: 1:30.5\nc: 10\nd: 0.5\ne: 1_000\nf: 0x10", "t") == {
        "a": "4:8", "b": "1:30.5", "c": 10, "d": 0.5, "e": 1000, "f": 16}
    assert parse_value("2:4", "--set pattern") == "2:4"


def test_train_set_pattern_stays_text(tmp_path):
    import argparse

    from sparsecraft.train.commands import _recipe_fields

    recipe = tmp_path / "t.yaml"
    recipe.write_text("method: srste\npattern: 2:4\n")
    args = argparse.Namespace(recipe=str(recipe), out=None, overrides=[("pattern", "1:4")])
    fields, out = _recipe_fields(args)
    assert fields["pattern"] == "1:4" and out == "train_out"
    args.overrides = []
    assert _recipe_fields(args)[0]["pattern"] == "2:4"


def test_parse_pattern_refuses_a_number_and_says_quote_it():
    import yaml

    number = yaml.safe_load("pattern: 2:4")["pattern"]
    assert number == 124  # what plain PyYAML does
    with pytest.raises(ConfigError, match="quote it"):
        sc.parse_pattern(number)
    with pytest.raises(ConfigError, match="quote it"):
        sc.PruneConfig(pattern=number, sparsity=None)


# ---------------------------------------------------------------- help and docs
def test_help_lists_registries_and_keeps_the_continuations(capsys):
    from sparsecraft.criteria import method_names

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "uniform | global | erk | owl" in text
    for name in method_names():
        assert name in text
    assert "--allocation owl \\\n      --sparsity 0.6" in text


def test_readme_train_line_runs(tmp_path, monkeypatch, capsys):
    """README's `train examples/train.yaml --set method=gmp ...` line, shortened to a few steps."""
    root = Path(__file__).resolve().parent.parent
    line = next(l for l in (root / "README.md").read_text().splitlines()
                if l.startswith("sparsecraft train examples/train.yaml"))
    argv = line.split("#")[0].split()[1:]
    assert "method=gmp" in argv
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "train.yaml").write_text((root / "examples" / "train.yaml").read_text()
                                                       .replace("data: mnist ", "data: digits "))
    argv += ["--set", "steps=30", "--set", "checkpoint_every=30"]
    assert main(["-q", *argv]) == 0, capsys.readouterr().err
    assert "with gmp" in capsys.readouterr().out


# ---------------------------------------------------------------- subprocesses
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_python_m_sparsecraft_version():
    done = subprocess.run([sys.executable, "-m", "sparsecraft", "--version"], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip() == f"sparsecraft {sc.__version__}"


def test_closed_pipe_is_quiet(tmp_path):
    net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(50)])
    sc.save(net, tmp_path / "m.safetensors")
    proc = subprocess.Popen([sys.executable, "-m", "sparsecraft", "info", str(tmp_path / "m.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()  # the reader goes away before the first line (as `| head -0` would)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, tiny_llama_dir):
    script = textwrap.dedent(f"""
        import sys, time
        import sparsecraft.formats as formats
        from sparsecraft.cli import main
        original = formats.write_tensors
        def slow(*a, **k):
            original(*a, **k)
            print("staged", flush=True)
            time.sleep(120)
        formats.write_tensors = slow
        sys.exit(main(["-q", "prune", {str(tiny_llama_dir)!r}, "--out", {str(tmp_path / "out")!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), text=True)
    try:
        assert proc.stdout.readline().strip() == "staged"
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # the staging folder
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 143
    assert "interrupted (SIGTERM)" in _assert_one_line(err)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
