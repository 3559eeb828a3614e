"""Fit one structured-covariance model (MMRM) by ML or REML: quasi-Newton over θ from an OLS start.

BFGS (scipy) on −ℓ with the analytic gradient of ``likelihood.evaluate`` (σ² profiled for the homogeneous
structures), started from the structure's θ closest to the covariance of the OLS residuals (pairwise over
the subjects observed at both visits). Converged means: the optimizer stopped normally or for lost
precision, and the largest gradient entry of ℓ over the optimized parameters is below ``GRADIENT_TOL``
(θ is on log-SD and unbounded-correlation scales, so that is a statement about ℓ, not about units).
A run that stops short gets one L-BFGS-B restart from where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from longitudinal.fit.covariance.likelihood import Evaluation, PatternGroups, evaluate
from longitudinal.fit.covariance.structures import CovarianceStructure
from longitudinal.fit.failure import FitFailure
from longitudinal.records import OptimizerAttempt

#: Largest |dℓ/dθ_k| accepted at an optimum.
GRADIENT_TOL = 1e-3
MAX_ITERATIONS = 2_000


@dataclass(frozen=True, eq=False)
class CovarianceFit:
    """One MMRM fit. ``theta`` in the structure's layout (``structures``; log σ̂ filled in when σ² was
    profiled, ``profiled_scale``); ``vcov`` = (Σ X_iᵀ Σ_i⁻¹ X_i)⁻¹ at θ̂; ``covariance`` is Σ̂ over the m
    visits (for sp_exp: two visits one time unit apart, as mmrm prints it). ``loglik`` is the maximized
    ML or REML log-likelihood (``likelihood``'s constants); ``n_params`` = fixed effects + covariance
    parameters. ``gradient_max`` is max |dℓ/dθ| at θ̂ over the parameters optimized."""

    structure: str
    n_visits: int
    reml: bool
    theta: np.ndarray
    beta: np.ndarray
    vcov: np.ndarray
    covariance: np.ndarray
    loglik: float
    n_params: int
    n_obs: int
    n_subjects: int
    n_patterns: int
    profiled_scale: bool
    converged: bool
    gradient_max: float
    optimizer: str
    iterations: int
    evaluations: int
    message: str
    attempts: tuple[OptimizerAttempt, ...]
    seconds: float


def fit_covariance(groups: PatternGroups, structure: CovarianceStructure, *, reml: bool) -> CovarianceFit:
    """Maximize the ML (``reml=False``) or REML log-likelihood of ``groups`` under ``structure``.

    Raises ``FitFailure`` when ℓ cannot be evaluated at the start (X not of full column rank, or a
    covariance that is numerically singular there).
    """
    began = time.perf_counter()
    profile = structure.homogeneous
    start = structure.start(residual_covariance(groups, structure))
    x0 = start[1:] if profile else start

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        try:
            at = evaluate(structure, groups, params, reml=reml, profile=profile)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros_like(params)
        if not math.isfinite(at.loglik):
            return math.inf, np.zeros_like(params)
        return -at.loglik, -at.gradient

    if not math.isfinite(objective(x0)[0]):
        raise FitFailure(f"structure {structure.name!r}: the likelihood cannot be evaluated at the start "
                         "(are the fixed-effect columns linearly independent?)")
    attempts: list[OptimizerAttempt] = []
    x, iterations, evaluations, message = x0, 0, 0, ""
    best: Evaluation | None = None
    for method in ("BFGS", "L-BFGS-B"):
        t0 = time.perf_counter()
        options = {"gtol": 1e-6, "maxiter": MAX_ITERATIONS} if method == "BFGS" else \
            {"gtol": 1e-8, "ftol": 1e-15, "maxiter": MAX_ITERATIONS, "maxcor": 30}
        result = minimize(objective, x, jac=True, method=method, options=options)
        x = result.x
        iterations += int(result.nit)
        evaluations += int(result.nfev)
        best = evaluate(structure, groups, x, reml=reml, profile=profile)
        gradient_max = float(np.max(np.abs(best.gradient))) if best.gradient.size else 0.0
        settled = gradient_max < GRADIENT_TOL
        message = f"{method}: {result.message}; max|grad| {gradient_max:.2e}"
        attempts.append(OptimizerAttempt(
            optimizer=method, loglik=best.loglik, converged=settled, iterations=int(result.nit),
            seconds=time.perf_counter() - t0, message=str(result.message),
        ))
        if settled:
            break
    assert best is not None
    return CovarianceFit(
        structure=structure.name, n_visits=structure.n_visits, reml=reml, theta=best.theta, beta=best.beta,
        vcov=best.vcov, covariance=fitted_covariance(structure, best.theta), loglik=best.loglik,
        n_params=groups.n_fixed + structure.n_params, n_obs=groups.n_obs, n_subjects=groups.n_subjects,
        n_patterns=len(groups.patterns), profiled_scale=profile, converged=attempts[-1].converged,
        gradient_max=gradient_max, optimizer=attempts[-1].optimizer, iterations=iterations,
        evaluations=evaluations, message=message, attempts=tuple(attempts),
        seconds=time.perf_counter() - began,
    )


def fitted_covariance(structure: CovarianceStructure, theta: np.ndarray) -> np.ndarray:
    """Σ(θ) over the m visits; for sp_exp over two visits one time unit apart."""
    return structure.covariance(theta, np.array([0.0, 1.0]) if structure.spatial else None)


def residual_covariance(groups: PatternGroups, structure: CovarianceStructure) -> np.ndarray:
    """The covariance of the OLS residuals: m × m, each entry averaged over the subjects observed at both
    visits (pairs never observed together get 0; the structure's ``start`` makes it positive definite).
    For sp_exp, 2 × 2 at one time unit, with the correlation exp(−1/d̄), d̄ the mean gap between visits."""
    p = groups.n_fixed
    XtX = sum(np.einsum("sgp,sgq->pq", pt.X, pt.X) for pt in groups.patterns)
    Xty = sum(np.einsum("sgp,sg->p", pt.X, pt.y) for pt in groups.patterns)
    beta = np.linalg.lstsq(np.asarray(XtX).reshape(p, p), np.asarray(Xty).reshape(p), rcond=None)[0]
    residuals = [pt.y - np.tensordot(pt.X, beta, axes=(2, 0)) for pt in groups.patterns]
    if structure.spatial:
        variance = sum(float(np.sum(r * r)) for r in residuals) / groups.n_obs
        gaps = [np.diff(pt.coords.astype(float)) for pt in groups.patterns if pt.coords.size > 1]
        gap = float(np.mean(np.concatenate(gaps))) if gaps else 1.0
        rho = math.exp(-1.0 / max(gap, 1e-8))
        return variance * np.array([[1.0, rho], [rho, 1.0]])
    m = structure.n_visits
    total = np.zeros((m, m))
    count = np.zeros((m, m))
    for pt, r in zip(groups.patterns, residuals):
        index = np.ix_(pt.coords, pt.coords)
        total[index] += r @ r.T
        count[index] += r.shape[1]
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)
