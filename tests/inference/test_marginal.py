"""Estimated marginal means and treatment contrasts against emmeans 1.8.4.1 (R 4.2.2, lme4 1.1.31).

The numbers written here come from the R code next to them (fits with ``lmerControl(optimizer = "bobyqa",
optCtrl = list(rhoend = 1e-12, maxfun = 1e5))``, so that lme4's optimum is as tight as ours; df
"asymptotic", the normal distribution, until the small-sample df exist). ``test_*_equal_emmeans`` compare
every case of ``tests/reference/inference_reference.json`` (made by ``make_reference_inference.R``): the
Satterthwaite and Kenward–Roger blocks for LMMs, skipped while ``fixed_effect_inference`` lacks the method,
and the response-scale blocks for GLMMs (normal df).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from longitudinal.config import EstimatesConfig
from longitudinal.errors import ConfigError
from longitudinal.fit.candidate import fit_candidate
from longitudinal.inference.ddf import FixedEffectInference, fixed_effect_inference
from longitudinal.inference.marginal import (
    CONTRAST_COLUMNS,
    MEAN_COLUMNS,
    dunnettx_p_value,
    dunnettx_quantile,
    check_reference_grid,
    estimate_means,
    find_nests,
    is_estimable,
    nonestimable_basis,
    reference_grid,
    zeroin,
)
from longitudinal.model.design import build_design
from longitudinal.model.formula import parse_formula
from longitudinal.records import Fit

DATA = Path(__file__).resolve().parents[1] / "reference" / "data"
REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "inference_reference.json"


def _read(name: str, factors: tuple[str, ...]) -> pd.DataFrame:
    return pd.read_csv(DATA / name, dtype={column: str for column in factors})


def _estimate(fit: Fit, visits: pd.DataFrame, by: str | None, at: dict[str, list[float]], method: str = "normal"):
    return estimate_means(fit, visits, EstimatesConfig(by=by, at=at), fixed_effect_inference(fit, visits, method))


# ---------------------------------------------------------------------------------------------- dunnettx

# k, df, emmeans:::.qdunnx(0.95, k, df), 1 - emmeans:::.pdunnx(c(1.5, 2.4, 3.1), k, df)
DUNNETTX = [
    (2, math.inf, 2.22181167349296, (0.23570945780586161, 0.03149676006379765, 0.00380859006763634)),
    (2, 40, 2.30491408419061, (0.24756119818112743, 0.04018110080111192, 0.00688770529610339)),
    (2, 12.3, 2.5142333053875, (0.2732238123513359, 0.0614226593425937, 0.0170172424872381)),
    (2, 3.5, 3.62303893298039, (0.3552850140065388, 0.1452342652154122, 0.0768618715005842)),
    (3, math.inf, 2.35942657811332, (0.31049336186258658, 0.04498714704979045, 0.00559442240292096)),
    (3, 40, 2.45471259514328, (0.32355408054798818, 0.05668093852063971, 0.00998410379021686)),
    (3, 12.3, 2.695537822237, (0.3512919884301573, 0.0844561669003954, 0.0239613712461935)),
    (3, 3.5, 3.98557206331115, (0.435642935933562, 0.186566074510498, 0.100300391640866)),
    (5, math.inf, 2.52388581359386, (0.4189574374116869, 0.0690018556177194, 0.0089924152586961)),
    (5, 40, 2.63464259922957, (0.4315098932343847, 0.0851913124989150, 0.0156959478293082)),
    (5, 12.3, 2.91477723280018, (0.4574364383763311, 0.1218640058329538, 0.0359244489708122)),
    (5, 3.5, 4.42115985637289, (0.531114171896650, 0.242856256650746, 0.133686040185409)),
]


@pytest.mark.parametrize(("k", "df", "quantile", "p_values"), DUNNETTX)
def test_dunnettx_equals_emmeans(k: int, df: float, quantile: float, p_values: tuple[float, ...]) -> None:
    # R's ptukey and scipy's studentized range agree to ~1e-12 from df 12 up; at df 3.5 R's quadrature is
    # coarser (3e-6).
    rel = 1e-9 if df > 10 else 1e-5
    assert dunnettx_quantile(0.95, k, df)[0] == pytest.approx(quantile, rel=rel)
    assert dunnettx_p_value(np.array([1.5, 2.4, 3.1]), k, df) == pytest.approx(p_values, rel=rel)


def test_dunnettx_lies_between_unadjusted_and_bonferroni() -> None:
    from scipy.stats import norm

    critical = dunnettx_quantile(0.95, 3, math.inf)[0]
    assert norm.ppf(0.975) < critical < norm.ppf(1 - 0.025 / 3)


def test_dunnettx_quantile_of_one_contrast_is_the_t_quantile() -> None:
    assert dunnettx_quantile(0.95, 1, [math.inf, 10.0]) == pytest.approx([1.959963984540054, 2.228138851986274])


def test_zeroin_stops_within_the_tolerance() -> None:
    assert zeroin(lambda x: x * x - 2.0, 0.0, 2.0, 1e-10) == pytest.approx(math.sqrt(2.0), abs=1e-10)
    with pytest.raises(ValueError, match="same sign"):
        zeroin(lambda x: x * x + 1.0, 0.0, 2.0, 1e-4)


# ----------------------------------------------------------------------------------- BodyWeight, 3 diets


@pytest.fixture(scope="module")
def bodyweight() -> tuple[Fit, pd.DataFrame]:
    visits = _read("bodyweight.csv", ("Rat", "Diet"))
    return fit_candidate(visits, "slopes", "weight ~ Time * Diet + (Time | Rat)", method="REML"), visits


# m <- lmer(weight ~ Time * Diet + (Time | Rat), BodyWeight, control = ctl)   # REML criterion 1151.71974882
# emm <- emmeans(m, ~ Diet | Time, at = list(Time = c(1, 22, 44, 64)), lmer.df = "asymptotic")
# summary(emm)[, c("emmean", "SE", "asymp.LCL", "asymp.UCL")]
BODYWEIGHT_MEANS = [
    (252.011290675, 13.0797534158, 226.375445053, 277.647136296),
    (453.282616292, 18.4975646731, 417.028055731, 489.537176853),
    (504.381305962, 18.4975646731, 468.126745401, 540.635866523),
    (259.563712055, 12.9257512154, 234.229705200, 284.897718910),
    (473.557659969, 18.2797726727, 437.729963885, 509.385356054),
    (518.198815244, 18.2797726727, 482.371119160, 554.026511328),
    (267.475772549, 13.0666497405, 241.865609659, 293.085935439),
    (494.798181918, 18.4790332778, 458.579942224, 531.016421611),
    (532.674301158, 18.4790332778, 496.456061464, 568.892540851),
    (274.668554815, 13.4552633704, 248.296723207, 301.040386424),
    (514.107747325, 19.0286159437, 476.812345400, 551.403149250),
    (545.833833807, 19.0286159437, 508.538431881, 583.129235732),
]
# summary(contrast(emm, "trt.vs.ctrl"), infer = TRUE): "P value adjustment: dunnettx method for 2 tests"
BODYWEIGHT_CONTRASTS = [
    (201.271325617, 22.6547974666, 150.936632145, 251.606019089),
    (252.370015287, 22.6547974666, 202.035321815, 302.704708759),
    (213.993947914, 22.3880578311, 164.251899678, 263.735996150),
    (258.635103189, 22.3880578311, 208.893054953, 308.377151425),
    (227.322409369, 22.6321012353, 177.038142649, 277.606676089),
    (265.198528609, 22.6321012353, 214.914261889, 315.482795329),
    (239.439192509, 23.3051997867, 187.659427570, 291.218957449),
    (271.165278991, 23.3051997867, 219.385514052, 322.945043930),
]


def test_bodyweight_means_equal_emmeans(bodyweight: tuple[Fit, pd.DataFrame]) -> None:
    estimates = _estimate(*bodyweight, by="Diet", at={"Time": [1, 22, 44, 64]})
    means = estimates.means
    assert list(means.columns) == ["Diet", "Time", *MEAN_COLUMNS]
    assert list(means["Diet"]) == ["1", "2", "3"] * 4
    assert list(means["Time"]) == [t for t in (1.0, 22.0, 44.0, 64.0) for _ in range(3)]
    expected = np.array(BODYWEIGHT_MEANS)
    assert means["estimate"].to_numpy() == pytest.approx(expected[:, 0], rel=1e-7)
    # Our REML criterion is within 1e-6 of lme4's, θ within 2e-4 of it: the SEs' tolerance.
    assert means["se"].to_numpy() == pytest.approx(expected[:, 1], rel=2e-4)
    assert means[["ci_low", "ci_high"]].to_numpy() == pytest.approx(expected[:, 2:], rel=2e-5)
    assert np.isinf(means["df"]).all()
    assert estimates.scale == "outcome" and estimates.ratio is None


def test_bodyweight_contrasts_equal_emmeans_dunnettx(bodyweight: tuple[Fit, pd.DataFrame]) -> None:
    estimates = _estimate(*bodyweight, by="Diet", at={"Time": [1, 22, 44, 64]})
    contrasts = estimates.contrasts
    assert list(contrasts.columns) == ["contrast", "Time", *CONTRAST_COLUMNS]
    assert list(contrasts["contrast"]) == ["Diet2 - Diet1", "Diet3 - Diet1"] * 4
    assert (contrasts["adjustment"] == "dunnettx").all()
    expected = np.array(BODYWEIGHT_CONTRASTS)
    assert contrasts["estimate"].to_numpy() == pytest.approx(expected[:, 0], rel=1e-7)
    assert contrasts["se"].to_numpy() == pytest.approx(expected[:, 1], rel=2e-4)
    assert contrasts[["ci_low", "ci_high"]].to_numpy() == pytest.approx(expected[:, 2:], rel=5e-5)
    # emmeans prints p < 1e-14 (1 - .pdunnx rounds to 0 or to a few ulps of 1).
    assert (contrasts["p_value"] < 1e-12).all()
    assert any("dunnettx" in note and "2 contrasts" in note for note in estimates.notes)


# ------------------------------------------------------------------------ two arms, a covariate, a factor


@pytest.fixture(scope="module")
def site() -> pd.DataFrame:
    return _read("sim_site.csv", ("patient_id", "arm"))


def test_two_arms_hold_age_at_its_mean_and_average_sites(site: pd.DataFrame) -> None:
    fit = fit_candidate(site, "site", "score ~ week * arm + age + factor(site) + (1 | patient_id)", method="REML")
    estimates = _estimate(fit, site, by="arm", at={"week": [0, 2, 4]})
    # m <- lmer(score ~ week * arm + age + factor(site) + (1 | patient_id), sim_site, control = ctl)
    # emm <- emmeans(m, ~ arm | week, at = list(week = c(0, 2, 4)), lmer.df = "asymptotic"); age at 45.4093567251462
    means = np.array([
        (48.4598668623428, 0.981956581270968, 46.5352673286696, 50.3844663960159),
        (51.3103049405960, 0.979415617640826, 49.3906856041239, 53.2299242770680),
        (46.6435471469697, 0.916917743989944, 44.8464213919637, 48.4406729019757),
        (47.7799655023912, 0.914639979401288, 45.9873040839442, 49.5726269208382),
        (44.8272274315967, 0.973687579303383, 42.9188348439680, 46.7356200192253),
        (44.2496260641865, 0.971505460521882, 42.3455103507796, 46.1537417775934),
    ])
    got = estimates.means[["estimate", "se", "ci_low", "ci_high"]].to_numpy()
    assert got == pytest.approx(means, rel=1e-5)
    # summary(contrast(emm, "trt.vs.ctrl"), infer = TRUE): one contrast per week, no adjustment
    contrasts = np.array([
        (2.850438078253189, 1.40238983917156, 0.101804501192013, 5.59907165531436, 0.0420972422908472),
        (1.136418355421508, 1.31253962129079, -1.436112030590289, 3.70894874143330, 0.3865908433954721),
        (-0.577601367410173, 1.39269508902363, -3.307233583342289, 2.15203084852194, 0.6783348721035292),
    ])
    table = estimates.contrasts
    assert list(table["contrast"]) == ["treatment - control"] * 3
    assert (table["adjustment"] == "none").all()
    assert table[["estimate", "se", "ci_low", "ci_high", "p_value"]].to_numpy() == pytest.approx(contrasts, rel=1e-4)
    assert any("age = 45.41" in note for note in estimates.notes)
    assert any("site (1, 2, 3, 4)" in note for note in estimates.notes)


def test_poly_and_spline_terms_are_evaluated_at_the_grid(site: pd.DataFrame) -> None:
    # The bases are evaluated at the grid's week and at the mean age with the fitted coefficients and knots,
    # not averaged column by column.
    fit = fit_candidate(site, "curves", "score ~ poly(week, 2) * arm + ns(age, 3) + (1 | patient_id)", method="REML")
    estimates = _estimate(fit, site, by="arm", at={"week": [0, 3, 5]})
    # m <- lmer(score ~ poly(week, 2) * arm + ns(age, 3) + (1 | patient_id), sim_site, control = ctl)
    # emm <- emmeans(m, ~ arm | week, at = list(week = c(0, 3, 5)), lmer.df = "asymptotic")
    means = np.array([
        (48.5730463416646, 1.23097494588237, 46.1603797818640, 50.9857129014651),
        (52.1081506854388, 1.16621079115644, 49.8224195363902, 54.3938818344873),
        (46.1593779739903, 1.17386024863950, 43.8586541637736, 48.4601017842069),
        (45.8751793725217, 1.10180190705048, 43.7156873166053, 48.0346714284382),
        (43.9492797049015, 1.33436829565913, 41.3339659032976, 46.5645935065055),
        (43.5997373007775, 1.26970624309830, 41.1111587933592, 46.0883158081959),
    ])
    assert estimates.means[["estimate", "se", "ci_low", "ci_high"]].to_numpy() == pytest.approx(means, rel=1e-5)
    # summary(contrast(emm, "trt.vs.ctrl"), infer = TRUE)
    contrasts = np.array([
        (3.535104343774203, 1.48989789130261, 0.614958136178913, 6.45525055136949, 0.0176578422960769),
        (-0.284198601468529, 1.39138837691598, -3.011269708731485, 2.44287250579443, 0.8381539141004343),
        (-0.349542404123994, 1.65674393484966, -3.596700848034502, 2.89761603978651, 0.8329016679024712),
    ])
    got = estimates.contrasts[["estimate", "se", "ci_low", "ci_high", "p_value"]].to_numpy()
    assert got == pytest.approx(contrasts, rel=1e-5)


@pytest.fixture(scope="module")
def factor_week(site: pd.DataFrame) -> Fit:
    return fit_candidate(site, "visits", "score ~ factor(week) * arm + (1 | patient_id)", method="REML")


def test_factor_week_takes_at_values_as_levels(site: pd.DataFrame, factor_week: Fit) -> None:
    estimates = _estimate(factor_week, site, by="arm", at={"week": [0, 2, 5]})
    # m2 <- lmer(score ~ factor(week) * arm + (1 | patient_id), sim_site, control = ctl)
    # emm2 <- emmeans(m2, ~ arm | week, at = list(week = c(0, 2, 5)), lmer.df = "asymptotic")
    means = np.array([
        (49.0588000000022, 1.12265352445649, 46.8584395249505, 51.2591604750539),
        (51.4491999999998, 1.12265352445646, 49.2488395249482, 53.6495604750514),
        (48.0632000000016, 1.12265352445647, 45.8628395249500, 50.2635604750533),
        (47.1686000000000, 1.12265352445646, 44.9682395249484, 49.3689604750516),
        (44.4061917834999, 1.26692399304280, 41.9230663859863, 46.8893171810134),
        (42.6935285131122, 1.26667344532457, 40.2108941801027, 45.1761628461216),
    ])
    assert estimates.means[["estimate", "se", "ci_low", "ci_high"]].to_numpy() == pytest.approx(means, rel=1e-5)
    contrasts = np.array([
        (2.390399999997615, 1.58767184013230, -0.721379625930127, 5.50217962592536, 0.132169681803210),
        (-0.894600000001618, 1.58767184013229, -4.006379625929348, 2.21717962592611, 0.573117220429791),
        (-1.712663270387704, 1.79152393822632, -5.223985666752647, 1.79865912597724, 0.339081714088715),
    ])
    got = estimates.contrasts[["estimate", "se", "ci_low", "ci_high", "p_value"]].to_numpy()
    assert got == pytest.approx(contrasts, rel=1e-4)


def test_factor_week_is_averaged_without_at(site: pd.DataFrame, factor_week: Fit) -> None:
    estimates = _estimate(factor_week, site, by="arm", at={})
    # summary(emmeans(m2, ~ arm, lmer.df = "asymptotic")): averaged over the levels of week
    means = np.array([
        (46.7415619982570, 0.991090194740115, 44.7990609111356, 48.6840630853784),
        (46.4611133808206, 0.990725946579695, 44.5193262069750, 48.4029005546661),
    ])
    assert list(estimates.means.columns) == ["arm", *MEAN_COLUMNS]
    assert estimates.means[["estimate", "se", "ci_low", "ci_high"]].to_numpy() == pytest.approx(means, rel=1e-5)
    assert list(estimates.contrasts.columns) == ["contrast", *CONTRAST_COLUMNS]
    assert any("week (0, 1, 2, 3, 4, 5)" in note for note in estimates.notes)


def test_factor_week_refuses_a_value_that_is_not_a_level(site: pd.DataFrame, factor_week: Fit) -> None:
    # emmeans drops such a value without a word; the config is wrong, so we say so.
    message = r"at week: 1.5 is not a level of factor\(week\).*levels are 0, 1, 2, 3, 4, 5"
    with pytest.raises(ConfigError, match=message):
        _estimate(factor_week, site, by="arm", at={"week": [0, 1.5]})


def test_no_term_in_by_gives_equal_means_and_no_contrasts(site: pd.DataFrame) -> None:
    fit = fit_candidate(site, "time only", "score ~ week + (1 | patient_id)", method="REML")
    estimates = _estimate(fit, site, by="arm", at={"week": [0, 4]})
    means = estimates.means
    assert list(means["arm"]) == ["control", "treatment"] * 2
    assert means["estimate"].iloc[0] == means["estimate"].iloc[1] != means["estimate"].iloc[2]
    assert estimates.contrasts.empty
    assert list(estimates.contrasts.columns) == ["contrast", "week", *CONTRAST_COLUMNS]
    assert any("no term in 'arm'" in note for note in estimates.notes)


def test_at_alone_gives_means_and_no_contrasts(site: pd.DataFrame, factor_week: Fit) -> None:
    fit = fit_candidate(site, "slopes", "score ~ week * arm + (1 | patient_id)", method="REML")
    estimates = _estimate(fit, site, by=None, at={"week": [0, 4]})
    assert list(estimates.means.columns) == ["week", *MEAN_COLUMNS]
    assert len(estimates.means) == 2 and estimates.contrasts.empty
    assert any("arm (control, treatment)" in note for note in estimates.notes)


def test_by_a_number_in_the_model_is_refused(site: pd.DataFrame) -> None:
    fit = fit_candidate(site, "slopes", "score ~ week + age + (1 | patient_id)", method="REML")
    with pytest.raises(ConfigError, match="by 'age' is a number in the model formula"):
        _estimate(fit, site, by="age", at={"week": [0]})


# ------------------------------------------------------------------ nesting, estimability, the pre-fit check


def test_find_nests_reads_nesting_from_the_data() -> None:
    # centre A, B only in control, C, D only in treatment: centre %in% arm, as emmeans' .find_nests says
    visits = pd.DataFrame({"arm": ["c", "c", "t", "t"] * 2, "centre": ["A", "B", "C", "D"] * 2,
                           "sex": ["f"] * 4 + ["m"] * 4})
    levels = {"arm": ("c", "t"), "centre": ("A", "B", "C", "D"), "sex": ("f", "m")}
    assert find_nests(visits, levels) == {"centre": ("arm",)}
    # crossed factors are not nested; a factor with one level in the grid is left out
    assert find_nests(visits, {"arm": ("c", "t"), "sex": ("f", "m")}) == {}
    assert find_nests(visits, {"arm": ("c",), "centre": ("A", "B", "C", "D")}) == {}


def test_find_nests_reads_nesting_from_the_terms() -> None:
    # site 1, 2 in both arms: not nested in the data, but y ~ arm + arm:site has no site main effect, so
    # site is coded without contrasts within arm (R's factors attribute) and emmeans nests it in arm
    visits = pd.DataFrame({"arm": ["c", "c", "t", "t", "t"], "site": ["1", "2", "1", "2", "3"]})
    levels = {"arm": ("c", "t"), "site": ("1", "2", "3")}
    arm, site, both = frozenset({"arm"}), frozenset({"site"}), frozenset({"arm", "site"})
    assert find_nests(visits, levels, [arm, both]) == {"site": ("arm",)}
    # y ~ arm:site alone: each is coded without contrasts in the other, so each would be nested in itself;
    # emmeans drops such entries ("we get such in a model like y ~ A : B")
    assert find_nests(visits, levels, [both]) == {}
    assert find_nests(visits, levels, [arm, site, both]) == {}


def test_a_row_off_the_design_is_not_estimable() -> None:
    # age2 = 2 age + 1: the null space is spanned by (1, 2, -1) / sqrt(6), as estimability's nonest.basis
    age = np.array([30.0, 41.0, 52.0, 67.0])
    X = np.column_stack([np.ones(4), age, 2 * age + 1])
    basis = nonestimable_basis(X)
    assert basis.shape == (3, 1)
    assert np.abs(basis[:, 0]) == pytest.approx(np.array([1.0, 2.0, 1.0]) / math.sqrt(6.0))
    mean = age.mean()
    L = np.array([[1.0, mean, 2 * mean + 1], [1.0, 40.0, 2 * mean + 1], [0.0, 0.0, 0.0], [math.nan, 1.0, 1.0]])
    assert list(is_estimable(L, basis)) == [True, False, True, False]
    assert nonestimable_basis(X[:, :2]).shape == (2, 0)


def test_check_reference_grid_names_the_candidate(site: pd.DataFrame) -> None:
    formulas = {name: parse_formula(text, name=name) for name, text in {
        "slopes": "score ~ week * arm + age + (1 | patient_id)",
        "visits": "score ~ factor(week) * arm + (1 | patient_id)",
    }.items()}
    check_reference_grid(EstimatesConfig(by="arm", at={"week": [0, 2]}), formulas, site)
    message = r"candidate 'visits': .*at week: 1.5 is not a level of factor\(week\).*levels are 0, 1, 2, 3, 4, 5"
    with pytest.raises(ConfigError, match=message):
        check_reference_grid(EstimatesConfig(by="arm", at={"week": [0, 1.5]}), formulas, site)
    with pytest.raises(ConfigError, match=r"candidate 'slopes': .*by 'age' is a number in the model formula"):
        check_reference_grid(EstimatesConfig(by="age", at={"week": [0]}), formulas, site)
    with pytest.raises(ConfigError, match=r"candidate 'visits': .*at 'arm' gives numbers, but 'arm' is a categorical"):
        check_reference_grid(EstimatesConfig(at={"arm": [0]}), {"visits": formulas["visits"]}, site)


def test_inputs_are_not_modified(site: pd.DataFrame, factor_week: Fit) -> None:
    before = site.copy()
    _estimate(factor_week, site, by="arm", at={"week": [0, 2]})
    pd.testing.assert_frame_equal(site, before)


# ------------------------------------------------------------------------- inference_reference.json


def _reference_cases() -> list[dict]:
    if not REFERENCE.exists():
        return []
    return [case for case in json.loads(REFERENCE.read_text())["cases"] if "emmeans" in case]


def _blocks() -> list[tuple[dict, str]]:
    out = []
    for case in _reference_cases():
        methods = ("satterthwaite", "kenward_roger") if case["family"] == "gaussian" else ("response",)
        out.extend((case, method) for method in methods if method in case["emmeans"])
    return out


BLOCKS = _blocks()
_FITS: dict[str, tuple[Fit, pd.DataFrame]] = {}


def _case_fit(case: dict) -> tuple[Fit, pd.DataFrame]:
    if case["name"] not in _FITS:
        if not (DATA / case["data"]).exists():
            pytest.skip(f"{case['data']} is not written yet")
        visits = _read(case["data"], tuple(case["factors"]))
        gaussian = case["family"] == "gaussian"
        fit = fit_candidate(visits, case["name"], case["formula"], method="REML" if gaussian else "ML",
                            family=case["family"])
        _FITS[case["name"]] = (fit, visits)
    return _FITS[case["name"]]


def _case_estimates(case: dict, method: str):
    """Our estimates for one emmeans block: an LMM's from our REML fit and df engine; a GLMM's from glmer's β
    and vcov (the case's ``fixed`` and ``vcov``), so that what is compared is the grid, the response scale and
    the ratios, not the two fits (glmer's vcov is the finite-difference Hessian's, ours RX's)."""
    fit, visits = _case_fit(case)
    if method == "response":
        names = tuple(case["fixed"]["term"])
        assert names == tuple(fe.term for fe in fit.fixed_effects)
        inference = FixedEffectInference("normal", names, np.array(case["fixed"]["estimate"]),
                                         np.array(case["vcov"]["matrix"]), lambda L: np.full(len(L), math.inf))
    else:
        df_method = {"satterthwaite": "satterthwaite", "kenward_roger": "kenward-roger"}[method]
        try:
            inference = fixed_effect_inference(fit, visits, df_method)
        except NotImplementedError:
            pytest.skip(f"df method {df_method!r} is not implemented yet")
    spec = case["emmeans"]
    return estimate_means(fit, visits, EstimatesConfig(by=spec["by"], at=spec["at"]), inference), spec


def _close(got: np.ndarray, expected: np.ndarray, rel: float, scale: np.ndarray | float = 0.0) -> None:
    """|got − expected| ≤ rel × max(|expected|, scale): a bound or a difference near zero is compared on the
    scale of its standard error, where a relative tolerance would ask for digits neither fit has. NaN matches
    only NaN: a row emmeans reports as nonEst (null) must be NaN here, and only such a row."""
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
    with np.errstate(invalid="ignore"):  # inf - inf where both df are infinite
        same = (got == expected) | (np.abs(got - expected) <= rel * np.maximum(np.abs(expected), scale))
    same |= np.isnan(got) & np.isnan(expected)  # emmeans' nonEst (null in the JSON): NaN here
    assert same.all(), f"got {got[~same]}, emmeans {expected[~same]} (rel {rel})"


def _column(rows: list[dict], key: str, missing: float = math.nan) -> np.ndarray:
    """One emmeans column; a null (nonEst) is NaN, an absent key (an infinite df, left out) ``missing``."""
    return np.array([row.get(key, missing) for row in rows], dtype=float)


@pytest.mark.parametrize(("case", "method"), BLOCKS, ids=[f"{c['name']}-{m}" for c, m in BLOCKS])
def test_marginal_means_equal_emmeans(case: dict, method: str) -> None:
    estimates, spec = _case_estimates(case, method)
    rows = case["emmeans"][method]["means"]
    estimate_key = {"binomial": "prob", "poisson": "rate"}.get(case["family"], "emmean")
    low, high = ("lower.CL", "upper.CL") if "lower.CL" in rows[0] else ("asymp.LCL", "asymp.UCL")
    means = estimates.means
    assert list(means[spec["by"]]) == [row["level"] for row in rows]
    assert list(means[spec["time"]]) == [float(row["time"]) for row in rows]
    se = _column(rows, "SE")
    _close(means["estimate"].to_numpy(), _column(rows, estimate_key), 1e-4, se)
    _close(means["se"].to_numpy(), se, 1e-3)
    _close(means["df"].to_numpy(), _column(rows, "df", math.inf), 1e-2)
    _close(means["ci_low"].to_numpy(), _column(rows, low), 1e-3, se)
    _close(means["ci_high"].to_numpy(), _column(rows, high), 1e-3, se)


@pytest.mark.parametrize(("case", "method"), BLOCKS, ids=[f"{c['name']}-{m}" for c, m in BLOCKS])
def test_contrasts_equal_emmeans(case: dict, method: str) -> None:
    estimates, spec = _case_estimates(case, method)
    block = case["emmeans"][method]
    rows = block["contrasts"]
    estimate_key = {"binomial": "odds.ratio", "poisson": "ratio"}.get(case["family"], "estimate")
    low, high = ("lower.CL", "upper.CL") if "lower.CL" in rows[0] else ("asymp.LCL", "asymp.UCL")
    contrasts = estimates.contrasts
    assert list(contrasts["contrast"]) == [row["contrast"] for row in rows]
    assert list(contrasts[spec["time"]]) == [float(row["time"]) for row in rows]
    assert (contrasts["adjustment"] == block["adjust"]).all()
    se = _column(rows, "SE")
    _close(contrasts["estimate"].to_numpy(), _column(rows, estimate_key), 1e-4, se)
    _close(contrasts["se"].to_numpy(), se, 1e-3)
    _close(contrasts["df"].to_numpy(), _column(rows, "df", math.inf), 1e-2)
    _close(contrasts["ci_low"].to_numpy(), _column(rows, low), 1e-3, se)
    _close(contrasts["ci_high"].to_numpy(), _column(rows, high), 1e-3, se)
    # Below 1e-10 emmeans' 1 - .pdunnx (and R's pt) carry no relative precision.
    _close(contrasts["p_value"].to_numpy(), _column(rows, "p.value"), 1e-2, 1e-8)


@pytest.mark.parametrize("case", _reference_cases(), ids=[case["name"] for case in _reference_cases()])
def test_reference_grid_equals_emmeans(case: dict) -> None:
    """ref_grid(fit, at = ...): the by levels, the factors averaged over and the covariates held at their mean."""
    fit, visits = _case_fit(case)
    spec = case["emmeans"]
    formula = parse_formula(case["formula"])
    transforms = build_design(visits, formula, dropped=fit.dropped_terms).transforms
    grid = reference_grid(visits, formula, transforms, EstimatesConfig(by=spec["by"], at=spec["at"]))
    expected = spec["reference_grid"]
    assert grid.levels == tuple(expected[spec["by"]])
    assert set(grid.averaged) == set(spec["averaged_over"])
    for column, levels in grid.averaged.items():
        assert levels == tuple(expected[column])
    assert dict(grid.nests) == {column: tuple(within) for column, within in spec.get("nesting", {}).items()}
    held = spec["held_at"] or {}
    assert set(grid.held) == set(held)
    for column, value in grid.held.items():
        # emmeans keeps the mean to 6 significant digits in the JSON's reference_grid
        assert value == pytest.approx(held[column][0], rel=1e-5)


def _development_case(name: str) -> dict:
    return next(case for case in _reference_cases() if case["name"] == name)


def test_nested_centre_is_averaged_within_its_arm() -> None:
    # emmeans: "NOTE: A nesting structure was detected in the fitted model: centre %in% arm"; lme4 drops
    # the centre column aliased with arm. Averaging over all four centres gave a control mean 0.8 off at week 8.
    case = _development_case("sim_centres_nested")
    fit, _ = _case_fit(case)
    assert fit.dropped_terms
    estimates, _ = _case_estimates(case, "satterthwaite")
    nesting = "centre is nested in arm: averaged within each arm over its own levels (emmeans' nesting)."
    assert nesting in estimates.notes
    assert not any("Not estimable" in note for note in estimates.notes)


def test_collinear_covariate_leaves_means_blank_as_emmeans_nonest() -> None:
    # age2 = 2 age + 1 (lme4 drops age2): at age = 40 with age2 at its mean the means are not estimable
    # (emmeans prints nonEst); the differences between arms do not involve age and are estimated.
    estimates, _ = _case_estimates(_development_case("sim_centres_collinear_age"), "satterthwaite")
    assert estimates.means[list(MEAN_COLUMNS)].isna().all().all()
    assert estimates.contrasts[["estimate", "se", "df", "p_value"]].notna().all().all()
    note = next(note for note in estimates.notes if note.startswith("Not estimable"))
    assert "4 of 4 means" in note and "drops age2" in note and "arm = control, age = 40" in note
