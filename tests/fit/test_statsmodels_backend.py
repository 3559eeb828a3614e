"""The statsmodels engine: fresh starts beat MixedLM's default chain, degenerate data fail, lme4 agrees."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.statsmodels_backend import fit_statsmodels
from longitudinal.model.design import Design, build_design
from longitudinal.model.formula import parse_formula
from longitudinal.records import Fit
from reference_data import read_sleepstudy



def _design(data: pd.DataFrame, formula: str) -> Design:
    return build_design(data, parse_formula(formula))


def _fit(data: pd.DataFrame, formula: str, method: str = "ML") -> Fit:
    return fit_statsmodels(_design(data, formula), name="m", formula=formula, method=method)  # type: ignore[arg-type]


def _hard_random_slopes() -> pd.DataFrame:
    """10 subjects × 4 visits over 30 days; intercept and slope SDs (0.1) far below the residual SD (10).

    Found by searching simulated data for a case where MixedLM's default chain stops short. lme4 on these
    rows (written to CSV): ``logLik(lmer(y ~ t + (t | g), d, REML = FALSE))`` = −153.7803009.
    """
    rng = np.random.default_rng(801414)
    n_sub, n_vis, sd0, sd1, rho = 10, 4, 0.1, 0.1, -0.9
    subject = np.repeat(np.arange(n_sub), n_vis)
    t = np.tile(np.linspace(0, 30, n_vis), n_sub)
    cov = np.array([[sd0**2, rho * sd0 * sd1], [rho * sd0 * sd1, sd1**2]])
    u = rng.multivariate_normal([0, 0], cov, size=n_sub)
    y = 100 + 1.0 * t + u[subject, 0] + u[subject, 1] * t + rng.normal(0, 10, len(t))
    return pd.DataFrame({"y": y, "t": t, "g": subject.astype(str)})


@pytest.fixture(scope="module")
def hard_fit() -> Fit:
    return _fit(_hard_random_slopes(), "y ~ t + (t | g)")


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    return read_sleepstudy()


def test_fresh_starts_reach_the_optimum_where_the_default_chain_stops_short(hard_fit: Fit) -> None:
    from statsmodels.regression.mixed_linear_model import MixedLM

    data = _hard_random_slopes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = MixedLM.from_formula("y ~ t", data, groups=data["g"], re_formula="~t").fit(reml=False)
    assert hard_fit.converged
    assert hard_fit.loglik > default.llf + 0.01
    assert hard_fit.loglik == pytest.approx(-153.7803009, abs=1e-3)  # lme4
    assert hard_fit.optimizer != "default(bfgs,lbfgs,cg)"


def test_the_winner_is_the_best_converged_attempt_and_every_attempt_is_recorded(hard_fit: Fit) -> None:
    names = [a.optimizer for a in hard_fit.attempts]
    assert {"lbfgs", "bfgs", "cg", "powell", "nm", "default(bfgs,lbfgs,cg)"} <= set(names)
    converged = [a.loglik for a in hard_fit.attempts if a.converged]
    assert hard_fit.loglik == max(converged)
    assert all(math.isfinite(a.loglik) for a in hard_fit.attempts if a.converged)
    assert hard_fit.optimizer in names
    assert f"best: {hard_fit.optimizer}" in hard_fit.message


def test_an_exact_line_is_a_failed_fit_not_an_infinite_loglik() -> None:
    data = pd.DataFrame({"t": [0.0, 1, 2, 3, 4], "g": ["a", "a", "b", "b", "c"]}).assign(y=lambda d: 1 + 2 * d.t)
    fit = _fit(data, "y ~ t + (1 | g)")
    assert not fit.converged and not fit.usable
    assert math.isnan(fit.loglik)
    assert fit.engine == "statsmodels"
    assert "candidate 'm'" in fit.message
    assert "reproduces the outcome exactly (zero residual variance), so the likelihood is unbounded" in fit.message
    assert all(not a.converged for a in fit.attempts)


def test_two_correlated_bars_are_refused_with_the_reason() -> None:
    rng = np.random.default_rng(1)
    data = pd.DataFrame({
        "y": rng.normal(size=40), "t": np.tile(np.arange(4.0), 10), "x": rng.normal(size=40),
        "g": np.repeat([f"s{i}" for i in range(10)], 4),
    })
    fit = _fit(data, "y ~ t + (t | g) + (0 + x + I(x^2) | g)")
    assert not fit.converged
    assert fit.n_params == 2 + 3 + 3 + 1
    assert "not expressible in statsmodels MixedLM; use engine lme4-style" in fit.message


@pytest.fixture(scope="module")
def sleepstudy_ml(sleepstudy: pd.DataFrame) -> Fit:
    return _fit(sleepstudy, "Reaction ~ Days + (Days | Subject)")


def test_sleepstudy_ml_matches_lme4(sleepstudy_ml: Fit) -> None:
    # R: m <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE)
    fit = sleepstudy_ml
    assert fit.converged and not fit.singular
    assert fit.loglik == pytest.approx(-875.9697, abs=1e-4)  # logLik(m)
    assert fit.reml_criterion is None
    assert fit.n_params == 6  # attr(logLik(m), "df")
    effects = {e.term: e for e in fit.fixed_effects}
    assert effects["(Intercept)"].estimate == pytest.approx(251.405105, abs=1e-4)  # fixef(m)
    assert effects["Days"].estimate == pytest.approx(10.467286, abs=1e-4)
    assert effects["(Intercept)"].std_error == pytest.approx(6.6321227, rel=1e-4)  # sqrt(diag(vcov(m)))
    assert effects["Days"].std_error == pytest.approx(1.5022302, rel=1e-4)
    sds = {c.term: c.sd for c in fit.random_effects}
    assert sds == pytest.approx({"(Intercept)": 23.7797596, "Days": 5.7167985}, rel=1e-3)  # VarCorr(m)
    assert fit.correlations[0].corr == pytest.approx(0.081321, abs=2e-3)
    assert fit.residual_sd == pytest.approx(25.5919070, rel=1e-4)


def test_sleepstudy_reml_criterion_matches_lme4(sleepstudy: pd.DataFrame) -> None:
    # R: REMLcrit(lmer(Reaction ~ Days + (Days | Subject), sleepstudy)) and sqrt(diag(vcov(.)))
    fit = _fit(sleepstudy, "Reaction ~ Days + (Days | Subject)", method="REML")
    assert fit.method == "REML" and fit.converged
    assert fit.reml_criterion == pytest.approx(1743.628272, abs=1e-3)
    assert fit.loglik == pytest.approx(-1743.628272 / 2, abs=1e-3)
    assert fit.fixed_effects[1].std_error == pytest.approx(1.5457896, rel=1e-4)


def test_uncorrelated_slope_becomes_a_variance_component(sleepstudy: pd.DataFrame) -> None:
    # R: logLik(lmer(Reaction ~ Days + (Days || Subject), sleepstudy, REML = FALSE)) = -876.0016276 (df = 5)
    fit = _fit(sleepstudy, "Reaction ~ Days + (Days || Subject)")
    assert fit.loglik == pytest.approx(-876.0016276, abs=1e-4)
    assert fit.n_params == 5
    assert [c.term for c in fit.random_effects] == ["(Intercept)", "Days"]
    assert fit.correlations == ()


def test_the_record_aligns_with_the_rows_and_the_subjects(sleepstudy: pd.DataFrame, sleepstudy_ml: Fit) -> None:
    fit = sleepstudy_ml
    design = _design(sleepstudy, "Reaction ~ Days + (Days | Subject)")
    np.testing.assert_allclose(fit.fitted + fit.residuals, sleepstudy["Reaction"].to_numpy())
    assert list(fit.ranef.columns) == ["group", "level", "term", "estimate", "cond_sd"]
    assert len(fit.ranef) == design.n_groups * 2
    assert (fit.ranef["cond_sd"] > 0).all()
    # Conditional fitted values: fixed part plus the subject's predicted intercept and slope.
    first = fit.ranef[fit.ranef["level"] == design.levels[design.codes[0]]].set_index("term")["estimate"]
    beta = {e.term: e.estimate for e in fit.fixed_effects}
    day = sleepstudy["Days"].iloc[0]
    expected = beta["(Intercept)"] + first["(Intercept)"] + (beta["Days"] + first["Days"]) * day
    assert fit.fitted[0] == pytest.approx(expected)
    assert fit.n_obs == 180 and fit.n_subjects == 18


def test_a_collinear_column_is_dropped_named_and_not_counted(sleepstudy: pd.DataFrame) -> None:
    from longitudinal.fit.candidate import fit_candidate

    frame = sleepstudy.assign(Hours=sleepstudy.Days * 24.0 + 8.0)
    fit = fit_candidate(frame, "ri", "Reaction ~ Days + Hours + (1 | Subject)", engine="statsmodels")
    plain = fit_candidate(sleepstudy, "ri", "Reaction ~ Days + (1 | Subject)", engine="statsmodels")
    assert fit.usable and fit.dropped_terms == ("Hours",)
    assert fit.n_params == plain.n_params == 4  # R: attr(logLik(lmer(...)), "df"): 2 fixed + 1 θ + σ
    assert fit.loglik == pytest.approx(plain.loglik, abs=1e-6)
    assert fit.message.startswith("fixed-effect model matrix is rank deficient so dropping 1 column / coefficient ('Hours')")
