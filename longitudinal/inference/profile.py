"""Profile-likelihood intervals for the variance parameters of a linear mixed model, as lme4's
``confint(fit, method = "profile")``: each random-effect SD, each random-effect correlation and the residual SD.

What is profiled (lme4 1.1.31, ``R/profile.R``): ``profile.merMod`` builds its objective with ``devfun2``, whose
first step is ``fm <- refitML(fm)``. Whatever the fit, the criterion is the ML deviance −2 log L(θ, σ) (β
profiled out, σ not) in lme4's "sdcor" parameters: per bar the SDs and correlations of the random effects in
the data's units, then σ. A REML fit's intervals are therefore those of its ML refit, centred on the ML
estimates, and so they are here by default; ``reml=True`` profiles the REML criterion (lmerTest's
``devfun_vp``) instead, which lme4 does not offer.

The profile of a parameter ψ: D(x) = min of the criterion over the other parameters with ψ = x, and
ζ(x) = sign(x − ψ̂) √(D(x) − D̂). The interval's ends are where ζ = ∓z, z = qnorm((1 + level) / 2). lme4
evaluates ζ on a grid and inverts an interpolating spline; here each end is a root found directly (Brent's
method), so the two agree to the accuracy of lme4's spline. An end the profile does not reach before the
parameter's bound is that bound, as lme4 reports it: 0 for an SD (the lower end of a singular fit's SD), −1 or
+1 for a correlation.

Parametrization. The criterion is evaluated on the standardized design (``fit.scaling``) from log|M| and the
penalized least-squares system S (``fit.lmm.penalized_solver``: the fit's optimizer's evaluation). The free
parameters are, per bar, the entries of a lower-triangular factor L of the bar's covariance Σ (data's units,
terms permuted so that the profiled ones come first), and log σ. Fixing an SD is fixing L₁₁ = x; fixing a
correlation ρ is L₂₁ = s₂ρ, L₂₂ = s₂√(1 − ρ²) with L₁₁ = |s₁| and |s₂| free. Every other entry is unconstrained
(a factor with negative diagonal entries gives the same Σ), so each inner minimization is an unconstrained BFGS,
and every covariance matrix is reachable, boundaries (an SD of 0, |ρ| = 1) included: a singular fit profiles as
any other. Each evaluation is one penalized least-squares solve on the cross-products (O(groups), never O(rows);
O(visit patterns) when the subjects share few).

Following the profile. Each end is approached from the estimate outward, each inner minimization starting from
the point before it (lme4's ``startmethod = "prev"``) with that point's BFGS inverse Hessian (at the estimate,
that of a finite-difference Hessian, which also gives the profile's curvature there and so the search's first
step: just beyond the end of the local quadratic); the parameter's bound is evaluated last. Two places where the
minimum over the other parameters is not where the neighbour's solution leads: a factor's diagonal entry at 0 is
a stationary point by symmetry (it is lifted off 0), and next to a correlation of ±1 the profile may continue on
the branch of the opposite sign (a second start, reflected). lme4 misses both: on a singular random slope, and on
a 3 × 3 bar whose inner bobyqa runs out of evaluations, its ends are off by up to 20% — there its own
``devfun2``, minimized by restarts, agrees with the minima found here (``tests/inference/test_profile.py``).
About 3–5 inner minimizations per end on a well-determined profile (7–30 evaluations each for a 2 × 2 bar), more
where the quadratic is a poor guide.

A GLMM (binomial, Poisson) is profiled as lme4 profiles a glmer fit: glmer's deviance (Laplace, or adaptive
Gauss–Hermite with the fit's nAGQ) as a function of the SDs and correlations (link scale) and β, each profile
minimized over β too (the ``extra`` parameters, in standardized coordinates scaled by their standard errors),
no σ; PIRLS warm-starts from the last evaluation's modes, as in ``fit.glmm``.

Not computed here (``profile_intervals`` returns None): a failed fit, a model without random effects and a
covariance-structure model (MMRM).
"""

from __future__ import annotations

import math
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import pandas as pd

from longitudinal.fit.glmm.families import family_named
from longitudinal.fit.glmm.multifactor import SparseLaplace
from longitudinal.fit.glmm.onefactor import OneFactorLaplace, compress_subjects
from longitudinal.fit.glmm.problem import LaplaceProblem
from longitudinal.fit.glmm.quadrature import gauss_hermite
from longitudinal.fit.lmm import penalized_solver
from longitudinal.fit.scaling import Standardization, lower_factor_of, standardize
from longitudinal.fit.theta import layout_theta
from longitudinal.inference.variance import block_covariances
from longitudinal.model.design import Design, build_design
from longitudinal.model.formula import parse_formula
from longitudinal.records import Fit

#: Below this fraction of the term's natural scale an SD estimate is on its bound (a singular fit).
BOUNDARY_SD = 1e-7
#: Beyond 1 − this a correlation estimate is on its bound.
BOUNDARY_COR = 1e-9
#: How far (in log SD, or atanh ρ) the search for an end goes before it gives up or takes the bound.
SEARCH_SPAN = 30.0
#: A profile deviance this far below the optimum is reported (lme4 stops with "profiling detected new, lower
#: deviance" beyond 1e-9; here the profile goes on from the better point's deviance).
LOWER_DEVIANCE_TOL = 1e-6
#: A diagonal entry of a factor (in units of its term's natural scale) below this starts from this instead.
LIFT = 1e-3
#: A correlation beyond this in absolute value gets a second, reflected start (``_Parametrization.starts``).
NEAR_ONE = 0.99
#: The search's first step goes this far beyond where the profile's local quadratic puts the end, so that it
#: usually brackets the end at once.
OVERSHOOT = 1.1
#: A bar's covariance with an eigenvalue below this fraction of its trace is singular for ``_FullCurvature``.
SINGULAR_EIGENVALUE = 1e-8
#: An end is taken where |ζ − z| is below this: Brent's further steps would move it by less than this / ζ′.
ZETA_TOL = 1e-7


@dataclass(frozen=True)
class ProfileIntervals:
    """Profile-likelihood intervals of one fit's variance parameters, keyed as the ``Fit`` names them:
    ``sds`` by (group, term), ``correlations`` by (group, term1, term2), ``residual_sd`` (None without one).
    An end that could not be found is NaN and ``notes`` says why; ``notes`` also names a profile that is not
    monotone and a deviance found below the fit's."""

    sds: dict[tuple[str, str], tuple[float, float]]
    correlations: dict[tuple[str, str, str], tuple[float, float]]
    residual_sd: tuple[float, float] | None
    notes: tuple[str, ...]


def profile_intervals(fit: Fit, visits: pd.DataFrame, level: float = 0.95, *, reml: bool = False,
                      ) -> ProfileIntervals | None:
    """lme4's ``confint(fit, method = "profile")`` for the SDs, correlations and residual SD of ``fit``, at
    ``level``; ``visits`` are the rows it was fitted on (validated: no missing values), from which the design
    is rebuilt with the fit's dropped columns.

    A linear mixed model: the ML deviance is profiled (lme4's ``devfun2`` refits a REML fit by ML first), from
    the ML optimum found here starting at the fit's estimates; ``reml=True`` profiles the REML criterion
    instead. A GLMM (binomial, Poisson): glmer's deviance (Laplace, or quadrature with the fit's nAGQ) as a
    function of θ's SDs and correlations and β, each profile minimized over β too, as lme4's; there is no
    residual SD (``residual_sd`` None). None for a failed fit, a model without random effects and an MMRM.
    """
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must lie strictly between 0 and 1, not {level!r}")
    if reml and fit.family != "gaussian":
        raise ValueError(f"fit {fit.name!r} is a {fit.family} GLMM: there is no REML criterion to profile")
    if not fit.usable or fit.covariance is not None or not fit.random_effects or not fit.fixed_effects:
        return None
    from scipy.special import ndtri  # scipy.stats costs seconds to import

    design = build_design(visits, parse_formula(fit.formula, name=fit.name), dropped=fit.dropped_terms)
    blocks = design.blocks
    covariances = block_covariances(blocks, fit)
    if covariances is None or not blocks:
        return None
    criterion: _Criterion
    if fit.family == "gaussian":
        if not math.isfinite(fit.residual_sd):
            return None
        standardized, standardization = standardize(design)
        del design  # the design in the data's units is not held while the profiles run (2M rows: 112 MB of X)
        criterion = _LinearCriterion(standardized, standardization, reml)
        extra = criterion.extra_of(fit.residual_sd)
    else:
        beta = np.array([fe.estimate for fe in fit.fixed_effects])
        criterion = _GeneralizedCriterion(design, fit.family, fit.nagq, beta, fit.vcov)
        extra = criterion.extra_of(beta)
    notes: list[str] = []
    free = _Parametrization(criterion, None)
    start = free.pack(covariances, extra)
    gtol = _gradient_tolerance(criterion(*free.unpack(start, math.nan)))
    optimum = _minimize(lambda v: criterion(*free.unpack(v, math.nan)), start, gtol)
    factors, extra = free.unpack(optimum.x, math.nan)
    estimates = [A @ A.T for A in factors]
    # the criterion's Hessian at the optimum, once: each profile's local quadratic is this one reparametrized
    # (``_Profile._quadratic``), which needs the map to the full parameters smooth there (no singular bar)
    curvature = None
    if all(np.linalg.eigvalsh(cov)[0] > SINGULAR_EIGENVALUE * np.trace(cov) for cov in estimates):
        curvature = _FullCurvature(free, _hessian(lambda u: criterion(*free.unpack(u, math.nan)), optimum.x,
                                                  float(optimum.fun)))
    z = float(ndtri(0.5 * (1.0 + level)))

    def interval(target: _Target, label: str) -> tuple[float, float]:
        x_hat = criterion.sigma_of(extra) if target.kind == "sigma" else target.estimate(estimates)
        param = _Parametrization(criterion, target)
        profile = _Profile(criterion, param, x_hat, param.pack(estimates, extra), float(optimum.fun), label, notes,
                           curvature)
        return profile.end(-1, z), profile.end(+1, z)

    sds: dict[tuple[str, str], tuple[float, float]] = {}
    correlations: dict[tuple[str, str, str], tuple[float, float]] = {}
    for b, block in enumerate(blocks):
        for i, term in enumerate(block.terms):
            sds[block.group, term] = interval(_Target("sd", b, (i,), criterion.term_scales[b][i]),
                                              f"SD of {term} | {block.group}")
            for j in range(i):
                key = (block.group, block.terms[j], term)
                correlations[key] = interval(_Target("cor", b, (j, i)),
                                             f"correlation of {block.terms[j]} and {term} | {block.group}")
    residual = None
    if isinstance(criterion, _LinearCriterion):
        residual = interval(_Target("sigma", scale=criterion.y_scale), "residual SD")
    return ProfileIntervals(sds=sds, correlations=correlations, residual_sd=residual, notes=tuple(notes))


@dataclass(frozen=True)
class _Target:
    """The parameter profiled: an SD (``bar``, ``terms`` = (i,)), a correlation (``terms`` = (i, j)) or σ;
    ``scale`` is its natural size (the data's units of the term), for steps off a bound."""

    kind: Literal["sd", "cor", "sigma"]
    bar: int = -1
    terms: tuple[int, ...] = ()
    scale: float = 1.0

    def estimate(self, covariances: list[np.ndarray]) -> float:
        """The SD or correlation in the bars' covariances (σ is the criterion's: ``_Criterion.sigma_of``)."""
        cov = covariances[self.bar]
        if self.kind == "sd":
            return math.sqrt(max(float(cov[self.terms[0], self.terms[0]]), 0.0))
        i, j = self.terms
        denominator = math.sqrt(max(float(cov[i, i] * cov[j, j]), 0.0))
        return float(np.clip(cov[i, j] / denominator, -1.0, 1.0)) if denominator > 0 else 0.0

    def bound(self, direction: int) -> float | None:
        """The end of the parameter's range in ``direction`` where the criterion is defined (0 for an SD,
        ±1 for a correlation); None where it is not reachable (σ → 0, an SD or σ → ∞)."""
        if self.kind == "cor":
            return float(direction)
        if self.kind == "sd" and direction < 0:
            return 0.0
        return None

    def to_t(self, x: float) -> float:
        """The scale the search steps on, where profiles are nearly linear: log for SDs, atanh for ρ."""
        if self.kind == "cor":
            return math.atanh(x) if abs(x) < 1.0 else math.copysign(math.inf, x)
        return math.log(x) if x > 0.0 else -math.inf

    def from_t(self, t: float) -> float:
        return math.tanh(t) if self.kind == "cor" else math.exp(t)

    def on_bound(self, x: float) -> bool:
        """Whether an estimate x lies on one of the parameter's bounds (a singular fit)."""
        if self.kind == "cor":
            return abs(x) > 1.0 - BOUNDARY_COR
        return self.kind == "sd" and x < BOUNDARY_SD * self.scale

    def at(self, x: float, bound: float) -> bool:
        """Whether an estimate x lies on ``bound``."""
        return self.on_bound(x) and abs(x - bound) < 0.5


class _Criterion(Protocol):
    """The criterion profiled, as a function of per-bar covariance factors A_b (Σ_b = A_b A_bᵀ, data's units)
    and the ``extra`` parameters that are not the bars' (log σ of a linear model, β of a GLMM), up to a
    constant. ``term_scales`` are the natural sizes of each bar's terms, which scale the free parameters."""

    sizes: tuple[int, ...]
    term_scales: list[np.ndarray]
    n_extra: int

    def __call__(self, factors: list[np.ndarray], extra: np.ndarray) -> float: ...

    def sigma_of(self, extra: np.ndarray) -> float: ...

    def extra_with_sigma(self, sigma: float) -> np.ndarray: ...


def _relative_theta(inverse_maps: list[np.ndarray], factors: list[np.ndarray],
                    positions: list[tuple[np.ndarray, np.ndarray]], sigma: float) -> np.ndarray:
    """lme4's θ on the standardized design for factors A_b in the data's units: Λ_b' = B_b⁻¹ A_b / σ brought to
    lower-triangular form (Λ_b'Λ_b'ᵀ is what the criterion depends on), laid out bar by bar."""
    return np.concatenate([
        lower_factor_of(B_inv @ A / sigma).T[where]
        for B_inv, A, where in zip(inverse_maps, factors, positions, strict=True)
    ])


class _LinearCriterion:
    """The ML deviance (or REML criterion) of a linear mixed model at (A_b, σ), ``extra`` = [log(σ / s)]:
    evaluated on the standardized design (``fit.scaling``), where Λ_b' = B_b⁻¹ A_b / σ and σ' = σ / s."""

    n_extra = 1

    def __init__(self, standardized: Design, standardization: Standardization, reml: bool) -> None:
        """``standardized`` and ``standardization``: ``fit.scaling.standardize`` of the fit's design."""
        self.solve = penalized_solver(standardized)
        self.reml = reml
        self.y_scale = standardization.y_scale
        self.sizes = tuple(len(block.terms) for block in standardized.blocks)
        self.inverse_maps = [np.linalg.inv(B) for B in standardization.ranef_maps]
        self.term_scales = [standardization.y_scale * np.sqrt((B * B).sum(axis=1))
                            for B in standardization.ranef_maps]
        # lme4's θ layout within a bar: the lower triangle column by column, i.e. Lᵀ's upper triangle by rows
        self.theta_positions = [np.triu_indices(k) for k in self.sizes]

    def sigma_of(self, extra: np.ndarray) -> float:
        return self.y_scale * math.exp(float(extra[0]))

    def extra_of(self, sigma: float) -> np.ndarray:
        return np.array([math.log(sigma / self.y_scale)])

    extra_with_sigma = extra_of

    def __call__(self, factors: list[np.ndarray], extra: np.ndarray) -> float:
        sigma = self.sigma_of(extra)
        if not (math.isfinite(sigma) and sigma > 0.0):
            return math.inf
        theta = _relative_theta(self.inverse_maps, factors, self.theta_positions, sigma)
        if not np.all(np.isfinite(theta)):
            return math.inf
        solution = self.solve(theta)
        if solution is None:
            return math.inf
        deviance = solution.deviance(sigma / self.y_scale, reml=self.reml)
        return deviance if math.isfinite(deviance) else math.inf


class _GeneralizedCriterion:
    """glmer's deviance of a GLMM (Laplace, or adaptive Gauss–Hermite with ``nagq`` points) at (A_b, β), the
    SDs on the link scale, ``extra`` = β' / se(β') with β = A β' on the design with standardized X and Z (the
    outcome as it is), as ``fit.glmm`` fits it; PIRLS warm-starts from the last evaluation's modes."""

    def __init__(self, design: Design, family: str, nagq: int, beta: np.ndarray, vcov: np.ndarray) -> None:
        standardized, standardization = standardize(design)
        standardized = dataclasses.replace(standardized, y=design.y)
        self.fixed_inverse = np.linalg.inv(standardization.fixed_map)
        self.sizes = tuple(len(block.terms) for block in design.blocks)
        self.n_extra = len(beta)
        self.inverse_maps = [np.linalg.inv(B) for B in standardization.ranef_maps]
        self.term_scales = [np.sqrt((B * B).sum(axis=1)) for B in standardization.ranef_maps]
        self.theta_positions = [np.triu_indices(k) for k in self.sizes]
        beta_standardized = self.fixed_inverse @ beta
        se = np.sqrt(np.diagonal(self.fixed_inverse @ vcov @ self.fixed_inverse.T)) if vcov.size else np.ones(0)
        self.beta_scale = np.where(np.isfinite(se) & (se > 0.0), se, 1.0) if se.size else np.ones(len(beta))
        mean = family_named(family)
        layout = layout_theta(self.sizes)
        self.problem: LaplaceProblem
        if design.single_factor:
            rule = gauss_hermite(nagq) if nagq > 1 else None
            self.problem = OneFactorLaplace(standardized, compress_subjects(standardized, mean), layout, mean, rule,
                                            beta_standardized)
        else:
            self.problem = SparseLaplace(standardized, layout, mean, beta_standardized)

    def sigma_of(self, extra: np.ndarray) -> float:
        return math.nan

    def extra_with_sigma(self, sigma: float) -> np.ndarray:
        raise ValueError("a GLMM has no residual SD to profile")

    def extra_of(self, beta: np.ndarray) -> np.ndarray:
        scaled: np.ndarray = self.fixed_inverse @ beta / self.beta_scale
        return scaled

    def __call__(self, factors: list[np.ndarray], extra: np.ndarray) -> float:
        theta = _relative_theta(self.inverse_maps, factors, self.theta_positions, 1.0)
        if not np.all(np.isfinite(theta)):
            return math.inf
        deviance = self.problem.deviance(np.concatenate([theta, extra * self.beta_scale]))
        return deviance if math.isfinite(deviance) else math.inf


class _Parametrization:
    """The free parameters of the criterion with ``target`` held at x (all of them for target None), as one
    vector: per bar the free entries of its permuted lower factor, each divided by its term's natural scale,
    then the criterion's ``extra`` parameters (log(σ / s), or scaled β) unless σ is the target. See the module
    for why this covers every covariance."""

    def __init__(self, criterion: _Criterion, target: _Target | None) -> None:
        self.criterion = criterion
        self.target = target
        self.sizes = criterion.sizes
        self.perms: list[np.ndarray] = []
        self.free: list[tuple[np.ndarray, np.ndarray]] = []
        self.scales: list[np.ndarray] = []
        diagonal: list[bool] = []
        for b, k in enumerate(self.sizes):
            perm = np.arange(k)
            fixed: set[tuple[int, int]] = set()
            if target is not None and target.bar == b:
                perm = np.array(list(target.terms) + [i for i in range(k) if i not in target.terms])
                fixed = {(0, 0)} if target.kind == "sd" else {(0, 0), (1, 0), (1, 1)}
            cols, rows = np.triu_indices(k)
            keep = np.array([(r, c) not in fixed for r, c in zip(rows, cols, strict=True)], dtype=bool)
            self.perms.append(perm)
            self.free.append((rows[keep], cols[keep]))
            self.scales.append(criterion.term_scales[b][perm])
            diagonal.extend(rows[keep] == cols[keep])
            if target is not None and target.bar == b and target.kind == "cor":
                diagonal.extend([True, True])  # |s₁| and |s₂|: as symmetric about 0 as a diagonal entry
        if not self._profiles_sigma:
            diagonal.extend([False] * criterion.n_extra)
        #: Which free parameters are diagonal entries of a factor (``starts``).
        self.diagonal = np.array(diagonal, dtype=bool)

    @property
    def _profiles_sigma(self) -> bool:
        return self.target is not None and self.target.kind == "sigma"

    def unpack(self, v: np.ndarray, x: float) -> tuple[list[np.ndarray], np.ndarray]:
        """The factors A_b (rows in the bar's term order) and the extra parameters at free parameters ``v`` and
        target value x."""
        factors = []
        at = 0
        for b, k in enumerate(self.sizes):
            rows, cols = self.free[b]
            scale = self.scales[b]
            L = np.zeros((k, k))
            L[rows, cols] = v[at:at + rows.size] * scale[rows]
            at += rows.size
            target = self.target
            if target is not None and target.bar == b:
                if target.kind == "sd":
                    L[0, 0] = x
                else:
                    s1, s2 = abs(v[at]) * scale[0], abs(v[at + 1]) * scale[1]
                    at += 2
                    L[0, 0], L[1, 0], L[1, 1] = s1, s2 * x, s2 * math.sqrt(max(1.0 - x * x, 0.0))
            A = np.empty_like(L)
            A[self.perms[b]] = L
            factors.append(A)
        extra = self.criterion.extra_with_sigma(x) if self._profiles_sigma else v[at:]
        return factors, extra

    def starts(self, v: np.ndarray, x: float) -> list[np.ndarray]:
        """Where to start the inner minimization at target value x from the solution ``v`` of a neighbour.

        A diagonal entry of a factor at 0 (a singular bar) is a stationary point of the criterion by symmetry
        (±L_ii give the same Σ), so it is lifted off 0, lest the minimization never leave it. A bar with a
        correlation near ±1 may have its profile's minimum on the other branch (ρ near ∓1, as on a singular
        random slope: lme4's profile, which follows one branch, then misses it), so that bar is also started
        reflected: one term's sign flipped, every correlation of that term negated.
        """
        lifted = np.where(self.diagonal & (np.abs(v) < LIFT), LIFT, v)
        out = [lifted]
        factors, extra = self.unpack(v, x)
        covariances = [A @ A.T for A in factors]
        for b, cov in enumerate(covariances):
            k = cov.shape[0]
            sd = np.sqrt(np.clip(np.diagonal(cov), 0.0, None))
            held = self.target is not None and self.target.bar == b and self.target.kind == "cor"
            fixed = self.target.terms if held and self.target is not None else ()
            with np.errstate(divide="ignore", invalid="ignore"):
                corr = np.abs(cov / np.outer(sd, sd))
            flippable = [i for i in range(k) if i not in fixed
                         and any(j != i and corr[i, j] > NEAR_ONE for j in range(k))]
            if flippable:
                flip = np.ones(k)
                flip[flippable[-1]] = -1.0
                reflected = list(covariances)
                reflected[b] = cov * np.outer(flip, flip)
                packed = self.pack(reflected, extra)
                out.append(np.where(self.diagonal & (np.abs(packed) < LIFT), LIFT, packed))
        return out

    def pack(self, covariances: list[np.ndarray], extra: np.ndarray) -> np.ndarray:
        """The free parameters of the point (Σ_b, extra): inverse of ``unpack`` for the target's value there."""
        out: list[float] = []
        for b, cov in enumerate(covariances):
            values, vectors = np.linalg.eigh(0.5 * (cov + cov.T))
            factor = vectors * np.sqrt(np.clip(values, 0.0, None))
            L = lower_factor_of(factor[self.perms[b]])
            rows, cols = self.free[b]
            scale = self.scales[b]
            out.extend(L[rows, cols] / scale[rows])
            target = self.target
            if target is not None and target.bar == b and target.kind == "cor":
                out.extend([L[0, 0] / scale[0], math.hypot(L[1, 0], L[1, 1]) / scale[1]])
        if not self._profiles_sigma:
            out.extend(extra)
        return np.array(out)


@dataclass(frozen=True, eq=False)
class _FullCurvature:
    """The criterion's Hessian ``hessian`` at its optimum in the free parameters of ``free`` (every parameter)."""

    free: _Parametrization
    hessian: np.ndarray


@dataclass(frozen=True)
class _Point:
    x: float
    deviance: float
    v: np.ndarray
    hess_inv: np.ndarray | None = None


class _Profile:
    """The profile of one parameter: D(x) by inner minimization warm-started from the nearest point already
    evaluated, ζ(x), and each end of the interval."""

    def __init__(self, criterion: _Criterion, param: _Parametrization, x_hat: float, v_hat: np.ndarray,
                 base: float, label: str, notes: list[str], curvature: _FullCurvature | None = None) -> None:
        assert param.target is not None
        self.curvature = curvature
        self.criterion = criterion
        self.param = param
        self.target = param.target
        self.x_hat = x_hat
        self.base = base
        self.label = label
        self.notes = notes
        self.lowest = base
        #: dζ/dx and dv/dx (the profile's path) at the estimate, from ``_quadratic``; None where unknown
        self.slope: float | None = None
        self.tangent: np.ndarray | None = None
        hess_inv = None if self.target.on_bound(x_hat) else self._quadratic(v_hat)
        self.points = [_Point(x_hat, base, v_hat, hess_inv)]

    def _quadratic(self, v_hat: np.ndarray) -> np.ndarray | None:
        """The criterion's local quadratic at the estimate, from its Hessian H in (x, v): Jᵀ H_full J with J the
        Jacobian of the full parameters in (x, v) (exact at a minimum, where the gradient vanishes; by central
        differences, which cost no evaluation of the criterion) where the full Hessian is given, else by central
        differences of the criterion (``_hessian``). Returns H_vv⁻¹, BFGS's inverse Hessian for the path's first points
        (else they start cold), and sets ``tangent`` = −H_vv⁻¹ H_vx, the path's direction (they start at
        v̂ + (x − x̂) tangent), and ``slope`` = dζ/dx = √(s / 2), s = H_xx − H_xv H_vv⁻¹ H_vx the profile's
        curvature (D(x) − D̂ ≈ s (x − x̂)² / 2), for the search's first step. None (and nothing set) where H_vv
        is not positive definite; no slope where s is not positive."""
        w0 = np.concatenate([[self.x_hat], v_hat])
        h = 1e-4 * np.maximum(np.abs(w0), 1.0)
        h[0] = 1e-4 * (1.0 if self.target.kind == "cor" else abs(self.x_hat))
        if self.curvature is not None:
            free = self.curvature.free

            def full(w: np.ndarray) -> np.ndarray:
                factors, extra = self.param.unpack(w[1:], float(w[0]))
                return free.pack([A @ A.T for A in factors], extra)

            J = np.column_stack([(full(w0 + d) - full(w0 - d)) / (2.0 * d[i]) for i, d in enumerate(np.diag(h))])
            H = J.T @ self.curvature.hessian @ J
        else:
            H = _hessian(lambda w: self.criterion(*self.param.unpack(w[1:], float(w[0]))), w0, self.base, h)
        if not np.all(np.isfinite(H)):
            return None
        try:
            chol = np.linalg.cholesky(H[1:, 1:])
        except np.linalg.LinAlgError:
            return None
        c = np.linalg.solve(chol, H[1:, 0])  # L⁻¹ H_vx, H_vv = L Lᵀ
        s = float(H[0, 0] - c @ c)
        self.slope = math.sqrt(0.5 * s) if s > 0.0 else None
        self.tangent = -np.linalg.solve(chol.T, c)
        inverse: np.ndarray = np.linalg.inv(H[1:, 1:])
        return inverse

    def deviance(self, x: float) -> float:
        for point in self.points:
            if point.x == x:  # Brent's method starts from the two ends the search has evaluated
                return point.deviance
        # path following: start from the nearest point between the estimate and x, never from beyond x
        inside = [p for p in self.points if (p.x - self.x_hat) * (x - self.x_hat) >= 0.0
                  and abs(p.x - self.x_hat) <= abs(x - self.x_hat)]
        nearest = min(inside, key=lambda p: abs(p.x - x))

        def objective(v: np.ndarray) -> float:
            return self.criterion(*self.param.unpack(v, x))

        v = nearest.v
        if nearest is self.points[0] and self.tangent is not None:  # along the path's direction at the estimate
            v = v + (x - nearest.x) * self.tangent
        starts = self.param.starts(v, x)
        # the neighbour's inverse Hessian, for the start near its solution: BFGS then needs a few steps only
        gtol = _gradient_tolerance(self.base)
        found = min((_minimize(objective, start, gtol, nearest.hess_inv if i == 0 else None)
                     for i, start in enumerate(starts)), key=lambda r: r.fun)
        self.points.append(_Point(x, float(found.fun), found.x, found.hess_inv))
        return float(found.fun)

    def zeta(self, x: float) -> float:
        change = self.deviance(x) - self.base
        if change < -LOWER_DEVIANCE_TOL and change < self.lowest - self.base:
            self.lowest = self.base + change
            self.notes.append(f"{self.label}: the profile found a deviance {-change:.3g} below the optimum, at "
                              f"{x:.6g}: the optimum reached from the fit's estimates is not the lowest; this "
                              "interval is approximate")
        return math.copysign(math.sqrt(max(change, 0.0)), x - self.x_hat)

    def end(self, direction: int, z: float) -> float:
        """The end of the interval in ``direction`` (−1 lower, +1 upper): the root of direction·ζ(x) = z, or
        the parameter's bound when the profile stays within z up to it; NaN (with a note) when not found.

        The search follows the profile outward from the estimate (each point starts from the one before, as
        lme4's), on the scale of ``_Target.to_t``, the first step to just beyond the end of the local quadratic
        (``_quadratic``; 0.05 without one), then secant steps that overshoot the cut-off a little so that
        Brent's method then has a bracket. The bound itself is evaluated last, from the path's end: a
        jump there straight from the estimate can land on another branch (an SD of 0, where the other
        parameters of its bar no longer matter) and would then seed the search from the wrong place.
        """
        target = self.target
        bound = target.bound(direction)
        if bound is not None and target.at(self.x_hat, bound):
            return bound

        def excess(x: float) -> float:
            return direction * self.zeta(x) - z

        t_prev, f_prev, step = target.to_t(self.x_hat), -z, 0.05
        if self.slope is not None:  # the local quadratic's end, a little beyond
            x_end = self.x_hat + direction * z / self.slope
            if abs(x_end) < 1.0 if target.kind == "cor" else x_end > 0.0:
                step = min(max(OVERSHOOT * abs(target.to_t(x_end) - t_prev), 1e-6), 1.0)
        if target.on_bound(self.x_hat) or not math.isfinite(t_prev):
            # the estimate is on the bound behind the search: start a step off it
            x_start = 0.01 * target.scale if target.kind == "sd" else -direction * (1.0 - 1e-3)
            t_prev, f_prev, step = target.to_t(x_start), excess(x_start), 0.5
            if f_prev >= 0.0:
                return _root(excess, self.x_hat, x_start)
        t_start = t_prev
        monotone = True
        while abs(t_prev - t_start) < SEARCH_SPAN:
            t = t_prev + direction * step
            f = excess(target.from_t(t))
            if f >= 0.0:
                return _root(excess, target.from_t(t_prev), target.from_t(t))
            gain = f - f_prev
            if gain < -1e-3 and monotone:
                monotone = False
                side = "below" if direction < 0 else "above"
                self.notes.append(f"{self.label}: the profile is not monotone ({side} the estimate)")
            proposed = 1.25 * (-f) * step / gain if gain > 1e-12 else 4.0 * step
            step = min(max(proposed, 0.1 * step), 4.0 * step)
            t_prev, f_prev = t, f
        if bound is not None:
            return bound if excess(bound) <= 0.0 else _root(excess, target.from_t(t_prev), bound)
        side = "lower" if direction < 0 else "upper"
        self.notes.append(f"{self.label}: no {side} end found (the profile stays within the {side} cut-off up to "
                          f"{target.from_t(t_prev):.6g})")
        return math.nan


def _hessian(f: Callable[[np.ndarray], float], w0: np.ndarray, f0: float, h: np.ndarray | None = None) -> np.ndarray:
    """The Hessian of ``f`` at ``w0`` (where it is ``f0``) by central differences with steps ``h`` (1e-4 of each
    parameter's size, at least 1e-4, by default), the mixed ones along the diagonal of two axes (numDeriv's
    ``genD``): 2 evaluations per parameter and 2 per pair."""
    if h is None:
        h = 1e-4 * np.maximum(np.abs(w0), 1.0)
    steps = h[:, None] * np.eye(w0.size)
    plus = np.array([f(w0 + d) for d in steps])
    minus = np.array([f(w0 - d) for d in steps])
    H = np.diag((plus - 2.0 * f0 + minus) / h ** 2)
    for i, di in enumerate(steps):
        for j, dj in enumerate(steps[:i]):
            both = f(w0 + di + dj) + f(w0 - di - dj)
            H[i, j] = H[j, i] = (both - plus[i] - minus[i] - plus[j] - minus[j] + 2.0 * f0) / (2.0 * h[i] * h[j])
    return H


class _Reached(Exception):
    """Raised by ``_root``'s function at a point where |excess| is within ``ZETA_TOL``: the root, for Brent."""

    def __init__(self, x: float) -> None:
        super().__init__(x)
        self.x = x


def _root(excess: Callable[[float], float], inside: float, outside: float) -> float:
    """The root of ``excess`` between a point where it is negative and one where it is not (Brent), or the first
    point Brent's method evaluates where |excess| ≤ ``ZETA_TOL`` (each evaluation is an inner minimization)."""
    from scipy.optimize import brentq

    def stopping(x: float) -> float:
        found = excess(x)
        if abs(found) <= ZETA_TOL:
            raise _Reached(x)
        return found

    width = abs(outside - inside)
    try:
        return float(brentq(stopping, inside, outside, xtol=1e-9 * max(width, 1e-300), rtol=1e-8))
    except _Reached as reached:
        return reached.x


def _minimize(objective: Callable[[np.ndarray], float], start: np.ndarray,  # type: ignore[no-untyped-def]
              gtol: float, hess_inv: np.ndarray | None = None):
    """Unconstrained BFGS from ``start`` (the parameters are scaled to O(1)), from ``hess_inv`` where given,
    to a gradient below ``gtol`` (``_gradient_tolerance``); central-difference gradients take fewer evaluations
    in all than forward ones, whose noise stalls the line searches near the optimum."""
    from scipy.optimize import minimize

    if hess_inv is not None:
        hess_inv = 0.5 * (hess_inv + hess_inv.T)
        try:
            np.linalg.cholesky(hess_inv)
        except np.linalg.LinAlgError:  # BFGS's update can lose definiteness in rounding
            hess_inv = None
    options = {"gtol": gtol, "maxiter": 2000, "hess_inv0": hess_inv}
    return minimize(objective, start, method="BFGS", jac="3-point", options=options)


def _gradient_tolerance(deviance: float) -> float:
    """BFGS's gradient tolerance for a criterion of this size: the rounding error of a central difference grows
    with the criterion (about 1e-16 |D| / 6e-6), and a tolerance below it only makes the line searches fail
    at length. With the parameters O(1) the curvature grows with the groups as |D| does, so the criterion is
    still within ~1e-9 of its minimum, far inside what the interval's ends need (ζ moves by ΔD / 2ζ)."""
    return 1e-5 * max(1.0, abs(deviance) / 100.0)
