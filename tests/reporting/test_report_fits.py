"""``report_fits``: the candidates' fits keep their per-row arrays only where the report reads them (issue 17:
a run at 2M rows held 32 MB of fitted values and residuals per candidate until the report was written)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from longitudinal.records import Fit, ResidualCovariance
from longitudinal.reporting.run_folder import report_fits


def _fit(name: str, method: str = "ML", n: int = 6) -> Fit:
    ranef = pd.DataFrame({"group": ["id"] * 2, "level": ["a", "b"], "term": ["(Intercept)"] * 2,
                          "estimate": [0.1, -0.1], "cond_sd": [0.5, 0.5]})
    return Fit(name=name, formula="y ~ t + (1 | id)", method=method, engine="lme4-style", converged=True,
               singular=False, message="", n_obs=n, n_subjects=2, n_params=4, loglik=-10.0, ranef=ranef,
               fitted=np.arange(n, dtype=float), residuals=np.ones(n))


def test_only_the_selected_model_keeps_its_rows() -> None:
    fits = [_fit("ri"), _fit("ris"), _fit("ris_uncorrelated")]
    refit = _fit("ris", "REML")
    kept = report_fits(fits, refit)
    assert [f.name for f in kept] == ["ri", "ris", "ris_uncorrelated"]
    assert all(f.fitted.size == 0 and f.residuals.size == 0 and f.ranef.empty for f in kept)
    assert list(kept[0].ranef.columns) == list(fits[0].ranef.columns)
    assert [(f.loglik, f.n_obs, f.method) for f in kept] == [(f.loglik, f.n_obs, f.method) for f in fits]


def test_a_glmm_reported_from_its_ml_fit_keeps_it_whole() -> None:
    fits = [_fit("ri"), _fit("ris")]
    kept = report_fits(fits, fits[1])
    assert kept[1] is fits[1]
    assert kept[0].residuals.size == 0


def test_a_refit_without_rows_keeps_its_candidates_ml_fit() -> None:
    fits = [_fit("ri"), _fit("ris")]
    refit = replace(_fit("ris", "REML"), fitted=np.empty(0), residuals=np.empty(0))
    kept = report_fits(fits, refit)
    assert kept[1] is fits[1] and kept[0].residuals.size == 0


def test_covariance_structures_keep_every_fit_for_the_serial_diagnostic() -> None:
    structure = ResidualCovariance(structure="ar1", term="ar1(t | id)", description="AR(1)", visit="t",
                                   labels=("0", "1"), matrix=np.eye(2), n_params=2,
                                   parameters=(("sigma", 1.0), ("rho", 0.0)), heterogeneous=False, spatial=False)
    fits = [replace(_fit("ar1"), covariance=structure), _fit("ri")]
    kept = report_fits(fits, _fit("ri", "REML"))
    assert all(k is f for k, f in zip(kept, fits))


def test_large_data_draw_the_figures_in_one_process(tmp_path, monkeypatch) -> None:
    """Above ``HELPER_MAX_ROWS`` no helper is forked: its copy-on-write pages cost hundreds of MB at 2M rows."""
    from test_html import make_inputs

    from longitudinal.reporting import run_folder

    asked: list[int | None] = []

    def recording(builders, processes=None):
        asked.append(processes)
        return {}

    monkeypatch.setattr(run_folder, "render_pngs", recording)
    inputs = make_inputs()
    for limit in (len(inputs.validated.visits), len(inputs.validated.visits) - 1):
        monkeypatch.setattr(run_folder, "HELPER_MAX_ROWS", limit)
        run = tmp_path / f"run-{limit}"
        (run / "figures").mkdir(parents=True)
        run_folder.write_run_files(run, inputs)
    assert asked == [None, 1]
