"""lme4's profiled-deviance formulation of a linear mixed model, for one grouping factor.

(Designs with several grouping factors, nested or crossed, are sent by ``longitudinal.fit.lmm.fit_lmm`` and
``profiled_deviance`` to ``fit.lmm.multifactor``, which shares this module's per-group factorization, the
kernels of ``fit.linalg``, for the finest factor. θ's layout is ``fit.theta``'s, the optimizer and lme4's
convergence checks are ``fit.optimize``'s, the cross-products ``fit.lmm.crossproducts``'.)

Bates, Mächler, Bolker & Walker (2015), "Fitting Linear Mixed-Effects Models Using lme4", J. Stat. Softw.
67(1), sections 3-5. The random effects are b = Λθ u with u ~ N(0, σ² I); Λθ is block-diagonal over the
random-effects bars of the formula, one lower-triangular block per bar, so ``(x || g)`` (one bar per term)
gives a diagonal Λ. θ is in lme4's order: bar by bar, the lower triangle column by column; diagonal elements
are bounded below by 0, the others are free; the optimizer starts from θ = 1 on the diagonal, 0 elsewhere.

With one grouping factor Z'Z is block-diagonal over the G groups, so everything the deviance needs is in
per-group cross-products computed once (``compute_crossproducts``): Z_g'Z_g (q × q), Z_g'[X_g y_g] and the
dense [X y]'[X y]. For a given θ, per group::

    M_g = Λ' Z_g'Z_g Λ + I = L_g L_g'          R_g = L_g⁻¹ Λ' Z_g'[X_g y_g] = [RZX_g  cu_g]
    S   = [X y]'[X y] − Σ_g R_g' R_g          (so A = S_XX = RX'RX, b = S_Xy)
    β = A⁻¹ b     r² = S_yy − b'β (penalized RSS)     log|M| = Σ_g 2 Σ log diag L_g

    ML   deviance = log|M| + n (1 + log(2π r² / n))
    REML criterion = log|M| + log|A| + (n − p)(1 + log(2π r² / (n − p)))

Each evaluation costs O(G q³ + G q p² + p³) and never touches the n rows: the 1×1 and 2×2 Cholesky factors
are written out as array arithmetic over the groups (batched ``np.linalg.cholesky`` only for q ≥ 3); for
q ≤ 2 the optimizer's evaluations need only log|M| and Σ_g R_g'R_g, formed block by block of groups in buffers
allocated once (``fit.linalg.GroupGram``: the same arithmetic, the sums in another order).
Groups with identical Z_g'Z_g (subjects seen at the same visit times) share M_g and L_g, and Σ_g R_g'R_g
needs only the sums of W_g[i]'W_g[j] over such a *pattern* (``group_patterns``): when the patterns are few,
the optimizer's evaluations cost O(P q² p²) for P patterns, whatever the number of subjects. This is exact
(only the order of floating-point sums changes); the estimates at the optimum come from the per-group solve.

Estimation (``fit_one_factor``): θ by bounded BOBYQA as lme4's default ``nloptwrap`` (``nlopt.LN_BOBYQA``,
xtol_abs = ftol_abs = 1e-8, at most 100 000 evaluations, nlopt's default initial step), then β,
σ² = r²/n (ML) or r²/(n − p) (REML), vcov(β) = σ² A⁻¹, the conditional modes b_g = Λ L_g⁻ᵀ(cu_g − RZX_g β)
and their conditional covariance σ² Λ M_g⁻¹ Λ' (given β, as lme4's ``ranef(condVar = TRUE)``).
Convergence is judged as lme4's ``checkConv``: a central-difference gradient and Hessian of the deviance
at the optimum (step 1e-4), the scaled gradient max(min(|H⁻¹ᐟ² g|, |g|)) < 0.002 — here over the
parameters off the boundary, where lme4 skips the check for singular fits; a Hessian that is not positive
definite is a warning only. An optimum failing the check gets one restart from near it; the lowest
deviance is kept. A fit is singular (lme4's ``isSingular``, tol 1e-4) when a diagonal θ is below 1e-4,
and here also when a random-effect correlation exceeds 0.999 in absolute value. A model that reproduces
the outcome exactly (zero residual variance: unbounded likelihood) is a failure, not a fit.

Missing values are not handled here: the design has none (validation removed those rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.linalg import LOG_2PI, GroupGram, backward_groups, factor_groups, forward_shared
from longitudinal.fit.lmm.checks import check_identifiable, exact_fit_failure
from longitudinal.fit.lmm.crossproducts import CrossProducts, PatternProducts, compute_crossproducts, group_patterns
from longitudinal.fit.optimize import minimize_deviance
from longitudinal.fit.theta import ThetaLayout, block_covariances, lambda_at, layout_theta
from longitudinal.model.design import Design
from longitudinal.records import EngineResult, FactorRanef, OptimizerAttempt


# ------------------------------------------------------------------------------------------- deviance


@dataclass(frozen=True, eq=False)
class _Solution:
    """The penalized least-squares solution at one θ (what the deviance and the estimates need)."""

    deviance: float
    r2: float
    logdet_M: float  # log|M| = log|Λ'Z'ZΛ + I| (lme4's ldL2)
    chol_S: np.ndarray  # Cholesky factor of [A b; b' c] ((p + 1) × (p + 1))
    chol_M: np.ndarray  # (q, q, G): L_g, lower triangle
    R: np.ndarray  # (q, G, p + 1): L_g⁻¹ Λ' Z_g'[X_g y_g]
    lam: np.ndarray


def one_factor_deviance(
    source: Design | CrossProducts | PatternProducts, theta: np.ndarray, reml: bool,
) -> float:
    """The ML deviance or REML criterion at ``theta`` for one grouping factor (see ``fit.lmm.profiled_deviance``);
    ``inf`` where the penalized residual sum of squares is not positive."""
    if isinstance(source, PatternProducts):
        return _pattern_deviance(source, lambda_at(source.block_sizes, theta), reml)
    products = source if isinstance(source, CrossProducts) else compute_crossproducts(source)
    solution = solve_at(products, lambda_at(products.block_sizes, theta), reml)
    return solution.deviance if solution is not None else math.inf


def solve_at(products: CrossProducts, lam: np.ndarray, reml: bool) -> _Solution | None:
    """Penalized least squares at Λ; None where r² ≤ 0 or a factorization fails.

    The Cholesky factor of the augmented S = [A b; b' c] holds everything: its leading p × p block is
    RX (A = RX RX'), its last row (w', r) with RX w = b and r² = c − w'w, the penalized RSS.
    """
    chol_M, R, logdet_M = factor_groups(products.ZtZ, products.ZtXy, lam)
    q, G, k = R.shape
    flat = R.reshape(q * G, k)
    profiled = profiled_criterion(products.XytXy - flat.T @ flat, logdet_M, products.n_obs, reml)
    if profiled is None:
        return None
    deviance, r2, chol_S = profiled
    return _Solution(deviance=deviance, r2=r2, logdet_M=logdet_M, chol_S=chol_S, chol_M=chol_M, R=R, lam=lam)


def gram_deviance(products: CrossProducts, gram: GroupGram, lam: np.ndarray, reml: bool) -> float:
    """``solve_at``'s deviance at Λ from ``gram`` (``products``' groups, q ≤ 2); inf where undefined."""
    logdet_M, RtR = gram.at(lam)
    profiled = profiled_criterion(products.XytXy - RtR, logdet_M, products.n_obs, reml)
    return profiled[0] if profiled is not None else math.inf


def _pattern_deviance(patterns: PatternProducts, lam: np.ndarray, reml: bool) -> float:
    """The deviance at Λ from the pattern sums (``solve_at``'s value, evaluated per pattern); inf where undefined."""
    found = pattern_gram(patterns, lam)
    if found is None:
        return math.inf
    logdet_M, RtR = found
    profiled = profiled_criterion(patterns.XytXy - RtR, logdet_M, patterns.n_obs, reml)
    return profiled[0] if profiled is not None else math.inf


def pattern_gram(patterns: PatternProducts, lam: np.ndarray) -> tuple[float, np.ndarray] | None:
    """log|M| and Σ_g R_g'R_g at Λ from the pattern sums: with C_P = Λ M_P⁻¹ Λ', Σ_g R_g'R_g = Σ_P Σ_ij C_P[i, j]
    Σ_{g ∈ P} W_g[i]'W_g[j]. None where an M_P is not factorable."""
    M = lam.T @ patterns.ZtZ @ lam + np.eye(lam.shape[0])  # (P, q, q)
    try:
        L = np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        return None
    logdet_M = 2.0 * float(patterns.counts @ np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1))
    T = np.linalg.solve(L, np.broadcast_to(lam.T, M.shape))  # L_P⁻¹ Λ'
    C = np.swapaxes(T, 1, 2) @ T  # Λ M_P⁻¹ Λ'
    k = patterns.XytXy.shape[0]
    return logdet_M, (C.reshape(-1) @ patterns.WtW).reshape(k, k)


def profiled_criterion(S: np.ndarray, logdet_M: float, n: int, reml: bool) -> tuple[float, float, np.ndarray] | None:
    """Deviance, r² and the Cholesky factor of S = [A b; b' c]; None where r² ≤ 0 or S is not factorable."""
    p = S.shape[0] - 1
    try:
        chol_S = np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        return None
    r2 = float(chol_S[p, p]) ** 2
    if not (r2 > 0.0 and math.isfinite(r2) and math.isfinite(logdet_M)):
        return None
    if reml:
        logdet_A = 2.0 * float(np.log(np.diagonal(chol_S)[:p]).sum())
        dof = n - p
        deviance = logdet_M + logdet_A + dof * (1.0 + LOG_2PI + math.log(r2 / dof))
    else:
        deviance = logdet_M + n * (1.0 + LOG_2PI + math.log(r2 / n))
    return deviance, r2, chol_S


# ------------------------------------------------------------------------------------------- fitting


def fit_one_factor(
    design: Design, *, reml: bool, ranef_map: np.ndarray, start: np.ndarray | None = None,
) -> EngineResult:
    """``fit_lmm`` for one grouping factor on a design as given (no standardization); the random effects
    are reported for Z B⁻¹, B = ``ranef_map`` (see ``_Optimum``). ``start``: θ to start the optimizer from
    (``fit.optimize.minimize_deviance``), lme4's start when None."""
    check_identifiable(design)
    return _assemble(design, _optimize(design, reml=reml, ranef_map=ranef_map, start=start))


@dataclass(frozen=True, eq=False)
class _Optimum:
    """The fit at the optimum θ, all but what has one value per row: β, σ², vcov(β) and, per group, the
    spherical modes u_g, the conditional modes b'_g = BΛ u_g and their conditional SDs.

    The conditional modes and SDs are those of the random effects of Z B⁻¹ (B = ``ranef_map`` in
    ``_optimize``: b' = B b for the modes b of the design's Z), the original design's when the design is its
    standardized copy: their conditional covariance σ² (BΛ) M⁻¹ (BΛ)' needs B inside, not after.
    """

    reml: bool
    layout: ThetaLayout
    theta: np.ndarray
    deviance: float
    lam: np.ndarray
    sigma2: float
    beta: np.ndarray
    vcov: np.ndarray
    u: np.ndarray  # (q, G)
    modes: np.ndarray  # (G, q), for Z B⁻¹
    cond_sd: np.ndarray  # (G, q), for Z B⁻¹
    converged: bool
    message: str
    gradient_max: float
    attempts: tuple[OptimizerAttempt, ...]


def _optimize(design: Design, *, reml: bool, ranef_map: np.ndarray, start: np.ndarray | None) -> _Optimum:
    """θ by the optimizer, then the estimates that need the per-group factorization there.

    The cross-products, the optimizer's buffers and the factorization at the optimum (96 MB at 270,000
    subjects for ``(week | id)``, p = 5) live only in this call, so that they are released before the fitted
    values and residuals (one value per row) are formed: that is the fit's peak.
    """
    products = compute_crossproducts(design)
    layout = layout_theta(products.block_sizes)
    best, attempts = minimize_deviance(_deviance_function(products, layout, reml), layout, start=start)
    theta = best.theta
    solution = solve_at(products, layout.lambda_matrix(theta), reml)
    if solution is None:
        raise FitFailure("the deviance is not finite at the optimum; check the data and the formula", attempts)
    n, p = products.n_obs, products.n_fixed
    sigma2 = solution.r2 / (n - p if reml else n)
    RX = solution.chol_S[:p, :p]
    RX_inv = np.linalg.solve(RX, np.eye(p))  # small p × p; triangular, but LAPACK's general solve is exact enough
    beta = RX_inv.T @ solution.chol_S[p, :p]
    v = solution.R @ np.append(-beta, 1.0)  # cu_g − RZX_g β, (q, G): one contiguous product
    u = backward_groups(solution.chol_M, v)
    lam_out = ranef_map @ solution.lam
    T = forward_shared(solution.chol_M, lam_out.T)  # L_g⁻¹ (BΛ)', (q, q, G)
    return _Optimum(
        reml=reml, layout=layout, theta=theta, deviance=solution.deviance, lam=solution.lam, sigma2=sigma2, beta=beta,
        vcov=sigma2 * (RX_inv.T @ RX_inv), u=u, modes=(lam_out @ u).T,
        cond_sd=np.sqrt(sigma2 * np.einsum("ijg,ijg->gj", T, T)), converged=best.converged, message=best.message,
        gradient_max=best.gradient_max, attempts=attempts,
    )


def _deviance_function(products: CrossProducts, layout: ThetaLayout, reml: bool) -> Callable[[np.ndarray], float]:
    """The optimizer's deviance of θ: by visit pattern when the subjects share few, else block by block of
    groups for q ≤ 2 (``GroupGram``'s buffers, 26 MB at 270,000 subjects, go with the function), else group by
    group."""
    patterns = group_patterns(products)
    gram = GroupGram(products.ZtZ, products.ZtXy) if patterns is None and products.n_random <= 2 else None

    def deviance(theta: np.ndarray) -> float:
        if patterns is not None:  # subjects sharing their visit pattern share their factorization
            return _pattern_deviance(patterns, layout.lambda_matrix(theta), reml)
        if gram is not None:
            return gram_deviance(products, gram, layout.lambda_matrix(theta), reml)
        solution = solve_at(products, layout.lambda_matrix(theta), reml)
        return solution.deviance if solution is not None else math.inf
    return deviance


def _assemble(design: Design, optimum: _Optimum) -> EngineResult:
    """The engine's result: the optimum's estimates with σ, the covariance per bar, the fitted values and
    residuals (from ``design``'s X and Z: the standardized ones when it is the standardized copy)."""
    o = optimum
    fitted = design.X @ o.beta
    random = _random_part(design, (o.lam @ o.u).T)  # b_g = Λ u_g
    fitted += random
    residuals = np.subtract(design.y, fitted, out=random)  # the random part's buffer, read already

    # r² recomputed from the residuals (no cancellation): rounding noise in the profiled r² can look like
    # a tiny but positive residual variance when the model reproduces the outcome exactly.
    r2_direct = float(residuals @ residuals + np.sum(o.u * o.u))
    sigma = math.sqrt(o.sigma2)
    exact_fit_failure(r2_direct, design.y, sigma, o.attempts)

    covariances, singular = block_covariances(o.layout, o.theta, o.sigma2)
    return EngineResult(
        reml=o.reml, theta=o.theta, deviance=o.deviance, beta=o.beta, vcov=o.vcov, sigma=sigma,
        covariances=tuple(covariances), modes=o.modes, cond_sd=o.cond_sd, fitted=fitted, residuals=residuals,
        converged=o.converged, singular=singular, messages=tuple(m for m in o.message.split("; ") if m),
        gradient_max=o.gradient_max, evaluations=sum(a.iterations for a in o.attempts), attempts=o.attempts,
        ranef=(FactorRanef(
            group=design.group, levels=design.levels, terms=tuple(t for b in design.blocks for t in b.terms),
            modes=o.modes, cond_sd=o.cond_sd,
        ),),
    )


def _random_part(design: Design, modes: np.ndarray) -> np.ndarray:
    """Z b per row, Σ_i z_i b_i[group], column by column: no n × q copy of Z or of the modes by row."""
    columns = [block.Z[:, j] for block in design.blocks for j in range(block.Z.shape[1])]
    by_term = np.ascontiguousarray(modes.T)
    total = np.take(by_term[0], design.codes)
    total *= columns[0]
    term = np.empty_like(total)
    for i in range(1, len(columns)):
        np.take(by_term[i], design.codes, out=term)
        term *= columns[i]
        total += term
    return total


