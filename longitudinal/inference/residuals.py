"""Statistics of residuals that the report draws: binned means, and the serial correlation left in a fit's
normalized residuals (nlme's ``ACF`` over visits and ``Variogram`` over time).

The report (``longitudinal.reporting``) computes no statistics: it calls these and draws what they return.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from longitudinal.records import Fit

#: Up to this many distinct x values, ``binned_means`` averages per value; above, per quantile bin.
MAX_DISTINCT_X = 25
#: Quantile bins of ``binned_means`` above ``MAX_DISTINCT_X`` distinct values.
N_BINS = 20
#: Most within-subject pairs of residuals the correlation diagnostic uses; above, a seeded sample of subjects.
MAX_PAIRS = 2_000_000


def binned_means(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """Mean of ``y`` (with its standard error) per distinct ``x`` when few, else per quantile bin of ``x``.

    Returns columns ``x`` (the mean x of the bin), ``mean``, ``se`` (SD with ddof 1 over √n; NaN for a
    bin of one) and ``n``, sorted by ``x``; rows with a missing ``x`` or ``y`` are dropped. Bins are
    ``pandas.qcut``'s: 20 quantile bins, right-closed, duplicate edges merged. Computed with integer bin
    codes and ``bincount`` (two passes, so the SD does not lose precision to a large mean).
    """
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return pd.DataFrame(columns=["x", "mean", "se", "n"])
    codes, levels = pd.factorize(x)
    if len(levels) > MAX_DISTINCT_X:
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, N_BINS + 1)))
        codes = np.clip(np.searchsorted(edges, x, side="left") - 1, 0, max(len(edges) - 2, 0))
    n = np.bincount(codes).astype(float)
    filled = n > 0
    mean = np.bincount(codes, weights=y) / np.where(filled, n, 1.0)
    mean_x = np.bincount(codes, weights=x) / np.where(filled, n, 1.0)
    squares = np.bincount(codes, weights=(y - mean[codes]) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(n > 1, np.sqrt(squares / (n - 1)) / np.sqrt(n), np.nan)
    out = pd.DataFrame({"x": mean_x, "mean": mean, "se": se, "n": n.astype(int)})[filled]
    return out.sort_values("x").reset_index(drop=True)




def normalized_residuals(fit: Fit) -> np.ndarray:
    """nlme's normalized residuals of ``fit``, rows as its residuals (empty when it has none).

    ``fit.normalized_residuals`` when the engine gave them (a structured candidate: the residuals whitened
    by the fitted residual covariance); else residuals / σ̂, nlme's normalized residuals of a fit without a
    correlation structure (the conditional residuals of an lme4-style fit, scaled). Without a finite σ̂,
    the residuals' own SD scales them.
    """
    if fit.normalized_residuals.size:
        return np.asarray(fit.normalized_residuals, dtype=float)
    residuals = np.asarray(fit.residuals, dtype=float)
    if math.isfinite(fit.residual_sd) and fit.residual_sd > 0:
        return residuals / fit.residual_sd
    finite = residuals[np.isfinite(residuals)]
    return residuals / float(np.std(finite, ddof=1)) if finite.size > 1 else residuals


def _within_subject_pairs(codes: np.ndarray, order: np.ndarray, max_pairs: int, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j) of rows of one subject, i before j in ``order``, as two index arrays; rows with a
    negative code take no part. Above ``max_pairs`` pairs, the pairs of a seeded sample of subjects (as many
    as fit).

    Built in O(pairs): the rows sorted by subject then ``order``, each row repeated once per later row of
    its subject.
    """
    rows = np.flatnonzero(codes >= 0)
    sizes = np.bincount(codes[rows]) if rows.size else np.zeros(0, dtype=np.int64)
    pairs_of = sizes * (sizes - 1) // 2
    if pairs_of.sum() > max_pairs:
        shuffled = np.random.default_rng(seed).permutation(np.flatnonzero(sizes > 1))
        within = np.cumsum(pairs_of[shuffled]) <= max_pairs
        kept = shuffled[: max(int(within.sum()), 1)]
        chosen = np.zeros(sizes.size, dtype=bool)
        chosen[kept] = True
        rows = rows[chosen[codes[rows]]]
    rows = rows[np.lexsort((order[rows], codes[rows]))]
    group = codes[rows]
    starts = np.flatnonzero(np.diff(group, prepend=-1) != 0)
    block = np.repeat(starts, np.diff(np.append(starts, rows.size)))
    later = sizes[group] - (np.arange(rows.size) - block) - 1
    first = np.repeat(np.arange(rows.size), later)
    step = np.arange(first.size) - np.repeat(np.cumsum(later) - later, later) + 1
    return rows[first], rows[first + step]


def visit_positions(times: np.ndarray) -> np.ndarray:
    """Each row's visit as its position among the sorted distinct times (0, 1, ...; −1 where missing):
    the visit order of a visit structure, in which lag k means k visits apart."""
    positions = np.full(times.shape, -1, dtype=np.int64)
    finite = np.isfinite(times)
    levels = np.unique(times[finite])
    positions[finite] = np.searchsorted(levels, times[finite])
    return positions


def lag_correlation(residuals: np.ndarray, subjects: np.ndarray | pd.Series, positions: np.ndarray, *,
                    max_pairs: int = MAX_PAIRS, seed: int = 0) -> pd.DataFrame:
    """The within-subject correlation of residuals by lag in visit positions (nlme's ``ACF`` over visits).

    For lag k, over every pair (a, b) of a subject's rows k visit positions apart:
    r_k = Σ e_a e_b / √(Σ e_a² Σ e_b²), uncentered since normalized residuals have mean zero and unit
    variance (then r_k estimates their correlation at lag k; ≈ 0 at every lag when the model captures the
    serial correlation). Rows with a missing residual, subject or position are left out; a subject's missed
    visit leaves a gap, so its neighbours pair at lag 2. Columns ``lag``, ``correlation``, ``pairs``, lags
    with at least one pair, ascending. Above ``max_pairs`` pairs, a seeded sample of subjects gives them.
    """
    e = np.asarray(residuals, dtype=float)
    codes, _ = pd.factorize(pd.Series(subjects), use_na_sentinel=True)
    codes = np.where(np.isfinite(e) & (positions >= 0), codes, -1)
    first, second = _within_subject_pairs(codes, positions, max_pairs, seed)
    lag = positions[second] - positions[first]
    keep = lag > 0  # the same visit twice is a duplicate, not a pair of visits
    lag, a, b = lag[keep], e[first[keep]], e[second[keep]]
    if lag.size == 0:
        return pd.DataFrame({"lag": np.zeros(0, int), "correlation": np.zeros(0), "pairs": np.zeros(0, int)})
    products = np.bincount(lag, weights=a * b)
    squares_a, squares_b = np.bincount(lag, weights=a * a), np.bincount(lag, weights=b * b)
    pairs = np.bincount(lag)
    present = np.flatnonzero(pairs > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = products[present] / np.sqrt(squares_a[present] * squares_b[present])
    return pd.DataFrame({"lag": present, "correlation": correlation, "pairs": pairs[present]})


def semivariogram(residuals: np.ndarray, subjects: np.ndarray | pd.Series, times: np.ndarray, *,
                  max_pairs: int = MAX_PAIRS, seed: int = 0) -> pd.DataFrame:
    """The empirical semivariogram of residuals within subjects (nlme's ``Variogram``, collapsed by quantiles).

    Over every pair of a subject's rows at different times: the distance d = |t_a − t_b| and
    γ = ½ (e_a − e_b)²; γ averaged per distinct distance when they are few (≤ 25), else per bin of 20
    quantile bins of d. For normalized residuals γ ≈ 1 at every distance when there is no serial
    correlation left; a curve rising towards 1 from below means neighbouring times are correlated.
    Columns ``distance`` (mean d of the bin), ``semivariance``, ``pairs``. Rows with a missing residual,
    subject or time are left out; above ``max_pairs`` pairs, a seeded sample of subjects gives them.
    """
    e = np.asarray(residuals, dtype=float)
    t = np.asarray(times, dtype=float)
    codes, _ = pd.factorize(pd.Series(subjects), use_na_sentinel=True)
    codes = np.where(np.isfinite(e) & np.isfinite(t), codes, -1)
    first, second = _within_subject_pairs(codes, t, max_pairs, seed)
    distance = np.abs(t[second] - t[first])
    keep = distance > 0
    half_squares = 0.5 * (e[first[keep]] - e[second[keep]]) ** 2
    means = binned_means(distance[keep], half_squares)
    return pd.DataFrame({"distance": means["x"].to_numpy(float), "semivariance": means["mean"].to_numpy(float),
                         "pairs": means["n"].to_numpy(int)})
