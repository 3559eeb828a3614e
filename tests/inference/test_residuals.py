"""Residual statistics the report draws (inference.residuals): the lag correlation and the semivariogram of
normalized residuals recover a known serial correlation and show none where there is none; for binomial and
Poisson fits, binned residuals, randomized quantile residuals, the Pearson dispersion, Wilson intervals and
odds or rate ratios, against hand computations and data simulated from known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats


def ar1_residuals(n_subjects: int, n_visits: int, rho: float, seed: int) -> np.ndarray:
    """Unit-variance AR(1) residuals over equally spaced visits, one row per subject."""
    rng = np.random.default_rng(seed)
    e = np.empty((n_subjects, n_visits))
    e[:, 0] = rng.normal(size=n_subjects)
    for j in range(1, n_visits):
        e[:, j] = rho * e[:, j - 1] + math.sqrt(1 - rho ** 2) * rng.normal(size=n_subjects)
    return e


def test_lag_correlation_recovers_the_ar1_correlation_and_zero_for_independent_residuals() -> None:
    from longitudinal.inference.residuals import lag_correlation, visit_positions

    n, m = 2_000, 6
    subjects = np.repeat(np.arange(n), m)
    weeks = np.tile(np.arange(m, dtype=float) * 2, n)  # visits every two weeks: lags count visits, not weeks
    shuffled = np.random.default_rng(0).permutation(n * m)  # row order must not matter
    ar1 = ar1_residuals(n, m, 0.6, seed=1).ravel()
    table = lag_correlation(ar1[shuffled], subjects[shuffled], visit_positions(weeks[shuffled]))
    assert list(table["lag"]) == [1, 2, 3, 4, 5]
    assert list(table["pairs"]) == [n * (m - k) for k in range(1, m)]
    # ρ^k with SE about (1 − ρ²)/√pairs ≈ 0.006 at lag 1
    np.testing.assert_allclose(table["correlation"][:3], [0.6, 0.36, 0.216], atol=0.03)
    iid = lag_correlation(np.random.default_rng(2).normal(size=n * m), subjects, visit_positions(weeks))
    assert (np.abs(iid["correlation"]) < 3 / np.sqrt(iid["pairs"])).all()


def test_lag_correlation_counts_a_missed_visit_as_a_gap() -> None:
    from longitudinal.inference.residuals import lag_correlation, visit_positions

    # s1 misses week 2: its weeks 1 and 3 pair at lag 2; s2 has weeks 0-3; a missing residual takes no part
    subjects = np.array(["s1", "s1", "s1", "s2", "s2", "s2", "s2", "s2"])
    weeks = np.array([0.0, 1, 3, 0, 1, 2, 3, 3])
    residuals = np.array([1.0, -1, 1, 1, 1, -1, -1, np.nan])
    table = lag_correlation(residuals, subjects, visit_positions(weeks))
    assert list(table["pairs"]) == [1 + 3, 1 + 2, 1 + 1]
    # lag 1: s1 (0,1) → −1; s2 (0,1) 1, (1,2) −1, (2,3) 1 → Σ 0 over 4 pairs
    assert table["correlation"].tolist()[0] == pytest.approx(0.0)


def test_the_semivariogram_of_independent_residuals_is_one_and_follows_an_exponential_correlation() -> None:
    from longitudinal.inference.residuals import semivariogram

    rng = np.random.default_rng(4)
    n, m, phi = 2_000, 10, 2.0
    times = np.sort(rng.uniform(0, 10, (n, m)), axis=1)
    subjects = np.repeat(np.arange(n), m)
    iid = semivariogram(rng.normal(size=n * m), subjects, times.ravel())
    assert len(iid) == 20 and iid["pairs"].sum() == n * m * (m - 1) // 2
    np.testing.assert_allclose(iid["semivariance"], 1.0, atol=0.05)
    # an Ornstein-Uhlenbeck process: corr = exp(−d/φ), so γ(d) = 1 − exp(−d/φ) for unit variance
    e = np.empty((n, m))
    e[:, 0] = rng.normal(size=n)
    for j in range(1, m):
        decay = np.exp(-(times[:, j] - times[:, j - 1]) / phi)
        e[:, j] = decay * e[:, j - 1] + np.sqrt(1 - decay ** 2) * rng.normal(size=n)
    serial = semivariogram(e.ravel(), subjects, times.ravel())
    np.testing.assert_allclose(serial["semivariance"], 1 - np.exp(-serial["distance"] / phi), atol=0.06)


def test_pairs_beyond_the_budget_come_from_a_sample_of_subjects() -> None:
    from longitudinal.inference.residuals import lag_correlation, visit_positions

    subjects, weeks = np.repeat(np.arange(100), 5), np.tile(np.arange(5.0), 100)
    table = lag_correlation(np.random.default_rng(0).normal(size=500), subjects, visit_positions(weeks),
                            max_pairs=95)
    assert table["pairs"].sum() == 90  # 9 subjects of 10 pairs each


# ------------------------------------------------------------------ generalized linear mixed models


def test_the_wilson_interval_matches_its_formula_and_statsmodels() -> None:
    from statsmodels.stats.proportion import proportion_confint

    from longitudinal.inference.residuals import wilson_interval

    # 0 of 10: [0, z²/n / (1 + z²/n)] = [0, 0.3841 / 1.3841]; 5 of 10: 0.5 ± 1.96 √(0.025 + 0.0096) / 1.3841
    low, high = wilson_interval(np.array([0.0, 5.0, 37.0]), np.array([10.0, 10.0, 120.0]))
    assert low[0] == 0.0 and high[0] == pytest.approx(0.27753, abs=1e-5)
    assert (low[1], high[1]) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert (low[2], high[2]) == pytest.approx(proportion_confint(37, 120, method="wilson"), rel=1e-12)
    empty_low, empty_high = wilson_interval(0.0, 0.0)
    assert np.isnan(empty_low) and np.isnan(empty_high)


def test_binned_residuals_by_hand() -> None:
    from longitudinal.inference.residuals import binned_residuals

    mu = np.array([0.6, 0.1, 0.7, 0.2, 0.8, 0.3, 0.9, 0.4])
    y = np.array([1, 0, 1, 1, 1, 1, 1, 0.0])
    table = binned_residuals(mu, y - mu, "binomial", n_bins=2)
    # bin 1: μ 0.1-0.4, residuals −0.1, 0.8, 0.7, −0.4 → 0.25, SE = √(0.09 + 0.16 + 0.21 + 0.24) / 4
    # bin 2: μ 0.6-0.9, residuals 0.4, 0.3, 0.2, 0.1 → 0.25, SE = √(0.24 + 0.21 + 0.16 + 0.09) / 4
    np.testing.assert_allclose(table["fitted"], [0.25, 0.75])
    np.testing.assert_allclose(table["residual"], [0.25, 0.25])
    np.testing.assert_allclose(table["se"], [math.sqrt(0.70) / 4] * 2)
    assert list(table["n"]) == [4, 4] and not table["outside"].any()
    # Poisson: V(μ) = μ, so SE = √(Σ μ) / n
    counts = binned_residuals(np.array([1.0, 2, 3, 10]), np.array([1.0, -1, 2, 5]), "poisson", n_bins=1)
    assert counts["se"].tolist() == pytest.approx([math.sqrt(16) / 4])
    assert counts["residual"].tolist() == [1.75] and counts["outside"].tolist() == [False]


def test_binned_residuals_use_arms_bin_count_and_never_split_ties() -> None:
    from longitudinal.inference.residuals import binned_residual_bins, binned_residuals

    assert [binned_residual_bins(n) for n in (10_000, 150, 99, 11, 10, 3, 1)] == [100, 12, 10, 10, 5, 1, 1]
    mu = np.repeat([0.2, 0.5, 0.8], 100)
    table = binned_residuals(mu, np.zeros(300), "binomial")
    assert list(table["n"]) == [100, 100, 100]  # 17 bins asked for, three distinct values: three bins


def test_binned_residuals_stay_inside_their_band_when_the_model_is_right_and_leave_it_when_not() -> None:
    from longitudinal.inference.residuals import binned_residuals

    rng = np.random.default_rng(7)
    eta = rng.normal(0, 1.5, 40_000)
    mu = 1 / (1 + np.exp(-eta))
    y = rng.binomial(1, mu).astype(float)
    right = binned_residuals(mu, y - mu, "binomial")
    assert len(right) == 200
    assert right["outside"].mean() < 0.10  # about 5% expected
    wrong = 1 / (1 + np.exp(-eta / 2))  # probabilities too close to ½: residuals follow μ̂
    assert binned_residuals(wrong, y - wrong, "binomial")["outside"].mean() > 0.5


def test_randomized_quantile_residuals_by_hand() -> None:
    from scipy.special import ndtri

    from longitudinal.inference.residuals import randomized_quantile_residuals

    v = np.random.default_rng(3).uniform(size=4)
    binary = randomized_quantile_residuals(np.array([0.0, 1.0, np.nan, 2.0]), np.full(4, 0.3), "binomial", seed=3)
    # y = 0: u ~ U(0, 0.7); y = 1: u ~ U(0.7, 1); a missing or impossible outcome: NaN
    assert binary[0] == pytest.approx(ndtri(0.7 * v[0]))
    assert binary[1] == pytest.approx(ndtri(0.7 + 0.3 * v[1]))
    assert np.isnan(binary[2]) and np.isnan(binary[3])
    counts = randomized_quantile_residuals(np.array([2.0, 0.0, 1.5]), np.array([1.0, 2.0, 1.0]), "poisson", seed=3)
    # y = 2, μ = 1: u ~ U(F(1), F(2)) = U(2/e, 2.5/e); y = 0, μ = 2: u ~ U(0, e⁻²)
    assert counts[0] == pytest.approx(ndtri(2 / math.e + v[0] * 0.5 / math.e))
    assert counts[1] == pytest.approx(ndtri(v[1] * math.exp(-2)))
    assert np.isnan(counts[2])
    again = randomized_quantile_residuals(np.array([2.0, 0.0, 1.5]), np.array([1.0, 2.0, 1.0]), "poisson", seed=3)
    np.testing.assert_array_equal(counts, again)


def test_an_extreme_count_keeps_its_size() -> None:
    from longitudinal.inference.residuals import randomized_quantile_residuals

    # P(Y ≥ 40 | μ = 1) ≈ e⁻¹/40! ≈ 4.5e-49: Φ⁻¹ of 1 − that is about 14.7, which 1 − u in floats would lose
    r = randomized_quantile_residuals(np.array([40.0]), np.array([1.0]), "poisson")
    assert 14.0 < r[0] < 15.5


def test_randomized_quantile_residuals_of_data_from_the_fitted_distribution_are_standard_normal() -> None:
    from longitudinal.inference.residuals import randomized_quantile_residuals

    rng = np.random.default_rng(11)
    mu = rng.uniform(0.02, 0.98, 5_000)
    binary = randomized_quantile_residuals(rng.binomial(1, mu).astype(float), mu, "binomial", seed=1)
    assert stats.kstest(binary, "norm").pvalue > 0.01
    rate = rng.gamma(2.0, 1.5, 5_000)
    counts = randomized_quantile_residuals(rng.poisson(rate).astype(float), rate, "poisson", seed=1)
    assert stats.kstest(counts, "norm").pvalue > 0.01
    # counts twice as variable as Poisson (gamma-Poisson with variance 2μ): the residuals are not N(0, 1)
    spread = randomized_quantile_residuals(rng.poisson(rng.gamma(rate, 1.0)).astype(float), rate, "poisson")
    assert stats.kstest(spread, "norm").pvalue < 1e-6 and np.std(spread) > 1.2


def test_the_pearson_dispersion_by_hand() -> None:
    from longitudinal.inference.residuals import pearson_dispersion

    # χ² = (0 − 1)²/1 + (2 − 2)²/2 + (4 − 2)²/2 = 3 on 3 − 1 df: ratio 1.5, p = P(χ²₂ > 3) = e^−1.5
    dispersion = pearson_dispersion(np.array([0.0, 2, 4, np.nan]), np.array([1.0, 2, 2, 3]), n_params=1)
    assert (dispersion.pearson_chi2, dispersion.df, dispersion.ratio) == (3.0, 2, 1.5)
    assert dispersion.p_value == pytest.approx(math.exp(-1.5))
    assert not dispersion.overdispersed  # above 1.5 only
    assert math.isnan(pearson_dispersion(np.array([1.0, 2]), np.array([1.0, 2]), n_params=2).ratio)


def test_the_pearson_dispersion_is_one_for_poisson_counts_and_two_for_counts_twice_as_variable() -> None:
    from longitudinal.inference.residuals import pearson_dispersion

    rng = np.random.default_rng(5)
    rate = rng.gamma(3.0, 1.0, 20_000)
    poisson = pearson_dispersion(rng.poisson(rate).astype(float), rate, n_params=3)
    assert poisson.ratio == pytest.approx(1.0, abs=0.05) and not poisson.overdispersed
    assert poisson.df == 20_000 - 3
    doubled = pearson_dispersion(rng.poisson(rng.gamma(rate, 1.0)).astype(float), rate, n_params=3)  # var 2μ
    assert doubled.ratio == pytest.approx(2.0, abs=0.1) and doubled.overdispersed and doubled.p_value < 1e-12


def test_outcome_over_time_gives_proportions_with_wilson_intervals_and_mean_fitted_probabilities() -> None:
    from longitudinal.inference.residuals import outcome_over_time, wilson_interval

    times = np.array([0.0, 0, 0, 1, 1, 1, 1, 1, 0])
    groups = ["B", "A", "A", "A", "A", "B", "B", None, "A"]
    y = np.array([1.0, 0, 1, 1, 1, 0, 1, 1, np.nan])
    mu = np.array([0.7, 0.4, 0.6, 0.8, 0.6, 0.5, 0.6, 0.9, 0.5])
    table = outcome_over_time(times, y, "binomial", groups=groups, fitted=mu)
    # A at 0: y 0, 1 (the third A row has no outcome); A at 1: 1, 1; B at 0: 1; B at 1: 0, 1; no group: left out
    assert list(zip(table["group"], table["time"], table["n"], strict=True)) == [
        ("A", 0.0, 2), ("A", 1.0, 2), ("B", 0.0, 1), ("B", 1.0, 2)]
    np.testing.assert_allclose(table["observed"], [0.5, 1.0, 1.0, 0.5])
    np.testing.assert_allclose(table["fitted"], [0.5, 0.7, 0.7, 0.55])
    low, high = wilson_interval(np.array([1.0, 2, 1, 1]), np.array([2.0, 2, 1, 2]))
    np.testing.assert_allclose(table["ci_low"], low)
    np.testing.assert_allclose(table["ci_high"], high)


def test_outcome_over_time_gives_mean_counts_with_sample_sd_intervals_and_shares_time_bins() -> None:
    from longitudinal.inference.residuals import outcome_over_time

    table = outcome_over_time(np.array([2.0, 2, 2, 5]), np.array([1.0, 3, 8, 4]), "poisson")
    assert table["group"].tolist() == [None, None]
    # at 2: mean 4, SD √((9 + 1 + 16)/2) = √13, SE √13/√3; at 5: one count, no interval
    assert table["observed"].tolist() == [4.0, 4.0]
    assert table["ci_high"][0] == pytest.approx(4 + 1.96 * math.sqrt(13 / 3))
    assert np.isnan(table["ci_low"][1]) and table["fitted"].isna().all()
    rng = np.random.default_rng(0)
    times = rng.uniform(0, 100, 2_000)
    arms = np.where(rng.uniform(size=2_000) < 0.5, "a", "b")
    binned = outcome_over_time(times, rng.poisson(3.0, 2_000).astype(float), "poisson", groups=arms)
    assert len(binned) == 40 and binned["n"].sum() == 2_000  # 20 quantile bins of time, each in both arms


def test_ratio_effects_exponentiate_the_estimate_and_its_wald_interval() -> None:
    from longitudinal.inference.residuals import observed_response, ratio_effects
    from longitudinal.records import Fit, FixedEffect

    fit = Fit(name="m", formula="y ~ t + (1 | id)", method="ML", engine="test", converged=True, singular=False,
              message="", n_obs=3, n_subjects=1, n_params=3, loglik=-2.0, family="binomial",
              fixed_effects=(FixedEffect("(Intercept)", math.log(0.25), 0.1, math.log(0.2), math.log(0.3), 0.01),
                             FixedEffect("t", 800.0, 1.0, 798.0, 802.0, 0.0)),
              fitted=np.array([0.2, 0.7, 0.4]), residuals=np.array([-0.2, 0.3, 0.6000000000000001]))
    intercept, slope = ratio_effects(fit)
    assert (intercept.term, intercept.estimate, intercept.ci_low, intercept.ci_high) == pytest.approx(
        ("(Intercept)", 0.25, 0.2, 0.3))
    assert slope.estimate == math.inf
    assert observed_response(fit).tolist() == [0.0, 1.0, 1.0]
