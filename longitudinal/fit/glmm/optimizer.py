"""Bounded BOBYQA for glmer's two stages, lme4's finite-difference derivatives, and its convergence check.

glmer optimizes twice (``lme4::glmer``, ``optimizeGlmer``): stage 1 over θ with β and u from PIRLS (nAGQ = 0),
stage 2 over (θ, β) with u from PIRLS, started at stage 1's answer. Both stages here use nlopt's BOBYQA
(lme4 1.1's default is bobyqa, then Nelder–Mead for stage 2; BOBYQA reaches the same optimum in fewer
evaluations). Stage 2 runs in coordinates scaled by per-parameter initial steps (θ by a fixed fraction, β by
its standard error from stage 1), which is what lme4's ``optwrap`` does for Nelder–Mead (``xst``).

After stage 2, as ``optwrap(calc.derivs = TRUE)``: the gradient and Hessian of the deviance over (θ, β) by
lme4's ``deriv12`` (central differences, step 1e-4, four evaluations per mixed pair). They serve lme4's
``checkConv`` (``check_convergence``), vcov(β) (lme4's ``use.hessian = TRUE``) and, here, a Newton step from
BOBYQA's answer (``fit.glmm.fitting``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longitudinal.fit.optimize import GRADIENT_TOL, derivatives, hessian_check, run_bobyqa, scaled_gradient_max
from longitudinal.fit.theta import SINGULAR_TOL, ThetaLayout, singular_bars

__all__ = ["Convergence", "Minimum", "bobyqa", "check_convergence", "derivatives", "free_parameters",
           "scaled_gradient_max"]



@dataclass(frozen=True, eq=False)
class Minimum:
    """Where BOBYQA stopped: the point, its deviance, the evaluations used and a status note ("" if ok)."""

    x: np.ndarray
    value: float
    evaluations: int
    status: str


def bobyqa(
    deviance: Callable[[np.ndarray], float], start: np.ndarray, lower: np.ndarray, steps: np.ndarray, *,
    xtol: np.ndarray, ftol: float,
) -> Minimum:
    """``fit.optimize.run_bobyqa`` from ``start`` above ``lower`` with initial ``steps``, as a ``Minimum``."""
    return Minimum(*run_bobyqa(deviance, start, lower, steps=steps, xtol=xtol, ftol=ftol))


@dataclass(frozen=True)
class Convergence:
    """lme4's ``checkConv`` verdict for glmer over (θ, β)."""

    converged: bool
    singular: bool
    gradient_max: float
    notes: tuple[str, ...]


def free_parameters(layout: ThetaLayout, x: np.ndarray) -> np.ndarray:
    """Mask of the parameters (θ, then β) off the boundary: not a diagonal θ below lme4's singular tolerance,
    nor any θ of a singular bar (there the bar's θ are not locally identified: its gradient and Hessian say
    nothing). Every β is free."""
    theta = x[:layout.size]
    free = np.ones(x.shape[0], dtype=bool)
    at_bound = layout.diagonal & (theta < SINGULAR_TOL)
    free[:layout.size] = ~at_bound & ~np.isin(layout.bars, singular_bars(layout, theta))
    return free


def check_convergence(layout: ThetaLayout, x: np.ndarray, gradient: np.ndarray, hessian: np.ndarray) -> Convergence:
    """lme4's ``checkConv`` as glmer calls it (every parameter is in the check, θ first, then β).

    A singular fit (lme4's ``isSingular``: a diagonal θ below 1e-4; here also a correlation beyond ±0.999)
    returns at once: lme4 gives its singular-fit message and skips the gradient and Hessian checks. Else the
    scaled gradient must be below 0.002 and the Hessian must have no negative (below −1e-6) or zero
    eigenvalue. ``gradient_max`` is the scaled gradient (over the parameters off the boundary when singular).
    """
    singular = bool(singular_bars(layout, x[:layout.size]))
    free = free_parameters(layout, x)
    g, H = gradient[free], hessian[np.ix_(free, free)]
    gradient_max = scaled_gradient_max(g, H) if free.any() else 0.0
    if singular:
        return Convergence(True, True, gradient_max, ())
    notes: list[str] = []
    if math.isnan(gradient_max):
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(H))):
            return Convergence(False, False, math.nan, ("the gradient of the deviance at the optimum is not finite",))
        notes.append("unable to evaluate the scaled gradient (Hessian not positive definite)")
        gradient_max = float(np.max(np.abs(g)))
    elif gradient_max > GRADIENT_TOL:
        notes.append(f"failed to converge with max|grad| = {gradient_max:.3g} (tol = {GRADIENT_TOL:g})")
    notes.extend(hessian_check(hessian)[1])
    return Convergence(not notes, False, gradient_max, tuple(notes))
