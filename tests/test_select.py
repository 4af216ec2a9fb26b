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
