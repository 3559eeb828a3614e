from __future__ import annotations

import math

import numpy as np
import pytest

from longitudinal.errors import FitError
from longitudinal.inference.criteria import COLUMNS, select_model
from longitudinal.records import Fit, failed_fit


def _fit(name: str, loglik: float, k: int, *, n: int = 100, method: str = "ML") -> Fit:
    return Fit(
        name=name, formula=f"y ~ t + ({name} | g)", method=method, engine="test", converged=True,
        singular=False, message="", n_obs=n, n_subjects=20, n_params=k, loglik=loglik,
    )


def test_aic_bic_and_k_by_hand() -> None:
    fit = _fit("ri", -250.0, 4, n=100)
    assert fit.aic == pytest.approx(500.0 + 8.0)
    assert fit.bic == pytest.approx(500.0 + 4 * math.log(100))


def test_table_has_exactly_the_contract_columns_and_picks_the_lowest() -> None:
    fits = [_fit("ri", -250.0, 4), _fit("ris", -240.0, 6), _fit("risu", -241.0, 5)]
    selection = select_model(fits, "bic")
    assert tuple(selection.table.columns) == COLUMNS
    bic = {f.name: f.bic for f in fits}
    assert selection.selected == min(bic, key=bic.get)
    assert selection.table["selected"].sum() == 1
    row = selection.table.set_index("model").loc["ris"]
    assert row["delta_bic"] == pytest.approx(bic["ris"] - min(bic.values()))


def test_weights_sum_to_one_and_follow_deltas() -> None:
    fits = [_fit("a", -250.0, 4), _fit("b", -249.0, 5), _fit("c", -245.0, 6)]
    table = select_model(fits, "aic").table
    assert table["aic_weight"].sum() == pytest.approx(1.0)
    assert table["bic_weight"].sum() == pytest.approx(1.0)
    ratio = table["aic_weight"][0] / table["aic_weight"][1]
    assert ratio == pytest.approx(math.exp(-0.5 * (table["delta_aic"][0] - table["delta_aic"][1])))


def test_criterion_changes_the_choice() -> None:
    # ΔlogLik of 2.5 for 2 extra parameters: AIC prefers the larger model, BIC (n = 1000) the smaller.
    fits = [_fit("small", -500.0, 4, n=1000), _fit("large", -497.5, 6, n=1000)]
    assert select_model(fits, "aic").selected == "large"
    assert select_model(fits, "bic").selected == "small"


def test_tie_goes_to_fewer_parameters() -> None:
    # Same AIC: large gains exactly one log-likelihood unit per extra parameter.
    fits = [_fit("large", -248.0, 6), _fit("small", -250.0, 4)]
    assert select_model(fits, "aic").selected == "small"


def test_failed_fits_are_listed_but_never_selected() -> None:
    broken = failed_fit("bad", "y ~ t + (t | g)", "ML", "test", "zero residual variance", n_obs=100, n_subjects=20, n_params=6)
    infinite = _fit("inf", math.inf, 4)
    fits = [broken, infinite, _fit("ok", -300.0, 4)]
    selection = select_model(fits, "bic")
    assert selection.selected == "ok"
    table = selection.table.set_index("model")
    assert not table.loc["bad", "converged"] and not table.loc["inf", "converged"]
    assert np.isnan(table.loc["bad", "bic"]) and np.isnan(table.loc["inf", "bic_weight"])


def test_no_usable_candidate_says_why_each_failed() -> None:
    fits = [
        failed_fit("a", "f", "ML", "test", "zero residual variance", n_obs=5, n_subjects=1, n_params=4),
        failed_fit("b", "f", "ML", "test", "optimizer did not converge", n_obs=5, n_subjects=1, n_params=6),
    ]
    with pytest.raises(FitError, match=r"no candidate model could be fitted \(a: zero residual variance; b: optimizer did not converge\)"):
        select_model(fits, "aic")


def test_refuses_reml_fits() -> None:
    with pytest.raises(FitError, match=r"fitted by REML; AIC/BIC compare ML fits only"):
        select_model([_fit("a", -1.0, 3, method="REML"), _fit("b", -1.0, 3)], "aic")


def test_refuses_fits_on_different_rows() -> None:
    with pytest.raises(FitError, match=r"different rows \(a n=100, b n=90\)"):
        select_model([_fit("a", -1.0, 3, n=100), _fit("b", -1.0, 3, n=90)], "bic")


def test_a_tie_is_a_score_within_1e_6_of_the_lowest_whatever_the_rounding() -> None:
    # 1000.0000004999 and 1000.0000005001 round to different multiples of 1e-6, yet differ by 2e-10:
    # a tie, so the candidate with fewer parameters wins although its AIC is a hair higher.
    def with_aic(name: str, aic: float, k: int) -> Fit:
        return _fit(name, (2 * k - aic) / 2, k)

    fits = [with_aic("large", 1000.0000004999, 6), with_aic("small", 1000.0000005001, 4)]
    assert fits[0].aic < fits[1].aic
    assert select_model(fits, "aic").selected == "small"
    # Beyond 1e-6 it is no tie.
    fits = [with_aic("large", 1000.0, 6), with_aic("small", 1000.000002, 4)]
    assert select_model(fits, "aic").selected == "large"


def test_a_fit_with_a_convergence_warning_competes_and_the_table_keeps_the_verdict() -> None:
    # lme4 keeps such a fit (with its warning); the selection does too, and says it did not converge.
    warned = Fit(
        name="ris", formula="y ~ t + (t | g)", method="ML", engine="test", converged=False, singular=False,
        message="failed to converge with max|grad| = 0.003 (tol = 0.002)", n_obs=100, n_subjects=20,
        n_params=6, loglik=-240.0,
    )
    assert warned.usable
    selection = select_model([_fit("ri", -250.0, 4), warned], "aic")
    assert selection.selected == "ris"
    table = selection.table.set_index("model")
    assert not table.loc["ris", "converged"] and table.loc["ri", "converged"]
    assert table.loc["ris", "aic"] == pytest.approx(warned.aic)
