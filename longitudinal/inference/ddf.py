"""Small-sample inference for the fixed effects: t tests with Satterthwaite's, Kenward–Roger's or the residual
degrees of freedom, or Wald z tests (``models.df``, see ``longitudinal.config.DF_METHODS``).

``fixed_effect_inference`` turns a fitted model and the rows it was fitted on into a
``FixedEffectInference``: β, the covariance used for standard errors (Kenward–Roger's adjusted one for that
method) and a function giving the denominator df of any linear combination Lβ. The fixed-effect table of the
report and ``selected_model.json``, the estimated marginal means and the contrasts
(``longitudinal.inference.marginal``) all ask it, so they agree.

- Satterthwaite, as lmerTest 3.1 (``satterthwaite``): for a row l, df = 2 (lΦlᵀ)² / (gᵀAg),
  g_r = l ∂Φ/∂φ_r lᵀ, A = 2 H⁻¹, H the Hessian of the deviance (REML or ML, as fitted) in φ = (θ, σ) for an lme4-style fit, in
  the structure's own parameters for an MMRM; derivatives by numDeriv's Richardson differences.
- Kenward–Roger, as pbkrtest 0.5 (``kenward_roger``): Φ_A = Φ + 2ΦUΦ from the expected information of the
  variance/covariance elements ψ (V linear in them), and ``Lb_ddf``'s df; computed over blocks of rows that
  share no level of any grouping factor (subjects), never an n × n matrix. REML fits only. For an MMRM, the
  linear variant (no second derivatives of V: mmrm's "Kenward-Roger-Linear").
- Residual: n − p. Normal: z tests, the only choice for a binomial or Poisson model.

Both small-sample methods run on the standardized design (``longitudinal.fit.scaling``,
``longitudinal.fit.covariance.units``) and carry the df and the adjusted covariance back (``InDataUnits``):
they are invariant to those changes of units, and in the data's units (a time in epoch seconds, an outcome
of 1e6 ± 1) the differences lose their digits. A statsmodels fit has no θ: it is rebuilt from its variance
components (``lme4_theta``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from longitudinal.config import DF_METHODS
from longitudinal.errors import ConfigError
from longitudinal.fit.covariance import CovarianceStructure, PatternGroups, fit_covariance, group_by_pattern
from longitudinal.fit.covariance.grouping import SubjectBatch, VisitPattern
from longitudinal.fit.covariance.likelihood import CovarianceModel, evaluate
from longitudinal.fit.covariance.units import Units
from longitudinal.fit.covariance.units import standardize as standardize_groups
from longitudinal.fit.lmm import PenalizedSolution, penalized_solver, standardized_theta
from longitudinal.fit.scaling import FixedEffectsMap, standardize
from longitudinal.fit.structured import visit_positions
from longitudinal.fit.theta import block_covariances, layout_theta
from longitudinal.model.design import Design, build_design
from longitudinal.model.formula import parse_formula
from longitudinal.records import Fit, FixedEffect

#: What each df method is called where a sentence names it ("Fixed effects, df by ...").
DF_METHOD_NAMES = {
    "satterthwaite": "Satterthwaite's method (as lmerTest)",
    "kenward-roger": "Kenward–Roger's method (as pbkrtest)",
    "residual": "the residual df n − p",
    "normal": "the normal distribution (Wald z, as glmer and lme4's summary)",
}

#: The two-sided 95% level of every interval.
LEVEL = 0.95


@dataclass(frozen=True, eq=False)
class FixedEffectInference:
    """β of a fit with what its tests need.

    ``vcov`` is the covariance of β̂ used for standard errors: σ²(X'V⁻¹X)⁻¹ at the estimates, or pbkrtest's
    adjusted covariance (``vcovAdj``) for Kenward–Roger. ``df_of`` maps the rows of L (k × p) to the
    denominator df of each one-row contrast Lβ (``inf`` for the normal distribution).
    """

    method: str
    names: tuple[str, ...]
    beta: np.ndarray
    vcov: np.ndarray
    df_of: Callable[[np.ndarray], np.ndarray]

    def contrasts(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Estimate, standard error and df of each row of ``L`` (k × p, or one row of p)."""
        L = np.atleast_2d(np.asarray(L, dtype=float))
        estimate = L @ self.beta
        variance = np.einsum("ij,jk,ik->i", L, self.vcov, L)
        se = np.sqrt(np.where(variance > 0, variance, np.nan))
        return estimate, se, np.asarray(self.df_of(L), dtype=float)

    def fixed_effects(self) -> tuple[FixedEffect, ...]:
        """One ``FixedEffect`` per coefficient: SE, 95% interval and two-sided p-value on ``df``."""
        estimate, se, df = self.contrasts(np.eye(len(self.names)))
        low, high, p = t_interval(estimate, se, df)
        return tuple(
            FixedEffect(term=term, estimate=float(e), std_error=float(s), ci_low=float(lo), ci_high=float(hi),
                        p_value=float(pv), df=float(d))
            for term, e, s, lo, hi, pv, d in zip(self.names, estimate, se, low, high, p, df, strict=True)
        )


def t_interval(
    estimate: np.ndarray, se: np.ndarray, df: np.ndarray, level: float = LEVEL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interval estimate ± t_{df, (1+level)/2} SE and the two-sided p-value of estimate / SE on ``df`` (the
    normal distribution where df is infinite)."""
    from scipy.special import ndtri, stdtr, stdtrit  # scipy.special only: scipy.stats costs seconds to import

    estimate, se, df = (np.asarray(a, dtype=float) for a in np.broadcast_arrays(estimate, se, df))
    finite = np.isfinite(df)
    upper = (1.0 + level) / 2.0
    quantile = np.where(finite, stdtrit(np.where(finite, df, 1.0), upper), ndtri(upper))
    with np.errstate(invalid="ignore", divide="ignore"):
        statistic = np.abs(estimate / se)
    tail = np.where(finite, stdtr(np.where(finite, df, 1.0), -statistic), 0.5 * np.vectorize(math.erfc)(statistic / math.sqrt(2.0)))
    return estimate - quantile * se, estimate + quantile * se, 2.0 * tail


def fixed_effect_inference(fit: Fit, visits: pd.DataFrame, method: str) -> FixedEffectInference:
    """Inference for ``fit``'s fixed effects with the df ``method`` (one of ``DF_METHODS``), ``visits`` being the
    rows it was fitted on (validated: no missing values; the design is rebuilt with the fit's dropped columns).

    "normal" and "residual" need only the fit; "satterthwaite" (lmerTest's, for an ML or a REML fit) and
    "kenward-roger" (pbkrtest's, REML fits only) need the design and the variance parameters. Raises
    ``ConfigError`` for a method the fit does not support: anything but "normal" for a binomial or Poisson
    model, Kenward–Roger for an ML fit.
    """
    names = tuple(fe.term for fe in fit.fixed_effects)
    beta = np.array([fe.estimate for fe in fit.fixed_effects], dtype=float)
    vcov = np.asarray(fit.vcov, dtype=float)
    if method not in DF_METHODS:
        raise ConfigError(f"{method!r} is not a df method; use one of {', '.join(DF_METHODS)}")
    if method == "normal":
        return FixedEffectInference(method, names, beta, vcov, NormalDf())
    if fit.family != "gaussian":
        raise ConfigError(f"candidate {fit.name!r} is a {fit.family} model: its fixed effects are tested with Wald "
                          f"z tests (df method 'normal', as glmer), not {method!r}")
    if method == "residual":
        return FixedEffectInference(method, names, beta, vcov, ConstantDf(float(fit.n_obs - len(names))))
    if not fit.usable:
        raise ConfigError(f"candidate {fit.name!r} failed to fit ({fit.message}); it has no {method} df")
    if method == "kenward-roger" and fit.method != "REML":
        raise ConfigError(f"candidate {fit.name!r}: Kenward–Roger df need a REML fit (as pbkrtest), this one is "
                          f"{fit.method}; refit by REML or use satterthwaite")
    design = build_design(visits, parse_formula(fit.formula, name=fit.name), dropped=fit.dropped_terms)
    if fit.covariance is not None:
        return _structured_inference(fit, visits, design, method, names, beta, vcov)
    # On the standardized design (``fit.scaling``): with a time in epoch seconds or an outcome of 1e6 ± 1 the
    # deviance differenced in the data's units has lost the digits the Hessian needs, and pbkrtest's
    # information matrix spans so many orders of magnitude that its inverse is taken as singular. Both
    # methods are invariant to these reparametrizations (of θ, of β by A, of y by its scale).
    standardized, scaling = standardize(design)
    theta = standardized_theta(lme4_theta(fit, design), design, scaling)
    del design  # the design in the data's units is not held while the df are computed (2M rows: 112 MB of X)
    sigma = fit.residual_sd / scaling.y_scale
    standardized_vcov = _standardized_vcov(vcov, scaling)
    if method == "satterthwaite":
        inner = satterthwaite(standardized, theta, sigma, standardized_vcov, reml=fit.method == "REML")
        return FixedEffectInference(method, names, beta, vcov, InDataUnits(inner, scaling.fixed_map))
    adjusted = kenward_roger(standardized, theta, sigma, standardized_vcov)
    return FixedEffectInference(method, names, beta, scaling.vcov(adjusted.vcov),
                                InDataUnits(adjusted, scaling.fixed_map))


@dataclass(frozen=True, eq=False)
class InDataUnits:
    """The df of contrasts of β in the data's units from those of β' on standardized columns: β = A(sβ' + a e),
    so Lβ is L A β' up to a shift and a scale, which leave the df unchanged (``fit.scaling``)."""

    standardized: Callable[[np.ndarray], np.ndarray]
    fixed_map: np.ndarray

    def __call__(self, L: np.ndarray) -> np.ndarray:
        return self.standardized(np.atleast_2d(np.asarray(L, dtype=float)) @ self.fixed_map)


def _standardized_vcov(vcov: np.ndarray, scaling: FixedEffectsMap) -> np.ndarray:
    """vcov(β') = A⁻¹ vcov(β) A⁻ᵀ / s², the inverse of ``FixedEffectsMap.vcov``."""
    A_inv = np.linalg.inv(scaling.fixed_map)
    out = A_inv @ vcov @ A_inv.T / scaling.y_scale ** 2
    return np.asarray(0.5 * (out + out.T))


@dataclass(frozen=True)
class NormalDf:
    """Infinite df: the normal distribution (Wald z)."""

    def __call__(self, L: np.ndarray) -> np.ndarray:
        return np.full(len(L), math.inf)


@dataclass(frozen=True)
class ConstantDf:
    """The same df for every contrast (the residual df n − p)."""

    df: float

    def __call__(self, L: np.ndarray) -> np.ndarray:
        return np.full(len(L), self.df)


# ---------------------------------------------------------------------------------------------------------------
# Satterthwaite (lmerTest)
# ---------------------------------------------------------------------------------------------------------------

#: lmerTest's tolerance on the eigenvalues of the Hessian (``as_lmerModLT(tol = 1e-8)``): the Moore–Penrose
#: inverse keeps the eigenvalues above it.
HESSIAN_TOL = 1e-8


@dataclass(frozen=True, eq=False)
class SatterthwaiteDf:
    """lmerTest's Satterthwaite df of a one-row contrast l: df = 2 (l Φ lᵀ)² / (gᵀ A g), g_i = l J_i lᵀ.

    ``vcov`` is Φ = vcov(β̂); ``vcov_varpar`` A = 2 H⁺, H the Hessian of the deviance (REML or ML, as fitted)
    in the variance parameters at the optimum, H⁺ its Moore–Penrose inverse over eigenvalues above 1e-8
    (lmerTest's ``vcov_varpar``); ``jacobians`` J (k × p × p), J_i = ∂Φ/∂varpar_i (lmerTest's ``Jac_list``).
    """

    vcov: np.ndarray
    vcov_varpar: np.ndarray
    jacobians: np.ndarray

    def __call__(self, L: np.ndarray) -> np.ndarray:
        L = np.atleast_2d(np.asarray(L, dtype=float))
        variance = np.einsum("ij,jk,ik->i", L, self.vcov, L)
        g = np.einsum("ij,rjk,ik->ir", L, self.jacobians, L)
        denominator = np.einsum("ir,rs,is->i", g, self.vcov_varpar, g)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(2.0 * variance ** 2 / denominator, dtype=float)


def satterthwaite(design: Design, theta: np.ndarray, sigma: float, vcov: np.ndarray, *, reml: bool) -> SatterthwaiteDf:
    """Satterthwaite's df as lmerTest 3.1 computes them for an lmer fit (``as_lmerModLT``, ``contest1D``).

    The variance parameters are varpar = (θ, σ), θ in lme4's layout and the units of ``design``; the deviance
    is lmerTest's ``devfun_vp`` (REML when ``reml``, else ML) and vcov(β)(varpar) its ``get_covbeta``, both
    evaluated through ``penalized_solver`` (cross-products computed once). Hessian and Jacobian are numDeriv's
    (central differences from relative steps 0.1 and 1e-4, 4 Richardson extrapolations), as lmerTest takes
    them. On the boundary (a singular fit: a diagonal θ at 0) lmerTest differentiates across it all the same
    (the deviance is even in that θ) and drops the Hessian's zero eigenvalues by its generalized inverse
    (df n − p for a lone zero variance); so does this.
    """
    solver = penalized_solver(design)
    solutions: dict[bytes, PenalizedSolution | None] = {}

    def solve(varpar: np.ndarray) -> PenalizedSolution | None:
        key = varpar[:-1].tobytes()
        if key not in solutions:
            solutions[key] = solver(varpar[:-1].copy())
        return solutions[key]

    def deviance(varpar: np.ndarray) -> float:
        found = solve(varpar)
        return math.nan if found is None else found.deviance(float(varpar[-1]), reml=reml)

    def covbeta(varpar: np.ndarray) -> np.ndarray:
        found = solve(varpar)
        p = vcov.shape[0]
        return np.full(p * p, math.nan) if found is None else (varpar[-1] ** 2 * found.unscaled_vcov()).ravel()

    varpar = np.append(np.asarray(theta, dtype=float), float(sigma))
    return satterthwaite_at(richardson_hessian(deviance, varpar), covbeta, varpar, vcov)


def satterthwaite_at(
    hessian: np.ndarray, covbeta: Callable[[np.ndarray], np.ndarray], varpar: np.ndarray, vcov: np.ndarray, *,
    jacobian: Callable[[Callable[[np.ndarray], np.ndarray], np.ndarray], np.ndarray] | None = None,
) -> SatterthwaiteDf:
    """lmerTest's ``as_lmerModLT`` for any parametrization: A = 2 H⁺ from the ``hessian`` of the deviance at
    ``varpar`` (eigenvalues above 1e-8 kept), J the Jacobian of ``covbeta`` (vcov(β) flattened) by ``jacobian``
    (numDeriv's Richardson differences unless given)."""
    differentiate = richardson_jacobian if jacobian is None else jacobian
    values, vectors = np.linalg.eigh(hessian)
    kept = values > HESSIAN_TOL
    vcov_varpar = 2.0 * (vectors[:, kept] / values[kept]) @ vectors[:, kept].T
    p = vcov.shape[0]
    jacobians = np.moveaxis(differentiate(covbeta, varpar).reshape(p, p, -1), -1, 0)  # (k, p, p)
    return SatterthwaiteDf(vcov=vcov, vcov_varpar=vcov_varpar, jacobians=jacobians)


# numDeriv's defaults for method "Richardson": initial steps d·|x|, d = 0.1 for ``hessian`` and 1e-4 for
# ``jacobian``, plus eps = 1e-4 for coordinates below zero.tol; r = 4 extrapolations, halving the step.
_HESSIAN_D = 0.1
_JACOBIAN_D = 1e-4
_EPS = 1e-4
_ZERO_TOL = math.sqrt(np.finfo(float).eps / 7e-7)
_R = 4


def _initial_steps(x: np.ndarray, d: float) -> np.ndarray:
    return np.abs(d * x) + _EPS * (np.abs(x) < _ZERO_TOL)


def _extrapolate(approximations: np.ndarray) -> np.ndarray:
    """Richardson's extrapolation of r approximations with steps h, h/2, ..., of error O(h²) (numDeriv's)."""
    a = approximations
    for m in range(1, a.shape[0]):
        a = (a[1:] * 4.0 ** m - a[:-1]) / (4.0 ** m - 1.0)
    return np.asarray(a[0])


def richardson_hessian(f: Callable[[np.ndarray], float], x: np.ndarray) -> np.ndarray:
    """The Hessian of scalar ``f`` at ``x`` as ``numDeriv::hessian`` (``genD``) computes it: second central
    differences along each axis, the mixed ones along the diagonal of two axes minus the pure parts, each
    extrapolated from 4 steps (the first 0.1 |x_i|)."""
    x = np.asarray(x, dtype=float)
    n = x.size
    f0 = f(x)
    h0 = _initial_steps(x, _HESSIAN_D)
    eye = np.eye(n)
    diagonal = np.empty(n)
    for i in range(n):
        approximations = []
        for k in range(_R):
            h = h0 / 2.0 ** k
            plus, minus = f(x + eye[i] * h), f(x - eye[i] * h)
            approximations.append((plus - 2.0 * f0 + minus) / h[i] ** 2)
        diagonal[i] = _extrapolate(np.array(approximations))
    hessian = np.diag(diagonal)
    for i in range(n):
        for j in range(i):
            approximations = []
            for k in range(_R):
                h = h0 / 2.0 ** k
                step = eye[i] * h + eye[j] * h
                plus, minus = f(x + step), f(x - step)
                approximations.append((plus - 2.0 * f0 + minus - diagonal[i] * h[i] ** 2 - diagonal[j] * h[j] ** 2)
                                      / (2.0 * h[i] * h[j]))
            hessian[i, j] = hessian[j, i] = _extrapolate(np.array(approximations))
    return hessian


def richardson_jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """The Jacobian (m × n) of vector ``f`` at ``x`` as ``numDeriv::jacobian(method = "Richardson")``: central
    differences extrapolated from 4 steps (the first 1e-4 |x_i|)."""
    x = np.asarray(x, dtype=float)
    n = x.size
    h0 = _initial_steps(x, _JACOBIAN_D)
    eye = np.eye(n)
    columns = []
    for i in range(n):
        approximations = []
        for k in range(_R):
            h = h0[i] / 2.0 ** k
            approximations.append((f(x + eye[i] * h) - f(x - eye[i] * h)) / (2.0 * h))
        columns.append(_extrapolate(np.array(approximations)))
    return np.column_stack(columns)


def central_jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """The Jacobian (m × n) of vector ``f`` at ``x`` by one central difference per coordinate, steps as
    numDeriv's first (1e-4 |x_i|, or 1e-4 near 0): for functions smooth and exact to rounding, where the
    O(h²) ≈ 1e-8 error is not worth numDeriv's four times as many evaluations."""
    x = np.asarray(x, dtype=float)
    h = _initial_steps(x, _JACOBIAN_D)
    eye = np.eye(x.size)
    return np.column_stack([(np.asarray(f(x + eye[i] * h[i])) - np.asarray(f(x - eye[i] * h[i]))) / (2.0 * h[i])
                            for i in range(x.size)])


# ---------------------------------------------------------------------------------------------------------------
# Kenward–Roger (pbkrtest)
# ---------------------------------------------------------------------------------------------------------------

#: The largest block of rows (a connected set of levels of several grouping factors) whose dense n_b × n_b
#: covariance Kenward–Roger may form: 3,000 rows with five variance parameters take ~0.9 GB and ~10 s.
MAX_BLOCK_ROWS = 3000
#: Matrix elements per batch of equal-size blocks (bounds the memory of the batched products).
_BATCH_ELEMENTS = 1_000_000


@dataclass(frozen=True, eq=False)
class KenwardRogerDf:
    """pbkrtest's Kenward–Roger df of a one-row contrast (``Lb_ddf``) and its adjusted covariance.

    ``vcov`` is Φ_A = Φ + 2ΦUΦ (``vcovAdj``); ``unadjusted`` Φ = vcov(β̂); ``P`` (R × p × p) the
    P_r = −XᵀV⁻¹G_rV⁻¹X and ``W`` (R × R) = 2 IE2⁻¹ the covariance of the variance parameters ψ from the
    expected information, as ``vcovAdj`` keeps them in its attributes.
    """

    vcov: np.ndarray
    unadjusted: np.ndarray
    P: np.ndarray
    W: np.ndarray

    def __call__(self, L: np.ndarray) -> np.ndarray:
        L = np.atleast_2d(np.asarray(L, dtype=float))
        V0 = self.unadjusted
        variance = np.einsum("ij,jk,ik->i", L, V0, L)
        LV0 = L @ V0
        # For one row, u_r = Θ V0 P_r V0 (Θ = lᵀl / lV0lᵀ) has rank one: its trace is
        # a_r = lV0P_rV0lᵀ / lV0lᵀ, and pbkrtest's A1 = Σ W_rs tr(u_r) tr(u_s) equals its A2 = Σ W_rs tr(u_r u_s).
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.einsum("ij,rjk,ik->ir", LV0, self.P, LV0) / variance[:, None]
        A = np.einsum("ir,rs,is->i", a, self.W, a)
        return _lb_ddf(A, A, q=1)


def _lb_ddf(A1: np.ndarray, A2: np.ndarray, q: int) -> np.ndarray:
    """pbkrtest's ``Lb_ddf`` from its A1 and A2 (for one row it reduces to 2 / A)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        B = (A1 + 6.0 * A2) / (2.0 * q)
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        denominator = 3.0 * q + 2.0 * (1.0 - g)
        c1, c2, c3 = g / denominator, (q - g) / denominator, (q + 2 - g) / denominator
        V0 = 1.0 + c1 * B
        V1 = 1.0 - c2 * B
        V2 = 1.0 - c3 * B
        V0 = np.where(np.abs(V0) < 1e-10, 0.0, V0)
        numerator = 1.0 - A2 / q
        ratio = np.where((np.abs(numerator) < 1e-14) & (np.abs(V1) < 1e-14), 1.0, numerator / V1)  # .divZero
        rho = ratio ** 2 * V0 / (q * V2)
        return np.asarray(4.0 + (q + 2) / (q * rho - 1.0), dtype=float)


def kenward_roger(design: Design, theta: np.ndarray, sigma: float, vcov: np.ndarray) -> KenwardRogerDf:
    """Kenward–Roger's adjusted covariance and df as pbkrtest 0.5 computes them for a REML lmer fit
    (``vcovAdj16_internal``, ``Lb_ddf``).

    ψ are the variance and covariance elements of each bar's random-effect covariance σ²Λ_kΛ_kᵀ (lower triangle,
    column by column), then σ²; V = Σ_r ψ_r G_r with G_r = ∂V/∂ψ_r, linear in ψ (pbkrtest's ``get_SigmaG``),
    so the adjustment has no second-derivative terms. Φ = ``vcov`` (lme4's, as pbkrtest takes it). V is
    block-diagonal over connected blocks of rows: the subjects with one grouping factor, the outermost groups
    when the factors are nested, all rows when they are crossed. Each block's V is formed densely, blocks of
    equal size in batches, so nothing n × n is ever formed; a block larger than ``MAX_BLOCK_ROWS`` raises
    ``ConfigError``.
    """
    covariances = _bar_covariances(design, theta, sigma)
    P, Q, K = _information_parts(design, _row_blocks(design), covariances, sigma ** 2)
    return adjusted_covariance(P, Q, K, vcov)


def adjusted_covariance(P: np.ndarray, Q: np.ndarray, K: np.ndarray, vcov: np.ndarray) -> KenwardRogerDf:
    """pbkrtest's ``vcovAdj16_internal`` from the sums P_r, Q_rs, K_rs (``KenwardRogerDf``'s) and Φ = ``vcov``:
    the expected information IE2_rs = K_rs − 2 tr(ΦQ_rs) + tr(ΦP_rΦP_s), W = 2 IE2⁻¹ (a generalized inverse when
    IE2's smallest |eigenvalue| is below 1e-10), U = Σ_rs W_rs (Q_rs − P_rΦP_s) and Φ_A = Φ + 2ΦUΦ."""
    Phi = np.asarray(vcov, dtype=float)
    R = P.shape[0]
    PhiP = np.einsum("ab,rbc->rac", Phi, P)
    IE2 = K - 2.0 * np.einsum("ab,rsab->rs", Phi, Q) + np.einsum("rab,sba->rs", PhiP, PhiP)
    IE2 = (IE2 + IE2.T) / 2.0
    condition = float(np.min(np.abs(np.linalg.eigvalsh(IE2))))
    W = 2.0 * (np.linalg.inv(IE2) if condition > 1e-10 else np.linalg.pinv(IE2))
    W = (W + W.T) / 2.0
    U = np.zeros_like(Phi)
    for r in range(R):
        for s in range(r, R):
            term = W[r, s] * (Q[r, s] - P[r] @ Phi @ P[s])
            U += term if r == s else term + term.T
    return KenwardRogerDf(vcov=Phi + 2.0 * Phi @ U @ Phi, unadjusted=Phi, P=P, W=W)


def _bar_covariances(design: Design, theta: np.ndarray, sigma: float) -> list[np.ndarray]:
    """Each bar's random-effect covariance σ²Λ_kΛ_kᵀ (lme4's ``VarCorr``)."""
    layout = layout_theta(tuple(len(block.terms) for block in design.blocks))
    covariances, _ = block_covariances(layout, np.asarray(theta, dtype=float), sigma ** 2)
    return covariances


def _row_blocks(design: Design) -> np.ndarray:
    """The block of each row: rows in different blocks share no level of any grouping factor, so V is
    block-diagonal over them (the subject with one factor; connected components of the levels otherwise)."""
    if design.single_factor:
        return np.asarray(design.blocks[0].codes)
    factors = {block.group: block for block in design.blocks}
    offsets, at = {}, 0
    for group, block in factors.items():
        offsets[group] = at
        at += block.n_levels
    nodes = [np.asarray(block.codes) + offsets[group] for group, block in factors.items()]
    first = nodes[0]
    edges_from = np.concatenate([first] * (len(nodes) - 1))
    edges_to = np.concatenate(nodes[1:])
    graph = sparse.coo_matrix((np.ones(edges_from.size), (edges_from, edges_to)), shape=(at, at))
    _, labels = connected_components(graph, directed=False)
    return np.asarray(labels[first])


def _parameter_matrices(design: Design) -> list[tuple[int, int, int]]:
    """ψ's layout before σ²: (bar, i, j), i ≥ j, per bar the lower triangle column by column."""
    return [(k, i, j) for k, block in enumerate(design.blocks)
            for j in range(len(block.terms)) for i in range(j, len(block.terms))]


def _information_parts(
    design: Design, blocks: np.ndarray, covariances: list[np.ndarray], sigma2: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σ over the blocks of pbkrtest's P_r = −XᵀV⁻¹G_rV⁻¹X, Q_rs = XᵀV⁻¹G_rV⁻¹G_sV⁻¹X and
    K_rs = tr(G_rV⁻¹G_sV⁻¹), the blocks of equal size in batches."""
    parameters = _parameter_matrices(design)
    R, p = len(parameters) + 1, design.X.shape[1]
    P, Q, K = np.zeros((R, p, p)), np.zeros((R, R, p, p)), np.zeros((R, R))
    order = np.argsort(blocks, kind="stable")
    sizes = np.bincount(blocks)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    largest = int(sizes.max())
    if largest > MAX_BLOCK_ROWS:
        raise ConfigError(
            f"Kenward–Roger df need the dense covariance of each block of rows linked by the grouping factors "
            f"({', '.join(design.groups)}); the largest block here has {largest} rows (more than "
            f"{MAX_BLOCK_ROWS}): use df method 'satterthwaite'"
        )
    for m in np.unique(sizes[sizes > 0]):
        which = np.flatnonzero(sizes == m)
        per_batch = max(1, _BATCH_ELEMENTS // int(m * m * (R + 3)))
        for at in range(0, which.size, per_batch):
            chosen = which[at:at + per_batch]
            rows = order[starts[chosen][:, None] + np.arange(m)[None, :]]
            _add_batch(design, rows, parameters, covariances, sigma2, P, Q, K)
    return P, Q, K


def _add_batch(
    design: Design, rows: np.ndarray, parameters: list[tuple[int, int, int]], covariances: list[np.ndarray],
    sigma2: float, P: np.ndarray, Q: np.ndarray, K: np.ndarray,
) -> None:
    """Add one batch of blocks (B × m row indices) to P, Q and K (in place: they are the caller's sums)."""
    B, m = rows.shape
    X = design.X[rows]
    Zs = [block.Z[rows] for block in design.blocks]
    same = [None if design.single_factor else (block.codes[rows][:, :, None] == block.codes[rows][:, None, :])
            for block in design.blocks]
    G = np.empty((len(parameters) + 1, B, m, m))
    for r, (k, i, j) in enumerate(parameters):
        Z = Zs[k]
        np.multiply(Z[:, :, i, None], Z[:, None, :, j], out=G[r])
        if i != j:
            G[r] += np.swapaxes(G[r], 1, 2).copy()
        if same[k] is not None:
            G[r] *= same[k]
    G[-1] = np.eye(m)  # ∂V/∂σ²
    V = sigma2 * np.broadcast_to(np.eye(m), (B, m, m)).copy()
    for k, block_cov in enumerate(covariances):
        part = np.einsum("bmi,ij,bnj->bmn", Zs[k], block_cov, Zs[k])
        V += part if same[k] is None else part * same[k]
    accumulate_information(X, V, G, P, Q, K)


def accumulate_information(
    X: np.ndarray, V: np.ndarray, G: np.ndarray, P: np.ndarray, Q: np.ndarray, K: np.ndarray,
) -> None:
    """Add the blocks X (B × m × p), V (B × m × m) and G_r = ∂V/∂ψ_r (R × B × m × m) to pbkrtest's sums
    P_r = −Σ XᵀV⁻¹G_rV⁻¹X, Q_rs = Σ XᵀV⁻¹G_rV⁻¹G_sV⁻¹X and K_rs = Σ tr(G_rV⁻¹G_sV⁻¹) (in place:
    the caller's running sums). The sums over blocks and rows are matrix products over all r and s at once."""
    R, p = G.shape[0], X.shape[2]
    V_inv = np.linalg.inv(V)
    H = G @ V_inv
    O = H @ X
    S = V_inv @ O
    T = V_inv @ X
    # sums over a long axis into a small result: einsum's own loop (OpenBLAS's gemm for this shape was 100×
    # slower here, up to a second per batch on a busy machine)
    O_flat = O.transpose(0, 3, 1, 2).reshape(R * p, -1)
    P -= np.einsum("ik,kj->ij", O_flat, T.reshape(-1, p)).reshape(R, p, p)
    S_flat = S.transpose(0, 3, 1, 2).reshape(R * p, -1)
    Q += np.einsum("ik,jk->ij", O_flat, S_flat).reshape(R, p, R, p).transpose(0, 2, 1, 3)
    K += np.einsum("rbij,sbji->rs", H, H)


def accumulate_pattern(
    XX: np.ndarray, n_subjects: int, V: np.ndarray, G: np.ndarray, P: np.ndarray, Q: np.ndarray, K: np.ndarray,
) -> None:
    """``accumulate_information`` for subjects sharing one V (s × s) and G (R × s × s), read through their
    cross-products XX (s × s × p × p, [a, b] = Σ_i X_i[a]ᵀ X_i[b]): no cost per subject."""
    R, s, p = G.shape[0], V.shape[0], XX.shape[2]
    V_inv = np.linalg.inv(V)
    H = G @ V_inv
    M = V_inv @ H  # V⁻¹ G_r V⁻¹
    XX_flat = XX.reshape(s * s, p * p)
    P -= (M.reshape(R, s * s) @ XX_flat).reshape(R, p, p)
    N = np.einsum("rab,tbc->rtac", M, H)  # V⁻¹ G_r V⁻¹ G_t V⁻¹
    Q += (N.reshape(R * R, s * s) @ XX_flat).reshape(R, R, p, p)
    K += n_subjects * np.einsum("rab,tba->rt", H, H)

# ---------------------------------------------------------------------------------------------------------------
# The variance parameters of a fit
# ---------------------------------------------------------------------------------------------------------------

def lme4_theta(fit: Fit, design: Design) -> np.ndarray:
    """lme4's θ of ``fit`` in the units of ``design``: the fit's own (lme4-style engine) or, for a statsmodels
    fit, per bar the lower Cholesky factor of Σ_k / σ² (its variance components and correlations), packed
    column by column as lme4 packs it. Raises ``ConfigError`` where Σ_k is not positive definite (a variance
    estimated at zero: refit with the lme4-style engine, whose θ carries the boundary)."""
    layout = layout_theta(tuple(len(block.terms) for block in design.blocks))
    if fit.theta.size == layout.size:
        return np.asarray(fit.theta, dtype=float)
    sd = {(c.group, c.term): c.sd for c in fit.random_effects}
    corr = {(c.group, c.term1, c.term2): c.corr for c in fit.correlations}
    pieces = []
    for block in design.blocks:
        q = len(block.terms)
        try:
            sds = np.array([sd[block.group, term] for term in block.terms])
        except KeyError as missing:
            raise ConfigError(f"candidate {fit.name!r}: the fit has no variance for {missing.args[0]}; "
                              "its θ cannot be rebuilt") from None
        R = np.eye(q)
        for j in range(q):
            for i in range(j + 1, q):
                value = corr.get((block.group, block.terms[j], block.terms[i]), 0.0)
                R[i, j] = R[j, i] = value if math.isfinite(value) else 0.0
        relative = np.outer(sds, sds) * R / fit.residual_sd ** 2
        try:
            factor = np.linalg.cholesky(relative)
        except np.linalg.LinAlgError:
            raise ConfigError(
                f"candidate {fit.name!r} ({fit.engine} engine): the covariance of {', '.join(block.terms)} for "
                f"{block.group} is singular, so its θ cannot be rebuilt for {fit.name!r}'s small-sample df; fit "
                "with engine 'lme4-style' or use df method 'normal'"
            ) from None
        rows, cols = np.tril_indices(q)
        order = np.lexsort((rows, cols))  # column by column
        pieces.append(factor[rows[order], cols[order]])
    return np.concatenate(pieces) if pieces else np.empty(0)


def _structured_inference(
    fit: Fit, visits: pd.DataFrame, design: Design, method: str, names: tuple[str, ...], beta: np.ndarray,
    vcov: np.ndarray,
) -> FixedEffectInference:
    """Satterthwaite or Kenward–Roger for a covariance-structure fit (MMRM), in the structure's own parameters
    θ (structure, then Λ: ``longitudinal.fit.covariance.likelihood``'s full θ).

    The record does not keep the engine's θ, so the structure is refitted on the same rows (the same
    deterministic fit) to recover it.

    - Satterthwaite: lmerTest's definition on −2ℓ (REML or ML, as fitted); its Hessian and vcov(β)'s Jacobian
      by central differences, the Hessian from the engine's analytic gradient. Invariant to the parametrization.
    - Kenward–Roger: pbkrtest's formulas, the linear variant (mmrm's "Kenward-Roger-Linear", SAS's
      KR(LINEARCOVARIANCE)): G_r = ∂V/∂θ_r by numDeriv's Richardson differences and no second-derivative term.
      Its Φ_A and df are invariant to reparametrizing θ (W transforms as IE2⁻¹, each G_r by the chain rule),
      so they equal pbkrtest's for a model that is also an LMM (compound symmetry with a positive correlation
      is the random-intercept model). mmrm's "Kenward-Roger" adds ¼ R_rs (second derivatives of V), which does
      depend on the parametrization; it is not implemented.
    """
    structure, groups, units, theta = _structured_model(fit, visits, design)
    standardized_vcov = _standardized_vcov(vcov, units)
    if method == "satterthwaite":
        inner = _structured_satterthwaite(structure, groups, theta, standardized_vcov, reml=fit.method == "REML")
        return FixedEffectInference(method, names, beta, vcov, InDataUnits(inner, units.fixed_map))
    adjusted = _structured_kenward_roger(structure, groups, theta, standardized_vcov)
    return FixedEffectInference(method, names, beta, units.vcov(adjusted.vcov), InDataUnits(adjusted, units.fixed_map))


def _structured_model(
    fit: Fit, visits: pd.DataFrame, design: Design,
) -> tuple[CovarianceStructure, PatternGroups, Units, np.ndarray]:
    """The structure, the rows arranged by subject as ``fit.structured.fit_structured`` arranges them, on
    standardized columns (``fit.covariance.units``: as for an LMM, differences in the data's units lose their
    digits with a time in epoch seconds), how they were standardized, and θ̂ refitted on them."""
    term = parse_formula(fit.formula, name=fit.name).covariance
    if term is None:  # pragma: no cover - fit.covariance says there is one
        raise ConfigError(f"candidate {fit.name!r}: its formula has no covariance structure")
    column = visits[term.visit]
    if term.structure == "sp_exp":
        coords, n_visits = column.to_numpy(dtype=float), 2
    else:
        coords, labels = visit_positions(column)
        n_visits = len(labels)
    structure = CovarianceStructure(term.structure, n_visits)
    Z = design.blocks[0].Z if design.blocks else None
    groups, units = standardize_groups(group_by_pattern(design.y, design.X, design.codes, coords, Z))
    return structure, groups, units, fit_covariance(groups, structure, reml=fit.method == "REML").full_theta


def _structured_satterthwaite(
    structure: CovarianceStructure, groups: PatternGroups, theta: np.ndarray, vcov: np.ndarray, *, reml: bool,
) -> SatterthwaiteDf:
    """Satterthwaite's df in the structure's θ (``_structured_inference``)."""
    def score(params: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(evaluate(structure, groups, params, reml=reml).gradient)
        except np.linalg.LinAlgError:
            return np.full(params.size, math.nan)

    def covbeta(params: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(evaluate(structure, groups, params, reml=reml, gradient=False).vcov).ravel()
        except np.linalg.LinAlgError:
            return np.full(vcov.size, math.nan)

    # plain central differences of a gradient exact to rounding (an O(h²) error of ~1e-8): 2k evaluations
    # instead of numDeriv's 8k (an unstructured covariance over 10 visits has k = 55 parameters)
    hessian = -2.0 * central_jacobian(score, theta)
    return satterthwaite_at((hessian + hessian.T) / 2.0, covbeta, theta, vcov, jacobian=central_jacobian)


def _structured_kenward_roger(
    structure: CovarianceStructure, groups: PatternGroups, theta: np.ndarray, vcov: np.ndarray,
) -> KenwardRogerDf:
    """Linear Kenward–Roger in the structure's θ (``_structured_inference``): subjects sharing a visit pattern
    through their cross-products, the others in batches bounded in memory."""
    q = groups.n_random
    R, p = theta.size, groups.n_fixed
    P, Q, K = np.zeros((R, p, p)), np.zeros((R, R, p, p)), np.zeros((R, R))
    for block in groups.blocks():
        if isinstance(block, VisitPattern):
            V, G = _marginal_derivatives(structure, block, theta, q)
            accumulate_pattern(block.crossproducts.XX, block.n_subjects, V, G, P, Q, K)
            continue
        g, m = block.rows.shape
        per_batch = max(1, _BATCH_ELEMENTS // int(m * m * (R + 3)))
        for at in range(0, g, per_batch):
            chunk = slice(at, at + per_batch)
            part = dataclasses.replace(block, coords=block.coords[chunk], rows=block.rows[chunk],
                                       subjects=block.subjects[chunk], y=block.y[chunk], X=block.X[chunk],
                                       Z=block.Z[chunk])
            V, G = _marginal_derivatives(structure, part, theta, q)
            accumulate_information(part.X, V, G, P, Q, K)
    return adjusted_covariance(P, Q, K, vcov)


def _marginal_derivatives(
    structure: CovarianceStructure, block: VisitPattern | SubjectBatch, theta: np.ndarray, q: int,
) -> tuple[np.ndarray, np.ndarray]:
    """V of ``block`` at the full θ, and G_r = ∂V/∂θ_r (R × V's shape) by numDeriv's Richardson differences."""
    def marginal(params: np.ndarray) -> np.ndarray:
        model = CovarianceModel.at(structure, params, q)
        return np.asarray(model.scale * model.marginal(block))

    V = marginal(theta)
    G = richardson_jacobian(lambda params: marginal(params).ravel(), theta)
    return V, np.ascontiguousarray(G.T.reshape(theta.size, *V.shape))
