"""QuickSelection: ranks informative features first, truly sparse, a Pipeline step, clear errors."""

import numpy as np
import pytest

from sparsecraft.errors import ConfigError
from sparsecraft.select import QuickSelection


def _data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    mix = np.array([[1, 0], [0, 1], [1, 1], [1, -1], [0.5, 1.5]])
    informative = z @ mix.T + 0.1 * rng.normal(size=(n, 5))  # 5 features driven by 2 latent factors
    X = np.column_stack([rng.normal(size=(n, 50)), informative, rng.normal(size=(n, 50))])
    return X, (z[:, 0] > 0).astype(int)


def test_ranks_the_five_informative_features_first():
    X, _ = _data()
    qs = QuickSelection(n_features_to_select=5, hidden=5, epsilon=5, epochs=60, random_state=0).fit(X)
    assert sorted(qs.get_support(indices=True).tolist()) == [50, 51, 52, 53, 54]
    assert qs.feature_importances_.shape == (105,)
    assert set(qs.ranking_[:5].tolist()) == {50, 51, 52, 53, 54}
    assert qs.transform(X).shape == (600, 5)
    again = QuickSelection(n_features_to_select=5, hidden=5, epsilon=5, epochs=60, random_state=0).fit(X)
    assert np.array_equal(again.feature_importances_, qs.feature_importances_)  # seeded


def test_weights_are_truly_sparse_on_20000_features():
    # densely, two 20000 x 20000 layers would need 3.2 GB of weights; stored sparse they hold
    # epsilon * (20000 + 20000) connections each
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 20_000)).astype(np.float32)
    qs = QuickSelection(n_features_to_select=100, hidden=20_000, epsilon=2, epochs=2, batch_size=32,
                        random_state=0).fit(X)
    assert qs.n_connections_ == 2 * 2 * 40_000
    stored = sum(t.numel() for layer in (qs.encoder_, qs.decoder_)
                 for t in (layer.rows, layer.cols, layer.values, layer.bias))
    assert stored == 3 * qs.n_connections_ + 20_000 + 20_000  # rows, cols, values; two biases
    assert stored < 2 * 20_000 * 20_000 / 1000
    assert qs.transform(X).shape == (64, 100)


def test_works_as_a_pipeline_step():
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.pipeline import Pipeline

    X, y = _data()
    pipe = Pipeline([("select", QuickSelection(n_features_to_select=5, hidden=5, epsilon=5, epochs=60)),
                     ("clf", ExtraTreesClassifier(n_estimators=20, random_state=0))])
    pipe.fit(X[:400], y[:400])
    assert pipe.score(X[400:], y[400:]) > 0.8


def test_bad_input_is_a_clear_error():
    X, _ = _data(n=50)
    with pytest.raises(ConfigError, match="only 105 features"):
        QuickSelection(n_features_to_select=200).fit(X)
    bad = X.copy()
    bad[3, 7] = np.nan
    with pytest.raises(ConfigError, match="row 3, column 7"):
        QuickSelection(n_features_to_select=5).fit(bad)
    with pytest.raises(ConfigError, match="numbers only"):
        QuickSelection(n_features_to_select=1).fit([["a", "b"], ["c", "d"]])
    with pytest.raises(ConfigError, match="zeta"):
        QuickSelection(n_features_to_select=5, zeta=1.5).fit(X)
    qs = QuickSelection(n_features_to_select=5, hidden=5, epochs=1).fit(X)
    with pytest.raises(ConfigError, match="fitted on 105"):
        qs.transform(X[:, :10])


def test_cli_selects_from_csv_and_refuses_bad_files(tmp_path, capsys):
    import json

    from sparsecraft.cli import main

    X, _ = _data(n=200)
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    out = tmp_path / "sel"
    assert main(["select", "--data", str(tmp_path / "x.csv"), "--k", "5", "--hidden", "5", "--epsilon", "5",
                 "--epochs", "5", "--out", str(out)]) == 0
    result = json.loads((out / "selection.json").read_text())
    assert len(result["selected"]) == 5 and np.load(out / "selected.npy").shape == (200, 5)
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n")
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n")
    for name, k, message in (("bad.csv", "1", "cannot be read"), ("nan.csv", "1", "NaN"),
                             ("x.csv", "500", "only 105 features")):
        code = main(["select", "--data", str(tmp_path / name), "--k", k, "--out", str(tmp_path / f"o-{name}")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / f"o-{name}").exists()


@pytest.mark.parametrize("scale,blind", [("standard", True), ("minmax", True), ("none", False)])
def test_scaling_makes_the_ranking_blind_to_feature_units(scale, blind):
    X, _ = _data(n=300)
    rng = np.random.default_rng(1)
    rescaled = X * rng.uniform(0.01, 100.0, size=X.shape[1]) + rng.uniform(-50.0, 50.0, size=X.shape[1])
    kw = dict(n_features_to_select=5, hidden=5, epsilon=5, epochs=3, scale=scale, random_state=0)
    a = QuickSelection(**kw).fit(X).feature_importances_
    b = QuickSelection(**kw).fit(rescaled).feature_importances_
    assert np.allclose(a, b, rtol=1e-3, atol=1e-6) == blind


def test_minmax_keeps_a_rare_spike_from_dominating():
    # feature 0 is zero but on 2 of 400 rows; standardised, those rows read about 14 standard
    # deviations, and reconstructing them pulls connections to the feature
    X, _ = _data(n=400)
    X[:, 0] = 0.0
    X[:2, 0] = 1.0
    kw = dict(n_features_to_select=5, hidden=5, epsilon=5, epochs=60, random_state=0)
    rank = {s: list(QuickSelection(**kw, scale=s).fit(X).ranking_).index(0) for s in ("standard", "minmax")}
    assert rank["minmax"] > rank["standard"]


def test_cli_scale_option(tmp_path, capsys):
    import json

    from sparsecraft.cli import main

    X, _ = _data(n=100)
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "sel"
    assert main(["select", "--data", str(tmp_path / "x.npy"), "--k", "5", "--hidden", "5", "--epochs", "2",
                 "--scale", "minmax", "--out", str(out)]) == 0
    assert json.loads((out / "selection.json").read_text())["settings"]["scale"] == "minmax"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal: one line, exit code 2
        main(["select", "--data", str(tmp_path / "x.npy"), "--k", "5", "--scale", "robust",
              "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--scale" in err[0], err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="scale must be one of standard, minmax, none"):
        QuickSelection(n_features_to_select=1, scale="robust").fit(X)
