"""Issue 12 (training): recipes that cannot lie, checkpoints that cannot be forged by accident,
and the README's "Training sparse" calls, each run as written."""

import io
import os
import pickle
import stat

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsecraft as sc
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError, FormatError
from sparsecraft.train import GMP, IMP, SET, SRSTE, DecayingNM, RigL, StaticSparsity, sparse_soup
from sparsecraft.train.checkpoints import read_checkpoint, write_checkpoint
from sparsecraft.train.runner import METHODS, TrainRecipe, run_training

BASE = {"data": "digits", "model": "lenet300", "steps": 8, "batch_size": 32, "checkpoint_every": 4}


def recipe(**fields):
    return TrainRecipe(**{**BASE, **fields})


# -- 1. schedules are checked against the run's length ----------------------------------------
@pytest.mark.parametrize("fields,names", [
    ({"method": "gmp", "sparsity": 0.8, "options": {"end": 20}}, ["options.end", "steps = 8"]),
    ({"method": "gmp", "sparsity": 0.8, "options": {"end": 2.5}}, ["options.end"]),
    ({"method": "gmp", "sparsity": 0.8, "options": {"end": 0.0}}, ["options.end"]),
    ({"method": "gmp", "sparsity": 0.8, "options": {"start": 6, "end": 4}}, ["options.start"]),
    ({"method": "gmp", "sparsity": 0.8, "options": {"start": 1, "end": 5, "frequency": 9}}, ["options.frequency"]),
    ({"method": "imp", "sparsity": 0.8, "options": {"rewind_step": 8}}, ["options.rewind_step"]),
    ({"method": "imp", "sparsity": 0.8, "options": {"rounds": 0}}, ["options.rounds"]),
    ({"method": "rigl", "sparsity": 0.8, "options": {"end": 9}}, ["options.end"]),
    ({"method": "set", "sparsity": 0.8, "options": {"update_every": 6, "end": 6}}, ["options.update_every"]),
    ({"method": "decaying-nm", "pattern": "1:4", "options": {"end": 12}}, ["options.end"]),
    ({"method": "decaying-nm", "pattern": "1:4", "options": {"stages": [[0, "2:4"], [9, "1:4"]]}},
     ["options.stages[1]"]),
])
def test_schedule_that_cannot_finish_within_steps_is_refused_before_training(fields, names):
    with pytest.raises(ConfigError) as info:
        recipe(**fields)
    for name in names:
        assert name in str(info.value)


def test_gmp_end_beyond_steps_never_reports_a_finished_dense_run(tmp_path):
    with pytest.raises(ConfigError, match="options.end"):
        run_training(TrainRecipe.from_dict({**BASE, "method": "gmp", "sparsity": 0.8, "options": {"end": 100}}),
                     tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before any folder or file


def test_python_gmp_that_ends_at_step_zero_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="end"):
        GMP(model, 0.5, 0, 0)  # would never prune: sparsity.step() counts from step 1


def test_a_valid_schedule_still_reaches_its_target(tmp_path):
    result = run_training(recipe(method="gmp", sparsity=0.8, options={"start": 0.25, "end": 1.0}),
                          progress=False)
    assert result["finished"] and result["sparsity"] == pytest.approx(0.8, abs=1e-3)


# -- 2. training checkpoints: checksum, weights_only, validated before anything changes -------
@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    r = recipe(method="gmp", sparsity=0.8, options={"start": 1, "end": 6, "frequency": 2})
    run_training(r, out, progress=False, stop_after=4)
    return r, out, (out / "checkpoint.pt").read_bytes()


def _resume_fails(r, out, match, error=FormatError):
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(error, match=match) as info:
        run_training(r, out, progress=False)
    assert "\n" not in str(info.value) and "checkpoint.pt" in str(info.value)
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing overwritten
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()


@pytest.mark.parametrize("where", [0, 10, 40, 0.5, -1])
def test_a_flipped_byte_anywhere_is_detected(tmp_path, partial_run, where):
    r, _, data = partial_run
    out = tmp_path / "run"
    out.mkdir()
    i = int(where * len(data)) if isinstance(where, float) else where % len(data)
    damaged = bytearray(data)
    damaged[i] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(damaged))
    _resume_fails(r, out, "checkpoint")


def _forged(tmp_path, partial_run, change):
    """A checkpoint with a correct checksum over edited content (as a buggy writer could make)."""
    r, src, _ = partial_run
    state = read_checkpoint(src / "checkpoint.pt")
    change(state)
    out = tmp_path / "run"
    out.mkdir(parents=True)
    write_checkpoint(out / "checkpoint.pt", state)
    return r, out


def test_resume_refuses_a_step_beyond_the_run(tmp_path, partial_run):
    def far(state):
        state["step"] = 10**9
        state["sparsity"]["step"] = 10**9

    _resume_fails(*_forged(tmp_path, partial_run, far), "step 1000000000 is outside")


def test_resume_refuses_nan_weights(tmp_path, partial_run):
    def nan(state):
        state["model"]["hidden.0.weight"][0, 0] = float("nan")

    _resume_fails(*_forged(tmp_path, partial_run, nan), "NaN")


def test_resume_refuses_wrong_shapes(tmp_path, partial_run):
    def shape(state):
        state["model"]["head.weight"] = torch.zeros(3, 3)

    _resume_fails(*_forged(tmp_path, partial_run, shape), "head.weight")


def test_resume_refuses_bad_optimizer_state_and_masks(tmp_path, partial_run):
    def momentum(state):
        state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(2, 2)

    _resume_fails(*_forged(tmp_path / "a", partial_run, momentum), "optimizer state")

    def mask(state):
        masks = state["sparsity"]["masks"]["masks"]
        name = next(iter(masks))
        masks[name] = masks[name][:1]

    _resume_fails(*_forged(tmp_path / "b", partial_run, mask), "mask")


def test_resume_refuses_another_recipe_with_a_clear_choice(tmp_path, partial_run):
    r, out = _forged(tmp_path, partial_run, lambda s: None)
    other = TrainRecipe(**{**r.to_dict(), "lr": 0.01})
    _resume_fails(other, out, r"different recipe \(differs in \['lr'\]\).*--no-resume", ConfigError)
    # the explicit choice: start over
    assert run_training(other, out, progress=False, resume=False)["finished"]


def test_checkpoint_without_checksum_or_with_code_is_refused(tmp_path, partial_run):
    r, src, _ = partial_run
    state = read_checkpoint(src / "checkpoint.pt")
    out = tmp_path / "run"
    out.mkdir()
    torch.save(state, out / "checkpoint.pt")  # the old, checksum-less format
    _resume_fails(r, out, "older sparsecraft without checksums")

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > boom.txt",))

    buffer = io.BytesIO()
    torch.save({**state, "recipe": Boom()}, buffer, pickle_module=pickle)
    payload = buffer.getvalue()
    import hashlib
    import json

    from sparsecraft.train.checkpoints import MAGIC
    header = json.dumps({"version": 1, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    (out / "checkpoint.pt").write_bytes(MAGIC + header.encode() + b"\n" + payload)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        _resume_fails(r, out, "cannot be read")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "boom.txt").exists()


def test_cli_resume_of_a_damaged_checkpoint_is_one_line_exit_2(tmp_path, partial_run, capsys):
    r, _, data = partial_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 0x80]))
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(r.to_dict()))
    capsys.readouterr()
    assert main(["-q", "train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "checksum" in err and "checkpoint.pt" in err and len(err.splitlines()) == 1


# -- 3. files honour the umask ------------------------------------------------------------
def test_training_outputs_follow_the_umask(tmp_path):
    from sparsecraft.formats import io as fio

    old_umask, old_cached = os.umask(0o002), fio._UMASK
    fio._UMASK = 0o002
    try:
        out = tmp_path / "run"
        run_training(recipe(method="static", sparsity=0.5), out, progress=False)
    finally:
        os.umask(old_umask)
        fio._UMASK = old_cached
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    for name in ("checkpoint.pt", "model.safetensors", "report.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name


# -- 4. recipe fields of the wrong type -----------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("steps", "ten"), ("lr", [1]), ("sparsity", True), ("seed", 1.5), ("seed", -1), ("momentum", "high"),
    ("weight_decay", None), ("batch_size", 2.0), ("data", 3), ("options", [1]),
])
def test_recipe_field_of_the_wrong_type_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainRecipe.from_dict({**BASE, "method": "static", field: value})


@pytest.mark.parametrize("field,value", [
    ("fraction", "lots"), ("end", "late"), ("update_every", 2.5), ("decay", 3), ("allocation", "owl?"),
])
def test_method_option_of_the_wrong_type_names_the_option(field, value):
    with pytest.raises(ConfigError, match=f"options.{field}"):
        recipe(method="rigl", sparsity=0.8, options={"update_every": 2, "end": 6, field: value})


def test_unquoted_yaml_pattern_is_read_as_text_and_a_number_is_refused(tmp_path):
    """Recipe files go through the loader that keeps 2:4 as text; a number that reaches the
    recipe anyway (a dict from plain yaml.safe_load, which reads 2:4 as 124) is refused."""
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text("data: digits\nmodel: mlp\nmethod: srste\nsparsity: null\npattern: 2:4\nsteps: 8\n")
    assert TrainRecipe.from_yaml(path).pattern == "2:4"
    fields = yaml.safe_load(path.read_text())
    assert fields["pattern"] == 124
    with pytest.raises(ConfigError, match="pattern.*124.*quote"):
        TrainRecipe.from_dict(fields)
    path.write_text('data: digits\nmethod: decaying-nm\npattern: "1:4"\nsteps: 8\n'
                    "options:\n  stages: [[0, 2:4], [4, \"1:4\"]]\n")
    assert TrainRecipe.from_yaml(path).options["stages"][0][1] == "2:4"
    with pytest.raises(ConfigError, match=r"stages\[0\].*quote"):
        TrainRecipe.from_dict(yaml.safe_load(path.read_text()))


# -- 5. the README's "Training sparse" calls, as written -------------------------------------
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _steps(model, sparsity, opt, n):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sparsity.step()


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.05)


def _sparsity(model):
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_readme_training_calls_run_as_documented(tmp_path):
    start, end, frequency, update_every = 2, 10, 2, 3
    rounds, round_steps, rewind_step = 2, 4, 1

    model = _mlp(); opt = _opt(model)  # noqa: E702
    rigl = sc.train.RigL(model, sparsity=0.9, optimizer=opt, update_every=100, end=7500)
    _steps(model, rigl, opt, 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rigl": rigl.state_dict()}, tmp_path / "ckpt.pt")
    rigl.finalize_()

    for cls in (SET, RigL):
        model = _mlp(); opt = _opt(model)  # noqa: E702
        s = cls(model, 0.9, update_every, end, fraction=0.3, decay="cosine")
        s.attach_optimizer(opt)
        _steps(model, s, opt, end)
        assert s.sparsity() == pytest.approx(0.9, abs=0.01)
        s.finalize_()

    for criterion in ("random", "snip", "magnitude"):
        model = _mlp()
        extra = {"loss_fn": lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                 "batches": [(torch.randn(8, 16), torch.randint(0, 8, (8,)))]} if criterion == "snip" else {}
        s = StaticSparsity(model, 0.9, criterion=criterion, allocation="erk", **extra)
        assert s.sparsity() == pytest.approx(0.9, abs=0.01)
    pruned = s.finalize_()
    assert StaticSparsity(pruned, criterion="existing").sparsity() == pytest.approx(0.9, abs=0.01)

    model = _mlp(); opt = _opt(model)  # noqa: E702
    gmp = GMP(model, 0.9, start, end, frequency)
    _steps(model, gmp, opt, end)
    assert gmp.sparsity() == pytest.approx(0.9, abs=0.01)

    model = _mlp(); opt = _opt(model)  # noqa: E702
    imp = IMP(model, 0.9, rounds, round_steps, rewind_step)
    _steps(model, imp, opt, (rounds + 1) * round_steps)
    assert imp.sparsity() == pytest.approx(0.9, abs=0.01) and isinstance(imp.schedule_step, int)

    model = _mlp(); opt = _opt(model)  # noqa: E702
    srste = SRSTE(model, "2:4", decay=2e-4)
    _steps(model, srste, opt, 2)
    assert srste.sparsity() == pytest.approx(0.5)
    srste.finalize_()

    model = _mlp(); opt = _opt(model)  # noqa: E702
    dnm = DecayingNM(model, "1:8", end=6, tighten=True)
    _steps(model, dnm, opt, 6)
    assert dnm.sparsity() == pytest.approx(7 / 8)
    dnm.finalize_()

    pruned = _mlp()
    StaticSparsity(pruned, 0.5, criterion="magnitude").finalize_()

    def retrain(m, seed, round):
        o = _opt(m)
        s = StaticSparsity(m, criterion="existing", optimizer=o)
        _steps(m, s, o, 2)
        return s.finalize_()

    soup, ingredients = sparse_soup(pruned, retrain, seeds=[0, 1, 2], rounds=1)
    assert len(ingredients[0]) == 3 and float((soup[0].weight == 0).float().mean()) == pytest.approx(0.5)


def test_rigl_with_the_optimizer_as_third_argument_says_how_to_pass_it():
    model = _mlp()
    with pytest.raises(ConfigError, match="optimizer=opt"):
        RigL(model, 0.9, _opt(model), end=10)


# -- 6. the runner has no list of method names -----------------------------------------------
def test_methods_come_from_the_registry():
    import inspect

    import sparsecraft.train.iso_flop  # noqa: F401 - registers the sparse-ift-* methods (whatever ran before)
    from sparsecraft.train import loop, registry, runner
    from sparsecraft.train import recipe as recipe_module

    assert set(METHODS) == {"dense", "static", "snip", "gmp", "imp", "set", "rigl", "srste", "decaying-nm",
                            "vi", "vd", "ard", "ssvi", "turbo-vbi",  # these five: sparsecraft.bayes
                            "sparse-ift-wide", "sparse-ift-parallel", "sparse-ift-factorized", "sparse-ift-doped"}
    assert METHODS == registry.method_names()
    for module in (runner, loop, recipe_module):
        source = inspect.getsource(module)
        assert '"rigl"' not in source and '"gmp"' not in source and '"imp"' not in source, module.__name__


def test_python_objects_refuse_schedules_that_do_nothing():
    with pytest.raises(ConfigError, match="update_every"):
        SET(_mlp(), 0.9, 10, 10)
    with pytest.raises(ConfigError, match="rewind_step"):
        IMP(_mlp(), 0.9, 2, 4, 1.5)


@pytest.mark.parametrize("line,field", [
    ("seed: 1.5", "seed"), ("steps: ten", "steps"), ("lr: [1]", "lr"), ("sparsity: true", "sparsity"),
    ("pattern: 2:40:1\nmethod: srste", "pattern"), ("options: {end: 50}\nmethod: gmp", "options.end"),
])
def test_cli_train_bad_recipe_field_is_one_line_exit_2(tmp_path, capsys, line, field):
    path = tmp_path / "r.yaml"
    path.write_text(f"data: digits\nsteps: 8\n{line}\n")
    assert main(["-q", "train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
