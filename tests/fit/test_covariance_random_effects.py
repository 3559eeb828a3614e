"""fit.covariance with random effects next to the structure (nlme's ``lme(random = ~ z | id, correlation =
...)``): the likelihood against its dense definition in both layouts (shared visit patterns, per-subject
batches), its gradient, the per-subject quantities against their formulas, and fits that do not depend on
the data's units. nlme's numbers for the same models: test_covariance_reference.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from definitions import gaussian_loglik

from longitudinal.errors import ConfigError
from longitudinal.fit.covariance import (
    CovarianceFit, CovarianceStructure, PatternGroups, fit_covariance, group_by_pattern, log_likelihood,
)
from longitudinal.fit.covariance.fitting import Objective
from longitudinal.fit.covariance.grouping import MIN_SHARED
from longitudinal.fit.covariance.likelihood import evaluate, factor_size, lower_factor

M = 5  # visits
SERIAL = ("ar1", "ar1h", "ad", "adh", "sp_exp")
#: (structure, bar) pairs fitted: every structure, both layouts.
FITTED = [("ar1", "1"), ("ar1h", "visit"), ("ad", "t"), ("adh", "1"), ("sp_exp", "t"), ("sp_exp", "x")]


def simulate(n_subjects: int, *, seed: int) -> pd.DataFrame:
    """M visits; a random intercept (SD 2), slope on the time (SD 0.5) and slope on a time-varying covariate x
    (SD 0.7); AR(1) noise (ρ 0.5) with SDs rising over the visits; monotone dropout; the time jittered around
    each visit."""
    rng = np.random.default_rng(seed)
    visit = np.tile(np.arange(M), n_subjects)
    subject = np.repeat(np.arange(n_subjects), M)
    t = visit + rng.uniform(-0.25, 0.25, visit.size)
    x = np.repeat(rng.normal(size=n_subjects), M) + rng.normal(size=visit.size)
    b = rng.normal(size=(n_subjects, 3)) * [2.0, 0.5, 0.7]
    ar = np.empty((n_subjects, M))
    ar[:, 0] = rng.normal(size=n_subjects)
    for j in range(1, M):
        ar[:, j] = 0.5 * ar[:, j - 1] + math.sqrt(0.75) * rng.normal(size=n_subjects)
    noise = (ar * np.linspace(0.8, 1.4, M)).ravel()
    y = 20.0 + 0.5 * t + 0.3 * x + b[subject, 0] + b[subject, 1] * t + b[subject, 2] * x + noise
    last = np.repeat(np.where(rng.random(n_subjects) < 0.4, rng.integers(2, M, n_subjects), M), M)
    frame = pd.DataFrame({"id": subject.astype(str), "visit": visit, "t": t, "x": x, "y": y})
    return frame[visit < last].reset_index(drop=True)


def design(frame: pd.DataFrame) -> np.ndarray:
    return np.column_stack([np.ones(len(frame)), frame["t"], frame["x"]])


def bar(frame: pd.DataFrame, kind: str) -> np.ndarray | None:
    """Z of one bar: none, (1 | id), (visit | id) (a function of the visit: shared within a pattern),
    (t | id) with t jittered, or (x | id), x a time-varying covariate (both subject-specific)."""
    ones = np.ones(len(frame))
    return {"none": None, "1": ones[:, None], "visit": np.column_stack([ones, frame["visit"]]),
            "t": np.column_stack([ones, frame["t"]]), "x": np.column_stack([ones, frame["x"]])}[kind]


def structure_of(name: str) -> CovarianceStructure:
    return CovarianceStructure(name, 0 if name == "sp_exp" else M)


def groups_for(
    frame: pd.DataFrame, name: str, kind: str, *, y: np.ndarray | None = None, X: np.ndarray | None = None,
    Z: np.ndarray | None = None, times: np.ndarray | None = None,
) -> PatternGroups:
    coords = (frame["t"].to_numpy() if times is None else times) if name == "sp_exp" else frame["visit"].to_numpy()
    return group_by_pattern(frame["y"].to_numpy() if y is None else y, design(frame) if X is None else X,
                            frame["id"].to_numpy(), coords, bar(frame, kind) if Z is None else Z)


def subject_matrices(
    frame: pd.DataFrame, structure: CovarianceStructure, theta: np.ndarray, Z: np.ndarray | None,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per subject, from the model's definition: (rows, V_i, the residual part Σ_i, G)."""
    q = 0 if Z is None else Z.shape[1]
    own = theta[:structure.n_params]
    factor = lower_factor(theta[structure.n_params:], q)
    G = (math.exp(2 * own[0]) if structure.homogeneous else 1.0) * factor @ factor.T
    coord = frame["t" if structure.spatial else "visit"].to_numpy()
    out = {}
    for label, rows in frame.groupby("id").indices.items():
        sigma = structure.covariance(own, coord[rows])
        V = sigma if Z is None else sigma + Z[rows] @ G @ Z[rows].T
        out[label] = (rows, V, sigma, G)
    return out


def dense_loglik(frame: pd.DataFrame, structure: CovarianceStructure, theta: np.ndarray, Z: np.ndarray | None,
                 reml: bool) -> float:
    """ℓ from its definition: the block-diagonal V of all rows, GLS β̂, scipy's multivariate normal density;
    REML adds ½ p log 2π − ½ log|XᵀV⁻¹X|."""
    y, X = frame["y"].to_numpy(), design(frame)
    V = np.zeros((len(frame), len(frame)))
    for rows, Vi, _, _ in subject_matrices(frame, structure, theta, Z).values():
        V[np.ix_(rows, rows)] = Vi
    return gaussian_loglik(y, X, V, reml=reml)


@pytest.fixture(scope="module")
def visits() -> pd.DataFrame:
    return simulate(120, seed=32)


@pytest.fixture(scope="module")
def fits(visits: pd.DataFrame) -> dict[tuple[str, str], CovarianceFit]:
    """ML fits of a few (structure, bar) pairs, each layout represented."""
    pairs = [*FITTED, ("ar1", "none")]
    return {(name, kind): fit_covariance(groups_for(visits, name, kind), structure_of(name), reml=False)
            for name, kind in pairs}


# ------------------------------------------------------------------------------------------- layout


def test_subjects_share_a_pattern_only_when_they_share_v(visits: pd.DataFrame) -> None:
    # visits with a Z that is a function of the visit: shared patterns (monotone dropout: at most M - 1 of
    # them, those with fewer than MIN_SHARED subjects batched); a Z per subject or irregular times: batches only
    for kind in ("none", "1", "visit"):
        groups = groups_for(visits, "ar1", kind)
        assert 1 <= len(groups.patterns) <= M - 1
        assert all(pt.n_subjects >= MIN_SHARED for pt in groups.patterns)
        assert all(bt.n_subjects < MIN_SHARED * groups.n_visit_patterns for bt in groups.batches)
    for name, kind in (("ar1", "t"), ("ar1", "x"), ("sp_exp", "1"), ("sp_exp", "none")):
        groups = groups_for(visits, name, kind)
        assert groups.patterns == ()
        sizes = [bt.coords.shape[1] for bt in groups.batches]
        assert len(sizes) == len(set(sizes))  # one batch per number of visits
    groups = groups_for(visits, "ar1", "x")
    assert sum(bt.n_subjects for bt in groups.batches) == groups.n_subjects == visits["id"].nunique()
    assert groups.n_random == 2 and groups.n_visit_patterns == len(groups_for(visits, "ar1", "none").patterns) + \
        len({tuple(bt.coords[0]) for bt in groups_for(visits, "ar1", "none").batches})


def test_random_effects_are_refused_next_to_a_structure_that_contains_them(visits: pd.DataFrame) -> None:
    for name in ("us", "cs", "csh", "toep", "toeph"):
        groups = group_by_pattern(visits["y"].to_numpy(), design(visits), visits["id"].to_numpy(),
                                  visits["visit"].to_numpy(), bar(visits, "1"))
        with pytest.raises(ConfigError, match=f"covariance structure '{name}' cannot be combined with random effects"
                                              ".*use one of ar1, ar1h, ad, adh, sp_exp"):
            fit_covariance(groups, CovarianceStructure(name, M), reml=False)


# --------------------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("name", SERIAL)
@pytest.mark.parametrize("kind", ["1", "visit", "t", "x"])
@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
def test_grouped_likelihood_equals_the_dense_definition(visits: pd.DataFrame, name: str, kind: str, reml: bool) -> None:
    small = visits[visits["id"].astype(int) < 40].reset_index(drop=True)
    structure = structure_of(name)
    groups = groups_for(small, name, kind)
    q = groups.n_random
    rng = np.random.default_rng(8)
    for _ in range(2):
        theta = rng.normal(scale=0.5, size=structure.n_params + factor_size(q))
        assert log_likelihood(structure, groups, theta, reml=reml) == pytest.approx(
            dense_loglik(small, structure, theta, bar(small, kind), reml), abs=1e-8)


@pytest.mark.parametrize("name", SERIAL)
@pytest.mark.parametrize("kind", ["visit", "x"])
@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
def test_the_gradient_is_the_derivative_of_the_likelihood(
    visits: pd.DataFrame, name: str, kind: str, reml: bool,
) -> None:
    structure = structure_of(name)
    groups = groups_for(visits, name, kind)
    rng = np.random.default_rng(9)
    for profile in (False, True) if structure.homogeneous else (False,):

        def loglik(params: np.ndarray) -> float:
            return evaluate(structure, groups, params, reml=reml, profile=profile, gradient=False).loglik

        params = rng.normal(scale=0.5, size=structure.n_params + factor_size(2) - profile)
        analytic = evaluate(structure, groups, params, reml=reml, profile=profile).gradient
        for k in range(params.size):
            step = np.zeros_like(params)
            step[k] = 1e-6
            numeric = (loglik(params + step) - loglik(params - step)) / 2e-6
            assert analytic[k] == pytest.approx(numeric, rel=1e-5, abs=1e-4), (profile, k)


# ------------------------------------------------------------------------------------------- fits


@pytest.mark.parametrize("pair", FITTED)
def test_fits_reach_a_stationary_point_in_the_data_s_units(
    visits: pd.DataFrame, fits: dict[tuple[str, str], CovarianceFit], pair: tuple[str, str],
) -> None:
    # fit.full_theta (structure θ and Λ carried back from the standardized fit) gives fit.loglik on the raw
    # data, and central differences of ℓ there vanish
    name, kind = pair
    fit, structure, groups = fits[pair], structure_of(name), groups_for(visits, name, kind)
    assert fit.converged and not fit.singular, fit.message
    assert fit.n_params == 3 + structure.n_params + factor_size(groups.n_random)
    theta = fit.full_theta
    assert log_likelihood(structure, groups, theta, reml=False) == pytest.approx(fit.loglik, abs=1e-8)
    for k in range(theta.size):
        step = np.zeros_like(theta)
        step[k] = 1e-5 * max(1.0, abs(theta[k]))
        slope = (log_likelihood(structure, groups, theta + step, reml=False)
                 - log_likelihood(structure, groups, theta - step, reml=False)) / (2 * step[k])
        assert abs(slope * max(1.0, abs(theta[k]))) < 1e-2, (pair, k, slope)


@pytest.mark.parametrize("pair", [("ar1", "1"), ("ar1h", "visit"), ("sp_exp", "x"), ("ar1", "none")])
def test_subject_quantities_follow_their_formulas(
    visits: pd.DataFrame, fits: dict[tuple[str, str], CovarianceFit], pair: tuple[str, str],
) -> None:
    # b̂_i = G Z_iᵀ V_i⁻¹ r_i, cond. var. G − G Z_iᵀ V_i⁻¹ Z_i G, fitted X β̂ + Z b̂, normalized L_i⁻¹ (y − fitted)
    # with L_i L_iᵀ = Σ_i (the residual structure alone), each subject by hand
    name, kind = pair
    fit, structure, Z = fits[pair], structure_of(name), bar(visits, kind)
    q = 0 if Z is None else Z.shape[1]
    y, X = visits["y"].to_numpy(), design(visits)
    position = {label: k for k, label in enumerate(fit.subjects)}
    assert fit.modes.shape == fit.cond_sd.shape == (visits["id"].nunique(), q)
    assert fit.random_covariance.shape == (q, q)
    for label, (rows, V, sigma, G) in subject_matrices(visits, structure, fit.full_theta, Z).items():
        r = y[rows] - X[rows] @ fit.beta
        b = G @ Z[rows].T @ np.linalg.solve(V, r) if q else np.zeros(0)
        np.testing.assert_allclose(fit.modes[position[label]], b, rtol=1e-7, atol=1e-9)
        if q:
            cond = G - G @ Z[rows].T @ np.linalg.solve(V, Z[rows] @ G)
            np.testing.assert_allclose(fit.cond_sd[position[label]], np.sqrt(np.diag(cond)), rtol=1e-7)
        fitted = X[rows] @ fit.beta + (Z[rows] @ b if q else 0.0)
        np.testing.assert_allclose(fit.fitted[rows], fitted, rtol=1e-10)
        np.testing.assert_allclose(fit.residuals[rows], y[rows] - fitted, atol=1e-9)
        np.testing.assert_allclose(fit.normalized_residuals[rows],
                                   np.linalg.solve(np.linalg.cholesky(sigma), y[rows] - fitted), atol=1e-8)
    np.testing.assert_allclose(fit.random_covariance, G, rtol=1e-12)
    if structure.homogeneous:
        assert fit.sigma == pytest.approx(math.exp(fit.theta[0]), rel=1e-12)
    else:
        assert math.isnan(fit.sigma)


def test_the_residual_covariance_is_the_structure_alone(fits: dict[tuple[str, str], CovarianceFit]) -> None:
    ar1 = fits[("ar1", "1")]
    np.testing.assert_array_equal(ar1.residual_covariance(), ar1.covariance)
    visits = np.array([0, 2, 3])
    np.testing.assert_allclose(ar1.residual_covariance(visits), ar1.covariance[np.ix_(visits, visits)])
    assert ar1.residual_covariance()[0, 0] == pytest.approx(ar1.sigma**2, rel=1e-12)
    sp = fits[("sp_exp", "t")]
    times = np.array([0.0, 0.5, 3.0])
    np.testing.assert_allclose(sp.residual_covariance(times), structure_of("sp_exp").covariance(sp.theta, times))
    with pytest.raises(ValueError, match="sp_exp needs the times"):
        sp.residual_covariance()


# ------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
def test_an_outcome_a_million_times_larger_gives_the_same_fit(visits: pd.DataFrame, reml: bool) -> None:
    # ℓ(c y) = ℓ(y) − n log c (ML), − (n − p) log c (REML); β, b̂ and the SDs scale by c
    c = 1e6
    base = fit_covariance(groups_for(visits, "sp_exp", "t"), structure_of("sp_exp"), reml=reml)
    big = fit_covariance(groups_for(visits, "sp_exp", "t", y=c * visits["y"].to_numpy()), structure_of("sp_exp"),
                         reml=reml)
    assert base.converged and big.converged
    n, p = len(visits), 3
    assert big.loglik == pytest.approx(base.loglik - (n - p * reml) * math.log(c), abs=1e-6)
    np.testing.assert_allclose(big.beta, c * base.beta, rtol=1e-6)
    np.testing.assert_allclose(big.modes, c * base.modes, rtol=1e-5, atol=1e-5 * c)
    assert big.sigma == pytest.approx(c * base.sigma, rel=1e-6)
    np.testing.assert_allclose(big.normalized_residuals, base.normalized_residuals, atol=1e-6)


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
def test_a_time_in_epoch_seconds_gives_the_same_fit(visits: pd.DataFrame, reml: bool) -> None:
    # t in days since the study began → s = 1.7e9 + 86,400 t, in X, in the random slope's bar and as sp_exp's
    # time: the same model (X s = X t A, Z likewise, the range in seconds), so the same fitted values and ML
    # likelihood; the REML likelihood moves by −log|det A| = −log 86,400 (its log|XᵀV⁻¹X| term).
    seconds = 1.7e9 + 86_400.0 * visits["t"].to_numpy()
    X = np.column_stack([np.ones(len(visits)), seconds, visits["x"]])
    Z = np.column_stack([np.ones(len(visits)), seconds])
    days = fit_covariance(groups_for(visits, "sp_exp", "t"), structure_of("sp_exp"), reml=reml)
    epoch = fit_covariance(groups_for(visits, "sp_exp", "t", X=X, Z=Z, times=seconds), structure_of("sp_exp"),
                           reml=reml)
    assert days.converged and epoch.converged, epoch.message
    assert epoch.loglik == pytest.approx(days.loglik - reml * math.log(86_400.0), abs=1e-6)
    assert epoch.beta[1] == pytest.approx(days.beta[1] / 86_400.0, rel=1e-6)
    np.testing.assert_allclose(epoch.fitted, days.fitted, rtol=1e-9)
    np.testing.assert_allclose(epoch.normalized_residuals, days.normalized_residuals, atol=1e-6)
    assert epoch.n_params == days.n_params
    assert epoch.theta[1] == pytest.approx(days.theta[1] + math.log(86_400.0), abs=1e-6)  # log range


def test_the_scaled_gradient_is_the_newton_step_s_size(visits: pd.DataFrame) -> None:
    # lme4's scaled gradient L⁻¹g with −H = LLᵀ, H from the analytic gradient; here against H from second
    # differences of ℓ itself, near (not at) the optimum of (1 | id) + ar1
    structure = structure_of("ar1")
    groups = groups_for(visits, "ar1", "1")
    objective = Objective(structure, groups, reml=False)
    fit = fit_covariance(groups, structure, reml=False)
    x = np.r_[fit.theta[1:], fit.random_factor[0, 0]] + np.array([0.02, -0.03])
    gradient = objective.evaluate(x).gradient

    def loglik(point: np.ndarray) -> float:
        return objective.evaluate(point).loglik

    h, H = 1e-3, np.empty((2, 2))
    for i, j in np.ndindex(2, 2):
        ei, ej = np.eye(2)[i] * h, np.eye(2)[j] * h
        H[i, j] = (loglik(x + ei + ej) - loglik(x + ei - ej) - loglik(x - ei + ej) + loglik(x - ei - ej)) / (4 * h * h)
    expected = np.max(np.abs(np.linalg.solve(np.linalg.cholesky(-H), gradient)))
    assert objective.scaled_gradient(x, gradient, 2) == pytest.approx(expected, rel=1e-4)
    assert objective.check(x).gradient_max == pytest.approx(np.max(np.abs(gradient)))
