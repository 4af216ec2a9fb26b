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
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "sparsecraft-output.json", "x.npy"]


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
    argv = ["recover", "--y", str(paths["y"]), "--A", str(paths["A"]), "--method", "omp", "--k", "8", "--out", str(out)]
    assert _run(argv) == 0
    (out / "x.npy").write_bytes(b"keep")
    assert _run(argv) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert (out / "x.npy").read_bytes() == b"keep"
    assert _run([*argv, "--overwrite"]) == 0  # our own output folder (it holds the marker)
    assert np.load(out / "x.npy").shape == (256,)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "x.npy").write_bytes(b"user data")
    assert _run([*argv[:-1], str(foreign), "--overwrite"]) == 2  # not a sparsecraft output
    assert "not a sparsecraft output" in _one_line_error(capsys)
    assert (foreign / "x.npy").read_bytes() == b"user data" and len(list(foreign.iterdir())) == 1


# ---------------------------------------------------------------- sizes from files (issue 12, defect 3)
def _npy_claiming(path, shape, dtype="<f8", payload=b"\0" * 64):
    """A .npy file whose header announces ``shape`` but which holds only ``payload``."""
    from numpy.lib import format as npformat

    with open(path, "wb") as fh:
        npformat.write_array_header_1_0(fh, {"descr": dtype, "fortran_order": False, "shape": shape})
        fh.write(payload)
    return str(path)


def _npz_claiming(path, shape, compress):
    import io
    import zipfile

    from numpy.lib import format as npformat

    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    buf.write(b"\0" * 64)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        zf.writestr("A.npy", buf.getvalue())
    return str(path)


def _refused(argv, capsys, out, *words):
    assert _run([*argv, "--out", str(out)]) == 2, argv
    message = _one_line_error(capsys)
    for word in words:
        assert word in message, (word, message)
    assert not out.exists()
    return message


def test_npy_header_cannot_claim_more_than_the_file_holds(gaussian, tmp_path, capsys):
    paths, _, _ = gaussian
    y = str(paths["y"])
    huge = _npy_claiming(tmp_path / "A.npy", (64, 10**12))  # 512 TB announced, 64 bytes held
    message = _refused(["recover", "--y", y, "--A", huge, "--method", "omp"], capsys, tmp_path / "o",
                       "--A", "(64, 1000000000000)", "float64", "holds only 64 bytes")
    assert "TiB" in message
    for compress in (False, True):
        npz = _npz_claiming(tmp_path / f"A{compress}.npz", (64, 10**12), compress)
        _refused(["recover", "--y", y, "--A", npz, "--method", "omp"], capsys, tmp_path / "o", "--A", "header")
    # a header that fits the file but not the memory: the same refusal, with both amounts
    from sparsecraft import memory

    small = _npy_claiming(tmp_path / "A8.npy", (8,), payload=b"\0" * 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "available_memory", lambda: 32)
        _refused(["recover", "--y", small, "--A", str(paths["A"]), "--method", "omp"], capsys,
                 tmp_path / "o", "--y", "64 B of memory", "only 32 B is available")


def test_npz_with_two_arrays_is_refused_before_loading_them(gaussian, tmp_path, capsys):
    paths, _, _ = gaussian
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.zeros(3))
    _refused(["recover", "--y", str(tmp_path / "two.npz"), "--A", str(paths["A"]), "--method", "omp"], capsys,
             tmp_path / "o", "exactly one array, found 2")


def test_recover_factors_refuses_a_kronecker_size_beyond_memory(tmp_path, capsys):
    # N = 20000^3 = 8e12 unknowns: KroSBL's length-N vectors alone would be tens of TiB
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(tmp_path / f"F{i}.npy", rng.standard_normal((2, 20000)))
    np.save(tmp_path / "y.npy", rng.standard_normal(8))
    factors = [str(tmp_path / f"F{i}.npy") for i in range(3)]
    for method in ("krosbl", "kron_omp", "omp", "sbl"):
        message = _refused(["recover", "--y", str(tmp_path / "y.npy"), "--factors", *factors, "--method", method],
                           capsys, tmp_path / "o", f"--method {method}", "N = 8000000000000", "would need about",
                           "is available")
        assert "TiB" in message or "PiB" in message


def test_recover_dense_sbl_on_factors_counts_the_densified_matrix(tmp_path, capsys, monkeypatch):
    from sparsecraft import memory

    factors, _ = _kron_problem(tmp_path, False)  # M = 336, N = 1000: 2.7 MB per dense copy
    monkeypatch.setattr(memory, "available_memory", lambda: 4 * 2**20)
    argv = ["recover", "--y", str(tmp_path / "yk.npy"), "--factors", *factors]
    _refused([*argv, "--method", "sbl"], capsys, tmp_path / "o", "--method sbl", "M = 336", "N = 1000",
             "dense M x N", "4.0 MiB is available")
    # the matrix-free methods fit
    assert _run([*argv, "--method", "kron_omp", "--k", "2", "2", "2", "--out", str(tmp_path / "k")]) == 0


def test_discover_refuses_a_library_beyond_memory(tmp_path, capsys):
    np.save(tmp_path / "X.npy", np.random.default_rng(0).standard_normal((10, 3)))
    # C(3 + 5000, 3) ~ 2.1e10 terms x 10 samples
    message = _refused(["discover", "--data", str(tmp_path / "X.npy"), "--dt", "0.1", "--degree", "5000"],
                       capsys, tmp_path / "o", "--degree 5000", "3 states", "10 samples",
                       "20858342501 terms", "would need about")
    assert "is available" in message


def test_polynomial_library_checks_its_size_first():
    X = np.zeros((10, 3))
    with pytest.raises(R.RecoveryError, match="polynomial library of 3 states .* would need about"):
        D.polynomial_library(X, 5000)
    assert D.library_size(3, 2) == 10 == D.polynomial_library(X, 2)[0].shape[1]


# ---------------------------------------------------------------- --out and the bad-input table
def test_out_with_a_missing_parent_is_an_error_and_creates_nothing(gaussian, tmp_path, capsys):
    paths, _, _ = gaussian
    out = tmp_path / "a" / "b" / "c"
    for argv in (["recover", "--y", str(paths["y"]), "--A", str(paths["A"]), "--method", "omp", "--k", "8"],
                 ["discover", "--data", str(tmp_path / "X.npy"), "--dt", "0.1"]):
        np.save(tmp_path / "X.npy", np.random.default_rng(0).standard_normal((50, 2)))
        assert _run([*argv, "--out", str(out)]) == 2
        message = _one_line_error(capsys)
        assert "does not exist" in message and str(tmp_path / "a" / "b") in message
        assert not (tmp_path / "a").exists()
    # only the last folder is created
    assert _run(["recover", "--y", str(paths["y"]), "--A", str(paths["A"]), "--method", "omp", "--k", "8",
                 "--out", str(tmp_path / "last")]) == 0
    assert (tmp_path / "last" / "x.npy").is_file()


def _more_bad_inputs(tmp_path, paths):
    """The rest of the bad-input table: every check of both commands."""
    y, A = str(paths["y"]), str(paths["A"])
    (tmp_path / "text.txt").write_text("1,2\n")
    (tmp_path / "letters.csv").write_text("a,b\nc,d\n")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    (tmp_path / "junk.npz").write_bytes(b"PK not a zip")
    (tmp_path / "afile").write_text("x")
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    np.save(tmp_path / "cplx.npy", np.ones((10, 3), dtype=complex))
    np.save(tmp_path / "X3.npy", np.random.default_rng(0).standard_normal((10, 3)))
    np.save(tmp_path / "X2rows.npy", np.ones((2, 3)))
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 2)))
    np.savetxt(tmp_path / "badhead.csv", np.ones((10, 2)), delimiter=",", header="u,u", comments="")
    X3 = str(tmp_path / "X3.npy")
    rec = ["recover", "--y", y, "--A", A]
    return [
        ([*rec, "--method", "omp", "--out", str(tmp_path / "afile")], ["exists", "--overwrite"]),
        (["recover", "--y", str(tmp_path / "text.txt"), "--A", A, "--method", "omp"], [".npy, .npz or .csv"]),
        (["recover", "--y", str(tmp_path / "letters.csv"), "--A", A, "--method", "omp"], ["--y", "cannot be read"]),
        (["recover", "--y", str(tmp_path / "ragged.csv"), "--A", A, "--method", "omp"], ["--y", "cannot be read"]),
        (["recover", "--y", str(tmp_path / "empty.csv"), "--A", A, "--method", "omp"], ["--y", "empty"]),
        (["recover", "--y", str(tmp_path / "junk.npy"), "--A", A, "--method", "omp"], ["--y", "cannot be read"]),
        (["recover", "--y", str(tmp_path / "junk.npz"), "--A", A, "--method", "omp"], ["--y", "cannot be read"]),
        (["recover", "--y", str(tmp_path / "strings.npy"), "--A", A, "--method", "omp"], ["--y", "not numbers"]),
        (["recover", "--y", str(tmp_path / "cube.npy"), "--A", A, "--method", "omp"], ["--y", "dimensions"]),
        (["recover", "--y", y, "--A", y, "--method", "omp"], ["--A", "dimensions"]),
        ([*rec, "--method", "block_sbl"], ["--blocks"]),
        ([*rec, "--method", "fista", "--lam", "universal"], ["--lam universal", "--noise-var"]),
        ([*rec, "--method", "fista", "--lam", "-1"], ["lam"]),
        ([*rec, "--method", "omp", "--k", "300"], ["--k 300", "min(M, N)"]),
        ([*rec, "--method", "omp", "--k", "3", "4"], ["--k", "one sparsity"]),
        ([*rec, "--method", "omp", "--device", "nonsense"], ["--device"]),
        ([*rec, "--method", "nonsense"], ["--method"]),
        ([*rec, "--method", "sbl", "--prune", "1"], ["prune"]),
        ([*rec, "--method", "sbl", "--noise-var", "-1"], ["noise variance"]),
        (["recover", "--y", y, "--factors", A, "--method", "kron_omp"], ["--factors", "at least 2"]),
        (["recover", "--y", y, "--factors", A, A, "--method", "kron_omp", "--k", "2"], ["--k", "one sparsity per factor"]),
        (["recover", "--y", y, "--factors", A, A, "--method", "krosbl", "--krosbl-method", "svd", "--coupling", "1"],
         ["--coupling", "--krosbl-method am"]),
        (["recover", "--y", y, "--factors", A, A, "--method", "krosbl", "--coupling", "1", "2", "3"], ["--coupling"]),
        (["recover", "--y", y, "--method", "omp"], ["--A", "--factors"]),
        (["discover", "--data", str(tmp_path / "cplx.npy"), "--dt", "0.1"], ["--data", "complex"]),
        (["discover", "--data", str(tmp_path / "cube.npy"), "--dt", "0.1"], ["--data", "dimensions"]),
        (["discover", "--data", X3, "--dt", "0"], ["dt"]),
        (["discover", "--data", X3, "--dt", "0.1", "--window", "4"], ["--window", "odd"]),
        (["discover", "--data", X3, "--dt", "0.1", "--window", "21"], ["--data has 10 samples", "21"]),
        (["discover", "--data", X3, "--derivatives", X3, "--window", "5"], ["--window", "--derivatives"]),
        (["discover", "--data", str(tmp_path / "X2rows.npy"), "--dt", "0.1"], ["2 samples"]),
        (["discover", "--data", X3, "--dt", "0.1", "--names", "a,a,b"], ["names", "distinct"]),
        (["discover", "--data", str(tmp_path / "badhead.csv"), "--dt", "0.1"], ["header", "--names"]),
        (["discover", "--data", X3, "--dt", "0.1", "--method", "nonsense"], ["--method"]),
        (["discover", "--data", X3, "--dt", "0.1", "--degree", "0"], ["degree"]),
        (["discover", "--data", str(tmp_path / "missing.npy"), "--dt", "0.1"], ["--data", "no such file"]),
    ]


def test_every_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, gaussian, capsys):
    paths, _, _ = gaussian
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = _more_bad_inputs(tmp_path, paths)
    made = sorted(p.name for p in tmp_path.iterdir())
    for argv, words in cases:
        out = tmp_path / "never"
        if "--out" not in argv:
            argv = [*argv, "--out", str(out)]
        assert _run(argv) == 2, argv
        message = _one_line_error(capsys)
        assert message.startswith(f"sparsecraft {argv[0]}: error: "), message
        for word in words:
            assert word in message, (word, message)
        assert not out.exists(), argv
        assert sorted(p.name for p in tmp_path.iterdir()) == made, argv
    assert set(before) <= set(made)
