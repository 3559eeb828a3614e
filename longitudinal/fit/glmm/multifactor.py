"""glmer's Laplace deviance for several grouping factors (nested or crossed), on a sparse factorization.

The formulation is ``fit.glmm.onefactor``'s (read that first); what changes is that the random effects of
different factors meet in M = ΛᵀZᵀWZΛ + I, so it is factored as one sparse matrix per PIRLS step: densely
(Cholesky) up to ``DENSE_LIMIT`` random effects, else by SuperLU without pivoting (M is symmetric positive
definite; log|M| = Σ log diag U). u runs over the bars by decreasing number of levels (lme4's order: the
finest factor, the subject, first), level-major within a bar (level l, term j at offset_k + l q_k + j), so
Λ is block-diagonal with each bar's Λ_k repeated once per level. With few random effects outside the finest
bar (``NATURAL_ORDER_LIMIT``: sites, raters, centres) M is factored in that order, which fills in only among
those; else SuperLU chooses a fill-reducing order.

Stage 1 (β in PIRLS) eliminates u first: S = XᵀWX − BᵀM⁻¹B with B = ΛᵀZᵀWX. Step halving is global, as
lme4's ``pwrssUpdate``. The conditional SDs need the q_k × q_k diagonal blocks of M⁻¹: by block elimination
on the finest bar in the ordered case, else solved for in chunks of columns. Speed matters less here than for
one factor; the cost is one sparse factorization of size Q per PIRLS step. As there, no product goes
through BLAS (``fit.glmm.onefactor``'s docstring says why).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from longitudinal.fit.glmm.families import Family
from longitudinal.fit.glmm.onefactor import (
    JOINT_TOL, MAX_HALVINGS, PIRLS_MAX_ITERATIONS, PirlsFailure, pirls_converged,
)
from longitudinal.fit.glmm.problem import RandomPart
from longitudinal.fit.theta import ThetaLayout
from longitudinal.model.design import Design
from longitudinal.records import FactorRanef

#: M is factored as a dense matrix up to this many random effects, as a sparse one above. Small on
#: purpose: from about 200 rows OpenBLAS factors with several threads, and on a busy machine waiting for
#: them costs 100 ms a factorization (measured here: 0.11 s for 200 × 200, against 1 ms by SuperLU).
DENSE_LIMIT = 100
#: Up to this many random effects outside the finest factor, M is factored in the order above (the coarse
#: block fills in densely, and that is all); beyond, SuperLU chooses a fill-reducing order.
NATURAL_ORDER_LIMIT = 2_000
#: Columns of M⁻¹ solved for at once when computing conditional variances (bounds memory to ~ this × Q).
_CHUNK_ELEMENTS = 4_000_000
_ROUNDING = 1e-12


class _Factor:
    """A factored symmetric positive definite M: ``solve(B)`` = M⁻¹B and ``logdet`` = log|M|."""

    def __init__(self, M: sparse.csc_matrix, ordering: str) -> None:
        self.matrix = M
        size = M.shape[0]
        self.chol: np.ndarray | None = None
        self.lu: object | None = None
        if size <= DENSE_LIMIT:
            self.chol = np.linalg.cholesky(M.toarray())  # LinAlgError where not positive definite
            self.logdet = 2.0 * float(np.log(np.diagonal(self.chol)).sum())
            return
        from scipy.sparse.linalg import splu

        try:
            lu = splu(M, permc_spec=ordering, diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        except RuntimeError as exc:  # "Factor is exactly singular"
            raise np.linalg.LinAlgError(str(exc)) from None
        pivots = lu.U.diagonal()
        if not np.all(pivots > 0.0):
            raise np.linalg.LinAlgError("M is not positive definite")
        self.lu = lu
        self.logdet = float(np.log(pivots).sum())

    def solve(self, B: np.ndarray) -> np.ndarray:
        if self.chol is not None:
            out: np.ndarray = np.linalg.solve(self.chol.T, np.linalg.solve(self.chol, B))
            return out
        return self.lu.solve(np.asarray(B, dtype=float))  # type: ignore[union-attr, no-any-return]


@dataclass(frozen=True, eq=False)
class _Pass:
    """One pass at (u, β): η, μ, the factor of M, a = ΛᵀZᵀr − u, pdev; and with ``joint`` B, XᵀWX, Xᵀr."""

    eta: np.ndarray
    mu: np.ndarray
    factor: _Factor
    a: np.ndarray
    pdev: float
    B: np.ndarray | None = None
    XtWX: np.ndarray | None = None
    Xtr: np.ndarray | None = None


class SparseLaplace:
    """The Laplace deviance of a GLMM with several grouping factors as a function of θ (stage 1) or (θ, β)."""

    def __init__(self, design: Design, layout: ThetaLayout, family: Family, beta_start: np.ndarray) -> None:
        self.design = design
        self.layout = layout
        self.family = family
        self.n_theta = layout.size
        self.n_fixed = design.X.shape[1]
        self.y = design.y
        self.log_constant = family.constant(design.y)
        n = design.n_obs
        rows, cols, vals = [], [], []
        # The bars with the most levels first (lme4's order too): M's diagonal blocks of the finest factor come
        # before the few coarse levels that couple them, so that its factorization in this order fills in
        # only among the coarse ones.
        self.offsets = [0] * len(design.blocks)
        offset = 0
        for index in sorted(range(len(design.blocks)), key=lambda i: -design.blocks[i].n_levels):
            block = design.blocks[index]
            q = len(block.terms)
            self.offsets[index] = offset
            for j in range(q):
                rows.append(np.arange(n))
                cols.append(offset + block.codes * q + j)
                vals.append(block.Z[:, j])
            offset += q * block.n_levels
        self.n_random = offset
        finest = max(len(block.terms) * block.n_levels for block in design.blocks)
        self._ordering = "NATURAL" if offset - finest <= NATURAL_ORDER_LIMIT else "MMD_AT_PLUS_A"
        self.Z = sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, offset),
        )
        self._u = np.zeros(offset)
        self._beta = np.asarray(beta_start, dtype=float).copy()
        self._pinned: np.ndarray | None = None

    def _lambda(self, lam: np.ndarray, *, triangular: bool = True) -> sparse.csr_matrix:
        """Λ (Q × Q): each bar's block of ``lam`` repeated once per level (its lower triangle, unless not
        ``triangular``: then whole blocks, for a mapped BΛ)."""
        rows, cols, vals = [], [], []
        at = 0
        for block, offset in zip(self.design.blocks, self.offsets):
            q = len(block.terms)
            lam_b = lam[at:at + q, at:at + q]
            i, j = np.tril_indices(q) if triangular else np.indices((q, q)).reshape(2, -1)
            base = offset + np.arange(block.n_levels)[:, None] * q
            rows.append((base + i).ravel())
            cols.append((base + j).ravel())
            vals.append(np.tile(lam_b[i, j], block.n_levels))
            at += q
        return sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(self.n_random,) * 2,
        )

    # ------------------------------------------------------------------ stage 1: θ, with u and β by PIRLS

    @property
    def joint_beta(self) -> np.ndarray:
        return self._beta.copy()

    def joint_deviance(self, theta: np.ndarray) -> float:
        """glmer's nAGQ = 0 deviance at θ (pdev + log|L|² at the joint mode of u and β); inf where PIRLS fails."""
        ZL = sparse.csr_matrix(self.Z @ self._lambda(self.layout.lambda_matrix(theta)))
        u, beta = self._u.copy(), self._beta.copy()
        try:
            state = self._pass(ZL, u, beta, joint=True)
            previous = math.inf
            for _ in range(PIRLS_MAX_ITERATIONS):
                assert state.B is not None and state.XtWX is not None and state.Xtr is not None
                Ma = state.factor.solve(state.a)
                MB = state.factor.solve(state.B)
                S = state.XtWX - np.einsum("qk,ql->kl", state.B, MB)
                rhs = state.Xtr - np.einsum("qk,q->k", state.B, Ma)
                dbeta = np.linalg.solve(S, rhs)
                du = Ma - np.einsum("qk,k->q", MB, dbeta)
                size = max(np.abs(du).max(initial=0.0), np.abs(dbeta).max(initial=0.0))
                if pirls_converged(size, previous, JOINT_TOL):
                    self._u, self._beta = u, beta
                    return state.pdev + state.factor.logdet
                for _halving in range(MAX_HALVINGS + 1):
                    trial = self._try_pass(ZL, u + du, beta + dbeta, joint=True)
                    if trial is not None and trial.pdev <= state.pdev + _ROUNDING * abs(state.pdev):
                        break
                    du, dbeta = du / 2.0, dbeta / 2.0
                else:
                    raise PirlsFailure("PIRLS step-halvings failed to reduce the penalized deviance")
                assert trial is not None
                u, beta, state, previous = u + du, beta + dbeta, trial, size
            raise PirlsFailure(f"PIRLS did not converge in {PIRLS_MAX_ITERATIONS} iterations")
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return math.inf

    # ------------------------------------------------------------ stage 2: (θ, β), with u by PIRLS

    def deviance(self, params: np.ndarray) -> float:
        """The Laplace deviance at (θ, β) = ``params``; inf where PIRLS fails."""
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        ZL = sparse.csr_matrix(self.Z @ self._lambda(self.layout.lambda_matrix(theta)))
        start = self._pinned if self._pinned is not None else self._u
        try:
            u, state = self._modes(ZL, beta, start.copy())
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return math.inf
        if self._pinned is None:
            self._u = u
        return state.pdev + state.factor.logdet

    @contextlib.contextmanager
    def fixed_start(self, params: np.ndarray) -> Iterator[None]:
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        ZL = sparse.csr_matrix(self.Z @ self._lambda(self.layout.lambda_matrix(theta)))
        u, state = self._modes(ZL, beta, self._u.copy())
        u = u + state.factor.solve(state.a)  # to rounding error: see ``OneFactorLaplace.fixed_start``
        self._pinned = u
        try:
            yield
        finally:
            self._pinned = None
            self._u = u

    def _modes(self, ZL: sparse.csr_matrix, beta: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, _Pass]:
        offset = np.einsum("nk,k->n", self.design.X, beta)
        state = self._pass(ZL, u, beta, offset=offset)
        previous = math.inf
        for _ in range(PIRLS_MAX_ITERATIONS):
            step = state.factor.solve(state.a)
            size = float(np.abs(step).max(initial=0.0))
            if pirls_converged(size, previous):
                return u, state
            previous = size
            for _halving in range(MAX_HALVINGS + 1):
                trial = self._try_pass(ZL, u + step, beta, offset=offset)
                if trial is not None and trial.pdev <= state.pdev + _ROUNDING * abs(state.pdev):
                    break
                step = step / 2.0
            else:
                raise PirlsFailure("PIRLS step-halvings failed to reduce the penalized deviance")
            assert trial is not None
            u, state = u + step, trial
        raise PirlsFailure(f"PIRLS did not converge in {PIRLS_MAX_ITERATIONS} iterations")

    def _try_pass(self, ZL: sparse.csr_matrix, u: np.ndarray, beta: np.ndarray, *, joint: bool = False,
                  offset: np.ndarray | None = None) -> _Pass | None:
        """``_pass``, or None where the likelihood or M's factorization breaks down there (a step too long)."""
        try:
            return self._pass(ZL, u, beta, joint=joint, offset=offset)
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return None

    def _pass(self, ZL: sparse.csr_matrix, u: np.ndarray, beta: np.ndarray, *, joint: bool = False,
              offset: np.ndarray | None = None) -> _Pass:
        X = self.design.X
        eta = (np.einsum("nk,k->n", X, beta) if offset is None else offset) + ZL @ u
        values = self.family.evaluate(eta, self.y, self.log_constant)
        if not (np.all(np.isfinite(values.log_density)) and np.all(np.isfinite(values.weight))):
            raise PirlsFailure("the likelihood is not finite at this linear predictor")
        w = values.weight
        residual = self.y - values.mu
        WZL = sparse.csr_matrix(ZL.multiply(w[:, None]))
        M = sparse.csc_matrix(ZL.T @ WZL + sparse.identity(self.n_random, format="csr"))
        factor = _Factor(M, self._ordering)
        a = ZL.T @ residual - u
        pdev = -2.0 * float(values.log_density.sum()) + float(np.einsum("q,q->", u, u))
        if not joint:
            return _Pass(eta=eta, mu=values.mu, factor=factor, a=a, pdev=pdev)
        return _Pass(eta=eta, mu=values.mu, factor=factor, a=a, pdev=pdev, B=np.asarray(WZL.T @ X),
                     XtWX=np.einsum("nk,n,nl->kl", X, w, X), Xtr=np.einsum("nk,n->k", X, residual))

    # --------------------------------------------------------------------------- at the optimum

    def unscaled_vcov(self, params: np.ndarray) -> np.ndarray | None:
        """lme4's RX-based vcov(β) with σ = 1: (XᵀWX − BᵀM⁻¹B)⁻¹ at the modes; None where not positive definite."""
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        ZL = sparse.csr_matrix(self.Z @ self._lambda(self.layout.lambda_matrix(theta)))
        try:
            u, _ = self._modes(ZL, beta, self._u.copy())
            state = self._pass(ZL, u, beta, joint=True)
            assert state.B is not None and state.XtWX is not None
            S = state.XtWX - np.einsum("qk,ql->kl", state.B, state.factor.solve(state.B))
            inverse = np.linalg.solve(np.linalg.cholesky(S), np.eye(S.shape[0]))
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return None
        out: np.ndarray = inverse.T @ inverse
        return out

    def _conditional_variances(self, factor: _Factor, lam_out: sparse.csr_matrix) -> np.ndarray:
        """diag(Λ M⁻¹ Λᵀ) (Λ = ``lam_out``): by block elimination where M starts with the finest bar's random
        effects and the others are few (the order this engine factors in), else one solve per random effect."""
        first_bar = min(range(len(self.offsets)), key=self.offsets.__getitem__)
        block = self.design.blocks[first_bar]
        size = len(block.terms)
        first = size * block.n_levels
        if self._ordering == "NATURAL" and first < self.n_random:
            return _block_quadratic_diagonal(factor.matrix, lam_out, size, first)
        return _quadratic_diagonal(factor, lam_out)

    def random_part(self, params: np.ndarray, ranef_map: np.ndarray) -> RandomPart:
        """Per grouping factor the modes b = Λu and conditional SDs sqrt diag(Λ M⁻¹ Λᵀ) for Z B⁻¹
        (B = ``ranef_map``), and η per row."""
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        lam = self.layout.lambda_matrix(theta)
        ZL = sparse.csr_matrix(self.Z @ self._lambda(lam))
        u, state = self._modes(ZL, beta, self._u.copy())
        lam_out = self._lambda(ranef_map @ lam, triangular=False)
        modes = np.asarray(lam_out @ u)
        variances = self._conditional_variances(state.factor, lam_out)
        cond_sd = np.sqrt(variances)
        design = self.design
        by_factor: dict[str, list[tuple[int, int]]] = {}
        for index, (block, offset) in enumerate(zip(design.blocks, self.offsets)):
            by_factor.setdefault(block.group, []).append((index, offset))
        ranef = []
        for group, bars in by_factor.items():
            blocks = [design.blocks[i] for i, _ in bars]
            spans = [slice(offset, offset + len(b.terms) * b.n_levels) for b, (_, offset) in zip(blocks, bars)]
            ranef.append(FactorRanef(
                group=group, levels=blocks[0].levels, terms=tuple(t for b in blocks for t in b.terms),
                modes=np.hstack([modes[s].reshape(b.n_levels, len(b.terms)) for b, s in zip(blocks, spans)]),
                cond_sd=np.hstack([cond_sd[s].reshape(b.n_levels, len(b.terms)) for b, s in zip(blocks, spans)]),
            ))
        primary = next(f for f in ranef if f.group == design.group)
        return RandomPart(ranef=tuple(ranef), modes=primary.modes, cond_sd=primary.cond_sd,
                          eta=np.asarray(state.eta), unscaled_vcov=self.unscaled_vcov(params))


def _block_quadratic_diagonal(M: sparse.csc_matrix, P: sparse.csr_matrix, size: int, first: int) -> np.ndarray:
    """diag(P M⁻¹ Pᵀ) by block elimination, for M whose leading ``first`` rows are one bar's random effects,
    level-major in blocks of ``size`` and coupled only through the rest R (few, at most ``NATURAL_ORDER_LIMIT``),
    and P block-diagonal in the same blocks: with M = [A B; Bᵀ C] and S = C − BᵀA⁻¹B,

        (M⁻¹)₁₁ = A⁻¹ + A⁻¹B S⁻¹ BᵀA⁻¹,   (M⁻¹)_RR = S⁻¹

    so only the small blocks of A and the dense S (R × R) are inverted (``_quadratic_diagonal`` needs one
    solve with M per random effect instead).
    """
    A = M[:first, :first].tocoo()
    levels = first // size
    blocks = np.zeros((levels, size, size))
    blocks[A.row // size, A.row % size, A.col % size] = A.data
    inverse = np.linalg.inv(blocks)
    i, j = np.indices((size, size)).reshape(2, -1)
    starts = np.arange(levels)[:, None] * size
    A_inverse = sparse.csr_matrix(
        (inverse.reshape(levels, -1).ravel(), ((starts + i).ravel(), (starts + j).ravel())), shape=(first, first),
    )
    B = sparse.csr_matrix(M[:first, first:])
    A_inverse_B = sparse.csr_matrix(A_inverse @ B)
    S_inverse = np.linalg.inv(M[first:, first:].toarray() - (B.T @ A_inverse_B).toarray())
    P1, P2 = P[:first, :first], P[first:, first:]
    primary = np.asarray((P1 @ A_inverse).multiply(P1).sum(axis=1)).ravel()
    K = sparse.csr_matrix(P1 @ A_inverse_B)
    chunk = max(1, _CHUNK_ELEMENTS // max(K.shape[1], 1))
    for start in range(0, first, chunk):
        part = K[start:start + chunk]
        primary[start:start + chunk] += np.einsum("ij,ij->i", np.asarray(part @ S_inverse), part.toarray())
    rest = np.einsum("ij,ij->i", np.asarray(P2 @ S_inverse), P2.toarray())
    return np.concatenate([primary, rest])


def _quadratic_diagonal(factor: _Factor, P: sparse.csr_matrix) -> np.ndarray:
    """diag(P M⁻¹ Pᵀ) in chunks of rows, so that M⁻¹Pᵀ never needs more than ~4M floats."""
    rows, width = P.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(width, 1))
    out = np.empty(rows)
    for start in range(0, rows, chunk):
        dense = P[start:start + chunk].toarray()
        out[start:start + chunk] = np.einsum("ij,ji->i", dense, factor.solve(dense.T))
    return out
