"""Statistics of residuals that the report draws: binned means, and the serial correlation left in a fit's
normalized residuals (nlme's ``ACF`` over visits and ``Variogram`` over time); for a generalized linear mixed
model (binomial or Poisson, glmer's), the checks that suit its family: binned residuals (Gelman & Hill),
randomized quantile residuals (Dunn & Smyth), the Pearson dispersion ratio, observed proportions or mean counts
over time with their intervals, and the fixed effects as odds or rate ratios.

The report (``longitudinal.reporting``) computes no statistics: it calls these and draws what they return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import ndtri

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
    codes = _value_or_quantile_bins(x)
    n = np.bincount(codes).astype(float)
    filled = n > 0
    mean = np.bincount(codes, weights=y) / np.where(filled, n, 1.0)
    mean_x = np.bincount(codes, weights=x) / np.where(filled, n, 1.0)
    squares = np.bincount(codes, weights=(y - mean[codes]) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(n > 1, np.sqrt(squares / (n - 1)) / np.sqrt(n), np.nan)
    out = pd.DataFrame({"x": mean_x, "mean": mean, "se": se, "n": n.astype(int)})[filled]
    return out.sort_values("x").reset_index(drop=True)


def _quantile_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Each value's bin among ``n_bins`` quantile bins of ``x`` (finite), right-closed as ``pandas.qcut``'s,
    duplicate edges merged (ties never split across bins); codes 0, 1, ..., some possibly empty."""
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)))
    return np.clip(np.searchsorted(edges, x, side="left") - 1, 0, max(len(edges) - 2, 0))


def _value_or_quantile_bins(x: np.ndarray) -> np.ndarray:
    """Each value's code: one per distinct value when at most :data:`MAX_DISTINCT_X`, else its quantile bin
    among :data:`N_BINS` (``x`` finite)."""
    codes, levels = pd.factorize(x)
    return _quantile_bins(x, N_BINS) if len(levels) > MAX_DISTINCT_X else codes


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


# ------------------------------------------------------------------ generalized linear mixed models

#: A Poisson fit whose Pearson χ²/df exceeds this is reported as overdispersed.
OVERDISPERSION_RATIO = 1.5
#: The families whose response has a variance set by its mean, with the variance function V(μ) of each.
_VARIANCE = {
    "binomial": lambda mu: mu * (1.0 - mu),
    "poisson": lambda mu: mu,
}


def _variance(mu: np.ndarray, family: str) -> np.ndarray:
    if family not in _VARIANCE:
        raise ValueError(f"family {family!r} has no variance function of its mean; use binomial or poisson")
    return np.asarray(_VARIANCE[family](mu), dtype=float)


def observed_response(fit: Fit) -> np.ndarray:
    """The outcome as ``fit`` saw it, rows as its residuals: μ̂ + (y − μ̂), rounded to whole numbers for a
    binomial or Poisson fit (0/1 or counts: the rounding removes the float error of the sum). Read from the
    record, so it is the 0/1 coding the fit used whatever the outcome's labels in the data."""
    fitted = np.asarray(fit.fitted, dtype=float)
    residuals = np.asarray(fit.residuals, dtype=float)
    y = fitted + residuals
    return np.rint(y) if fit.family != "gaussian" else y


def wilson_interval(successes: np.ndarray | float, n: np.ndarray | float, level: float = 0.95
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval for a binomial proportion x / n (Wilson 1927; R's ``prop.test`` without its
    continuity correction): (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n). Unlike the Wald interval it
    stays inside [0, 1] and does not collapse to a point at 0 or n successes. NaN where n = 0."""
    x = np.asarray(successes, dtype=float)
    m = np.asarray(n, dtype=float)
    z = float(ndtri(0.5 + level / 2.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = x / m
        denominator = 1.0 + z * z / m
        centre = (p + z * z / (2.0 * m)) / denominator
        half = z * np.sqrt(p * (1.0 - p) / m + z * z / (4.0 * m * m)) / denominator
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def binned_residual_bins(n: int) -> int:
    """How many bins :func:`binned_residuals` uses for ``n`` rows: ``arm::binnedplot``'s default (Gelman &
    Hill 2007, §5.6): ⌊√n⌋ from 100 rows, 10 between 10 and 100, ⌊n/2⌋ below (at least one)."""
    if n >= 100:
        return int(math.isqrt(n))
    return 10 if n > 10 else max(n // 2, 1)


def binned_residuals(fitted: np.ndarray, residuals: np.ndarray, family: str, n_bins: int | None = None
                     ) -> pd.DataFrame:
    """Gelman & Hill's binned residuals (2007, §5.6): the residuals y − μ̂ averaged in quantile bins of μ̂.

    Raw residuals of a 0/1 outcome fall on two curves and say little by eye; their mean per bin should be
    near 0 wherever the model's probabilities are right. Each bin's band is ±2 SE of that mean under the
    model, SE = √(Σ V(μ̂)) / n = √(mean V(μ̂) / n), V(μ) = μ(1 − μ) for binomial (Gelman & Hill's
    √(p(1 − p)/n)) and μ for Poisson; about 95% of the bins should fall inside it. μ̂ is as the fit records
    it (conditional on the predicted random effects); with few rows per subject the shrunken modes tilt the
    means even for a correct model (negative at low μ̂, positive at high), which the report says. Bins: :func:`binned_residual_bins` bins of about equal
    counts in the order of μ̂, as ``arm::binned.resids``; tied values of μ̂ share a bin. Rows with a missing μ̂ or residual are left out. Columns ``fitted`` (mean μ̂ of the
    bin), ``residual`` (mean residual), ``se``, ``n`` and ``outside`` (|residual| > 2 SE), by ``fitted``.
    """
    mu = np.asarray(fitted, dtype=float)
    e = np.asarray(residuals, dtype=float)
    keep = np.isfinite(mu) & np.isfinite(e)
    mu, e = mu[keep], e[keep]
    if mu.size == 0:
        return pd.DataFrame({"fitted": [], "residual": [], "se": [], "n": np.zeros(0, int), "outside": []})
    bins = n_bins or binned_residual_bins(mu.size)
    # equal-count bins in the order of μ̂, each value in the bin of its first (lowest-ranked) occurrence
    first = np.searchsorted(np.sort(mu), mu, side="left")
    codes = first * bins // mu.size
    counts = np.bincount(codes)
    filled = counts > 0
    n = counts[filled].astype(float)
    mean_mu = np.bincount(codes, weights=mu)[filled] / n
    mean_e = np.bincount(codes, weights=e)[filled] / n
    se = np.sqrt(np.bincount(codes, weights=_variance(mu, family))[filled]) / n
    out = pd.DataFrame({"fitted": mean_mu, "residual": mean_e, "se": se, "n": counts[filled],
                        "outside": np.abs(mean_e) > 2.0 * se})
    return out.sort_values("fitted", kind="stable").reset_index(drop=True)


def randomized_quantile_residuals(y: np.ndarray, fitted: np.ndarray, family: str, seed: int = 0) -> np.ndarray:
    """Randomized quantile residuals (Dunn & Smyth 1996) of a binomial (0/1) or Poisson outcome.

    For each row, u is drawn uniformly between F(y − 1; μ̂) and F(y; μ̂), F the fitted distribution
    function, and the residual is Φ⁻¹(u): exactly N(0, 1) when y follows F, whatever μ̂, so one QQ plot
    judges every row. Here μ̂ is the fit's conditional mean (given the predicted random effects), so these
    check the outcome's distribution given the subject: what DHARMa's ``simulateResiduals`` approximates by
    simulation conditional on the fitted random effects (its default since 0.5.0; lme4's ``re.form = NULL``),
    computed from F exactly, not the unconditional residuals that re-simulate the random effects
    (``simulateREs = "unconditional"``, lme4's ``simulate`` default). The fitted modes pull μ̂ towards each
    subject's own data, so these spread a little less than N(0, 1). u comes from
    ``numpy.random.default_rng(seed)``, one draw per row (rows as given), so a report redraws the same points. Above the median, Φ⁻¹ is taken of the
    upper tail 1 − u, computed from the survival function, so an extreme count keeps its size instead of
    rounding to ∞. A missing y or μ̂, or a y the family cannot produce (not 0/1, not a whole count), gives NaN.
    """
    y = np.asarray(y, dtype=float)
    mu = np.asarray(fitted, dtype=float)
    draws = np.random.default_rng(seed).uniform(size=y.shape)
    out = np.full(y.shape, np.nan)
    ok = np.isfinite(y) & np.isfinite(mu)
    if family == "binomial":
        ok &= ((y == 0) | (y == 1)) & (mu >= 0) & (mu <= 1)
        yk, m = y[ok], mu[ok]
        below = np.where(yk == 1, 1.0 - m, 0.0)  # F(y − 1)
        at = np.where(yk == 1, 1.0, 1.0 - m)  # F(y)
        from_y = np.where(yk == 1, m, 1.0)  # P(Y ≥ y) = 1 − F(y − 1)
        after_y = np.where(yk == 1, 0.0, m)  # P(Y > y) = 1 − F(y)
    elif family == "poisson":
        ok &= (y >= 0) & (y == np.floor(y)) & (mu >= 0)
        yk, m = y[ok], mu[ok]
        below, at = stats.poisson.cdf(yk - 1, m), stats.poisson.cdf(yk, m)
        from_y, after_y = stats.poisson.sf(yk - 1, m), stats.poisson.sf(yk, m)
    else:
        raise ValueError(f"randomized quantile residuals are for binomial or poisson outcomes, not {family!r}")
    v = draws[ok]
    tiny = np.finfo(float).tiny
    lower_tail = np.maximum(below + v * (at - below), tiny)
    upper_tail = np.maximum(from_y - v * (from_y - after_y), tiny)
    out[ok] = np.where(lower_tail < 0.5, ndtri(lower_tail), -ndtri(upper_tail))
    return out


@dataclass(frozen=True)
class Dispersion:
    """Pearson's check of a Poisson fit's dispersion: χ² = Σ (y − μ̂)² / μ̂ over ``df`` = n − k residual
    degrees of freedom, ``ratio`` = χ² / df (≈ 1 when the counts vary as a Poisson with mean μ̂ does), and
    ``p_value`` = P(χ²(df) > χ²), the test of ``performance::check_overdispersion``."""

    pearson_chi2: float
    df: int
    ratio: float
    p_value: float

    @property
    def overdispersed(self) -> bool:
        """The ratio is above :data:`OVERDISPERSION_RATIO`: the counts vary more than the model allows."""
        return math.isfinite(self.ratio) and self.ratio > OVERDISPERSION_RATIO


def pearson_dispersion(y: np.ndarray, fitted: np.ndarray, n_params: int) -> Dispersion:
    """The Pearson dispersion of counts ``y`` about their fitted means (see :class:`Dispersion`).

    μ̂ is the fit's conditional mean, as glmer's Pearson residuals use; k = ``n_params`` counts fixed effects
    and θ as lme4 does for glmer (its ``df.residual``). Rows with a missing y or μ̂, or μ̂ ≤ 0, are left out.
    Without residual degrees of freedom the ratio and p-value are NaN.
    """
    y = np.asarray(y, dtype=float)
    mu = np.asarray(fitted, dtype=float)
    keep = np.isfinite(y) & np.isfinite(mu) & (mu > 0)
    chi2 = float(np.sum((y[keep] - mu[keep]) ** 2 / mu[keep]))
    df = int(keep.sum()) - int(n_params)
    if df <= 0:
        return Dispersion(chi2, df, math.nan, math.nan)
    return Dispersion(chi2, df, chi2 / df, float(stats.chi2.sf(chi2, df)))


def outcome_over_time(times: np.ndarray, y: np.ndarray, family: str, *, groups: Sequence[object] | None = None,
                      fitted: np.ndarray | None = None) -> pd.DataFrame:
    """The observed outcome per time (and group), with its 95% interval and, given ``fitted``, the mean μ̂.

    Per distinct time when there are at most :data:`MAX_DISTINCT_X`, else per quantile bin of time (the same
    bins for every group); per level of ``groups`` (rows with a missing group left out) when given.
    ``observed``: the proportion of 1s for binomial, with the Wilson interval (:func:`wilson_interval`); the
    mean for Poisson (and Gaussian), with mean ± 1.96 SD/√n from the sample SD, so a spread wider than
    Poisson's shows (NaN for a bin of one). ``fitted``: the mean of μ̂ over the same rows, the model's
    marginal proportion or mean count at that time, averaged over its subjects' conditional fits. Rows with
    a missing time, outcome or (given) μ̂ are left out. Columns ``group`` (None without groups), ``time``
    (mean time of the rows), ``n``, ``observed``, ``ci_low``, ``ci_high``, ``fitted`` (NaN without
    ``fitted``); groups sorted by their text, then by time.
    """
    t = np.asarray(times, dtype=float)
    values = np.asarray(y, dtype=float)
    mu = np.full(t.shape, np.nan) if fitted is None else np.asarray(fitted, dtype=float)
    keep = np.isfinite(t) & np.isfinite(values) & (np.isfinite(mu) if fitted is not None else True)
    levels: list[object] = [None]
    group_codes = np.zeros(t.shape, dtype=np.int64)
    if groups is not None:
        codes, uniques = pd.factorize(pd.Series(groups), use_na_sentinel=True)
        order = sorted(range(len(uniques)), key=lambda i: str(uniques[i]))
        rank = np.empty(len(uniques) + 1, dtype=np.int64)
        rank[order] = np.arange(len(order))
        rank[-1] = -1  # the −1 of a missing group
        group_codes = rank[codes]
        levels = [uniques[i] for i in order]
        keep &= group_codes >= 0
    columns = ["group", "time", "n", "observed", "ci_low", "ci_high", "fitted"]
    if not keep.any():
        return pd.DataFrame({c: [] for c in columns})
    t, values, mu, group_codes = t[keep], values[keep], mu[keep], group_codes[keep]
    bins = _value_or_quantile_bins(t)
    n_bins = int(bins.max()) + 1
    key = group_codes * n_bins + bins
    size = len(levels) * n_bins
    counts = np.bincount(key, minlength=size)
    filled = np.flatnonzero(counts)
    n = counts[filled].astype(float)
    total = np.bincount(key, weights=values, minlength=size)
    mean = total[filled] / n
    if family == "binomial":
        low, high = wilson_interval(total[filled], n)
    else:
        squares = np.bincount(key, weights=(values - (total / np.maximum(counts, 1))[key]) ** 2, minlength=size)
        with np.errstate(divide="ignore", invalid="ignore"):
            se = np.where(n > 1, np.sqrt(squares[filled] / (n - 1) / n), np.nan)
        low, high = mean - 1.96 * se, mean + 1.96 * se
    out = pd.DataFrame({
        "group": [levels[i] for i in filled // n_bins],
        "time": np.bincount(key, weights=t, minlength=size)[filled] / n,
        "n": counts[filled],
        "observed": mean,
        "ci_low": low,
        "ci_high": high,
        "fitted": np.bincount(key, weights=mu, minlength=size)[filled] / n if fitted is not None else np.nan,
    })
    order_key = pd.DataFrame({"g": filled // n_bins, "t": out["time"]})
    return out.iloc[np.lexsort((order_key["t"], order_key["g"]))].reset_index(drop=True)


@dataclass(frozen=True)
class RatioEffect:
    """A fixed effect of a log- or logit-link model on the ratio scale: exp(estimate) and exp of its Wald
    95% interval (an odds ratio for logit, a rate ratio for log; for the intercept, the baseline odds or rate)."""

    term: str
    estimate: float
    ci_low: float
    ci_high: float


def ratio_effects(fit: Fit) -> tuple[RatioEffect, ...]:
    """``fit``'s fixed effects exponentiated, as glmer users write ``exp(cbind(fixef(m), confint(m, method =
    "Wald")))``: odds ratios (binomial) or rate ratios (Poisson), conditional on the random effects (the
    ratio for one subject, not averaged over the population). Overflow gives ∞."""
    with np.errstate(over="ignore"):
        return tuple(RatioEffect(fe.term, float(np.exp(fe.estimate)), float(np.exp(fe.ci_low)),
                                 float(np.exp(fe.ci_high))) for fe in fit.fixed_effects)
