"""Residual statistics the report draws (inference.residuals): the lag correlation and the semivariogram of
normalized residuals recover a known serial correlation and show none where there is none."""

from __future__ import annotations

import math

import numpy as np
import pytest


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
