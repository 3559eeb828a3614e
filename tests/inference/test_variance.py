"""ICC and R² (Nakagawa & Schielzeth) against performance's icc() and r2_nakagawa(), and by hand on tiny frames."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.candidate import fit_candidate
from longitudinal.inference.variance import LOGIT_VARIANCE, ExplainedVariance, explained_variance
from longitudinal.records import VarianceComponent

ROOT = Path(__file__).resolve().parents[2]
# Written by tests/reference/make_reference_r2.R (lmer REML fits, glmer ML fits; performance 0.10.2).
REFERENCE = json.loads((ROOT / "tests" / "reference" / "r2_reference.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}
GAUSSIAN = sorted(name for name, case in CASES.items() if case["family"] == "gaussian")
GENERALIZED = sorted(name for name, case in CASES.items() if case["family"] != "gaussian")


def _visits(case: dict) -> pd.DataFrame:
    return pd.read_csv(ROOT / case["data"], dtype={"Subject": str, "subject": str, "ID": str})


@pytest.mark.parametrize("name", GAUSSIAN)
def test_matches_performance(name: str) -> None:
    case = CASES[name]
    visits = _visits(case)
    fit = fit_candidate(visits, name, case["formula"], method="REML")
    explained = explained_variance(fit, visits)
    assert explained is not None
    # performance reads the same REML estimates; lme4's optimum and ours agree to ~1e-6.
    assert explained.r2_marginal == pytest.approx(case["r2_marginal"], rel=1e-4)
    assert explained.r2_conditional == pytest.approx(case["r2_conditional"], rel=1e-4)
    assert explained.icc == pytest.approx(case["icc_adjusted"], rel=1e-4)


@pytest.mark.parametrize("name", GENERALIZED)
def test_glmm_matches_performance(name: str) -> None:
    case = CASES[name]
    visits = _visits(case)
    fit = fit_candidate(visits, name, case["formula"], family=case["family"])
    explained = explained_variance(fit, visits)
    assert explained is not None
    # The reference glmer fits stop at lme4's default tolerances, ours at tighter ones: estimates differ by
    # up to ~1e-4 relative, and σ²_f by 3.1e-4 (epil), the ratios by at most 1.1e-4.
    assert explained.fixed == pytest.approx(case["var_fixed"], rel=1e-3)
    assert explained.random == pytest.approx(case["var_random"], rel=1e-3)
    assert explained.residual == pytest.approx(case["var_distribution"], rel=1e-3)
    assert explained.r2_marginal == pytest.approx(case["r2_marginal"], rel=1e-3)
    assert explained.r2_conditional == pytest.approx(case["r2_conditional"], rel=1e-3)
    assert explained.icc == pytest.approx(case["icc_adjusted"], rel=1e-3)


def test_poisson_distribution_variance_is_from_the_null_model() -> None:
    # log(1 + 1/λ), λ = exp(intercept of y ~ 1 + (1 | subject)), not of the model's own intercept.
    case = CASES["epil_intercept"]
    visits = _visits(case)
    null = fit_candidate(visits, "null", "y ~ 1 + (1 | subject)", family="poisson")
    assert null.fixed_effects[0].estimate == pytest.approx(case["null_intercept"], rel=1e-4)
    fit = fit_candidate(visits, "ri", case["formula"], family="poisson")
    explained = explained_variance(fit, visits)
    assert explained is not None
    assert explained.residual == pytest.approx(math.log1p(math.exp(-null.fixed_effects[0].estimate)), rel=1e-12)


def test_binomial_by_hand() -> None:
    # logit: σ²_ε = π²/3 whatever the fit; σ²_f = var(Xβ) on the link scale, σ²_r = τ².
    visits = pd.DataFrame({"id": list("aaaabbbbcccc"), "x": [0.0, 1, 2, 3] * 3,
                           "y": [0.0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1]})
    fit = fit_candidate(visits, "ri", "y ~ x + (1 | id)", family="binomial")
    fit = dataclasses.replace(fit, random_effects=(VarianceComponent("id", "(Intercept)", 1.5),))
    fit = dataclasses.replace(fit, fixed_effects=tuple(dataclasses.replace(fe, estimate=v)
                                                       for fe, v in zip(fit.fixed_effects, [-1.0, 0.5])))
    explained = explained_variance(fit, visits)
    fixed = 0.25 * np.var([0.0, 1, 2, 3] * 3, ddof=1)
    assert explained == ExplainedVariance(fixed=pytest.approx(fixed), random=pytest.approx(2.25),
                                          residual=LOGIT_VARIANCE)
    assert LOGIT_VARIANCE == pytest.approx(3.289868133696453, rel=1e-15)
    assert explained.icc == pytest.approx(2.25 / (2.25 + LOGIT_VARIANCE))


def test_observation_level_random_effect_counts_as_residual() -> None:
    # insight puts the variance of a factor with one level per row (overdispersion) in σ²_ε, not in σ²_r.
    visits = pd.DataFrame({"id": list("aaaabbbbcccc"), "obs": [f"o{i:02d}" for i in range(12)],
                           "x": [0.0, 1, 2, 3] * 3, "y": [0.0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1]})
    fit = fit_candidate(visits, "ri_obs", "y ~ x + (1 | id) + (1 | obs)", family="binomial")
    fit = dataclasses.replace(fit, random_effects=(VarianceComponent("id", "(Intercept)", 1.5),
                                                   VarianceComponent("obs", "(Intercept)", 0.5)))
    explained = explained_variance(fit, visits)
    assert explained is not None
    assert explained.random == pytest.approx(2.25)
    assert explained.residual == pytest.approx(LOGIT_VARIANCE + 0.25)


def test_random_intercept_by_hand() -> None:
    # y = 1 + 2 x, x = 0, 1, 2 per subject: var(Xβ) = 4 var(x) over the six rows; σ²_r = τ² = 4, σ² = 1.
    visits = pd.DataFrame({"id": list("aaabbb"), "x": [0.0, 1, 2] * 2,
                           "y": [1.2, 2.9, 5.1, 0.8, 3.3, 4.9]})
    fit = fit_candidate(visits, "ri", "y ~ x + (1 | id)", method="REML")
    fit = dataclasses.replace(fit, random_effects=(VarianceComponent("id", "(Intercept)", 2.0),), residual_sd=1.0)
    fit = dataclasses.replace(fit, fixed_effects=tuple(dataclasses.replace(fe, estimate=v)
                                                       for fe, v in zip(fit.fixed_effects, [1.0, 2.0])))
    explained = explained_variance(fit, visits)
    fixed = 4 * np.var([0.0, 1, 2] * 2, ddof=1)
    assert explained == ExplainedVariance(fixed=pytest.approx(fixed), random=pytest.approx(4.0), residual=1.0)
    assert explained.icc == pytest.approx(0.8)
    assert explained.r2_marginal == pytest.approx(fixed / (fixed + 5))
    assert explained.r2_conditional == pytest.approx((fixed + 4) / (fixed + 5))


def test_not_defined_for_covariance_structures_and_failed_fits() -> None:
    visits = _visits(CASES["orthodont_intercept"])
    visits = visits.assign(visit=visits["age"].map(lambda a: f"{int(a):02d}"))
    mmrm = fit_candidate(visits, "cs", "distance ~ age + cs(visit | Subject)", method="REML")
    assert mmrm.covariance is not None
    assert explained_variance(mmrm, visits) is None
    binary = visits.assign(high=(visits["distance"] > 24).astype(float))
    glmm = fit_candidate(binary, "logit", "high ~ age + (1 | Subject)", family="binomial")
    assert explained_variance(dataclasses.replace(glmm, loglik=math.nan), binary) is None


def test_selected_model_json_carries_icc_and_r2() -> None:
    from longitudinal.reporting.run_folder import selected_model_summary

    case = CASES["sleepstudy_intercept"]
    visits = _visits(case)
    fit = fit_candidate(visits, "ri", case["formula"], method="REML")
    summary = selected_model_summary(fit, "bic", explained_variance(fit, visits))
    assert summary["icc"] == pytest.approx(case["icc_adjusted"], rel=1e-4)
    assert summary["r2_marginal"] == pytest.approx(case["r2_marginal"], rel=1e-4)
    assert summary["r2_conditional"] == pytest.approx(case["r2_conditional"], rel=1e-4)
    assert all(selected_model_summary(fit, "bic")[key] is None for key in ("icc", "r2_marginal", "r2_conditional"))
