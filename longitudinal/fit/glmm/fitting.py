"""glmer's estimation on a (standardized) design: the GLM start, the two stages, the checks, the estimates.

``fit_standardized`` runs, on an engine's deviance (``LaplaceProblem``: ``OneFactorLaplace`` for one grouping
factor, ``SparseLaplace`` for several):

1. (``start_beta``, before the engine is built) the GLM of y on X, which starts β and screens for
   separation (a failure);
2. stage 1, θ by BOBYQA on glmer's nAGQ = 0 deviance (β and u jointly by PIRLS), from lme4's θ start;
3. stage 2, (θ, β) by BOBYQA on the Laplace deviance (or the AGQ deviance for nAGQ > 1), from stage 1's
   θ and joint β; lme4's boundary snap (here within 1e-2, only where the deviance is lower);
4. lme4's derivatives over (θ, β) at the optimum (``optimizer.derivatives``), its ``checkConv``, a Newton
   step from the finite-difference Hessian (with fresh derivatives while the scaled gradient fails the
   check, at most ``POLISH_STEPS`` times), and vcov(β) = 2 (H⁻¹)_ββ (lme4's ``use.hessian = TRUE``),
   falling back to the RX-based (RXᵀRX)⁻¹ when that is not positive definite, with lme4's warning;
5. the conditional modes b = Λu with their conditional SDs from the Laplace approximation
   (sqrt diag Λ M_g⁻¹ Λᵀ), and the fitted means μ̂ = g⁻¹(Xβ + Zb) and response residuals y − μ̂.

The deviance reported is −2 × glmer's logLik: the Laplace deviance with the full log-density (Poisson's
log y! included); with nAGQ > 1 the quadrature's −2 log-likelihood on the same scale (for binomial 0/1 data
glmer's scale; glmer's Poisson AGQ logLik leaves out Σ log p(y | μ = y), see ``longitudinal.fit.glmm``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.glmm.families import Family
from longitudinal.fit.glmm.problem import LaplaceProblem
from longitudinal.fit.glmm.optimizer import (
    Convergence, bobyqa, check_convergence, derivatives, free_parameters,
)
from longitudinal.fit.glmm.separation import glm_start, separating_direction, separation_failure
from longitudinal.fit.theta import ThetaLayout, block_covariances
from longitudinal.records import EngineResult, OptimizerAttempt

#: Newton steps from the finite-difference Hessian, with fresh derivatives, when BOBYQA's answer fails the
#: gradient check (one step without fresh derivatives otherwise).
POLISH_STEPS = 3
#: A Newton step that would lower the deviance by less than this (gᵀH⁻¹g) is not taken.
NEGLIGIBLE_DECREASE = 1e-10
#: A diagonal θ this close to 0 is tried at 0 (kept if the deviance is lower; lme4 tries within 1e-5).
BOUNDARY_POLISH = 1e-2
#: lme4's warning when the Hessian-based vcov cannot be used (``vcov.merMod``).
VCOV_FALLBACK = ("variance-covariance matrix computed from finite-difference Hessian is not positive definite "
                 "or contains NA values: falling back to var-cov estimated from RX")


@dataclass(frozen=True, eq=False)
class _Optimum:
    params: np.ndarray
    deviance: float
    hessian: np.ndarray
    check: Convergence
    evaluations: int


def start_beta(X: np.ndarray, y: np.ndarray, weights: np.ndarray, family: Family, names: tuple[str, ...],
               fixed_map: np.ndarray) -> np.ndarray:
    """β of the GLM without random effects; raises ``FitFailure`` when the data are separated (an infinite β),
    naming the terms in the data's units (``fixed_map`` A: β = A β' for the standardized X)."""
    beta, at_edge = glm_start(X, y, weights, family)
    if at_edge:
        direction = separating_direction(X, y, family)
        if direction is not None:
            raise separation_failure(names, fixed_map @ direction, family)
    return beta


def fit_standardized(problem: LaplaceProblem, layout: ThetaLayout, *, nagq: int, ranef_map: np.ndarray,
                     y: np.ndarray, family: Family) -> EngineResult:
    """Stages 1 and 2, the checks and the estimates (module docstring) on ``problem``'s deviance."""
    began = time.perf_counter()
    stage1 = bobyqa(problem.joint_deviance, layout.start(), np.asarray(layout.lower), np.full(layout.size, 0.2),
                        xtol=np.full(layout.size, 1e-4), ftol=1e-4)
    attempts = [_attempt("bobyqa (stage 1: θ, nAGQ = 0)", stage1.value, stage1.status == "", stage1.evaluations,
                         began, stage1.status)]
    if not math.isfinite(stage1.value):
        raise FitFailure("PIRLS failed at every θ tried in glmer's first stage (nAGQ = 0); check the outcome "
                         "and the formula", tuple(attempts))
    problem.joint_deviance(stage1.x)  # the joint β at stage 1's θ (the last evaluation may be elsewhere)
    start = np.concatenate([stage1.x, problem.joint_beta])

    began = time.perf_counter()
    optimum, status = _stage2(problem, layout, start)
    attempts.append(_attempt(
        f"bobyqa (stage 2: θ and β, {'Laplace' if nagq == 1 else f'nAGQ = {nagq}'})", optimum.deviance,
        optimum.check.converged and status == "", optimum.evaluations, began,
        "; ".join(filter(None, (status, *optimum.check.notes))),
    ))
    if not math.isfinite(optimum.deviance):
        raise FitFailure("PIRLS failed at every (θ, β) tried in glmer's second stage; check the outcome and "
                         "the formula", tuple(attempts))
    return _assemble(problem, layout, optimum, status, tuple(attempts), ranef_map=ranef_map, y=y, family=family)


def _attempt(name: str, deviance: float, converged: bool, evaluations: int, began: float,
             message: str) -> OptimizerAttempt:
    finite = math.isfinite(deviance)
    return OptimizerAttempt(optimizer=name, loglik=-0.5 * deviance if finite else math.nan,
                            converged=converged and finite, iterations=evaluations,
                            seconds=time.perf_counter() - began, message=message)


class _Counted:
    """A deviance function that counts its evaluations."""

    def __init__(self, deviance: Callable[[np.ndarray], float]) -> None:
        self.deviance = deviance
        self.evaluations = 0

    def __call__(self, x: np.ndarray) -> float:
        self.evaluations += 1
        return self.deviance(x)


def _stage2(problem: LaplaceProblem, layout: ThetaLayout, start: np.ndarray) -> tuple[_Optimum, str]:
    """BOBYQA over (θ, β) from ``start``, the boundary snap, derivatives and Newton polish.

    BOBYQA works in coordinates scaled by its initial steps: 0.02 for θ, a fifth of β's RX-based standard
    error at the start (as lme4's ``optwrap`` scales Nelder–Mead's for glmer's stage 2).
    """
    deviance = _Counted(problem.deviance)
    lower = np.concatenate([np.asarray(layout.lower), np.full(problem.n_fixed, -np.inf)])
    unscaled = problem.unscaled_vcov(start)
    se = np.sqrt(np.clip(np.diagonal(unscaled), 1e-12, None)) if unscaled is not None else np.full(problem.n_fixed, 0.1)
    se = np.minimum(se, 10.0)
    steps = np.concatenate([np.full(layout.size, 0.02), 0.2 * se])
    xtol = np.concatenate([np.full(layout.size, 1e-7), 1e-6 * se])
    found = bobyqa(deviance, start, lower, steps, xtol=xtol, ftol=1e-9)
    x, value = found.x, found.value
    if not math.isfinite(value):
        return _Optimum(x, value, np.full((x.shape[0],) * 2, math.nan), Convergence(False, False, math.nan, ()),
                        deviance.evaluations), found.status
    x, value = _snap_to_boundary(deviance, layout, x, value)
    for attempt in range(POLISH_STEPS + 1):
        with problem.fixed_start(x):
            value = deviance(x)
            gradient, hessian = derivatives(deviance, x, value)
        check = check_convergence(layout, x, gradient, hessian)
        moved = _newton_step(deviance, layout, x, value, gradient, hessian)
        if moved is not None:
            x, value = moved
        if check.converged or check.singular or moved is None or attempt == POLISH_STEPS:
            break
    return _Optimum(x, value, hessian, check, deviance.evaluations), found.status


def _snap_to_boundary(deviance: Callable[[np.ndarray], float], layout: ThetaLayout, x: np.ndarray,
                      value: float) -> tuple[np.ndarray, float]:
    """lme4's ``check.boundary``, wider (as the LMM engine's): a diagonal θ within ``BOUNDARY_POLISH`` of 0
    moves onto 0 where the deviance is lower there."""
    near = np.flatnonzero(layout.diagonal & (x[:layout.size] > 0.0) & (x[:layout.size] < BOUNDARY_POLISH))
    for i in near:
        trial = x.copy()
        trial[i] = 0.0
        trial_value = deviance(trial)
        if trial_value < value:
            x, value = trial, trial_value
    return x, value


def _newton_step(deviance: Callable[[np.ndarray], float], layout: ThetaLayout, x: np.ndarray, value: float,
                 gradient: np.ndarray, hessian: np.ndarray) -> tuple[np.ndarray, float] | None:
    """x − H⁻¹g over the parameters off the boundary, halved until the deviance falls (diagonal θ kept ≥ 0);
    None where H is not positive definite there, the step is negligible or no step helps.

    BOBYQA stops where its trust region is small, which in flat directions of the deviance can leave β a
    few 1e-5 (relative) from the optimum; one Newton step with the Hessian already computed for vcov(β)
    takes it the rest of the way for one evaluation. The derivatives are not recomputed at the new point
    (its gradient is H times a step of ~1e-3 standard errors, predicted 0) unless the check failed.
    """
    free = free_parameters(layout, x)
    try:
        chol = np.linalg.cholesky(hessian[np.ix_(free, free)])
    except np.linalg.LinAlgError:
        return None
    step = np.zeros_like(x)
    step[free] = -np.linalg.solve(chol.T, np.linalg.solve(chol, gradient[free]))
    if -float(gradient @ step) < NEGLIGIBLE_DECREASE:
        return None
    diagonal = np.concatenate([layout.diagonal, np.zeros(x.shape[0] - layout.size, dtype=bool)])
    for _ in range(10):
        trial = x + step
        trial[diagonal] = np.maximum(trial[diagonal], 0.0)
        trial_value = deviance(trial)
        if trial_value < value:
            return trial, trial_value
        step = step / 2.0
    return None


def _vcov(hessian: np.ndarray, k_theta: int, unscaled: np.ndarray | None) -> tuple[np.ndarray, str | None]:
    """lme4's vcov(β) for glmer: 2 (H⁻¹)_ββ of the deviance's Hessian over (θ, β), or (RXᵀRX)⁻¹ with lme4's
    warning where that is not finite and positive definite."""
    p = hessian.shape[0] - k_theta
    if p == 0:
        return np.empty((0, 0)), None
    try:
        inverse = np.linalg.inv(hessian)[k_theta:, k_theta:]
        V = inverse + inverse.T
        if np.all(np.isfinite(V)) and np.linalg.eigvalsh(V).min() > 0.0:
            return V, None
    except np.linalg.LinAlgError:
        pass
    if unscaled is None:
        return np.full((p, p), math.nan), VCOV_FALLBACK
    return unscaled, VCOV_FALLBACK


def _assemble(problem: LaplaceProblem, layout: ThetaLayout, optimum: _Optimum, status: str,
              attempts: tuple[OptimizerAttempt, ...], *, ranef_map: np.ndarray, y: np.ndarray,
              family: Family) -> EngineResult:
    """The engine's record at the optimum, in the standardized design's units (``fit_glmm`` restores them)."""
    x = optimum.params
    theta, beta = x[:layout.size], x[layout.size:]
    random = problem.random_part(x, ranef_map)
    vcov, vcov_note = _vcov(optimum.hessian, layout.size, random.unscaled_vcov)
    covariances, singular = block_covariances(layout, theta, 1.0)
    fitted = family.mean(random.eta)
    messages = [m for m in (status, *optimum.check.notes, vcov_note) if m]
    return EngineResult(
        reml=False, theta=theta, deviance=optimum.deviance, beta=beta, vcov=vcov, sigma=1.0,
        covariances=tuple(covariances), modes=random.modes, cond_sd=random.cond_sd, fitted=fitted,
        residuals=y - fitted, converged=optimum.check.converged and status == "", singular=singular,
        messages=tuple(messages), gradient_max=optimum.check.gradient_max,
        evaluations=sum(a.iterations for a in attempts), attempts=attempts, ranef=random.ranef,
    )
