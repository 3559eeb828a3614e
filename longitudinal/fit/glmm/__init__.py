"""Generalized linear mixed models as lme4's ``glmer`` fits them: binomial (logit) and Poisson (log) outcomes.

``fit_glmm(design, family=, nagq=)`` returns the same ``EngineResult`` as ``fit.lmm.fit_lmm``: ML only
(``reml=False``), σ = 1, θ in lme4's layout, ``deviance`` = −2 × glmer's logLik, vcov(β) from the
finite-difference Hessian over (θ, β) as glmer's default. The parameter count (fixed effects + θ, no residual
variance) is the caller's.

Layout: ``families`` (μ, working weights and log-density per row), ``onefactor`` (the Laplace and adaptive
Gauss–Hermite deviance for one grouping factor, every subject batched), ``multifactor`` (nested or crossed
factors on a sparse factorization), ``quadrature`` (lme4's ``GHrule``), ``separation`` (the GLM start and
the check for an infinite β), ``optimizer`` (BOBYQA, lme4's derivatives and ``checkConv``), ``problem``
(what the estimation asks of an engine) and ``fitting`` (glmer's two stages and the estimates).

Units: the fit runs on the design with centred and scaled continuous columns of X and Z
(``fit.scaling.standardize``; the outcome is left as it is: it is 0/1 or a count), X's columns then made
orthonormal, and every estimate is carried back exactly (``fit.lmm.restore_units``); the likelihood, and
its Laplace and quadrature approximations, are invariant to those maps, so a time in epoch seconds fits as a
time in days.

Conventions of glmer kept here, and where this engine differs:
- log p(y | μ) is the full density (Poisson's −log y! included), as glmer's Laplace logLik. With nAGQ > 1
  glmer's deviance sums deviance residuals instead, so its Poisson logLik then lacks Σ log p(y_i | μ = y_i)
  (lme4's "another scale"); here the quadrature's log-likelihood stays on the Laplace scale (the binomial
  scales agree for 0/1 data).
- nAGQ > 1 only for one grouping factor with one scalar random effect (glmer's rule); else ``ConfigError``.
- PIRLS runs to rounding error (lme4: a relative change of pdev below 1e-7, with log|L|² from the weights
  before the last step), so the deviance is the Laplace approximation itself: glmer's default logLik at
  its own estimates is lower by 0.005 on 1,500 binary rows, 0.35 on 100,000, and its estimates and standard
  errors differ accordingly (1-2 % in the SEs); with ``glmerControl(tolPwrss = 1e-12)`` glmer agrees, and
  so does glmmTMB.
- Stage 2 is BOBYQA (lme4 1.1's default is Nelder–Mead) in coordinates scaled by β's standard errors, and
  a Newton step with the finite-difference Hessian finishes its optimum: the optimum reached is glmer's
  or higher.
- Separated data (an infinite β) are refused (``FitFailure`` naming the terms) where glmer returns huge
  estimates with warnings; so are constant outcomes and too few groups, as glmer's checks.
Missing values are not handled here: validation removed them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from longitudinal.errors import ConfigError
from longitudinal.fit.failure import FitFailure
from longitudinal.fit.glmm.families import Family, family_named
from longitudinal.fit.glmm.fitting import fit_standardized, start_beta
from longitudinal.fit.glmm.multifactor import SparseLaplace
from longitudinal.fit.glmm.onefactor import OneFactorLaplace, compress_subjects
from longitudinal.fit.glmm.problem import LaplaceProblem
from longitudinal.fit.glmm.quadrature import MAX_POINTS, gauss_hermite
from longitudinal.fit.lmm import restore_units
from longitudinal.fit.scaling import Standardization, standardize
from longitudinal.fit.theta import layout_theta
from longitudinal.model.design import Design
from longitudinal.records import EngineResult

__all__ = ["fit_glmm", "glmm_deviance"]


def fit_glmm(design: Design, *, family: str, nagq: int) -> EngineResult:
    """Fit the GLMM of ``design`` (``family`` "binomial" or "poisson", canonical link) by maximum likelihood
    with glmer's Laplace approximation (``nagq`` = 1) or adaptive Gauss–Hermite quadrature with ``nagq``
    points (one grouping factor with one scalar random effect only).

    Raises ``ConfigError`` for an unknown family or an nAGQ the model cannot take, and ``FitFailure`` when
    the model cannot be fitted to these data: an outcome outside the family, a constant outcome, too few
    groups or observations for the random effects, separated data (an infinite fixed effect), or PIRLS
    failing everywhere.
    """
    mean = _family(family)
    _check_nagq(design, nagq)
    mean.check(design.y)
    _check_response(design)
    _check_identifiable(design)
    standardized, standardization = _standardize(design)
    layout = layout_theta(tuple(len(block.terms) for block in design.blocks))
    problem: LaplaceProblem
    rule = gauss_hermite(nagq) if nagq > 1 else None
    names, fixed_map = design.fixed_names, standardization.fixed_map
    if design.single_factor:
        rows = compress_subjects(standardized, mean)
        beta = start_beta(rows.Xt.T, rows.y, rows.row_counts, mean, names, fixed_map)
        problem = OneFactorLaplace(standardized, rows, layout, mean, rule, beta)
    else:
        beta = start_beta(standardized.X, design.y, np.ones(design.n_obs), mean, names, fixed_map)
        problem = SparseLaplace(standardized, layout, mean, beta)
    result = fit_standardized(problem, layout, nagq=nagq, ranef_map=standardization.ranef_map, y=design.y,
                              family=mean)
    return restore_units(result, design, standardization)


def glmm_deviance(design: Design, theta: np.ndarray, beta: np.ndarray, *, family: str, nagq: int = 1) -> float:
    """−2 × glmer's log-likelihood of ``design`` at (θ, β): the Laplace deviance (``nagq`` = 1) or the adaptive
    Gauss–Hermite one, with the modes by PIRLS; ``inf`` where PIRLS fails. On the design as given (no
    standardization): θ and β in its units, as ``fit_glmm`` reports them."""
    mean = _family(family)
    _check_nagq(design, nagq)
    layout = layout_theta(tuple(len(block.terms) for block in design.blocks))
    params = np.concatenate([np.asarray(theta, dtype=float), np.asarray(beta, dtype=float)])
    if params.shape != (layout.size + design.X.shape[1],):
        raise ValueError(f"theta and beta have {params.shape[0]} values; this model has {layout.size} covariance "
                         f"parameters and {design.X.shape[1]} fixed effects")
    problem: LaplaceProblem
    if design.single_factor:
        rule = gauss_hermite(nagq) if nagq > 1 else None
        problem = OneFactorLaplace(design, compress_subjects(design, mean), layout, mean, rule, params[layout.size:])
    else:
        problem = SparseLaplace(design, layout, mean, params[layout.size:])
    return problem.deviance(params)


def _standardize(design: Design) -> tuple[Design, Standardization]:
    """The design with standardized X and Z (``fit.scaling.standardize``; the outcome, a 0/1 or a count, as it
    is), then X's columns made orthonormal (X' = X A with X'ᵀX' = n I, from a QR factorization).

    β is optimized, not profiled out as in a linear mixed model, so its coordinates matter: columns that are
    nearly collinear after centring (t in epoch seconds next to t:arm, whose centred values are ≈ arm × 1.7e9)
    made BOBYQA take thousands of evaluations. In orthonormal coordinates every β' moves η by the same amount,
    BOBYQA's steps and lme4's finite differences are equally good in each, and A carries β, vcov(β) and a
    separating direction back exactly (β = A β').
    """
    standardized, standardization = standardize(design)
    X = standardized.X
    n = max(design.n_obs, 1)
    R = np.linalg.qr(X, mode="r") / np.sqrt(n)
    R = R * np.where(np.diagonal(R) < 0.0, -1.0, 1.0)[:, None]  # a positive diagonal: A keeps each column's sign
    orthonormal = np.linalg.solve(R.T, np.eye(R.shape[0])).T  # R⁻¹
    return (
        dataclasses.replace(standardized, y=design.y, X=np.ascontiguousarray(X @ orthonormal)),
        dataclasses.replace(standardization, y_shift=0.0, y_scale=1.0,
                            fixed_map=standardization.fixed_map @ orthonormal),
    )


def _family(name: str) -> Family:
    try:
        return family_named(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_nagq(design: Design, nagq: int) -> None:
    """glmer's rule: nAGQ > 1 needs one grouping factor with one scalar random-effects term."""
    if isinstance(nagq, bool) or not isinstance(nagq, (int, np.integer)) or not 1 <= nagq <= MAX_POINTS:
        raise ConfigError(f"nagq must be an integer from 1 (Laplace) to {MAX_POINTS}; got {nagq!r}")
    if nagq > 1 and (len(design.blocks) != 1 or len(design.blocks[0].terms) != 1):
        bars = " + ".join(f"({' + '.join(b.terms)} | {b.group})" for b in design.blocks)
        raise ConfigError(
            f"nagq = {nagq} (adaptive Gauss-Hermite quadrature) needs a single scalar random effect, such as "
            f"(1 | id); this model has {bars}; use nagq = 1 (Laplace), as glmer requires"
        )


def _check_response(design: Design) -> None:
    """glmer's ``check.response.not.const``: a constant outcome cannot be fitted."""
    y = design.y
    if y.shape[0] and np.all(y == y[0]):
        raise FitFailure(f"the outcome is constant (every row is {y[0]:g}): there is nothing to model "
                         "(glmer: 'Response is constant')")


def _check_identifiable(design: Design) -> None:
    """glmer's checks of the grouping factors (``glmerControl``: ``check.nlev.gtr.1``, and
    ``check.nobs.vs.nlev``/``check.nobs.vs.nRE`` with observation-level effects allowed, as glmer allows them)."""
    n = design.n_obs
    for group in design.groups:
        G = design.levels_of(group)
        if G < 2:
            raise FitFailure(f"grouping factor {group!r} has {G} level; random effects need at least 2 groups")
        if G > n:
            raise FitFailure(f"the number of levels of {group!r} ({G}) exceeds the number of observations ({n})")
    for block in design.blocks:
        effects = len(block.terms) * block.n_levels
        if effects > n:
            bar = f"({' + '.join(block.terms)} | {block.group})"
            raise FitFailure(
                f"the number of random effects ({effects}) for {bar} exceeds the number of observations ({n}): "
                "they are not identifiable; use fewer random-effect terms"
            )
