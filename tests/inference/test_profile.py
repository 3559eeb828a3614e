"""Profile-likelihood intervals of the variance parameters against lme4's confint(method = "profile").

The lme4 numbers below come from lme4 1.1.31 (R 4.2), each fit as

    ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))
    m <- lmer(<formula>, <data>, REML = <REML>, control = ctrl)
    confint(m, method = "profile", oldNames = FALSE, parm = "theta_")

with the CSV read back by read.csv and the factor columns as factor(as.character(x)). lme4 profiles the ML
deviance for a REML fit too (``devfun2`` starts with ``refitML``): the REML and ML fits of one model have the
same intervals, up to the accuracy of lme4's interpolating spline (about 1e-5 relative here; both are checked).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from longitudinal.fit.candidate import fit_candidate
from longitudinal.inference.profile import ProfileIntervals, profile_intervals
from longitudinal.records import Fit
from reference_data import read_reference_csv, read_sleepstudy

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "reference" / "data"

#: lme4's spline interpolation of its profile against the roots found here: within 1e-4 on these cases.
TOLERANCE = 1e-3


def _reference(file: str, factors: list[str]) -> Callable[[], pd.DataFrame]:
    return partial(read_reference_csv, DATA / file, factors)


_sleepstudy = read_sleepstudy
_pastes = _reference("pastes.csv", ["batch", "cask"])
_penicillin = _reference("penicillin.csv", ["plate", "sample"])
_singular = _reference("sim_singular.csv", ["patient_id", "arm"])
_igf = _reference("igf.csv", ["Lot"])
_raters = _reference("sim_raters.csv", ["patient", "rater", "arm"])


@dataclass(frozen=True)
class Case:
    """A model, its data and lme4's intervals: SDs by (group, term), correlations by (group, term1, term2), σ."""

    read: Callable[[], pd.DataFrame]
    formula: str
    sds: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    correlations: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)
    sigma: tuple[float, float] = (math.nan, math.nan)


CASES = {
    "sleepstudy_ris": Case(
        _sleepstudy, "Reaction ~ Days + (Days | Subject)",
        {("Subject", "(Intercept)"): (14.3814677401, 37.7159963228), ("Subject", "Days"): (3.8011640712, 8.7533831195)},
        {("Subject", "(Intercept)", "Days"): (-0.4815007399, 0.6849859786)},
        (22.8982668813, 28.8579965349),
    ),
    "sleepstudy_ri": Case(
        _sleepstudy, "Reaction ~ Days + (1 | Subject)",
        {("Subject", "(Intercept)"): (26.00712045, 52.93598353)}, {}, (27.81384721, 34.59104986),
    ),
    "sleepstudy_uncorrelated": Case(
        _sleepstudy, "Reaction ~ Days + (Days || Subject)",
        {("Subject", "(Intercept)"): (15.258646876, 37.786472436), ("Subject", "Days"): (3.964073807, 8.769159086)},
        {}, (22.880554648, 28.787597594),
    ),
    # nested: lme4's lower end for batch is 0 (its profile stays within the cut-off down to SD 0)
    "pastes_nested": Case(
        _pastes, "strength ~ 1 + (1 | batch/cask)",
        {("batch:cask", "(Intercept)"): (2.1579337085, 4.053588941), ("batch", "(Intercept)"): (0.0, 2.946591111)},
        {}, (0.6520233561, 1.085448104),
    ),
    # singular: the slope's SD is 0 at the optimum, so is its lower end
    "singular_uncorrelated": Case(
        _singular, "score ~ week * arm + age + (week || patient_id)",
        {("patient_id", "(Intercept)"): (4.546537714, 10.247405423), ("patient_id", "week"): (0.0, 1.319637757)},
        {}, (3.652266275, 5.531757985),
    ),
    "penicillin_crossed": Case(
        _penicillin, "diameter ~ 1 + (1 | plate) + (1 | sample)",
        {("plate", "(Intercept)"): (0.6335657876, 1.1821039844),
         ("sample", "(Intercept)"): (1.0957892651, 3.5562919101)},
        {}, (0.4858454002, 0.6294534785),
    ),
}
SLOW_CASES = {  # a correlated slope crossed with a second factor: about 4 s, so ML only
    "raters_crossed": Case(
        _raters, "y ~ t * arm + (t | patient) + (1 | rater)",
        {("patient", "(Intercept)"): (2.7173710376, 3.83637465560), ("patient", "t"): (0.4673980670, 0.71574474491),
         ("rater", "(Intercept)"): (0.7190081599, 2.06912802933)},
        {("patient", "(Intercept)", "t"): (-0.4346847745, 0.06589270844)},
        (1.3244036899, 1.54903325917),
    ),
}


#: Models whose lme4 intervals are partly wrong (see their tests): data and formula.
WHERE_LME4_MISSES = {
    "singular": Case(_singular, "score ~ week * arm + age + (week | patient_id)"),
    "igf": Case(_igf, "conc ~ age + (age | Lot)"),
}


def _fit(name: str, method: str) -> tuple[Fit, pd.DataFrame]:
    case = {**CASES, **SLOW_CASES, **WHERE_LME4_MISSES}[name]
    visits = case.read()
    return fit_candidate(visits, name, case.formula, method=method), visits  # type: ignore[arg-type]


def _assert_intervals(found: ProfileIntervals, expected: Case) -> None:
    assert set(found.sds) == set(expected.sds)
    assert set(found.correlations) == set(expected.correlations)
    for key, interval in expected.sds.items():
        assert found.sds[key] == pytest.approx(interval, rel=TOLERANCE, abs=1e-12), key
    for pair, interval in expected.correlations.items():
        assert found.correlations[pair] == pytest.approx(interval, rel=TOLERANCE, abs=1e-12), pair
    assert found.residual_sd == pytest.approx(expected.sigma, rel=TOLERANCE)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_lme4_confint_profile(name: str, method: str) -> None:
    fit, visits = _fit(name, method)
    found = profile_intervals(fit, visits)
    assert found is not None
    _assert_intervals(found, CASES[name])
    assert found.notes == ()


def test_crossed_factors_with_a_correlated_slope_equal_lme4() -> None:
    fit, visits = _fit("raters_crossed", "ML")
    found = profile_intervals(fit, visits)
    assert found is not None
    _assert_intervals(found, SLOW_CASES["raters_crossed"])


def test_correlation_at_minus_one_profiles_both_branches() -> None:
    """A singular random slope whose correlation with the intercept is −1 at the optimum: the correlation's
    interval is (−1, 1) and the slope SD's lower end 0, as lme4's. The intercept SD's profile below the
    estimate leaves the ρ = −1 branch for ρ = +1, where the deviance is lower; lme4 follows ρ = −1 and ends at
    4.5884. lme4's own objective (lme4:::devfun2 of the ML fit) at this lower end, (sd 4.34785, ρ 0.99999,
    slope sd 0.404888, σ 4.600527), is 3.841465 above the minimum (qchisq(0.95, 1) = 3.841459); its best on
    the ρ = −1 branch is 5.03 above. At the upper end lme4's spline overshoots: its 11.63999 is 3.8553 above
    the minimum, this 11.62861 is 3.841459 above."""
    fit, visits = _fit("singular", "REML")
    found = profile_intervals(fit, visits)
    assert found is not None
    assert found.correlations[("patient_id", "(Intercept)", "week")] == (-1.0, 1.0)
    slope = found.sds[("patient_id", "week")]
    assert slope[0] == 0.0 and slope[1] == pytest.approx(1.519368785, rel=TOLERANCE)
    assert found.residual_sd == pytest.approx((3.63977747, 5.517254735), rel=TOLERANCE)
    assert found.sds[("patient_id", "(Intercept)")] == pytest.approx((4.34785, 11.62861), rel=1e-5)
    assert found.notes == ()


def test_singular_correlation_where_lme4_profile_fails() -> None:
    """nlme's IGF, ρ = −1 at the optimum: lme4's profile is not monotone there (its inner optimizations jump
    between branches) and its spline gives (0.0718, 0.1669) for the intercept SD and (0.7495, 0.8440) for σ.
    lme4's own devfun2 says otherwise: minimized over the rest at intercept SD 0.1669 it is only 0.597 above
    the minimum, and at each end here, (sd 0.34607755, ρ −1, slope sd 0.01787463, σ 0.82078642) and σ =
    0.74934207 / 0.89924405 with the rest as found, it is 3.841459 above: these are the profile's ends."""
    fit, visits = _fit("igf", "REML")
    found = profile_intervals(fit, visits)
    assert found is not None
    assert found.sds[("Lot", "(Intercept)")] == pytest.approx((0.0, 0.34607755), rel=1e-5)
    assert found.sds[("Lot", "age")] == pytest.approx((0.0, 0.01980341618), rel=TOLERANCE)  # lme4's, right here
    assert found.correlations[("Lot", "(Intercept)", "age")] == (-1.0, 1.0)
    assert found.residual_sd == pytest.approx((0.74934207, 0.89924405), rel=1e-5)


def test_residual_sd_where_lme4_profile_stalls() -> None:
    """nlme's Orthodont, ``(1 + age | Subject)``, ML: lme4's profile of σ stalls (ζ stuck at 0.98 over 40
    steps), its upper end is NA and its lower end 1.2036, where its own devfun2 is only 0.8205 above the
    minimum; at the ends here, (sd 2.790537, ρ −0.774355, slope sd 0.222251, σ 1.097031) and (1.296329,
    ρ ≈ 1, 0.036126, σ 1.588388), it is 3.841459 above. The other ends agree with lme4's."""
    visits = _reference("orthodont.csv", ["Subject", "Sex"])()
    fit = fit_candidate(visits, "ris", "distance ~ age * Sex + (1 + age | Subject)", method="ML")
    found = profile_intervals(fit, visits)
    assert found is not None
    assert found.residual_sd == pytest.approx((1.0970308, 1.5883881), rel=1e-5)
    # the intercept's lower end is where its profile is flattest (ζ′ ≈ 0 near SD 0): 3e-6 from lme4's
    assert found.sds[("Subject", "(Intercept)")] == pytest.approx((0.0012445771226, 4.15028810662509),
                                                                  rel=TOLERANCE, abs=1e-5)
    assert found.sds[("Subject", "age")] == pytest.approx((0.0, 0.338563072457272), rel=TOLERANCE, abs=1e-12)
    assert found.correlations[("Subject", "(Intercept)", "age")] == (-1.0, 1.0)


def test_three_correlated_terms_where_lme4_inner_optimizations_stop_short() -> None:
    """A 3 × 3 bar (intercept, Days, Days²), ML: every end here has lme4's own objective (lme4:::devfun2)
    3.841459 above its minimum, the profile minimized over the rest by ten Nelder–Mead + BFGS restarts in R
    agreeing with the inner minima here to 1e-6 (at cor(Days, Days²) = −0.97191, lme4's lower end, 3.768056;
    at −0.68719, its upper end, 3.904580; at cor((Intercept), Days²) = 0.80684, 3.700048; at cor((Intercept),
    Days) = 0.33584, 4.399186; at SD((Intercept)) = 16.0569, 3.863383). lme4's profile (bobyqa out of
    evaluations, 5 minutes) is off on those ends — by 20% on cor((Intercept), Days)'s upper — and right on
    the others, which are checked against it."""
    visits = read_sleepstudy()
    fit = fit_candidate(visits, "quadratic", "Reaction ~ Days + I(Days^2) + (Days + I(Days^2) | Subject)", method="ML")
    found = profile_intervals(fit, visits)
    assert found is not None
    assert found.notes == ()
    sds = {"(Intercept)": (16.08639565, 43.51444866), "Days": (8.250826154, 22.41765158),
           "I(Days^2)": (0.7834206796, 2.267899073)}
    for term, interval in sds.items():
        assert found.sds[("Subject", term)] == pytest.approx(interval, rel=1e-5)
    correlations = {("(Intercept)", "Days"): (-0.7764433415, 0.2785041183),
                    ("(Intercept)", "I(Days^2)"): (-0.2235890623, 0.8110124493),
                    ("Days", "I(Days^2)"): (-0.972233622, -0.6904586374)}
    for (first, second), interval in correlations.items():
        assert found.correlations[("Subject", first, second)] == pytest.approx(interval, rel=1e-5)
    assert found.residual_sd == pytest.approx((20.21758869, 25.89121343), rel=1e-5)
    lme4_right = {"Days": (8.2511196691, 22.4176441042), "I(Days^2)": (0.7835378169, 2.2678986923)}
    for term, interval in lme4_right.items():
        assert found.sds[("Subject", term)] == pytest.approx(interval, rel=TOLERANCE)
    assert found.sds[("Subject", "(Intercept)")][1] == pytest.approx(43.5144338400, rel=TOLERANCE)
    assert found.residual_sd == pytest.approx((20.2175908359, 25.8912122095), rel=TOLERANCE)


def test_intervals_do_not_depend_on_how_the_criterion_is_evaluated() -> None:
    """Subjects seen at the same times are evaluated by visit pattern, others group by group: sleepstudy's Days
    moved by 1e-9 per subject leave no two subjects alike, and the intervals move by about that much."""
    visits = read_sleepstudy()
    shifted = visits.assign(Days=visits["Days"] + 1e-9 * pd.factorize(visits["Subject"])[0])
    for method in ("REML", "ML"):
        found = [profile_intervals(fit_candidate(frame, "ris", "Reaction ~ Days + (Days | Subject)", method=method),
                                   frame, reml=method == "REML") for frame in (visits, shifted)]
        assert found[0] is not None and found[1] is not None
        for key, interval in found[0].sds.items():
            assert found[1].sds[key] == pytest.approx(interval, rel=1e-6), key
        for pair, interval in found[0].correlations.items():
            assert found[1].correlations[pair] == pytest.approx(interval, rel=1e-6), pair
        assert found[1].residual_sd == pytest.approx(found[0].residual_sd, rel=1e-6)


def test_intervals_follow_the_units_of_the_data() -> None:
    """Days × 1e8 (where lmer stops: "Downdated VtV is not positive definite") and Reaction × 1000: the SDs
    and σ move with the units, the correlation not at all."""
    visits = read_sleepstudy()
    rescaled = visits.assign(Days8=visits["Days"] * 1e8, Reaction_ms=visits["Reaction"] * 1000.0)
    fit = fit_candidate(visits, "ris", "Reaction ~ Days + (Days | Subject)", method="REML")
    scaled_fit = fit_candidate(rescaled, "ris", "Reaction_ms ~ Days8 + (Days8 | Subject)", method="REML")
    original, scaled = profile_intervals(fit, visits), profile_intervals(scaled_fit, rescaled)
    assert original is not None and scaled is not None
    assert scaled.sds[("Subject", "(Intercept)")] == pytest.approx(
        tuple(1000.0 * x for x in original.sds[("Subject", "(Intercept)")]), rel=1e-6)
    assert scaled.sds[("Subject", "Days8")] == pytest.approx(
        tuple(1000.0 / 1e8 * x for x in original.sds[("Subject", "Days")]), rel=1e-6)
    assert scaled.correlations[("Subject", "(Intercept)", "Days8")] == pytest.approx(
        original.correlations[("Subject", "(Intercept)", "Days")], rel=1e-6)
    assert scaled.residual_sd == pytest.approx(tuple(1000.0 * x for x in original.residual_sd), rel=1e-6)


def test_sleepstudy_within_1e4_of_lme4() -> None:
    """The well-determined random-slope profile: every end within 1e-4 of lme4's (the differences are lme4's
    spline: its REML and ML runs differ by 1.3e-5 on the intercept's lower end)."""
    fit, visits = _fit("sleepstudy_ris", "REML")
    found = profile_intervals(fit, visits)
    assert found is not None
    lme4 = CASES["sleepstudy_ris"]
    for key, interval in lme4.sds.items():
        assert found.sds[key] == pytest.approx(interval, rel=1e-4)
    for pair, interval in lme4.correlations.items():
        assert found.correlations[pair] == pytest.approx(interval, rel=1e-4)
    assert found.residual_sd == pytest.approx(lme4.sigma, rel=1e-4)


def test_level_narrows_the_interval() -> None:
    fit, visits = _fit("sleepstudy_ri", "ML")
    wide = profile_intervals(fit, visits, level=0.95)
    narrow = profile_intervals(fit, visits, level=0.5)
    assert wide is not None and narrow is not None
    key = ("Subject", "(Intercept)")
    assert wide.sds[key][0] < narrow.sds[key][0] < fit.random_effects[0].sd < narrow.sds[key][1] < wide.sds[key][1]


def test_reml_criterion_profiles_around_the_reml_estimates() -> None:
    """``reml=True`` (not lme4's) profiles the REML criterion: the REML estimate lies inside, and the interval
    moves up from the ML one (REML SDs are larger)."""
    fit, visits = _fit("sleepstudy_ri", "REML")
    ml = profile_intervals(fit, visits)
    reml = profile_intervals(fit, visits, reml=True)
    assert ml is not None and reml is not None
    key = ("Subject", "(Intercept)")
    assert reml.sds[key][0] < fit.random_effects[0].sd < reml.sds[key][1]
    assert reml.sds[key][0] > ml.sds[key][0] and reml.sds[key][1] > ml.sds[key][1]


def test_none_where_not_defined() -> None:
    fit, visits = _fit("sleepstudy_ri", "ML")
    assert profile_intervals(dataclasses.replace(fit, loglik=float("nan")), visits) is None
    assert profile_intervals(dataclasses.replace(fit, random_effects=()), visits) is None


def test_level_must_be_a_probability() -> None:
    fit, visits = _fit("sleepstudy_ri", "ML")
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1, not 95"):
        profile_intervals(fit, visits, level=95)


# Written by tests/reference/make_reference_inference.R: REML fits, `profile` = confint(method = "profile")
# (the ML deviance profiled), `profile_reml` = lme4's profiling code run on the REML criterion.
INFERENCE = json.loads((ROOT / "tests" / "reference" / "inference_reference.json").read_text())
GAUSSIAN = {case["name"]: case for case in INFERENCE["cases"] if case["family"] == "gaussian"}


def _expected(name: str, profile: str) -> Case:
    """The reference case ``name`` with the intervals of its entry ``profile``."""
    case = GAUSSIAN[name]
    intervals = case[profile]
    return Case(
        read=_reference(case["data"], case["factors"]), formula=case["formula"],
        sds={(e["group"], e["term"]): (e["low"], e["high"]) for e in intervals["sd"]},
        correlations={(e["group"], e["term1"], e["term2"]): (e["low"], e["high"]) for e in intervals["cor"]},
        sigma=(intervals["sigma"][0], intervals["sigma"][1]),
    )


@pytest.mark.parametrize("name", sorted(GAUSSIAN))
def test_profile_intervals_equal_lme4(name: str) -> None:
    """Within 4e-4 of lme4's spline (sim_trial_slopes_age's correlation), most within 1e-5."""
    expected = _expected(name, "profile")
    visits = expected.read()
    fit = fit_candidate(visits, name, expected.formula, method="REML")
    found = profile_intervals(fit, visits, level=GAUSSIAN[name]["profile"]["level"])
    assert found is not None
    _assert_intervals(found, expected)
    assert found.notes == ()


@pytest.mark.parametrize("name", sorted(GAUSSIAN))
def test_reml_profile_equals_lme4_profiling_the_reml_criterion(name: str) -> None:
    """Within 4.1e-4 (bodyweight_slopes' correlation), most within 1e-5."""
    expected = _expected(name, "profile_reml")
    visits = expected.read()
    fit = fit_candidate(visits, name, expected.formula, method="REML")
    found = profile_intervals(fit, visits, level=GAUSSIAN[name]["profile_reml"]["level"], reml=True)
    assert found is not None
    _assert_intervals(found, expected)


def test_glmm_profiles_over_theta_and_beta_as_lme4() -> None:
    """glmer fits, profiled over the other SDs and correlations and β (lme4's devfun2 for a GLMM), no σ:

        m <- glmer(y ~ t * arm + (1 | id), <glmm_sim_binary>, family = binomial,
                   control = glmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12), tolPwrss = 1e-12))
        m <- glmer(y ~ t + arm + (t | id), <glmm_sim_count>, family = poisson,
                   control = glmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12)))
        confint(m, method = "profile", oldNames = FALSE, parm = "theta_")

    The Poisson fit with tolPwrss = 1e-12 makes lme4's profile stop ("not numerically consistent"); at
    glmer's default PIRLS tolerance its logLik is 8e-4 below the optimum, and its ends within 1.4e-4 of these.
    """
    visits = _reference("glmm_sim_binary.csv", ["id", "arm"])()
    fit = fit_candidate(visits, "binary", "y ~ t * arm + (1 | id)", family="binomial")
    found = profile_intervals(fit, visits)
    assert found is not None
    assert found.residual_sd is None and found.notes == ()
    assert found.sds[("id", "(Intercept)")] == pytest.approx((0.9129564882, 1.333672969), rel=1e-4)

    visits = _reference("glmm_sim_count.csv", ["id", "arm"])()
    fit = fit_candidate(visits, "count", "y ~ t + arm + (t | id)", family="poisson")
    found = profile_intervals(fit, visits)
    assert found is not None
    assert found.sds[("id", "(Intercept)")] == pytest.approx((0.4013311901, 0.5718782566), rel=TOLERANCE)
    assert found.sds[("id", "t")] == pytest.approx((0.1016443505, 0.1549796795), rel=TOLERANCE)
    assert found.correlations[("id", "(Intercept)", "t")] == pytest.approx((-0.0102585478, 0.6070866959),
                                                                           rel=TOLERANCE, abs=1e-4)


def test_no_reml_profile_for_a_glmm() -> None:
    visits = _reference("glmm_sim_binary.csv", ["id", "arm"])()
    fit = fit_candidate(visits, "binary", "y ~ t * arm + (1 | id)", family="binomial")
    with pytest.raises(ValueError, match="'binary' is a binomial GLMM: there is no REML criterion to profile"):
        profile_intervals(fit, visits, reml=True)
