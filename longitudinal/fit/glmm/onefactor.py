"""glmer's Laplace (and adaptive Gauss–Hermite) deviance for one grouping factor, every subject at once.

With one grouping factor the random effects of different subjects never meet in ΛᵀZᵀWZΛ + I: it is
block-diagonal with one q × q block M_g per subject. So every step of penalized iteratively reweighted least
squares (PIRLS) is a pass over the rows (η, μ, the working weights w and log p, then per-subject sums by one
sparse product) and a batched solve of G small systems (``fit.linalg``'s kernels: 1×1 and 2×2 factors written
out as array arithmetic). No Python loop runs over subjects.

Subjects with identical rows (the same X, Z and y, in any order) have identical modes and contributions, so
they are fitted once and counted (``compress_subjects``): with binary outcomes at common visit times the
20,000 subjects of a trial are a few dozen distinct ones. Exact: only the order of floating-point sums changes.

The deviance (Bates et al. 2015, §3.5; lme4's ``glmerLaplace``), for θ and β:

    u* = argmin_u  pdev(u) = −2 Σᵢ log p(yᵢ | μᵢ) + ‖u‖²,   η = Xβ + ZΛu
    Laplace deviance = pdev(u*) + log |L|²,   LLᵀ = ΛᵀZᵀWZΛ + I at u*

and, with nAGQ > 1 points for one scalar random effect, the per-subject integral by adaptive Gauss–Hermite
quadrature centred at u*_g with the Laplace curvature (``longitudinal.fit.glmm.quadrature``). With β fixed
(glmer's second stage) each subject's u_g is its own Newton problem, so step halving is per subject; in the
first stage (nAGQ = 0: β joins u in PIRLS) the joint Newton system is solved by per-subject Schur complements
(the block-arrowhead structure of the LMM engine) and step halving is global, as lme4's ``pwrssUpdate``.

PIRLS runs until the Newton steps are at rounding error (``pirls_converged``), not to lme4's relative change
of pdev below 1e-7: log|L|² changes to first order with the modes, and the finite-difference Hessian that
gives vcov(β) divides deviance differences by 1e-8. (lme4 also takes log|L|² from the working weights before
its last step, so glmer's default deviance is above the Laplace deviance at the same (θ, β): by 0.009 on
1,500 binary rows here.) Each evaluation starts from the previous one's modes;
``fixed_start`` pins the start during the derivatives, so that every point of the difference scheme is
computed the same way.

No product in a PIRLS step goes through BLAS (einsum and elementwise arithmetic instead): OpenBLAS runs
products of this size on several threads, and on a busy machine waiting for them made a fit 3-4 times
slower (measured: a 20,000-long dot product 11 ms instead of 2 µs; a fit 2.6 s instead of 0.7 s).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from longitudinal.fit.failure import FitFailure
from longitudinal.fit.glmm.families import Family, RowValues
from longitudinal.fit.glmm.problem import RandomPart
from longitudinal.fit.glmm.quadrature import QuadratureRule
from longitudinal.fit.linalg import backward_groups, factor_groups, forward_groups
from longitudinal.fit.theta import ThetaLayout
from longitudinal.model.design import Design
from longitudinal.records import FactorRanef

#: PIRLS stops when no Newton step moves a mode (or a β, in stage 1) by more than ``PIRLS_TOL``, or when the
#: steps, already below ``_STALLED``, stop shrinking (rounding). The penalized deviance is stationary at the
#: mode but log|L|² is not (W depends on u): its error is first order in the modes' error, so the modes
#: are solved to rounding error (Newton's quadratic convergence makes that one step more than 1e-10 would).
PIRLS_TOL = 1e-13
_STALLED = 1e-9
#: Stage 1's tolerance: its deviance only chooses stage 2's start, and BOBYQA needs it smooth to ~1e-6 there.
JOINT_TOL = 1e-8
#: lme4's ``maxit`` and ``maxstephalfit``.
PIRLS_MAX_ITERATIONS = 100
MAX_HALVINGS = 20
#: An increase of pdev by less than this (relative) is rounding, not a failed step.
_ROUNDING = 1e-12


@dataclass(frozen=True, eq=False)
class SubjectRows:
    """The rows of the distinct subjects, term-major, and how many subjects each stands for.

    ``Xt`` (p × n_r), ``Zt`` (q × n_r, every bar's columns in formula order), ``y`` and ``log_constant``
    (the part of log p that does not depend on μ) hold the rows of one representative per distinct subject,
    sorted by it; ``unit`` flags the columns of Z that are all ones (a random intercept: no product needed).
    ``codes`` maps each row to its distinct subject (0..P−1), ``counts`` (P,) says how many subjects of the
    design share it, ``of_subject`` (G,) is the distinct subject of each subject of the design, and
    ``indicator`` (P × n_r, sparse) sums a row quantity per distinct subject.
    """

    Xt: np.ndarray
    Zt: np.ndarray
    unit: tuple[bool, ...]
    y: np.ndarray
    log_constant: np.ndarray
    codes: np.ndarray
    counts: np.ndarray
    of_subject: np.ndarray
    indicator: sparse.csr_matrix

    @property
    def row_counts(self) -> np.ndarray:
        """The count of each row's subject (a frequency weight per row)."""
        out: np.ndarray = self.counts[self.codes]
        return out

    @property
    def n_distinct(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_rows(self) -> int:
        return int(self.y.shape[0])


def compress_subjects(design: Design, family: Family) -> SubjectRows:
    """The design's subjects reduced to the distinct ones (same rows of X, Z and y, in any order), counted.

    Rows are sorted by subject and, within a subject, by their values; each subject's sorted rows as bytes
    are its key. Costs one sort of the rows and one pass over the subjects' keys, once per fit.
    """
    Z = design.Z
    values = np.column_stack([design.X, Z, design.y])
    order = np.lexsort(tuple(values[:, j] for j in reversed(range(values.shape[1]))) + (design.codes,))
    sorted_codes = design.codes[order]
    G = design.n_groups
    starts = np.searchsorted(sorted_codes, np.arange(G))
    ends = np.append(starts[1:], sorted_codes.shape[0])
    block = np.ascontiguousarray(values[order])
    keys = [block[s:e].tobytes() for s, e in zip(starts.tolist(), ends.tolist())]
    of_subject, uniques = pd.factorize(pd.Series(keys, dtype=object))
    P = len(uniques)
    first = np.full(P, -1, dtype=np.int64)
    first[of_subject[::-1]] = np.arange(G)[::-1]  # reversed, so that the first subject of a pattern wins
    counts = np.bincount(of_subject, minlength=P).astype(float)
    rows = np.concatenate([order[starts[g]:ends[g]] for g in first.tolist()]) if P < G else order
    codes = np.repeat(np.arange(P), (ends - starts)[first])
    y = np.ascontiguousarray(design.y[rows])
    n_r = rows.shape[0]
    Zt = np.ascontiguousarray(Z[rows].T)
    return SubjectRows(
        Xt=np.ascontiguousarray(design.X[rows].T), Zt=Zt, unit=tuple(bool(np.all(z == 1.0)) for z in Zt), y=y,
        log_constant=family.constant(y), codes=codes, counts=counts, of_subject=of_subject.astype(np.int64),
        indicator=sparse.csr_matrix((np.ones(n_r), (codes, np.arange(n_r))), shape=(P, n_r)),
    )


@dataclass(frozen=True, eq=False)
class _Pass:
    """One pass over the rows at (u, β): everything a PIRLS step and the deviance need.

    ``chol`` (q, q, P) factors M_g = ΛᵀZ_gᵀW_gZ_gΛ + I; ``v`` (q, P) is L_g⁻¹(ΛᵀZ_gᵀr_g − u_g) (r = y − μ),
    so the Newton step for u_g (β fixed) is L_g⁻ᵀ v_g; ``pdev`` (P,) is −2 Σ log p + ‖u_g‖² per distinct
    subject and ``logdet`` (P,) log |M_g|; ``ZtWZ`` (q, q, P) and ``Ztr`` (q, P) are the sums behind them.
    With ``joint`` passes also ``RZX`` (q, P, p) = L_g⁻¹ΛᵀZ_gᵀW_gX_g, ``XtWX`` (p × p) and ``Xtr`` (p,), for
    the step in (u, β). ``eta`` is the workspace's linear predictor: valid until the next pass.
    """

    eta: np.ndarray
    chol: np.ndarray
    v: np.ndarray
    pdev: np.ndarray
    logdet: np.ndarray
    ZtWZ: np.ndarray
    Ztr: np.ndarray
    RZX: np.ndarray | None = None
    XtWX: np.ndarray | None = None
    Xtr: np.ndarray | None = None


class _Workspace:
    """Arrays the size of the data, made once per fit and overwritten by every pass (allocating them per
    PIRLS step costs more in page faults than the arithmetic on them)."""

    def __init__(self, n: int, p: int) -> None:
        self.eta = np.empty(n)
        self.product = np.empty(n)
        self.residual = np.empty(n)
        self.values = RowValues.empty(n)
        self.weighted_X = np.empty((p, n))
        self.node_eta = np.empty(n)
        self.node_shift = np.empty(n)
        self.node_values = RowValues.empty(n)


class PirlsFailure(FitFailure):
    """PIRLS did not converge (lme4: "pwrssUpdate did not converge", "PIRLS step-halvings failed"); a
    ``FitFailure`` where it escapes the deviance (which turns it into an infinite value for the optimizer)."""


class OneFactorLaplace:
    """The Laplace/AGQ deviance of a one-factor GLMM as a function of θ (stage 1) or (θ, β) (stage 2).

    Holds the warm start (the last converged modes, and in stage 1 β): deviance evaluations are not pure
    functions of their argument in cost, only in value (to rounding error).
    """

    def __init__(self, design: Design, rows: SubjectRows, layout: ThetaLayout, family: Family,
                 rule: QuadratureRule | None, beta_start: np.ndarray) -> None:
        self.design = design
        self.rows = rows
        self.layout = layout
        self.family = family
        self.rule = rule
        self.n_theta = layout.size
        self.n_fixed = rows.Xt.shape[0]
        q = rows.Zt.shape[0]
        self._u = np.zeros((q, rows.n_distinct))
        self._beta = np.asarray(beta_start, dtype=float).copy()
        self._pinned: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (x, u*, du*/dx) at the centre
        self._pairs = [(i, j) for i in range(q) for j in range(i + 1)]
        # z_i z_j per row for the sums of w z zᵀ (None where both are the intercept's ones).
        self._zz = [None if rows.unit[i] and rows.unit[j] else rows.Zt[i] * rows.Zt[j] for i, j in self._pairs]
        self._counted_Xt = rows.Xt * rows.row_counts  # X weighted by the subjects each row stands for
        self._work = _Workspace(rows.n_rows, self.n_fixed)

    # ------------------------------------------------------------------ stage 1: θ, with u and β by PIRLS

    @property
    def joint_beta(self) -> np.ndarray:
        """β of the last stage-1 evaluation (the joint mode of u and β)."""
        return self._beta.copy()

    def joint_deviance(self, theta: np.ndarray) -> float:
        """glmer's nAGQ = 0 deviance at θ: pdev + log|L|² at the joint mode of (u, β); inf where PIRLS fails."""
        lam = self.layout.lambda_matrix(theta)
        u, beta = self._u.copy(), self._beta.copy()
        c = self.rows.counts
        try:
            state = self._pass(lam, u, _combine(beta, self.rows.Xt), joint=True)
            total = _total(c, state.pdev)
            previous = math.inf
            for _ in range(PIRLS_MAX_ITERATIONS):
                du, dbeta = self._joint_step(state)
                size = max(np.abs(du).max(initial=0.0), np.abs(dbeta).max(initial=0.0))
                if pirls_converged(size, previous, JOINT_TOL):
                    self._u, self._beta = u, beta
                    return total + _total(c, state.logdet)
                for _halving in range(MAX_HALVINGS + 1):
                    trial_u, trial_beta = u + du, beta + dbeta
                    trial = self._try_pass(lam, trial_u, _combine(trial_beta, self.rows.Xt), joint=True)
                    trial_total = _total(c, trial.pdev) if trial is not None else math.inf
                    if trial_total <= total + _ROUNDING * abs(total):
                        break
                    du, dbeta = du / 2.0, dbeta / 2.0
                else:
                    raise PirlsFailure("PIRLS step-halvings failed to reduce the penalized deviance")
                assert trial is not None
                u, beta, state, total, previous = trial_u, trial_beta, trial, trial_total, size
            raise PirlsFailure(f"PIRLS did not converge in {PIRLS_MAX_ITERATIONS} iterations")
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return math.inf

    def _joint_step(self, state: _Pass) -> tuple[np.ndarray, np.ndarray]:
        """The Newton step in (u, β) by per-subject Schur complements."""
        assert state.RZX is not None and state.XtWX is not None and state.Xtr is not None
        weighted = state.RZX * self.rows.counts[None, :, None]
        S = state.XtWX - np.einsum("igk,igl->kl", weighted, state.RZX)
        rhs = state.Xtr - np.einsum("igk,ig->k", weighted, state.v)
        chol_S = np.linalg.cholesky(S)
        dbeta = np.linalg.solve(chol_S.T, np.linalg.solve(chol_S, rhs))
        du = backward_groups(state.chol, state.v - np.einsum("igk,k->ig", state.RZX, dbeta))
        return du, dbeta

    # ------------------------------------------------------------ stage 2: (θ, β), with u by PIRLS

    def deviance(self, params: np.ndarray) -> float:
        """The Laplace deviance (or AGQ deviance with a rule) at (θ, β) = ``params``; inf where PIRLS fails."""
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        lam = self.layout.lambda_matrix(theta)
        if self._pinned is None:
            start = self._u.copy()
        else:  # the modes at the pinned point, moved to first order: one Newton step fewer
            centre, modes, slopes = self._pinned
            start = modes + np.einsum("kig,k->ig", slopes, params - centre)
        try:
            u, state = self._modes(lam, beta, start)
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return math.inf
        if self._pinned is None:
            self._u = u
        c = self.rows.counts
        if self.rule is None:
            return _total(c, state.pdev + state.logdet)
        return _total(c, self._quadrature(lam, u, state))

    @contextlib.contextmanager
    def fixed_start(self, params: np.ndarray) -> Iterator[None]:
        """Within the block every stage-2 evaluation starts from the modes at ``params`` moved to first order
        in the parameters (the derivatives: every point of the difference scheme computed the same way)."""
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        lam = self.layout.lambda_matrix(theta)
        u, state = self._modes(lam, beta, self._u.copy())
        # One more Newton step: the modes to rounding error, so that the centre of the difference scheme is
        # as exact as the points around it (its log|L|² error is first order in the modes': with hundreds of
        # random effects a 1e-10 error there shifts the Hessian's diagonal by 0.3).
        u = u + backward_groups(state.chol, state.v)
        self._pinned = (params.copy(), u, self._mode_slopes(lam, u, beta))
        try:
            yield
        finally:
            self._pinned = None
            self._u = u

    def _mode_slopes(self, lam: np.ndarray, u: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """du*/dx at the modes ``u`` for each parameter x of (θ, β): (k, q, P).

        The modes solve a(u) = ΛᵀZᵀ(y − μ) − u = 0 with −∂a/∂u = M, so du*/dx = M⁻¹ ∂a/∂x: for β_k,
        −M⁻¹ΛᵀZᵀWX_k (= −L⁻ᵀ RZX_k); for θ_j, the entry (r, c) of Λ, M⁻¹(e_c (Zᵀr)_r − Λᵀ(ZᵀWZ)_{·r} u_c).
        """
        state = self._pass(lam, u, _combine(beta, self.rows.Xt), joint=True)
        assert state.RZX is not None
        q, P, p = state.RZX.shape
        slopes = np.empty((self.n_theta + p, q, P))
        for j, (r, c) in enumerate(zip(self.layout.rows, self.layout.cols)):
            moved = -np.einsum("ai,ag->ig", lam, state.ZtWZ[:, r] * u[c])  # −Λᵀ (ZᵀWZ)_{·r} u_c
            moved[c] += state.Ztr[r]
            slopes[j] = backward_groups(state.chol, forward_groups(state.chol, moved))
        for k in range(p):
            slopes[self.n_theta + k] = -backward_groups(state.chol, state.RZX[:, :, k])
        return slopes

    def _modes(self, lam: np.ndarray, beta: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, _Pass]:
        """u* at (Λ, β) from ``u`` by Newton steps per subject, each halved on its own until its pdev falls."""
        offset = _combine(beta, self.rows.Xt)
        state = self._pass(lam, u, offset)
        previous = math.inf
        for _ in range(PIRLS_MAX_ITERATIONS):
            step = backward_groups(state.chol, state.v)
            size = float(np.abs(step).max(initial=0.0))
            if pirls_converged(size, previous):
                return u, state
            previous = size
            for _halving in range(MAX_HALVINGS + 1):
                trial_u = u + step
                trial = self._try_pass(lam, trial_u, offset)
                if trial is None:  # somewhere the step went too far for the likelihood to be computed
                    step /= 2.0
                    continue
                worse = ~(trial.pdev <= state.pdev + _ROUNDING * np.abs(state.pdev))
                if not worse.any():
                    break
                step[:, worse] /= 2.0
            else:
                raise PirlsFailure("PIRLS step-halvings failed to reduce the penalized deviance")
            assert trial is not None
            u, state = trial_u, trial
        raise PirlsFailure(f"PIRLS did not converge in {PIRLS_MAX_ITERATIONS} iterations")

    def _quadrature(self, lam: np.ndarray, u: np.ndarray, state: _Pass) -> np.ndarray:
        """Per distinct subject, −2 log ∫ p(y_g | u) φ(u) du by adaptive Gauss–Hermite quadrature (scalar u),
        as lme4's ``glmerAGQ`` but with the full log-density (see the package docstring)."""
        assert self.rule is not None
        rows, work = self.rows, self._work
        sd = 1.0 / state.chol[0, 0]  # the Laplace approximation's conditional SD of u_g
        shift = np.take(sd, rows.codes, out=work.node_shift)
        shift *= lam[0, 0]
        if not rows.unit[0]:
            shift *= rows.Zt[0]
        total = np.zeros(rows.n_distinct)
        for z, weight in zip(self.rule.nodes.tolist(), self.rule.weights.tolist()):
            if z == 0.0:
                total += weight
                continue
            np.multiply(shift, z, out=work.node_eta)
            work.node_eta += state.eta
            values = self.family.evaluate(work.node_eta, rows.y, rows.log_constant, out=work.node_values)
            at_node = -2.0 * (rows.indicator @ values.log_density) + (u[0] + z * sd) ** 2
            total += weight * np.exp(-0.5 * (at_node - state.pdev) + 0.5 * z * z)
        out: np.ndarray = state.pdev + state.logdet - 2.0 * np.log(total)
        return out

    # --------------------------------------------------------------------------- at the optimum

    def unscaled_vcov(self, params: np.ndarray) -> np.ndarray | None:
        """lme4's RX-based vcov(β) at (θ, β) with σ = 1: (XᵀWX − Σ_g c_g RZX_gᵀRZX_g)⁻¹ at the modes; None
        where that matrix is not positive definite."""
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        lam = self.layout.lambda_matrix(theta)
        try:
            u, _ = self._modes(lam, beta, self._u.copy())
            state = self._pass(lam, u, _combine(beta, self.rows.Xt), joint=True)
            assert state.RZX is not None and state.XtWX is not None
            p = state.RZX.shape[2]
            c = self.rows.counts
            S = state.XtWX - np.einsum("igk,g,igl->kl", state.RZX, c, state.RZX)
            inverse = np.linalg.solve(np.linalg.cholesky(S), np.eye(p))
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return None
        out: np.ndarray = inverse.T @ inverse
        return out

    def random_part(self, params: np.ndarray, ranef_map: np.ndarray) -> RandomPart:
        """The modes b = Λu of every subject of the design and their conditional SDs sqrt diag(Λ M_g⁻¹ Λᵀ),
        both for Z B⁻¹ (B = ``ranef_map``: the data's Z when the design is its standardized copy), and η per
        row of the design."""
        theta, beta = params[:self.n_theta], params[self.n_theta:]
        lam = self.layout.lambda_matrix(theta)
        u, state = self._modes(lam, beta, self._u.copy())
        design = self.design
        of_subject = self.rows.of_subject
        u_all = u[:, of_subject]  # (q, G)
        chol = state.chol[:, :, of_subject]
        lam_out = ranef_map @ lam
        q, G = u_all.shape
        modes = (lam_out @ u_all).T
        T = forward_groups(chol, np.broadcast_to(lam_out.T[:, None, :], (q, G, q)))
        cond_sd = np.sqrt(np.einsum("igj,igj->gj", T, T))
        b = lam @ u_all
        eta = np.einsum("nk,k->n", design.X, beta)
        at = 0
        for block in design.blocks:
            for j in range(block.Z.shape[1]):
                eta += block.Z[:, j] * np.take(b[at], design.codes)
                at += 1
        terms = tuple(t for block in design.blocks for t in block.terms)
        ranef = FactorRanef(group=design.group, levels=design.levels, terms=terms, modes=modes, cond_sd=cond_sd)
        return RandomPart(ranef=(ranef,), modes=modes, cond_sd=cond_sd, eta=eta,
                          unscaled_vcov=self.unscaled_vcov(params))

    # --------------------------------------------------------------------------------- one pass

    def _try_pass(self, lam: np.ndarray, u: np.ndarray, offset: np.ndarray, *, joint: bool = False) -> _Pass | None:
        """``_pass``, or None where the likelihood or a factorization breaks down there (a step too long)."""
        try:
            return self._pass(lam, u, offset, joint=joint)
        except (PirlsFailure, FloatingPointError, np.linalg.LinAlgError):
            return None

    def _pass(self, lam: np.ndarray, u: np.ndarray, offset: np.ndarray, *, joint: bool = False) -> _Pass:
        """η = offset + ZΛu, then μ, w and log p, summed per distinct subject, and M_g's factors (``_Pass``)."""
        rows, work = self.rows, self._work
        q, P = u.shape
        b = _spherical_to_modes(lam, u)
        eta = work.eta
        np.copyto(eta, offset)
        for i in range(q):
            np.take(b[i], rows.codes, out=work.product)
            if not rows.unit[i]:
                work.product *= rows.Zt[i]
            eta += work.product
        values = self.family.evaluate(eta, rows.y, rows.log_constant, out=work.values)
        residual = np.subtract(rows.y, values.mu, out=work.residual)
        w = values.weight
        ZtWZ = np.empty((q, q, P))
        for (i, j), zz in zip(self._pairs, self._zz):
            ZtWZ[i, j] = ZtWZ[j, i] = self._sum(w, zz)
        rhs = np.empty((q, P, self.n_fixed + 1 if joint else 1))
        for i in range(q):
            rhs[i, :, -1] = self._sum(residual, None if rows.unit[i] else rows.Zt[i])
        pdev = -2.0 * (rows.indicator @ values.log_density) + np.einsum("ig,ig->g", u, u)
        if not (np.all(np.isfinite(pdev)) and np.all(np.isfinite(ZtWZ))):
            raise PirlsFailure("the likelihood is not finite at this linear predictor")
        XtWX = Xtr = None
        if joint:
            weighted_X = np.multiply(rows.Xt, w, out=work.weighted_X)
            for i in range(q):
                for k in range(self.n_fixed):
                    rhs[i, :, k] = self._sum(weighted_X[k], None if rows.unit[i] else rows.Zt[i])
            XtWX = np.einsum("kn,ln->kl", weighted_X, self._counted_Xt)
            Xtr = np.einsum("kn,n->k", self._counted_Xt, residual)
        chol, R = _factor(ZtWZ, rhs, lam)
        v = R[:, :, -1] - forward_groups(chol, u)
        logdet = 2.0 * sum(np.log(chol[i, i]) for i in range(q))
        return _Pass(eta=eta, chol=chol, v=v, pdev=pdev, logdet=logdet, ZtWZ=ZtWZ, Ztr=rhs[:, :, -1],
                     RZX=R[:, :, :-1] if joint else None, XtWX=XtWX, Xtr=Xtr)

    def _sum(self, values: np.ndarray, column: np.ndarray | None) -> np.ndarray:
        """Σ over each distinct subject's rows of ``values`` (times ``column`` where given)."""
        if column is None:
            out: np.ndarray = self.rows.indicator @ values
            return out
        product = np.multiply(values, column, out=self._work.product)
        out = self.rows.indicator @ product
        return out


def pirls_converged(size: float, previous: float, tol: float = PIRLS_TOL) -> bool:
    """Whether PIRLS has converged, from the largest change of its last step and of the one before."""
    return size < tol or (size < _STALLED and size > 0.25 * previous)


def _factor(ZtWZ: np.ndarray, rhs: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per subject L_g (Cholesky of ΛᵀZ_gᵀW_gZ_gΛ + I) and L_g⁻¹Λᵀ``rhs``_g: ``fit.linalg.factor_groups`` for
    q ≤ 2; for q ≥ 3 the same written out as array arithmetic (factor_groups' batched LAPACK and tensordot
    would go through BLAS: see the module docstring). Raises ``LinAlgError`` where M_g is not positive
    definite."""
    q = ZtWZ.shape[0]
    if q <= 2:
        chol, R, _ = factor_groups(ZtWZ, rhs, lam)
        return chol, R
    A_lam = np.zeros_like(ZtWZ)  # (Z'WZ Λ)[a, j]
    for a in range(q):
        for j in range(q):
            for b in range(j, q):  # Λ is lower triangular
                if lam[b, j] != 0.0:
                    A_lam[a, j] += ZtWZ[a, b] * lam[b, j]
    chol = np.zeros_like(ZtWZ)
    for j in range(q):
        for i in range(j, q):
            m = np.zeros(ZtWZ.shape[2]) + (1.0 if i == j else 0.0)
            for a in range(i, q):  # Λᵀ's row i has entries lam[a, i], a ≥ i
                if lam[a, i] != 0.0:
                    m += lam[a, i] * A_lam[a, j]
            for k in range(j):
                m -= chol[i, k] * chol[j, k]
            if i == j:
                if not np.all(m > 0.0):
                    raise np.linalg.LinAlgError("ΛᵀZᵀWZΛ + I is not positive definite")
                chol[j, j] = np.sqrt(m)
            else:
                chol[i, j] = m / chol[j, j]
    lifted = np.zeros_like(rhs)  # Λᵀ rhs
    for i in range(q):
        for a in range(i, q):
            if lam[a, i] != 0.0:
                lifted[i] += lam[a, i] * rhs[a]
    return chol, forward_groups(chol, lifted)


def _total(counts: np.ndarray, values: np.ndarray) -> float:
    """Σ_g c_g x_g (not by BLAS: see the module docstring)."""
    return float(np.einsum("g,g->", counts, values))


def _combine(coefficients: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Σ_k c_k x_k over the rows of term-major ``columns`` (Xβ; not by BLAS: see the module docstring)."""
    out: np.ndarray = np.einsum("k,kn->n", coefficients, columns)
    return out


def _spherical_to_modes(lam: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Λu per subject (q × P), as array arithmetic (not by BLAS: see the module docstring)."""
    q = u.shape[0]
    b = np.zeros_like(u)
    for i in range(q):
        for j in range(i + 1):
            if lam[i, j] != 0.0:
                b[i] += lam[i, j] * u[j]
    return b
