"""lme4's profiled deviance for nested and crossed random effects: a blocked sparse Cholesky factorization.

The formulation is the one of ``longitudinal.fit.lmm.onefactor`` (Bates et al. 2015, sections 3-5; read that module
first): b = Λθ u, M = Λ'Z'ZΛ + I = LL', the same ML deviance and REML criterion, β and σ² in closed form.
What changes with several grouping factors is the structure of M. The random effects are split in two:

- the *primary* factor's (``Design.group``, the one with the most levels: the subject, or ``school:pupil``)
  — its part of M is block-diagonal over its levels, A = ⊕_g A_g with small q₁ × q₁ blocks, exactly as in
  the one-factor engine (same per-level cross-products and the same written-out Cholesky factors);
- the *rest*: every other factor's random effects (``rater``, ``school``, ``dog``), Q_R of them.

Ordering the primary part first is the fill-reducing ordering that MixedModels.jl uses (blocks sorted by
decreasing levels, first one block-diagonal): with M = [A B; B' C],

    L = [L₁ 0; RZR' L_R],   L₁ = ⊕ L_g,   RZR = L₁⁻¹ B  (sparse, Q₁ × Q_R),   L_R L_R' = C − RZR'RZR

so log|M| = Σ_g log|A_g| + log|S|, S = C − RZR'RZR. B = Λ₁' Z₁'Z_R Λ_R is sparse with one dense q₁ × q_b
block per (primary level, other level) pair that occurs in the data; those pair blocks are summed once, in
one pass over the rows, and each evaluation touches only pairs and levels, never rows. The Schur
complement S (Q_R × Q_R) is factored densely (Cholesky) when small (≤ ``SCHUR_DENSE_LIMIT``: raters,
sides, a few hundred schools), else as a sparse matrix by SuperLU with a fill-reducing ordering and no
pivoting (S is symmetric positive definite; log|S| = Σ log diag U): nested designs keep S sparse (one
block per school). More than ``REST_LIMIT`` random effects outside the primary factor are refused with
a message. Only solves with S are needed: c_R'c_R = r'S⁻¹r with r = Λ_R'Z_R'[X y] − RZR'c₁.

The conditional covariance of the random effects is the exact σ² Λ M⁻¹ Λ' diagonal: for the primary part
A⁻¹ + V S⁻¹ V' (V = L₁'⁻¹ RZR, S = L_R L_R'), for the rest S⁻¹ — as lme4's ``ranef(condVar = TRUE)``
(given β). Missing values are not handled here: the design has none (validation removed those rows).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.linalg import LOG_2PI, backward_groups, factor_groups, forward_groups
from longitudinal.fit.lmm.checks import check_identifiable, exact_fit_failure
from longitudinal.fit.lmm.crossproducts import CrossProducts, compute_crossproducts
from longitudinal.fit.optimize import minimize_deviance
from longitudinal.fit.theta import block_covariances, lambda_at, layout_theta
from longitudinal.model.design import Design
from longitudinal.records import EngineResult, FactorRanef, OptimizerAttempt

#: Most random effects outside the primary factor (the Schur complement S is Q_R × Q_R).
REST_LIMIT = 50_000
#: S is factored as a dense matrix up to this size, as a sparse one above.
SCHUR_DENSE_LIMIT = 400
#: RZR is held dense (Q₁ × Q_R) up to this many elements (dense BLAS products beat sparse ones there).
DENSE_RZR_ELEMENTS = 4_000_000
#: Rows of V handled at once when computing conditional variances (bounds memory to ~ this × Q_R floats).
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True, eq=False)
class RestBlock:
    """One bar on a factor other than the primary one and its cross-products.

    Its random effects occupy columns ``offset .. offset + size·n_levels`` of the rest part, level-major.
    ``pair_primary``/``pair_level`` list the (primary level, level) pairs seen in the data and ``cross``
    (pairs × q₁ × size) holds Σ z₁ z_b' over the rows of each pair.
    """

    index: int
    group: str
    size: int
    n_levels: int
    offset: int
    pair_primary: np.ndarray
    pair_level: np.ndarray
    cross: np.ndarray


@dataclass(frozen=True, eq=False)
class MultiProducts:
    """Every cross-product a deviance evaluation reads with several grouping factors (nothing of size n).

    ``primary`` are the per-level cross-products of the bars on the primary factor (``primary_blocks``,
    positions in the design's bars); ``rest`` the other bars; ``ZtZ_rest`` (Q_R × Q_R) and ``ZtXy_rest``
    (Q_R × (p + 1)) their Z'Z and Z'[X y]; ``XytXy`` is [X y]'[X y]. The ``pattern_*`` arrays fix the
    sparsity pattern of RZR (CSR, rows level-major over the primary factor) and where each pair-block
    value lands in it; ``dense_positions`` (when RZR is small enough to hold dense) its flat positions. ``block_sizes`` are the terms per bar, formula order (θ's layout).
    """

    primary: CrossProducts
    primary_blocks: tuple[int, ...]
    rest: tuple[RestBlock, ...]
    ZtZ_rest: sparse.csr_matrix
    ZtXy_rest: np.ndarray
    pattern_indices: np.ndarray
    pattern_indptr: np.ndarray
    pattern_order: np.ndarray
    dense_positions: np.ndarray | None
    block_sizes: tuple[int, ...]
    n_obs: int

    @property
    def n_rest(self) -> int:
        """Q_R: random effects outside the primary factor."""
        return int(self.ZtZ_rest.shape[0])

    @property
    def n_primary(self) -> int:
        """Q₁: random effects of the primary factor."""
        return self.primary.n_random * self.primary.n_groups


def compute_multiproducts(design: Design) -> MultiProducts:
    """One pass over the rows: the primary factor's per-level products, the pair blocks and the rest's Z'Z."""
    primary_blocks = tuple(i for i, block in enumerate(design.blocks) if block.group == design.group)
    primary_design = dataclasses.replace(design, blocks=tuple(design.blocks[i] for i in primary_blocks))
    primary = compute_crossproducts(primary_design)
    Z1 = primary_design.Z
    n, q1 = Z1.shape
    G1 = design.n_groups
    W = np.column_stack([design.X, design.y])
    rest: list[RestBlock] = []
    z_rows, z_cols, z_vals = [], [], []
    offset = 0
    for index, block in enumerate(design.blocks):
        if index in primary_blocks:
            continue
        size, levels = len(block.terms), block.n_levels
        key = design.codes * levels + block.codes
        pairs, pair_of_row = np.unique(key, return_inverse=True)
        pair_of_row = pair_of_row.reshape(-1)
        indicator = sparse.csc_matrix((np.ones(n), pair_of_row, np.arange(n + 1)), shape=(pairs.shape[0], n))
        products = (Z1[:, :, None] * block.Z[:, None, :]).reshape(n, -1)
        cross = np.asarray(indicator @ products).reshape(-1, q1, size)
        rest.append(RestBlock(
            index=index, group=block.group, size=size, n_levels=levels, offset=offset,
            pair_primary=pairs // levels, pair_level=pairs % levels, cross=cross,
        ))
        for j in range(size):
            z_rows.append(np.arange(n))
            z_cols.append(offset + block.codes * size + j)
            z_vals.append(block.Z[:, j])
        offset += size * levels
    Q_R = offset
    Z_R = sparse.csc_matrix(
        (np.concatenate(z_vals), (np.concatenate(z_rows), np.concatenate(z_cols))), shape=(n, Q_R),
    )
    # The fixed sparsity pattern of RZR: pair block (g, h) of bar b fills rows g·q₁ + i, columns
    # offset_b + h·q_b + j. Values are produced pair-major; ``order`` maps them to CSR order.
    rows, cols = [], []
    for bar in rest:
        term_1 = np.arange(q1)[None, :, None]
        term_b = np.arange(bar.size)[None, None, :]
        shape = (bar.pair_primary.shape[0], q1, bar.size)
        rows.append(np.broadcast_to(bar.pair_primary[:, None, None] * q1 + term_1, shape).ravel())
        cols.append(np.broadcast_to(bar.offset + bar.pair_level[:, None, None] * bar.size + term_b, shape).ravel())
    position = np.concatenate(rows), np.concatenate(cols)
    pattern = sparse.csr_matrix(
        (np.arange(1, position[0].shape[0] + 1, dtype=float), position), shape=(G1 * q1, Q_R),
    )
    pattern.sort_indices()
    dense = G1 * q1 * Q_R <= DENSE_RZR_ELEMENTS
    return MultiProducts(
        primary=primary,
        primary_blocks=primary_blocks,
        rest=tuple(rest),
        ZtZ_rest=sparse.csr_matrix(Z_R.T @ Z_R),
        ZtXy_rest=np.asarray(Z_R.T @ W),
        pattern_indices=pattern.indices.copy(),
        pattern_indptr=pattern.indptr.copy(),
        pattern_order=pattern.data.astype(np.int64) - 1,
        dense_positions=position[0] * Q_R + position[1] if dense else None,
        block_sizes=tuple(len(block.terms) for block in design.blocks),
        n_obs=n,
    )


# ------------------------------------------------------------------------------------------- deviance


@dataclass(frozen=True, eq=False)
class _Solution:
    deviance: float
    r2: float
    logdet_M: float  # log|M| over both levels of the blocked factorization (lme4's ldL2)
    chol_S: np.ndarray  # Cholesky factor of [A b; b' c] for the fixed effects ((p + 1) × (p + 1))
    chol_1: np.ndarray  # (q₁, q₁, G₁): L_g of the primary factor
    R_1: np.ndarray  # (q₁, G₁, p + 1): L_g⁻¹ Λ₁' Z_g'[X_g y_g]
    RZR: np.ndarray | sparse.csr_matrix  # L₁⁻¹ Λ₁' Z₁'Z_R Λ_R (Q₁ × Q_R), dense when small
    pair_values: tuple[np.ndarray, ...]  # RZR per rest bar, (q₁, pairs, q_b)
    schur: _Schur  # the factored Schur complement S = Λ_R'Z_R'Z_RΛ_R + I − RZR'RZR
    r_R: np.ndarray  # Λ_R' Z_R'[X y] − RZR' c₁, (Q_R, p + 1)
    lam: np.ndarray  # Λ over the terms of all bars (formula order)
    lam_1: np.ndarray
    lam_R: sparse.csr_matrix


def _bar_offsets(block_sizes: tuple[int, ...]) -> list[int]:
    return [int(v) for v in np.concatenate([[0], np.cumsum(block_sizes)])]


def _primary_index(products: MultiProducts) -> np.ndarray:
    offsets = _bar_offsets(products.block_sizes)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in products.primary_blocks])


def _rest_lambda(products: MultiProducts, lam: np.ndarray, *, triangular: bool = True) -> sparse.csr_matrix:
    """Λ_R: block-diagonal, each rest bar's Λ_b repeated once per level (its lower triangle only, unless
    ``triangular`` is False: then whole blocks, for a mapped BΛ that is not triangular)."""
    offsets = _bar_offsets(products.block_sizes)
    rows, cols, vals = [], [], []
    for block in products.rest:
        start = offsets[block.index]
        lam_b = lam[start:start + block.size, start:start + block.size]
        i, j = np.tril_indices(block.size) if triangular else np.indices((block.size, block.size)).reshape(2, -1)
        base = block.offset + np.arange(block.n_levels)[:, None] * block.size
        rows.append((base + i).ravel())
        cols.append((base + j).ravel())
        vals.append(np.tile(lam_b[i, j], block.n_levels))
    Q_R = products.n_rest
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(Q_R, Q_R),
    )


def solve_at(products: MultiProducts, lam: np.ndarray, reml: bool) -> _Solution | None:
    """Penalized least squares at Λ by the blocked factorization; None where r² ≤ 0 or a factor fails."""
    lam_1 = lam[np.ix_(_primary_index(products), _primary_index(products))]
    chol_1, R_1, logdet_1 = factor_groups(products.primary.ZtZ, products.primary.ZtXy, lam_1)
    offsets = _bar_offsets(products.block_sizes)
    pair_values = []
    for block in products.rest:
        start = offsets[block.index]
        lam_b = lam[start:start + block.size, start:start + block.size]
        E = np.einsum("ai,pab,bj->ipj", lam_1, block.cross, lam_b, optimize=True)  # Λ₁' D_pair Λ_b
        pair_values.append(forward_groups(chol_1[:, :, block.pair_primary], E))
    RZR = _rest_matrix(products, [v.transpose(1, 0, 2).ravel() for v in pair_values])
    lam_R = _rest_lambda(products, lam)
    C = lam_R.T @ products.ZtZ_rest @ lam_R  # Λ_R' Z_R'Z_R Λ_R, sparse
    gram = RZR.T @ RZR
    schur = _factor_schur(C, gram, products.n_rest)
    if schur is None:
        return None
    q1, G1, k = R_1.shape
    p = k - 1
    c_1 = R_1.transpose(1, 0, 2).reshape(G1 * q1, k)
    r_R = np.asarray(lam_R.T @ products.ZtXy_rest) - np.asarray(RZR.T @ c_1)
    S = products.primary.XytXy - c_1.T @ c_1 - r_R.T @ schur.solve(r_R)
    try:
        chol_S = np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        return None
    r2 = float(chol_S[p, p]) ** 2
    logdet_M = logdet_1 + schur.logdet
    if not (r2 > 0.0 and math.isfinite(r2) and math.isfinite(logdet_M)):
        return None
    n = products.n_obs
    if reml:
        dof = n - p
        logdet_A = 2.0 * float(np.log(np.diagonal(chol_S)[:p]).sum())
        deviance = logdet_M + logdet_A + dof * (1.0 + LOG_2PI + math.log(r2 / dof))
    else:
        deviance = logdet_M + n * (1.0 + LOG_2PI + math.log(r2 / n))
    return _Solution(
        deviance=deviance, r2=r2, logdet_M=logdet_M, chol_S=chol_S, chol_1=chol_1, R_1=R_1, RZR=RZR,
        pair_values=tuple(pair_values), schur=schur, r_R=r_R, lam=lam, lam_1=lam_1, lam_R=lam_R,
    )


def _rest_matrix(products: MultiProducts, values: list[np.ndarray]) -> np.ndarray | sparse.csr_matrix:
    """A Q₁ × Q_R matrix with RZR's pattern from its pair-major values: dense when small, else CSR."""
    flat = np.concatenate(values)
    if products.dense_positions is not None:
        out = np.zeros(products.n_primary * products.n_rest)
        out[products.dense_positions] = flat
        return out.reshape(products.n_primary, products.n_rest)
    return sparse.csr_matrix(
        (flat[products.pattern_order], products.pattern_indices, products.pattern_indptr),
        shape=(products.n_primary, products.n_rest),
    )


@dataclass(frozen=True, eq=False)
class _Schur:
    """A factored symmetric positive definite S: ``solve(B)`` = S⁻¹B and ``logdet`` = log|S|."""

    logdet: float
    chol: np.ndarray | None  # dense Cholesky factor (lower), or None when ``lu`` holds the factorization
    lu: object | None  # scipy.sparse.linalg.SuperLU

    def solve(self, B: np.ndarray) -> np.ndarray:
        if self.chol is not None:
            return np.linalg.solve(self.chol.T, np.linalg.solve(self.chol, B))
        return self.lu.solve(np.asarray(B, dtype=float))  # type: ignore[union-attr, no-any-return]


def _factor_schur(
    C: sparse.spmatrix, gram: np.ndarray | sparse.spmatrix, size: int,
) -> _Schur | None:
    """Factor S = C + I − gram: dense Cholesky when small, else SuperLU (fill-reducing ordering, no pivoting).

    None when S is not positive definite (a Cholesky failure, or a non-positive pivot of the LU).
    """
    if size <= SCHUR_DENSE_LIMIT:
        dense_gram = gram if isinstance(gram, np.ndarray) else gram.toarray()
        try:
            chol = np.linalg.cholesky(C.toarray() + np.eye(size) - dense_gram)
        except np.linalg.LinAlgError:
            return None
        return _Schur(logdet=2.0 * float(np.log(np.diagonal(chol)).sum()), chol=chol, lu=None)
    from scipy.sparse.linalg import splu

    S = sparse.csc_matrix(C + sparse.identity(size, format="csc") - sparse.csc_matrix(gram))
    try:
        lu = splu(S, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    except RuntimeError:  # "Factor is exactly singular"
        return None
    pivots = lu.U.diagonal()
    if not np.all(pivots > 0.0):
        return None
    return _Schur(logdet=float(np.log(pivots).sum()), chol=None, lu=lu)


def multilevel_deviance(source: Design | MultiProducts, theta: np.ndarray, reml: bool) -> float:
    """The ML deviance or REML criterion at ``theta`` (θ in the formula's bar order) for several factors.

    Returns ``inf`` where the penalized residual sum of squares is not positive.
    """
    products = source if isinstance(source, MultiProducts) else compute_multiproducts(source)
    solution = solve_at(products, lambda_at(products.block_sizes, theta), reml)
    return solution.deviance if solution is not None else math.inf


# ------------------------------------------------------------------------------------------- fitting


def fit_multilevel(
    design: Design, *, reml: bool, ranef_map: np.ndarray | None = None, start: np.ndarray | None = None,
) -> EngineResult:
    """Fit a design with several grouping factors (nested or crossed) by ML or REML, on the design as given.

    ``engine.fit_lmm`` calls this on its standardized design (use that: it is exact in any units). Same
    optimizer, convergence and singularity checks and failures as the one-factor engine; θ is in the
    formula's bar order (lme4 orders bars by decreasing number of levels: the likelihood is the same). The
    random effects are reported for Z B⁻¹, B = ``ranef_map`` (identity when None; see ``_assemble``).
    ``start``: θ to start the optimizer from, lme4's start when None.
    """
    _check_identifiable(design)
    products = compute_multiproducts(design)
    layout = layout_theta(products.block_sizes)

    def deviance(theta: np.ndarray) -> float:
        solution = solve_at(products, layout.lambda_matrix(theta), reml)
        return solution.deviance if solution is not None else math.inf

    best, attempts = minimize_deviance(deviance, layout, start=start)
    solution = solve_at(products, layout.lambda_matrix(best.theta), reml)
    if solution is None:
        raise FitFailure("the deviance is not finite at the optimum; check the data and the formula", attempts)
    q = sum(products.block_sizes)
    return _assemble(
        design, products, best.theta, solution, reml=reml, converged=best.converged, message=best.message,
        gradient_max=best.gradient_max, attempts=attempts, ranef_map=np.eye(q) if ranef_map is None else ranef_map,
    )


def _check_identifiable(design: Design) -> None:
    """lme4's ``lmerControl`` checks (as for one factor), and the size limit of the dense Schur part."""
    check_identifiable(design)
    rest = sum(len(b.terms) * b.n_levels for b in design.blocks if b.group != design.group)
    if rest > REST_LIMIT:
        raise FitFailure(
            f"{rest} random effects on factors other than {design.group!r} exceed this engine's limit "
            f"({REST_LIMIT}) for the Schur complement of its factorization; fit fewer levels or terms there"
        )


def _assemble(
    design: Design, products: MultiProducts, theta: np.ndarray, solution: _Solution, *, reml: bool,
    converged: bool, message: str, gradient_max: float, attempts: tuple[OptimizerAttempt, ...],
    ranef_map: np.ndarray,
) -> EngineResult:
    """β, σ, vcov, covariance per bar, conditional modes (per factor) and fitted values at the optimum.

    As in ``engine._assemble``, the modes and conditional SDs are those of Z B⁻¹ (B = ``ranef_map``): Λ is
    replaced by BΛ where they are formed; fitted values use ``design``'s own Z.
    """
    layout = layout_theta(products.block_sizes)
    n, p = products.n_obs, products.primary.n_fixed
    sigma2 = solution.r2 / (n - p if reml else n)
    RX = solution.chol_S[:p, :p]
    RX_inv = np.linalg.solve(RX, np.eye(p))
    beta = RX_inv.T @ solution.chol_S[p, :p]
    vcov = sigma2 * (RX_inv.T @ RX_inv)

    # u = L'⁻¹ (c − c_β): the rest first (L_R'), then the primary levels (L_g'), as L is block-triangular.
    R_1, lam_1 = solution.R_1, solution.lam_1
    q1, G1, _ = R_1.shape
    v_1 = R_1[:, :, p] - R_1[:, :, :p] @ beta
    u_R = solution.schur.solve(solution.r_R[:, p] - solution.r_R[:, :p] @ beta)  # L_R'⁻¹ L_R⁻¹ (r_y − r_X β)
    u_1 = backward_groups(solution.chol_1, v_1 - np.asarray(solution.RZR @ u_R).reshape(G1, q1).T)
    modes_1 = (lam_1 @ u_1).T  # (G₁, q₁)
    modes_R = np.asarray(solution.lam_R @ u_R)

    # What is reported: b = BΛu, and the conditional variances diag σ² (BΛ) M⁻¹ (BΛ)'.
    lam_out = ranef_map @ solution.lam
    primary = _primary_index(products)
    lam_1_out = lam_out[np.ix_(primary, primary)]
    lam_R_out = _rest_lambda(products, lam_out, triangular=False)
    reported_1 = (lam_1_out @ u_1).T
    reported_R = np.asarray(lam_R_out @ u_R)
    T = forward_groups(solution.chol_1, np.broadcast_to(lam_1_out.T[:, None, :], (q1, G1, q1)))
    var_1 = np.einsum("igj,igj->gj", T, T)
    var_1 += _primary_extra(products, solution, lam_1_out).reshape(G1, q1)
    var_R = _quadratic_diagonal(solution.schur, lam_R_out)
    cond_1 = np.sqrt(sigma2 * var_1)
    cond_R = np.sqrt(sigma2 * var_R)

    Z_1 = np.hstack([design.blocks[i].Z for i in products.primary_blocks])
    fitted = design.X @ beta + np.einsum("nq,nq->n", Z_1, modes_1[design.codes])
    for block in products.rest:
        b = modes_R[block.offset:block.offset + block.size * block.n_levels].reshape(block.n_levels, block.size)
        fitted = fitted + np.einsum("nq,nq->n", design.blocks[block.index].Z, b[design.blocks[block.index].codes])
    residuals = design.y - fitted
    # ||u_R||² = v_R'v_R with v_R = L_R⁻¹(r_y − r_X β) = (r_y − r_X β)' S⁻¹ (r_y − r_X β)
    r2_direct = float(residuals @ residuals + np.sum(u_1 * u_1)
                      + (solution.r_R[:, p] - solution.r_R[:, :p] @ beta) @ u_R)
    sigma = math.sqrt(sigma2)
    exact_fit_failure(r2_direct, design.y, sigma, attempts)

    covariances, singular = block_covariances(layout, theta, sigma2)
    messages = [m for m in message.split("; ") if m]
    primary_terms = tuple(t for i in products.primary_blocks for t in design.blocks[i].terms)
    ranef = []
    for group in design.groups:
        if group == design.group:
            ranef.append(FactorRanef(group, design.levels, primary_terms, reported_1, cond_1))
            continue
        bars = [block for block in products.rest if block.group == group]
        span = [slice(b.offset, b.offset + b.size * b.n_levels) for b in bars]
        first = design.blocks[bars[0].index]
        ranef.append(FactorRanef(
            group=group, levels=first.levels,
            terms=tuple(t for b in bars for t in design.blocks[b.index].terms),
            modes=np.hstack([reported_R[s].reshape(b.n_levels, b.size) for b, s in zip(bars, span)]),
            cond_sd=np.hstack([cond_R[s].reshape(b.n_levels, b.size) for b, s in zip(bars, span)]),
        ))
    return EngineResult(
        reml=reml, theta=theta, deviance=solution.deviance, beta=beta, vcov=vcov, sigma=sigma,
        covariances=tuple(covariances), modes=reported_1, cond_sd=cond_1, fitted=fitted, residuals=residuals,
        converged=converged, singular=singular, messages=tuple(messages), gradient_max=gradient_max,
        evaluations=sum(a.iterations for a in attempts), attempts=attempts, ranef=tuple(ranef),
    )


def _primary_extra(products: MultiProducts, solution: _Solution, lam_1: np.ndarray) -> np.ndarray:
    """diag(P S⁻¹ P') per primary random effect, P = ⊕_g Λ₁ L_g'⁻¹ · RZR (the rest's share of its variance);
    ``lam_1`` is Λ₁ or the mapped BΛ₁ that the modes are reported for."""
    values = []
    for block, F in zip(products.rest, solution.pair_values):
        X = backward_groups(solution.chol_1[:, :, block.pair_primary], F)
        values.append(np.einsum("ai,ipj->paj", lam_1, X).ravel())
    return _quadratic_diagonal(solution.schur, _rest_matrix(products, values))


def _quadratic_diagonal(schur: _Schur, P: np.ndarray | sparse.csr_matrix) -> np.ndarray:
    """diag(P S⁻¹ P') row by row, in chunks of rows so that S⁻¹P' never needs more than ~4M floats."""
    rows, width = P.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(width, 1))
    out = np.empty(rows)
    for start in range(0, rows, chunk):
        part = P[start:start + chunk]
        dense = part if isinstance(part, np.ndarray) else part.toarray()
        out[start:start + chunk] = np.einsum("ij,ji->i", dense, schur.solve(dense.T))
    return out
