"""The answer does not depend on the units of the data (issue 9): outcome, time and covariates rescaled or
shifted give the same likelihood (plus −n log c for the outcome's scale) and estimates that transform back
exactly, with the same convergence verdicts and the same selection, where lme4 breaks down.

The fits are computed on standardized columns (``longitudinal.fit.scaling``), so a change of units changes only
rounding: the log-likelihoods agree to 1e-9 relative. Estimates agree to what the optimizer determines
(BOBYQA stops within 1e-8 deviance units, so a flat direction — a variance of a factor with four levels — is
known to about 1e-4 relative); that the back-transformation itself is exact is checked at the θ returned,
against the deviance computed on the data as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.lmm import fit_lmm, profiled_deviance
from longitudinal.inference.criteria import select_model
from longitudinal.model.design import build_design
from longitudinal.model.formula import parse_formula
from longitudinal.records import Fit
from longitudinal.simulate import SimulationSpec, simulate_trial
from reference_data import read_sleepstudy

RI = "Reaction ~ Days + (1 | Subject)"
RIS = "Reaction ~ Days + (Days | Subject)"
UNCORRELATED = "Reaction ~ Days + (Days || Subject)"
#: lme4 on the original sleepstudy, ML: as.numeric(logLik(lmer(Reaction ~ Days + (Days | Subject), d, REML = FALSE)))
RIS_LOGLIK = -875.9697
#: Time as epoch seconds and epoch milliseconds (lme4: "Downdated VtV is not positive definite").
EPOCH_SECONDS = (86400.0, 1.7e9)
EPOCH_MILLISECONDS = (86400e3, 1.7e12)


@pytest.fixture(scope="module")
def sleep() -> pd.DataFrame:
    return read_sleepstudy()


@pytest.fixture(scope="module")
def fit_sleep(sleep: pd.DataFrame) -> Callable[..., Fit]:
    """Fits of sleepstudy with ``Days`` → a·Days + b and ``Reaction`` → c·Reaction + d, cached per case."""
    cache: dict[tuple[object, ...], Fit] = {}

    def fit(formula: str, days: tuple[float, float] = (1.0, 0.0), reaction: tuple[float, float] = (1.0, 0.0),
            method: str = "ML") -> Fit:
        key = (formula, days, reaction, method)
        if key not in cache:
            frame = sleep.assign(Days=sleep.Days * days[0] + days[1], Reaction=sleep.Reaction * reaction[0] + reaction[1])
            cache[key] = fit_candidate(frame, formula, formula, method=method)  # type: ignore[arg-type]
        return cache[key]

    return fit


def fixed(fit: Fit) -> dict[str, float]:
    return {fe.term: fe.estimate for fe in fit.fixed_effects}


def sds(fit: Fit) -> dict[str, float]:
    return {c.term: c.sd for c in fit.random_effects}


# --------------------------------------------------------------------------------------------- outcome


@pytest.mark.parametrize("reaction", [(1e-3, 0.0), (1e4, 0.0), (1.0, 1e6), (1e3, 5.0)], ids=str)
@pytest.mark.parametrize("formula", [RI, RIS, UNCORRELATED])
def test_outcome_scale_and_shift(fit_sleep: Callable[..., Fit], formula: str, reaction: tuple[float, float]) -> None:
    c, d = reaction
    base, moved = fit_sleep(formula), fit_sleep(formula, reaction=reaction)
    assert moved.converged and not moved.singular, moved.message
    assert moved.loglik == pytest.approx(base.loglik - base.n_obs * math.log(c), rel=1e-9, abs=1e-7)
    expected = {term: c * value for term, value in fixed(base).items()}
    expected["(Intercept)"] += d
    assert fixed(moved) == pytest.approx(expected, rel=1e-7)
    assert [fe.std_error for fe in moved.fixed_effects] == pytest.approx(
        [c * fe.std_error for fe in base.fixed_effects], rel=1e-7)
    assert moved.residual_sd == pytest.approx(c * base.residual_sd, rel=1e-7)
    assert sds(moved) == pytest.approx({term: c * sd for term, sd in sds(base).items()}, rel=1e-6)
    assert [r.corr for r in moved.correlations] == pytest.approx([r.corr for r in base.correlations], abs=1e-7)
    modes = c * base.ranef["estimate"].to_numpy()
    np.testing.assert_allclose(moved.ranef["estimate"], modes, rtol=1e-6, atol=1e-5 * np.abs(modes).max())
    np.testing.assert_allclose(moved.ranef["cond_sd"], c * base.ranef["cond_sd"], rtol=1e-6)
    np.testing.assert_allclose(moved.residuals, c * base.residuals, rtol=1e-5, atol=1e-6 * c * base.residual_sd)
    np.testing.assert_allclose(moved.fitted, c * base.fitted + d, rtol=1e-7)


# ------------------------------------------------------------------------------------------------ time


@pytest.mark.parametrize("days", [(1e8, 0.0), (1e-6, 0.0), (2.0, 3.0), EPOCH_SECONDS, EPOCH_MILLISECONDS], ids=str)
def test_time_affine_with_correlated_slopes(fit_sleep: Callable[..., Fit], days: tuple[float, float]) -> None:
    # Days' = a Days + b: β_Days' = β_Days / a, β_0' = β_0 − b β_Days / a; the random effects likewise,
    # b' = B⁻¹ b with Z' = Z B: Var(b_0') = Var(b_0) − 2 (b/a) Cov + (b/a)² Var(b_1).
    a, b = days
    base, moved = fit_sleep(RIS), fit_sleep(RIS, days=days)
    assert moved.converged and not moved.singular, moved.message
    assert moved.loglik == pytest.approx(RIS_LOGLIK, abs=1e-4)
    assert moved.loglik == pytest.approx(base.loglik, rel=1e-9)
    beta = fixed(base)
    assert fixed(moved) == pytest.approx(
        {"(Intercept)": beta["(Intercept)"] - b / a * beta["Days"], "Days": beta["Days"] / a}, rel=1e-6)
    sd0, sd1 = sds(base)["(Intercept)"], sds(base)["Days"]
    cov = base.correlations[0].corr * sd0 * sd1
    var0 = sd0 ** 2 - 2 * (b / a) * cov + (b / a) ** 2 * sd1 ** 2
    assert sds(moved) == pytest.approx({"(Intercept)": math.sqrt(var0), "Days": sd1 / a}, rel=1e-6)
    assert moved.correlations[0].corr == pytest.approx((cov - (b / a) * sd1 ** 2) / (sd1 * math.sqrt(var0)), abs=1e-6)
    assert moved.residual_sd == pytest.approx(base.residual_sd, rel=1e-7)
    np.testing.assert_allclose(moved.fitted, base.fitted, rtol=1e-9)


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
@pytest.mark.parametrize("days", [(2.0, 3.0), (1 / 7, 0.0), (1.0, -4.5)], ids=str)
def test_the_theta_returned_gives_the_deviance_returned_on_the_data_as_given(
    sleep: pd.DataFrame, days: tuple[float, float], reml: bool,
) -> None:
    # θ re-triangularized from the standardized fit, and the deviance with its exact offsets, are lme4's
    # quantities for these data: the unstandardized deviance at that θ is the same number.
    frame = sleep.assign(Days=sleep.Days * days[0] + days[1], Reaction=sleep.Reaction * 3.0 + 7.0)
    design = build_design(frame, parse_formula(RIS))
    result = fit_lmm(design, reml=reml)
    assert profiled_deviance(design, result.theta, reml) == pytest.approx(result.deviance, abs=1e-8)
    lam = result.theta[[0, 1, 1, 2]].reshape(2, 2) * [[1, 0], [1, 1]]
    np.testing.assert_allclose(result.sigma ** 2 * lam @ lam.T, result.covariances[0], rtol=1e-10)


@pytest.mark.parametrize("days", [(1e8, 0.0), EPOCH_SECONDS, EPOCH_MILLISECONDS], ids=str)
def test_rescaled_time_warns_as_lme4_and_keeps_the_selection(
    fit_sleep: Callable[..., Fit], days: tuple[float, float],
) -> None:
    fits = [fit_sleep(f, days=days) for f in (RI, RIS)]
    originals = [fit_sleep(f) for f in (RI, RIS)]
    for fit, original in zip(fits, originals):
        assert fit.converged and not fit.singular and fit.usable, fit.message
        assert fit.loglik == pytest.approx(original.loglik, rel=1e-9)
        assert fit.n_params == original.n_params and fit.dropped_terms == ()
        assert fit.message.startswith("Some predictor variables are on very different scales: consider rescaling")
        assert "estimates are exact" in fit.message
    for criterion in ("aic", "bic"):
        assert select_model(fits, criterion).selected == select_model(originals, criterion).selected  # type: ignore[arg-type]


def test_an_uncorrelated_slope_is_invariant_to_the_scale_of_time(fit_sleep: Callable[..., Fit]) -> None:
    base, moved = fit_sleep(UNCORRELATED), fit_sleep(UNCORRELATED, days=(86400.0, 0.0))
    assert moved.converged and not moved.singular
    assert moved.loglik == pytest.approx(base.loglik, rel=1e-9)
    assert sds(moved) == pytest.approx({"(Intercept)": sds(base)["(Intercept)"], "Days": sds(base)["Days"] / 86400}, rel=1e-6)


def test_an_uncorrelated_slope_with_shifted_time_reaches_the_optimum_lme4_stops_short_of(
    fit_sleep: Callable[..., Fit], sleep: pd.DataFrame,
) -> None:
    # A shift changes the model of (Days || Subject) (the intercept's variance is at Days = 0). lme4:
    #   lmer(Reaction ~ Days + (Days || Subject), transform(d, Days = Days + 100), REML = FALSE)
    #   logLik -895.006915, "Model failed to converge with max|grad| = 1.57577"
    # while its own deviance function at the θ found here, devFunOnly = TRUE, f(c(0, 0.01142649)),
    # gives 1789.768818: a higher likelihood, at a singular optimum (intercept variance zero).
    fit = fit_sleep(UNCORRELATED, days=(1.0, 100.0))
    assert -2 * fit.loglik == pytest.approx(1789.768818, abs=1e-5)
    assert fit.loglik > -895.006915
    assert fit.singular and fit.converged and fit.usable
    assert fit.message.startswith("boundary (singular) fit: the variance of '(Intercept)' for Subject is zero")
    design = build_design(sleep.assign(Days=sleep.Days + 100), parse_formula(UNCORRELATED))
    result = fit_lmm(design, reml=False)
    assert profiled_deviance(design, result.theta, False) == pytest.approx(result.deviance, abs=1e-8)


# ------------------------------------------------------------------------------------------------ REML


def test_reml_criterion_is_lme4s_after_the_exact_corrections(fit_sleep: Callable[..., Fit]) -> None:
    base = fit_sleep(RIS, method="REML")
    assert base.reml_criterion == pytest.approx(1743.628272, abs=2e-4)  # R: REMLcrit(lmer(Reaction ~ Days + (Days | Subject), d))
    n, p = base.n_obs, len(base.fixed_effects)
    # Outcome × c: the criterion gains (n − p) log c² exactly (lme4 agrees: 4202.789151 for Reaction * 1000 + 5).
    scaled = fit_sleep(RIS, reaction=(1e3, 5.0), method="REML")
    assert scaled.reml_criterion == pytest.approx(base.reml_criterion + (n - p) * 2 * math.log(1e3), abs=1e-6)
    assert scaled.reml_criterion == pytest.approx(4202.789151, abs=2e-4)
    # X reparametrized: log|RX'RX| changes by 2 log|det A|, so the criterion is lme4's on that data:
    #   REMLcrit(lmer(Reaction ~ Days + (Days | Subject), transform(d, Days = f(Days))))
    lme4 = {(1 / 7, 0.0): 1739.736452, (2.0, 3.0): 1745.014566, (1.0, -4.5): 1743.628272}
    for days, value in lme4.items():
        fit = fit_sleep(RIS, days=days, method="REML")
        assert fit.converged and fit.reml_criterion == pytest.approx(value, abs=2e-4), days
        assert fit.reml_criterion == pytest.approx(base.reml_criterion + 2 * math.log(abs(days[0])), abs=1e-6)
    # Days * 10 + 100: lme4 stops short ("failed to converge with max|grad| = 1.14006", 1749.899711);
    # the optimum is the original's plus 2 log 10.
    fit = fit_sleep(RIS, days=(10.0, 100.0), method="REML")
    assert fit.reml_criterion == pytest.approx(base.reml_criterion + 2 * math.log(10.0), abs=1e-6)
    assert fit.reml_criterion < 1749.899711


# ------------------------------------------------------------------------------------ simulated studies


@pytest.fixture(scope="module")
def trial() -> pd.DataFrame:
    return simulate_trial(SimulationSpec(n_subjects=60, seed=11, site_effects=(0.0, 2.0, -1.5, 1.0)))


TRIAL = {
    "ri": "score ~ week * arm + age + (1 | patient_id)",
    "ris": "score ~ week * arm + age + (week | patient_id)",
    "sites": "score ~ week * arm + age + (week | patient_id) + (1 | site)",
}


@pytest.fixture(scope="module")
def trial_fits(trial: pd.DataFrame) -> dict[str, dict[str, Fit]]:
    """Each candidate on the trial as simulated, with age × 1e8, and with week as epoch seconds."""
    frames = {
        "original": trial,
        "age": trial.assign(age=trial.age * 1e8),
        "epoch": trial.assign(week=trial.week * 7 * 86400.0 + 1.7e9),
    }
    return {case: {name: fit_candidate(frame, name, formula) for name, formula in TRIAL.items()}
            for case, frame in frames.items()}


def patient_modes(fit: Fit) -> pd.DataFrame:
    ranef = fit.ranef[fit.ranef["group"] == "patient_id"]
    return ranef.pivot(index="level", columns="term", values="estimate").astype(float)


@pytest.mark.parametrize("case", ["age", "epoch"])
def test_simulated_trial_in_awkward_units_one_and_several_grouping_factors(
    trial_fits: dict[str, dict[str, Fit]], case: str,
) -> None:
    for name in TRIAL:
        base, moved = trial_fits["original"][name], trial_fits[case][name]
        assert base.converged and moved.converged and moved.singular == base.singular, (name, moved.message)
        assert moved.loglik == pytest.approx(base.loglik, rel=1e-9), name
        assert "consider rescaling" in moved.message
        if case == "age":
            assert fixed(moved)["age"] == pytest.approx(fixed(base)["age"] / 1e8, rel=1e-6)
            assert {k: v for k, v in fixed(moved).items() if k != "age"} == pytest.approx(
                {k: v for k, v in fixed(base).items() if k != "age"}, rel=1e-6)
            modes = base.ranef["estimate"].to_numpy()
            np.testing.assert_allclose(moved.ranef["estimate"], modes, rtol=1e-3, atol=1e-4 * np.abs(modes).max())
        else:
            a, b = 7 * 86400.0, 1.7e9
            assert fixed(moved)["week"] == pytest.approx(fixed(base)["week"] / a, rel=1e-5)
            if name != "ri":  # b' = B⁻¹ b: the slope over a, the intercept moved to week' = 0
                before, after = patient_modes(base), patient_modes(moved)
                np.testing.assert_allclose(after["week"], before["week"] / a, rtol=1e-3, atol=1e-4 * before["week"].abs().max() / a)
                expected = before["(Intercept)"] - b / a * before["week"]
                np.testing.assert_allclose(after["(Intercept)"], expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
        np.testing.assert_allclose(moved.fitted, base.fitted, rtol=1e-5)
    for criterion in ("aic", "bic"):
        assert (select_model(list(trial_fits[case].values()), criterion).selected  # type: ignore[arg-type]
                == select_model(list(trial_fits["original"].values()), criterion).selected)  # type: ignore[arg-type]


def test_a_site_factor_in_epoch_time_keeps_its_modes(trial_fits: dict[str, dict[str, Fit]]) -> None:
    # The crossed factor's modes (intercepts per site) do not depend on the units of time.
    def site_modes(fit: Fit) -> pd.Series:
        ranef = fit.ranef[fit.ranef["group"] == "site"]
        return ranef.set_index("level")["estimate"].astype(float)

    base, moved = trial_fits["original"]["sites"], trial_fits["epoch"]["sites"]
    pd.testing.assert_series_equal(site_modes(moved), site_modes(base), rtol=1e-3)


# --------------------------------------------------------------------------------------- collinearity


def test_a_collinear_covariate_is_dropped_and_counted_out(trial: pd.DataFrame) -> None:
    frame = trial.assign(age_months=trial.age * 12.0 + 6.0)
    fit = fit_candidate(frame, "ris", "score ~ week * arm + age + age_months + (week | patient_id)")
    without = fit_candidate(trial, "ris", "score ~ week * arm + age + (week | patient_id)")
    assert fit.dropped_terms == ("age_months",)
    assert fit.n_params == without.n_params  # k counts the kept columns, as lme4
    assert fit.loglik == pytest.approx(without.loglik, rel=1e-9)
    assert fit.message.startswith(
        "fixed-effect model matrix is rank deficient so dropping 1 column / coefficient ('age_months')")
    assert [fe.term for fe in fit.fixed_effects] == [fe.term for fe in without.fixed_effects]


# ------------------------------------------------------------------------------------------ singular fits


def test_a_singular_slope_model_with_a_gradient_at_the_boundary_stays_in_the_selection() -> None:
    # No slope variance in the data: the correlated model's optimum has Λ's last diagonal at 0 (correlation
    # +1), and the central-difference gradient along the bar's other θ is above lme4's 0.002 there — lme4
    # does not test the gradient of a singular fit (checkConv returns after "boundary (singular) fit"), so
    # the fit converged, is singular, and competes by AIC and BIC.
    from longitudinal.fit import optimize
    from longitudinal.fit.lmm import fit_lmm, profiled_deviance
    from longitudinal.fit.lmm.crossproducts import compute_crossproducts
    from longitudinal.fit.scaling import standardize

    frame = simulate_trial(SimulationSpec(n_subjects=40, seed=39, random_slope_sd=0.0, random_correlation=0.0))
    formula = "score ~ week * arm + age + (week | patient_id)"
    design, _ = standardize(build_design(frame, parse_formula(formula)))
    products = compute_crossproducts(design)
    theta = fit_lmm(design, reml=False).theta  # already standardized: the θ the checks see
    gradient, _ = optimize.derivatives(lambda t: profiled_deviance(products, t, False), theta,
                                        profiled_deviance(products, theta, False))
    assert theta[2] < 1e-4 and np.max(np.abs(gradient[:2])) > optimize.GRADIENT_TOL, "the premise of this test"

    fits = [fit_candidate(frame, "ri", "score ~ week * arm + age + (1 | patient_id)"), fit_candidate(frame, "ris", formula)]
    ris = fits[1]
    assert ris.singular and ris.converged and ris.usable
    assert ris.message == "boundary (singular) fit: the correlation of '(Intercept)' and 'week' for patient_id is 1"
    table = select_model(fits, "aic").table.set_index("model")
    assert table.loc["ris", "converged"] and table.loc["ris", "singular"]
    assert table.loc["ris", "aic"] == pytest.approx(ris.aic)
    assert table["aic_weight"].sum() == pytest.approx(1.0) and table.loc["ris", "aic_weight"] > 0


def test_an_uncorrelated_slope_on_a_far_origin_says_the_model_depends_on_it(fit_sleep: Callable[..., Fit]) -> None:
    # (Days || Subject) with Days in epoch seconds is another model (its intercept variance is at 1970):
    # the fit is right for it, and the note says why it may not be the model meant.
    far = fit_sleep(UNCORRELATED, days=(86400.0, 1.7e9))
    assert ("the random slope of 'Days' for Subject has no intercept in its bar, so the model depends on where "
            "Days = 0, and Days lies far from zero here") in far.message
    assert "use a correlated (Days | Subject) term, which does not depend on the origin" in far.message
    for fit in (fit_sleep(UNCORRELATED), fit_sleep(UNCORRELATED, days=(86400.0, 0.0)),
                fit_sleep("Reaction ~ Days + (Days | Subject)", days=(86400.0, 1.7e9))):
        assert "depends on where" not in fit.message  # near the origin, or a correlated slope: no note
