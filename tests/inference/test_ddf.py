"""Satterthwaite and Kenward–Roger df against lmerTest 3.1.3 / pbkrtest 0.5.2 (R 4.2), and their refusals.

The R numbers come from, with ``ss <- read.csv("tests/fixtures/sleepstudy.csv")`` (Subject a factor) and
``ss$Batch <- factor(paste0("b", (seq_len(nrow(ss)) - 1) %% 6))`` (six arbitrary batches: a variance at zero)::

    library(lmerTest)                                     # with pbkrtest installed
    m <- lmer(<formula>, ss)                              # REML
    summary(m)$coefficients                               # Satterthwaite
    summary(m, ddf = "Kenward-Roger")$coefficients        # Kenward–Roger (adjusted SEs)
    contest1D(m, c(1, 5)); contest1D(m, c(1, 5), ddf = "Kenward-Roger")
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from longitudinal.errors import ConfigError
from longitudinal.fit.candidate import fit_candidate
from longitudinal.inference import ddf
from longitudinal.inference.ddf import fixed_effect_inference, richardson_hessian, richardson_jacobian
from longitudinal.model.design import build_design
from longitudinal.model.formula import parse_formula
from longitudinal.records import Fit
from tests.reference_data import read_reference_csv, read_sleepstudy

ROOT = Path(__file__).resolve().parents[2]

# formula → (Satterthwaite df, KR df, KR SE) per coefficient ((Intercept), Days), lmerTest's summary.
SLEEPSTUDY = {
    "Reaction ~ Days + (Days | Subject)": ((16.99972629, 16.99998373), (17.0, 17.0), (6.824596695, 1.545789644)),
    "Reaction ~ Days + (1 | Subject)": ((22.81019896, 161.00000005), (22.81019909, 161.0), (9.7467162692, 0.8042214289)),
    "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)": (
        (18.15619605, 18.15609129), (18.18747048, 18.18747048), (6.885380817, 1.559569098)),
    # singular: Batch's variance is 0. lmerTest's generalized inverse drops the Hessian's zero eigenvalue
    # (df n − p); pbkrtest keeps the variance among ψ.
    "Reaction ~ Days + (1 | Batch)": ((178.0, 178.0), (44.82736509, 177.96252390), (6.667392148, 1.253258772)),
    # crossed factors, Batch singular: one dense block of 180 rows for Kenward–Roger.
    "Reaction ~ Days + (Days | Subject) + (1 | Batch)": (
        (16.9998978, 16.9991311), (16.57545994, 16.99880747), (6.841720989, 1.549546962)),
}


@functools.cache
def _sleepstudy() -> pd.DataFrame:
    visits = read_sleepstudy()
    return visits.assign(Batch=[f"b{i % 6}" for i in range(len(visits))])


@functools.cache
def _sleepstudy_fit(formula: str, engine: str = "lme4-style") -> Fit:
    return fit_candidate(_sleepstudy(), "m", formula, method="REML", engine=engine)


@pytest.mark.parametrize("formula", sorted(SLEEPSTUDY))
def test_sleepstudy_matches_lmertest(formula: str) -> None:
    satterthwaite_df, kr_df, kr_se = SLEEPSTUDY[formula]
    fit = _sleepstudy_fit(formula)
    satterthwaite = fixed_effect_inference(fit, _sleepstudy(), "satterthwaite")
    kenward_roger = fixed_effect_inference(fit, _sleepstudy(), "kenward-roger")
    # Both differentiate numerically at an optimum that agrees with lme4's to 1e-5 or better: df and SEs within 1e-4.
    assert [fe.df for fe in satterthwaite.fixed_effects()] == pytest.approx(satterthwaite_df, rel=1e-4)
    assert [fe.df for fe in kenward_roger.fixed_effects()] == pytest.approx(kr_df, rel=1e-4)
    assert [fe.std_error for fe in kenward_roger.fixed_effects()] == pytest.approx(kr_se, rel=1e-4)
    # Satterthwaite keeps the Wald SE; Kenward–Roger's adjusted ones are at least as large.
    assert satterthwaite.vcov == pytest.approx(fit.vcov)
    assert np.all(np.diagonal(kenward_roger.vcov) >= np.diagonal(fit.vcov) * (1 - 1e-12))


def test_contrast_rows_match_contest1d() -> None:
    """An arbitrary row l = (1, 5) (the mean at day 5): lmerTest's contest1D, both methods."""
    visits = _sleepstudy()
    expected = {"Reaction ~ Days + (Days | Subject)": (9.581277392, 16.99979939, 17.0),
                "Reaction ~ Days + (1 | Subject)": (9.058865045, 17.06718334, 17.06718345)}
    for formula, (se, satterthwaite_df, kr_df) in expected.items():
        fit = _sleepstudy_fit(formula)
        for method, df in (("satterthwaite", satterthwaite_df), ("kenward-roger", kr_df)):
            estimate, found_se, found_df = fixed_effect_inference(fit, visits, method).contrasts(np.array([[1.0, 5.0]]))
            assert estimate[0] == pytest.approx(303.7415346, rel=1e-8)
            assert found_se[0] == pytest.approx(se, rel=1e-5)
            assert found_df[0] == pytest.approx(df, rel=1e-4)


def test_statsmodels_fit_gets_the_same_df() -> None:
    """A statsmodels fit has no θ: it is rebuilt from the variance components, and the df follow."""
    formula = "Reaction ~ Days + (1 | Subject)"
    ours = fixed_effect_inference(_sleepstudy_fit(formula), _sleepstudy(), "satterthwaite").fixed_effects()
    theirs = fixed_effect_inference(_sleepstudy_fit(formula, "statsmodels"), _sleepstudy(), "satterthwaite").fixed_effects()
    assert [fe.df for fe in theirs] == pytest.approx([fe.df for fe in ours], rel=1e-5)


def test_theta_from_components_matches_lme4_layout() -> None:
    fit = _sleepstudy_fit("Reaction ~ Days + (Days | Subject)")
    design = build_design(_sleepstudy(), parse_formula(fit.formula))
    rebuilt = ddf.lme4_theta(dataclasses.replace(fit, theta=np.empty(0)), design)
    assert rebuilt == pytest.approx(fit.theta, rel=1e-6, abs=1e-9)


@functools.cache
def _bodyweight() -> tuple[pd.DataFrame, Fit]:
    visits = read_reference_csv(ROOT / "tests" / "reference" / "data" / "bodyweight.csv", ["Rat", "Diet"])
    return visits, fit_candidate(visits, "m", "weight ~ Time * Diet + (Time | Rat)", method="REML")


def test_bodyweight_balanced_design() -> None:
    """nlme's BodyWeight (16 rats, balanced): Kenward–Roger's df are exactly 16 − 3 = 13 for every coefficient
    (pbkrtest too). lmerTest's Satterthwaite gives 13.11 and 13.004 at lme4's optimum, which stops short there
    (max|grad| 0.017); at the better optimum reached here, 13.001 and 13.002."""
    visits, fit = _bodyweight()
    kenward_roger = fixed_effect_inference(fit, visits, "kenward-roger").fixed_effects()
    assert [fe.df for fe in kenward_roger] == pytest.approx([13.0] * 6, rel=1e-8)
    satterthwaite = fixed_effect_inference(fit, visits, "satterthwaite").fixed_effects()
    assert [fe.df for fe in satterthwaite] == pytest.approx([13.0] * 6, rel=1e-3)


def test_one_row_kr_df_is_two_over_a() -> None:
    """pbkrtest's Lb_ddf for one row reduces to 2 / A: a direct check of the transcription."""
    A = np.array([0.1, 0.5, 0.02])
    assert ddf._lb_ddf(A, A, q=1) == pytest.approx(2.0 / A, rel=1e-12)


def test_richardson_derivatives() -> None:
    def f(x: np.ndarray) -> float:
        return float(3.0 * x[0] ** 2 + x[0] * x[1] + np.exp(x[1]))

    x = np.array([1.0, 2.0])
    assert richardson_hessian(f, x) == pytest.approx(np.array([[6.0, 1.0], [1.0, math.exp(2.0)]]), rel=1e-8)
    jac = richardson_jacobian(lambda v: np.array([v[0] * v[1], np.sin(v[1])]), x)
    assert jac == pytest.approx(np.array([[2.0, 1.0], [0.0, math.cos(2.0)]]), rel=1e-8, abs=1e-12)


def test_normal_and_residual() -> None:
    fit = _sleepstudy_fit("Reaction ~ Days + (1 | Subject)")
    assert [fe.df for fe in fixed_effect_inference(fit, _sleepstudy(), "normal").fixed_effects()] == [math.inf] * 2
    assert [fe.df for fe in fixed_effect_inference(fit, _sleepstudy(), "residual").fixed_effects()] == [178.0] * 2


def test_kenward_roger_refuses_an_ml_fit() -> None:
    fit = fit_candidate(_sleepstudy(), "m", "Reaction ~ Days + (1 | Subject)", method="ML")
    with pytest.raises(ConfigError, match="Kenward–Roger df need a REML fit"):
        fixed_effect_inference(fit, _sleepstudy(), "kenward-roger")
    # Satterthwaite works on the ML deviance (lmerTest does too).
    assert np.all(np.isfinite([fe.df for fe in fixed_effect_inference(fit, _sleepstudy(), "satterthwaite").fixed_effects()]))


def test_glmm_takes_normal_only() -> None:
    visits = _sleepstudy().assign(high=lambda d: (d["Reaction"] > 300).astype(float))
    fit = fit_candidate(visits, "g", "high ~ Days + (1 | Subject)", family="binomial")
    assert all(fe.df == math.inf for fe in fixed_effect_inference(fit, visits, "normal").fixed_effects())
    with pytest.raises(ConfigError, match="binomial model.*'normal'"):
        fixed_effect_inference(fit, visits, "satterthwaite")


def test_kenward_roger_refuses_a_large_crossed_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ddf, "MAX_BLOCK_ROWS", 100)
    fit = _sleepstudy_fit("Reaction ~ Days + (Days | Subject) + (1 | Batch)")
    with pytest.raises(ConfigError, match=r"largest block here has 180 rows .*use df method 'satterthwaite'"):
        fixed_effect_inference(fit, _sleepstudy(), "kenward-roger")


@pytest.mark.parametrize("method", ["satterthwaite", "kenward-roger"])
def test_compound_symmetry_mmrm_agrees_with_random_intercept(method: str) -> None:
    """cs(Days | Subject) with a positive correlation is the random-intercept model: the same likelihood, so
    the same Satterthwaite df (parametrization-free) and the same linear Kenward–Roger df and adjusted SEs,
    though one is differenced in the structure's (log σ, ρ) and the other read from lme4's θ."""
    visits = _sleepstudy()
    lmm = fixed_effect_inference(_sleepstudy_fit("Reaction ~ Days + (1 | Subject)"), visits, method).fixed_effects()
    mmrm = fixed_effect_inference(_sleepstudy_fit("Reaction ~ Days + cs(Days | Subject)"), visits, method).fixed_effects()
    assert [fe.df for fe in mmrm] == pytest.approx([fe.df for fe in lmm], rel=1e-5)
    assert [fe.std_error for fe in mmrm] == pytest.approx([fe.std_error for fe in lmm], rel=1e-6)


def test_mmrm_with_random_effects_and_serial_correlation() -> None:
    """Random slopes next to an AR(1) residual: both methods give finite df between the subjects' and the
    rows' counts, and Kenward–Roger's SEs are not below the Wald ones."""
    fit = _sleepstudy_fit("Reaction ~ Days + (Days | Subject) + ar1(Days | Subject)")
    for method in ("satterthwaite", "kenward-roger"):
        inference = fixed_effect_inference(fit, _sleepstudy(), method)
        df = np.array([fe.df for fe in inference.fixed_effects()])
        assert np.all((df > 10) & (df < 178))
    assert np.all(np.diagonal(inference.vcov) >= np.diagonal(fit.vcov))


def test_nested_factors_match_lmertest() -> None:
    """Pupils within schools (tests/reference/data/sim_school.csv): Kenward–Roger over one dense block per
    school. lmerTest / pbkrtest on ``lmer(score ~ year + (1 | school) + (year | school:pupil), s)``; our REML
    optimum differs from lme4's by ~1e-4 in θ, hence the tolerances."""
    visits = read_reference_csv(ROOT / "tests" / "reference" / "data" / "sim_school.csv", ["school", "pupil"])
    fit = fit_candidate(visits, "m", "score ~ year + (1 | school) + (year | school:pupil)", method="REML")
    satterthwaite = fixed_effect_inference(fit, visits, "satterthwaite").fixed_effects()
    kenward_roger = fixed_effect_inference(fit, visits, "kenward-roger").fixed_effects()
    assert [fe.df for fe in satterthwaite] == pytest.approx([30.15909606, 231.17219211], rel=1e-3)
    assert [fe.df for fe in kenward_roger] == pytest.approx([30.18528038, 227.25993072], rel=1e-3)
    assert [fe.std_error for fe in kenward_roger] == pytest.approx([0.71441049693, 0.07299173348], rel=1e-3)


def test_compound_symmetry_mmrm_through_shared_visit_patterns() -> None:
    """36 subjects seen on the same ten days (sleepstudy twice over, the copy's outcome shifted by its day
    number so that it is not a duplicate): the MMRM engine shares one V per visit pattern and Kenward–Roger
    reads those subjects through their cross-products; the result is still the random-intercept LMM's."""
    visits = read_sleepstudy()
    copy = visits.assign(Subject=visits["Subject"] + "b", Reaction=visits["Reaction"] + 3.0 * visits["Days"] ** 0.5)
    doubled = pd.concat([visits, copy], ignore_index=True)
    lmm = fit_candidate(doubled, "ri", "Reaction ~ Days + (1 | Subject)", method="REML")
    mmrm = fit_candidate(doubled, "cs", "Reaction ~ Days + cs(Days | Subject)", method="REML")
    for method in ("satterthwaite", "kenward-roger"):
        expected = fixed_effect_inference(lmm, doubled, method).fixed_effects()
        found = fixed_effect_inference(mmrm, doubled, method).fixed_effects()
        assert [fe.df for fe in found] == pytest.approx([fe.df for fe in expected], rel=1e-5)
        assert [fe.std_error for fe in found] == pytest.approx([fe.std_error for fe in expected], rel=1e-6)


@pytest.mark.parametrize("units", ["Days * 1e8", "Days * 1e-6", "epoch seconds", "Reaction + 1e6"])
def test_df_do_not_depend_on_units(units: str) -> None:
    """The model is invariant to these changes, and so are both df: computed on the standardized design.
    In the data's units the numerical Hessian loses its digits (Satterthwaite 1e-5 for Days × 1e8) and
    pbkrtest's information matrix looks singular (Kenward–Roger 4244 for Days × 1e-6)."""
    visits = read_sleepstudy()
    changed = {
        "Days * 1e8": visits.assign(Days=visits["Days"] * 1e8),
        "Days * 1e-6": visits.assign(Days=visits["Days"] * 1e-6),
        "epoch seconds": visits.assign(Days=1.7e9 + visits["Days"] * 86400.0),
        "Reaction + 1e6": visits.assign(Reaction=visits["Reaction"] + 1e6),
    }[units]
    formula = "Reaction ~ Days + (Days | Subject)"
    fit = fit_candidate(changed, "m", formula, method="REML")
    for method in ("satterthwaite", "kenward-roger"):
        expected = [fe.df for fe in fixed_effect_inference(_sleepstudy_fit(formula), _sleepstudy(), method).fixed_effects()]
        assert [fe.df for fe in fixed_effect_inference(fit, changed, method).fixed_effects()] == pytest.approx(expected, rel=1e-4)


def test_mmrm_df_do_not_depend_on_units() -> None:
    """The MMRM path too works on standardized columns: with Days × 1e8, random slopes next to an AR(1)
    residual gave Satterthwaite df of 1040 and 0 in the data's units."""
    visits = read_sleepstudy()
    changed = visits.assign(Days=visits["Days"] * 1e8)
    formula = "Reaction ~ Days + (Days | Subject) + ar1(Days | Subject)"
    fit = fit_candidate(changed, "m", formula, method="REML")
    for method in ("satterthwaite", "kenward-roger"):
        expected = [fe.df for fe in fixed_effect_inference(_sleepstudy_fit(formula), _sleepstudy(), method).fixed_effects()]
        assert [fe.df for fe in fixed_effect_inference(fit, changed, method).fixed_effects()] == pytest.approx(expected, rel=1e-4)


def test_theta_of_a_singular_statsmodels_fit_is_refused() -> None:
    fit = _sleepstudy_fit("Reaction ~ Days + (Days | Subject)")
    design = build_design(_sleepstudy(), parse_formula(fit.formula))
    zero_slope = tuple(dataclasses.replace(c, sd=0.0) if c.term == "Days" else c for c in fit.random_effects)
    rebuilt = dataclasses.replace(fit, theta=np.empty(0), engine="statsmodels", random_effects=zero_slope)
    with pytest.raises(ConfigError, match=r"covariance of \(Intercept\), Days for Subject is singular.*'lme4-style'"):
        ddf.lme4_theta(rebuilt, design)
