"""The GLM without random effects (the start for β) and the check for separation, which makes a β infinite.

``glm_start`` fits the outcome on X alone by iteratively reweighted least squares. Its β starts the GLMM's
first stage, and it is the cheap screen for separation: when the GLM's fitted probabilities (or Poisson means
at zero counts) go to 0 or 1, ``separating_direction`` decides by a linear program (Konis 2007; R's
``detectseparation``) whether the data are separated: a direction d ≠ 0 with s_i x_iᵀd ≥ 0 for every row
(s_i = 2y_i − 1) and > 0 for some, for binomial; x_iᵀd = 0 where y_i > 0 and ≤ 0 where y_i = 0, not all 0,
for Poisson. Then the likelihood increases without bound along d whatever the random effects (they are
integrated over a fixed distribution, and every row's probability moves the same way along d), so the
maximum-likelihood β does not exist: glmer returns huge estimates and standard errors with convergence
warnings; this engine refuses with the terms named.
"""

from __future__ import annotations

import numpy as np

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.glmm.families import Family

#: A fitted mean this close to 0 (or a probability to 1) sends the GLM start to the separation check.
_EDGE = 1e-8
_MAX_ITERATIONS = 50


def glm_start(X: np.ndarray, y: np.ndarray, weights: np.ndarray, family: Family) -> tuple[np.ndarray, bool]:
    """β of the GLM of y on X (frequency ``weights`` per row) by IRLS, and whether it ran to the edge
    (a fitted mean numerically at a bound of its range, or no convergence: worth a separation check)."""
    constant = family.constant(y)
    eta = family.start(y)
    beta = np.zeros(X.shape[1])
    deviance = np.inf
    converged = False
    for _ in range(_MAX_ITERATIONS):
        values = family.evaluate(eta, y, constant)
        w = weights * values.weight
        working = (eta * values.weight + (y - values.mu)) * weights  # W (η + (y − μ)/w), without dividing by w
        try:
            beta = np.linalg.solve(np.einsum("nk,n,nl->kl", X, w, X), np.einsum("nk,n->k", X, working))
        except np.linalg.LinAlgError:
            break
        eta = np.einsum("nk,k->n", X, beta)  # not by BLAS: see fit.glmm.onefactor's docstring
        new = -2.0 * float(np.einsum("n,n->", weights, family.evaluate(eta, y, constant).log_density))
        if abs(new - deviance) < 1e-10 * (abs(new) + 0.1):
            converged = True
            break
        deviance = new
    mu = family.mean(eta)
    at_edge = bool(np.any(mu < _EDGE) or (family.name == "binomial" and np.any(mu > 1.0 - _EDGE)))
    return beta, at_edge or not converged


def separating_direction(X: np.ndarray, y: np.ndarray, family: Family) -> np.ndarray | None:
    """A direction d in β along which the likelihood increases without bound, or None when there is none.

    Solved as a linear program on the distinct rows (HiGHS) with the sparsest such direction (least Σ|d_j|)
    among those that move the rows it separates by at least 1 in total, so that the terms it involves are
    the ones to blame; the direction is then checked on every row exactly.
    """
    from scipy.optimize import linprog

    p = X.shape[1]
    if family.name == "binomial":
        signed = (2.0 * y - 1.0)[:, None] * X  # s_i x_i: every one must move ≥ 0 along d
        moving, fixed = np.unique(signed, axis=0), np.empty((0, p))
    else:
        moving, fixed = -np.unique(X[y == 0.0], axis=0), np.unique(X[y > 0.0], axis=0)  # −x_i d ≥ 0; x_i d = 0
    if moving.shape[0] == 0:
        return None
    # d = d⁺ − d⁻ with d± ≥ 0: minimize Σ(d⁺ + d⁻) subject to m_i d ≥ 0, Σ m_i d ≥ 1 and f_i d = 0.
    A_ub = np.vstack([-np.hstack([moving, -moving]), -np.hstack([moving.sum(axis=0), -moving.sum(axis=0)])])
    b_ub = np.concatenate([np.zeros(moving.shape[0]), [-1.0]])
    equal = fixed.shape[0] > 0
    result = linprog(np.ones(2 * p), A_ub=A_ub, b_ub=b_ub, A_eq=np.hstack([fixed, -fixed]) if equal else None,
                     b_eq=np.zeros(fixed.shape[0]) if equal else None, bounds=(0.0, None), method="highs")
    if result.status != 0:  # infeasible: no direction separates
        return None
    d = np.asarray(result.x[:p] - result.x[p:])
    d[np.abs(d) < 1e-9 * np.abs(d).max()] = 0.0
    moved = (moving @ d, fixed @ d)
    tol = 1e-9 * (np.abs(X).max(axis=0) @ np.abs(d))
    if moved[0].min() >= -tol and moved[0].max() > 1e3 * tol and np.all(np.abs(moved[1]) <= tol):
        return d
    return None


def separation_failure(names: tuple[str, ...], direction: np.ndarray, family: Family) -> FitFailure:
    """The failure naming the fixed effects along the separating ``direction`` (in the data's units)."""
    size = np.abs(direction)
    involved = [name for name, d in zip(names, size) if d > 1e-6 * size.max() and name != "(Intercept)"]
    if not involved:
        involved = list(names)
    what = ", ".join(map(repr, involved))
    if family.name == "binomial":
        how = "predicts the outcome perfectly (complete or quasi-complete separation: no row contradicts it)"
    else:
        how = "picks out rows whose counts are all zero, whose mean can go to 0"
    return FitFailure(
        f"a combination of the fixed effects {what} {how}, so the maximum-likelihood estimate of "
        f"{'it' if len(involved) == 1 else 'them'} is infinite (glmer returns huge estimates and standard errors "
        "with convergence warnings); drop or merge the term, or combine the categories that have no events"
    )
