"""θ by bounded BOBYQA as lme4's default optimizer, with lme4's boundary and convergence checks.

lme4's ``nloptwrap`` (``nlopt.LN_BOBYQA``, xtol_abs = ftol_abs = 1e-8, at most 100 000 evaluations,
nlopt's default initial step) from lme4's start; then lme4's ``check.boundary`` (``_snap_to_boundary``) and
``checkConv`` (``_check_convergence``: a central-difference gradient and Hessian, step 1e-4, its mixed second
differences from two evaluations a pair instead of ``deriv12``'s four (``derivatives``), the scaled gradient below
0.002), whose gradient and Hessian then give one Newton step on the free θ, kept if the
deviance is lower (``_newton_polish``: BOBYQA's tolerances leave θ ~1e-5 off where the criterion is flat).
An optimum failing the check gets one restart from near it; the lowest deviance is kept. ``minimize_deviance`` returns the chosen run as an ``OptimizerRun`` and every attempt as the
``OptimizerAttempt`` records a ``Fit`` carries. The deviance function is the caller's: this module knows
nothing of designs or engines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.theta import SINGULAR_TOL, ThetaLayout, singular_bars
from longitudinal.records import OptimizerAttempt


#: lme4's defaults (lmerControl / nloptwrap / checkConv / isSingular).
XTOL_ABS = 1e-8
FTOL_ABS = 1e-8
MAX_EVALUATIONS = 100_000
GRADIENT_TOL = 2e-3
HESSIAN_TOL = 1e-6
BOUNDARY_POLISH = 1e-2  # lme4 uses 1e-5: see _snap_to_boundary
DERIVATIVE_STEP = 1e-4
#: A warm start's initial BOBYQA steps: this share of each |θ|, at least the floor (see ``minimize_deviance``).
WARM_STEP = 0.1
WARM_STEP_FLOOR = 0.01
#: What the optimizer sees where the deviance cannot be computed; finite so BOBYQA's model stays usable.
UNDEFINED_DEVIANCE = 1e12


@dataclass(frozen=True, eq=False)
class OptimizerRun:
    """One optimizer run, after lme4's boundary snap and convergence checks.

    ``converged`` is lme4's verdict (a singular optimum passes: the gradient test does not apply on the
    boundary); ``settled`` says whether the gradient over the parameters off the boundary is below the
    tolerance too, which decides whether a restart is worth trying.
    """

    theta: np.ndarray
    deviance: float
    converged: bool
    settled: bool
    gradient_max: float
    evaluations: int
    message: str


def minimize_deviance(
    deviance: Callable[[np.ndarray], float], layout: ThetaLayout, *, start: np.ndarray | None = None,
) -> tuple[OptimizerRun, tuple[OptimizerAttempt, ...]]:
    """BOBYQA from lme4's start with lme4's checks, one restart if not convincing; the best run and all runs.

    ``start``: a θ known to be near the optimum (a REML refit starts from its ML fit's θ): BOBYQA starts there
    with initial steps of ``WARM_STEP`` × |θ| (at least ``WARM_STEP_FLOOR``) instead of nlopt's default, which
    is sized for lme4's start. Measured on a correlated random slope at 27,000 subjects: 47 → 27 evaluations,
    the same optimum within 4e-8 of the criterion. Without it, lme4's start and steps (lme4's path).

    Raises ``FitFailure`` when the deviance is not finite anywhere the optimizer went.
    """
    attempts: list[OptimizerAttempt] = []
    runs: list[OptimizerRun] = []
    lower = np.asarray(layout.lower)
    steps = None
    if start is None:
        start = layout.start()
    else:
        start = np.maximum(np.asarray(start, dtype=float), lower)
        steps = np.maximum(WARM_STEP * np.abs(start), WARM_STEP_FLOOR)
    for label in ("bobyqa", "bobyqa (restart)"):
        began = time.perf_counter()
        run = _optimize(deviance, start, layout, steps)
        steps = None  # a restart is sized as lme4's
        attempts.append(OptimizerAttempt(
            optimizer=label, loglik=-0.5 * run.deviance if math.isfinite(run.deviance) else math.nan,
            converged=run.converged, iterations=run.evaluations, seconds=time.perf_counter() - began,
            message=run.message,
        ))
        runs.append(run)
        if run.settled or not math.isfinite(run.deviance):
            break
        # Not convincing: restart once from the optimum with the variances lifted off the boundary, so
        # that BOBYQA builds a fresh quadratic model around it (lme4's advice for convergence warnings).
        start = np.where(layout.diagonal, np.maximum(run.theta * 1.1, 0.05), run.theta)
    finite = [run for run in runs if math.isfinite(run.deviance)]
    if not finite:
        raise FitFailure(
            "the deviance could not be computed at any θ tried (penalized residual sum of squares not "
            "positive): the outcome is fitted exactly or the design is degenerate; check the data and the formula",
            tuple(attempts),
        )
    # The lowest deviance wins; a converged run as good (within the optimizer's tolerance) is preferred.
    lowest = min(run.deviance for run in finite)
    best = min(finite, key=lambda run: (run.deviance > lowest + 10 * FTOL_ABS, not run.converged, run.deviance))
    return best, tuple(attempts)


def _optimize(
    deviance: Callable[[np.ndarray], float], start: np.ndarray, layout: ThetaLayout, steps: np.ndarray | None = None,
) -> OptimizerRun:
    """BOBYQA from ``start`` (initial ``steps``, or nlopt's), then lme4's ``check.boundary`` and ``checkConv``
    at the optimum."""
    lower = np.asarray(layout.lower)
    theta, value, evaluations, status = run_bobyqa(deviance, start, lower, steps=steps)
    if not math.isfinite(value):
        return OptimizerRun(theta, value, False, False, math.nan, evaluations, "the deviance is not finite at any θ tried")
    theta, value = _snap_to_boundary(deviance, theta, value, lower)
    check = _check_convergence(deviance, theta, value, layout)
    theta, value = _newton_polish(deviance, theta, value, check, lower)
    message = "; ".join(filter(None, (status, *check.notes)))
    ok = status == ""
    return OptimizerRun(theta, value, check.converged and ok, check.settled and ok, check.gradient_max, evaluations, message)


def run_bobyqa(
    deviance: Callable[[np.ndarray], float], start: np.ndarray, lower: np.ndarray, *,
    steps: np.ndarray | None = None, xtol: float | np.ndarray = XTOL_ABS, ftol: float = FTOL_ABS,
) -> tuple[np.ndarray, float, int, str]:
    """Minimize with nlopt's bounded BOBYQA from ``start`` (moved onto ``lower`` where below it); returns
    the point, its deviance, the evaluations and a status note ("" if ok). Shared by the LMM and GLMM engines.

    ``steps`` None keeps nlopt's default initial step, as lme4's ``nloptwrap`` (nloptr sets none): from
    lme4's start this retraces lme4's path. The best point seen is tracked so that an nlopt exception
    (round-off limited) still yields it; non-finite deviances are shown to BOBYQA as a large finite value.
    """
    import nlopt

    start = np.maximum(np.asarray(start, dtype=float), lower)
    best: dict[str, object] = {"value": math.inf, "theta": start.copy()}
    count = [0]

    def objective(theta: np.ndarray, _grad: np.ndarray) -> float:
        count[0] += 1
        value = deviance(theta)
        if not math.isfinite(value):
            return UNDEFINED_DEVIANCE
        if value < best["value"]:  # type: ignore[operator]
            best["value"], best["theta"] = value, theta.copy()
        return value

    opt = nlopt.opt(nlopt.LN_BOBYQA, start.shape[0])
    opt.set_lower_bounds(lower)
    opt.set_min_objective(objective)
    if steps is not None:
        opt.set_initial_step(steps)
    opt.set_xtol_abs(xtol)
    opt.set_ftol_abs(ftol)
    opt.set_maxeval(MAX_EVALUATIONS)
    status = ""
    try:
        opt.optimize(start)
        if opt.last_optimize_result() == nlopt.MAXEVAL_REACHED:
            status = f"BOBYQA stopped at the evaluation limit ({MAX_EVALUATIONS})"
    except nlopt.RoundoffLimited:
        status = "BOBYQA stopped: round-off limited"
    except (RuntimeError, ValueError) as exc:
        status = f"BOBYQA failed: {exc}"
    return np.asarray(best["theta"], dtype=float), float(best["value"]), count[0], status  # type: ignore[arg-type]


def _snap_to_boundary(
    deviance: Callable[[np.ndarray], float], theta: np.ndarray, value: float, lower: np.ndarray,
) -> tuple[np.ndarray, float]:
    """lme4's ``check.boundary``, wider: a θ within ``BOUNDARY_POLISH`` of its bound moves onto it if the
    deviance is lower there.

    lme4 tries this within 1e-5; where the likelihood is flat toward the boundary (a variance the data
    barely determine, such as an intercept variance far from time zero), BOBYQA can stop a few 1e-3
    short of a boundary optimum that is better by 1e-8 deviance units. Accepting only a lower deviance,
    the wider search never gives a worse optimum than lme4's rule.
    """
    theta = theta.copy()
    near = (theta - lower > 0.0) & (theta - lower < BOUNDARY_POLISH)
    for i in np.flatnonzero(near):
        trial = theta.copy()
        trial[i] = lower[i]
        trial_value = deviance(trial)
        if trial_value < value:
            theta, value = trial, trial_value
    return theta, value


def _newton_polish(
    deviance: Callable[[np.ndarray], float], theta: np.ndarray, value: float, check: _Convergence,
    lower: np.ndarray,
) -> tuple[np.ndarray, float]:
    """One Newton step on the free θ from the convergence check's gradient and Hessian, kept if the deviance
    is lower there (one more evaluation).

    BOBYQA at lme4's tolerances (xtol_abs = ftol_abs = 1e-8) stops where the deviance is within ~1e-7 of its
    minimum, but θ can still be ~1e-5 off where the criterion is flat (Loblolly's random slope): enough to move
    conditional modes by 5e-5 of their SD, as lme4's own default fit does. The step costs nothing extra: the
    derivatives are those ``checkConv`` computes anyway, and the verdict stays the one made before the step
    (the gradient after it is smaller).
    """
    free = check.free
    if not free.any():
        return theta, value
    H = check.hessian[np.ix_(free, free)]
    g = check.gradient[free]
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(g))):
        return theta, value
    try:
        np.linalg.cholesky(H)
        step = np.linalg.solve(H, g)
    except np.linalg.LinAlgError:
        return theta, value
    trial = theta.copy()
    trial[free] -= step
    if np.any(trial < lower):
        return theta, value
    trial_value = deviance(trial)
    return (trial, trial_value) if trial_value < value else (theta, value)


@dataclass(frozen=True)
class _Convergence:
    """lme4's ``checkConv`` verdict at an optimum (see ``_check_convergence``); ``free`` marks the θ the
    gradient test covers (off the boundary, outside singular bars)."""

    converged: bool
    settled: bool
    gradient_max: float
    notes: tuple[str, ...]
    free: np.ndarray
    gradient: np.ndarray
    hessian: np.ndarray


def _check_convergence(
    deviance: Callable[[np.ndarray], float], theta: np.ndarray, value: float, layout: ThetaLayout,
) -> _Convergence:
    """lme4's ``checkConv``: a singular optimum passes, else the scaled gradient and the Hessian decide.

    At a singular optimum (a bar's covariance on the boundary of the cone of covariance matrices: a zero
    diagonal of its Cholesky factor, or a correlation of ±1) the gradient test does not apply, and lme4
    1.1's ``checkConv`` returns after its singular-fit message without the gradient or Hessian checks. Every
    θ of such a bar is left out of the gradient computed here: with a singular factor the bar's θ are not
    locally identified (at a zero leading diagonal only the norm of the column below it matters), so its
    gradient and Hessian say nothing. Over the other θ the max scaled gradient is still recorded, and
    ``settled`` says whether it is below the tolerance (a restart is tried when it is not).
    """
    gradient, hessian = derivatives(deviance, theta, value, shared_axes=True)
    singular = singular_bars(layout, theta)
    free = ~(layout.diagonal & (theta - np.asarray(layout.lower) < SINGULAR_TOL)) & ~np.isin(layout.bars, singular)
    if not free.any():
        return _Convergence(True, True, 0.0, (), free, gradient, hessian)
    g = gradient[free]
    H = hessian[np.ix_(free, free)]
    if not np.all(np.isfinite(g)) or not np.all(np.isfinite(H)):
        return _Convergence(bool(singular), False, math.nan, ("the gradient of the deviance at the optimum is not finite",),
                            free, gradient, hessian)
    notes: list[str] = []
    gradient_max = scaled_gradient_max(g, H)
    if math.isnan(gradient_max):
        # lme4 reports "unable to evaluate scaled gradient"; the plain gradient still says something.
        gradient_max = float(np.max(np.abs(g)))
        notes.append("unable to evaluate the scaled gradient (Hessian not positive definite)")
    settled = gradient_max < GRADIENT_TOL
    if singular:
        return _Convergence(True, settled, gradient_max, (), free, gradient, hessian)
    degenerate, hessian_findings = hessian_check(H)
    notes.extend(hessian_findings)
    if not settled:
        notes.insert(0, f"failed to converge with max|grad| = {gradient_max:.3g} (tol = {GRADIENT_TOL:g})")
    return _Convergence(settled and not degenerate, settled, gradient_max, tuple(notes), free, gradient, hessian)


def scaled_gradient_max(gradient: np.ndarray, hessian: np.ndarray) -> float:
    """lme4's scaled gradient: the largest over the parameters of min(|R⁻¹g|, |g|), H = RᵀR its Cholesky
    factorization; NaN where H is not positive definite or not finite."""
    if not (np.all(np.isfinite(gradient)) and np.all(np.isfinite(hessian))):
        return math.nan
    try:
        scaled = np.linalg.solve(np.linalg.cholesky(hessian).T, gradient)
    except np.linalg.LinAlgError:
        return math.nan
    return float(np.max(np.minimum(np.abs(scaled), np.abs(gradient))))


def hessian_check(hessian: np.ndarray) -> tuple[bool, list[str]]:
    """lme4's ``checkHess`` on the deviance's Hessian at an optimum: whether it has negative eigenvalues
    (below −``HESSIAN_TOL``: "degenerate Hessian", not a minimum), and the notes: that, or else an eigenvalue
    near zero (parameters not uniquely determined)."""
    eigenvalues = np.linalg.eigvalsh(hessian)
    negative = int(np.sum(eigenvalues < -HESSIAN_TOL))
    if negative:
        # lme4's code -3: "Model failed to converge: degenerate Hessian with %d negative eigenvalues".
        return True, [f"failed to converge: degenerate Hessian with {negative} negative "
                      f"eigenvalue{'s' if negative > 1 else ''}"]
    if np.any(np.abs(eigenvalues) < HESSIAN_TOL):
        return False, ["Hessian is numerically singular: parameters are not uniquely determined"]
    return False, []


def derivatives(
    deviance: Callable[[np.ndarray], float], theta: np.ndarray, value: float, *, shared_axes: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient and Hessian with step 1e-4, bounds ignored. ``value`` is the deviance at
    ``theta``.

    By default lme4's ``deriv12``: four evaluations per mixed pair, (f₊₊ − f₊₋ − f₋₊ + f₋₋) / 4h². With
    ``shared_axes`` a mixed pair costs two, its diagonal points and the axis points already evaluated for the
    gradient: (f₊₊ + f₋₋ − f₊ᵢ − f₋ᵢ − f₊ⱼ − f₋ⱼ + 2f) / 2h², the same O(h²) error (the odd terms cancel in
    each pair of opposite points). 3 parameters: 12 evaluations instead of 18. The LMM's convergence check
    uses it; the GLMM's Hessian, which gives glmer's standard errors, keeps lme4's formula.
    """
    k = theta.shape[0]
    h = DERIVATIVE_STEP
    gradient = np.empty(k)
    hessian = np.empty((k, k))

    def at(*moves: tuple[int, float]) -> float:
        point = theta.copy()
        for index, step in moves:
            point[index] += step
        return deviance(point)

    axis = np.empty((k, 2))  # f(θ + h e_j), f(θ − h e_j)
    for j in range(k):
        up, down = axis[j] = at((j, h)), at((j, -h))
        gradient[j] = (up - down) / (2 * h)
        hessian[j, j] = (up - 2 * value + down) / (h * h)
        for i in range(j):
            if shared_axes:
                both = at((i, h), (j, h)) + at((i, -h), (j, -h))
                hessian[i, j] = (both - axis[i].sum() - axis[j].sum() + 2 * value) / (2 * h * h)
            else:
                hessian[i, j] = (
                    at((i, h), (j, h)) - at((i, h), (j, -h)) - at((i, -h), (j, h)) + at((i, -h), (j, -h))
                ) / (4 * h * h)
            hessian[j, i] = hessian[i, j]
    return gradient, hessian
