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


def _sleepstudy() -> pd.DataFrame:
    return read_sleepstudy()


def _pastes() -> pd.DataFrame:
    return read_reference_csv(DATA / "pastes.csv", ["batch", "cask"])


def _penicillin() -> pd.DataFrame:
    return read_reference_csv(DATA / "penicillin.csv", ["plate", "sample"])


# name: (data, formula, lme4's SD intervals by (group, term), correlations by (group, term1, term2), σ's)
CASES = {
    "sleepstudy_ris": (
        _sleepstudy, "Reaction ~ Days + (Days | Subject)",
        {("Subject", "(Intercept)"): (14.3814677401, 37.7159963228), ("Subject", "Days"): (3.8011640712, 8.7533831195)},
        {("Subject", "(Intercept)", "Days"): (-0.4815007399, 0.6849859786)},
        (22.8982668813, 28.8579965349),
    ),
    "sleepstudy_ri": (
        _sleepstudy, "Reaction ~ Days + (1 | Subject)",
        {("Subject", "(Intercept)"): (26.00712045, 52.93598353)}, {}, (27.81384721, 34.59104986),
    ),
    "sleepstudy_uncorrelated": (
        _sleepstudy, "Reaction ~ Days + (Days || Subject)",
        {("Subject", "(Intercept)"): (15.258646876, 37.786472436), ("Subject", "Days"): (3.964073807, 8.769159086)},
        {}, (22.880554648, 28.787597594),
    ),
    # nested: lme4's lower end for batch is 0 (its profile stays within the cut-off down to SD 0)
    "pastes_nested": (
        _pastes, "strength ~ 1 + (1 | batch/cask)",
        {("batch:cask", "(Intercept)"): (2.1579337085, 4.053588941), ("batch", "(Intercept)"): (0.0, 2.946591111)},
        {}, (0.6520233561, 1.085448104),
    ),
    "penicillin_crossed": (
        _penicillin, "diameter ~ 1 + (1 | plate) + (1 | sample)",
        {("plate", "(Intercept)"): (0.6335657876, 1.1821039844), ("sample", "(Intercept)"): (1.0957892651, 3.5562919101)},
        {}, (0.4858454002, 0.6294534785),
    ),
}


def _fit(name: str, method: str) -> tuple[Fit, pd.DataFrame]:
    read, formula = CASES[name][0], CASES[name][1]
    visits = read()
    return fit_candidate(visits, name, formula, method=method), visits  # type: ignore[arg-type]


def _assert_intervals(found: ProfileIntervals, sds: dict, correlations: dict, sigma: tuple[float, float]) -> None:
    assert set(found.sds) == set(sds)
    assert set(found.correlations) == set(correlations)
    for key, expected in [*sds.items(), *correlations.items()]:
        got = found.sds.get(key, found.correlations.get(key))
        assert got == pytest.approx(expected, rel=TOLERANCE, abs=1e-9), key
    assert found.residual_sd == pytest.approx(sigma, rel=TOLERANCE)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_lme4_confint_profile(name: str, method: str) -> None:
    fit, visits = _fit(name, method)
    found = profile_intervals(fit, visits)
    assert found is not None
    _assert_intervals(found, *CASES[name][2:])
    assert found.notes == ()


def test_sleepstudy_within_1e4_of_lme4() -> None:
    """The well-determined random-slope profile: every end within 1e-4 of lme4's (the differences are lme4's
    spline: its REML and ML runs differ by 1.3e-5 on the intercept's lower end)."""
    fit, visits = _fit("sleepstudy_ris", "REML")
    found = profile_intervals(fit, visits)
    assert found is not None
    sds, correlations, sigma = CASES["sleepstudy_ris"][2:]
    for key, expected in sds.items():
        assert found.sds[key] == pytest.approx(expected, rel=1e-4)
    for key, expected in correlations.items():
        assert found.correlations[key] == pytest.approx(expected, rel=1e-4)
    assert found.residual_sd == pytest.approx(sigma, rel=1e-4)


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
    assert profile_intervals(dataclasses.replace(fit, family="poisson"), visits) is None
    assert profile_intervals(dataclasses.replace(fit, loglik=float("nan")), visits) is None
    assert profile_intervals(dataclasses.replace(fit, random_effects=()), visits) is None


def test_level_must_be_a_probability() -> None:
    fit, visits = _fit("sleepstudy_ri", "ML")
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1, not 95"):
        profile_intervals(fit, visits, level=95)
