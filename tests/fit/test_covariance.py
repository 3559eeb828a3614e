"""fit.covariance (MMRM): each structure's Σ and its parameters read aloud, the pattern-grouped likelihood
against its dense definition, and fits against known optima (the random-intercept LMM, the closed-form
unstructured MLE, nesting). nlme's numbers: test_covariance_reference.py; random effects next to a
structure, per-subject batches and units: test_covariance_random_effects.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from definitions import gaussian_loglik

from longitudinal.errors import ConfigError, DataError
from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.covariance import (
    STRUCTURES, CovarianceFit, CovarianceStructure, PatternGroups, describe, fit_covariance, group_by_pattern,
    log_likelihood, named_parameters, parameter_count,
)
from longitudinal.fit.covariance.likelihood import evaluate

M = 4  # visits
EXPECTED_COUNTS = {
    "us": M * (M + 1) // 2, "cs": 2, "csh": M + 1, "ar1": 2, "ar1h": M + 1, "toep": M, "toeph": 2 * M - 1,
    "ad": M, "adh": 2 * M - 1, "sp_exp": 2,
}


def simulate(n_subjects: int, *, dropout: float, seed: int) -> pd.DataFrame:
    """M visits per subject, a random intercept (SD 1) plus AR(1) noise (SD 0.8, ρ 0.5) with unequal visit
    SDs, two arms, and monotone dropout after the first visit; a continuous time jittered around each visit."""
    rng = np.random.default_rng(seed)
    visit = np.tile(np.arange(M), n_subjects)
    subject = np.repeat(np.arange(n_subjects), M)
    arm = np.repeat(rng.integers(0, 2, n_subjects), M)
    ar = np.empty((n_subjects, M))
    ar[:, 0] = rng.normal(size=n_subjects)
    for j in range(1, M):
        ar[:, j] = 0.5 * ar[:, j - 1] + math.sqrt(1 - 0.25) * rng.normal(size=n_subjects)
    noise = 0.8 * ar * np.linspace(1.0, 1.6, M) + rng.normal(size=(n_subjects, 1))
    y = 10.0 + 0.5 * visit - 0.7 * arm * visit + noise.ravel()
    last = np.repeat(np.where(rng.random(n_subjects) < dropout, rng.integers(1, M, n_subjects), M), M)
    frame = pd.DataFrame({
        "id": subject.astype(str), "visit": visit, "t": visit + rng.uniform(-0.2, 0.2, visit.size),
        "arm": arm, "y": y,
    })
    return frame[visit < last].reset_index(drop=True)


def design(frame: pd.DataFrame, *, saturated: bool = False) -> np.ndarray:
    if saturated:  # one mean per visit
        return np.column_stack([(frame["visit"] == j).to_numpy(float) for j in range(M)])
    return np.column_stack([np.ones(len(frame)), frame["visit"], frame["arm"] * frame["visit"]])


def groups_for(frame: pd.DataFrame, structure: CovarianceStructure, X: np.ndarray) -> PatternGroups:
    coords = frame["t"].to_numpy() if structure.spatial else frame["visit"].to_numpy()
    return group_by_pattern(frame["y"].to_numpy(), X, frame["id"].to_numpy(), coords)


@pytest.fixture(scope="module")
def visits() -> pd.DataFrame:
    return simulate(80, dropout=0.4, seed=13)


@pytest.fixture(scope="module")
def ml_fits(visits: pd.DataFrame) -> dict[str, CovarianceFit]:
    X = design(visits)
    return {
        name: fit_covariance(groups_for(visits, CovarianceStructure(name, M), X), CovarianceStructure(name, M), reml=False)
        for name in STRUCTURES
    }


def dense_loglik(frame: pd.DataFrame, X: np.ndarray, structure: CovarianceStructure, theta: np.ndarray, reml: bool) -> float:
    """ℓ from its definition: the n × n block-diagonal V (each subject's observed visits), GLS β̂, and
    scipy's multivariate normal density of all rows at once; REML adds ½ p log 2π − ½ log|XᵀV⁻¹X|."""
    y = frame["y"].to_numpy()
    coord = frame["t" if structure.spatial else "visit"].to_numpy()
    V = np.zeros((len(frame), len(frame)))
    for _, rows in frame.groupby("id").indices.items():
        V[np.ix_(rows, rows)] = structure.covariance(theta, coord[rows])
    return gaussian_loglik(y, X, V, reml=reml)


# --------------------------------------------------------------------------------------- structures


@pytest.mark.parametrize("name", STRUCTURES)
def test_every_parameter_vector_gives_a_positive_definite_covariance(name: str) -> None:
    rng = np.random.default_rng(1)
    for m in (2, 3, 6):
        structure = CovarianceStructure(name, m)
        assert structure.n_params == parameter_count(name, m)
        if m == M:
            assert structure.n_params == EXPECTED_COUNTS[name]
        coords = np.sort(rng.uniform(0, 5, m)) if structure.spatial else None
        for _ in range(50):
            sigma = structure.covariance(rng.normal(scale=1.5, size=structure.n_params), coords)
            assert sigma.shape == (m, m)
            np.testing.assert_array_equal(sigma, sigma.T)
            assert np.linalg.eigvalsh(sigma).min() > 0


@pytest.mark.parametrize("name", STRUCTURES)
def test_parameter_count_at_four_visits(name: str) -> None:
    assert CovarianceStructure(name, M).n_params == EXPECTED_COUNTS[name]


def test_structures_reduce_to_their_special_cases() -> None:
    # mmrm's definitions written out for one θ: each structure as its formula, entry by entry.
    log_sd, rho_theta = np.log([1.0, 2.0, 0.5, 1.5]), np.array([0.3, -0.8, 1.2])
    sd = np.exp(log_sd)
    rho = rho_theta / np.sqrt(1 + rho_theta**2)
    ar1 = CovarianceStructure("ar1", M).covariance(np.array([0.2, 0.9]))
    r = 0.9 / math.sqrt(1 + 0.81)
    lag = np.abs(np.subtract.outer(np.arange(M), np.arange(M)))
    np.testing.assert_allclose(ar1, math.exp(0.4) * r**lag, rtol=1e-14)
    # toep with partial autocorrelations (ρ, 0, 0) is ar1 with ρ
    toep = CovarianceStructure("toep", M).covariance(np.array([0.2, 0.9, 0.0, 0.0]))
    np.testing.assert_allclose(toep, ar1, rtol=1e-14)
    adh = CovarianceStructure("adh", M).covariance(np.concatenate([log_sd, rho_theta]))
    assert adh[3, 0] == pytest.approx(sd[3] * sd[0] * rho[0] * rho[1] * rho[2], rel=1e-14)
    assert adh[2, 1] == pytest.approx(sd[2] * sd[1] * rho[1], rel=1e-14)
    a = 1 / (M - 1)
    csh = CovarianceStructure("csh", M).covariance(np.concatenate([log_sd, [0.0]]))
    assert csh[2, 0] == pytest.approx(sd[2] * sd[0] * (0.5 * (1 + a) - a), rel=1e-14)
    np.testing.assert_allclose(np.diag(csh), sd**2, rtol=1e-14)
    # us: Σ = L Lᵀ, L_ii = exp(θ_i), L_ij = exp(θ_i) θ_ij
    theta = np.arange(1, 11) / 10
    L = np.diag(np.exp(theta[:4]))
    L[np.tril_indices(4, -1)] = theta[4:] * np.exp(theta[:4])[np.tril_indices(4, -1)[0]]
    np.testing.assert_allclose(CovarianceStructure("us", M).covariance(theta), L @ L.T, rtol=1e-14)
    sp = CovarianceStructure("sp_exp", 0).covariance(np.array([0.1, np.log(2.0)]), np.array([0.0, 1.0, 3.0]))
    assert sp[2, 0] == pytest.approx(math.exp(0.2) * math.exp(-3.0 / 2.0), rel=1e-14)


def test_structures_are_mmrm_s_in_the_formula_language_s_order() -> None:
    # the same tuple as longitudinal.model.formula.COVARIANCE_STRUCTURES (the candidate dispatch relies on it)
    assert STRUCTURES == ("us", "cs", "csh", "ar1", "ar1h", "toep", "toeph", "ad", "adh", "sp_exp")
    assert [describe(name) for name in STRUCTURES] == [
        "unstructured", "compound symmetry", "compound symmetry, heterogeneous variances", "AR(1)",
        "AR(1), heterogeneous variances", "Toeplitz", "Toeplitz, heterogeneous variances", "ante-dependence",
        "ante-dependence, heterogeneous variances", "spatial exponential (continuous time)",
    ]
    with pytest.raises(ConfigError, match="unknown covariance structure 'arma'"):
        describe("arma")


@pytest.mark.parametrize("name", STRUCTURES)
def test_named_parameters_read_the_covariance_matrix(name: str) -> None:
    # each name's value read off Σ(θ) itself: SDs from its diagonal, correlations from its entries
    structure = CovarianceStructure(name, M)
    theta = np.random.default_rng(7).normal(scale=0.7, size=structure.n_params)
    named = named_parameters(structure, theta)
    assert len(named) == structure.n_params
    values = dict(named)
    coords = np.array([0.0, 1.0, 2.5, 4.0]) if structure.spatial else None
    sigma = structure.covariance(theta, coords)
    sd = np.sqrt(np.diag(sigma))
    corr = sigma / np.outer(sd, sd)
    if name in ("cs", "ar1", "toep", "ad", "sp_exp"):
        assert [key for key, _ in named][0] == "sigma"
        assert values["sigma"] == pytest.approx(sd[0], rel=1e-12)
    else:
        assert [key for key, _ in named][:M] == [f"sd[{j}]" for j in range(1, M + 1)]
        np.testing.assert_allclose([values[f"sd[{j}]"] for j in range(1, M + 1)], sd, rtol=1e-12)
    expected = {
        "us": lambda: {f"corr[{i + 1},{j + 1}]": corr[i, j] for i in range(M) for j in range(i)},
        "cs": lambda: {"rho": corr[1, 0]}, "csh": lambda: {"rho": corr[3, 1]}, "ar1": lambda: {"rho": corr[1, 0]},
        "ar1h": lambda: {"rho": corr[2, 1]}, "toep": lambda: {f"rho[lag {k}]": corr[k, 0] for k in range(1, M)},
        "toeph": lambda: {f"rho[lag {k}]": corr[M - 1, M - 1 - k] for k in range(1, M)},
        "ad": lambda: {f"rho[{j},{j + 1}]": corr[j, j - 1] for j in range(1, M)},
        "adh": lambda: {f"rho[{j},{j + 1}]": corr[j, j - 1] for j in range(1, M)},
        "sp_exp": lambda: {"range": -1.5 / math.log(corr[3, 2])},  # times 2.5 and 4.0
    }[name]()
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-10), key


def test_complex_step_jacobian_matches_central_differences() -> None:
    rng = np.random.default_rng(2)
    for name in STRUCTURES:
        structure = CovarianceStructure(name, M)
        theta = rng.normal(size=structure.n_params)
        coords = np.array([0.0, 0.7, 2.0, 3.5]) if structure.spatial else None
        J = structure.jacobian(theta, coords)
        for k in range(theta.size):
            step = np.zeros_like(theta)
            step[k] = 1e-6
            fd = (structure.covariance(theta + step, coords) - structure.covariance(theta - step, coords)) / 2e-6
            np.testing.assert_allclose(J[k], fd, atol=1e-7, err_msg=name)


def test_unknown_structure_and_duplicate_visits_are_refused(visits: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="unknown covariance structure 'arma'; use one of us, cs"):
        CovarianceStructure("arma", M)
    doubled = pd.concat([visits, visits.iloc[[0]]], ignore_index=True)
    with pytest.raises(DataError, match=r"subject '0' has more than one row at visit 0"):
        groups_for(doubled, CovarianceStructure("us", M), design(doubled))


# --------------------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("name", STRUCTURES)
@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
def test_grouped_likelihood_equals_the_dense_definition(visits: pd.DataFrame, name: str, reml: bool) -> None:
    visits = visits[visits["id"].astype(int) < 30].reset_index(drop=True)  # a small dense V
    structure = CovarianceStructure(name, M)
    X = design(visits)
    groups = groups_for(visits, structure, X)
    if not structure.spatial:  # monotone dropout: at most M visit patterns, one Cholesky each
        assert len(groups.patterns) <= M
    rng = np.random.default_rng(3)
    for _ in range(2):
        theta = rng.normal(scale=0.5, size=structure.n_params)
        assert log_likelihood(structure, groups, theta, reml=reml) == pytest.approx(
            dense_loglik(visits, X, structure, theta, reml), abs=1e-8)


@pytest.mark.parametrize("name", ["cs", "ar1", "toep", "ad", "sp_exp"])
@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
def test_profiled_scale_is_the_maximum_over_sigma(visits: pd.DataFrame, name: str, reml: bool) -> None:
    structure = CovarianceStructure(name, M)
    groups = groups_for(visits, structure, design(visits))
    psi = np.random.default_rng(4).normal(scale=0.5, size=structure.n_params - 1)
    profiled = evaluate(structure, groups, psi, reml=reml, profile=True)
    assert profiled.loglik == pytest.approx(log_likelihood(structure, groups, profiled.theta, reml=reml), abs=1e-9)
    for shift in (-0.01, 0.01):
        moved = profiled.theta + np.r_[shift, np.zeros(psi.size)]
        assert log_likelihood(structure, groups, moved, reml=reml) < profiled.loglik


# ------------------------------------------------------------------------------------------- fits


def test_compound_symmetry_is_the_random_intercept_model(visits: pd.DataFrame, ml_fits: dict[str, CovarianceFit]) -> None:
    lmm = fit_candidate(visits.assign(t=visits["visit"], tarm=visits["visit"] * visits["arm"]), "ri",
                        "y ~ t + tarm + (1 | id)")
    cs = ml_fits["cs"]
    assert lmm.converged and cs.converged
    assert cs.loglik == pytest.approx(lmm.loglik, abs=1e-6)
    estimates = [e.estimate for e in lmm.fixed_effects]
    np.testing.assert_allclose(cs.beta, estimates, atol=1e-5)
    # Σ̂ = σ²_b 11ᵀ + σ² I
    tau2 = lmm.random_effects[0].sd ** 2
    np.testing.assert_allclose(cs.covariance, tau2 + lmm.residual_sd**2 * np.eye(M), rtol=1e-4)


def test_compound_symmetry_reml_is_the_random_intercept_reml(visits: pd.DataFrame) -> None:
    structure = CovarianceStructure("cs", M)
    cs = fit_covariance(groups_for(visits, structure, design(visits)), structure, reml=True)
    lmm = fit_candidate(visits.assign(t=visits["visit"], tarm=visits["visit"] * visits["arm"]), "ri",
                        "y ~ t + tarm + (1 | id)", method="REML")
    assert cs.loglik == pytest.approx(lmm.loglik, abs=1e-6)
    std_errors = [e.std_error for e in lmm.fixed_effects]
    np.testing.assert_allclose(np.sqrt(np.diag(cs.vcov)), std_errors, rtol=1e-4)


def test_unstructured_reaches_the_closed_form_mle() -> None:
    complete = simulate(60, dropout=0.0, seed=5)
    X = design(complete, saturated=True)
    structure = CovarianceStructure("us", M)
    fit = fit_covariance(groups_for(complete, structure, X), structure, reml=False)
    residuals = complete.pivot(index="id", columns="visit", values="y").to_numpy()
    residuals = residuals - residuals.mean(axis=0)
    sample = residuals.T @ residuals / residuals.shape[0]  # the ML (divide by N) covariance
    n = residuals.shape[0]
    closed = -0.5 * n * (M * math.log(2 * math.pi) + np.linalg.slogdet(sample)[1] + M)
    assert fit.converged
    np.testing.assert_allclose(fit.covariance, sample, rtol=1e-5, atol=1e-7)
    assert fit.loglik == pytest.approx(closed, abs=1e-8)
    np.testing.assert_allclose(fit.vcov, sample / n, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("chain", [
    ("cs", "csh", "us"), ("ar1", "toep", "us"), ("ar1", "ar1h", "toeph", "us"), ("ad", "adh", "us"),
    ("ar1", "ad"), ("toep", "toeph"),
])
def test_nested_structures_give_ordered_maxima(ml_fits: dict[str, CovarianceFit], chain: tuple[str, ...]) -> None:
    logliks = [ml_fits[name].loglik for name in chain]
    assert all(small <= large + 1e-6 for small, large in zip(logliks, logliks[1:])), dict(zip(chain, logliks))
    assert logliks[-1] > logliks[0] + 1e-3  # the data are not from the smallest model: the gaps are real


@pytest.mark.parametrize("name", STRUCTURES)
def test_the_gradient_vanishes_at_the_optimum(visits: pd.DataFrame, ml_fits: dict[str, CovarianceFit], name: str) -> None:
    fit = ml_fits[name]
    assert fit.converged and fit.gradient_max < 1e-3
    assert fit.n_params == 3 + EXPECTED_COUNTS[name]
    # independently of the analytic gradient: central differences of ℓ over the full θ
    structure = CovarianceStructure(name, M)
    groups = groups_for(visits, structure, design(visits))
    for k in range(fit.theta.size):
        step = np.zeros_like(fit.theta)
        step[k] = 1e-5
        slope = (log_likelihood(structure, groups, fit.theta + step, reml=False)
                 - log_likelihood(structure, groups, fit.theta - step, reml=False)) / 2e-5
        assert abs(slope) < 1e-3, (name, k, slope)
