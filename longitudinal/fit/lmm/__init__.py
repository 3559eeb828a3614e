"""The lme4-style engine for linear mixed models: ``fit_lmm`` and ``profiled_deviance`` for any design.

Dispatch lives here, above the two engines: a design with one grouping factor goes to
``fit.lmm.onefactor`` (per-group cross-products, batched small factorizations), one with several (nested
or crossed) to ``fit.lmm.multifactor`` (the blocked sparse path). Either engine runs on the standardized
design (``fit.scaling``) and ``restore_units`` carries every estimate back to the units of the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.lmm import multifactor, onefactor
from longitudinal.fit.linalg import GroupGram
from longitudinal.fit.lmm.crossproducts import CrossProducts, PatternProducts, compute_crossproducts, group_patterns
from longitudinal.fit.lmm.multifactor import compute_multiproducts, fit_multilevel, multilevel_deviance
from longitudinal.fit.lmm.onefactor import fit_one_factor, one_factor_deviance
from longitudinal.fit.scaling import Standardization, lower_factor_of, standardize
from longitudinal.fit.theta import lambda_at, layout_theta, singular_message
from longitudinal.model.design import Design
from longitudinal.records import EngineResult, OptimizerAttempt


def profiled_deviance(
    source: Design | CrossProducts | PatternProducts, theta: np.ndarray, reml: bool,
) -> float:
    """The ML deviance (profiled over β and σ²) or the REML criterion at ``theta``.

    From a ``Design`` the cross-products are computed first (one pass over the rows); from a
    ``CrossProducts`` the cost does not depend on the number of rows, from ``PatternProducts`` not on the
    number of groups either. A design with several grouping factors goes to
    ``fit.lmm.multifactor.multilevel_deviance``. Returns ``inf`` where the penalized residual sum of squares
    is not positive.
    """
    if isinstance(source, Design) and not source.single_factor:
        return multilevel_deviance(source, theta, reml)
    return one_factor_deviance(source, theta, reml)


@dataclass(frozen=True, eq=False)
class PenalizedSolution:
    """What lme4's ``pp`` and ``resp`` hold at one θ, for criteria that do not profile σ out.

    ``logdet_M`` is log|Λ'Z'ZΛ + I| (lme4's ``ldL2()``), ``r2`` the penalized residual sum of squares
    (``wrss() + sqrL(1)``), ``RX`` a p × p factor with RXᵀRX = X'V*⁻¹X for V* = ZΛΛ'Z' + I (lme4's ``RX()``
    up to an orthogonal factor: only RXᵀRX and |RX| are defined), ``beta`` β̂(θ). With σ given::

        ML deviance(θ, σ)   = logdet_M + r2 / σ² + n log(2π σ²)
        REML deviance(θ, σ) = ML deviance(θ, σ) + 2 log|RX| − p log(2π σ²)       (lmerTest's devfun_vp)
        vcov(β)(θ, σ)       = σ² (RXᵀRX)⁻¹
    """

    logdet_M: float
    r2: float
    RX: np.ndarray
    beta: np.ndarray
    n_obs: int

    def deviance(self, sigma: float, *, reml: bool) -> float:
        """−2 log-likelihood (ML) or the REML criterion at this θ and the given σ."""
        sigma2 = sigma * sigma
        n, p = self.n_obs, self.RX.shape[0]
        dev = self.logdet_M + self.r2 / sigma2 + n * np.log(2.0 * np.pi * sigma2)
        if reml:
            dev += 2.0 * float(np.log(np.abs(np.diagonal(self.RX))).sum()) - p * np.log(2.0 * np.pi * sigma2)
        return float(dev)

    def unscaled_vcov(self) -> np.ndarray:
        """(RXᵀRX)⁻¹: vcov(β) / σ² at this θ."""
        RX_inv = np.linalg.inv(self.RX)
        return RX_inv @ RX_inv.T


def penalized_solver(design: Design) -> Callable[[np.ndarray], PenalizedSolution | None]:
    """A function of θ (lme4's layout, for ``design`` as given: no standardization) returning the
    ``PenalizedSolution`` there, None where the factorization fails. The cross-products are computed once
    here, so each call costs what one evaluation of the deviance costs (small-sample df, profiles).

    With one grouping factor a solution needs of the groups only log|M| and Σ_g R_g'R_g, which the optimizer's
    evaluation gives without forming every group's factors (``_gram_solver``); else (q ≥ 3 at irregular
    visit times, several factors) the engines' ``solve_at``."""
    if design.single_factor:
        products = compute_crossproducts(design)
        patterns = group_patterns(products)
        if patterns is not None or products.n_random <= 2:
            return _gram_solver(products, patterns, design.n_obs)

        def one(theta: np.ndarray) -> PenalizedSolution | None:
            found = onefactor.solve_at(products, lambda_at(products.block_sizes, theta), False)
            return None if found is None else _penalized(found.logdet_M, found.r2, found.chol_S, design.n_obs)
        return one
    multi = compute_multiproducts(design)

    def several(theta: np.ndarray) -> PenalizedSolution | None:
        found = multifactor.solve_at(multi, lambda_at(multi.block_sizes, theta), False)
        return None if found is None else _penalized(found.logdet_M, found.r2, found.chol_S, design.n_obs)
    return several


def _gram_solver(products: CrossProducts, patterns: PatternProducts | None,
                 n_obs: int) -> Callable[[np.ndarray], PenalizedSolution | None]:
    """``penalized_solver`` for one grouping factor on the optimizer's evaluation (``fit.lmm.onefactor``): log|M|
    and Σ_g R_g'R_g by visit pattern when the subjects share few (``patterns``), else block by block of groups
    (``fit.linalg.GroupGram``, q ≤ 2); S = [X y]'[X y] − Σ_g R_g'R_g then gives RX, β and r² as ``solve_at``'s
    does. The same values up to the order of the sums (a profile's intervals within 1e-11 relative)."""
    gram = GroupGram(products.ZtZ, products.ZtXy) if patterns is None else None

    def solve(theta: np.ndarray) -> PenalizedSolution | None:
        lam = lambda_at(products.block_sizes, theta)
        if patterns is not None:
            found = onefactor.pattern_gram(patterns, lam)
        else:
            assert gram is not None
            found = gram.at(lam)
        if found is None:
            return None
        logdet_M, RtR = found
        profiled = onefactor.profiled_criterion(products.XytXy - RtR, logdet_M, n_obs, False)
        if profiled is None:
            return None
        _, r2, chol_S = profiled
        return _penalized(logdet_M, r2, chol_S, n_obs)
    return solve


def _penalized(logdet_M: float, r2: float, chol_S: np.ndarray, n_obs: int) -> PenalizedSolution:
    """From the Cholesky factor L of S = [A b; b' c] (A = L₁₁L₁₁ᵀ, L₁₁ w = b): RX = L₁₁ᵀ, β = RX⁻¹ w."""
    p = chol_S.shape[0] - 1
    RX = chol_S[:p, :p].T.copy()
    beta = np.linalg.solve(RX, chol_S[p, :p])
    return PenalizedSolution(logdet_M=float(logdet_M), r2=float(r2), RX=RX, beta=beta, n_obs=n_obs)


def fit_lmm(design: Design, *, reml: bool, start: np.ndarray | None = None) -> EngineResult:
    """Fit the design by ML (``reml=False``) or REML with lme4's formulation and convergence checks.

    The fit runs on the standardized design (``longitudinal.fit.scaling``: outcome, fixed-effect and
    random-effect columns centred and scaled where the model is invariant to it) and every estimate is
    carried back exactly, so the units of the data do not matter: θ, β, vcov(β), σ, the covariances, the
    conditional modes and SDs, fitted values, residuals, the log-likelihood and lme4's REML criterion are
    those of the design given. The convergence and singularity checks are made in the standardized θ,
    where lme4's absolute tolerances mean what they are meant to.

    ``start``: θ in the units of ``design`` (as a fit of it reports θ) to start the optimizer from, such as a
    REML refit's ML fit (``fit.optimize.minimize_deviance``: the same optimum in fewer evaluations); lme4's
    start when None.

    Raises ``FitFailure`` (a ``FitError``) when the model cannot be fitted to these data: too few groups
    or observations for the random effects (lme4's ``lmerControl`` checks), a penalized residual sum of
    squares that is zero or not finite at every θ tried, or an outcome reproduced exactly by the model.
    """
    standardized, standardization = standardize(design)
    reml_offset = standardization.deviance_offset(design.n_obs, reml)
    begin = None if start is None else standardized_theta(start, design, standardization)
    try:
        if design.single_factor:
            result = fit_one_factor(standardized, reml=reml, ranef_map=standardization.ranef_map, start=begin)
        else:  # nested or crossed: the blocked sparse path
            result = fit_multilevel(standardized, reml=reml, ranef_map=standardization.ranef_map, start=begin)
    except FitFailure as failure:
        raise FitFailure(str(failure), _shift_attempts(failure.attempts, reml_offset)) from None
    del standardized  # its copies of X, y and Z (96 MB at 2M rows) are not held while the units are restored
    return restore_units(result, design, standardization)


def restore_units(result: EngineResult, design: Design, standardization: Standardization) -> EngineResult:
    """The fit of the standardized design in the units of ``design`` (see ``longitudinal.fit.scaling``).

    θ is re-triangularized bar by bar; the deviance (and each optimizer attempt's log-likelihood) gains the
    exact offset of the outcome's scale and, for REML, of X's parametrization. The random effects
    in ``result`` are already for the original Z (``_assemble``'s ``ranef_map``), in the standardized
    outcome's units. The singular-fit message names the terms in the data's units; lme4's scale warning
    is added when its ``checkScaleX`` would give it.
    """
    s = standardization
    layout = layout_theta(tuple(len(block.terms) for block in design.blocks))
    lam = layout.lambda_matrix(result.theta)
    restored_lam = np.zeros_like(lam)
    at = 0
    for k, size in enumerate(layout.block_sizes):
        window = slice(at, at + size)
        restored_lam[window, window] = s.relative_factor(k, lam[window, window])
        at += size
    theta = restored_lam[list(layout.rows), list(layout.cols)]
    offset = s.deviance_offset(design.n_obs, result.reml)
    covariances = tuple(s.covariance(k, cov) for k, cov in enumerate(result.covariances))
    sigma = result.sigma * s.y_scale
    messages = list(result.messages)
    if result.singular:
        scales = tuple(1.0 / np.abs(np.diagonal(B)) for B in s.ranef_maps)
        messages.insert(0, singular_message(design, layout, result.theta, covariances, sigma, scales))
    messages.extend(s.origin_notes)
    if s.scale_note is not None:
        messages.insert(0, s.scale_note)
    return dataclasses.replace(
        result,
        theta=theta,
        deviance=result.deviance + offset,
        beta=s.beta(result.beta),
        vcov=s.vcov(result.vcov),
        sigma=sigma,
        covariances=covariances,
        modes=result.modes * s.y_scale,
        cond_sd=result.cond_sd * s.y_scale,
        fitted=s.y_shift + s.y_scale * result.fitted,
        residuals=s.y_scale * result.residuals,
        messages=tuple(messages),
        attempts=_shift_attempts(result.attempts, offset),
        ranef=tuple(
            dataclasses.replace(f, modes=f.modes * s.y_scale, cond_sd=f.cond_sd * s.y_scale) for f in result.ranef
        ),
    )


def standardized_theta(theta: np.ndarray, design: Design, standardization: Standardization) -> np.ndarray:
    """θ in the units of ``design`` (as a fit reports it) on the standardized design: ``restore_units``' map
    inverted bar by bar, Λ_b' = the lower factor of B_b⁻¹ Λ_b (so that B_b Λ_b' Λ_b'ᵀ B_bᵀ = Λ_b Λ_bᵀ)."""
    layout = layout_theta(tuple(len(block.terms) for block in design.blocks))
    lam = layout.lambda_matrix(np.asarray(theta, dtype=float))
    standardized = np.zeros_like(lam)
    at = 0
    for k, size in enumerate(layout.block_sizes):
        window = slice(at, at + size)
        mapped = np.linalg.solve(standardization.ranef_maps[k], lam[window, window])
        standardized[window, window] = lower_factor_of(mapped)
        at += size
    out: np.ndarray = standardized[list(layout.rows), list(layout.cols)]
    return out


def _shift_attempts(attempts: tuple[OptimizerAttempt, ...], deviance_offset: float) -> tuple[OptimizerAttempt, ...]:
    """Optimizer attempts with their log-likelihood moved by −offset / 2 (the units of the data)."""
    return tuple(dataclasses.replace(a, loglik=a.loglik - 0.5 * deviance_offset) for a in attempts)
