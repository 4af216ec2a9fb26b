"""Issue 12 (recovery): size checks in the library, the SBL module split, KroSBL's settings."""

import dataclasses

import numpy as np
import pytest

import sparsecraft.recovery as R
from sparsecraft import memory
from sparsecraft.recovery import _common, kronecker_sbl


def _huge_factors():
    # N = 20000^3 = 8e12 unknowns from three 2 x 20000 factors (1 MB of input)
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 20000)) for _ in range(3)], rng.standard_normal(8)


@pytest.mark.parametrize("solver", [R.krosbl, R.kron_omp])
def test_kronecker_solvers_refuse_an_N_beyond_memory_before_allocating(solver):
    factors, y = _huge_factors()
    with pytest.raises(R.RecoveryError, match=r"N = 20000 x 20000 x 20000 = 8000000000000 unknowns "
                                              r"would need about .* but only .* is available"):
        solver(factors, y)


def test_check_memory_reports_both_amounts(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    _common.check_memory(1024, "a thing")
    with pytest.raises(R.RecoveryError, match=r"a thing would need about 2.0 KiB of memory \(2,048 bytes\), but only 1.0 KiB"):
        _common.check_memory(2048, "a thing")
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # unknown: no refusal
    _common.check_memory(2**80, "a thing")


def test_available_memory_reads_meminfo():
    value = memory.available_memory()
    assert value is None or value > 0


def test_sbl_families_live_in_two_modules_and_the_package_names_stay():
    from sparsecraft.recovery import sbl_em, sbl_fast

    assert R.sbl is sbl_em.sbl and R.block_sbl is sbl_em.block_sbl and R.pc_sbl is sbl_em.pc_sbl
    assert R.sbl_posterior is sbl_em.sbl_posterior
    assert callable(sbl_fast.fast_sbl_loop) and not hasattr(sbl_em, "_FastSBLState")
    for name in R.__all__:
        assert getattr(R, name) is not None


def test_krosbl_settings_are_one_frozen_validated_record():
    op = R.KroneckerOperator([np.eye(3), np.eye(4)])
    defaults = dict(method="am", coupling=None, noise_var=None, max_iter=300, tol=1e-4, prune=1e-3,
                    n_sweeps=10, record_cost=True, init_scale=None, restarts=2, restart_draws=0, seed=0,
                    accelerate=True, subset_restarts=True, init_supports=None)
    cfg = kronecker_sbl.KroSBLSettings.parse(op, **{**defaults, "coupling": 0.5, "init_supports": [[2, 0], [1]]})
    assert cfg.couplings == (0.5, 0.5) and cfg.prunes == (1e-3, 1e-3) and cfg.over_relax
    assert [s.tolist() for s in cfg.init_supports] == [[0, 2], [1]]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tol = 1.0
    for bad, match in ((dict(method="x"), "method"), (dict(prune=[0.1]), "prune"), (dict(restarts=-1), "restarts"),
                       (dict(method="svd", coupling=1.0), "coupling"), (dict(init_supports=[[5], [0]]), "init_supports")):
        with pytest.raises(R.RecoveryError, match=match):
            kronecker_sbl.KroSBLSettings.parse(op, **{**defaults, **bad})
    # the public keywords are unchanged
    import inspect

    assert list(inspect.signature(R.krosbl).parameters)[2:] == list(defaults)
    est = R.KroSBL(prune=1e-2, restarts=0)
    assert est.prune == 1e-2 and est.restarts == 0


def test_docstrings_keep_research_notes_out():
    import inspect
    import re

    from sparsecraft.recovery import sbl_em, sbl_fast

    for mod in (sbl_em, sbl_fast, kronecker_sbl, R.discovery):
        text = inspect.getsource(mod)
        assert not re.search(r"\btrials\b|\d dB\b|Measured|measured:|M1 = ", text), mod.__name__
