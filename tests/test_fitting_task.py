"""The fit task's cache key and log wording for binomial and Poisson studies (issue 14)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from tasks.fitting import describe_family, fit_cache_key


def _key(**changes: Any) -> str:
    parameters = {"data_hash": "ab" * 32, "name": "ri", "formula": "y ~ t + (1 | id)", "method": "ML",
                  "engine": "lme4-style", "family": "gaussian", "nagq": 1} | changes
    return fit_cache_key(None, parameters)  # type: ignore[arg-type]  # the key reads the parameters only


def test_the_cache_key_tells_families_and_quadrature_apart() -> None:
    keys = {_key(), _key(family="binomial"), _key(family="poisson"), _key(family="binomial", nagq=5),
            _key(family="binomial", nagq=7)}
    assert len(keys) == 5
    assert _key(family="binomial", nagq=5) == _key(family="binomial", nagq=5)


def test_log_lines_name_the_family_its_link_and_the_approximation() -> None:
    assert describe_family("gaussian", 1) == "gaussian (identity link)"
    assert describe_family("binomial", 1) == "binomial (logit link, Laplace)"
    assert describe_family("poisson", 7) == "poisson (log link, nAGQ 7)"


def test_a_fit_is_stored_as_plain_pickle_and_read_back_whole() -> None:
    import numpy as np

    from longitudinal.fit.candidate import fit_candidate
    from longitudinal.simulate import SimulationSpec, simulate_trial
    from tasks.fitting import FitSerializer

    visits = simulate_trial(SimulationSpec(n_subjects=40, seed=3))
    fit = fit_candidate(visits, "ris", "score ~ week + (week | patient_id)")
    blob = FitSerializer().dumps(fit)
    assert blob[:1] == b"\x80"  # a pickle's opcode, not base64 text
    back = FitSerializer().loads(blob)
    assert back.loglik == fit.loglik and back.fixed_effects == fit.fixed_effects
    np.testing.assert_array_equal(back.residuals, fit.residuals)
    pd.testing.assert_frame_equal(back.ranef, fit.ranef)


def test_the_cache_records_follow_the_current_prefect_storage_apart_from_the_results(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.fitting import fit

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(tmp_path / "results")}):
        assert fit.cache_policy.key_storage == tmp_path / "results" / "fit-cache-keys"
        refit = fit.with_options(task_run_name="refit-ri-REML")
        assert refit.cache_policy.key_storage == tmp_path / "results" / "fit-cache-keys"
        assert refit.result_serializer == fit.result_serializer
