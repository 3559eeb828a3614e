"""The lme4-style engine: its deviance against the dense definition, closed-form REML/ML answers, lme4's
sleepstudy fit, statsmodels' optimum, and a deviance whose cost depends on the groups only."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.linalg import GroupGram, factor_groups
from longitudinal.fit.lmm import fit_lmm, profiled_deviance
from longitudinal.fit.lmm.crossproducts import CrossProducts, compute_crossproducts, group_patterns
from longitudinal.fit.theta import layout_theta
from longitudinal.model.design import Design, build_design
from longitudinal.model.formula import parse_formula
from longitudinal.simulate import SimulationSpec, simulate_trial
from reference_data import read_sleepstudy



def design_of(frame: pd.DataFrame, formula: str) -> Design:
    return build_design(frame, parse_formula(formula))


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    """Six groups of 3-5 rows with two covariates: small enough for the dense n × n likelihood."""
    rng = np.random.default_rng(3)
    sizes = [3, 4, 5, 3, 5, 4]
    g = np.repeat([f"s{i}" for i in range(len(sizes))], sizes)
    x = rng.normal(size=g.size)
    w = rng.uniform(0, 2, size=g.size)
    y = 1.0 + 0.5 * x - w + rng.normal(size=len(sizes)).repeat(sizes) + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "w": w, "g": g})


def dense_deviance(design: Design, theta: np.ndarray, reml: bool) -> float:
    """The ML deviance or REML criterion from the marginal model y ~ N(Xβ, σ²(I + ZΛΛ'Z')), profiled
    over β and σ² by generalized least squares on dense n × n matrices (the definition, no tricks)."""
    lam = layout_theta(tuple(len(b.terms) for b in design.blocks)).lambda_matrix(theta)
    Z, X, y = design.Z, design.X, design.y
    n, p = X.shape
    same_group = design.codes[:, None] == design.codes[None, :]
    V = np.eye(n) + (Z @ lam @ lam.T @ Z.T) * same_group
    Vinv = np.linalg.inv(V)
    XtVX = X.T @ Vinv @ X
    beta = np.linalg.solve(XtVX, X.T @ Vinv @ y)
    r = y - X @ beta
    r2 = float(r @ Vinv @ r)
    logdet_V = np.linalg.slogdet(V)[1]
    if reml:
        return logdet_V + np.linalg.slogdet(XtVX)[1] + (n - p) * (1 + math.log(2 * math.pi * r2 / (n - p)))
    return logdet_V + n * (1 + math.log(2 * math.pi * r2 / n))


# --------------------------------------------------------------------------------------- the deviance


def test_theta_follows_lme4_order_and_bounds() -> None:
    layout = layout_theta((2, 1))
    # lme4: per bar, the lower triangle column by column; variances bounded at 0, covariances free.
    assert list(zip(layout.rows, layout.cols)) == [(0, 0), (1, 0), (1, 1), (2, 2)]
    assert layout.lower == (0.0, -math.inf, 0.0, 0.0)
    assert layout.start().tolist() == [1.0, 0.0, 1.0, 1.0]
    assert layout.lambda_matrix(np.array([1.0, 2.0, 3.0, 4.0])).tolist() == [[1, 0, 0], [2, 3, 0], [0, 0, 4]]


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
@pytest.mark.parametrize(
    ("bars", "theta"),
    [
        ("(1 | g)", [0.7]),  # q = 1, written out
        ("(x | g)", [0.9, -0.4, 0.3]),  # q = 2, written out
        ("(x || g)", [0.9, 0.3]),  # q = 2, diagonal Λ
        ("(1 + x + w | g)", [0.8, 0.2, -0.5, 0.6, 0.1, 0.4]),  # q = 3, batched Cholesky
        ("(x | g) + (0 + w | g)", [0.8, -0.3, 0.5, 0.7]),  # two bars, block-diagonal Λ
    ],
)
def test_profiled_deviance_equals_the_dense_definition(
    small: pd.DataFrame, bars: str, theta: list[float], reml: bool,
) -> None:
    design = design_of(small, f"y ~ x + w + {bars}")
    expected = dense_deviance(design, np.array(theta), reml)
    assert profiled_deviance(design, np.array(theta), reml) == pytest.approx(expected, rel=1e-11)


def test_balanced_one_way_reml_equals_the_anova_estimates() -> None:
    # Balanced one-way random-intercept ANOVA: REML gives the moment estimates when they are positive,
    # σ²_e = MSW and σ²_b = (MSB − MSW)/m; the intercept is the grand mean with SE √(MSB/(G·m)).
    y = np.array([[9.0, 11.0, 10.5, 12.0], [14.0, 15.5, 13.0, 16.0], [8.0, 7.5, 9.5, 8.5],
                  [12.0, 13.5, 11.0, 12.5], [16.5, 18.0, 17.0, 15.0]])
    G, m = y.shape
    frame = pd.DataFrame({"y": y.ravel(), "g": np.repeat([f"g{i}" for i in range(G)], m)})
    group_means, grand_mean = y.mean(axis=1), y.mean()
    msb = m * ((group_means - grand_mean) ** 2).sum() / (G - 1)
    msw = ((y - group_means[:, None]) ** 2).sum() / (G * (m - 1))

    result = fit_lmm(design_of(frame, "y ~ 1 + (1 | g)"), reml=True)

    # The optimizer stops when the deviance changes by < 1e-8: variances agree to about 1e-5 relative.
    assert result.converged and not result.singular
    assert result.sigma**2 == pytest.approx(msw, rel=1e-5)
    assert result.covariances[0][0, 0] == pytest.approx((msb - msw) / m, rel=1e-5)
    assert result.beta[0] == pytest.approx(grand_mean, rel=1e-12)
    assert math.sqrt(result.vcov[0, 0]) == pytest.approx(math.sqrt(msb / (G * m)), rel=1e-5)

    # ML (balanced): the same σ²_e, and σ²_b = ((G − 1)/G · MSB − MSW)/m.
    ml = fit_lmm(design_of(frame, "y ~ 1 + (1 | g)"), reml=False)
    assert ml.sigma**2 == pytest.approx(msw, rel=1e-5)
    assert ml.covariances[0][0, 0] == pytest.approx(((G - 1) / G * msb - msw) / m, rel=1e-5)


def test_sleepstudy_reml_matches_lme4() -> None:
    # lme4 1.1-31: lmer(Reaction ~ Days + (Days | Subject), sleepstudy); getME(fit, "theta") and REMLcrit(fit).
    result = fit_lmm(design_of(read_sleepstudy(), "Reaction ~ Days + (Days | Subject)"), reml=True)
    assert result.converged and not result.singular
    assert result.theta == pytest.approx([0.96674177, 0.01516906, 0.23090995], abs=2e-5)
    assert result.deviance == pytest.approx(1743.62827196, abs=1e-6)
    # ranef(fit, condVar = TRUE): subject 308's modes and conditional variances.
    assert result.modes[0] == pytest.approx([2.2585509499, 9.19897576557], abs=1e-3)
    assert result.cond_sd[0] ** 2 == pytest.approx([145.7055875198, 5.31228291226], rel=1e-4)


# ------------------------------------------------------------------------------------------ optimizer


def statsmodels_best_loglik(design: Design) -> tuple[float, np.ndarray]:
    """statsmodels MixedLM by ML with L-BFGS, from its default start and from three others; the best."""
    import statsmodels.api as sm
    from statsmodels.regression.mixed_linear_model import MixedLMParams

    model = sm.MixedLM(design.y, design.X, groups=design.codes, exog_re=design.Z)
    beta0 = np.linalg.lstsq(design.X, design.y, rcond=None)[0]
    starts = [None] + [
        MixedLMParams.from_components(fe_params=beta0, cov_re=scale * np.eye(design.Z.shape[1]))
        for scale in (0.1, 1.0, 10.0)
    ]
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in starts:
            fit = model.fit(reml=False, method="lbfgs", start_params=start)
            if np.isfinite(fit.llf):
                fits.append(fit)
    best = max(fits, key=lambda f: f.llf)
    return float(best.llf), np.asarray(best.fe_params)


@pytest.mark.slow
def test_ml_optimum_is_at_least_statsmodels() -> None:
    visits = simulate_trial(SimulationSpec(n_subjects=60, seed=11))
    design = design_of(visits, "score ~ week * arm + age + (week | patient_id)")
    sm_loglik, sm_beta = statsmodels_best_loglik(design)

    ours = fit_lmm(design, reml=False)

    assert ours.converged
    assert ours.loglik >= sm_loglik - 1e-6
    assert ours.loglik - sm_loglik < 0.01
    assert ours.beta == pytest.approx(sm_beta, rel=1e-4, abs=1e-4)


def test_every_optimizer_run_is_recorded(small: pd.DataFrame) -> None:
    result = fit_lmm(design_of(small, "y ~ x + (x | g)"), reml=False)
    assert result.attempts[0].optimizer == "bobyqa"
    assert result.evaluations == sum(a.iterations for a in result.attempts) > 0
    assert all(a.seconds >= 0 for a in result.attempts)
    assert result.loglik == pytest.approx(max(a.loglik for a in result.attempts), abs=1e-9)


def test_an_outcome_on_an_exact_line_is_a_failure_not_an_infinite_likelihood() -> None:
    frame = pd.DataFrame({"y": [1.0, 3.0, 5.0, 7.0, 9.0], "x": [0.0, 1.0, 2.0, 3.0, 4.0], "g": list("aabbb")})
    with pytest.raises(FitFailure, match="zero residual variance") as failure:
        fit_lmm(design_of(frame, "y ~ x + (1 | g)"), reml=False)
    assert len(failure.value.attempts) >= 1


def test_one_row_per_group_cannot_carry_a_random_slope() -> None:
    frame = pd.DataFrame({"y": [1.0, 2.5, 2.0, 4.5, 3.0, 7.0], "x": [0.0, 1, 2, 3, 4, 5], "g": list("abcdef")})
    with pytest.raises(FitFailure, match=r"number of observations \(6\) is not larger than the number of levels"):
        fit_lmm(design_of(frame, "y ~ x + (x | g)"), reml=False)
    frame = pd.concat([frame, frame.assign(y=frame["y"] + 1.0)], ignore_index=True)
    with pytest.raises(FitFailure, match=r"number of random effects \(12\) for \(\(Intercept\) \+ x \| g\)"):
        fit_lmm(design_of(frame, "y ~ x + (x | g)"), reml=False)


# ------------------------------------------------------------------------------------- cost per θ


def test_crossproducts_hold_nothing_of_size_n(small: pd.DataFrame) -> None:
    design = design_of(small, "y ~ x + w + (x | g)")
    products = compute_crossproducts(design)
    G, q, p = design.n_groups, 2, design.X.shape[1]
    assert products.ZtZ.shape == (q, q, G)
    assert products.ZtXy.shape == (q, G, p + 1)
    assert products.XytXy.shape == (p + 1, p + 1)
    arrays = [v for v in vars(products).values() if isinstance(v, np.ndarray)]
    assert all(design.n_obs not in a.shape for a in arrays)


def test_crossproducts_are_the_per_group_sums_of_products(small: pd.DataFrame) -> None:
    # Rows shuffled so that groups are not contiguous; two bars (uncorrelated) side by side in Z.
    shuffled = small.sample(frac=1.0, random_state=5).reset_index(drop=True)
    design = design_of(shuffled, "y ~ x + w + (x || g)")
    products = compute_crossproducts(design)
    Z, Xy = design.Z, np.column_stack([design.X, design.y])
    for g in range(design.n_groups):
        rows = design.codes == g
        np.testing.assert_allclose(products.ZtZ[:, :, g], Z[rows].T @ Z[rows], rtol=1e-13)
        np.testing.assert_allclose(products.ZtXy[:, g, :], Z[rows].T @ Xy[rows], rtol=1e-13)
    np.testing.assert_allclose(products.XytXy, Xy.T @ Xy, rtol=1e-13)


def test_pattern_sums_are_the_sums_over_their_groups() -> None:
    design = design_of(same_visits_frame(), "y ~ t + x + (t | g)")
    products = compute_crossproducts(design)
    patterns = group_patterns(products, max_share=1.0)
    assert patterns is not None
    q, G, k = products.ZtXy.shape
    WtW = patterns.WtW.reshape(patterns.n_patterns, q, q, k, k)
    for P in range(patterns.n_patterns):
        members = [g for g in range(G) if np.array_equal(products.ZtZ[:, :, g], patterns.ZtZ[P])]
        assert len(members) == patterns.counts[P]
        for i in range(q):
            for j in range(q):
                expected = sum(np.outer(products.ZtXy[i, g], products.ZtXy[j, g]) for g in members)
                np.testing.assert_allclose(WtW[P, i, j], expected, rtol=1e-13)


def test_deviance_reads_only_the_crossproducts(small: pd.DataFrame) -> None:
    # Each row repeated 10 times within its group multiplies every cross-product by 10: the deviance of
    # the 10× data equals the deviance computed from the original cross-products scaled by 10, so a
    # deviance evaluation sees the groups' sums, never the rows.
    formula = "y ~ x + w + (x | g)"
    design = design_of(small, formula)
    tenfold = design_of(small.loc[small.index.repeat(10)].reset_index(drop=True), formula)
    products = compute_crossproducts(design)
    scaled = dataclasses.replace(
        products, ZtZ=10 * products.ZtZ, ZtXy=10 * products.ZtXy, XytXy=10 * products.XytXy,
        n_obs=10 * products.n_obs,
    )
    big = compute_crossproducts(tenfold)
    assert isinstance(big, CrossProducts) and big.ZtZ.shape == products.ZtZ.shape
    for theta in ([1.0, 0.0, 1.0], [0.4, -0.2, 0.1]):
        for reml in (False, True):
            assert profiled_deviance(big, np.array(theta), reml) == pytest.approx(
                profiled_deviance(scaled, np.array(theta), reml), rel=1e-12
            )


def test_deviance_rejects_a_theta_of_the_wrong_length(small: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="3 covariance parameters"):
        profiled_deviance(design_of(small, "y ~ x + (x | g)"), np.array([1.0]), False)


# ------------------------------------------------------------------------------ nested and crossed


def full_random_effects(design: Design, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense Z (n × Σ q_b G_b, bar by bar, level-major) and Λ (block-diagonal, Λ_b once per level)."""
    sizes = tuple(len(b.terms) for b in design.blocks)
    lam = layout_theta(sizes).lambda_matrix(theta)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    Zs, lams = [], []
    for k, block in enumerate(design.blocks):
        q, G = sizes[k], block.n_levels
        Z = np.zeros((design.n_obs, q * G))
        for j in range(q):
            Z[np.arange(design.n_obs), block.codes * q + j] = block.Z[:, j]
        Zs.append(Z)
        lams.append(np.kron(np.eye(G), lam[offsets[k]:offsets[k + 1], offsets[k]:offsets[k + 1]]))
    size = sum(L.shape[0] for L in lams)
    Lam = np.zeros((size, size))
    at = 0
    for L in lams:
        Lam[at:at + L.shape[0], at:at + L.shape[0]] = L
        at += L.shape[0]
    return np.hstack(Zs), Lam


def dense_deviance_any(design: Design, theta: np.ndarray, reml: bool) -> float:
    """As ``dense_deviance``, for any grouping factors: V = I + ZΛΛ'Z' built from the full Z."""
    Z, Lam = full_random_effects(design, theta)
    X, y = design.X, design.y
    n, p = X.shape
    Vinv = np.linalg.inv(np.eye(n) + Z @ Lam @ Lam.T @ Z.T)
    XtVX = X.T @ Vinv @ X
    r = y - X @ np.linalg.solve(XtVX, X.T @ Vinv @ y)
    r2 = float(r @ Vinv @ r)
    logdet_V = -np.linalg.slogdet(Vinv)[1]
    if reml:
        return logdet_V + np.linalg.slogdet(XtVX)[1] + (n - p) * (1 + math.log(2 * math.pi * r2 / (n - p)))
    return logdet_V + n * (1 + math.log(2 * math.pi * r2 / n))


@pytest.fixture(scope="module")
def clinic() -> pd.DataFrame:
    """8 patients × 2 sides, rated by 4 raters at random: crossed and nested factors on 64 rows."""
    rng = np.random.default_rng(11)
    n = 64
    patient = rng.integers(0, 8, n)
    frame = pd.DataFrame({
        "patient": [f"p{i}" for i in patient],
        "side": rng.choice(["L", "R"], n),
        "rater": [f"r{i}" for i in rng.integers(0, 4, n)],
        "t": rng.uniform(0, 3, n),
        "w": rng.normal(size=n),
    })
    y = 1 + frame["t"] + rng.normal(size=8)[patient] + 0.3 * rng.normal(size=8)[patient] * frame["t"]
    return frame.assign(y=y + rng.normal(size=n))


@pytest.fixture(params=["dense", "sparse"])
def schur_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the Schur complement factored densely (the default at this size) and by SuperLU."""
    from longitudinal.fit.lmm import multifactor

    if request.param == "sparse":
        monkeypatch.setattr(multifactor, "SCHUR_DENSE_LIMIT", 0)
        monkeypatch.setattr(multifactor, "DENSE_RZR_ELEMENTS", 0)
    return str(request.param)


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
@pytest.mark.parametrize(
    ("bars", "theta"),
    [
        ("(t | patient) + (1 | rater)", [0.8, -0.3, 0.5, 0.7]),  # crossed, correlated primary bar
        ("(1 | patient) + (t | rater) + (0 + w | patient)", [0.8, 0.6, 0.2, 0.4, 0.3]),  # two bars on each
        ("(1 | patient/side)", [0.6, 0.9]),  # nested: patient and patient:side
        ("(t | patient) + (1 | patient:side)", [0.8, -0.3, 0.5, 0.7]),  # nested, slope at the outer level
        ("(t || rater/patient)", [0.8, 0.5, 0.7, 0.4]),  # || then /
        ("(1 | patient) + (1 | rater) + (1 | patient:side)", [0.5, 0.7, 0.9]),  # three factors
    ],
)
def test_multilevel_deviance_equals_the_dense_definition(
    clinic: pd.DataFrame, bars: str, theta: list[float], reml: bool, schur_path: str,
) -> None:
    design = design_of(clinic, f"y ~ t + w + {bars}")
    assert not design.single_factor
    expected = dense_deviance_any(design, np.array(theta), reml)
    assert profiled_deviance(design, np.array(theta), reml) == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_the_dense_check_agrees_with_the_one_factor_definition(small: pd.DataFrame) -> None:
    design = design_of(small, "y ~ x + w + (x | g)")
    theta = np.array([0.9, -0.4, 0.3])
    assert dense_deviance_any(design, theta, False) == pytest.approx(dense_deviance(design, theta, False), rel=1e-12)


def test_crossed_fit_modes_and_conditional_sds_equal_the_dense_formulas(clinic: pd.DataFrame, schur_path: str) -> None:
    # b = ΛΛ'Z'V⁻¹(y − Xβ) (BLUP, V relative to σ²) and Var(b | y) = σ² Λ (Λ'Z'ZΛ + I)⁻¹ Λ' at the optimum
    design = design_of(clinic, "y ~ t + (t | patient) + (1 | rater) + (1 | patient:side)")
    result = fit_lmm(design, reml=True)
    Z, Lam = full_random_effects(design, result.theta)
    n = design.n_obs
    V = np.eye(n) + Z @ Lam @ Lam.T @ Z.T
    b = Lam @ Lam.T @ Z.T @ np.linalg.solve(V, design.y - design.X @ result.beta)
    cond = result.sigma ** 2 * Lam @ np.linalg.inv(Lam.T @ Z.T @ Z @ Lam + np.eye(Z.shape[1])) @ Lam.T
    by_group = {factor.group: factor for factor in result.ranef}
    assert list(by_group) == ["patient", "rater", "patient:side"]
    at = 0
    for block in design.blocks:
        factor = by_group[block.group]
        size = len(block.terms) * block.n_levels
        np.testing.assert_allclose(factor.modes.reshape(-1), b[at:at + size], atol=1e-8)
        np.testing.assert_allclose(factor.cond_sd.reshape(-1), np.sqrt(np.diag(cond)[at:at + size]), rtol=1e-7)
        at += size
    np.testing.assert_allclose(result.fitted, design.X @ result.beta + Z @ b, atol=1e-8)
    assert design.group == "patient:side"  # the finest factor: EngineResult.modes are its modes
    np.testing.assert_allclose(result.modes, by_group["patient:side"].modes)


def test_multilevel_products_hold_nothing_of_size_n(clinic: pd.DataFrame) -> None:
    from longitudinal.fit.lmm.multifactor import compute_multiproducts

    design = design_of(clinic, "y ~ t + (t | patient) + (1 | rater)")
    products = compute_multiproducts(design)
    arrays = [v for v in vars(products).values() if isinstance(v, np.ndarray)]
    arrays += [v for block in products.rest for v in vars(block).values() if isinstance(v, np.ndarray)]
    arrays += [v for v in vars(products.primary).values() if isinstance(v, np.ndarray)]
    assert all(design.n_obs not in a.shape for a in arrays)
    # one pair block per (patient, rater) seen, never more than the rows
    pairs = clinic.groupby(["patient", "rater"]).ngroups
    assert products.rest[0].cross.shape == (pairs, 2, 1)


def test_a_factor_with_as_many_levels_as_rows_is_not_identifiable(clinic: pd.DataFrame) -> None:
    frame = clinic.assign(visit=[f"v{i}" for i in range(len(clinic))])
    with pytest.raises(FitFailure, match=r"number of observations \(64\) is not larger than the number of levels of 'visit' \(64\)"):
        fit_lmm(design_of(frame, "y ~ t + (1 | patient) + (1 | visit)"), reml=False)


def test_a_grouping_factor_with_one_level_is_refused(clinic: pd.DataFrame) -> None:
    with pytest.raises(FitFailure, match=r"grouping factor 'site' has 1 level"):
        fit_lmm(design_of(clinic.assign(site="A"), "y ~ t + (1 | patient) + (1 | site)"), reml=False)


# ------------------------------------------------------------------------------- visit patterns


def same_visits_frame(seed: int = 5) -> pd.DataFrame:
    """Eight subjects: five seen at weeks 0-3, three at weeks 0, 2, 4 (two Z'Z patterns for (t | g))."""
    rng = np.random.default_rng(seed)
    times = [[0.0, 1, 2, 3]] * 5 + [[0.0, 2, 4]] * 3
    g = np.concatenate([[f"s{i}"] * len(t) for i, t in enumerate(times)])
    t = np.concatenate(times)
    x = rng.normal(size=t.size)
    y = 2.0 + 0.4 * t + 0.3 * x + rng.normal(size=len(times)).repeat([len(v) for v in times]) + rng.normal(size=t.size)
    return pd.DataFrame({"y": y, "t": t, "x": x, "g": g})


@pytest.mark.parametrize("formula", ["y ~ t + x + (1 | g)", "y ~ t + x + (t | g)", "y ~ t + x + (t || g)",
                                     "y ~ t + x + (1 + t + I(t^2) | g)"])
def test_subjects_sharing_visit_times_share_one_pattern_with_the_same_deviance(formula: str) -> None:
    design = design_of(same_visits_frame(), formula)
    products = compute_crossproducts(design)
    patterns = group_patterns(products, max_share=1.0)
    assert patterns is not None
    assert patterns.n_patterns == 2
    assert patterns.counts.sum() == design.n_groups
    rng = np.random.default_rng(0)
    layout = layout_theta(products.block_sizes)
    for _ in range(3):
        theta = np.where(layout.diagonal, rng.uniform(0.1, 2.0, layout.size), rng.normal(size=layout.size))
        for reml in (False, True):
            assert profiled_deviance(patterns, theta, reml) == pytest.approx(
                dense_deviance(design, theta, reml), rel=1e-10
            )


def test_random_intercepts_group_by_rows_per_subject() -> None:
    design = design_of(same_visits_frame(), "y ~ t + (1 | g)")
    patterns = group_patterns(compute_crossproducts(design), max_share=1.0)
    assert patterns is not None and sorted(patterns.counts.tolist()) == [3.0, 5.0]


def test_patterns_are_not_used_when_nearly_every_subject_has_its_own(small: pd.DataFrame) -> None:
    products = compute_crossproducts(design_of(small, "y ~ x + (x | g)"))  # continuous x: six patterns
    assert group_patterns(products) is None
    patterns = group_patterns(products, max_share=1.0)
    assert patterns is not None and patterns.n_patterns == 6


def test_fit_by_patterns_matches_the_per_subject_deviance_at_its_optimum() -> None:
    design = design_of(same_visits_frame(), "y ~ t + x + (t | g)")
    result = fit_lmm(design, reml=False)
    # The estimates come from the per-subject solve at the optimum the pattern deviance found.
    assert result.deviance == pytest.approx(dense_deviance(design, result.theta, False), rel=1e-10)
    products = compute_crossproducts(design)
    assert profiled_deviance(products, result.theta, False) == pytest.approx(result.deviance, rel=1e-12)


# ------------------------------------------------------------------------- convergence verdicts, scaling


def _quadratic(optimum: np.ndarray, slope: np.ndarray):  # type: ignore[no-untyped-def]
    """A deviance with Hessian 2I whose gradient at ``optimum`` is ``slope``."""
    return lambda theta: float(np.sum((theta - optimum) ** 2) + slope @ (theta - optimum))


def test_the_convergence_check_s_hessian_costs_two_evaluations_a_pair_and_matches_deriv12() -> None:
    from longitudinal.fit.optimize import derivatives

    # A smooth non-quadratic function: both formulas have an O(h²) error; the shared-axes one spends
    # 2k + k(k − 1) evaluations (12 for k = 3) where lme4's deriv12 spends 2k + 2k(k − 1) (18).
    def f(x: np.ndarray) -> float:
        calls.append(1)
        return float(np.exp(0.3 * x[0] - 0.2 * x[1] + 0.1 * x[2]) + x[0] ** 2 * x[1] + np.sin(x[1] * x[2]))

    x = np.array([0.4, -0.7, 1.3])
    e = math.exp(0.3 * x[0] - 0.2 * x[1] + 0.1 * x[2])
    w = np.array([0.3, -0.2, 0.1])
    exact = e * np.outer(w, w)
    exact[0, 0] += 2 * x[1]
    exact[0, 1] += 2 * x[0]
    exact[1, 0] += 2 * x[0]
    s, c = math.sin(x[1] * x[2]), math.cos(x[1] * x[2])
    exact[1, 1] += -s * x[2] ** 2
    exact[2, 2] += -s * x[1] ** 2
    exact[1, 2] += c - s * x[1] * x[2]
    exact[2, 1] = exact[1, 2]
    calls: list[int] = []
    value = f(x)
    results = {}
    for shared in (False, True):
        calls.clear()
        results[shared] = derivatives(f, x, value, shared_axes=shared)
        assert len(calls) == (12 if shared else 18)
        assert results[shared][1] == pytest.approx(exact, abs=1e-6)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)  # the same gradient points


def test_the_gradient_test_does_not_apply_to_a_singular_optimum() -> None:
    from longitudinal.fit.optimize import GRADIENT_TOL, _check_convergence

    layout = layout_theta((2,))  # θ = (l11, l21, l22) of one correlated bar
    slope = np.array([0.0, 0.005, 0.0])  # scaled gradient 0.005 / √2 > 0.002 along l21
    # Inside the cone: lme4 warns "failed to converge".
    inside = np.array([1.0, 0.5, 0.8])
    check = _check_convergence(_quadratic(inside, slope), inside, 0.0, layout)
    assert not check.converged and check.gradient_max > GRADIENT_TOL
    assert check.notes[0].startswith("failed to converge with max|grad| = 0.00354")
    # The same gradient with Λ's last diagonal at 0 (correlation ±1): singular, and lme4's checkConv stops
    # at its singular-fit message. The bar's θ are not locally identified there: none is tested.
    boundary = np.array([1.0, 0.5, 0.0])
    check = _check_convergence(_quadratic(boundary, slope), boundary, 0.0, layout)
    assert check.converged and check.settled and check.notes == () and check.gradient_max == 0.0
    # With a second, regular bar whose gradient is too large: still lme4's verdict (converged, singular),
    # but not ``settled``, so the optimizer restarts once.
    two = layout_theta((2, 1))
    point = np.array([1.0, 0.5, 0.0, 0.7])
    check = _check_convergence(_quadratic(point, np.array([0.0, 0.0, 0.0, 0.005])), point, 0.0, two)
    assert check.converged and not check.settled and check.gradient_max > GRADIENT_TOL
    # A correlation of 0.9995 with a diagonal above 1e-4 is on the boundary as well.
    nearly = np.array([1.0, 30.0, 30.0 * math.sqrt(1 / 0.9995 ** 2 - 1)])
    assert _check_convergence(_quadratic(nearly, slope), nearly, 0.0, layout).converged


def test_the_singular_message_names_the_zero_variance_or_the_pair_at_plus_or_minus_one() -> None:
    from longitudinal.fit.theta import singular_message

    frame = pd.DataFrame({"y": np.arange(8.0), "t": np.tile([0.0, 1.0], 4), "g": list("aabbccdd")})
    design = design_of(frame, "y ~ t + (t | g)")
    layout = layout_theta((2,))
    ones = (np.ones(2),)
    zero_slope = (np.array([[4.0, 0.0], [0.0, 0.0]]),)
    assert singular_message(design, layout, np.array([2.0, 0.0, 0.0]), zero_slope, 1.0, ones) == (
        "boundary (singular) fit: the variance of 't' for g is zero")
    perfectly_negative = (np.array([[4.0, -2.0], [-2.0, 1.0]]),)
    assert singular_message(design, layout, np.array([2.0, -1.0, 0.0]), perfectly_negative, 1.0, ones) == (
        "boundary (singular) fit: the correlation of '(Intercept)' and 't' for g is -1")


def test_an_outcome_far_from_zero_is_neither_an_exact_fit_nor_a_convergence_warning() -> None:
    # Reaction + 1e6: the exact-fit check compares residuals with the outcome's SD, not its RMS, and the
    # fit on the standardized outcome converges as the original does (before: max|grad| 0.0073, not converged).
    frame = read_sleepstudy()
    base = fit_lmm(design_of(frame, "Reaction ~ Days + (Days | Subject)"), reml=False)
    moved = fit_lmm(design_of(frame.assign(Reaction=frame.Reaction + 1e6), "Reaction ~ Days + (Days | Subject)"),
                    reml=False)
    assert moved.converged and base.converged
    assert moved.loglik == pytest.approx(base.loglik, abs=1e-7)
    assert moved.beta == pytest.approx(base.beta + [1e6, 0.0], rel=1e-12)
    assert moved.theta == pytest.approx(base.theta, rel=1e-5)


def test_standardization_maps_are_exact_inverses_of_the_column_changes() -> None:
    from longitudinal.fit.scaling import standardize

    frame = read_sleepstudy().assign(Days=lambda d: d.Days * 86400.0 + 1.7e9)
    design = design_of(frame, "Reaction ~ Days + (Days | Subject)")
    standardized, s = standardize(design)
    np.testing.assert_allclose(design.X @ s.fixed_map, standardized.X, atol=1e-12)
    np.testing.assert_allclose(design.blocks[0].Z @ s.ranef_maps[0], standardized.blocks[0].Z, atol=1e-12)
    np.testing.assert_allclose(standardized.y * s.y_scale + s.y_shift, design.y, rtol=1e-14)
    assert abs(standardized.X[:, 1].mean()) < 1e-12 and standardized.X[:, 1].std() == pytest.approx(1.0)
    # Λ re-triangularized: lower triangular, diagonal ≥ 0, and the same Λ Λ' — also when singular.
    for lam in (np.array([[1.2, 0.0], [-0.4, 0.7]]), np.array([[0.0, 0.0], [0.9, 0.0]])):
        restored = s.relative_factor(0, lam)
        B = s.ranef_maps[0]
        assert restored[0, 1] == 0.0 and np.all(np.diagonal(restored) >= 0.0)
        np.testing.assert_allclose(restored @ restored.T, B @ lam @ lam.T @ B.T, rtol=1e-12, atol=1e-30)


def test_fitting_leaves_the_design_as_it_was() -> None:
    # The standardized copy is worked on in place; the design given (one-column bars included) is not.
    frame = read_sleepstudy().assign(Days=lambda d: d.Days + 100.0)
    design = design_of(frame, "Reaction ~ Days + (Days || Subject)")
    before = [design.y.copy(), design.X.copy(), *(block.Z.copy() for block in design.blocks)]
    fit_lmm(design, reml=False)
    after = [design.y, design.X, *(block.Z for block in design.blocks)]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_a_theta_stopped_just_short_of_a_better_boundary_moves_onto_it() -> None:
    from longitudinal.fit.optimize import _snap_to_boundary

    # Flat toward the bound, as an intercept variance far from time zero: BOBYQA stopped at 0.004 where
    # the deviance at 0 is 3e-8 lower (the case of BodyWeight with time in epoch seconds and (t || Rat)).
    def deviance(theta: np.ndarray) -> float:
        return 100.0 + 3e-8 * float(theta[0] > 0) + (theta[1] - 1.0) ** 2

    lower = np.array([0.0, 0.0])
    theta, value = _snap_to_boundary(deviance, np.array([0.004, 1.0]), deviance(np.array([0.004, 1.0])), lower)
    assert theta.tolist() == [0.0, 1.0] and value == 100.0
    # Never to a worse point, and never from far away (0.5 is an interior optimum, not a stalled boundary).
    rising = lambda t: 100.0 - float(t[0] > 0) * 1e-8  # noqa: E731
    assert _snap_to_boundary(rising, np.array([0.004, 1.0]), rising(np.array([0.004, 1.0])), lower)[0].tolist() == [0.004, 1.0]
    assert _snap_to_boundary(deviance, np.array([0.5, 1.0]), deviance(np.array([0.5, 1.0])), lower)[0].tolist() == [0.5, 1.0]


# ---------------------------------------------- BOBYQA's stop, the restart and the Hessian notes, driven


def _kinked(corner: tuple[float, float], weights: tuple[float, float]):  # type: ignore[no-untyped-def]
    """A deviance with its minimum on a kink, which BOBYQA's quadratic model cannot represent: BOBYQA stops
    where its model says it is done, and the central-difference gradient there is ±1 (times the weight)."""
    return lambda theta: float(weights[0] * abs(theta[0] - corner[0]) + weights[1] * abs(theta[1] - corner[1]))


def _recording_starts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every BOBYQA run's (start, stop), recorded around the engine's own ``run_bobyqa``."""
    import longitudinal.fit.optimize as optimize

    runs: list[tuple[np.ndarray, np.ndarray]] = []
    real = optimize.run_bobyqa

    def recorded(deviance, start, lower, **options):  # type: ignore[no-untyped-def]
        theta, value, evaluations, status = real(deviance, start, lower, **options)
        runs.append((start.copy(), theta.copy()))
        return theta, value, evaluations, status

    monkeypatch.setattr(optimize, "run_bobyqa", recorded)
    return runs


def test_an_optimum_failing_the_gradient_test_is_restarted_near_it_and_the_better_run_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from longitudinal.fit.optimize import DERIVATIVE_STEP, minimize_deviance

    runs = _recording_starts(monkeypatch)
    layout = layout_theta((1, 1))
    best, attempts = minimize_deviance(_kinked((1.5, 1.234), (1.0, 5.0)), layout)
    assert [a.optimizer for a in attempts] == ["bobyqa", "bobyqa (restart)"]
    first, restart = attempts
    # BOBYQA's first stop is off the kink by more than the derivative step: lme4 would warn, and so does
    # the attempt (the piecewise-linear deviance has no curvature either, noted after the gradient).
    assert not first.converged
    assert first.message.startswith("failed to converge with max|grad| = 1 (tol = 0.002); ")
    assert restart.converged and restart.message == ""
    # The restart starts from the first stop with the variances lifted by 10% (at least to 0.05).
    (start, stop), (restart_start, _) = runs
    np.testing.assert_array_equal(start, layout.start())
    np.testing.assert_allclose(restart_start, np.maximum(stop * 1.1, 0.05), rtol=1e-15)
    # The restart's optimum is lower, and it is the one kept.
    assert restart.loglik > first.loglik
    assert best.converged and best.deviance == pytest.approx(-2 * restart.loglik, abs=1e-15)
    assert best.theta == pytest.approx([1.5, 1.234], abs=DERIVATIVE_STEP)  # within a derivative step of the kink


def test_when_the_restart_does_worse_the_lowest_deviance_is_kept_with_its_warning() -> None:
    from longitudinal.fit.optimize import minimize_deviance

    best, attempts = minimize_deviance(_kinked((2.345, 1.234), (1.0, 10.0)), layout_theta((1, 1)))
    assert [a.optimizer for a in attempts] == ["bobyqa", "bobyqa (restart)"]
    assert not any(a.converged for a in attempts)
    assert attempts[0].loglik > attempts[1].loglik  # the restart went further astray
    assert best.deviance == pytest.approx(-2 * attempts[0].loglik, abs=1e-15)
    assert not best.converged and best.message.startswith("failed to converge with max|grad| = 1 (tol = 0.002)")


def test_a_settled_optimum_is_not_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    from longitudinal.fit.optimize import minimize_deviance

    runs = _recording_starts(monkeypatch)
    best, attempts = minimize_deviance(lambda t: float((t[0] - 2.0) ** 2 + 3.0 * (t[1] - 0.5) ** 2), layout_theta((1, 1)))
    assert [a.optimizer for a in attempts] == ["bobyqa"] and len(runs) == 1
    assert best.converged and best.settled and best.message == ""
    assert best.theta == pytest.approx([2.0, 0.5], abs=1e-6)


@pytest.mark.parametrize("deviance, point, converged, settled, notes", [
    pytest.param(lambda t: (t[0] - 1) ** 2 - (t[1] - 1) ** 2, [1.0, 1.0], False, True,
                 ("unable to evaluate the scaled gradient (Hessian not positive definite)",
                  "failed to converge: degenerate Hessian with 1 negative eigenvalue"), id="saddle"),
    pytest.param(lambda t: -(t[0] - 1) ** 2 - (t[1] - 1) ** 2 + (t[2] - 1) ** 2, [1.0, 1.0, 1.0], False, True,
                 ("unable to evaluate the scaled gradient (Hessian not positive definite)",
                  "failed to converge: degenerate Hessian with 2 negative eigenvalues"), id="two-negative"),
    pytest.param(lambda t: (t[0] - 1) ** 2 - (t[1] - 1) ** 2 + 0.01 * (t[0] - 1), [1.0, 1.0], False, False,
                 ("failed to converge with max|grad| = 0.01 (tol = 0.002)",
                  "unable to evaluate the scaled gradient (Hessian not positive definite)",
                  "failed to converge: degenerate Hessian with 1 negative eigenvalue"), id="saddle-with-a-slope"),
    pytest.param(lambda t: (t[0] - 2) ** 2, [2.0, 0.7], True, True,
                 ("unable to evaluate the scaled gradient (Hessian not positive definite)",
                  "Hessian is numerically singular: parameters are not uniquely determined"), id="zero-eigenvalue"),
    pytest.param(lambda t: (t[0] - 2) ** 2 + 1e-7 * (t[1] - 0.7) ** 2, [2.0, 0.7], True, True,
                 ("Hessian is numerically singular: parameters are not uniquely determined",), id="near-zero-eigenvalue"),
])
def test_the_hessian_notes_say_what_is_wrong_with_the_curvature(deviance, point, converged, settled, notes) -> None:  # type: ignore[no-untyped-def]
    from longitudinal.fit.optimize import _check_convergence

    theta = np.array(point)
    check = _check_convergence(lambda t: float(deviance(t)), theta, float(deviance(theta)), layout_theta((1,) * len(point)))
    # As lme4's checkHess: negative eigenvalues fail the fit ("Model failed to converge: degenerate Hessian",
    # code -3); a numerically singular Hessian (code -4) is a note only. The gradient alone decides whether
    # the optimizer settled (and so whether a restart is tried).
    assert (check.converged, check.settled) == (converged, settled)
    assert check.notes == notes


def test_an_unidentified_parameter_at_bobyqas_stop_is_noted_on_the_attempt() -> None:
    from longitudinal.fit.optimize import minimize_deviance

    # θ₂ does not enter the deviance: BOBYQA stops with a settled gradient and a zero Hessian eigenvalue.
    best, attempts = minimize_deviance(lambda t: float((t[0] - 2.0) ** 2), layout_theta((1, 1)))
    (attempt,) = attempts
    assert attempt.converged and best.converged
    assert attempt.message == best.message == (
        "unable to evaluate the scaled gradient (Hessian not positive definite); "
        "Hessian is numerically singular: parameters are not uniquely determined")


@pytest.fixture(scope="module")
def irregular() -> pd.DataFrame:
    """500 subjects with 2-9 visits at irregular times (no two share Z_g'Z_g) and three covariates."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(2, 10, size=500)
    g = np.repeat([f"s{i:03d}" for i in range(sizes.size)], sizes)
    t = np.concatenate([np.sort(rng.uniform(0, 12, size=k)) for k in sizes])
    x, w = rng.normal(size=g.size), rng.uniform(0, 2, size=g.size)
    b = rng.normal(size=(sizes.size, 2)).repeat(sizes, axis=0)
    y = 1.0 + 0.5 * x - w + 0.3 * t + b[:, 0] + 0.2 * b[:, 1] * t + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "w": w, "t": t, "g": g})


@pytest.mark.parametrize("formula", [
    "y ~ x + w + t + (t | g)", "y ~ x + w + (1 | g) + (0 + t | g)", "y ~ x + w + (0 + t | g)", "y ~ x * t + (1 | g)",
])
@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_the_optimizers_blocked_sums_are_factor_groups(irregular: pd.DataFrame, formula: str, block: int) -> None:
    # The optimizer's evaluations (GroupGram) give factor_groups' log|M| and Σ R_g'R_g with the sums in
    # another order: blocks of one group, several with a remainder (500 = 7 · 71 + 3), one for all; call
    # after call into the same buffers, with and without a random-effect correlation, Λ over four decades.
    products = compute_crossproducts(design_of(irregular, formula))
    q = products.n_random
    gram = GroupGram(products.ZtZ, products.ZtXy, block=block)
    rng = np.random.default_rng(3)
    for k in range(30):
        lam = np.tril(rng.normal(size=(q, q)) * 10.0 ** rng.uniform(-3, 1))
        lam[np.diag_indices(q)] = np.abs(np.diagonal(lam))
        if k % 3 == 0 and q == 2:
            lam[1, 0] = 0.0
        _, R, logdet = factor_groups(products.ZtZ, products.ZtXy, lam)
        flat = R.reshape(-1, R.shape[2])
        logdet_b, RtR_b = gram.at(lam)
        assert logdet_b == pytest.approx(logdet, rel=1e-13, abs=1e-12)
        np.testing.assert_allclose(RtR_b, flat.T @ flat, rtol=1e-12, atol=1e-12 * np.abs(flat.T @ flat).max())


def test_blocked_sums_take_one_or_two_random_effects() -> None:
    with pytest.raises(ValueError, match="1 or 2 random effects per group, not 3"):
        GroupGram(np.zeros((3, 3, 4)), np.zeros((3, 4, 2)))


@pytest.mark.parametrize("formula", ["y ~ x + w + t + (t | g)", "y ~ x + w + (t || g)", "y ~ x + t + (1 | g)"])
def test_fits_with_blocked_sums_are_those_of_the_per_group_solve(irregular: pd.DataFrame, formula: str) -> None:
    # The deviance the optimizer minimizes (blocked) and the one of the estimates (per group) are one function.
    from longitudinal.fit.lmm.onefactor import gram_deviance, solve_at

    products = compute_crossproducts(design_of(irregular, formula))
    layout = layout_theta(products.block_sizes)
    gram = GroupGram(products.ZtZ, products.ZtXy, block=64)
    for reml in (False, True):
        for theta in (layout.start(), 0.3 * layout.start() + 0.05):
            lam = layout.lambda_matrix(theta)
            solution = solve_at(products, lam, reml)
            assert solution is not None
            assert gram_deviance(products, gram, lam, reml) == pytest.approx(solution.deviance, rel=1e-13)


def test_the_blas_thread_limit_reaches_numpys_openblas() -> None:
    import ctypes
    from pathlib import Path

    from longitudinal.fit.blas import limit_blas_threads

    mapped = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if "openblas" in line.lower() and "numpy" in line]
    if not mapped:
        pytest.skip("numpy is not linked to a bundled OpenBLAS here")
    getter = ctypes.CDLL(mapped[0]).scipy_openblas_get_num_threads64_
    assert limit_blas_threads(1) and getter() == 1
