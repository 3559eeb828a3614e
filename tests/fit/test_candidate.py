"""fit_candidate: the Fit record of the lme4-style engine, checked against lme4 and known truths."""

from __future__ import annotations

import math
import pickle
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from longitudinal.errors import ConfigError, FormulaError
from longitudinal.fit.candidate import fit_candidate
from longitudinal.records import Fit
from longitudinal.simulate import SimulationSpec, simulate_trial, true_parameters
from reference_data import read_sleepstudy

TESTS = Path(__file__).resolve().parents[1]
RIS = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    return read_sleepstudy()


@pytest.fixture(scope="module")
def sleep_reml(sleepstudy: pd.DataFrame) -> Fit:
    return fit_candidate(sleepstudy, "ris", RIS, method="REML")


def by_term(fit: Fit) -> dict[str, float]:
    return {e.term: e.estimate for e in fit.fixed_effects}


# ----------------------------------------------------------------------------------- lme4's numbers


def test_sleepstudy_reml_matches_lme4(sleep_reml: Fit) -> None:
    # summary(lmer(Reaction ~ Days + (Days | Subject), sleepstudy)), lme4 1.1-31:
    #   Fixed effects: (Intercept) 251.405105 (6.824597), Days 10.467286 (1.545790)
    #   Subject (Intercept) SD 24.740448, Days SD 5.922133, Corr 0.06555124; Residual SD 25.591796
    #   REML criterion at convergence: 1743.628
    fit = sleep_reml
    assert fit.converged and not fit.singular and fit.usable
    assert (fit.engine, fit.method, fit.optimizer) == ("lme4-style", "REML", "bobyqa")
    assert (fit.n_obs, fit.n_subjects, fit.n_params) == (180, 18, 6)
    fixed = {e.term: e for e in fit.fixed_effects}
    assert fixed["(Intercept)"].estimate == pytest.approx(251.405105, abs=1e-5)
    assert fixed["Days"].estimate == pytest.approx(10.467286, abs=1e-5)
    assert fixed["(Intercept)"].std_error == pytest.approx(6.824597, rel=1e-5)
    assert fixed["Days"].std_error == pytest.approx(1.545790, rel=1e-5)
    sds = {(v.group, v.term): v.sd for v in fit.random_effects}
    assert sds == pytest.approx({("Subject", "(Intercept)"): 24.740448, ("Subject", "Days"): 5.922133}, rel=1e-5)
    (corr,) = fit.correlations
    assert (corr.group, corr.term1, corr.term2) == ("Subject", "(Intercept)", "Days")
    assert corr.corr == pytest.approx(0.06555124, abs=1e-5)
    assert fit.residual_sd == pytest.approx(25.591796, rel=1e-6)
    assert fit.reml_criterion == pytest.approx(1743.628, abs=5e-4)
    assert fit.loglik == pytest.approx(-fit.reml_criterion / 2)


def test_sleepstudy_wald_intervals_and_p_values(sleep_reml: Fit) -> None:
    days = next(e for e in sleep_reml.fixed_effects if e.term == "Days")
    assert days.ci_low == pytest.approx(days.estimate - 1.959964 * days.std_error)
    assert days.ci_high == pytest.approx(days.estimate + 1.959964 * days.std_error)
    z = days.estimate / days.std_error  # 6.771
    assert days.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)


def test_sleepstudy_ranef_and_fitted_values_match_lme4(sleep_reml: Fit, sleepstudy: pd.DataFrame) -> None:
    # ranef(fit, condVar = TRUE)$Subject["308", ] and head(fitted(fit), 3) from lme4 1.1-31.
    ranef = sleep_reml.ranef
    assert list(ranef.columns) == ["group", "level", "term", "estimate", "cond_sd"]
    assert len(ranef) == 18 * 2
    s308 = ranef[ranef["level"] == "308"].set_index("term")
    assert s308["estimate"].to_dict() == pytest.approx({"(Intercept)": 2.2585509, "Days": 9.1989758}, abs=1e-3)
    assert (s308["cond_sd"] ** 2).to_dict() == pytest.approx({"(Intercept)": 145.70559, "Days": 5.3122829}, rel=1e-4)
    assert set(ranef["group"]) == {"Subject"}
    assert sleep_reml.fitted[:3] == pytest.approx([253.663655798, 273.329917524, 292.996179249], abs=1e-3)
    assert sleep_reml.fitted + sleep_reml.residuals == pytest.approx(sleepstudy["Reaction"].to_numpy(), abs=1e-9)


def test_sleepstudy_ml_loglik_matches_lme4(sleepstudy: pd.DataFrame) -> None:
    # logLik(lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE)): -875.9697 (df = 6)
    fit = fit_candidate(sleepstudy, "ris", RIS, method="ML")
    assert fit.loglik == pytest.approx(-875.969672244, abs=1e-6)
    assert fit.n_params == 6 and fit.reml_criterion is None
    assert fit.aic == pytest.approx(-2 * fit.loglik + 12)


def test_uncorrelated_terms_have_no_correlation_and_one_parameter_less(sleepstudy: pd.DataFrame) -> None:
    # lme4: logLik(lmer(Reaction ~ Days + (Days || Subject), sleepstudy, REML = FALSE)) = -876.0016 (df = 5):
    # 2 fixed effects + 2 variances + 1 residual.
    double_bar = fit_candidate(sleepstudy, "ris_uncorrelated", "Reaction ~ Days + (Days || Subject)")
    assert double_bar.correlations == ()
    assert double_bar.n_params == 2 + 2 + 1
    assert double_bar.loglik == pytest.approx(-876.0016275723, abs=1e-6)
    assert [(v.term, v.group) for v in double_bar.random_effects] == [("(Intercept)", "Subject"), ("Days", "Subject")]

    split = fit_candidate(sleepstudy, "split", "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)")
    assert split.loglik == pytest.approx(double_bar.loglik, abs=1e-9)
    assert split.n_params == double_bar.n_params
    assert by_term(split) == pytest.approx(by_term(double_bar), rel=1e-9)
    assert [v.sd for v in split.random_effects] == pytest.approx([v.sd for v in double_bar.random_effects], rel=1e-9)


# ------------------------------------------------------------------------------- simulated truths


def test_parameters_are_recovered_from_a_simulated_trial() -> None:
    spec = SimulationSpec(n_subjects=400, seed=2024)
    truth = true_parameters(spec)
    fit = fit_candidate(simulate_trial(spec), "ris", "score ~ week * arm + age + (week | patient_id)", method="REML")
    assert fit.converged and not fit.singular
    for effect in fit.fixed_effects:
        assert effect.ci_low < truth["fixed_effects"][effect.term] < effect.ci_high, effect
    sds = {v.term: v.sd for v in fit.random_effects}
    assert sds["(Intercept)"] == pytest.approx(truth["random_effects"]["(Intercept)"], rel=0.15)
    assert sds["week"] == pytest.approx(truth["random_effects"]["week"], rel=0.15)
    assert fit.correlations[0].corr == pytest.approx(truth["correlation"], abs=0.2)
    assert fit.residual_sd == pytest.approx(truth["residual_sd"], rel=0.05)


def test_a_zero_slope_variance_gives_a_singular_but_converged_fit() -> None:
    # The data of tests/reference (sim_singular): lme4 also reports a singular fit, theta[3] = 0.
    spec = SimulationSpec(n_subjects=15, min_visits=4, max_visits=4, dropout_probability=0.0,
                          random_slope_sd=0.0, random_correlation=0.0, seed=108)
    fit = fit_candidate(simulate_trial(spec), "ris", "score ~ week * arm + age + (week | patient_id)")
    assert fit.singular
    assert fit.converged and fit.usable
    assert "singular" in fit.message
    assert fit.loglik == pytest.approx(-191.585683800512, abs=1e-6)  # lme4's logLik for this fit


# ----------------------------------------------------------------------------------- failures


def test_an_outcome_on_an_exact_line_is_a_failed_fit() -> None:
    frame = pd.DataFrame({"y": [1.0, 3.0, 5.0, 7.0, 9.0], "x": [0.0, 1.0, 2.0, 3.0, 4.0], "g": list("aabbb")})
    fit = fit_candidate(frame, "line", "y ~ x + (1 | g)")
    assert not fit.converged and not fit.usable
    assert math.isnan(fit.loglik)
    assert fit.message.startswith("candidate 'line': zero residual variance")
    assert (fit.n_obs, fit.n_subjects, fit.n_params) == (5, 2, 4)
    assert fit.attempts and fit.seconds > 0


def test_too_few_rows_for_a_random_slope_is_a_failed_fit() -> None:
    frame = pd.DataFrame({"y": [1.0, 2.5, 2.0, 4.5, 3.0, 7.0], "x": [0.0, 1, 2, 3, 4, 5], "g": list("aabbcc")})
    fit = fit_candidate(frame, "slope", "y ~ x + (x | g)")
    assert not fit.usable
    assert "number of random effects (6)" in fit.message
    assert fit.n_params == 2 + 3 + 1


def test_formula_errors_and_unknown_engines_raise(sleepstudy: pd.DataFrame) -> None:
    with pytest.raises(FormulaError, match="'Weight'"):
        fit_candidate(sleepstudy, "bad", "Reaction ~ Weight + (1 | Subject)")
    with pytest.raises(ConfigError, match="unknown engine 'lme5'"):
        fit_candidate(sleepstudy, "ri", "Reaction ~ Days + (1 | Subject)", engine="lme5")
    with pytest.raises(ConfigError, match="method must be 'ML' or 'REML'"):
        fit_candidate(sleepstudy, "ri", "Reaction ~ Days + (1 | Subject)", method="OLS")  # type: ignore[arg-type]


def test_statsmodels_engine_is_dispatched_with_the_design(
    sleepstudy: pd.DataFrame, monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[object, dict[str, object]]] = []
    sentinel = object()

    def fit_statsmodels(design: object, **kwargs: object) -> object:
        calls.append((design, kwargs))
        return sentinel

    fake = types.SimpleNamespace(fit_statsmodels=fit_statsmodels)
    monkeypatch.setitem(sys.modules, "longitudinal.fit.statsmodels_backend", fake)
    result = fit_candidate(sleepstudy, "ri", "Reaction ~ Days + (1 | Subject)", method="REML", engine="statsmodels")
    assert result is sentinel
    ((design, kwargs),) = calls
    assert kwargs == {"name": "ri", "formula": "Reaction ~ Days + (1 | Subject)", "method": "REML"}
    assert design.fixed_names == ("(Intercept)", "Days")  # type: ignore[attr-defined]


def test_the_input_frame_is_not_modified(sleepstudy: pd.DataFrame) -> None:
    before = sleepstudy.copy()
    fit_candidate(sleepstudy, "ri", "Reaction ~ Days + (1 | Subject)")
    pd.testing.assert_frame_equal(sleepstudy, before)


# ---------------------------------------------------------------------------------- nested and crossed


@pytest.fixture(scope="module")
def pastes() -> pd.DataFrame:
    """lme4's Pastes: 10 batches × 3 casks (labels a, b, c repeat across batches) × 2 assays."""
    return pd.read_csv(TESTS / "reference" / "data" / "pastes.csv", dtype={"batch": str, "cask": str})


def test_a_nested_fit_reports_every_factor(pastes: pd.DataFrame) -> None:
    fit = fit_candidate(pastes, "nested", "strength ~ 1 + (1 | batch/cask)", method="REML")
    assert fit.usable and fit.engine == "lme4-style"
    # R: VarCorr(lmer(strength ~ 1 + (1 | batch/cask), Pastes)): batch 1.28737, cask:batch 2.90408, σ 0.82341
    sds = {c.group: c.sd for c in fit.random_effects}
    assert sds == pytest.approx({"batch": 1.28737, "batch:cask": 2.90408}, rel=1e-5)
    assert fit.residual_sd == pytest.approx(0.82341, rel=1e-5)
    assert fit.n_params == 4 and fit.n_subjects == 30  # the finest factor: batch:cask
    # ranef: one row per (factor, level, term), factors in formula order, lme4's level labels
    assert fit.ranef.groupby("group", sort=False).size().to_dict() == {"batch": 10, "batch:cask": 30}
    assert list(fit.ranef.loc[fit.ranef["group"] == "batch:cask", "level"][:4]) == ["A:a", "A:b", "A:c", "B:a"]
    assert fit.ranef["cond_sd"].gt(0).all()
    assert fit.fitted.shape == (len(pastes),)


def test_ranef_labels_are_categoricals_sorted_as_text(pastes: pd.DataFrame) -> None:
    fit = fit_candidate(pastes, "nested", "strength ~ 1 + (1 | batch/cask)", method="REML")
    ranef = fit.ranef
    for column in ("group", "level", "term"):
        assert isinstance(ranef[column].dtype, pd.CategoricalDtype)
        categories = list(ranef[column].cat.categories)
        assert categories == sorted(set(ranef[column].astype(str)))
    # Both factors' levels share one set of categories; each row keeps its own factor's label.
    assert list(ranef["level"].astype(str)[:3]) == ["A", "B", "C"]
    assert ranef["level"].astype(str).str.contains(":").tolist() == [False] * 10 + [True] * 30
    restored = pickle.loads(pickle.dumps(fit))
    pd.testing.assert_frame_equal(restored.ranef, ranef)


def test_statsmodels_cannot_fit_several_grouping_factors(pastes: pd.DataFrame) -> None:
    fit = fit_candidate(pastes, "nested", "strength ~ 1 + (1 | batch/cask)", engine="statsmodels")
    assert not fit.usable and math.isnan(fit.loglik)
    assert fit.message.startswith("candidate 'nested': random effects on 'batch' besides 'batch:cask'")
    assert "not expressible in statsmodels MixedLM; use engine lme4-style" in fit.message
