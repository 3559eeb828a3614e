"""lme4's profiled-deviance formulation of a linear mixed model, for one grouping factor.

(Designs with several grouping factors, nested or crossed, go from ``fit_lmm`` and ``profiled_deviance`` to
``longitudinal.sparse_engine``, which reuses this module's per-group factorization for the finest factor.)

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
are written out as array arithmetic over the groups (batched ``np.linalg.cholesky`` only for q ≥ 3).
Groups with identical Z_g'Z_g (subjects seen at the same visit times) share M_g and L_g, and Σ_g R_g'R_g
needs only the sums of W_g[i]'W_g[j] over such a *pattern* (``group_patterns``): when the patterns are few,
the optimizer's evaluations cost O(P q² p²) for P patterns, whatever the number of subjects. This is exact
(only the order of floating-point sums changes); the estimates at the optimum come from the per-group solve.

Estimation (``fit_lmm``): θ by bounded BOBYQA as lme4's default ``nloptwrap`` (``nlopt.LN_BOBYQA``,
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

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import sparse

from longitudinal.design import Design
from longitudinal.errors import FitError
from longitudinal.records import OptimizerAttempt
from longitudinal.scaling import Standardization, standardize

#: lme4's defaults (lmerControl / nloptwrap / checkConv / isSingular).
XTOL_ABS = 1e-8
FTOL_ABS = 1e-8
MAX_EVALUATIONS = 100_000
GRADIENT_TOL = 2e-3
HESSIAN_TOL = 1e-6
SINGULAR_TOL = 1e-4
BOUNDARY_POLISH = 1e-2  # lme4 uses 1e-5: see _snap_to_boundary
DERIVATIVE_STEP = 1e-4
CORRELATION_LIMIT = 0.999
#: A residual RMS this small relative to the outcome's SD means the model reproduces the data exactly
#: (rounding noise, not variation: the likelihood would be unbounded).
EXACT_FIT_RATIO = 1e-6
#: What the optimizer sees where the deviance cannot be computed; finite so BOBYQA's model stays usable.
_UNDEFINED_DEVIANCE = 1e12
_LOG_2PI = math.log(2.0 * math.pi)


class FitFailure(FitError):
    """One fit failed numerically; ``attempts`` holds the optimizer runs made before the failure."""

    def __init__(self, message: str, attempts: tuple[OptimizerAttempt, ...] = ()) -> None:
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True, eq=False)
class CrossProducts:
    """The per-group cross-products: everything a deviance evaluation reads, nothing of size n.

    Stored term-major so each slice over the groups is contiguous: ``ZtZ[i, j]`` is the length-G vector of
    Σ_rows z_i z_j per group, ``ZtXy[i]`` the (G, p + 1) matrix of Σ_rows z_i [x y] per group; ``XytXy`` is
    [X y]'[X y]. ``block_sizes`` are the numbers of terms of the bars, in formula order.
    """

    ZtZ: np.ndarray
    ZtXy: np.ndarray
    XytXy: np.ndarray
    n_obs: int
    block_sizes: tuple[int, ...]

    @property
    def n_groups(self) -> int:
        return int(self.ZtZ.shape[2])

    @property
    def n_fixed(self) -> int:
        return int(self.XytXy.shape[0]) - 1

    @property
    def n_random(self) -> int:
        """q: random-effect terms per group, over all bars."""
        return int(self.ZtZ.shape[0])


@dataclass(frozen=True, eq=False)
class PatternProducts:
    """The cross-products of the groups summed within each *pattern*: groups with identical Z_g'Z_g.

    R_g'R_g = W_g' Λ M_g⁻¹ Λ' W_g with W_g = Z_g'[X_g y_g], and M_g = Λ'Z_g'Z_gΛ + I depends on the group
    only through Z_g'Z_g (equal, for instance, for every subject seen at the same visit times). With
    C_P = Λ M_P⁻¹ Λ' per pattern, Σ_g R_g'R_g = Σ_P Σ_ij C_P[i, j] Σ_{g ∈ P} W_g[i]' W_g[j], and log|M| =
    Σ_P (groups in P) log|M_P|. The inner sums are computed once (``WtW``), so a deviance evaluation costs
    O(P q² p²), not O(G q p²). Exact: only the order of the floating-point sums changes.

    ``ZtZ`` is (P, q, q); ``counts`` the groups per pattern; ``WtW`` is (P q q, (p + 1)²), row (P, i, j)
    holding Σ_{g ∈ P} W_g[i]' W_g[j] flattened.
    """

    ZtZ: np.ndarray
    counts: np.ndarray
    WtW: np.ndarray
    XytXy: np.ndarray
    n_obs: int
    block_sizes: tuple[int, ...]

    @property
    def n_patterns(self) -> int:
        return int(self.ZtZ.shape[0])


#: Patterns are used when there are at most this share of groups as patterns (below it an evaluation
#: by pattern costs less than one by group; above, storing the pattern sums costs more than it saves).
PATTERN_SHARE = 0.25


@dataclass(frozen=True)
class ThetaLayout:
    """Where each θ sits in the q × q matrix Λ, and its lower bound (lme4's order and bounds)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    lower: tuple[float, ...]
    block_sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def bars(self) -> np.ndarray:
        """The bar (0-based, formula order) of each θ."""
        return np.repeat(np.arange(len(self.block_sizes)), [k * (k + 1) // 2 for k in self.block_sizes])

    @property
    def diagonal(self) -> np.ndarray:
        """Mask of the θ that are diagonal elements of Λ (variance parameters bounded at 0)."""
        mask: np.ndarray = np.asarray(self.rows) == np.asarray(self.cols)
        return mask

    def start(self) -> np.ndarray:
        """lme4's default start: 1 on the diagonal, 0 off it."""
        return self.diagonal.astype(float)

    def lambda_matrix(self, theta: np.ndarray) -> np.ndarray:
        """Λθ (q × q, block lower-triangular)."""
        q = sum(self.block_sizes)
        lam = np.zeros((q, q))
        lam[list(self.rows), list(self.cols)] = theta
        return lam


@dataclass(frozen=True, eq=False)
class FactorRanef:
    """The conditional modes of one grouping factor's random effects: ``modes`` and ``cond_sd`` are
    (levels × terms), rows in the order of ``levels``, columns the terms of all bars on that factor."""

    group: str
    levels: np.ndarray
    terms: tuple[str, ...]
    modes: np.ndarray
    cond_sd: np.ndarray


@dataclass(frozen=True, eq=False)
class EngineResult:
    """What ``fit_lmm`` estimated, in the order of the design's columns and bars.

    ``deviance`` is the ML deviance (−2 log-likelihood) or the REML criterion. ``covariances[k]`` is the
    covariance matrix of bar k's random effects (σ² Λ_k Λ_k'). ``modes`` (G × q) are the conditional modes
    of the random effects, ``cond_sd`` their conditional standard deviations; columns follow
    ``Design.Z`` (with several grouping factors: those of the primary factor ``Design.group`` only, columns
    the terms of its bars). ``ranef`` holds the modes of every grouping factor, in formula order of first
    appearance. ``evaluations`` counts deviance evaluations of all optimizer runs.
    """

    reml: bool
    theta: np.ndarray
    deviance: float
    beta: np.ndarray
    vcov: np.ndarray
    sigma: float
    covariances: tuple[np.ndarray, ...]
    modes: np.ndarray
    cond_sd: np.ndarray
    fitted: np.ndarray
    residuals: np.ndarray
    converged: bool
    singular: bool
    messages: tuple[str, ...]
    gradient_max: float
    evaluations: int
    attempts: tuple[OptimizerAttempt, ...]
    ranef: tuple[FactorRanef, ...] = ()

    @property
    def loglik(self) -> float:
        """The maximized log-likelihood (ML) or REML log-likelihood (REML): −deviance / 2."""
        return -0.5 * self.deviance


# ------------------------------------------------------------------------------------- cross-products


def compute_crossproducts(design: Design) -> CrossProducts:
    """One pass over the rows: per-group Z'Z and Z'[X y], one sparse product per random-effect column.

    For column z_i of Z, the G × n matrix with z_i's value of each row at (its group, that row) times
    [Z X y] gives Σ_rows z_i [z x y] per group: each row is read once per column of Z, and nothing of size
    n × q × (q + p + 1) is materialized (that temporary cost more than the sums at millions of rows).
    Built column-compressed, one entry per row, so nothing is sorted; sums are in row order per group.
    """
    columns = [block.Z[:, j] for block in design.blocks for j in range(block.Z.shape[1])]
    n, q, p, G = design.n_obs, len(columns), design.X.shape[1], design.n_groups
    pointers = np.arange(n + 1)
    ZtZ = np.empty((q, q, G))
    ZtXy = np.empty((q, G, p + 1))
    for i, z in enumerate(columns):
        weighted = sparse.csc_matrix((z, design.codes, pointers), shape=(G, n))
        for j in range(i + 1):
            ZtZ[i, j] = weighted @ columns[j]
            ZtZ[j, i] = ZtZ[i, j]
        ZtXy[i, :, :p] = weighted @ design.X
        ZtXy[i, :, p] = weighted @ design.y
    XtX = design.X.T @ design.X
    Xty = design.X.T @ design.y
    XytXy = np.empty((p + 1, p + 1))
    XytXy[:p, :p] = XtX
    XytXy[:p, p] = XytXy[p, :p] = Xty
    XytXy[p, p] = design.y @ design.y
    return CrossProducts(
        ZtZ=ZtZ,
        ZtXy=ZtXy,
        XytXy=XytXy,
        n_obs=n,
        block_sizes=tuple(len(block.terms) for block in design.blocks),
    )


def group_patterns(products: CrossProducts, *, max_share: float = PATTERN_SHARE) -> PatternProducts | None:
    """Group the groups by identical Z_g'Z_g (bit for bit) and sum their W_g[i]' W_g[j]; None when the
    patterns number more than ``max_share`` of the groups (then the per-group evaluation is cheaper)."""
    q, G, k = products.ZtXy.shape
    rows, cols = np.tril_indices(q)
    keys = products.ZtZ[rows, cols]  # (q(q+1)/2, G)
    order = np.lexsort(keys)  # np.unique(axis=0) sorts structured rows, several times slower
    ordered = keys[:, order]
    starts = np.concatenate(([True], np.any(ordered[:, 1:] != ordered[:, :-1], axis=0)))
    P = int(starts.sum())
    if P > max(1.0, max_share * G):
        return None
    inverse = np.empty(G, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    first = order[starts]
    counts = np.bincount(inverse, minlength=P)
    # Σ_{g ∈ P} W_i[g, a] W_j[g, :] for each column a of W_i: the P × G pattern indicator weighted by that
    # column, times W_j. No G × k² temporary of outer products (it cost more than the sums at 10⁵ groups).
    pointers = np.arange(G + 1)
    WtW = np.empty((P, q, q, k, k))
    for i in range(q):
        for j in range(i + 1):
            for a in range(k):
                weighted = sparse.csc_matrix((products.ZtXy[i][:, a], inverse, pointers), shape=(P, G))
                WtW[:, i, j, a] = weighted @ products.ZtXy[j]
            if i != j:  # Σ W_j' W_i is the transpose of Σ W_i' W_j
                WtW[:, j, i] = WtW[:, i, j].transpose(0, 2, 1)
    return PatternProducts(
        ZtZ=np.ascontiguousarray(products.ZtZ[:, :, first].transpose(2, 0, 1)),
        counts=counts.astype(float),
        WtW=WtW.reshape(P * q * q, k * k),
        XytXy=products.XytXy,
        n_obs=products.n_obs,
        block_sizes=products.block_sizes,
    )


def layout_theta(block_sizes: tuple[int, ...]) -> ThetaLayout:
    """θ's positions in Λ: per bar, the lower triangle column by column (lme4's ``getME(m, "theta")``)."""
    rows: list[int] = []
    cols: list[int] = []
    lower: list[float] = []
    offset = 0
    for size in block_sizes:
        for j in range(size):
            for i in range(j, size):
                rows.append(offset + i)
                cols.append(offset + j)
                lower.append(0.0 if i == j else -math.inf)
        offset += size
    return ThetaLayout(rows=tuple(rows), cols=tuple(cols), lower=tuple(lower), block_sizes=block_sizes)


# ------------------------------------------------------------------------------------------- deviance


@dataclass(frozen=True, eq=False)
class _Solution:
    """The penalized least-squares solution at one θ (what the deviance and the estimates need)."""

    deviance: float
    r2: float
    chol_S: np.ndarray  # Cholesky factor of [A b; b' c] ((p + 1) × (p + 1))
    chol_M: np.ndarray  # (q, q, G): L_g, lower triangle
    R: np.ndarray  # (q, G, p + 1): L_g⁻¹ Λ' Z_g'[X_g y_g]
    lam: np.ndarray


def profiled_deviance(source: Design | CrossProducts | PatternProducts, theta: np.ndarray, reml: bool) -> float:
    """The ML deviance (profiled over β and σ²) or the REML criterion at ``theta``.

    From a ``Design`` the cross-products are computed first (one pass over the rows); from a
    ``CrossProducts`` the cost does not depend on the number of rows, from ``PatternProducts`` not on the
    number of groups either. A design with several grouping factors goes to
    ``sparse_engine.multilevel_deviance``. Returns ``inf`` where the penalized residual sum of squares is
    not positive.
    """
    if isinstance(source, PatternProducts):
        return _pattern_deviance(source, lambda_at(source.block_sizes, theta), reml)
    if isinstance(source, Design) and not source.single_factor:
        from longitudinal.sparse_engine import multilevel_deviance

        return multilevel_deviance(source, theta, reml)
    products = source if isinstance(source, CrossProducts) else compute_crossproducts(source)
    solution = _solve(products, lambda_at(products.block_sizes, theta), reml)
    return solution.deviance if solution is not None else math.inf


def lambda_at(block_sizes: tuple[int, ...], theta: np.ndarray) -> np.ndarray:
    """Λθ for a θ given from outside the optimizer, its length checked against the model's."""
    layout = layout_theta(block_sizes)
    theta = np.asarray(theta, dtype=float)
    if theta.shape != (layout.size,):
        raise ValueError(f"theta has shape {theta.shape}; this model has {layout.size} covariance parameters")
    return layout.lambda_matrix(theta)


def _solve(products: CrossProducts, lam: np.ndarray, reml: bool) -> _Solution | None:
    """Penalized least squares at Λ; None where r² ≤ 0 or a factorization fails.

    The Cholesky factor of the augmented S = [A b; b' c] holds everything: its leading p × p block is
    RX (A = RX RX'), its last row (w', r) with RX w = b and r² = c − w'w, the penalized RSS.
    """
    chol_M, R, logdet_M = _factor_groups(products, lam)
    q, G, k = R.shape
    flat = R.reshape(q * G, k)
    profiled = _profile(products.XytXy - flat.T @ flat, logdet_M, products.n_obs, reml)
    if profiled is None:
        return None
    deviance, r2, chol_S = profiled
    return _Solution(deviance=deviance, r2=r2, chol_S=chol_S, chol_M=chol_M, R=R, lam=lam)


def _pattern_deviance(patterns: PatternProducts, lam: np.ndarray, reml: bool) -> float:
    """The deviance at Λ from the pattern sums (``_solve``'s value, evaluated per pattern); inf where undefined."""
    M = lam.T @ patterns.ZtZ @ lam + np.eye(lam.shape[0])  # (P, q, q)
    try:
        L = np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        return math.inf
    logdet_M = 2.0 * float(patterns.counts @ np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1))
    T = np.linalg.solve(L, np.broadcast_to(lam.T, M.shape))  # L_P⁻¹ Λ'
    C = np.swapaxes(T, 1, 2) @ T  # Λ M_P⁻¹ Λ'
    k = patterns.XytXy.shape[0]
    S = patterns.XytXy - (C.reshape(-1) @ patterns.WtW).reshape(k, k)
    profiled = _profile(S, logdet_M, patterns.n_obs, reml)
    return profiled[0] if profiled is not None else math.inf


def _profile(S: np.ndarray, logdet_M: float, n: int, reml: bool) -> tuple[float, float, np.ndarray] | None:
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
        deviance = logdet_M + logdet_A + dof * (1.0 + _LOG_2PI + math.log(r2 / dof))
    else:
        deviance = logdet_M + n * (1.0 + _LOG_2PI + math.log(r2 / n))
    return deviance, r2, chol_S


def _factor_groups(products: CrossProducts, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per group: L_g (Cholesky of Λ'Z_g'Z_gΛ + I) and L_g⁻¹ Λ' Z_g'[X_g y_g]; and log|M| = Σ log|M_g|."""
    ZtZ, ZtXy = products.ZtZ, products.ZtXy
    q, G, k = ZtXy.shape
    if q == 1:
        l11 = lam[0, 0]
        m = l11 * l11 * ZtZ[0, 0] + 1.0
        d = np.sqrt(m)
        R = ((l11 / d)[:, None] * ZtXy[0])[None]
        return d[None, None], R, float(np.log(m).sum())
    if q == 2:
        l11, l21, l22 = lam[0, 0], lam[1, 0], lam[1, 1]
        a, b, c = ZtZ[0, 0], ZtZ[1, 0], ZtZ[1, 1]
        k21 = b * l11 + c * l21  # (Z'Z Λ)[1, 0]
        m11 = l11 * (a * l11 + b * l21) + l21 * k21 + 1.0
        m22 = l22 * l22 * c + 1.0
        chol = np.empty((2, 2, G))
        L11 = np.sqrt(m11, out=chol[0, 0])
        L21 = np.divide(l22 * k21, L11, out=chol[1, 0])
        d22 = m22 - L21 * L21
        L22 = np.sqrt(d22, out=chol[1, 1])
        chol[0, 1] = 0.0
        # R_0 = (l11 W_0 + l21 W_1) / L11,   R_1 = (l22 W_1 − L21 R_0) / L22,   W_i = Z_i'[X y] per group
        R = np.empty((2, G, k))
        np.multiply((l11 / L11)[:, None], ZtXy[0], out=R[0])
        if l21 != 0.0:
            R[0] += (l21 / L11)[:, None] * ZtXy[1]
        np.multiply((l22 / L22)[:, None], ZtXy[1], out=R[1])
        R[1] -= (L21 / L22)[:, None] * R[0]
        return chol, R, float(np.log(m11).sum() + np.log(d22).sum())
    M = np.einsum("ai,abg,bj->gij", lam, ZtZ, lam, optimize=True) + np.eye(q)
    chol = np.ascontiguousarray(np.linalg.cholesky(M).transpose(1, 2, 0))
    logdet = 2.0 * float(sum(np.log(chol[i, i]).sum() for i in range(q)))
    B = np.tensordot(lam.T, ZtXy, axes=(1, 0))  # Λ' Z_g'[X_g y_g], (q, G, p + 1)
    return chol, _forward_groups(chol, B), logdet


def _forward_groups(chol: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Solve L_g X_g = B_g for all groups at once: chol (q, q, G), B (q, G) or (q, G, k) → like B."""
    q, lift = chol.shape[0], _per_group(B)
    X = np.empty(B.shape)
    for i in range(q):
        acc = np.array(B[i])
        for j in range(i):
            acc -= chol[i, j][lift] * X[j]
        X[i] = acc / chol[i, i][lift]
    return X


def _backward_groups(chol: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Solve L_g' X_g = B_g for all groups at once: chol (q, q, G), B (q, G) or (q, G, k) → like B."""
    q, lift = chol.shape[0], _per_group(B)
    X = np.empty(B.shape)
    for i in reversed(range(q)):
        acc = np.array(B[i])
        for j in range(i + 1, q):
            acc -= chol[j, i][lift] * X[j]
        X[i] = acc / chol[i, i][lift]
    return X


def _per_group(B: np.ndarray) -> tuple[slice | None, ...]:
    """The index that lines a per-group vector (G,) up with one row B[i] of shape (G,) or (G, k)."""
    return (slice(None),) + (None,) * (B.ndim - 2)


# ------------------------------------------------------------------------------------------- fitting


def fit_lmm(design: Design, *, reml: bool) -> EngineResult:
    """Fit the design by ML (``reml=False``) or REML with lme4's formulation and convergence checks.

    The fit runs on the standardized design (``longitudinal.scaling``: outcome, fixed-effect and
    random-effect columns centred and scaled where the model is invariant to it) and every estimate is
    carried back exactly, so the units of the data do not matter: θ, β, vcov(β), σ, the covariances, the
    conditional modes and SDs, fitted values, residuals, the log-likelihood and lme4's REML criterion are
    those of the design given. The convergence and singularity checks are made in the standardized θ,
    where lme4's absolute tolerances mean what they are meant to.

    Raises ``FitFailure`` (a ``FitError``) when the model cannot be fitted to these data: too few groups
    or observations for the random effects (lme4's ``lmerControl`` checks), a penalized residual sum of
    squares that is zero or not finite at every θ tried, or an outcome reproduced exactly by the model.
    """
    standardized, standardization = standardize(design)
    reml_offset = standardization.deviance_offset(design.n_obs, reml)
    try:
        if design.single_factor:
            result = _fit_one_factor(standardized, reml=reml, ranef_map=standardization.ranef_map)
        else:
            from longitudinal.sparse_engine import fit_multilevel  # nested or crossed: the blocked sparse path

            result = fit_multilevel(standardized, reml=reml, ranef_map=standardization.ranef_map)
    except FitFailure as failure:
        raise FitFailure(str(failure), _shift_attempts(failure.attempts, reml_offset)) from None
    return restore_units(result, design, standardization)


def _fit_one_factor(design: Design, *, reml: bool, ranef_map: np.ndarray) -> EngineResult:
    """``fit_lmm`` for one grouping factor on a design as given (no standardization); the random effects
    are reported for Z B⁻¹, B = ``ranef_map`` (see ``_assemble``)."""
    check_identifiable(design)
    products = compute_crossproducts(design)
    layout = layout_theta(products.block_sizes)
    patterns = group_patterns(products)

    def deviance(theta: np.ndarray) -> float:
        if patterns is not None:  # subjects sharing their visit pattern share their factorization
            return _pattern_deviance(patterns, layout.lambda_matrix(theta), reml)
        solution = _solve(products, layout.lambda_matrix(theta), reml)
        return solution.deviance if solution is not None else math.inf

    best, attempts = minimize_deviance(deviance, layout)
    theta = best.theta
    solution = _solve(products, layout.lambda_matrix(theta), reml)
    if solution is None:
        raise FitFailure("the deviance is not finite at the optimum; check the data and the formula", attempts)
    return _assemble(
        design, products, layout, theta, solution, reml=reml, converged=best.converged, message=best.message,
        gradient_max=best.gradient_max, attempts=attempts, ranef_map=ranef_map,
    )


def restore_units(result: EngineResult, design: Design, standardization: Standardization) -> EngineResult:
    """The fit of the standardized design in the units of ``design`` (see ``longitudinal.scaling``).

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


def _shift_attempts(attempts: tuple[OptimizerAttempt, ...], deviance_offset: float) -> tuple[OptimizerAttempt, ...]:
    """Optimizer attempts with their log-likelihood moved by −offset / 2 (the units of the data)."""
    return tuple(dataclasses.replace(a, loglik=a.loglik - 0.5 * deviance_offset) for a in attempts)


def minimize_deviance(
    deviance: Callable[[np.ndarray], float], layout: ThetaLayout,
) -> tuple[_Run, tuple[OptimizerAttempt, ...]]:
    """BOBYQA from lme4's start with lme4's checks, one restart if not convincing; the best run and all runs.

    Raises ``FitFailure`` when the deviance is not finite anywhere the optimizer went.
    """
    attempts: list[OptimizerAttempt] = []
    runs: list[_Run] = []
    start = layout.start()
    for label in ("bobyqa", "bobyqa (restart)"):
        began = time.perf_counter()
        run = _optimize(deviance, start, layout)
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


@dataclass(frozen=True, eq=False)
class _Run:
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


def _optimize(deviance: Callable[[np.ndarray], float], start: np.ndarray, layout: ThetaLayout) -> _Run:
    """BOBYQA from ``start``, then lme4's ``check.boundary`` and ``checkConv`` at the optimum."""
    lower = np.asarray(layout.lower)
    theta, value, evaluations, status = _run_bobyqa(deviance, start, lower)
    if not math.isfinite(value):
        return _Run(theta, value, False, False, math.nan, evaluations, "the deviance is not finite at any θ tried")
    theta, value = _snap_to_boundary(deviance, theta, value, lower)
    check = _check_convergence(deviance, theta, value, layout)
    message = "; ".join(filter(None, (status, *check.notes)))
    ok = status == ""
    return _Run(theta, value, check.converged and ok, check.settled and ok, check.gradient_max, evaluations, message)


def check_identifiable(design: Design) -> None:
    """lme4's ``lmerControl`` checks that stop a fit, per grouping factor and per bar: too few groups,
    rows or rows per random effect."""
    n, p = design.n_obs, design.X.shape[1]
    for group in design.groups:
        G = design.levels_of(group)
        if G < 2:
            raise FitFailure(f"grouping factor {group!r} has {G} level; random effects need at least 2 groups")
        if n <= G:
            raise FitFailure(
                f"number of observations ({n}) is not larger than the number of levels of {group!r} ({G}): "
                "its random effects and the residual variance are not identifiable; drop that random-effects term"
            )
    for block in design.blocks:
        effects = len(block.terms) * block.n_levels
        if n <= effects:
            bar = f"({' + '.join(block.terms)} | {block.group})"
            raise FitFailure(
                f"number of observations ({n}) is not larger than the number of random effects ({effects}) "
                f"for {bar}: its variance and the residual variance are not identifiable; "
                "use fewer random-effect terms"
            )
    if n <= p:
        raise FitFailure(f"number of observations ({n}) is not larger than the number of fixed effects ({p})")


def _run_bobyqa(
    deviance: Callable[[np.ndarray], float], start: np.ndarray, lower: np.ndarray,
) -> tuple[np.ndarray, float, int, str]:
    """Minimize with nlopt's bounded BOBYQA; returns θ, deviance, evaluations and a status note ("" if ok).

    The initial step is nlopt's default, as in lme4's ``nloptwrap`` (nloptr sets none): from lme4's start
    this retraces lme4's path. The best point seen is tracked so that an nlopt exception (round-off
    limited) still yields it; non-finite deviances are shown to BOBYQA as a large finite value.
    """
    import nlopt

    best: dict[str, object] = {"value": math.inf, "theta": start.copy()}
    count = [0]

    def objective(theta: np.ndarray, _grad: np.ndarray) -> float:
        count[0] += 1
        value = deviance(theta)
        if not math.isfinite(value):
            return _UNDEFINED_DEVIANCE
        if value < best["value"]:  # type: ignore[operator]
            best["value"], best["theta"] = value, theta.copy()
        return value

    opt = nlopt.opt(nlopt.LN_BOBYQA, start.shape[0])
    opt.set_lower_bounds(lower)
    opt.set_min_objective(objective)
    opt.set_xtol_abs(XTOL_ABS)
    opt.set_ftol_abs(FTOL_ABS)
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


@dataclass(frozen=True)
class _Convergence:
    """lme4's ``checkConv`` verdict at an optimum (see ``_check_convergence``)."""

    converged: bool
    settled: bool
    gradient_max: float
    notes: tuple[str, ...]


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
    gradient, hessian = _derivatives(deviance, theta, value)
    singular = singular_bars(layout, theta)
    free = ~(layout.diagonal & (theta - np.asarray(layout.lower) < SINGULAR_TOL)) & ~np.isin(layout.bars, singular)
    if not free.any():
        return _Convergence(True, True, 0.0, ())
    g = gradient[free]
    H = hessian[np.ix_(free, free)]
    if not np.all(np.isfinite(g)) or not np.all(np.isfinite(H)):
        return _Convergence(bool(singular), False, math.nan, ("the gradient of the deviance at the optimum is not finite",))
    notes: list[str] = []
    try:
        scaled = np.linalg.solve(np.linalg.cholesky(H).T, g)
        gradient_max = float(np.max(np.minimum(np.abs(scaled), np.abs(g))))
    except np.linalg.LinAlgError:
        # lme4 reports "unable to evaluate scaled gradient"; the plain gradient still says something.
        gradient_max = float(np.max(np.abs(g)))
        notes.append("unable to evaluate the scaled gradient (Hessian not positive definite)")
    settled = gradient_max < GRADIENT_TOL
    if singular:
        return _Convergence(True, settled, gradient_max, ())
    eigenvalues = np.linalg.eigvalsh(H)
    negative = int(np.sum(eigenvalues < -HESSIAN_TOL))
    if negative:
        # lme4's checkHess (code -3): "Model failed to converge: degenerate Hessian with %d negative eigenvalues".
        notes.append(f"failed to converge: degenerate Hessian with {negative} negative "
                     f"eigenvalue{'s' if negative > 1 else ''}")
    elif np.any(np.abs(eigenvalues) < HESSIAN_TOL):
        notes.append("Hessian is numerically singular: parameters are not uniquely determined")
    if not settled:
        notes.insert(0, f"failed to converge with max|grad| = {gradient_max:.3g} (tol = {GRADIENT_TOL:g})")
    return _Convergence(settled and not negative, settled, gradient_max, tuple(notes))


def _derivatives(
    deviance: Callable[[np.ndarray], float], theta: np.ndarray, value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient and Hessian with step 1e-4 (lme4's ``deriv12``)."""
    k = theta.shape[0]
    h = DERIVATIVE_STEP
    gradient = np.empty(k)
    hessian = np.empty((k, k))

    def at(*moves: tuple[int, float]) -> float:
        point = theta.copy()
        for index, step in moves:
            point[index] += step
        return deviance(point)

    for j in range(k):
        up, down = at((j, h)), at((j, -h))
        gradient[j] = (up - down) / (2 * h)
        hessian[j, j] = (up - 2 * value + down) / (h * h)
        for i in range(j):
            hessian[i, j] = hessian[j, i] = (
                at((i, h), (j, h)) - at((i, h), (j, -h)) - at((i, -h), (j, h)) + at((i, -h), (j, -h))
            ) / (4 * h * h)
    return gradient, hessian


def _assemble(
    design: Design, products: CrossProducts, layout: ThetaLayout, theta: np.ndarray, solution: _Solution, *,
    reml: bool, converged: bool, message: str, gradient_max: float, attempts: tuple[OptimizerAttempt, ...],
    ranef_map: np.ndarray,
) -> EngineResult:
    """Estimates at the optimum θ: β, σ, vcov, covariance per bar, conditional modes, fitted values.

    The conditional modes and SDs are reported for the random effects of Z B⁻¹ (B = ``ranef_map``: b = B u'
    for the modes b' of ``design``'s Z), the original design's when ``design`` is its standardized copy:
    their conditional covariance σ² (BΛ) M⁻¹ (BΛ)' needs B inside, not after. Fitted values use ``design``'s.
    """
    n, p = products.n_obs, products.n_fixed
    sigma2 = solution.r2 / (n - p if reml else n)
    lam = solution.lam
    RX = solution.chol_S[:p, :p]
    RX_inv = np.linalg.solve(RX, np.eye(p))  # small p × p; triangular, but LAPACK's general solve is exact enough
    beta = RX_inv.T @ solution.chol_S[p, :p]
    vcov = sigma2 * (RX_inv.T @ RX_inv)
    R = solution.R
    v = R[:, :, p] - R[:, :, :p] @ beta  # cu_g − RZX_g β, (q, G)
    u = _backward_groups(solution.chol_M, v)
    fitted = design.X @ beta + _random_part(design, (lam @ u).T)  # b_g = Λ u_g
    residuals = design.y - fitted
    lam_out = ranef_map @ lam
    modes = (lam_out @ u).T  # (G, q)
    q, G = u.shape
    T = _forward_groups(solution.chol_M, np.broadcast_to(lam_out.T[:, None, :], (q, G, q)))  # L_g⁻¹ (BΛ)'
    cond_sd = np.sqrt(sigma2 * np.einsum("igj,igj->gj", T, T))

    # r² recomputed from the residuals (no cancellation): rounding noise in the profiled r² can look like
    # a tiny but positive residual variance when the model reproduces the outcome exactly.
    r2_direct = float(residuals @ residuals + np.sum(u * u))
    sigma = math.sqrt(sigma2)
    exact_fit_failure(r2_direct, design.y, sigma, attempts)

    covariances, singular = block_covariances(layout, theta, sigma2)
    return EngineResult(
        reml=reml, theta=theta, deviance=solution.deviance, beta=beta, vcov=vcov, sigma=sigma,
        covariances=tuple(covariances), modes=modes, cond_sd=cond_sd, fitted=fitted, residuals=residuals,
        converged=converged, singular=singular, messages=tuple(m for m in message.split("; ") if m),
        gradient_max=gradient_max, evaluations=sum(a.iterations for a in attempts), attempts=attempts,
        ranef=(FactorRanef(
            group=design.group, levels=design.levels, terms=tuple(t for b in design.blocks for t in b.terms),
            modes=modes, cond_sd=cond_sd,
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


def singular_bars(layout: ThetaLayout, theta: np.ndarray) -> tuple[int, ...]:
    """The bars whose covariance is on the boundary (lme4's ``isSingular``, tol 1e-4: a diagonal θ below
    1e-4; here also a correlation beyond ±0.999, whose Cholesky factor is singular to within rounding)."""
    lam = layout.lambda_matrix(theta)
    out = []
    at = 0
    for k, size in enumerate(layout.block_sizes):
        block = lam[at:at + size, at:at + size]
        at += size
        if np.any(np.diagonal(block) < SINGULAR_TOL):
            out.append(k)
            continue
        if size > 1:
            cov = block @ block.T
            sd = np.sqrt(np.diagonal(cov))
            corr = cov / np.outer(sd, sd)
            if np.any(np.abs(corr[~np.eye(size, dtype=bool)]) > CORRELATION_LIMIT):
                out.append(k)
    return tuple(out)


def block_covariances(layout: ThetaLayout, theta: np.ndarray, sigma2: float) -> tuple[list[np.ndarray], bool]:
    """Each bar's random-effect covariance σ² Λ_k Λ_k', and whether the fit is singular (``singular_bars``)."""
    lam = layout.lambda_matrix(theta)
    covariances: list[np.ndarray] = []
    at = 0
    for size in layout.block_sizes:
        block = lam[at:at + size, at:at + size]
        covariances.append(sigma2 * block @ block.T)
        at += size
    return covariances, bool(singular_bars(layout, theta))


def singular_message(
    design: Design, layout: ThetaLayout, theta: np.ndarray, covariances: tuple[np.ndarray, ...], sigma: float,
    term_scales: tuple[np.ndarray, ...],
) -> str:
    """lme4's singular-fit message naming what is on the boundary, in the units of ``design``.

    ``theta`` says which bars are singular (judged where the fit was computed); ``covariances`` (the
    design's units) say how: a term whose variance is zero (its SD below 1e-4 residual SDs once its column
    is divided by ``term_scales``, the spread the standardization used), else a pair of terms whose
    correlation is ±1 (beyond ±0.999), else the bar's covariance matrix as a whole.
    """
    parts = []
    for k in singular_bars(layout, theta):
        block, cov = design.blocks[k], covariances[k]
        sd = np.sqrt(np.clip(np.diagonal(cov), 0.0, None))
        zero = [i for i in range(len(block.terms)) if sd[i] * term_scales[k][i] < SINGULAR_TOL * sigma]
        found = [f"the variance of {block.terms[i]!r} for {block.group} is zero" for i in zero]
        rest = [i for i in range(len(block.terms)) if i not in zero]
        for a, j in enumerate(rest):
            for i in rest[a + 1:]:
                corr = cov[i, j] / (sd[i] * sd[j])
                if abs(corr) > CORRELATION_LIMIT:
                    found.append(f"the correlation of {block.terms[j]!r} and {block.terms[i]!r} for {block.group} "
                                 f"is {'-1' if corr < 0 else '1'}")
        if not found:
            found.append(f"the covariance matrix of {', '.join(map(repr, block.terms))} for {block.group} is singular")
        parts.extend(found)
    return "boundary (singular) fit: " + " and ".join(parts)


def exact_fit_failure(r2_direct: float, y: np.ndarray, sigma: float, attempts: tuple[OptimizerAttempt, ...]) -> None:
    """Raise ``FitFailure`` when the model reproduces the outcome exactly (zero residual variance).

    The residuals are compared with the outcome's centred spread (its SD), not its root mean square: an
    outcome far from zero (``Reaction + 1e6``) has a large RMS without having more variation to explain.
    """
    n = y.shape[0]
    spread = float(np.std(y))
    reference = max(spread, 1e-8 * math.sqrt(float(y @ y) / n))
    if not math.isfinite(sigma) or r2_direct <= (EXACT_FIT_RATIO * reference) ** 2 * n:
        raise FitFailure(
            f"zero residual variance: the model reproduces the outcome exactly (residual SD "
            f"{math.sqrt(r2_direct / n) / reference:.3g} times the outcome's SD), so the likelihood is "
            "unbounded; the data are degenerate for this model",
            attempts,
        )
