"""Fit one structured-covariance model (MMRM, or random effects + a serial structure) by ML or REML.

BFGS (scipy) on −ℓ with the analytic gradient of ``likelihood.evaluate`` (σ² profiled for the homogeneous
structures), on standardized columns (``units``: the answer is the same in any units), started from the
structure's θ closest to the covariance of the OLS residuals (pairwise over the subjects observed at both
visits) and, with random effects, Λ = I relative to σ (lme4's start; for the heterogeneous structures half
the residual variance each to Σ and G).

Converged means: the largest gradient entry of ℓ over the optimized parameters is below ``GRADIENT_TOL``
(θ is on log-SD, unbounded-correlation and Cholesky scales, so that is a statement about ℓ, not about
units), or, where ℓ's rounding (about 1e-13 relative, i.e. 1e-8 at 100,000 rows) keeps the gradient of a
sharply curved ℓ above that, lme4's scaled gradient L⁻¹g (−H = LLᵀ) is. The optimizer stops as soon as
the gradient passes and ℓ no longer moves (``STALL_TOL``), rather than spending its line search on
rounding. A run that stops short gets one L-BFGS-B restart from where it stopped.

A random-effect variance at 0 is approached on the Cholesky scale, where ℓ is flat (even in Λ_jj): a
diagonal entry of Λ left near 0 is tried at 0 (lme4's boundary check), and a fit with one below
``SINGULAR_TOL`` relative to the residual SD is ``singular``; there, as lme4 does, the gradient test leaves
out Λ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular
from scipy.optimize import OptimizeResult, minimize

from longitudinal.errors import ConfigError
from longitudinal.fit.covariance.grouping import PatternGroups, VisitPattern
from longitudinal.fit.covariance.likelihood import Evaluation, evaluate, factor_entries, factor_size, lower_factor
from longitudinal.fit.covariance.prediction import predict
from longitudinal.fit.covariance.structures import CovarianceStructure, unbounded_from
from longitudinal.fit.covariance.units import standardize
from longitudinal.fit.failure import FitFailure
from longitudinal.records import OptimizerAttempt

#: Largest |dℓ/dθ_k| accepted at an optimum (or largest entry of lme4's scaled gradient, see ``Check``).
GRADIENT_TOL = 1e-3
#: The optimizer stops once the gradient passes and an iteration gains less than this, relative, in ℓ.
STALL_TOL = 1e-10
DERIVATIVE_STEP = 1e-4
#: A diagonal entry of Λ within this of 0 (relative to the residual SD) is tried at 0 (``fit.optimize``'s value).
BOUNDARY_POLISH = 1e-2
MAX_ITERATIONS = 2_000
#: lme4's ``isSingular`` tolerance: a diagonal entry of Λ (relative to the residual SD) below it.
SINGULAR_TOL = 1e-4
#: The structures that may sit next to random effects: the serial ones. The others already contain what a
#: random intercept adds (cs, toep: a constant correlation; us, csh, toeph: any), so G would not be identified.
WITH_RANDOM_EFFECTS = ("ar1", "ar1h", "ad", "adh", "sp_exp")


@dataclass(frozen=True, eq=False)
class CovarianceFit:
    """One fit, in the data's units. ``theta`` is the structure's θ in its layout (``structures``; log σ̂
    filled in when σ² was profiled, ``profiled_scale``) and ``random_factor`` Λ (q × q lower triangular,
    diagonal ≥ 0; relative to σ for the homogeneous structures), so G = ``random_covariance`` = σ²ΛΛᵀ (or
    ΛΛᵀ); ``vcov`` = (Σ X_iᵀ V_i⁻¹ X_i)⁻¹ at θ̂; ``covariance`` is the residual structure's Σ̂ over the m
    visits (for sp_exp: two visits one time unit apart, as mmrm prints it), without Z G Zᵀ. ``loglik`` is
    the maximized ML or REML log-likelihood (``likelihood``'s constants); ``n_params`` = fixed effects +
    structure parameters + q(q + 1)/2 (nlme's logLik df). ``gradient_max`` is max |dℓ/dθ| at θ̂ over the
    parameters optimized (the standardized problem's).

    Per row, in the input's order: ``fitted`` = X β̂ + Z b̂, ``residuals`` = y − fitted, and
    ``normalized_residuals`` (``prediction``: nlme's type "normalized"). Per subject, in the order of
    ``subjects``: ``modes`` b̂_i (n_subjects, q) and ``cond_sd`` their conditional SDs. ``sigma`` is σ̂ for
    the homogeneous structures (Σ = σ² R), NaN for the others.
    """

    structure: str
    n_visits: int
    reml: bool
    theta: np.ndarray
    random_factor: np.ndarray
    random_covariance: np.ndarray
    beta: np.ndarray
    vcov: np.ndarray
    covariance: np.ndarray
    sigma: float
    loglik: float
    n_params: int
    n_obs: int
    n_subjects: int
    n_patterns: int
    profiled_scale: bool
    converged: bool
    singular: bool
    gradient_max: float
    optimizer: str
    iterations: int
    evaluations: int
    message: str
    attempts: tuple[OptimizerAttempt, ...]
    seconds: float
    fitted: np.ndarray
    residuals: np.ndarray
    normalized_residuals: np.ndarray
    subjects: np.ndarray
    modes: np.ndarray
    cond_sd: np.ndarray

    @property
    def full_theta(self) -> np.ndarray:
        """θ̂ in ``likelihood``'s layout (structure θ, then Λ's entries): ``log_likelihood`` at it is ``loglik``."""
        return np.concatenate([self.theta, factor_entries(self.random_factor)])

    def residual_covariance(self, coords: np.ndarray | None = None) -> np.ndarray:
        """The fitted residual structure's covariance (σ² R or Σ(θ̂), no random-effects part) over the visit
        indices ``coords`` (default all m visits), or for sp_exp over the times ``coords`` (required)."""
        return CovarianceStructure(self.structure, self.n_visits).covariance(self.theta, coords)


def fit_covariance(groups: PatternGroups, structure: CovarianceStructure, *, reml: bool) -> CovarianceFit:
    """Maximize the ML (``reml=False``) or REML log-likelihood of ``groups`` under ``structure`` (and the
    random effects of ``groups.n_random`` columns of Z, if any).

    Raises ``ConfigError`` for random effects next to a structure that contains them already (us, cs, csh,
    toep, toeph), ``FitFailure`` when ℓ cannot be evaluated at the start (X not of full column rank, or a
    covariance that is numerically singular there).
    """
    began = time.perf_counter()
    q = groups.n_random
    if q and structure.name not in WITH_RANDOM_EFFECTS:
        raise ConfigError(
            f"covariance structure {structure.name!r} cannot be combined with random effects: it already allows "
            f"what they add, so their variance is not identified; next to random effects use one of "
            f"{', '.join(WITH_RANDOM_EFFECTS)}")
    scaled, units = standardize(groups)
    objective = Objective(structure, scaled, reml=reml)
    x = start(scaled, structure)[1 if objective.profile else 0:]
    if not math.isfinite(objective(x)[0]):
        raise FitFailure(f"structure {structure.name!r}: the likelihood cannot be evaluated at the start "
                         "(are the fixed-effect columns linearly independent?)")
    check, attempts = _optimize(objective, x, groups.n_obs, units.loglik, reml=reml)
    final = attempts[-1]
    for other in alternative_starts(structure, x, check.at.theta, profiled=objective.profile, q=q):
        # a serial correlation next to random effects (or sp_exp's range) can trade off against them:
        # ℓ may have a second maximum at another correlation; keep the higher one
        if not math.isfinite(objective(other)[0]):
            continue
        other_check, other_attempts = _optimize(objective, other, groups.n_obs, units.loglik, reml=reml)
        attempts.extend(other_attempts)
        if other_check.at.loglik > check.at.loglik + 1e-9:
            check, final = other_check, other_attempts[-1]
    best = check.at
    own = structure.rescale(best.theta[:structure.n_params], units.y_scale)
    factor = units.factor(lower_factor(best.theta[structure.n_params:], q), relative=structure.homogeneous)
    sigma = float(np.exp(own[0])) if structure.homogeneous else math.nan
    at = predict(structure, scaled, best.theta, best.beta)
    cond = units.random_covariances(at.cond_covariance)
    return CovarianceFit(
        structure=structure.name, n_visits=structure.n_visits, reml=reml, theta=own, random_factor=factor,
        random_covariance=(sigma ** 2 if structure.homogeneous else 1.0) * (factor @ factor.T),
        beta=units.beta(best.beta), vcov=units.vcov(best.vcov), covariance=fitted_covariance(structure, own),
        sigma=sigma, loglik=units.loglik(best.loglik, groups.n_obs, reml=reml),
        n_params=groups.n_fixed + structure.n_params + factor_size(q), n_obs=groups.n_obs,
        n_subjects=groups.n_subjects, n_patterns=groups.n_visit_patterns, profiled_scale=objective.profile,
        converged=check.converged, singular=check.singular, gradient_max=check.gradient_max,
        optimizer=final.optimizer, iterations=sum(a.iterations for a in attempts),
        evaluations=objective.evaluations, message=f"{final.optimizer}: {final.message}",
        attempts=tuple(attempts), seconds=time.perf_counter() - began,
        fitted=units.y_shift + units.y_scale * at.fitted, residuals=units.y_scale * at.residuals,
        normalized_residuals=at.normalized, subjects=groups.subjects, modes=units.modes(at.modes),
        cond_sd=np.sqrt(np.maximum(np.diagonal(cond, axis1=1, axis2=2), 0.0)),
    )


def _optimize(
    objective: "Objective", x: np.ndarray, n_obs: int, loglik: Callable[..., float], *, reml: bool,
) -> tuple["Check", list[OptimizerAttempt]]:
    """BFGS from ``x``, then one L-BFGS-B restart if the end point fails the convergence test."""
    attempts: list[OptimizerAttempt] = []
    for method in ("BFGS", "L-BFGS-B"):
        t0 = time.perf_counter()
        options = {"gtol": 1e-5, "maxiter": MAX_ITERATIONS} if method == "BFGS" else \
            {"gtol": 1e-8, "ftol": 1e-15, "maxiter": MAX_ITERATIONS, "maxcor": 30}
        result = minimize(objective, x, jac=True, method=method, options=options, callback=objective.stalled)
        x = objective.snap_to_boundary(result.x)
        check = objective.check(x)
        stopped = "StopIteration" in str(result.message)  # our stop rule, not a failure
        attempts.append(OptimizerAttempt(
            optimizer=method, loglik=loglik(check.at.loglik, n_obs, reml=reml),
            converged=check.converged, iterations=int(result.nit), seconds=time.perf_counter() - t0,
            message=f"{'gradient passed, ℓ stalled' if stopped else result.message}; {check.verdict}",
        ))
        if check.converged:
            break
    return check, attempts


def alternative_starts(
    structure: CovarianceStructure, x: np.ndarray, found: np.ndarray, *, profiled: bool, q: int,
) -> list[np.ndarray]:
    """A second start where ℓ is known to have two maxima, on the other side of the one ``found`` (full θ)
    from the first start ``x``: with random effects, the AR(1) correlation started at 0.15 if the fit found
    it above 0.5, else at 0.85; sp_exp's range started 8 times shorter than the first start if the fit found
    a longer one, else 8 times longer. Empty for the other cases (one start, as mmrm)."""
    index = structure.log_sd_count - (1 if profiled else 0)  # the first correlation parameter in x
    value = float(found[structure.log_sd_count])
    if structure.name == "sp_exp":
        shifted = x[index] - math.log(8.0) if value >= x[index] else x[index] + math.log(8.0)
    elif q and structure.name in ("ar1", "ar1h"):
        rho = value / math.sqrt(1.0 + value * value)
        shifted = float(unbounded_from(np.array([0.15 if rho > 0.5 else 0.85]))[0])
    else:
        return []
    other = np.array(x, dtype=float)
    other[index] = shifted
    return [other]


@dataclass(frozen=True, eq=False)
class Check:
    """The convergence test at the optimizer's end point ``at``: ``gradient_max`` = max |dℓ/dθ| over the
    parameters tested (all but Λ's at a ``singular`` fit), ``scaled_gradient`` = max |L⁻¹ g| with
    −H = LLᵀ over them (computed only when the plain test fails; inf where −H is not positive definite)."""

    at: Evaluation
    singular: bool
    gradient_max: float
    scaled_gradient: float

    @property
    def converged(self) -> bool:
        return self.gradient_max < GRADIENT_TOL or self.scaled_gradient < GRADIENT_TOL

    @property
    def verdict(self) -> str:
        text = f"max|grad| {self.gradient_max:.2e}"
        if self.gradient_max >= GRADIENT_TOL:
            text += f", scaled {self.scaled_gradient:.2e}"
        if self.singular:
            text += "; singular fit: a random-effect variance is 0 (the gradient test leaves out G)"
        return text


class Objective:
    """−ℓ and −dℓ/dθ of the standardized problem for scipy (σ² profiled for the homogeneous structures),
    with the convergence test and the stop rule of the module docstring."""

    def __init__(self, structure: CovarianceStructure, groups: PatternGroups, *, reml: bool) -> None:
        self.structure, self.groups, self.reml = structure, groups, reml
        self.profile = structure.homogeneous
        self.evaluations = 0
        self._last: tuple[np.ndarray, float, np.ndarray] | None = None
        self._previous_iterate = math.inf

    def evaluate(self, params: np.ndarray) -> Evaluation:
        return evaluate(self.structure, self.groups, params, reml=self.reml, profile=self.profile)

    def __call__(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        try:
            at = self.evaluate(params)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros_like(params)
        if not math.isfinite(at.loglik):
            return math.inf, np.zeros_like(params)
        self._last = (np.array(params), -at.loglik, -at.gradient)
        return -at.loglik, -at.gradient

    def stalled(self, intermediate_result: OptimizeResult) -> None:
        """scipy's callback after each iteration: stop (``StopIteration``) once the gradient passes the test
        and the iteration gained less than ``STALL_TOL`` relative in ℓ. With many rows, ℓ's rounding (about
        1e-13 relative) hides what a smaller gradient would still gain, and the line search would spend
        dozens of evaluations finding that out."""
        x, value = intermediate_result.x, float(intermediate_result.fun)
        gained, self._previous_iterate = self._previous_iterate - value, value
        if self._last is None or not np.array_equal(self._last[0], x):
            return
        if np.max(np.abs(self._last[2]), initial=0.0) < GRADIENT_TOL and gained < STALL_TOL * max(1.0, abs(value)):
            raise StopIteration

    def snap_to_boundary(self, x: np.ndarray) -> np.ndarray:
        """lme4's ``check.boundary`` (as ``fit.optimize``, within ``BOUNDARY_POLISH``): a diagonal entry of Λ
        near 0 (relative to the residual SD) is set to 0 where ℓ is not lower there. Toward a variance at 0
        ℓ is flat (even in that entry), and the optimizer stops short of the boundary on the Cholesky scale."""
        structure, q = self.structure, self.groups.n_random
        if q == 0:
            return x
        own = structure.n_params - self.profile
        diagonal = own + np.cumsum(np.r_[0, np.arange(q, 1, -1)])  # Λ_jj: the first entry of column j
        reference = 1.0 if structure.homogeneous else float(np.exp(np.mean(x[:structure.log_sd_count])))
        value = -self(x)[0]
        for index in diagonal[np.abs(x[diagonal]) < BOUNDARY_POLISH * reference]:
            trial = x.copy()
            trial[index] = 0.0
            trial_value = -self(trial)[0]
            if trial_value >= value:
                x, value = trial, trial_value
        return x

    def check(self, x: np.ndarray) -> Check:
        at = self.evaluate(x)
        q = self.groups.n_random
        singular = is_singular(self.structure, at.theta, q)
        tested = at.gradient.size - (factor_size(q) if singular else 0)
        gradient_max = float(np.max(np.abs(at.gradient[:tested]), initial=0.0))
        scaled = math.inf if gradient_max >= GRADIENT_TOL else 0.0
        if gradient_max >= GRADIENT_TOL:
            scaled = self.scaled_gradient(x, at.gradient, tested)
        return Check(at=at, singular=singular, gradient_max=gradient_max, scaled_gradient=scaled)

    def scaled_gradient(self, x: np.ndarray, gradient: np.ndarray, tested: int) -> float:
        """lme4's scaled gradient max |L⁻¹ g| over the first ``tested`` parameters, −H = LLᵀ by central
        differences (step 1e-4) of the analytic gradient; ½|L⁻¹ g|² is what a Newton step would still gain
        in ℓ. inf where −H is not positive definite (not a maximum) or ℓ cannot be evaluated nearby."""
        H = np.empty((tested, tested))
        try:
            for k in range(tested):
                step = np.zeros_like(x)
                step[k] = DERIVATIVE_STEP
                H[:, k] = (self.evaluate(x + step).gradient[:tested]
                           - self.evaluate(x - step).gradient[:tested]) / (2.0 * DERIVATIVE_STEP)
            L = np.linalg.cholesky(-0.5 * (H + H.T))
        except np.linalg.LinAlgError:
            return math.inf
        return float(np.max(np.abs(solve_triangular(L, gradient[:tested], lower=True)), initial=0.0))


def is_singular(structure: CovarianceStructure, theta: np.ndarray, q: int) -> bool:
    """Whether Λ (the entries after the structure's θ) has a diagonal entry below ``SINGULAR_TOL`` relative
    to the residual SD (σ's Λ is relative already; else relative to the geometric mean of the visit SDs)."""
    if q == 0:
        return False
    diagonal = np.abs(np.diag(lower_factor(theta[structure.n_params:], q)))
    reference = 1.0 if structure.homogeneous else float(np.exp(np.mean(theta[:structure.log_sd_count])))
    return bool(np.min(diagonal) < SINGULAR_TOL * reference)


def fitted_covariance(structure: CovarianceStructure, theta: np.ndarray) -> np.ndarray:
    """Σ(θ) over the m visits; for sp_exp over two visits one time unit apart."""
    return structure.covariance(theta, np.array([0.0, 1.0]) if structure.spatial else None)


def start(groups: PatternGroups, structure: CovarianceStructure) -> np.ndarray:
    """The optimizer's start (full θ: structure, then Λ): the structure closest to the covariance of the
    OLS residuals; with random effects Λ = I relative to σ (lme4's start) for the homogeneous structures,
    and for the others half that covariance to Σ and Λ = I times the remaining SD."""
    empirical = empirical_covariance(groups, structure)
    q = groups.n_random
    if q == 0:
        return structure.start(empirical)
    if structure.homogeneous:
        if q == 1 and not structure.spatial and _intercept_only(groups):
            # a random intercept beside a serial structure: the covariance at the longest lags is its
            # variance (the serial part has decayed there); the rest starts the structure
            shared = _long_lag_covariance(empirical)
            own = structure.start(empirical - shared)
            relative = math.sqrt(shared) / math.exp(own[0])
            return np.concatenate([own, [relative]])
        return np.concatenate([structure.start(empirical), factor_entries(np.eye(q))])
    own = structure.start(0.5 * empirical)
    sd = float(np.exp(np.mean(own[:structure.log_sd_count])))
    return np.concatenate([own, factor_entries(sd * np.eye(q))])


def _intercept_only(groups: PatternGroups) -> bool:
    """Whether Z is one constant column (a random intercept) in every block."""
    return all(np.ptp(block.Z) == 0 for block in groups.blocks() if block.Z.size)


def _long_lag_covariance(empirical: np.ndarray) -> float:
    """The mean covariance of visits at least half the visits apart (where observed together), clipped to
    [1%, 80%] of the mean variance: a random intercept's variance, as a starting value."""
    m = empirical.shape[0]
    lag = np.abs(np.subtract.outer(np.arange(m), np.arange(m)))
    far = empirical[(lag >= max(1, m // 2)) & (empirical != 0)]
    variance = float(np.mean(np.diag(empirical)))
    value = float(np.mean(far)) if far.size else 0.0
    return float(np.clip(value, 0.01 * variance, 0.8 * variance))


def empirical_covariance(groups: PatternGroups, structure: CovarianceStructure) -> np.ndarray:
    """The covariance of the OLS residuals: m × m, each entry averaged over the subjects observed at both
    visits (pairs never observed together get 0; the structure's ``start`` makes it positive definite).
    For sp_exp, 2 × 2 at one time unit, with the correlation exp(−1/d̄), d̄ the mean gap between visits."""
    p = groups.n_fixed
    blocks = groups.blocks()
    XtX, Xty = np.zeros((p, p)), np.zeros(p)
    for block in blocks:
        X, y = block.X.reshape(-1, p), block.y.reshape(-1)
        XtX += X.T @ X
        Xty += X.T @ y
    beta = np.linalg.lstsq(XtX, Xty, rcond=None)[0]
    residuals = [block.y - block.X @ beta for block in blocks]
    if structure.spatial:
        variance = sum(float(np.sum(r * r)) for r in residuals) / groups.n_obs
        gaps = [np.diff(block.coords.astype(float), axis=-1).ravel() for block in blocks]
        joined = np.concatenate(gaps) if gaps else np.empty(0)
        gap = float(np.mean(joined)) if joined.size else 1.0
        rho = math.exp(-1.0 / max(gap, 1e-8))
        return variance * np.array([[1.0, rho], [rho, 1.0]])
    m = structure.n_visits
    total = np.zeros((m, m))
    count = np.zeros((m, m))
    for block, r in zip(blocks, residuals):
        if isinstance(block, VisitPattern):
            index = np.ix_(block.coords, block.coords)
            total[index] += r.T @ r
            count[index] += r.shape[0]
        else:
            a, b = block.coords[:, :, None], block.coords[:, None, :]
            a, b = np.broadcast_arrays(a, b)
            np.add.at(total, (a, b), r[:, :, None] * r[:, None, :])
            np.add.at(count, (a, b), 1.0)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)
