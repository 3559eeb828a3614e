"""The MMRM log-likelihood, ML or REML, with β profiled out by generalized least squares, and its gradient.

Model: y_i ~ N(X_i β, Σ_i(θ)) independently over subjects, Σ_i the rows and columns of Σ(θ) at the visits
subject i has: missing visits are dropped, which is the likelihood under missing at random.

- ML:   ℓ(θ) = −½ [ n log 2π + Σ_i log|Σ_i| + Σ_i r_iᵀ Σ_i⁻¹ r_i ]
- REML: ℓ(θ) = −½ [ (n − p) log 2π + Σ_i log|Σ_i| + log|Σ_i X_iᵀ Σ_i⁻¹ X_i| + Σ_i r_iᵀ Σ_i⁻¹ r_i ]

with r_i = y_i − X_i β̂(θ), β̂ the GLS estimate; n rows, p fixed effects. These are mmrm's ``tmb.cpp``
constants and lme4's REML convention (no ½ log|XᵀX| term).

Subjects are grouped by their visit pattern (``group_by_pattern``): one Cholesky factor of Σ_pattern serves
every subject sharing it, and the whitening of their y and X is one product with L⁻¹ over all of them, so
the cost is a Python loop over patterns (at most m with monotone dropout), none over subjects.

For the homogeneous structures (cs, ar1, toep, ad, sp_exp: Σ = σ² R(ψ)) the scale σ² can also be
profiled out (``profile=True``): σ̂² = r'R⁻¹r / (n − p·REML), and the optimizer sees only ψ. The
heterogeneous structures and us carry no free overall scale in mmrm's layout and are optimized in full.

The gradient is analytic in Σ: dℓ/dθ_k = ½ Σ_patterns ⟨G, dΣ/dθ_k⟩ with
G = −n_g W + Σ_i (W r_i)(W r_i)ᵀ + [REML] Σ_i (W X_i) A⁻¹ (W X_i)ᵀ, W = Σ_pattern⁻¹, A = Σ X_iᵀ W X_i
(β̂ is the optimum of r'Σ⁻¹r, so its own derivative drops out), and dΣ/dθ by the complex step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.linalg import cho_solve, solve_triangular

from longitudinal.errors import DataError
from longitudinal.fit.covariance.structures import CovarianceStructure
from longitudinal.fit.linalg import LOG_2PI


@dataclass(frozen=True, eq=False)
class VisitPattern:
    """The subjects observed at exactly the coordinates ``coords`` (visit indices, or times for sp_exp).

    ``rows`` (n_g, s): each subject's rows of the data in visit order; ``y`` (s, n_g) and ``X`` (s, n_g, p):
    visit-major, so that one product with L⁻¹ whitens every subject of the pattern at once.
    """

    coords: np.ndarray
    rows: np.ndarray
    y: np.ndarray
    X: np.ndarray

    @property
    def n_subjects(self) -> int:
        return self.rows.shape[0]


@dataclass(frozen=True, eq=False)
class PatternGroups:
    """The data arranged by visit pattern: ``patterns`` in order of first appearance of their size, then
    coordinates; ``n_obs`` rows, ``n_subjects`` subjects, ``n_fixed`` columns of X."""

    patterns: tuple[VisitPattern, ...]
    n_obs: int
    n_subjects: int
    n_fixed: int


@dataclass(frozen=True, eq=False)
class Evaluation:
    """ℓ at one point and what comes with it: the full θ (log σ̂ filled in when profiled), GLS β̂, its
    covariance (Σ X_iᵀ Σ_i⁻¹ X_i)⁻¹, and the gradient over the parameters the optimizer sees."""

    loglik: float
    theta: np.ndarray
    beta: np.ndarray
    vcov: np.ndarray
    gradient: np.ndarray


def group_by_pattern(y: np.ndarray, X: np.ndarray, subject: np.ndarray, coords: np.ndarray) -> PatternGroups:
    """Arrange rows (outcome ``y``, fixed-effect matrix ``X``, subject labels, visit coordinates) by pattern.

    ``coords`` are visit indices 0..m−1 for the visit structures, times for ``sp_exp``. Rows with a missing
    value must have been removed already; a subject with two rows at the same coordinate raises ``DataError``.
    """
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    coords = np.asarray(coords)
    n = y.shape[0]
    if X.ndim != 2 or X.shape[0] != n or len(subject) != n or coords.shape != (n,):
        raise DataError(f"y, X, subject and coords must have the same number of rows; got {n}, {X.shape}, "
                        f"{len(subject)} and {coords.shape}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(X)) and np.all(np.isfinite(coords.astype(float)))):
        raise DataError("y, X and the visit coordinates must have no missing or infinite values; drop those rows first")
    codes, _ = pd.factorize(pd.Series(subject), sort=False)
    order = np.lexsort((coords, codes))
    codes, sorted_coords = codes[order], coords[order]
    repeated = (codes[1:] == codes[:-1]) & (sorted_coords[1:] == sorted_coords[:-1])
    if repeated.any():
        at = order[1:][repeated][0]
        label, visit = np.asarray(subject)[at:at + 1].tolist()[0], coords[at:at + 1].tolist()[0]
        raise DataError(f"subject {label!r} has more than one row at visit {visit!r}; "
                        "a subject is observed at most once per visit")
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    sizes = np.diff(np.r_[starts, n])
    patterns = []
    for size in np.unique(sizes):
        first = starts[sizes == size]
        rows = order[first[:, None] + np.arange(size)]  # (subjects of this size, size)
        unique, which = np.unique(coords[rows], axis=0, return_inverse=True)
        for k, pattern_coords in enumerate(unique):
            pattern_rows = rows[which.ravel() == k]
            patterns.append(VisitPattern(
                coords=pattern_coords, rows=pattern_rows, y=np.ascontiguousarray(y[pattern_rows].T),
                X=np.ascontiguousarray(X[pattern_rows].transpose(1, 0, 2)),
            ))
    return PatternGroups(tuple(patterns), n_obs=n, n_subjects=len(starts), n_fixed=X.shape[1])


def evaluate(
    structure: CovarianceStructure, groups: PatternGroups, params: np.ndarray, *, reml: bool,
    profile: bool = False, gradient: bool = True,
) -> Evaluation:
    """ℓ (ML or REML, module docstring) at ``params``: the full θ, or with ``profile`` (homogeneous
    structures only) θ without its first entry log σ, which is then set to its maximizing value.

    Raises ``np.linalg.LinAlgError`` where Σ or Σ X_iᵀ Σ_i⁻¹ X_i is not numerically positive definite.
    """
    params = np.asarray(params, dtype=float)
    if profile and not structure.homogeneous:
        raise ValueError(f"structure {structure.name!r} has no common scale to profile out")
    base = np.concatenate([[0.0], params]) if profile else params
    p, n = groups.n_fixed, groups.n_obs
    dof = n - p if reml else n

    factors, whitened_y, whitened_X = [], [], []
    logdet = 0.0
    A = np.zeros((p, p))
    b = np.zeros(p)
    full = None if structure.spatial else structure.covariance(base)
    for pattern in groups.patterns:
        index = np.ix_(pattern.coords, pattern.coords) if full is not None else None
        sigma = full[index] if full is not None and index is not None else structure.covariance(base, pattern.coords)
        L = np.linalg.cholesky(sigma)
        s, g = pattern.y.shape
        # L⁻¹ (s × s) once, then one matrix product per pattern: LAPACK's triangular solve with thousands of
        # right-hand sides was 10–20× slower than the product here
        L_inv = solve_triangular(L, np.eye(s), lower=True, check_finite=False)
        ty = L_inv @ pattern.y
        tX = (L_inv @ pattern.X.reshape(s, -1)).reshape(s, g, p)
        logdet += 2.0 * g * float(np.log(np.diag(L)).sum())
        A += np.einsum("sgp,sgq->pq", tX, tX, optimize=True)
        b += np.einsum("sgp,sg->p", tX, ty, optimize=True)
        factors.append(L_inv)
        whitened_y.append(ty)
        whitened_X.append(tX)
    chol_A = np.linalg.cholesky(A)
    beta = cho_solve((chol_A, True), b)
    A_inv = cho_solve((chol_A, True), np.eye(p))
    logdet_A = 2.0 * float(np.log(np.diag(chol_A)).sum())
    residuals = [ty - np.tensordot(tX, beta, axes=(2, 0)) for ty, tX in zip(whitened_y, whitened_X)]
    quadratic = float(sum(np.sum(r * r) for r in residuals))

    if profile:
        scale = quadratic / dof
        loglik = -0.5 * (dof * (1.0 + LOG_2PI + np.log(scale)) + logdet + (logdet_A if reml else 0.0))
        theta = np.concatenate([[0.5 * np.log(scale)], params])
    else:
        scale = 1.0
        loglik = -0.5 * (dof * LOG_2PI + logdet + quadratic + (logdet_A if reml else 0.0))
        theta = params
    grad = np.empty(0)
    if gradient:
        jac_full = None if full is None else structure.jacobian(base)
        grad = np.zeros(base.size)
        for pattern, L_inv, r, tX in zip(groups.patterns, factors, residuals, whitened_X):
            s, g = r.shape
            Wr = L_inv.T @ r
            G = Wr @ Wr.T / scale - g * (L_inv.T @ L_inv)
            if reml:
                WX = (L_inv.T @ tX.reshape(s, -1)).reshape(s, g, p)
                WXA = np.tensordot(WX, A_inv, axes=(2, 0)).reshape(s, -1)
                G += WXA @ WX.reshape(s, -1).T
            if jac_full is not None:
                J = jac_full[:, pattern.coords[:, None], pattern.coords[None, :]]
            else:
                J = structure.jacobian(base, pattern.coords)
            grad += 0.5 * np.tensordot(J, G, axes=([1, 2], [0, 1]))
        if profile:
            grad = grad[1:]
    return Evaluation(loglik=float(loglik), theta=theta, beta=beta, vcov=scale * A_inv, gradient=grad)


def log_likelihood(structure: CovarianceStructure, groups: PatternGroups, theta: np.ndarray, *, reml: bool) -> float:
    """ℓ(θ) at the full θ (no scale profiled), ML or REML: the objective as the module docstring defines it."""
    return evaluate(structure, groups, theta, reml=reml, gradient=False).loglik
