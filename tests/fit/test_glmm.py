"""The GLMM engine (``longitudinal.fit.glmm``): its deviance against the likelihood written from its definition,
its fits against glmer's and glmmTMB's (each number with the R call that made it), units, and its refusals.

glmer's default PIRLS tolerance (tolPwrss = 1e-7) evaluates log|L|² with the working weights of the step
before the last, so its default logLik and estimates are off the Laplace approximation by up to a few 1e-3
(cbpp: 2.8e-4 in logLik, 0.03 relative in the SEs); the R numbers here are glmer's with tolPwrss = 1e-12
and bobyqa for both stages (``tight`` below), and glmmTMB's, which evaluates the Laplace approximation
exactly (its Hessian by automatic differentiation):

    tight <- glmerControl(tolPwrss = 1e-12, optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
    s <- read.csv("tests/fixtures/sleepstudy.csv"); s$Subject <- factor(s$Subject)
    s$slow <- as.numeric(s$Reaction > 300); s$count <- round(s$Reaction / 10)
    cbpp_rows <- lme4::cbpp expanded to one 0/1 row per animal (``cbpp_rows()`` below)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize, stats

from longitudinal.errors import ConfigError
from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.failure import FitFailure
from longitudinal.fit.glmm import fit_glmm, glmm_deviance
from longitudinal.fit.theta import layout_theta
from longitudinal.model.design import Design, build_design
from longitudinal.model.formula import parse_formula
from longitudinal.records import EngineResult
from reference_data import read_sleepstudy

#: lme4::cbpp: herd, period, incidence, size (56 rows).
CBPP = [
    (1, 1, 2, 14), (1, 2, 3, 12), (1, 3, 4, 9), (1, 4, 0, 5), (2, 1, 3, 22), (2, 2, 1, 18), (2, 3, 1, 21),
    (3, 1, 8, 22), (3, 2, 2, 16), (3, 3, 0, 16), (3, 4, 2, 20), (4, 1, 2, 10), (4, 2, 0, 10), (4, 3, 2, 9),
    (4, 4, 0, 6), (5, 1, 5, 18), (5, 2, 0, 25), (5, 3, 0, 24), (5, 4, 1, 4), (6, 1, 3, 17), (6, 2, 0, 17),
    (6, 3, 0, 18), (6, 4, 1, 20), (7, 1, 8, 16), (7, 2, 1, 10), (7, 3, 3, 9), (7, 4, 0, 5), (8, 1, 12, 34),
    (9, 1, 2, 9), (9, 2, 0, 6), (9, 3, 0, 8), (9, 4, 0, 6), (10, 1, 1, 22), (10, 2, 1, 22), (10, 3, 0, 18),
    (10, 4, 2, 22), (11, 1, 0, 25), (11, 2, 5, 27), (11, 3, 3, 22), (11, 4, 1, 22), (12, 1, 2, 10),
    (12, 2, 1, 8), (12, 3, 0, 6), (12, 4, 0, 5), (13, 1, 1, 21), (13, 2, 2, 24), (13, 3, 0, 19),
    (13, 4, 0, 23), (14, 1, 11, 19), (14, 2, 0, 2), (14, 3, 0, 3), (14, 4, 0, 2), (15, 1, 1, 19),
    (15, 2, 1, 15), (15, 3, 1, 15), (15, 4, 0, 15),
]


def design_of(frame: pd.DataFrame, formula: str) -> Design:
    return build_design(frame, parse_formula(formula))


@pytest.fixture(scope="module")
def sleep() -> pd.DataFrame:
    """sleepstudy with a binary outcome (``slow``: Reaction > 300 ms) and a count (``count``: Reaction / 10)."""
    frame = read_sleepstudy()
    return frame.assign(slow=(frame["Reaction"] > 300).astype(float), count=np.round(frame["Reaction"] / 10))


def cbpp_rows() -> pd.DataFrame:
    """lme4's cbpp with one 0/1 row per animal (842 rows): herd and period as text."""
    rows = [(str(herd), str(period), 1.0 if k < incidence else 0.0)
            for herd, period, incidence, size in CBPP for k in range(size)]
    return pd.DataFrame(rows, columns=["herd", "period", "y"])


@pytest.fixture(scope="module")
def tiny() -> pd.DataFrame:
    """Seven subjects of 3-6 visits with a continuous covariate, a 0/1 and a count outcome: small enough for
    the definitions below (one numerical optimization or integral per subject)."""
    rng = np.random.default_rng(14)
    sizes = [3, 5, 4, 6, 3, 5, 4]
    g = np.repeat([f"s{i}" for i in range(len(sizes))], sizes)
    x = rng.normal(size=g.size)
    t = np.concatenate([np.arange(k) for k in sizes]).astype(float)
    b = np.repeat(rng.normal(scale=0.8, size=len(sizes)), sizes)
    eta = -0.3 + 0.6 * x + 0.2 * t + b
    return pd.DataFrame({
        "g": g, "x": x, "t": t, "h": np.tile(["a", "b", "c"], g.size)[:g.size],
        "y": (rng.random(g.size) < 1 / (1 + np.exp(-eta))).astype(float),
        "n": rng.poisson(np.exp(0.5 + 0.3 * x + 0.5 * b)).astype(float),
    })


# ----------------------------------------------------------------------------- definitions (no engine)


def log_density(family: str, y: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """log p(y | η) from scipy's distributions (Poisson's includes −log y!)."""
    if family == "binomial":
        return stats.bernoulli.logpmf(y, 1 / (1 + np.exp(-eta)))
    return stats.poisson.logpmf(y, np.exp(eta))


def laplace_by_definition(design: Design, family: str, theta: np.ndarray, beta: np.ndarray) -> float:
    """The Laplace deviance Σ_g [−2 log p(y_g | û_g) + |û_g|² + log|I + ΛᵀZ_gᵀW_gZ_gΛ|], û_g found by a general
    optimizer subject by subject, W = μ(1 − μ) or μ at û_g (one grouping factor)."""
    lam = layout_theta(tuple(len(b.terms) for b in design.blocks)).lambda_matrix(theta)
    Z, total = design.Z, 0.0
    for g in range(design.n_groups):
        rows = design.codes == g
        ZL, offset, y = Z[rows] @ lam, design.X[rows] @ beta, design.y[rows]

        def penalized(u: np.ndarray) -> float:
            return float(-2 * log_density(family, y, offset + ZL @ u).sum() + u @ u)

        u = optimize.minimize(penalized, np.zeros(lam.shape[0]), method="BFGS", options={"gtol": 1e-12}).x
        mu = 1 / (1 + np.exp(-(offset + ZL @ u))) if family == "binomial" else np.exp(offset + ZL @ u)
        w = mu * (1 - mu) if family == "binomial" else mu
        total += penalized(u) + np.linalg.slogdet(np.eye(lam.shape[0]) + ZL.T @ (w[:, None] * ZL))[1]
    return total


def integral_by_definition(design: Design, family: str, theta: float, beta: np.ndarray) -> float:
    """−2 log Π_g ∫ p(y_g | Xβ + θ z b) φ(b) db for one scalar random effect, each integral by adaptive
    quadrature (scipy's quad) around the integrand's peak."""
    total = 0.0
    z = design.Z[:, 0]
    for g in range(design.n_groups):
        rows = design.codes == g
        offset, y, zg = design.X[rows] @ beta, design.y[rows], z[rows]

        def log_integrand(b: float) -> float:
            return float(log_density(family, y, offset + theta * zg * b).sum() + stats.norm.logpdf(b))

        peak = optimize.minimize_scalar(lambda b: -log_integrand(b)).x
        top = log_integrand(peak)
        value, _ = integrate.quad(lambda b: math.exp(log_integrand(b) - top), peak - 12, peak + 12,
                                  epsabs=0, epsrel=1e-12, limit=200)
        total += -2 * (top + math.log(value))
    return total


def fitted_engine(frame: pd.DataFrame, formula: str, family: str, nagq: int = 1) -> EngineResult:
    return fit_glmm(design_of(frame, formula), family=family, nagq=nagq)


def standard_errors(result: EngineResult) -> np.ndarray:
    return np.sqrt(np.diagonal(result.vcov))


# ------------------------------------------------------------------------------------------ the deviance


@pytest.mark.parametrize(("formula", "family", "theta"), [
    ("y ~ x + t + (1 | g)", "binomial", [1.3]),
    ("y ~ x + (t | g)", "binomial", [1.1, -0.3, 0.4]),
    ("n ~ x + t + (1 | g)", "poisson", [0.7]),
    ("n ~ x + (t | g)", "poisson", [0.6, 0.2, 0.3]),
    ("y ~ x + (t || g)", "binomial", [0.9, 0.0]),  # a variance on the boundary
])
def test_laplace_deviance_is_its_definition(tiny: pd.DataFrame, formula: str, family: str, theta: list[float]) -> None:
    design = design_of(tiny, formula)
    beta = np.linspace(-0.4, 0.5, design.X.shape[1])
    expected = laplace_by_definition(design, family, np.asarray(theta), beta)
    assert glmm_deviance(design, np.asarray(theta), beta, family=family) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(("formula", "family", "theta"), [
    ("y ~ x + t + (1 | g)", "binomial", 1.2),
    ("n ~ x + (0 + t | g)", "poisson", 0.4),  # a scalar random slope; larger θ makes the integrand far from normal
])
def test_quadrature_deviance_is_the_integral(tiny: pd.DataFrame, formula: str, family: str, theta: float) -> None:
    # 25 adaptive Gauss-Hermite points (lme4's most) integrate these subjects' likelihoods to 1e-8; one point
    # is the Laplace approximation, and more points come closer.
    design = design_of(tiny, formula)
    beta = np.linspace(0.3, -0.2, design.X.shape[1])
    exact = integral_by_definition(design, family, theta, beta)
    errors = [abs(glmm_deviance(design, np.array([theta]), beta, family=family, nagq=k) - exact) for k in (1, 10, 25)]
    assert errors[2] < 1e-7
    assert errors[0] > errors[1] > errors[2]
    laplace = glmm_deviance(design, np.array([theta]), beta, family=family, nagq=1)
    assert laplace == pytest.approx(laplace_by_definition(design, family, np.array([theta]), beta), abs=1e-7)


def test_crossed_deviance_is_its_definition(tiny: pd.DataFrame) -> None:
    """Two crossed factors: the sparse path's deviance against a joint optimization over all random effects."""
    design = design_of(tiny, "y ~ x + (1 | g) + (1 | h)")
    theta, beta = np.array([1.1, 0.7]), np.array([-0.2, 0.5])
    ZL = np.column_stack([
        theta[k] * (block.codes[:, None] == np.arange(block.n_levels)[None, :]) for k, block in enumerate(design.blocks)
    ])
    offset = design.X @ beta

    def penalized(u: np.ndarray) -> float:
        return float(-2 * log_density("binomial", design.y, offset + ZL @ u).sum() + u @ u)

    u = optimize.minimize(penalized, np.zeros(ZL.shape[1]), method="BFGS", options={"gtol": 1e-12}).x
    mu = 1 / (1 + np.exp(-(offset + ZL @ u)))
    expected = penalized(u) + np.linalg.slogdet(np.eye(ZL.shape[1]) + ZL.T @ ((mu * (1 - mu))[:, None] * ZL))[1]
    assert glmm_deviance(design, theta, beta, family="binomial") == pytest.approx(expected, abs=1e-7)


def test_poisson_loglik_includes_log_factorials(tiny: pd.DataFrame) -> None:
    # glmer's Laplace logLik has the full Poisson density: counts shifted by a constant factor in the data
    # would change it by −Σ log y! terms; here: the deviance minus the definition without them is 2 Σ log y!.
    design = design_of(tiny, "n ~ x + (1 | g)")
    theta, beta = np.array([0.5]), np.array([0.4, 0.3])
    with_factorials = glmm_deviance(design, theta, beta, family="poisson")
    assert with_factorials == pytest.approx(laplace_by_definition(design, "poisson", theta, beta), abs=1e-7)
    log_factorials = float(np.sum([math.lgamma(v + 1) for v in design.y]))
    assert log_factorials > 1.0
    eta_only = with_factorials - 2 * log_factorials  # the deviance of y log μ − μ alone
    assert eta_only < with_factorials


def test_duplicated_subjects_count_twice(tiny: pd.DataFrame) -> None:
    # Subjects with identical rows are fitted once and counted: the data twice over (new identifiers) has twice
    # the deviance at every (θ, β) and the same estimates.
    twice = pd.concat([tiny, tiny.assign(g=tiny["g"] + "_copy")], ignore_index=True)
    one, two = design_of(tiny, "y ~ x + (t | g)"), design_of(twice, "y ~ x + (t | g)")
    theta, beta = np.array([0.8, 0.1, 0.3]), np.array([-0.1, 0.4])
    assert glmm_deviance(two, theta, beta, family="binomial") == pytest.approx(
        2 * glmm_deviance(one, theta, beta, family="binomial"), rel=1e-12)
    fit_one, fit_two = fit_glmm(one, family="binomial", nagq=1), fit_glmm(two, family="binomial", nagq=1)
    assert fit_two.deviance == pytest.approx(2 * fit_one.deviance, abs=1e-5)
    np.testing.assert_allclose(fit_two.beta, fit_one.beta, atol=1e-4)
    originals = np.flatnonzero(~pd.Series(two.levels).str.endswith("_copy").to_numpy())
    np.testing.assert_allclose(fit_two.modes[originals], fit_one.modes, atol=1e-3)


# --------------------------------------------------------------------------------- fits against R


@pytest.mark.parametrize("case", [
    # R: glmer(slow ~ Days + (1 | Subject), s, binomial, control = tight);  glmmTMB(same): logLik -87.16310284
    dict(formula="slow ~ Days + (1 | Subject)", family="binomial", nagq=1, loglik=-87.16310284,
         beta=[-3.1954559536, 0.5852275065], se=[0.68539596443, 0.09805540791], sd=[1.735496841]),
    # R: glmer(slow ~ Days + (Days | Subject), s, binomial, control = tight);  glmmTMB: logLik -85.56886902,
    # SDs 2.03483 and 0.35719, correlation -0.539
    dict(formula="slow ~ Days + (Days | Subject)", family="binomial", nagq=1, loglik=-85.56886902,
         beta=[-3.5187492985, 0.6662466677], se=[0.9078521842, 0.1619461609], sd=[2.0348243848, 0.35719]),
    # R: glmer(slow ~ Days + (1 | Subject), s, binomial, nAGQ = 25, control = tight)
    dict(formula="slow ~ Days + (1 | Subject)", family="binomial", nagq=25, loglik=-86.99042207,
         beta=[-3.1958014635, 0.5849213663], se=[0.68936832423, 0.09817878387], sd=[1.759697037]),
    # R: glmer(count ~ Days + (1 | Subject), s, poisson, nAGQ = 10, control = tight): logLik -46.13710309 on
    # glmer's AGQ scale, + sum(dpois(count, count, log = TRUE)) = -470.00911707 puts it on the Laplace scale
    dict(formula="count ~ Days + (1 | Subject)", family="poisson", nagq=10, loglik=-46.13710309 - 470.00911707,
         beta=[3.22470096941, 0.03547736454], se=[0.037984846229, 0.004765217638], sd=[0.1148195014]),
])
def test_fit_matches_glmer(sleep: pd.DataFrame, case: dict[str, Any]) -> None:
    result = fitted_engine(sleep, case["formula"], case["family"], case["nagq"])
    assert result.loglik == pytest.approx(case["loglik"], abs=2e-6)
    np.testing.assert_allclose(result.beta, case["beta"], rtol=2e-5)
    np.testing.assert_allclose(standard_errors(result), case["se"], rtol=2e-4)
    sds = [math.sqrt(cov[i, i]) for cov in result.covariances for i in range(cov.shape[0])]
    np.testing.assert_allclose(sds, case["sd"], rtol=1e-4)
    assert result.converged and not result.singular and result.messages == ()
    assert result.sigma == 1.0 and not result.reml


def test_fit_goes_past_glmer_where_it_stops_short(sleep: pd.DataFrame) -> None:
    # R: glmer(count ~ Days + (Days | Subject), s, poisson, control = tight) stops at a singular fit with
    # logLik -516.91927954 (intercept SD 0); glmmTMB(same) reaches -514.25598908 with the correlation at 1,
    # fixed effects 3.22960702117, 0.03435467003 (SEs 0.030993888426, 0.005366795318) and SDs 0.066681, 0.010182.
    result = fitted_engine(sleep, "count ~ Days + (Days | Subject)", "poisson")
    assert result.loglik > -514.25598908 - 1e-6
    np.testing.assert_allclose(result.beta, [3.22960702117, 0.03435467003], rtol=1e-5)
    np.testing.assert_allclose(standard_errors(result), [0.030993888426, 0.005366795318], rtol=2e-3)
    assert result.singular
    assert result.messages[0] == ("boundary (singular) fit: the correlation of '(Intercept)' and 'Days' for "
                                  "Subject is 1")


@pytest.mark.parametrize("case", [
    # R: glmer(y ~ period + (1 | herd), cbpp_rows, binomial, control = tight); glmmTMB: -277.50194155
    dict(formula="y ~ period + (1 | herd)", loglik=-277.50194156,
         beta=[-1.3985324209, -0.9923328212, -1.1286722767, -1.5803137529],
         se=[0.2324688770, 0.3066387349, 0.3266339781, 0.4274321839], sd={"herd": 0.6422617073}),
    # R: glmer(y ~ period + (1 | herd/period), cbpp_rows, binomial, control = tight); glmmTMB: -272.79481523
    # (glmer's theta lists period:herd first: lme4 orders factors by their number of levels)
    dict(formula="y ~ period + (1 | herd/period)", loglik=-272.79481523,
         beta=[-1.500289349, -1.226500811, -1.328829862, -1.866251786],
         se=[0.2966995754, 0.4802739519, 0.4938826212, 0.5935565229],
         sd={"herd": 0.1839597225, "herd:period": 0.8910685256}),
])
def test_nested_fit_matches_glmer(case: dict[str, Any]) -> None:
    design = design_of(cbpp_rows(), case["formula"])
    result = fit_glmm(design, family="binomial", nagq=1)
    assert result.loglik == pytest.approx(case["loglik"], abs=2e-6)
    np.testing.assert_allclose(result.beta, case["beta"], rtol=2e-5)
    np.testing.assert_allclose(standard_errors(result), case["se"], rtol=2e-4)
    sds = {block.group: math.sqrt(cov[0, 0]) for block, cov in zip(design.blocks, result.covariances)}
    assert sds == pytest.approx(case["sd"], rel=2e-4)
    assert [f.group for f in result.ranef] == [block.group for block in design.blocks]
    assert result.ranef[-1].modes.shape == (design.blocks[-1].n_levels, 1)


def test_nested_modes_and_their_sds_match_glmer() -> None:
    # R: as.data.frame(ranef(glmer(y ~ period + (1 | herd/period), cbpp_rows, binomial, control = tight),
    # condVar = TRUE)): condval and condsd of herds 1-3, and of period 1 in herds 1-3 (lme4's "1:2" is period 1
    # of herd 2, our "2:1")
    design = design_of(cbpp_rows(), "y ~ period + (1 | herd/period)")
    result = fit_glmm(design, family="binomial", nagq=1)
    factors = {f.group: f for f in result.ranef}
    expected = {
        ("herd", "1"): (0.08968751978, 0.1772015386), ("herd", "2"): (-0.01418722243, 0.1780665236),
        ("herd", "3"): (0.05267531841, 0.1762244463), ("herd:period", "1:1"): (-0.2248509722, 0.5716970073),
        ("herd:period", "2:1"): (-0.2257333955, 0.5116338041), ("herd:period", "3:1"): (0.7080605725, 0.4292135921),
    }
    for (group, level), (mode, sd) in expected.items():
        at = list(factors[group].levels).index(level)
        assert factors[group].modes[at, 0] == pytest.approx(mode, abs=2e-4), (group, level)
        assert factors[group].cond_sd[at, 0] == pytest.approx(sd, rel=1e-4), (group, level)


# ----------------------------------------------------------------------------------- the estimates


def test_modes_and_their_sds_are_the_laplace_ones(tiny: pd.DataFrame) -> None:
    # b̂_g = θ û_g maximizes the subject's joint density, and its conditional SD is θ / sqrt(1 + θ² Σ w z²).
    design = design_of(tiny, "y ~ x + t + (1 | g)")
    result = fit_glmm(design, family="binomial", nagq=1)
    theta = float(result.theta[0])
    for g in range(design.n_groups):
        rows = design.codes == g
        offset, y = design.X[rows] @ result.beta, design.y[rows]
        u = optimize.minimize_scalar(
            lambda v: -2 * log_density("binomial", y, offset + theta * v).sum() + v * v).x
        mu = 1 / (1 + np.exp(-(offset + theta * u)))
        assert result.modes[g, 0] == pytest.approx(theta * u, abs=1e-6)
        assert result.cond_sd[g, 0] == pytest.approx(theta / math.sqrt(1 + theta**2 * np.sum(mu * (1 - mu))), rel=1e-6)
    eta = design.X @ result.beta + result.modes[design.codes, 0]
    np.testing.assert_allclose(result.fitted, 1 / (1 + np.exp(-eta)), rtol=1e-12)
    np.testing.assert_allclose(result.residuals, design.y - result.fitted, rtol=1e-12)


def test_units_do_not_matter(sleep: pd.DataFrame) -> None:
    # Days as epoch seconds (and a fixed effect × 1e6): the same likelihood, so the same logLik, and estimates
    # that map back exactly; the deviance at the reported (θ, β) on the design as given is the fit's.
    seconds = sleep.assign(Days=sleep["Days"] * 86400.0 + 1.7e9)
    days = fitted_engine(sleep, "slow ~ Days + (Days | Subject)", "binomial")
    epoch = fitted_engine(seconds, "slow ~ Days + (Days | Subject)", "binomial")
    assert epoch.loglik == pytest.approx(days.loglik, abs=1e-6)
    assert epoch.beta[1] * 86400 == pytest.approx(days.beta[1], rel=1e-5)
    assert epoch.beta[0] + epoch.beta[1] * 1.7e9 == pytest.approx(days.beta[0], abs=1e-4)
    slope_sd = [math.sqrt(fit.covariances[0][1, 1]) for fit in (epoch, days)]
    assert slope_sd[0] * 86400 == pytest.approx(slope_sd[1], rel=1e-4)
    assert standard_errors(epoch)[1] * 86400 == pytest.approx(standard_errors(days)[1], rel=1e-3)
    np.testing.assert_allclose(epoch.fitted, days.fitted, atol=1e-5)
    design = design_of(seconds, "slow ~ Days + (Days | Subject)")
    assert glmm_deviance(design, epoch.theta, epoch.beta, family="binomial") == pytest.approx(epoch.deviance, abs=1e-5)


def test_singular_fit_is_named(tiny: pd.DataFrame) -> None:
    # No variation between subjects beyond x: the random intercept's variance goes to 0 (glmer's message).
    frame = tiny.assign(y=(tiny["x"] > 0).astype(float))
    frame.loc[[0, 5, 11, 17], "y"] = 1 - frame.loc[[0, 5, 11, 17], "y"]
    result = fitted_engine(frame, "y ~ x + (1 | g)", "binomial")
    assert result.singular and result.theta[0] == 0.0
    assert result.messages[0] == "boundary (singular) fit: the variance of '(Intercept)' for g is zero"
    assert result.converged


def test_model_without_fixed_effects(tiny: pd.DataFrame) -> None:
    # y ~ 0 + (1 | g): no β; here the random intercept's variance goes to 0 and every μ to ½.
    result = fitted_engine(tiny, "y ~ 0 + (1 | g)", "binomial")
    assert result.beta.shape == (0,) and result.vcov.shape == (0, 0)
    assert result.loglik == pytest.approx(len(tiny) * math.log(0.5), abs=1e-8)


# ----------------------------------------------------------------------------------------- refusals


def test_separation_is_refused(tiny: pd.DataFrame) -> None:
    frame = tiny.assign(arm=np.where(tiny["x"] > 0.2, "treated", "control"), y=(tiny["x"] > 0.2).astype(float))
    with pytest.raises(FitFailure, match=r"fixed effects 'armtreated' predicts the outcome perfectly .* infinite"):
        fit_glmm(design_of(frame, "y ~ arm + t + (1 | g)"), family="binomial", nagq=1)


def test_poisson_zero_group_is_refused(tiny: pd.DataFrame) -> None:
    frame = tiny.assign(arm=np.where(tiny["x"] > 0.5, "b", "a"))
    frame.loc[frame["arm"] == "b", "n"] = 0.0
    with pytest.raises(FitFailure, match=r"'armb' picks out rows whose counts are all zero"):
        fit_glmm(design_of(frame, "n ~ arm + (1 | g)"), family="poisson", nagq=1)


@pytest.mark.parametrize(("column", "values", "family", "message"), [
    ("y", 1.0, "binomial", r"the outcome is constant \(every row is 1\)"),
    ("y", 2.0, "binomial", r"a binomial outcome must be 0 or 1; row 0 has 2$"),
    ("n", -1.0, "poisson", r"a Poisson outcome must be a non-negative integer; row 0 has -1$"),
    ("n", 0.5, "poisson", r"a Poisson outcome must be a non-negative integer; row 0 has 0\.5$"),
])
def test_outcomes_outside_the_family_are_refused(tiny: pd.DataFrame, column: str, values: float, family: str,
                                                 message: str) -> None:
    frame = tiny.copy()
    frame.loc[0 if values != 1.0 else slice(None), column] = values
    with pytest.raises(FitFailure, match=message):
        fit_glmm(design_of(frame, f"{column} ~ x + (1 | g)"), family=family, nagq=1)


def test_too_few_groups_are_refused(tiny: pd.DataFrame) -> None:
    with pytest.raises(FitFailure, match="grouping factor 'g' has 1 level"):
        fit_glmm(design_of(tiny.assign(g="one"), "y ~ x + (1 | g)"), family="binomial", nagq=1)


@pytest.mark.parametrize("formula", ["y ~ x + (t | g)", "y ~ x + (1 | g) + (1 | h)", "y ~ x + (t || g)"])
def test_quadrature_needs_one_scalar_random_effect(tiny: pd.DataFrame, formula: str) -> None:
    with pytest.raises(ConfigError, match=r"nagq = 5 \(adaptive Gauss-Hermite quadrature\) needs a single scalar "
                                          r"random effect"):
        fit_glmm(design_of(tiny, formula), family="binomial", nagq=5)


def test_unknown_family_and_bad_nagq_are_config_errors(tiny: pd.DataFrame) -> None:
    design = design_of(tiny, "y ~ x + (1 | g)")
    with pytest.raises(ConfigError, match="unknown GLMM family 'gamma'"):
        fit_glmm(design, family="gamma", nagq=1)
    with pytest.raises(ConfigError, match="nagq must be an integer from 1"):
        fit_glmm(design, family="binomial", nagq=0)


def test_candidate_record_counts_no_residual_variance(sleep: pd.DataFrame) -> None:
    # R: attr(logLik(glmer(slow ~ Days + (Days | Subject), s, binomial)), "df") = 5: 2 fixed effects + 3 theta
    fit = fit_candidate(sleep, "ris", "slow ~ Days + (Days | Subject)", family="binomial")
    assert fit.usable and fit.n_params == 5 and fit.family == "binomial"
    assert fit.loglik == pytest.approx(-85.56886902, abs=2e-6)
