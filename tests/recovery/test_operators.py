import numpy as np
import pytest
import torch

import sparsecraft.recovery as R
from sparsecraft.errors import SparsecraftError


def _factors(shapes, complex_, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for m, n in shapes:
        f = rng.standard_normal((m, n))
        if complex_:
            f = f + 1j * rng.standard_normal((m, n))
        out.append(torch.from_numpy(f))
    return out


def _kron(fs):
    out = fs[0]
    for f in fs[1:]:
        out = torch.kron(out, f)
    return out


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("shapes", [[(3, 5), (4, 2)], [(2, 3), (3, 4), (4, 2)]])
def test_kronecker_operator_equals_explicit_kron(complex_, shapes):
    fs = _factors(shapes, complex_)
    op = R.KroneckerOperator(fs)
    A = _kron(fs)
    assert op.shape == tuple(A.shape)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal(A.shape[1]) + (1j * rng.standard_normal(A.shape[1]) if complex_ else 0))
    X = torch.from_numpy(rng.standard_normal((A.shape[1], 3))).to(A.dtype)
    y = torch.from_numpy(rng.standard_normal(A.shape[0])).to(A.dtype)
    torch.testing.assert_close(op.matvec(x.to(A.dtype)), A @ x.to(A.dtype))
    torch.testing.assert_close(op.matvec(X), A @ X)
    torch.testing.assert_close(op.rmatvec(y), A.mH @ y)
    torch.testing.assert_close(op.rmatvec(A @ X), A.mH @ (A @ X))
    torch.testing.assert_close(op.to_dense(), A)
    torch.testing.assert_close(op.column_norms(), torch.linalg.vector_norm(A, dim=0))
    for j in (0, A.shape[1] // 2, A.shape[1] - 1):
        torch.testing.assert_close(op.column(j), A[:, j])
    assert op.norm_estimate() == pytest.approx(float(torch.linalg.matrix_norm(A, ord=2)), rel=1e-10)


def test_partial_dft_matches_explicit_rows_and_adjoint():
    n, rows = 32, [0, 3, 7, 8, 20, 31]
    op = R.PartialDFTOperator(n, rows)
    F = torch.fft.fft(torch.eye(n, dtype=torch.complex128), dim=0, norm="ortho")
    A = F[rows]
    torch.testing.assert_close(op.to_dense(), A)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, 2)) + 1j * rng.standard_normal((n, 2)))
    y = torch.from_numpy(rng.standard_normal(len(rows)) + 1j * rng.standard_normal(len(rows)))
    torch.testing.assert_close(op.matvec(x), A @ x)
    torch.testing.assert_close(op.rmatvec(y), A.mH @ y)
    torch.testing.assert_close(op.column(5), A[:, 5])
    torch.testing.assert_close(op.column_norms(), torch.linalg.vector_norm(A, dim=0).real)


def test_operator_bad_input():
    with pytest.raises(SparsecraftError, match="factors"):
        R.KroneckerOperator(np.ones((3, 3)))
    with pytest.raises(SparsecraftError, match="at least 2"):
        R.KroneckerOperator([np.ones((3, 3))])
    with pytest.raises(SparsecraftError, match=r"factors\[1\] contains NaN"):
        R.KroneckerOperator([np.ones((3, 3)), np.full((2, 2), np.nan)])
    with pytest.raises(SparsecraftError, match="rows"):
        R.PartialDFTOperator(8, [0, 8])
    with pytest.raises(SparsecraftError, match="A must be"):
        R.as_operator("matrix")


def test_errors_are_value_errors():
    assert issubclass(R.RecoveryError, ValueError)
    assert issubclass(R.DivergenceError, SparsecraftError)
