"""Sparse-IFT: equal FLOPs per transformation, shapes, exact sparsity under RigL, training,
state round trips, recipes and bad input."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsecraft.cli import main
from sparsecraft.errors import ConfigError, TargetError
from sparsecraft.report import report
from sparsecraft.train import SET, RigL, StateMismatch, StaticSparsity, to_sparse_ift_
from sparsecraft.train.iso_flop import SparseDoped, SparseFactorized, SparseParallel
from sparsecraft.train.runner import TrainRecipe, run_training
from sparsecraft.train.zoo import MLP

from conftest import SmallCNN, assert_unchanged, snapshot

TRANSFORMS = ("wide", "parallel", "factorized", "doped")
EVERY_LAYER = {"include_head": True}  # count the head too: the whole model's FLOPs


class BNNet(nn.Module):
    """Two convs with BatchNorm and pooling, flatten into two Linears."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 3 * 3, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 10x10 -> 5x5
        x = F.relu(self.bn2(self.conv2(x)))  # 3x3
        return self.head(F.relu(self.fc(x.flatten(1))))


def mlp():
    torch.manual_seed(0)
    return MLP(24, (48, 32), 4)


def cnn():
    torch.manual_seed(0)
    return BNNet()


MODELS = {"mlp": (mlp, lambda: torch.randn(8, 1, 24)), "cnn": (cnn, lambda: torch.randn(8, 1, 10, 10))}


def flops(model, x):
    return report(model, example_input=x, targets=EVERY_LAYER).totals["effective_flops"]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("sparsity", [0.75, 0.9])
def test_flops_equal_dense_and_shapes_are_kept(kind, transform, sparsity):
    build, example = MODELS[kind]
    torch.manual_seed(1)
    x = example()
    dense = build()
    model = build()
    result = to_sparse_ift_(model, transform, sparsity)
    assert result.model is model  # in place on the module tree
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rigl = result.dst("rigl", update_every=5, end=20, optimizer=opt)
    assert model(x).shape == dense(x).shape
    before, after = flops(dense, x), flops(model, x)
    assert abs(after / before - 1) < 0.02, (before, after)
    # the kept counts are exact integers: the FLOPs are equal, not just close
    assert after == before
    assert rigl.masks  # the masks sit on the new layers
    assert all(name in dict(model.named_parameters()) for name in rigl.masks)


def test_wide_widens_between_targets_only_and_says_why():
    model = mlp()  # 24 -> 48 -> 32 -> 4; the head is not a target by default
    result = to_sparse_ift_(model, "wide", 0.75)  # k = 2
    assert model.hidden[0].weight.shape == (96, 24) and model.hidden[1].weight.shape == (32, 96)
    assert model.head.weight.shape == (4, 32)  # its input stays: widening it would add dense FLOPs
    assert "read by head, not a target" in result.kept["hidden.1"]
    assert result.layer_sparsity == {"hidden.0.weight": 0.5, "hidden.1.weight": 0.5}
    # with the head a target both hidden widths grow; the middle layer has both sides widened
    model = mlp()
    result = to_sparse_ift_(model, "wide", 0.75, targets=EVERY_LAYER)
    assert [tuple(l.weight.shape) for l in (*model.hidden, model.head)] == [(96, 24), (64, 96), (4, 64)]
    assert result.layer_sparsity["hidden.1.weight"] == pytest.approx(0.75)
    assert "hidden.0" in str(result) and "48 -> 96" in str(result)


def test_wide_follows_channels_through_batchnorm_and_flatten():
    model = cnn()
    x = torch.randn(4, 1, 10, 10)
    to_sparse_ift_(model, "wide", 0.75)
    assert model.conv1.out_channels == 16 and model.bn1.num_features == 16
    assert model.conv2.weight.shape == (24, 16, 3, 3) and model.bn2.num_features == 24
    assert model.fc.in_features == 24 * 9 and model.fc.out_features == 32
    assert model(x).shape == (4, 10)


def test_the_other_transformations_build_their_structures():
    model = mlp()
    to_sparse_ift_(model, "parallel", 0.75)
    assert isinstance(model.hidden[0], SparseParallel) and len(model.hidden[0].branches) == 4
    model = mlp()
    result = to_sparse_ift_(model, "factorized", 0.9)
    layer = model.hidden[1]  # 48 -> 32: rank 48 * 32 / (0.1 * 80) = 192
    assert isinstance(layer, SparseFactorized) and layer.u.out_features == 192
    assert sum(result.keep.values()) == 24 * 48 + 48 * 32  # the dense counts, split over u and v
    model = cnn()
    result = to_sparse_ift_(model, "doped", 0.75)
    assert isinstance(model.conv2, SparseDoped)
    # only the sparse part is a target; the low-rank pair (the share s of the FLOPs) stays dense
    assert [t.name for t in result.targets] == ["conv1.sparse.weight", "conv2.sparse.weight", "fc.sparse.weight"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("method", [RigL, SET])
def test_exact_sparsity_after_dst_updates_and_training_lowers_the_loss(transform, method):
    torch.manual_seed(0)
    x = torch.randn(256, 24)
    y = (x @ torch.randn(24, 4)).argmax(1)  # a linear teacher: every structure can learn it
    model = mlp()
    result = to_sparse_ift_(model, transform, 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = result.dst(method, update_every=4, end=40, optimizer=opt, seed=3)
    losses = []
    for step in range(60):
        xb, yb = x[(step * 32) % 256:][:32], y[(step * 32) % 256:][:32]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        event = dst.step()
        if step == 3:
            assert event.get("updated") and event["moved"] > 0  # the masks did move
        losses.append(loss.item())
        for t in result.targets:  # every new layer keeps its exact count, update or not
            keep = dst.masks[t.name]
            assert int(keep.sum()) == result.keep[t.name]
            assert not t.param[~keep].any()
    assert dst.layer_sparsity() == result.layer_sparsity
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_state_dict_round_trip(transform):
    torch.manual_seed(0)
    x = torch.randn(64, 24)
    y = torch.randint(0, 4, (64,))
    model = mlp()
    result = to_sparse_ift_(model, transform, 0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = result.dst("rigl", update_every=3, end=12, optimizer=opt)
    for step in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x[step * 8:][:8]), y[step * 8:][:8]).backward()
        opt.step()
        rigl.step()
    # the same transformation of a fresh model takes the trained state back exactly
    # (sparsity object first: building it applies its own initial masks; then the states)
    again = mlp()
    result2 = to_sparse_ift_(again, transform, 0.75)
    opt2 = torch.optim.SGD(again.parameters(), lr=0.05, momentum=0.9)
    rigl2 = result2.dst("rigl", update_every=3, end=12, optimizer=opt2)
    again.load_state_dict(model.state_dict())
    rigl2.load_state_dict(rigl.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert rigl2.step_count == 7
    for name in rigl.masks:
        assert torch.equal(rigl.masks[name], rigl2.masks[name])
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # a state from another transformation does not fit
    other = mlp()
    rigl3 = to_sparse_ift_(other, "wide" if transform != "wide" else "parallel", 0.75).dst("rigl", 3, 12)
    with pytest.raises(StateMismatch, match="different model"):
        rigl3.load_state_dict(rigl.state_dict())


# -- bad input: clear errors, model unchanged ------------------------------------------------
@pytest.mark.parametrize("kwargs,error,message", [
    ({"transform": "deep"}, ConfigError, "unknown Sparse-IFT transformation 'deep'; known: wide, parallel"),
    ({"sparsity": 0.0}, ConfigError, r"must be a number in \(0, 1\), got 0.0"),
    ({"sparsity": 1.0}, ConfigError, r"must be a number in \(0, 1\), got 1.0"),
    ({"sparsity": "0.5"}, ConfigError, r"must be a number in \(0, 1\)"),
    ({"targets": {"include": ["encoder.*"]}}, TargetError, "include rule 'encoder.\\*' matches no parameter"),
    ({"targets": {"param_names": ["bias"]}}, TargetError, "is not a weight"),
])
def test_bad_input_is_refused_and_the_model_is_unchanged(kwargs, error, message):
    model = mlp()
    before = snapshot(model)
    structure = str(model)
    args = {"transform": "wide", "sparsity": 0.75, **kwargs}
    with pytest.raises(error, match=message):
        to_sparse_ift_(model, args.pop("transform"), args.pop("sparsity"), **args)
    assert_unchanged(model, before)
    assert str(model) == structure


def test_layers_it_cannot_transform_are_named():
    model = SmallCNN()  # holds a Conv1d among the default targets
    before, structure = snapshot(model), str(model)
    with pytest.raises(TargetError, match="layer 'conv1d' is a Conv1d: Sparse-IFT transforms nn.Linear and nn.Conv2d"):
        to_sparse_ift_(model, "parallel", 0.75)
    assert_unchanged(model, before)
    assert str(model) == structure
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(TargetError, match=r"layer '0' is a grouped conv \(groups=2\)"):
        to_sparse_ift_(grouped, "doped", 0.75)
    shared = nn.Linear(8, 8)
    tied = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 2))
    with pytest.raises(TargetError, match="also registered as '2'"):
        to_sparse_ift_(tied, "factorized", 0.75)


def test_wide_with_nothing_to_widen_and_open_masks_are_errors():
    single = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    before = snapshot(single)
    with pytest.raises(TargetError, match="sparse wide: no hidden width lies between two target layers"):
        to_sparse_ift_(single, "wide", 0.75)  # the only hidden width feeds the head, not a target
    assert_unchanged(single, before)
    model = mlp()
    StaticSparsity(model, 0.5)
    with pytest.raises(ConfigError, match="masks attached"):
        to_sparse_ift_(model, "wide", 0.75)
    result = to_sparse_ift_(mlp(), "wide", 0.75)
    with pytest.raises(ConfigError, match="sets \\['allocation'\\] itself"):
        result.dst("rigl", 2, 10, allocation="erk")
    with pytest.raises(ConfigError, match="trains with rigl, set"):
        result.dst("gmp", 2, 10)


# -- recipes and the CLI -----------------------------------------------------------------------
def test_recipe_trains_a_transformed_model_and_resumes(tmp_path):
    recipe = TrainRecipe(data="digits", model="mlp", method="sparse-ift-wide", sparsity=0.75, steps=40,
                         batch_size=32, checkpoint_every=20, options={"update_every": 5})
    full = run_training(recipe, tmp_path / "full", progress=False, return_model=True)
    assert full["finished"] and full["test_accuracy"] > 0.5
    assert full["model"].hidden[0].weight.shape == (512, 64)
    # the report of the run counts the sparse layers at their dense-equivalent FLOPs
    assert full["flops_effective"] < full["flops_dense"]
    part = run_training(recipe, tmp_path / "part", progress=False, stop_after=20)
    assert part["step"] == 20
    resumed = run_training(recipe, tmp_path / "part", progress=False, return_model=True)
    for a, b in zip(full["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fields,message", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \(0, 1\), got 1.0"),
    ({"sparsity": None}, r"needs a sparsity"),
    ({"options": {"dst": "gmp"}}, "options.dst must be one of rigl, set"),
    ({"options": {"allocation": "erk"}}, "do not apply to 'sparse-ift-wide'"),
    ({"options": {"targets": {"include": 3}}}, "options.targets.include must be a rule"),
    ({"options": {"targets": {"layers": []}}}, r"options.targets: unknown keys \['layers'\]"),
])
def test_recipe_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainRecipe(data="digits", method="sparse-ift-wide", **{"sparsity": 0.75, **fields})


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nmodel: mlp\nmethod: sparse-ift-doped\nsparsity: 0.75\nsteps: 200\n")
    for override, message in (("sparsity=1.5", "sparsity must be a number in (0, 1)"),
                              ("options={targets: {include: [nothing.*]}}", "include rule 'nothing.*' matches no")):
        out = tmp_path / "run"
        assert main(["-q", "train", str(recipe), "--out", str(out), "--set", override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
        assert not out.exists()


def test_every_transformation_is_a_recipe_method():
    from sparsecraft.train.runner import METHODS

    for name in TRANSFORMS:
        assert f"sparse-ift-{name}" in METHODS
    recipe = TrainRecipe(data="digits", method="sparse-ift-parallel", sparsity=0.5, steps=200)
    model = copy.deepcopy(mlp())
    model2, result = recipe.plan().prepare(model)
    assert model2 is model and result.transform == "parallel"
