"""Batched recovery: one call for many problems with one dictionary."""

import numpy as np
import pytest
import torch

import sparsecraft.recovery as R
from sparsecraft.recovery import RecoveryError
from sparsecraft.recovery import sbl_batch as sparsecraft_sbl_batch
from sparsecraft.recovery.batched import krosbl_batch, omp_batch


def _kron_problems(B, seed=0, snr=25.0):
    rng = np.random.default_rng(seed)
    fs = [rng.standard_normal((6, 10)) / np.sqrt(6), rng.standard_normal((8, 12)) / np.sqrt(8)]
    X = np.zeros((B, 10, 12))
    for b in range(B):
        u, v = np.zeros(10), np.zeros(12)
        u[rng.choice(10, 2, replace=False)] = rng.standard_normal(2) + np.sign(rng.standard_normal(2))
        v[rng.choice(12, 3, replace=False)] = rng.standard_normal(3) + np.sign(rng.standard_normal(3))
        X[b] = np.outer(u, v)
    X = X.reshape(B, -1)
    Y0 = X @ np.kron(fs[0], fs[1]).T
    nv = float(np.mean(Y0 ** 2) / 10 ** (snr / 10))
    return fs, X, Y0 + np.sqrt(nv) * rng.standard_normal(Y0.shape), nv


def test_krosbl_batch_equals_single_calls_exactly_and_recovers():
    fs, X, Y, nv = _kron_problems(6)
    batch = krosbl_batch(fs, Y, noise_var=nv)
    assert batch.x.shape == X.shape and len(batch.n_iter) == 6
    for b in range(6):
        one = krosbl_batch(fs, Y[b], noise_var=nv)
        assert np.array_equal(one.x, batch.x[b])  # bit for bit: a problem ignores its batch-mates
        assert one.n_iter == batch.n_iter[b]
    nmse = 10 * np.log10(np.sum((batch.x - X) ** 2) / np.sum(X ** 2))
    assert nmse < -20.0, nmse
    assert batch.info["time_per_problem"] > 0
    # Learned noise: still one problem per row, each with its own estimate.
    learned = krosbl_batch(fs, Y[:3], noise_var=None)
    assert learned.info["noise_var"].shape == (3,)
    assert np.array_equal(krosbl_batch(fs, Y[1], noise_var=None).x, learned.x[1])


def test_omp_batch_equals_single_calls_and_finds_the_support():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((40, 100)) / np.sqrt(40)
    X = np.zeros((5, 100))
    for b in range(5):
        X[b, rng.choice(100, 4, replace=False)] = rng.choice([-1.0, 1.0], 4) * rng.uniform(1, 2, 4)
    Y = X @ A.T
    batch = omp_batch(A, Y, 4)
    for b in range(5):
        assert batch.support[b].tolist() == np.nonzero(X[b])[0].tolist()
        assert np.array_equal(omp_batch(A, Y[b], 4).x, batch.x[b])
    np.testing.assert_allclose(batch.x, X, atol=1e-10)
    # torch in, torch out
    assert isinstance(omp_batch(torch.from_numpy(A), torch.from_numpy(Y), 4).x, torch.Tensor)


def test_batched_bad_input_is_refused_clearly():
    fs, X, Y, nv = _kron_problems(2)
    with pytest.raises(RecoveryError, match=r"Y\[1\] has 47 measurements.*M = 48"):
        krosbl_batch(fs, [Y[0], Y[1][:47]], noise_var=nv)
    with pytest.raises(RecoveryError, match=r"shape \(2, 40\).*M = 48"):
        krosbl_batch(fs, Y[:, :40], noise_var=nv)
    bad = [f.copy() for f in fs]
    bad[1][:, 7] = np.nan
    with pytest.raises(RecoveryError, match=r"factors\[1\] column 7 contains NaN"):
        krosbl_batch(bad, Y, noise_var=nv)
    A = np.kron(fs[0], fs[1])
    A[:, 3] = np.inf
    with pytest.raises(RecoveryError, match=r"A column 3 contains NaN or inf"):
        omp_batch(A, Y, 2)
    with pytest.raises(RecoveryError, match=r"n_nonzero=49 exceeds the number of measurements M=48"):
        omp_batch(np.kron(fs[0], fs[1]), Y, 49)
    with pytest.raises(RecoveryError, match="prune"):
        krosbl_batch(fs, Y, noise_var=nv, prune=1.5)


def _sbl_problems(B, seed=2, M=30, N=80, K=4, complex_=False):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((M, N)) / np.sqrt(M)
    X = np.zeros((B, N), complex if complex_ else float)
    for b in range(B):
        v = rng.standard_normal(K) + (1j * rng.standard_normal(K) if complex_ else 0)
        X[b, rng.choice(N, K, replace=False)] = v
    if complex_:
        A = A + 1j * rng.standard_normal((M, N)) / np.sqrt(M)
    Y = X @ A.T
    noise = 0.01 * rng.standard_normal(Y.shape)
    return A, X, Y + (noise + 1j * noise[::-1] if complex_ else noise)


@pytest.mark.parametrize("noise_var", [None, 1e-4])
def test_sbl_batch_equals_single_calls(noise_var):
    A, X, Y = _sbl_problems(6)
    Y[4], X[4] = 0.0, 0.0  # a problem with nothing to find stays zero, as in sbl
    batch = sparsecraft_sbl_batch(A, Y, noise_var=noise_var)
    assert batch.x.shape == X.shape and not batch.x[4].any() and len(batch.support[4]) == 0
    for b in range(6):
        one = sparsecraft_sbl_batch(A, Y[b], noise_var=noise_var)
        # The batch of one: bit for bit (a problem's numbers ignore its batch-mates).
        assert np.array_equal(one.x, batch.x[b]) and one.n_iter == batch.n_iter[b]
        # The library's numpy sbl: the same steps, round-off apart (another summation order).
        lib = R.sbl(A, Y[b], noise_var=noise_var, record_cost=False)
        assert lib.support.tolist() == batch.support[b].tolist() and lib.n_iter == batch.n_iter[b]
        np.testing.assert_allclose(batch.x[b], lib.x, rtol=0, atol=1e-9 * max(np.abs(lib.x).max(), 1e-300))
        if noise_var is None and b != 4:
            assert batch.info["noise_var"][b] == pytest.approx(lib.info["noise_var"], rel=1e-9)
    assert 10 * np.log10(np.sum((batch.x - X) ** 2) / np.sum(X ** 2)) < -20


def test_sbl_batch_complex_and_torch():
    A, X, Y = _sbl_problems(3, seed=3, complex_=True)
    batch = sparsecraft_sbl_batch(torch.from_numpy(A), torch.from_numpy(Y))
    assert isinstance(batch.x, torch.Tensor) and batch.x.dtype == torch.complex128
    for b in range(3):
        lib = R.sbl(A, Y[b], record_cost=False)
        assert lib.support.tolist() == batch.support[b].tolist()
        np.testing.assert_allclose(batch.x[b].numpy(), lib.x, rtol=0, atol=1e-9 * np.abs(lib.x).max())


def test_sbl_batch_bad_input_is_refused_clearly():
    A, X, Y = _sbl_problems(2)
    with pytest.raises(RecoveryError, match=r"Y\[1\] has 29 measurements but the dictionary has M = 30"):
        sparsecraft_sbl_batch(A, [Y[0], Y[1][:29]])
    with pytest.raises(RecoveryError, match=r"shape \(2, 20\).*M = 30"):
        sparsecraft_sbl_batch(A, Y[:, :20])
    bad = A.copy()
    bad[:, 11] = np.nan
    with pytest.raises(RecoveryError, match=r"A column 11 contains NaN or inf"):
        sparsecraft_sbl_batch(bad, Y)
    with pytest.raises(RecoveryError, match="add_level"):
        sparsecraft_sbl_batch(A, Y, add_level=1.5)
    with pytest.raises(RecoveryError, match="prune must be < 1"):
        sparsecraft_sbl_batch(A, Y, prune=1.0)
    with pytest.raises(RecoveryError, match="Y holds no problems"):
        sparsecraft_sbl_batch(A, [])
