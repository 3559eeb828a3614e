"""The log-likelihood of a structured-covariance model, ML or REML, with β profiled out, and its gradient.

Model: y_i ~ N(X_i β, V_i) independently over subjects, V_i = Z_i G Z_iᵀ + Σ_i, Σ_i the residual structure
at the visits subject i has (missing visits are dropped, which is the likelihood under missing at random)
and Z_i G Z_iᵀ the random effects of the one bar, if any (nlme's ``lme(random = ~ z | id, correlation =
...)``; without random effects nlme's ``gls``, mmrm's model).

- ML:   ℓ(θ) = −½ [ n log 2π + Σ_i log|V_i| + Σ_i r_iᵀ V_i⁻¹ r_i ]
- REML: ℓ(θ) = −½ [ (n − p) log 2π + Σ_i log|V_i| + log|Σ_i X_iᵀ V_i⁻¹ X_i| + Σ_i r_iᵀ V_i⁻¹ r_i ]

with r_i = y_i − X_i β̂(θ), β̂ the GLS estimate; n rows, p fixed effects. These are mmrm's ``tmb.cpp`` and
nlme's constants and lme4's REML convention (no ½ log|XᵀX| term).

Parameters, in this order: the structure's θ (``structures``), then the q(q + 1)/2 entries of a lower
triangular Λ (column by column, lme4's order; any value is valid, G = ΛΛᵀ is positive semi-definite, and a
variance reaches 0 at Λ_jj = 0, an interior point of ℝ). For the homogeneous structures (cs, ar1, toep,
ad, sp_exp: Σ = σ² R(ψ)) Λ is relative to σ, G = σ² ΛΛᵀ, as lme4's Λ, so V_i = σ² (R_i + Z_i ΛΛᵀ Z_iᵀ)
and σ² can be profiled out (``profile=True``): σ̂² = r'V₀⁻¹r / (n − p·REML), and the optimizer sees only
(ψ, Λ). The heterogeneous structures and us carry no free overall scale, and their G = ΛΛᵀ is absolute.

The gradient is analytic in V: dℓ/dθ_k = ½ Σ_i ⟨M_i, dV_i/dθ_k⟩ with
M_i = −W_i + (W_i r_i)(W_i r_i)ᵀ + [REML] (W_i X_i) A⁻¹ (W_i X_i)ᵀ, W_i = V_i⁻¹, A = Σ X_iᵀ W_i X_i
(β̂ is the optimum of r'V⁻¹r, so its own derivative drops out); dΣ/dθ by the complex step, and for Λ
in closed form: dℓ/dΛ = (Σ_i Z_iᵀ M_i Z_i) Λ, lower triangle.

Subjects sharing V (a ``VisitPattern``) share one Cholesky factor and are read through their cross-products
(Σ_i X_iᵀ W X_i = Σ_ab W_ab Σ_i X_ia X_ibᵀ, and so on): O(s² p²) per pattern and evaluation, none per
subject. The others come in ``SubjectBatch``es, each subject whitened by its own L_i⁻¹, all at once by
batched numpy calls (``grouping``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.linalg import cho_solve

from longitudinal.fit.covariance.grouping import PatternGroups, SubjectBatch, VisitPattern
from longitudinal.fit.covariance.structures import CovarianceStructure
from longitudinal.fit.linalg import LOG_2PI


@dataclass(frozen=True, eq=False)
class Evaluation:
    """ℓ at one point and what comes with it: the full θ (structure θ, log σ̂ filled in when profiled, then
    Λ's entries), GLS β̂, its covariance (Σ X_iᵀ V_i⁻¹ X_i)⁻¹, and the gradient over the parameters the
    optimizer sees."""

    loglik: float
    theta: np.ndarray
    beta: np.ndarray
    vcov: np.ndarray
    gradient: np.ndarray


def factor_size(q: int) -> int:
    """The number of free entries of a q × q lower triangular Λ: q(q + 1)/2."""
    return q * (q + 1) // 2


def lower_factor(values: np.ndarray, q: int) -> np.ndarray:
    """Λ (q × q, lower triangular) from its entries column by column (lme4's θ order)."""
    out = np.zeros((q, q))
    cols, rows = np.triu_indices(q)
    out[rows, cols] = values
    return out


def factor_entries(factor: np.ndarray) -> np.ndarray:
    """Λ's lower-triangle entries column by column: the inverse of ``lower_factor``."""
    cols, rows = np.triu_indices(factor.shape[0])
    out: np.ndarray = factor[rows, cols]
    return out


@dataclass(frozen=True, eq=False)
class CovarianceModel:
    """The covariance pieces at one θ: ``base`` the structure's θ that builds the matrix factored (log σ set
    to 0 for the homogeneous structures: R(ψ); else Σ(θ)); ``scale`` the factor of V outside it (σ² for the
    homogeneous structures, 1 otherwise); ``G`` the random-effects covariance inside it (relative to σ² for
    the homogeneous ones), and ``factor`` Λ with G = ΛΛᵀ."""

    structure: CovarianceStructure
    base: np.ndarray
    scale: float
    factor: np.ndarray
    G: np.ndarray

    @classmethod
    def at(cls, structure: CovarianceStructure, theta: np.ndarray, q: int) -> CovarianceModel:
        """From the full θ (structure θ, then Λ's entries)."""
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (structure.n_params + factor_size(q),):
            raise ValueError(f"structure {structure.name!r} over {structure.n_visits} visits with {q} random "
                             f"effects takes {structure.n_params + factor_size(q)} parameters, got {theta.shape}")
        own = theta[:structure.n_params]
        factor = lower_factor(theta[structure.n_params:], q)
        if structure.homogeneous:
            base, scale = np.concatenate([[0.0], own[1:]]), float(np.exp(2.0 * own[0]))
        else:
            base, scale = own, 1.0
        return cls(structure, base, scale, factor, factor @ factor.T)

    @cached_property
    def visit_matrix(self) -> np.ndarray | None:
        """The residual structure's part of V / scale over all m visits (None for sp_exp): built once."""
        return None if self.structure.spatial else self.structure.covariance(self.base)

    def residual(self, block: VisitPattern | SubjectBatch) -> np.ndarray:
        """The residual structure's part of V / scale at the block's coordinates: (s, s) or (g, s, s)."""
        full = self.visit_matrix
        if full is None:
            return self.structure.covariance(self.base, block.coords)
        index = block.coords.astype(int)
        out: np.ndarray = full[index[..., :, None], index[..., None, :]]
        return out

    def marginal(self, block: VisitPattern | SubjectBatch) -> np.ndarray:
        """V / scale = residual part + Z G Zᵀ for the block: (s, s) for a pattern, (g, s, s) for a batch."""
        V = self.residual(block)
        if block.Z.shape[-1]:
            ZG = block.Z @ self.G
            V = V + ZG @ np.swapaxes(block.Z, -1, -2)
        return V


@dataclass(frozen=True, eq=False)
class _Factored:
    """One block at one θ: log|V/scale| over its subjects, its share of A = Σ XᵀV⁻¹X (×scale) and of XᵀV⁻¹y.

    A pattern keeps W = (V/scale)⁻¹ (s, s) and works on its cross-products; a batch keeps L⁻¹ (g, s, s) and
    its subjects' whitened y (g, s) and X (g, s, p)."""

    logdet: float
    A: np.ndarray
    b: np.ndarray
    W: np.ndarray | None = None
    L_inv: np.ndarray | None = None
    y: np.ndarray | None = None
    X: np.ndarray | None = None


def _factor(block: VisitPattern | SubjectBatch, V: np.ndarray) -> _Factored:
    L = np.linalg.cholesky(V)
    L_inv = np.linalg.inv(L)  # s × s or g of them: numpy's inverse beats a LAPACK call per triangular solve
    if isinstance(block, VisitPattern):
        W = L_inv.T @ L_inv
        cp = block.crossproducts
        p = cp.Xy.shape[2]
        w = W.reshape(-1)
        return _Factored(
            logdet=2.0 * block.n_subjects * float(np.log(np.diag(L)).sum()),
            A=(w @ cp.XX.reshape(w.size, -1)).reshape(p, p), b=w @ cp.Xy.reshape(w.size, p), W=W,
        )
    y = np.einsum("gst,gt->gs", L_inv, block.y)
    X = L_inv @ block.X
    return _Factored(
        logdet=2.0 * float(np.log(np.diagonal(L, axis1=1, axis2=2)).sum()),
        A=np.einsum("gsp,gsq->pq", X, X, optimize=True), b=np.einsum("gsp,gs->p", X, y, optimize=True),
        L_inv=L_inv, y=y, X=X,
    )


def _residual_terms(
    block: VisitPattern | SubjectBatch, f: _Factored, beta: np.ndarray,
) -> tuple[float, np.ndarray]:
    """Σ r_iᵀ (V_i/scale)⁻¹ r_i over the block's subjects, and the residuals it needs for the gradient:
    for a pattern C = Σ_i r_i r_iᵀ (s, s) from its cross-products, for a batch the whitened r_i (g, s)."""
    if isinstance(block, VisitPattern):
        assert f.W is not None
        cp = block.crossproducts
        Xb_y = cp.Xy @ beta  # Σ_i (X_i β)_a y_ib
        C = cp.yy - Xb_y - Xb_y.T + (cp.XX @ beta) @ beta
        return float(np.sum(f.W * C)), C
    assert f.y is not None and f.X is not None
    r = f.y - f.X @ beta
    return float(np.sum(r * r)), r


def _gradient_matrix(
    block: VisitPattern | SubjectBatch, f: _Factored, residual: np.ndarray, scale: float,
    A_inv: np.ndarray | None,
) -> np.ndarray:
    """M = Σ_subjects −W + (W r)(W r)ᵀ / scale + [REML] (W X) A⁻¹ (W X)ᵀ, W = (V/scale)⁻¹: (s, s) summed over
    a pattern's subjects, (g, s, s) per subject of a batch. ``residual`` as ``_residual_terms`` gives it."""
    if isinstance(block, VisitPattern):
        assert f.W is not None
        inner = residual / scale
        if A_inv is not None:
            s = inner.shape[0]
            inner = inner + (block.crossproducts.XX.reshape(s * s, -1) @ A_inv.reshape(-1)).reshape(s, s)
        out: np.ndarray = f.W @ inner @ f.W - block.n_subjects * f.W
        return out
    assert f.L_inv is not None and f.X is not None
    L_inv_T = np.swapaxes(f.L_inv, 1, 2)
    Wr = np.einsum("gst,gt->gs", L_inv_T, residual)
    M = Wr[:, :, None] * Wr[:, None, :] / scale - L_inv_T @ f.L_inv
    if A_inv is not None:
        WX = L_inv_T @ f.X
        M += (WX @ A_inv) @ np.swapaxes(WX, 1, 2)
    return M


def evaluate(
    structure: CovarianceStructure, groups: PatternGroups, params: np.ndarray, *, reml: bool,
    profile: bool = False, gradient: bool = True,
) -> Evaluation:
    """ℓ (ML or REML, module docstring) at ``params``: the full θ (structure, then Λ), or with ``profile``
    (homogeneous structures only) the same without its first entry log σ, which is then set to its
    maximizing value.

    Raises ``np.linalg.LinAlgError`` where V or Σ X_iᵀ V_i⁻¹ X_i is not numerically positive definite.
    """
    params = np.asarray(params, dtype=float)
    if profile and not structure.homogeneous:
        raise ValueError(f"structure {structure.name!r} has no common scale to profile out")
    full = np.concatenate([[0.0], params]) if profile else params
    model = CovarianceModel.at(structure, full, groups.n_random)
    p, n = groups.n_fixed, groups.n_obs
    dof = n - p if reml else n

    blocks = groups.blocks()
    factored = [_factor(block, model.marginal(block)) for block in blocks]
    logdet = sum(f.logdet for f in factored)
    A = sum((f.A for f in factored), np.zeros((p, p)))
    b = sum((f.b for f in factored), np.zeros(p))
    chol_A = np.linalg.cholesky(A)
    beta = cho_solve((chol_A, True), b)
    A_inv = cho_solve((chol_A, True), np.eye(p))
    logdet_A = 2.0 * float(np.log(np.diag(chol_A)).sum())
    terms = [_residual_terms(block, f, beta) for block, f in zip(blocks, factored)]
    quadratic = float(sum(t[0] for t in terms))

    common = dof * LOG_2PI + logdet + (logdet_A if reml else 0.0)
    if not structure.homogeneous:
        scale = 1.0
        loglik = -0.5 * (common + quadratic)
        theta = full
    elif profile:
        scale = quadratic / dof
        loglik = -0.5 * (common + dof * (1.0 + np.log(scale)))
        theta = np.concatenate([[0.5 * np.log(scale)], params])
    else:
        scale = model.scale
        loglik = -0.5 * (common + dof * np.log(scale) + quadratic / scale)
        theta = full
    grad = np.empty(0)
    if gradient:
        matrices = [_gradient_matrix(block, f, t[1], scale, A_inv if reml else None)
                    for block, f, t in zip(blocks, factored, terms)]
        grad = _gradient(structure, model, blocks, matrices)
        if structure.homogeneous and not profile:
            grad = np.concatenate([[quadratic / scale - dof], grad])
    return Evaluation(loglik=float(loglik), theta=theta, beta=beta, vcov=scale * A_inv, gradient=grad)


def _gradient(
    structure: CovarianceStructure, model: CovarianceModel, blocks: tuple[VisitPattern | SubjectBatch, ...],
    matrices: list[np.ndarray],
) -> np.ndarray:
    """dℓ/d(structure θ, Λ) = ½ Σ ⟨M, dV/dθ⟩ (module docstring), ``matrices`` the blocks' M; for the
    homogeneous structures without the entry of log σ (the caller's: not a derivative of the matrix factored)."""
    start = 1 if structure.homogeneous else 0
    full_jacobian = None if structure.spatial else structure.jacobian(model.base, start=start)
    grad = np.zeros(structure.n_params - start)
    ZMZ = np.zeros(model.G.shape)
    for block, M in zip(blocks, matrices):
        if full_jacobian is not None:
            index = block.coords.astype(int)
            J = full_jacobian[:, index[..., :, None], index[..., None, :]]
        else:
            J = structure.jacobian(model.base, block.coords, start=start)
        grad += 0.5 * (J.reshape(J.shape[0], -1) @ M.reshape(-1))
        if block.Z.shape[-1]:
            q = block.Z.shape[-1]
            ZMZ += block.Z.reshape(-1, q).T @ (M @ block.Z).reshape(-1, q)
    return np.concatenate([grad, factor_entries(ZMZ @ model.factor)])


def log_likelihood(structure: CovarianceStructure, groups: PatternGroups, theta: np.ndarray, *, reml: bool) -> float:
    """ℓ(θ) at the full θ (structure θ, then Λ's entries; no scale profiled), ML or REML: the objective as
    the module docstring defines it, on ``groups`` as they are (``fit_covariance`` standardizes them first:
    the patterns' cross-products lose digits on an outcome far from 0, such as 1e6 ± 1)."""
    return evaluate(structure, groups, theta, reml=reml, gradient=False).loglik
