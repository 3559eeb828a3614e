"""statsmodels' MixedLM as a second engine: several optimizers from fresh starts, never a non-finite winner.

MixedLM's default method chain (bfgs, then lbfgs, then cg) continues each try from the point where the
previous one failed and can stop several log-likelihood units short of the optimum; powell and nm can
report ``llf = inf``. So every optimizer is run alone from statsmodels' own fresh start (relative
covariance = identity), the default chain is run too, and the best *finite* log-likelihood among the runs
whose gradient is near zero wins. Before choosing, powell then lbfgs restart from the highest finite point
reached so far, while that still gains (the gradient methods stall on badly scaled covariates such as time
in days with a small slope SD). Every run is recorded as an ``OptimizerAttempt``; the fit's ``message``
names the winner and how far short each other run stopped.

"Near zero" is judged on the profile log-likelihood in statsmodels' square-root parametrization (the
analytic ``MixedLM.score``, a central-difference Hessian of it): the Newton step from the optimum would
gain at most ``GAIN_TOL`` log-likelihood units, and along directions of zero or positive curvature (a
boundary) the gradient is below ``GRADIENT_TOL``, a test waived at a singular optimum as lme4's checkConv
does. The Newton test does not depend on the units of the covariates, unlike a bare gradient norm. Even so,
near a boundary the best run can stop a few hundredths of a log-likelihood unit short of lme4.

Each run's log-likelihood is recomputed independently from its estimates (Woodbury identities over the
groups); a run whose reported ``llf`` disagrees with that value, is not finite, or has a (near) zero
residual variance cannot win.

Mapping of lme4 bars: the first bar with several terms (else the first bar) becomes ``exog_re`` with an
unstructured covariance; every other bar must have exactly one column and becomes a variance component.
Two bars with several terms cannot be expressed in MixedLM and give a failed fit saying so.

Estimates follow lme4's conventions: ML or REML as asked (``loglik`` is the REML log-likelihood under REML
and ``reml_criterion`` = −2 × that), ``n_params`` = fixed effects + q(q+1)/2 for the unstructured bar + one
per variance component + 1 residual variance, Wald standard errors from σ² (X'V⁻¹X)⁻¹ given the
covariance parameters (lme4's ``vcov``), 95% intervals ± 1.959964 SE, two-sided normal p-values, and the
conditional modes of the random effects with their conditional SDs given β. Missing values are not handled
here: the design has none (validation removed those rows).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from longitudinal.fit.theta import count_parameters
from longitudinal.fit.wald import wald_fixed_effects
from longitudinal.model.design import BlockDesign, Design
from longitudinal.records import Correlation, Fit, FixedEffect, OptimizerAttempt, VarianceComponent, failed_fit

ENGINE = "statsmodels"
#: Optimizers run alone from a fresh start, then statsmodels' default chain (continued tries).
OPTIMIZERS: tuple[str, ...] = ("lbfgs", "bfgs", "cg", "powell", "nm")
DEFAULT_CHAIN = "default(bfgs,lbfgs,cg)"
#: Largest log-likelihood gain a Newton step from an accepted optimum may promise.
GAIN_TOL = 1e-3
#: Largest gradient component allowed along directions of zero or positive curvature.
GRADIENT_TOL = 1e-3
#: A random-effect SD below this fraction of the residual SD makes the fit singular (lme4's isSingular).
SINGULAR_TOL = 1e-4
CORRELATION_TOL = 0.999
#: A residual variance below this fraction of the outcome's variance is zero: the likelihood is unbounded.
ZERO_VARIANCE_TOL = 1e-10
#: Relative disagreement allowed between statsmodels' llf and our recomputation of it.
LOGLIK_CHECK_TOL = 1e-6
#: Iteration limit of each optimizer run (statsmodels' default of 100 stops powell and lbfgs early);
#: Nelder-Mead gets fewer because a run that drifts towards llf = inf costs seconds per hundred iterations.
MAX_ITERATIONS = {"lbfgs": 1000, "bfgs": 1000, "cg": 1000, "powell": 1000, "nm": 200}
#: Restarts from the highest point so far, stopped when a round gains less than RESTART_GAIN.
MAX_RESTARTS = 3
RESTART_GAIN = 1e-6
_NOT_EXPRESSIBLE = "not expressible in statsmodels MixedLM; use engine lme4-style"


@dataclass(frozen=True)
class _Layout:
    """Which design block is MixedLM's ``exog_re`` and which become variance components."""

    re_block: int
    vc_blocks: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class _Estimates:
    """The parameters of one run, in our terms: β, σ², relative covariances (Ψ/σ²) per design block."""

    beta: np.ndarray
    sigma2: float
    relative: tuple[np.ndarray, ...]


@dataclass(frozen=True, eq=False)
class _Run:
    """One optimizer run: its record, whether it may win, and what it reached."""

    attempt: OptimizerAttempt
    usable: bool
    packed: np.ndarray | None = None
    estimates: _Estimates | None = None
    gradient_max: float = math.nan


def fit_statsmodels(design: Design, *, name: str, formula: str, method: Literal["ML", "REML"]) -> Fit:
    """Fit ``design`` with statsmodels' MixedLM by ML or REML from several optimizers; keep the best.

    Returns a failed ``Fit`` (with the reason in ``message``) when the bars cannot be expressed in MixedLM,
    when every optimizer fails, or when the best finite optimum has a zero residual variance.
    """
    began = time.perf_counter()
    n_params = count_parameters(design)

    def fail(reason: str, attempts: tuple[OptimizerAttempt, ...] = ()) -> Fit:
        return failed_fit(
            name, formula, method, ENGINE, f"candidate {name!r}: {reason}", n_obs=design.n_obs,
            n_subjects=design.n_groups, n_params=n_params, attempts=attempts, seconds=time.perf_counter() - began,
        )

    layout = map_blocks(design)
    if isinstance(layout, str):
        return fail(layout)
    reml = method == "REML"
    if design.n_obs <= design.X.shape[1] + (1 if reml else 0):
        return fail(f"{design.n_obs} rows cannot estimate {design.X.shape[1]} fixed effects and a residual variance")
    model = build_model(design, layout)
    runs = [_run_optimizer(model, design, layout, [optimizer], optimizer, reml) for optimizer in OPTIMIZERS]
    runs.append(_run_optimizer(model, design, layout, None, DEFAULT_CHAIN, reml))
    runs.extend(_restart(model, design, layout, runs, reml))
    best = _best(runs)
    attempts = tuple(run.attempt for run in runs)
    if best is None or best.estimates is None:
        return fail(_failure_reason(attempts), attempts)
    return _to_record(design, layout, best, runs, name=name, formula=formula, method=method,
                      n_params=n_params, began=began)


def map_blocks(design: Design) -> _Layout | str:
    """Choose MixedLM's ``exog_re`` bar and variance-component bars, or say why the bars do not fit."""
    others = [block.group for block in design.blocks if block.group != design.group]
    if others:
        return f"random effects on {others[0]!r} besides {design.group!r} are {_NOT_EXPRESSIBLE}"
    wide = [i for i, block in enumerate(design.blocks) if len(block.terms) > 1]
    if len(wide) > 1:
        shown = " and ".join(_bar_text(design.blocks[i]) for i in wide)
        return f"two correlated bars {shown} are {_NOT_EXPRESSIBLE}"
    re_block = wide[0] if wide else 0
    return _Layout(re_block=re_block, vc_blocks=tuple(i for i in range(len(design.blocks)) if i != re_block))


def build_model(design: Design, layout: _Layout) -> Any:
    """statsmodels' ``MixedLM`` on the design arrays; variance components as a ``VCSpec``."""
    from statsmodels.regression.mixed_linear_model import MixedLM, VCSpec

    vc = None
    if layout.vc_blocks:
        # VCSpec wants, per component, one matrix per group in sorted group order: codes are 0..G-1.
        order = np.argsort(design.codes, kind="stable")
        bounds = np.searchsorted(design.codes[order], np.arange(design.n_groups + 1))
        names, colnames, mats = [], [], []
        for i in layout.vc_blocks:
            block = design.blocks[i]
            Z = block.Z[order]
            names.append(f"{block.terms[0]}|{block.group}#{i}")
            mats.append([Z[bounds[g]:bounds[g + 1]] for g in range(design.n_groups)])
            colnames.append([[block.terms[0]] for _ in range(design.n_groups)])
        vc = VCSpec(names, colnames, mats)
    return MixedLM(
        endog=design.y, exog=design.X, groups=design.codes, exog_re=design.blocks[layout.re_block].Z, exog_vc=vc,
    )


def _bar_text(block: BlockDesign) -> str:
    return f"({' + '.join(block.terms)} | {block.group})"


# ----------------------------------------------------------------------------------------------- runs


def _run_optimizer(
    model: Any, design: Design, layout: _Layout, methods: list[str] | None, label: str, reml: bool,
    start: np.ndarray | None = None,
) -> _Run:
    """One ``MixedLM.fit``; numerical failures and warnings are caught and recorded, never raised."""
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        try:
            options = {"maxiter": MAX_ITERATIONS[methods[0]]} if methods else {}
            result = model.fit(reml=reml, method=methods, start_params=start, full_output=True, **options)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError, OverflowError, ZeroDivisionError) as exc:
            seconds = time.perf_counter() - began
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            return _Run(OptimizerAttempt(label, math.nan, False, 0, seconds, message), usable=False)
        retvals = result.hist[-1] if result.hist else {}
        seconds = time.perf_counter() - began
        llf = float(result.llf)
        iterations = _iterations(retvals)
        notes = [_warning_text(w) for w in caught]
        if not result.converged:
            notes.append("statsmodels: not converged")
        if not math.isfinite(llf):
            notes.insert(0, f"non-finite log-likelihood ({llf})")
            return _Run(OptimizerAttempt(label, llf, False, iterations, seconds, _join(notes)), usable=False)
        estimates = _estimates(result, design, layout)
        packed = _packed(model, estimates, layout)
        if estimates.sigma2 <= ZERO_VARIANCE_TOL * max(float(np.var(design.y)), 1e-300):
            notes.insert(0, f"zero residual variance ({estimates.sigma2:.3g})")
            return _Run(OptimizerAttempt(label, llf, False, iterations, seconds, _join(notes)), usable=False)
        own = loglik_at(design, estimates, reml=reml)
        if not math.isfinite(own) or abs(own - llf) > LOGLIK_CHECK_TOL * max(1.0, abs(own)):
            notes.insert(0, f"reported llf {llf:.6f} but the estimates give {own:.6f}")
            return _Run(OptimizerAttempt(label, llf, False, iterations, seconds, _join(notes)), usable=False)
        gain, gradient_max, flat_gradient = _newton_gain(model, packed)
    # As lme4's checkConv, the gradient is not required to vanish at a boundary (singular) optimum.
    on_boundary = is_singular(design, estimates)
    near_zero = gain <= GAIN_TOL and (flat_gradient <= GRADIENT_TOL or on_boundary)
    if not near_zero:
        notes.insert(0, f"gradient not near zero (max |g| {gradient_max:.3g}, a Newton step would gain {gain:.3g})")
    attempt = OptimizerAttempt(label, llf, near_zero, iterations, seconds, _join(notes))
    return _Run(attempt, usable=near_zero, packed=packed, estimates=estimates, gradient_max=gradient_max)


def _restart(model: Any, design: Design, layout: _Layout, runs: list[_Run], reml: bool) -> list[_Run]:
    """Powell then lbfgs from the highest finite point reached so far, while that still gains something.

    The gradient methods stall on badly scaled covariates (time in days, slope SD far below the residual
    SD); powell from their stopping point, then lbfgs to settle the gradient, usually reaches the optimum.
    """
    added: list[_Run] = []
    previous = -math.inf
    for round_ in range(1, MAX_RESTARTS + 1):
        start = _highest(runs + added)
        if start is None or start.packed is None or start.attempt.loglik <= previous + RESTART_GAIN:
            break
        previous = start.attempt.loglik
        powell = _run_optimizer(model, design, layout, ["powell"], f"powell(restart {round_})", reml,
                                start=start.packed)
        added.append(powell)
        settle_from = _highest([start, powell])
        assert settle_from is not None and settle_from.packed is not None
        added.append(_run_optimizer(model, design, layout, ["lbfgs"], f"lbfgs(restart {round_})", reml,
                                    start=settle_from.packed))
    return added


def _failure_reason(attempts: tuple[OptimizerAttempt, ...]) -> str:
    """Why no run could win: each run's rejection reason (the first note of its message), grouped."""
    by_reason: dict[str, list[str]] = {}
    for a in attempts:
        reason = (a.message or "not converged").split("; ")[0]
        reason = reason.split(" (")[0] if reason.startswith(("zero residual", "non-finite", "gradient not")) else reason
        by_reason.setdefault(reason, []).append(a.optimizer)
    detail = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
    if any(reason.startswith("zero residual variance") for reason in by_reason):
        return (f"the model reproduces the outcome exactly (zero residual variance), so the likelihood is "
                f"unbounded; drop random-effect terms or check the data ({detail})")
    return f"no optimizer reached a finite optimum with a near-zero gradient ({detail})"


def _highest(runs: list[_Run]) -> _Run | None:
    """The run with the highest trusted finite log-likelihood, converged or not."""
    finite = [run for run in runs if run.packed is not None and math.isfinite(run.attempt.loglik)]
    return max(finite, key=lambda run: run.attempt.loglik) if finite else None


def _best(runs: list[_Run]) -> _Run | None:
    usable = [run for run in runs if run.usable]
    return max(usable, key=lambda run: run.attempt.loglik) if usable else None


def _iterations(retvals: dict[str, Any]) -> int:
    for key in ("iterations", "nit"):
        if key in retvals:
            return int(retvals[key])
    if "allvecs" in retvals and retvals["allvecs"] is not None:
        return max(len(retvals["allvecs"]) - 1, 0)
    return int(retvals.get("gcalls", retvals.get("fcalls", 0)) or 0)


def _warning_text(w: warnings.WarningMessage) -> str:
    return f"{w.category.__name__}: {' '.join(str(w.message).split())}"


def _join(notes: list[str]) -> str:
    return "; ".join(dict.fromkeys(note for note in notes if note))


def _estimates(result: Any, design: Design, layout: _Layout) -> _Estimates:
    """β, σ² and the relative covariance (Ψ/σ²) of each design block from a statsmodels result."""
    relative: list[np.ndarray] = [np.zeros((0, 0))] * len(design.blocks)
    relative[layout.re_block] = np.atleast_2d(np.asarray(result.cov_re_unscaled, dtype=float))
    vcomp = np.atleast_1d(np.asarray(result.params_object.vcomp, dtype=float))
    for k, i in enumerate(layout.vc_blocks):
        relative[i] = np.array([[max(float(vcomp[k]), 0.0)]])
    return _Estimates(beta=np.asarray(result.fe_params, dtype=float), sigma2=float(result.scale),
                      relative=tuple(relative))


def _packed(model: Any, estimates: _Estimates, layout: _Layout) -> np.ndarray:
    """statsmodels' packed square-root parameters (Cholesky lower triangle, then √ of each component).

    statsmodels' own packing replaces a singular covariance by its diagonal and so loses the correlation;
    a Cholesky factor that tolerates zero pivots keeps it.
    """
    L = psd_cholesky(estimates.relative[layout.re_block])
    vc = [math.sqrt(estimates.relative[i][0, 0]) for i in layout.vc_blocks]
    return np.concatenate([L[np.tril_indices(L.shape[0])], np.asarray(vc, dtype=float)])


def psd_cholesky(S: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L L' = S for a positive semi-definite S (zero pivots give zero columns)."""
    q = S.shape[0]
    L = np.zeros_like(S, dtype=float)
    scale = max(float(np.max(np.abs(np.diag(S)))) if q else 0.0, 1e-300)
    for j in range(q):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        if d <= 1e-12 * scale:
            continue
        L[j, j] = math.sqrt(d)
        L[j + 1:, j] = (S[j + 1:, j] - L[j + 1:, :j] @ L[j, :j]) / L[j, j]
    return L


def _newton_gain(model: Any, packed: np.ndarray) -> tuple[float, float, float]:
    """(log-likelihood a Newton step would gain, max |gradient|, max |gradient| along non-concave directions).

    Gradient: statsmodels' analytic score of the profile log-likelihood; Hessian: central differences of it.
    """
    g = np.asarray(model.score(packed), dtype=float)
    k = packed.size
    H = np.empty((k, k))
    for j in range(k):
        h = 1e-5 * max(1.0, abs(float(packed[j])))
        up, down = packed.copy(), packed.copy()
        up[j] += h
        down[j] -= h
        H[:, j] = (np.asarray(model.score(up)) - np.asarray(model.score(down))) / (2 * h)
    H = (H + H.T) / 2
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(H))):
        return math.inf, math.inf, math.inf
    eigenvalues, vectors = np.linalg.eigh(H)
    along = vectors.T @ g
    concave = eigenvalues < -1e-8 * max(float(np.max(np.abs(eigenvalues))), 1e-300)
    gain = 0.5 * float(np.sum(along[concave] ** 2 / -eigenvalues[concave]))
    flat = float(np.max(np.abs(along[~concave]))) if np.any(~concave) else 0.0
    return gain, float(np.max(np.abs(g))) if k else 0.0, flat


# ------------------------------------------------------------------------------------ our own algebra


@dataclass(frozen=True, eq=False)
class _Groupwise:
    """Per-group quantities at given estimates: Λ, M_g = Λ'Z_g'Z_gΛ + I and its inverse, and residuals."""

    lam: np.ndarray
    M_inv: np.ndarray
    logdet_M: float
    LtZtr: np.ndarray
    LtZtX: np.ndarray
    r: np.ndarray


def _groupwise(design: Design, estimates: _Estimates) -> _Groupwise:
    """Woodbury pieces for V_g = σ²(I + Z_g Λ Λ' Z_g'), computed from per-group sums of cross-products."""
    Z = design.Z
    q = Z.shape[1]
    lam = np.zeros((q, q))
    at = 0
    for S in estimates.relative:
        k = S.shape[0]
        lam[at:at + k, at:at + k] = psd_cholesky(S)
        at += k
    G = design.n_groups
    indicator = sparse.csr_matrix(
        (np.ones(design.n_obs), (design.codes, np.arange(design.n_obs))), shape=(G, design.n_obs),
    )
    r = design.y - design.X @ estimates.beta
    ZtZ = np.asarray(indicator @ (Z[:, :, None] * Z[:, None, :]).reshape(design.n_obs, q * q)).reshape(G, q, q)
    p = design.X.shape[1]
    ZtX = np.asarray(indicator @ (Z[:, :, None] * design.X[:, None, :]).reshape(design.n_obs, q * p)).reshape(G, q, p)
    Ztr = np.asarray(indicator @ (Z * r[:, None])).reshape(G, q)
    M = np.einsum("ji,gjk,kl->gil", lam, ZtZ, lam) + np.eye(q)
    sign, logdet = np.linalg.slogdet(M)
    return _Groupwise(
        lam=lam, M_inv=np.linalg.inv(M), logdet_M=float(np.sum(logdet)) if np.all(sign > 0) else math.nan,
        LtZtr=Ztr @ lam, LtZtX=np.einsum("ji,gjk->gik", lam, ZtX), r=r,
    )


def loglik_at(design: Design, estimates: _Estimates, *, reml: bool) -> float:
    """The ML (or REML) log-likelihood at the given β, σ² and relative covariances, as lme4 defines it.

    ML: −½[n log(2πσ²) + log|I + ZΛΛ'Z'| + r'(I + ZΛΛ'Z')⁻¹r/σ²]; REML adds −½ log|X'(I + ZΛΛ'Z')⁻¹X| and
    uses (n − p) in place of n, with σ² the REML estimate.
    """
    parts = _groupwise(design, estimates)
    quad = float(parts.r @ parts.r - np.einsum("gi,gij,gj->", parts.LtZtr, parts.M_inv, parts.LtZtr))
    n, p = design.n_obs, design.X.shape[1]
    if not estimates.sigma2 > 0:
        return math.nan
    m = n - p if reml else n
    value = -0.5 * (m * math.log(2 * math.pi * estimates.sigma2) + parts.logdet_M + quad / estimates.sigma2)
    if reml:
        sign, logdet = np.linalg.slogdet(_xtvix(design, parts))
        value -= 0.5 * float(logdet) if sign > 0 else math.inf
    return value


def _xtvix(design: Design, parts: _Groupwise) -> np.ndarray:
    """X'(I + ZΛΛ'Z')⁻¹X, by Woodbury over the groups."""
    return design.X.T @ design.X - np.einsum("gia,gij,gjb->ab", parts.LtZtX, parts.M_inv, parts.LtZtX)


# ------------------------------------------------------------------------------------------- record


def _to_record(
    design: Design, layout: _Layout, best: _Run, runs: list[_Run], *, name: str, formula: str,
    method: Literal["ML", "REML"], n_params: int, began: float,
) -> Fit:
    assert best.estimates is not None
    estimates = best.estimates
    parts = _groupwise(design, estimates)
    sigma2 = estimates.sigma2
    vcov = sigma2 * np.linalg.inv(_xtvix(design, parts))
    # Conditional modes given β and their conditional covariance σ² Λ M_g⁻¹ Λ' (lme4's condVar).
    modes = np.einsum("ij,gjk,gk->gi", parts.lam, parts.M_inv, parts.LtZtr)
    cond_var = sigma2 * np.einsum("ij,gjk,lk->gil", parts.lam, parts.M_inv, parts.lam)
    cond_sd = np.sqrt(np.clip(np.diagonal(cond_var, axis1=1, axis2=2), 0.0, None))
    fitted = design.X @ estimates.beta + np.sum(design.Z * modes[design.codes], axis=1)
    residual_sd = math.sqrt(sigma2)
    components, correlations = _variance_components(design, estimates)
    singular = is_singular(design, estimates)
    loglik = best.attempt.loglik
    terms = [term for block in design.blocks for term in block.terms]
    G, q = modes.shape
    ranef = pd.DataFrame({
        "group": np.repeat(np.array([design.group], dtype=object), G * q),
        "level": np.repeat(design.levels.astype(object), q),
        "term": np.tile(np.array(terms, dtype=object), G),
        "estimate": modes.reshape(-1),
        "cond_sd": cond_sd.reshape(-1),
    })
    return Fit(
        name=name,
        formula=formula,
        method=method,
        engine=ENGINE,
        converged=True,
        singular=singular,
        message=_summary(best, runs),
        n_obs=design.n_obs,
        n_subjects=design.n_groups,
        n_params=n_params,
        loglik=loglik,
        reml_criterion=-2.0 * loglik if method == "REML" else None,
        fixed_effects=_fixed_effects(design, estimates.beta, vcov),
        vcov=np.asarray(vcov, dtype=float),
        random_effects=components,
        correlations=correlations,
        residual_sd=residual_sd,
        ranef=ranef,
        fitted=fitted,
        residuals=design.y - fitted,
        optimizer=best.attempt.optimizer,
        attempts=tuple(run.attempt for run in runs),
        gradient_max=best.gradient_max,
        iterations=best.attempt.iterations,
        seconds=time.perf_counter() - began,
    )


def is_singular(design: Design, estimates: _Estimates) -> bool:
    """A random-effect SD below SINGULAR_TOL × residual SD, or a correlation beyond ±CORRELATION_TOL."""
    components, correlations = _variance_components(design, estimates)
    residual_sd = math.sqrt(estimates.sigma2)
    return any(c.sd < SINGULAR_TOL * residual_sd for c in components) or any(
        not math.isfinite(c.corr) or abs(c.corr) > CORRELATION_TOL for c in correlations
    )


def _summary(best: _Run, runs: list[_Run]) -> str:
    """Which optimizer won and how far short each other run stopped."""
    shortfalls = []
    for run in runs:
        if run is best:
            continue
        a = run.attempt
        if math.isfinite(a.loglik):
            tag = "" if run.usable else " (rejected)"
            shortfalls.append(f"{a.optimizer} {best.attempt.loglik - a.loglik:.4g}{tag}")
        else:
            shortfalls.append(f"{a.optimizer} failed")
    return f"best: {best.attempt.optimizer} of {len(runs)} runs; short of it by: {', '.join(shortfalls)}"


def _variance_components(
    design: Design, estimates: _Estimates,
) -> tuple[tuple[VarianceComponent, ...], tuple[Correlation, ...]]:
    components: list[VarianceComponent] = []
    correlations: list[Correlation] = []
    for block, relative in zip(design.blocks, estimates.relative):
        cov = estimates.sigma2 * relative
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        components.extend(VarianceComponent(group=block.group, term=t, sd=float(s)) for t, s in zip(block.terms, sd))
        for j in range(len(block.terms)):
            for i in range(j + 1, len(block.terms)):
                denominator = sd[i] * sd[j]
                corr = float(cov[i, j] / denominator) if denominator > 0 else math.nan
                correlations.append(Correlation(group=block.group, term1=block.terms[j], term2=block.terms[i], corr=corr))
    return tuple(components), tuple(correlations)


def _fixed_effects(design: Design, beta: np.ndarray, vcov: np.ndarray) -> tuple[FixedEffect, ...]:
    return wald_fixed_effects(design.fixed_names, beta, vcov)
