"""``sparsecraft recover`` and ``sparsecraft discover``, run in-process through ``cli.main``."""

import json

import numpy as np
import pytest
import torch

import sparsecraft.recovery as R
from sparsecraft.cli import main
from sparsecraft.recovery import discovery as D


def _run(argv):
    try:
        return main(["-q", *argv])
    except SystemExit as exc:  # argparse errors
        return exc.code


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _relerr(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture
def gaussian(tmp_path):
    """Noiseless y = A x with M=64, N=256, K=8, saved as .npy; returns the paths and (x, support)."""
    rng = np.random.default_rng(0)
    M, N, K = 64, 256, 8
    A = rng.standard_normal((M, N)) / np.sqrt(M)
    S = np.sort(rng.choice(N, K, replace=False))
    x = np.zeros(N)
    x[S] = rng.standard_normal(K) + np.sign(rng.standard_normal(K))
    paths = {name: tmp_path / f"{name}.npy" for name in ("A", "x", "y")}
    for name, value in (("A", A), ("x", x), ("y", A @ x)):
        np.save(paths[name], value)
    return paths, x, S


def _kron_problem(tmp_path, complex_, snr_db=None, seed=1):
    rng = np.random.default_rng(seed)
    fs = [rng.standard_normal((m, 10)) / np.sqrt(m) for m in (6, 7, 8)]
    if complex_:
        fs = [f + 1j * rng.standard_normal(f.shape) / np.sqrt(f.shape[0]) for f in fs]
    x = np.ones(1, dtype=complex if complex_ else float)
    for _ in fs:
        v = np.zeros(10, dtype=x.dtype)
        v[rng.choice(10, 2, replace=False)] = rng.standard_normal(2) + np.sign(rng.standard_normal(2))
        x = np.kron(x, v)
    y = R.KroneckerOperator(fs).matvec(torch.from_numpy(x)).numpy()
    if snr_db is not None:
        noise = rng.standard_normal(y.shape) + (1j * rng.standard_normal(y.shape) if complex_ else 0)
        y = y + noise * np.linalg.norm(y) / np.linalg.norm(noise) * 10 ** (-snr_db / 20)
    paths = [tmp_path / f"F{i}.npy" for i in range(len(fs))]
    for p, f in zip(paths, fs):
        np.save(p, f)
    np.save(tmp_path / "yk.npy", y)
    np.save(tmp_path / "xk.npy", x)
    return [str(p) for p in paths], x


def test_recover_omp_noiseless_gaussian_exact(gaussian, tmp_path, capsys):
    paths, x, S = gaussian
    out = tmp_path / "omp"
    assert _run(["recover", "--y", str(paths["y"]), "--A", str(paths["A"]), "--method", "omp", "--k", "8",
                 "--x-true", str(paths["x"]), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("recovered x (256) from y (64) with omp") and "support F1 1.000" in line
    assert _relerr(np.load(out / "x.npy"), x) < 1e-8
    result = json.loads((out / "result.json").read_text())
    assert result["support"] == S.tolist()
    assert result["method"] == "omp" and result["arguments"] == {"n_nonzero": 8}
    assert result["converged"] is True and result["n_iter"] == 8
    assert result["support_f1"] == 1.0 and result["nmse_db"] < -160
    assert result["seconds"] >= 0 and result["shape"] == {"M": 64, "N": 256, "B": None, "factors": None}
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "x.npy"]


@pytest.mark.parametrize("complex_,snr_db", [(False, None), (True, None), (False, 40.0)])
def test_recover_krosbl_three_factors(tmp_path, complex_, snr_db):
    factors, x = _kron_problem(tmp_path, complex_, snr_db)
    out = tmp_path / "kro"
    noise = ["--noise-var", "0", "--tol", "1e-8"] if snr_db is None else []
    assert _run(["recover", "--y", str(tmp_path / "yk.npy"), "--factors", *factors, "--method", "krosbl",
                 *noise, "--x-true", str(tmp_path / "xk.npy"), "--out", str(out)]) == 0
    est = np.load(out / "x.npy")
    assert est.dtype == (np.complex128 if complex_ else np.float64)
    assert _relerr(est, x) < (1e-3 if snr_db is None else 0.05)
    result = json.loads((out / "result.json").read_text())
    assert set(np.flatnonzero(x).tolist()) <= set(result["support"])
    assert result["shape"]["factors"] == [[6, 10], [7, 10], [8, 10]]
    assert "noise_var" in result and result["support_f1"] > 0.9


def test_recover_krosbl_passes_restart_options_and_a_warm_start(tmp_path, capsys):
    factors, x = _kron_problem(tmp_path, False, 40.0)
    out = tmp_path / "kro"
    assert _run(["recover", "--y", str(tmp_path / "yk.npy"), "--factors", *factors, "--method", "krosbl",
                 "--no-subset-restarts", "--restart-draws", "1", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["arguments"] == {"subset_restarts": False, "restart_draws": 1}
    truth = [sorted(set(t.tolist())) for t in np.nonzero(np.abs(x.reshape(10, 10, 10)))]
    lists = [",".join(map(str, t)) for t in truth]
    warm = tmp_path / "warm"
    assert _run(["recover", "--y", str(tmp_path / "yk.npy"), "--factors", *factors, "--method", "krosbl",
                 "--init-supports", *lists, "--restarts", "0", "--out", str(warm)]) == 0
    result = json.loads((warm / "result.json").read_text())
    assert result["arguments"]["init_supports"] == truth
    assert set(result["support"]) <= set(np.flatnonzero(x).tolist())
    capsys.readouterr()
    never = tmp_path / "never"
    assert _run(["recover", "--y", str(tmp_path / "yk.npy"), "--factors", *factors, "--method", "krosbl",
                 "--init-supports", *lists[:2], "--out", str(never)]) == 2
    message = _one_line_error(capsys)
    assert "--init-supports" in message and "one index list per factor (3), got 2" in message
    assert not never.exists()


def test_recover_kron_omp_batch_npz_and_csv_inputs(tmp_path, gaussian):
    factors, x = _kron_problem(tmp_path, False)
    y = np.load(tmp_path / "yk.npy")
    np.savez(tmp_path / "Y.npz", y=np.stack([y, 2 * y], axis=1))
    out = tmp_path / "komp"
    assert _run(["recover", "--y", str(tmp_path / "Y.npz"), "--factors", *factors, "--method", "kron_omp",
                 "--k", "2", "2", "2", "--out", str(out)]) == 0
    est = np.load(out / "x.npy")
    assert est.shape == (1000, 2)
    assert _relerr(est[:, 1], 2 * x) < 1e-8
    assert len(json.loads((out / "result.json").read_text())["support"]) == 2
    # the dense methods take --factors through the Kronecker operator; y as a one-column CSV
    np.savetxt(tmp_path / "y.csv", y[:, None], delimiter=",")
    assert _run(["recover", "--y", str(tmp_path / "y.csv"), "--factors", *factors, "--method", "omp",
                 "--k", "8", "--out", str(tmp_path / "omp")]) == 0
    assert _relerr(np.load(tmp_path / "omp" / "x.npy"), x) < 1e-8


def _lorenz_files(tmp_path):
    t, X, dX = D.lorenz63(3000, 0.002)  # classical RK4, sigma=10, rho=28, beta=8/3
    np.save(tmp_path / "X.npy", X.numpy())
    np.save(tmp_path / "dX.npy", dX.numpy())
    return X.numpy(), dX.numpy()


def test_discover_lorenz63_finds_the_seven_terms(tmp_path, capsys):
    _lorenz_files(tmp_path)
    out = tmp_path / "eqs"
    assert _run(["discover", "--data", str(tmp_path / "X.npy"), "--dt", "0.002", "--derivatives",
                 str(tmp_path / "dX.npy"), "--method", "stlsq", "--degree", "2", "--threshold", "0.5",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    data = json.loads((out / "coefficients.json").read_text())
    C = np.array(data["coefficients"])
    true = D.lorenz63_coefficients(data["feature_names"])
    np.testing.assert_array_equal(C != 0, true != 0)
    assert np.count_nonzero(C) == 7 == data["terms"]
    np.testing.assert_allclose(C, true, atol=1e-8)
    equations = (out / "equations.txt").read_text().splitlines()
    assert equations == printed[:3]
    assert equations[0] == "dx/dt = -10 x +10 y"


def test_discover_csv_header_names_and_computed_derivatives(tmp_path, capsys):
    X, _ = _lorenz_files(tmp_path)
    np.savetxt(tmp_path / "X.csv", X, delimiter=",", header="u,v,w", comments="")
    out = tmp_path / "eqs"
    assert _run(["discover", "--data", str(tmp_path / "X.csv"), "--dt", "0.002", "--window", "11",
                 "--out", str(out)]) == 0
    data = json.loads((out / "coefficients.json").read_text())
    assert data["states"] == ["u", "v", "w"] and "u w" in data["feature_names"]
    assert data["derivatives"].startswith("Savitzky-Golay")
    assert np.count_nonzero(data["coefficients"]) == 7
    assert capsys.readouterr().out.startswith("du/dt = ")


def _bad_inputs(tmp_path, paths):
    """(argv, words the one-line message must contain) for recover and discover."""
    y_nan = np.load(paths["y"])
    y_nan[3] = np.nan
    np.save(tmp_path / "y_nan.npy", y_nan)
    np.save(tmp_path / "y_short.npy", np.load(paths["y"])[:-1])
    np.save(tmp_path / "X3.npy", np.zeros((10, 3)))
    np.save(tmp_path / "dX2.npy", np.zeros((10, 2)))
    y, A = str(paths["y"]), str(paths["A"])
    return [
        (["recover", "--y", str(tmp_path / "y_short.npy"), "--A", A, "--method", "omp"], ["--A", "--y", "rows"]),
        (["recover", "--y", y, "--A", str(tmp_path / "missing.npy"), "--method", "omp"], ["--A", "no such file"]),
        (["recover", "--y", y, "--A", A, "--method", "krosbl"], ["--method krosbl", "--factors", "not --A"]),
        (["recover", "--y", str(tmp_path / "y_nan.npy"), "--A", A, "--method", "sbl"], ["--y", "NaN"]),
        (["recover", "--y", y, "--A", A, "--method", "omp", "--lam", "0.1"], ["--lam", "not used", "omp"]),
        (["recover", "--y", y, "--A", A, "--method", "sbl", "--no-subset-restarts"],
         ["--no-subset-restarts", "not used", "sbl"]),
        (["recover", "--y", y, "--A", A, "--method", "omp", "--init-supports", "1,x"], ["--init-supports", "indices"]),
        (["recover", "--y", y, "--A", A, "--method", "omp", "--k", "0"], ["--k", ">= 1"]),
        (["recover", "--y", y, "--A", A, "--method", "block_sbl", "--blocks", "7"], ["--blocks 7", "divide"]),
        (["recover", "--y", y, "--A", A, "--method", "omp", "--x-true", y], ["--x-true", "shape"]),
        (["recover", "--y", y, "--factors", A, A, "--method", "krosbl"], ["--factors", "--y"]),
        (["discover", "--data", str(tmp_path / "X3.npy"), "--derivatives", str(tmp_path / "dX2.npy")],
         ["--derivatives", "shape"]),
        (["discover", "--data", str(tmp_path / "X3.npy")], ["--dt"]),
        (["discover", "--data", str(tmp_path / "X3.npy"), "--dt", "0.1", "--names", "a,b"], ["--names", "3 columns"]),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, gaussian, capsys):
    paths, _, _ = gaussian
    for argv, words in _bad_inputs(tmp_path, paths):
        out = tmp_path / "never"
        assert _run([*argv, "--out", str(out)]) == 2, argv
        message = _one_line_error(capsys)
        assert message.startswith(f"sparsecraft {argv[0]}: error: "), message
        for word in words:
            assert word in message, (word, message)
        assert not out.exists(), argv


def test_existing_results_are_kept_without_overwrite(gaussian, tmp_path, capsys):
    paths, _, _ = gaussian
    out = tmp_path / "o"
    out.mkdir()
    (out / "x.npy").write_bytes(b"keep")
    argv = ["recover", "--y", str(paths["y"]), "--A", str(paths["A"]), "--method", "omp", "--k", "8", "--out", str(out)]
    assert _run(argv) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert (out / "x.npy").read_bytes() == b"keep" and not (out / "result.json").exists()
    assert _run([*argv, "--overwrite"]) == 0
    assert np.load(out / "x.npy").shape == (256,)
