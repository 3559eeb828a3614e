"""Likelihood-ratio tests between nested candidates (χ² and the 50:50 boundary mixture), nesting, AICc."""

from __future__ import annotations

import dataclasses
import math

import pytest
from scipy.stats import chi2

from longitudinal.errors import FitError
from longitudinal.inference.nested import (
    ModelStructure,
    added_random_terms,
    compare_nested,
    compare_pair,
    compute_aicc,
    describe_structure,
    is_nested,
    lrt_p_value,
)
from longitudinal.model.formula import parse_formula
from longitudinal.records import Fit, FixedEffect, LikelihoodRatioTest, failed_fit

# The example study's candidates.
RI = "score ~ week * arm + age + (1 | patient_id)"
RIS = "score ~ week * arm + age + (week | patient_id)"
RIS_UNCORRELATED = "score ~ week * arm + age + (week || patient_id)"


def structure(text: str) -> ModelStructure:
    return describe_structure(parse_formula(text))


def make_fit(name: str, formula: str, n_params: int, loglik: float, *, n_obs: int = 200,
             method: str = "ML", fixed: tuple[str, ...] = ()) -> Fit:
    return Fit(
        name=name, formula=formula, method=method,  # type: ignore[arg-type]
        engine="test", converged=True, singular=False,
        message="", n_obs=n_obs, n_subjects=40, n_params=n_params, loglik=loglik,
        fixed_effects=tuple(FixedEffect(term, 1.0, 0.1, 0.8, 1.2, 0.01) for term in fixed),
    )


def example_fits() -> tuple[Fit, ...]:
    # k = 5 fixed effects + θ + 1: ri θ=1, ris_uncorrelated θ=2, ris θ=3.
    return (
        make_fit("ri", RI, 7, -1000.0),
        make_fit("ris", RIS, 9, -990.0),
        make_fit("ris_uncorrelated", RIS_UNCORRELATED, 8, -991.5),
    )


# ----------------------------------------------------------------------------------------- p-values


def test_chi2_p_value_at_the_5_percent_critical_value() -> None:
    assert lrt_p_value(3.841459, 1) == pytest.approx(0.05, abs=1e-6)


def test_mixture_with_one_df_halves_the_chi2_p_value() -> None:
    # 0.5·P(χ²(0) > 2.7055) + 0.5·P(χ²(1) > 2.7055) = 0 + 0.5 × 0.10
    assert lrt_p_value(2.705543, 1, "mixture") == pytest.approx(0.05, abs=1e-6)


def test_mixture_with_two_df_averages_chi2_1_and_chi2_2() -> None:
    # 5.138 is the 5% critical value of the 50:50 mixture of χ²(1) and χ²(2) (Stram & Lee 1994, table 1).
    expected = 0.5 * chi2.sf(5.138, 1) + 0.5 * chi2.sf(5.138, 2)
    assert lrt_p_value(5.138, 2, "mixture") == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.05, abs=2e-4)


def test_a_statistic_at_or_below_zero_gives_p_one() -> None:
    assert lrt_p_value(0.0, 1, "mixture") == 1.0
    assert lrt_p_value(-0.5, 2) == 1.0


def test_the_conservative_reference_is_plain_chi2() -> None:
    assert lrt_p_value(7.0, 3, "chi2-conservative") == pytest.approx(chi2.sf(7.0, 3), rel=1e-12)


def test_a_test_without_degrees_of_freedom_is_refused() -> None:
    with pytest.raises(ValueError, match="df ≥ 1, got df = 0"):
        lrt_p_value(1.0, 0)


# ------------------------------------------------------------------------------------------ nesting


def test_the_example_candidates_nest_ri_in_uncorrelated_in_correlated() -> None:
    ri, ris, unc = structure(RI), structure(RIS), structure(RIS_UNCORRELATED)
    assert is_nested(ri, unc) and is_nested(unc, ris) and is_nested(ri, ris)
    assert not is_nested(ris, unc) and not is_nested(unc, ri) and not is_nested(ris, ri)


def test_nested_and_crossed_grouping_factors_nest_in_the_larger_structure() -> None:
    assert is_nested(structure("y ~ t + (1 | dog)"), structure("y ~ t + (1 | dog/side)"))
    assert is_nested(structure("y ~ t + (t | patient)"), structure("y ~ t + (t | patient) + (1 | rater)"))
    assert not is_nested(structure("y ~ t + (1 | dog:side)"), structure("y ~ t + (1 | dog)"))


def test_structures_that_are_not_special_cases_are_not_nested() -> None:
    assert not is_nested(structure("y ~ t + (1 | g)"), structure("y ~ t + (0 + t | g)"))
    assert not is_nested(structure("y ~ t + arm + (1 | g)"), structure("y ~ t + age + (1 | g)"))
    assert not is_nested(structure("y ~ t + (1 | g)"), structure("z ~ t + (1 | g)"))


def test_fixed_terms_are_compared_after_expansion() -> None:
    assert is_nested(structure("y ~ t + arm + (1 | g)"), structure("y ~ t * arm + (1 | g)"))
    assert structure("y ~ t * arm + (1 | g)").fixed == structure("y ~ arm + t + t:arm + (1 | g)").fixed
    assert structure("y ~ t + (1 + t | g)").random == structure("y ~ t + (t | g)").random


def test_added_random_terms_name_the_new_variances() -> None:
    assert added_random_terms(structure(RI), structure(RIS)) == ("week | patient_id",)
    assert added_random_terms(structure(RIS_UNCORRELATED), structure(RIS)) == ()
    assert added_random_terms(structure("y ~ t + (1 | dog)"), structure("y ~ t + (1 | dog/side)")) == \
        ("(Intercept) | dog:side",)


# ---------------------------------------------------------------------------------------------- tests


def test_compare_nested_finds_the_three_example_pairs_with_hand_computed_numbers() -> None:
    tests = {(t.smaller, t.larger): t for t in compare_nested(example_fits())}
    assert set(tests) == {("ri", "ris"), ("ri", "ris_uncorrelated"), ("ris_uncorrelated", "ris")}

    ri_ris = tests["ri", "ris"]  # adds the slope variance (boundary) and one covariance
    assert (ri_ris.df, ri_ris.statistic, ri_ris.reference) == (2, 20.0, "mixture")
    assert ri_ris.p_value == pytest.approx(0.5 * chi2.sf(20.0, 1) + 0.5 * chi2.sf(20.0, 2), rel=1e-12)
    assert ri_ris.boundary_terms == ("week | patient_id",) and ri_ris.added_covariances == 1
    assert ri_ris.test == "50:50 mixture of χ²(1) and χ²(2)"

    ri_unc = tests["ri", "ris_uncorrelated"]  # adds the slope variance only
    assert (ri_unc.df, ri_unc.statistic, ri_unc.reference) == (1, 17.0, "mixture")
    assert ri_unc.p_value == pytest.approx(0.5 * chi2.sf(17.0, 1), rel=1e-12)

    unc_ris = tests["ris_uncorrelated", "ris"]  # adds the correlation: an interior point, plain χ²
    assert (unc_ris.df, unc_ris.statistic, unc_ris.reference) == (1, 3.0, "chi2")
    assert unc_ris.p_value == pytest.approx(chi2.sf(3.0, 1), rel=1e-12)
    assert unc_ris.boundary_terms == () and unc_ris.added_covariances == 1 and not unc_ris.fixed_differ
    assert unc_ris.notes == ()


def test_pairs_come_in_candidate_order_smaller_first() -> None:
    order = [(t.smaller, t.larger) for t in compare_nested(example_fits())]
    assert order == [("ri", "ris"), ("ri", "ris_uncorrelated"), ("ris_uncorrelated", "ris")]


def test_two_new_variances_use_a_conservative_chi2_and_say_so() -> None:
    fits = (make_fit("ri", "y ~ t + (1 | p)", 4, -500.0),
            make_fit("big", "y ~ t + (t || p) + (1 | rater)", 6, -496.0))
    (test,) = compare_nested(fits)
    assert test.reference == "chi2-conservative" and test.df == 2
    assert test.p_value == pytest.approx(chi2.sf(8.0, 2), rel=1e-12)
    assert test.boundary_terms == ("t | p", "(Intercept) | rater")
    assert "upper bound" in test.notes[0]


def test_different_fixed_effects_are_noted_as_tested_on_ml_fits() -> None:
    fits = (make_fit("small", "y ~ t + (1 | p)", 4, -500.0, fixed=("(Intercept)", "t")),
            make_fit("big", "y ~ t * arm + (1 | p)", 6, -497.0,
                     fixed=("(Intercept)", "t", "armB", "t:armB")))
    (test,) = compare_nested(fits)
    assert test.added_fixed == ("armB", "t:armB") and test.reference == "chi2"
    assert test.p_value == pytest.approx(chi2.sf(6.0, 2), rel=1e-12)
    assert any("uses the ML fits" in note for note in test.notes)


def test_fixed_columns_from_the_fits_decide_nesting_when_present() -> None:
    # A column the engine dropped as rank-deficient ("armC") is not among the fit's columns.
    small = make_fit("small", "y ~ t + arm + (1 | p)", 4, -500.0, fixed=("(Intercept)", "t", "armB"))
    big = make_fit("big", "y ~ t * arm + (1 | p)", 5, -499.0, fixed=("(Intercept)", "t", "armB", "t:armB"))
    (test,) = compare_nested((small, big))
    assert test.added_fixed == ("t:armB",)


def test_a_larger_fit_that_stopped_short_gets_no_p_value() -> None:
    fits = (make_fit("ri", RI, 7, -1000.0), make_fit("ris", RIS, 9, -1000.5))
    (test,) = compare_nested(fits)
    assert test.statistic == -1.0 and math.isnan(test.p_value)
    assert any("stopped short" in note for note in test.notes)


def test_a_larger_fit_a_hair_below_the_smaller_gets_p_one() -> None:
    fits = (make_fit("ri", RI, 7, -1000.0), make_fit("ris", RIS, 9, -1000.0 - 1e-6))
    (test,) = compare_nested(fits)
    assert test.p_value == 1.0


def test_equal_sized_candidates_take_no_part() -> None:
    same = make_fit("ri_again", "score ~ week * arm + age + (1 | patient_id)", 7, -1000.0)
    assert compare_nested((make_fit("ri", RI, 7, -1000.0), same)) == ()


def test_nesting_comes_from_the_formulas_and_a_missing_fit_gets_a_row_saying_why() -> None:
    failed = failed_fit("ris", RIS, "ML", "test", "candidate 'ris': zero residual variance", n_obs=200,
                        n_subjects=40, n_params=9)
    tests = {(t.smaller, t.larger): t for t in compare_nested((make_fit("ri", RI, 7, -1000.0), failed,
                                                              make_fit("unc", RIS_UNCORRELATED, 8, -995.0)))}
    assert set(tests) == {("ri", "ris"), ("ri", "unc"), ("unc", "ris")}
    missing = tests[("ri", "ris")]
    assert not missing.tested and math.isnan(missing.statistic) and math.isnan(missing.p_value)
    assert missing.df == 2 and missing.reference == "mixture"
    assert missing.notes[0] == "no test: the fit of 'ris' failed (zero residual variance)"
    assert tests[("ri", "unc")].tested and tests[("ri", "unc")].statistic == pytest.approx(10.0)


def test_a_fit_with_a_convergence_warning_is_tested_and_the_test_says_so() -> None:
    warned = dataclasses.replace(make_fit("ris", RIS, 9, -990.0), converged=False,
                                 message="failed to converge with max|grad| = 0.005 (tol = 0.002)")
    (test,) = compare_nested((make_fit("ri", RI, 7, -1000.0), warned))
    assert test.tested and test.statistic == pytest.approx(20.0)
    assert any("'ris' did not pass lme4's convergence checks (failed to converge with max|grad| = 0.005"
               in note for note in test.notes)


def test_reml_fits_are_refused() -> None:
    fits = (make_fit("ri", RI, 7, -1000.0, method="REML"), make_fit("ris", RIS, 9, -990.0))
    with pytest.raises(FitError, match=r"candidates ri were fitted by REML; .*use ML fits"):
        compare_nested(fits)


def test_fits_on_different_rows_are_refused() -> None:
    fits = (make_fit("ri", RI, 7, -1000.0, n_obs=200), make_fit("ris", RIS, 9, -990.0, n_obs=199))
    with pytest.raises(FitError, match=r"different rows \(ri n=200, ris n=199\)"):
        compare_nested(fits)


def test_compare_pair_refuses_a_pair_that_is_not_nested() -> None:
    small = make_fit("ris", RIS, 9, -990.0)
    big = make_fit("ri", RI, 7, -1000.0)
    with pytest.raises(FitError, match=r"candidate 'ris' .* is not nested in 'ri'"):
        compare_pair(small, big)


def test_compare_pair_returns_a_typed_record() -> None:
    result = compare_pair(make_fit("ri", RI, 7, -1000.0), make_fit("ris", RIS, 9, -990.0))
    assert isinstance(result, LikelihoodRatioTest) and result.larger == "ris"


# ----------------------------------------------------------------------------------------------- AICc


def test_aicc_adds_the_small_sample_correction_to_aic() -> None:
    fit = make_fit("m", RI, 4, -100.0, n_obs=20)
    # AIC = 200 + 8 = 208; correction 2·4·5 / (20 − 4 − 1) = 40/15
    assert compute_aicc(fit) == pytest.approx(208.0 + 40.0 / 15.0, rel=1e-12)


def test_aicc_is_undefined_when_rows_do_not_exceed_parameters_plus_one() -> None:
    assert math.isnan(compute_aicc(make_fit("m", RI, 4, -100.0, n_obs=5)))


def test_aicc_of_a_failed_fit_is_nan() -> None:
    failed = failed_fit("broken", RI, "ML", "test", "no", n_obs=200, n_subjects=40, n_params=7)
    assert math.isnan(compute_aicc(failed))


# ------------------------------------------------------------------------- computed in the select stage


def test_the_selection_carries_the_tests_and_aicc_for_the_report() -> None:
    from longitudinal.inference.criteria import select_model

    fits = (*example_fits(), failed_fit("broken", RIS, "ML", "test", "no", n_obs=200, n_subjects=40, n_params=9))
    selection = select_model(fits, "bic")
    assert selection.tests == compare_nested(fits) and selection.tests_refused == ""
    assert [(t.smaller, t.larger, t.tested) for t in selection.tests][-1] == ("ris_uncorrelated", "broken", False)
    # ri: AIC = 2000 + 14 = 2014, + 2·7·8/(200 − 7 − 1) = 0.5833...
    assert selection.aicc["ri"] == pytest.approx(2014.0 + 112.0 / 192.0, rel=1e-12)
    assert set(selection.aicc) == {f.name for f in fits} and math.isnan(selection.aicc["broken"])


# --------------------------------------------------------------------- covariance structures (MMRM)


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        # the order of mmrm's structures, and what follows from it
        ("cs", "csh"), ("cs", "toep"), ("ar1", "ar1h"), ("ar1", "toep"), ("ar1", "ad"), ("csh", "toeph"),
        ("ar1h", "toeph"), ("toep", "toeph"), ("ad", "adh"), ("ar1h", "adh"), ("toeph", "us"), ("adh", "us"),
        ("cs", "us"), ("ar1", "us"), ("ar1", "adh"), ("cs", "toeph"), ("ad", "us"),
    ],
)
def test_a_structure_nests_in_those_it_is_a_special_case_of(smaller: str, larger: str) -> None:
    small, big = structure(f"y ~ v * arm + {smaller}(v | id)"), structure(f"y ~ v * arm + {larger}(v | id)")
    assert is_nested(small, big) and not is_nested(big, small)


@pytest.mark.parametrize(
    ("one", "other"),
    [("cs", "ar1"), ("cs", "ad"), ("csh", "ar1h"), ("toep", "ad"), ("toeph", "adh"), ("csh", "toep"),
     ("sp_exp", "ar1"), ("sp_exp", "toeph"), ("sp_exp", "cs")],
)
def test_structures_that_are_not_special_cases_of_each_other_are_not_nested(one: str, other: str) -> None:
    a, b = structure(f"y ~ v + {one}(v | id)"), structure(f"y ~ v + {other}(v | id)")
    assert not is_nested(a, b) and not is_nested(b, a)


def test_structures_compare_only_on_the_same_visit_and_subject_columns() -> None:
    assert is_nested(structure("y ~ 1 + ar1(v | id)"), structure("y ~ 1 + us(v | id)"))
    assert not is_nested(structure("y ~ 1 + ar1(week | id)"), structure("y ~ 1 + us(v | id)"))
    assert not is_nested(structure("y ~ 1 + ar1(v | site)"), structure("y ~ 1 + us(v | id)"))


def test_independent_residuals_nest_in_a_structure_next_to_the_same_random_effects() -> None:
    ri = structure("y ~ t + (1 | id)")
    for name in ("ar1", "ar1h", "ad", "adh", "sp_exp"):
        assert is_nested(ri, structure(f"y ~ t + (1 | id) + {name}(t | id)"))
        assert is_nested(structure("y ~ t + (t | id)"), structure(f"y ~ t + (t | id) + {name}(t | id)"))
        assert not is_nested(structure(f"y ~ t + (1 | id) + {name}(t | id)"), ri)
    # Random effects still nest as without a structure; the structure must be kept.
    assert is_nested(structure("y ~ t + (1 | id) + ar1(t | id)"), structure("y ~ t + (t | id) + ar1(t | id)"))
    assert is_nested(structure("y ~ t + (1 | id)"), structure("y ~ t + (t | id) + ar1h(t | id)"))
    assert not is_nested(structure("y ~ t + (1 | id) + ar1(t | id)"), structure("y ~ t + (t | id)"))
    assert not is_nested(structure("y ~ t + (t | id)"), structure("y ~ t + (1 | id) + ar1(t | id)"))


def test_a_random_intercept_is_compound_symmetry_and_nests_in_the_structures_that_contain_it() -> None:
    ri = structure("y ~ t + (1 | id)")
    for name in ("cs", "csh", "toep", "toeph", "us"):
        assert is_nested(ri, structure(f"y ~ t + {name}(t | id)"))
    for name in ("ar1", "ar1h", "ad", "adh", "sp_exp"):
        assert not is_nested(ri, structure(f"y ~ t + {name}(t | id)"))
    assert not is_nested(ri, structure("y ~ t + us(t | site)"))
    assert not is_nested(structure("y ~ t + (1 | id) + (1 | site)"), structure("y ~ t + us(t | id)"))
    # with AR(1) residuals it is Toeplitz
    ri_ar1 = structure("y ~ t + (1 | id) + ar1(t | id)")
    assert is_nested(ri_ar1, structure("y ~ t + toep(t | id)")) and is_nested(ri_ar1, structure("y ~ t + toeph(t | id)"))
    assert not is_nested(ri_ar1, structure("y ~ t + csh(t | id)"))
    assert not is_nested(structure("y ~ t + (1 | id) + ar1h(t | id)"), structure("y ~ t + toeph(t | id)"))


def test_us_contains_every_covariance_of_a_subject_s_visits() -> None:
    us = structure("y ~ t + us(t | id)")
    for smaller in ("(t | id)", "(t || id)", "(poly(t, 2) | id)", "(t | id) + sp_exp(t | id)",
                    "(1 | id) + adh(t | id)", "sp_exp(t | id)"):
        assert is_nested(structure(f"y ~ t + {smaller}"), us), smaller
    # random effects that read another column, or are grouped by another factor, are not functions of the visit
    assert not is_nested(structure("y ~ t + (arm | id)"), us)
    assert not is_nested(structure("y ~ t + (t | id) + (1 | site)"), us)
    assert not is_nested(structure("y ~ t + (week | id)"), us)
    # only us: a random slope is not Toeplitz
    assert not is_nested(structure("y ~ t + (t | id)"), structure("y ~ t + toeph(t | id)"))


def test_an_mmrm_nests_in_a_model_with_random_effects_only_through_its_structure() -> None:
    for name in ("us", "cs", "toeph", "ar1"):
        mmrm = structure(f"y ~ t + {name}(t | id)")
        assert not is_nested(mmrm, structure("y ~ t + (1 | id)"))
        assert not is_nested(mmrm, structure("y ~ t + (t | id)"))
    # Random effects added next to a larger structure: the intercept variance is tested on its boundary.
    fits = (make_fit("ar1", "y ~ t + ar1(t | id)", 4, -500.0),
            make_fit("ri_ar1h", "y ~ t + (1 | id) + ar1h(t | id)", 9, -495.0))
    (test,) = compare_nested(fits)
    assert (test.reference, test.boundary_terms, test.df) == ("mixture", ("(Intercept) | id",), 5)


def test_a_structure_added_to_random_effects_is_tested_by_chi2_and_said_so() -> None:
    fits = (make_fit("ri", "y ~ t + (1 | id)", 4, -500.0), make_fit("ri_ar1", "y ~ t + (1 | id) + ar1(t | id)", 5, -497.0))
    (test,) = compare_nested(fits)
    assert (test.smaller, test.larger, test.df, test.reference) == ("ri", "ri_ar1", 1, "chi2")
    assert test.p_value == pytest.approx(chi2.sf(6.0, 1), rel=1e-12)
    assert test.boundary_terms == () and test.added_covariances == 0
    assert test.notes == ("'ri_ar1' adds the residual covariance ar1(t | id); independent residuals are its special "
                          "case with zero correlations, an interior point of its parameters (χ²)",)


def test_a_structure_and_a_random_term_added_together_keep_the_boundary_mixture() -> None:
    fits = (make_fit("ri", "y ~ t + (1 | id)", 4, -500.0),
            make_fit("big", "y ~ t + (t | id) + ar1h(t | id)", 11, -490.0))
    (test,) = compare_nested(fits)
    assert test.reference == "mixture" and test.boundary_terms == ("t | id",) and test.df == 7
    assert test.residual_change == "independent → ar1h"
    assert any("equal variances" in note for note in test.notes)


def test_sp_exp_against_independence_is_a_boundary_and_reported_as_conservative() -> None:
    fits = (make_fit("ris", "y ~ t + (t | id)", 6, -500.0),
            make_fit("ris_exp", "y ~ t + (t | id) + sp_exp(t | id)", 7, -498.0))
    (test,) = compare_nested(fits)
    assert test.reference == "chi2-conservative" and test.p_value == pytest.approx(chi2.sf(4.0, 1), rel=1e-12)
    assert test.notes[0].startswith("the range of sp_exp(t | id) is zero under the smaller model")
    assert "reported as conservative" in test.notes[0]


def test_structure_against_structure_is_a_chi2_test_naming_both() -> None:
    fits = (make_fit("ar1", "y ~ factor(v) * arm + ar1(v | id)", 10, -800.0),
            make_fit("toep", "y ~ factor(v) * arm + toep(v | id)", 12, -795.0),
            make_fit("us", "y ~ factor(v) * arm + us(v | id)", 18, -790.0),
            make_fit("ad", "y ~ factor(v) * arm + ad(v | id)", 12, -796.0),
            make_fit("sp", "y ~ factor(v) * arm + sp_exp(v | id)", 10, -799.0))
    tests = {(t.smaller, t.larger): t for t in compare_nested(fits)}
    assert set(tests) == {("ar1", "toep"), ("ar1", "us"), ("ar1", "ad"), ("toep", "us"), ("ad", "us"), ("sp", "us")}
    ar1_toep = tests["ar1", "toep"]
    assert (ar1_toep.df, ar1_toep.statistic, ar1_toep.reference) == (2, 10.0, "chi2")
    assert ar1_toep.notes == ("the residual covariance ar1(v | id) of 'ar1' is a special case of toep(v | id) in "
                              "'toep', at an interior point of its parameters (χ²)",)


def test_random_effects_absorbed_by_an_unstructured_covariance_are_a_chi2_test() -> None:
    fits = (make_fit("ri", "y ~ t + (1 | id)", 4, -500.0), make_fit("ris", "y ~ t + (t | id)", 6, -495.0),
            make_fit("cs", "y ~ t + cs(t | id)", 4, -500.0), make_fit("us", "y ~ t + us(t | id)", 12, -490.0))
    tests = {(t.smaller, t.larger): t for t in compare_nested(fits)}
    # ri and cs are the same model (same k): no test between them
    assert set(tests) == {("ri", "ris"), ("ri", "us"), ("ris", "us"), ("cs", "us")}
    ris_us = tests["ris", "us"]
    assert (ris_us.df, ris_us.reference, ris_us.boundary_terms, ris_us.added_covariances) == (6, "chi2", (), 0)
    assert ris_us.notes == ("'us' has no random effects, but us(t | id) contains the covariance that 'ris''s random "
                            "effects and residuals give a subject's visits, at an interior point of its parameters (χ²)",)
    assert tests["ri", "ris"].reference == "mixture"


def test_a_missing_structured_fit_still_gets_its_row() -> None:
    failed = failed_fit("us", "y ~ t + us(t | id)", "ML", "test", "candidate 'us': did not converge", n_obs=200,
                        n_subjects=40, n_params=12)
    (test,) = compare_nested((make_fit("ar1", "y ~ t + ar1(t | id)", 4, -500.0), failed))
    assert not test.tested and test.notes[0] == "no test: the fit of 'us' failed (did not converge)"
