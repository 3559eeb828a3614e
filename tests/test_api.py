"""The Python API (``longitudinal.fit``, ``longitudinal.compare``, ``MixedModel``) against lme4 1.1.31 and lmerTest
3.1.3, and its handling of data as users have them.

The R numbers below were produced with the R code written next to them (lme4 1.1.31, lmerTest 3.1.3), on
``tests/fixtures/sleepstudy.csv`` (lme4::sleepstudy) and on two small data sets built here without a random
generator (``nested_frame``, ``binary_frame``), written to CSV and read by R. Tolerances: fixed effects 1e-5
relative, standard errors 1e-3, the REML criterion 1e-3 absolute, predictions 1e-6 relative (the issue's).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import longitudinal
from longitudinal.errors import ConfigError, DataError, FitError, FormulaError

SLEEPSTUDY = Path(__file__).parent / "fixtures" / "sleepstudy.csv"
RIS = "Reaction ~ Days + (Days | Subject)"


def unit(i: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic numbers in [0, 1) without a random generator: the same data on every numpy (and in R)."""
    return np.modf(np.abs(np.sin(np.asarray(i, dtype=float) * 12.9898 + salt * 78.233)) * 43758.5453)[0]


def nested_frame() -> pd.DataFrame:
    """6 schools x 4 pupils x 3 visits, y ~ x + (1 | school/pupil)."""
    i = np.arange(72)
    school, pupil, x = i // 12, (i // 3) % 4, (i % 3).astype(float)
    y = (10 + 2 * x + 3 * (unit(school, 1) - 0.5) * 2 + 2 * (unit(school * 4 + pupil, 2) - 0.5) * 2
         + (unit(i, 3) - 0.5) * 3)
    return pd.DataFrame({"y": y.round(4), "x": x, "school": [f"s{s}" for s in school],
                         "pupil": [f"p{p}" for p in pupil]})


def binary_frame() -> pd.DataFrame:
    """20 groups x 8 visits of a 0/1 outcome, y ~ x + (1 | g)."""
    i = np.arange(160)
    g, x = i // 8, (i % 8) / 7.0
    eta = -0.5 + 1.5 * x + 2.0 * (unit(g, 4) - 0.5)
    y = (unit(i, 5) < 1 / (1 + np.exp(-eta))).astype(int)
    return pd.DataFrame({"y": y, "x": x.round(6), "g": [f"g{k:02d}" for k in g]})


@pytest.fixture(scope="session")
def sleep() -> pd.DataFrame:
    return pd.read_csv(SLEEPSTUDY)


@pytest.fixture(scope="session")
def ris(sleep: pd.DataFrame) -> longitudinal.MixedModel:
    return longitudinal.fit(RIS, sleep, name="ris")


# ------------------------------------------------------------------------------------------ against lme4


def test_reml_fit_matches_lmer_and_lmertest(ris: longitudinal.MixedModel) -> None:
    # m <- lmerTest::lmer(Reaction ~ Days + (Days | Subject), sleepstudy); summary(m)$coefficients; REMLcrit(m)
    fixed = ris.fixed_effects
    assert list(fixed.index) == ["(Intercept)", "Days"]
    assert list(fixed.columns) == ["estimate", "std_error", "df", "statistic", "ci_low", "ci_high", "p_value"]
    np.testing.assert_allclose(fixed["estimate"], [251.405104848485, 10.467285959596], rtol=1e-5)
    np.testing.assert_allclose(fixed["std_error"], [6.82459669495491, 1.54578964390598], rtol=1e-3)
    np.testing.assert_allclose(fixed["df"], [16.9997262884927, 16.9999837255917], rtol=1e-3)
    np.testing.assert_allclose(fixed["p_value"], [1.17155811120826e-17, 3.26382446992738e-06], rtol=1e-2)
    assert ris.method == "REML"
    assert ris.reml_criterion == pytest.approx(1743.62827195995, abs=1e-3)
    assert ris.sigma == pytest.approx(25.5917957216753, rel=1e-5)
    assert ris.loglik == pytest.approx(-871.814135979976, abs=5e-4)
    assert ris.aic == pytest.approx(1755.62827195995, abs=1e-3)
    assert ris.bic == pytest.approx(1774.78601306529, abs=1e-3)
    assert (ris.n_obs, ris.n_groups, ris.n_dropped) == (180, {"Subject": 18}, 0)
    assert ris.converged and not ris.singular


def test_variance_components_as_lme4s_varcorr(ris: longitudinal.MixedModel) -> None:
    # as.data.frame(VarCorr(m)): vcov 612.100158, 35.071714, 9.604409, 654.940008; sdcor ... 0.0655512382
    table = ris.random_effects
    assert list(table.columns) == ["group", "term", "term2", "variance", "sd", "corr"]
    assert list(table["group"]) == ["Subject", "Subject", "Subject", "Residual"]
    np.testing.assert_allclose(table["variance"], [612.100158024769, 35.0717144509389, 9.60440895115776,
                                                   654.940008259961], rtol=1e-3)
    assert table["corr"].iloc[2] == pytest.approx(0.0655512382381282, rel=1e-3)


def test_conditional_modes_and_their_sds_as_ranef_condvar(ris: longitudinal.MixedModel) -> None:
    # r <- ranef(m, condVar = TRUE); r$Subject["308", ]; sqrt(attr(r$Subject, "postVar")[, , 1] diagonal)
    ranef = ris.ranef()
    assert isinstance(ranef, pd.DataFrame)
    subject = ranef[ranef["level"] == "308"].set_index("term")
    np.testing.assert_allclose(subject["estimate"], [2.25855094990116, 9.19897576556590], rtol=1e-3)
    np.testing.assert_allclose(subject["cond_sd"], [12.0708569505143, 2.30483902090028], rtol=1e-3)
    wide = ris.ranef(wide=True)
    assert isinstance(wide, dict)
    assert list(wide["Subject"].columns) == ["(Intercept)", "Days"]
    assert wide["Subject"].loc["309", "(Intercept)"] == pytest.approx(-40.3987380788051, rel=1e-3)


def test_predictions_conditional_population_and_for_an_unseen_subject(ris: longitudinal.MixedModel) -> None:
    # nd <- data.frame(Days = c(0, 2.5, 9, 4), Subject = c("308", "330", "372", "999"))
    # predict(m, nd, allow.new.levels = TRUE); predict(m, nd, re.form = NA)
    new = pd.DataFrame({"Days": [0, 2.5, 9, 4], "Subject": [308, 330, 372, 999]}, index=[10, 11, 12, 13])
    conditional = ris.predict(new)
    assert list(conditional.index) == [10, 11, 12, 13]
    np.testing.assert_allclose(conditional, [253.663655798386, 289.228063511785, 369.481469281353,
                                             293.274248686869], rtol=1e-6)
    np.testing.assert_allclose(ris.predict(new, random_effects=False),
                               [251.405104848485, 277.573319747475, 345.610678484849, 293.274248686869], rtol=1e-6)
    np.testing.assert_allclose(ris.predict(), ris.fitted, rtol=1e-10)


def test_ml_fit_matches_lmer_reml_false(sleep: pd.DataFrame) -> None:
    # ml <- lmerTest::lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE); summary(ml); logLik(ml)
    ml = longitudinal.fit(RIS, sleep, reml=False)
    assert ml.method == "ML" and ml.reml_criterion is None
    np.testing.assert_allclose(ml.fixed_effects["estimate"], [251.405104848486, 10.4672859595958], rtol=1e-5)
    np.testing.assert_allclose(ml.fixed_effects["std_error"], [6.63212274219029, 1.50223021383204], rtol=1e-3)
    np.testing.assert_allclose(ml.fixed_effects["df"], [18.0011347663803, 18.0001769285147], rtol=1e-3)
    assert ml.loglik == pytest.approx(-875.969672244495, abs=1e-4)


def test_profile_intervals_on_request_match_lme4s_confint(sleep: pd.DataFrame) -> None:
    # confint(ml, oldNames = FALSE): sd_(Intercept) 14.3814811 37.7160187; cor -0.4815004 0.6849861;
    # sd_Days 3.8011648 8.7533667; sigma 22.8982662 28.8579973
    ml = longitudinal.fit(RIS, sleep, reml=False)
    intervals = ml.confint()
    variance = intervals[intervals["parameter"] != "beta"]
    np.testing.assert_allclose(variance["ci_low"], [14.3814811165, 3.8011647624, -0.4815004432, 22.8982662150],
                               rtol=1e-3)
    np.testing.assert_allclose(variance["ci_high"], [37.716018740, 8.753366659, 0.684986139, 28.857997323],
                               rtol=1e-3)
    assert list(intervals.loc[intervals["parameter"] == "beta", "term"]) == ["(Intercept)", "Days"]


def test_compare_refits_reml_fits_by_ml_as_lme4s_anova(sleep: pd.DataFrame, ris: longitudinal.MixedModel) -> None:
    # m1 <- lmer(Reaction ~ Days + (1 | Subject)); m0 <- lmer(Reaction ~ 1 + (Days | Subject))
    # anova(m1, m0, m): "refitting model(s) with ML (instead of REML)"; npar 4, 5, 6; AIC 1802.07864300523,
    # 1785.47588196108, 1763.93934446321; m0 vs m: Chisq 23.53654, Df 1, Pr 1.22563995719719e-06;
    # m1 vs m: Chisq 42.1393, Df 2 (lme4's plain chi2; here the 50:50 mixture of chi2(1) and chi2(2))
    ri = longitudinal.fit("Reaction ~ Days + (1 | Subject)", sleep, name="ri")
    no_slope = longitudinal.fit("Reaction ~ 1 + (Days | Subject)", sleep, name="no_days")
    table = longitudinal.compare([ri, ris, no_slope])
    assert list(table.index) == ["ri", "no_days", "ris"]
    assert list(table["n_params"]) == [4, 5, 6]
    np.testing.assert_allclose(table["aic"], [1802.07864300523, 1785.47588196108, 1763.93934446321], atol=1e-3)
    np.testing.assert_allclose(table["bic"], [1814.85047040879, 1801.44066621553, 1783.09708556855], atol=1e-3)
    np.testing.assert_allclose(table["deviance"], [1794.07864300523, 1775.47588196108, 1751.93934446321], atol=1e-3)
    assert table.loc["ris", "chisq"] == pytest.approx(23.53654, abs=1e-4)
    assert table.loc["ris", "chi_df"] == 1
    assert table.loc["ris", "p_value"] == pytest.approx(1.22563995719719e-06, rel=1e-3)
    assert np.isnan(table.loc["no_days", "chisq"])  # ri and no_days are not nested
    assert table["aic_weight"].sum() == pytest.approx(1.0)
    tests = table.attrs["tests"].set_index(["smaller", "larger"])
    assert tests.loc[("ri", "ris"), "chisq"] == pytest.approx(42.1393, abs=1e-3)
    assert tests.loc[("ri", "ris"), "reference"] == "mixture"
    assert any("refitting model(s) ri, ris, no_days with ML" in note for note in table.attrs["notes"])
    assert ris.method == "REML"  # the models given are left as they were


def test_nested_grouping_factors_predict_per_level(sleep: pd.DataFrame) -> None:
    # m <- lmer(y ~ x + (1 | school/pupil), nested)
    # fixef(m): 9.12528611111123 1.96750416666667; REMLcrit(m): 225.237328532878
    # nd <- data.frame(x = c(0, 1.5, 2, 1), school = c("s0","s2","s9","s3"), pupil = c("p1","p3","p0","p7"))
    # predict(m, nd, allow.new.levels = TRUE); predict(m, nd, re.form = NA)
    m = longitudinal.fit("y ~ x + (1 | school/pupil)", nested_frame())
    np.testing.assert_allclose(m.fixed_effects["estimate"], [9.12528611111123, 1.96750416666667], rtol=1e-5)
    assert m.reml_criterion == pytest.approx(225.237328532878, abs=1e-3)
    assert m.n_groups == {"school": 6, "school:pupil": 24}
    new = pd.DataFrame({"x": [0, 1.5, 2, 1], "school": ["s0", "s2", "s9", "s3"], "pupil": ["p1", "p3", "p0", "p7"]})
    np.testing.assert_allclose(m.predict(new), [8.83778642346008, 11.43724440705134, 13.06029444444458,
                                                11.46139561160718], rtol=1e-6)
    np.testing.assert_allclose(m.predict(new, random_effects=False),
                               [9.12528611111123, 12.07654236111124, 13.06029444444458, 11.09279027777791], rtol=1e-6)


def test_binomial_model_predicts_on_the_link_scale_by_default() -> None:
    # g <- glmer(y ~ x + (1 | g), binary, family = binomial); summary(g)$coefficients; logLik -106.742978190141
    # nb <- data.frame(x = c(0, 0.5, 1), g = c("g03", "g10", "new"))
    # predict(g, nb, allow.new.levels = TRUE); predict(..., type = "response")
    # glmer's default optimizer stops about 1.3e-5 log-likelihood units short of the optimum found here
    # (-106.742965), so its estimates and predictions agree to about 2e-4, not 1e-6.
    g = longitudinal.fit("y ~ x + (1 | g)", binary_frame(), family="binomial")
    assert g.method == "ML" and g.df_method == "normal" and np.isnan(g.sigma)
    np.testing.assert_allclose(g.fixed_effects["estimate"], [0.0876637377615686, 0.5451453440698903], rtol=1e-3)
    np.testing.assert_allclose(g.fixed_effects["std_error"], [0.334728567066794, 0.515315104235456], rtol=3e-3)
    assert np.isinf(g.fixed_effects["df"]).all()
    assert g.loglik == pytest.approx(-106.742978190141, abs=1e-4)
    new = pd.DataFrame({"x": [0, 0.5, 1], "g": ["g03", "g10", "new"]})
    np.testing.assert_allclose(g.predict(new), [-0.514056444131941, 0.426118104529446, 0.632809081831459],
                               rtol=1e-3)
    np.testing.assert_allclose(g.predict(new, type="response"),
                               [0.374243082818066, 0.604946327673785, 0.653126139826477], rtol=1e-3)
    assert "Family: binomial ( logit )" in g.summary()
    np.testing.assert_allclose(g.predict(type="response"), g.fitted, rtol=1e-10)


def test_poly_is_evaluated_with_the_training_datas_coefficients(sleep: pd.DataFrame) -> None:
    # m2 <- lmer(Reaction ~ poly(Days, 2) + (1 | Subject), sleepstudy)
    # predict(m2, data.frame(Days = c(0, 4.5, 12), Subject = c("308", "309", "x")), allow.new.levels = TRUE)
    m = longitudinal.fit("Reaction ~ poly(Days, 2) + (1 | Subject)", sleep)
    new = pd.DataFrame({"Days": [0, 4.5, 12], "Subject": ["308", "309", "x"]})
    np.testing.assert_allclose(m.predict(new), [296.235284419007, 217.873700757134, 393.189608080808], rtol=1e-6)


# ------------------------------------------------------------------------------------- data as users have it


def test_rows_with_a_missing_value_in_a_used_column_are_left_out_and_counted(sleep: pd.DataFrame) -> None:
    holes = sleep.assign(Reaction=sleep["Reaction"].where(sleep.index % 10 != 0), Unused=np.nan)
    m = longitudinal.fit(RIS, holes)
    complete = longitudinal.fit(RIS, sleep[sleep.index % 10 != 0])
    assert (m.n_obs, m.n_dropped) == (162, 18)
    assert m.reml_criterion == pytest.approx(complete.reml_criterion, abs=1e-9)
    assert "18 rows with missing values left out" in m.summary()


def test_integer_and_text_columns_are_read_as_the_pipeline_reads_them(sleep: pd.DataFrame) -> None:
    trial = pd.DataFrame({
        "score": [5.0, 6.1, 7.3, 4.2, 5.5, 6.9, 5.1, 6.0, 7.8, 3.9, 5.2, 6.4],
        "week": [0, 1, 2] * 4,
        "arm": pd.Categorical(["control"] * 6 + ["treated"] * 6),
        "id": [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3,
    })
    m = longitudinal.fit("score ~ week * arm + (1 | id)", trial)
    assert list(m.fixed_effects.index) == ["(Intercept)", "week", "armtreated", "week:armtreated"]
    assert set(m.ranef()["level"]) == {"1", "2", "3", "4"}
    new = pd.DataFrame({"week": [1.0], "arm": ["treated"], "id": ["3"]})
    assert m.predict(new).iloc[0] == pytest.approx(m.fitted.iloc[7], rel=1e-12)
    with pytest.raises(DataError, match="newdata: .*'arm' has the level 'placebo', which the fitted data did not have"):
        m.predict(new.assign(arm="placebo"))


def test_errors_are_the_pipelines(sleep: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="candidate 'ris' uses column 'Dayz', which the data lack; columns are: "
                                          "Reaction, Days, Subject"):
        longitudinal.fit("Reaction ~ Dayz + (Days | Subject)", sleep, name="ris")
    with pytest.raises(FormulaError, match="ris"):
        longitudinal.fit("Reaction ~ Days + (Days | )", sleep, name="ris")
    with pytest.raises(DataError, match="the response 'Subject' holds text"):
        longitudinal.fit("Subject ~ Days + (1 | Reaction)", sleep.astype({"Subject": str}))
    with pytest.raises(ConfigError, match="Kenward–Roger df need a REML fit"):
        longitudinal.fit(RIS, sleep, reml=False, df="kenward-roger")
    with pytest.raises(ConfigError, match="unknown family 'gamma'"):
        longitudinal.fit(RIS, sleep, family="gamma")


def test_predict_names_a_column_newdata_lacks(ris: longitudinal.MixedModel) -> None:
    with pytest.raises(ConfigError, match="newdata lacks column 'Subject', which the grouping factors of model "):
        ris.predict(pd.DataFrame({"Days": [1.0]}))
    assert ris.predict(pd.DataFrame({"Days": [1.0]}), random_effects=False).iloc[0] == pytest.approx(
        251.405104848485 + 10.467285959596, rel=1e-6)
    assert np.isnan(ris.predict(pd.DataFrame({"Days": [np.nan, 1.0], "Subject": ["308", "308"]})).iloc[0])


def test_compare_refuses_models_fitted_to_different_rows_or_responses(sleep: pd.DataFrame,
                                                                       ris: longitudinal.MixedModel) -> None:
    fewer = longitudinal.fit(RIS, sleep.assign(Days=sleep["Days"].where(sleep.index > 0)), name="fewer")
    with pytest.raises(FitError, match=r"fitted to different rows \('ris' on 180 rows .*'fewer' on 179 rows "
                                       r"\(1 left out for missing values\)"):
        longitudinal.compare([ris, fewer])
    other = longitudinal.fit("Days ~ Reaction + (1 | Subject)", sleep, name="other")
    with pytest.raises(FitError, match="likelihoods of different responses do not compare"):
        longitudinal.compare([ris, other])


def test_covariance_structure_models_predict_at_the_population_level_only() -> None:
    frame = nested_frame().assign(visit=lambda d: d["x"], id=lambda d: d["school"] + d["pupil"])
    m = longitudinal.fit("y ~ x + us(visit | id)", frame)
    population = m.predict(frame.head(3), random_effects=False)
    np.testing.assert_allclose(population, m.coefficients["(Intercept)"] + m.coefficients["x"] * frame["x"].head(3))
    with pytest.raises(FitError, match="need each subject's other residuals, which is not implemented"):
        m.predict(frame.head(3))


def test_summary_and_html(ris: longitudinal.MixedModel) -> None:
    text = ris.summary()
    for expected in ("Linear mixed model fit by REML", "Formula: Reaction ~ Days + (Days | Subject)",
                     "REML criterion at convergence: 1743.628", "Scaled residuals:", "Random effects:",
                     "Number of obs: 180, groups:  Subject, 18", "Satterthwaite", "Pr(>|t|)"):
        assert expected in text, expected
    # quantile(residuals(m) / sigma(m)): -3.95356734537 -0.46339768313 0.02311766478 0.46340207815 5.17926037341
    assert "-3.9536 -0.4634  0.0231 0.4634 5.1793" in text
    # vcov(m): cov2cor gives -0.138 between (Intercept) and Days
    assert "Correlation of Fixed Effects:" in text and "-0.138" in text
    assert "<table" in ris._repr_html_() and "Satterthwaite" in ris._repr_html_()
    assert repr(ris).startswith("<MixedModel 'ris': Reaction ~ Days + (Days | Subject), gaussian, REML, n=180")


# ------------------------------------------------------------------------------------ the name longitudinal.fit


def test_longitudinal_fit_stays_the_function_after_every_library_module_is_imported() -> None:
    code = textwrap.dedent("""
        import importlib, pkgutil
        import longitudinal
        for info in pkgutil.walk_packages(longitudinal.__path__, "longitudinal."):
            importlib.import_module(info.name)
        import flows.study_pipeline, tasks
        import longitudinal.fit.optimize as optimize
        from longitudinal.fit.candidate import fit_candidate
        from longitudinal.api import fit_model
        assert isinstance(longitudinal.fit, longitudinal.PackageFunction), longitudinal.fit
        assert longitudinal.fit.__doc__ == fit_model.__doc__
        import inspect
        assert "reml" in inspect.signature(longitudinal.fit).parameters
        assert longitudinal.fit.candidate.fit_candidate is fit_candidate
        assert optimize.__name__ == "longitudinal.fit.optimize"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_longitudinal_stays_light() -> None:
    """``import longitudinal`` (every CLI command does it) binds the API's names but imports the API, and with it
    the engines, pandas and scipy, on first use; Prefect, statsmodels and great_expectations stay out even then
    (scipy.stats too: ``compare`` imports it when called)."""
    code = "import sys, longitudinal; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(result.stdout.split())
    assert not {m for m in modules if m.split(".")[0] in ("pandas", "scipy", "prefect")}
    assert "longitudinal.api" not in modules
    code = "import sys, longitudinal; longitudinal.compare; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(result.stdout.split())
    assert "longitudinal.api" in modules
    assert not {m for m in modules if m.split(".")[0] in ("prefect", "statsmodels", "great_expectations")}
    assert "scipy.stats" not in modules


def test_a_singular_fit_warns_as_lme4_says_boundary_singular_fit() -> None:
    # The group means differ by less than the residual noise alone makes them: the group SD is 0, and lme4 says
    # "boundary (singular) fit" with SD 0 and residual SD 0.60553:
    # lmer(y ~ 1 + (1 | g), data.frame(y = c(1, 2, 1.5, 2.5, 1, 2), g = rep(c("a", "b", "c"), 2)))
    frame = pd.DataFrame({"y": [1, 2, 1.5, 2.5, 1, 2], "g": ["a", "b", "c"] * 2})
    with pytest.warns(longitudinal.SingularFitWarning, match="boundary"):
        m = longitudinal.fit("y ~ 1 + (1 | g)", frame)
    assert m.singular
    assert m.random_effects["sd"].tolist() == pytest.approx([0.0, 0.60553], abs=1e-5)


def test_scale_is_evaluated_with_the_training_mean_and_sd_as_r_does(sleep: pd.DataFrame) -> None:
    # R: m <- lmer(Reaction ~ scale(Days) + (scale(Days) | Subject), sleepstudy,
    #              control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12)))
    # fixef(m); sqrt(diag(vcov(m))); REMLcrit(m)
    # predict(m, data.frame(Days = c(0, 4.5, 12), Subject = c("308", "309", "999")), allow.new.levels = TRUE)
    m = longitudinal.fit("Reaction ~ scale(Days) + (scale(Days) | Subject)", sleep)
    np.testing.assert_allclose(m.fixed_effects["estimate"], [298.507891666667, 30.1488534213674], rtol=1e-5)
    np.testing.assert_allclose(m.fixed_effects["std_error"], [9.04993587706027, 4.45232551379759], rtol=1e-3)
    assert list(m.fixed_effects.index) == ["(Intercept)", "scale(Days)"]
    # the REML criterion is not invariant to rescaling a fixed-effect column: R's is 1741.51, not Days' 1743.63
    assert m.reml_criterion == pytest.approx(1741.51248771309, abs=1e-3)
    new = pd.DataFrame({"Days": [0, 4.5, 12], "Subject": ["308", "309", "999"]})  # scale(12) uses Days' mean, sd
    np.testing.assert_allclose(m.predict(new), [253.663670791548, 219.320650315954, 377.012536363637], rtol=1e-6)


def test_scale_of_a_constant_is_refused_naming_the_term(sleep: pd.DataFrame) -> None:
    with pytest.raises(FormulaError, match=r"scale\(one\): the variable is constant"):
        longitudinal.fit("Reaction ~ Days + scale(one) + (1 | Subject)", sleep.assign(one=1.0))
