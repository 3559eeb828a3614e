"""Fit one candidate model to the validated visits and return the project's ``Fit`` record.

A formula with a covariance-structure term (``us(visit | id)``, ``(1 | id) + ar1(t | id)``) goes to
``longitudinal.fit.structured`` (the MMRM engine of ``longitudinal.fit.covariance``). Otherwise the default
engine is ``longitudinal.fit.lmm`` (lme4's profiled-deviance formulation, bounded BOBYQA, lme4's
convergence and singularity checks); ``engine="statsmodels"`` uses statsmodels' MixedLM instead. Either
way the result is the same record, so selection and reporting do not know which engine ran.

Conventions (lme4's): ``loglik`` is the maximized log-likelihood for ML and the REML log-likelihood for REML
(``reml_criterion`` = −2 × that); ``n_params`` = fixed effects + covariance parameters θ + 1 (residual
variance); fixed effects carry Wald standard errors, 95% intervals (± 1.959964 SE) and two-sided normal
p-values. Missing values are not handled here: validation removed every row with a missing value in a
column any candidate uses, so all candidates are fitted on the same rows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from longitudinal.config import FAMILIES
from longitudinal.errors import ConfigError
from longitudinal.fit.failure import FitFailure
from longitudinal.fit.lmm import fit_lmm
from longitudinal.fit.structured import fit_structured
from longitudinal.fit.theta import count_parameters, layout_theta
from longitudinal.fit.wald import wald_fixed_effects
from longitudinal.model.design import Design, build_design
from longitudinal.model.formula import ModelFormula, parse_formula
from longitudinal.records import Correlation, EngineResult, Fit, FixedEffect, VarianceComponent, failed_fit

ENGINES = ("lme4-style", "statsmodels")


def fit_candidate(
    visits: pd.DataFrame, name: str, formula: str, *, method: Literal["ML", "REML"] = "ML",
    engine: str = "lme4-style", family: str = "gaussian", nagq: int = 1, start: Sequence[float] | None = None,
) -> Fit:
    """Fit candidate ``name`` (``formula`` in lme4 notation) to ``visits`` by ML or REML.

    Numerical failures (zero residual variance, too few groups or rows for the random effects, a
    factorization that breaks down) come back as a failed ``Fit`` whose ``message`` says why; a bad
    formula raises ``FormulaError`` and programming errors raise as usual. Fixed-effect columns that are
    linear combinations of the others are dropped, as lme4 does: the record lists them in ``dropped_terms``
    and its message starts with lme4's note naming them; ``n_params`` counts the kept columns.

    ``family`` "binomial" (0/1 outcome, logit link) or "poisson" (counts, log link) fits a generalized
    linear mixed model as glmer does (``longitudinal.fit.glmm``: Laplace, or adaptive Gauss–Hermite
    quadrature with ``nagq`` > 1 points for one scalar random effect); such a model has no REML, so
    ``method`` must be "ML".

    ``start``: θ of a fit of the same formula (``Fit.theta``, the data's units) for the lme4-style linear
    mixed model's optimizer to start from, as a REML refit starts from its ML fit: the same optimum in fewer
    evaluations (``fit.optimize.minimize_deviance``). Ignored where it does not fit the design (another
    number of θ, not finite) and by the other engines; None: lme4's start.
    """
    if method not in ("ML", "REML"):
        raise ConfigError(f"candidate {name!r}: method must be 'ML' or 'REML', got {method!r}")
    if engine not in ENGINES:
        raise ConfigError(f"candidate {name!r}: unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if family not in FAMILIES:
        raise ConfigError(f"candidate {name!r}: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    began = time.perf_counter()
    parsed = parse_formula(formula, name=name)
    design = build_design(visits, parsed)
    if family != "gaussian":
        return _with_design_notes(_fit_generalized(
            design, parsed, name=name, formula=formula, method=method, engine=engine, family=family, nagq=nagq,
            began=began,
        ), design)
    if parsed.covariance is not None:
        if engine == "statsmodels":
            raise ConfigError(
                f"candidate {name!r}: the statsmodels engine has no residual covariance structures "
                f"({parsed.covariance.text}); use engine 'lme4-style'"
            )
        return _with_design_notes(fit_structured(
            visits, design, parsed.covariance, name=name, formula=formula, method=method), design)
    if engine == "statsmodels":
        from longitudinal.fit.statsmodels_backend import fit_statsmodels  # statsmodels is slow to import; only when asked

        fit: Fit = fit_statsmodels(design, name=name, formula=formula, method=method)
        return _with_design_notes(fit, design)
    n_params = count_parameters(design)
    try:
        result = fit_lmm(design, reml=method == "REML", start=_usable_start(start, design))
    except FitFailure as failure:
        return _with_design_notes(failed_fit(
            name, formula, method, "lme4-style", f"candidate {name!r}: {failure}", n_obs=design.n_obs,
            n_subjects=design.n_groups, n_params=n_params, attempts=failure.attempts,
            seconds=time.perf_counter() - began,
        ), design)
    except np.linalg.LinAlgError as exc:
        return _with_design_notes(failed_fit(
            name, formula, method, "lme4-style", f"candidate {name!r}: linear algebra failed ({exc})",
            n_obs=design.n_obs, n_subjects=design.n_groups, n_params=n_params,
            seconds=time.perf_counter() - began,
        ), design)
    return _with_design_notes(
        _to_record(design, result, name=name, formula=formula, method=method, began=began), design,
    )


def _fit_generalized(
    design: Design, parsed: ModelFormula, *, name: str, formula: str, method: str, engine: str, family: str,
    nagq: int, began: float,
) -> Fit:
    """A binomial or Poisson candidate by ``longitudinal.fit.glmm`` (glmer's formulation), as a ``Fit``."""
    if engine == "statsmodels":
        raise ConfigError(f"candidate {name!r}: the statsmodels engine fits Gaussian models only; family "
                          f"{family!r} needs engine 'lme4-style'")
    if method != "ML":
        raise ConfigError(f"candidate {name!r}: a {family} mixed model has no REML (glmer fits by maximum "
                          "likelihood); use method 'ML'")
    if parsed.covariance is not None:
        raise ConfigError(f"candidate {name!r}: covariance structures ({parsed.covariance.text}) are for "
                          f"Gaussian outcomes; a {family} model takes random effects only")
    from longitudinal.fit.glmm import fit_glmm  # the GLMM engine, only when a study asks for it

    n_params = count_parameters(design) - 1  # no residual variance
    try:
        result = fit_glmm(design, family=family, nagq=nagq)
    except FitFailure as failure:
        return failed_fit(name, formula, "ML", "lme4-style", f"candidate {name!r}: {failure}", n_obs=design.n_obs,
                          n_subjects=design.n_groups, n_params=n_params, attempts=failure.attempts,
                          seconds=time.perf_counter() - began)
    fit = _to_record(design, result, name=name, formula=formula, method="ML", began=began)
    return dataclasses.replace(fit, n_params=n_params, residual_sd=math.nan, reml_criterion=None, family=family,
                               nagq=nagq, optimizer=result.attempts[-1].optimizer if result.attempts else "")


def _usable_start(start: Sequence[float] | None, design: Design) -> np.ndarray | None:
    """``start`` as θ for ``design``'s optimizer, or None where it has another number of θ or is not finite."""
    if start is None:
        return None
    theta = np.asarray(start, dtype=float)
    size = layout_theta(tuple(len(block.terms) for block in design.blocks)).size
    return theta if theta.shape == (size,) and bool(np.all(np.isfinite(theta))) else None


def rank_deficiency_note(dropped: Sequence[str]) -> str | None:
    """lme4's message for dropped collinear fixed-effect columns, naming them; None when none was dropped."""
    if not dropped:
        return None
    k = len(dropped)
    what = "1 column / coefficient" if k == 1 else f"{k} columns / coefficients"
    return f"fixed-effect model matrix is rank deficient so dropping {what} ({', '.join(map(repr, dropped))})"


def _with_design_notes(fit: Fit, design: Design) -> Fit:
    """``fit`` with the design's dropped columns recorded and lme4's note on them first in the message
    (a failed fit keeps its reason first)."""
    note = rank_deficiency_note(design.dropped)
    if note is None:
        return fit
    parts = [note, fit.message] if fit.usable else [fit.message, note]
    return dataclasses.replace(fit, dropped_terms=design.dropped, message="; ".join(p for p in parts if p))


def _to_record(
    design: Design, result: EngineResult, *, name: str, formula: str, method: Literal["ML", "REML"],
    began: float,
) -> Fit:
    return Fit(
        name=name,
        formula=formula,
        method=method,
        engine="lme4-style",
        converged=result.converged,
        singular=result.singular,
        message="; ".join(result.messages),
        n_obs=design.n_obs,
        n_subjects=design.n_groups,
        n_params=count_parameters(design),
        loglik=result.loglik,
        reml_criterion=result.deviance if result.reml else None,
        fixed_effects=_fixed_effects(design, result),
        random_effects=tuple(
            VarianceComponent(group=block.group, term=term, sd=float(math.sqrt(cov[i, i])))
            for block, cov in zip(design.blocks, result.covariances)
            for i, term in enumerate(block.terms)
        ),
        correlations=_correlations(design, result),
        residual_sd=result.sigma,
        ranef=_ranef_frame(design, result),
        fitted=result.fitted,
        residuals=result.residuals,
        optimizer="bobyqa",
        attempts=result.attempts,
        gradient_max=result.gradient_max,
        iterations=result.evaluations,
        seconds=time.perf_counter() - began,
        theta=np.asarray(result.theta, dtype=float),
        vcov=np.asarray(result.vcov, dtype=float),
    )


def _fixed_effects(design: Design, result: EngineResult) -> tuple[FixedEffect, ...]:
    """Wald inference from vcov(β) = σ² (RX'RX)⁻¹, as lme4's summary (normal reference distribution)."""
    return wald_fixed_effects(design.fixed_names, result.beta, result.vcov)


def _correlations(design: Design, result: EngineResult) -> tuple[Correlation, ...]:
    """Correlations within each bar of two or more terms (NaN where a variance is zero)."""
    out = []
    for block, cov in zip(design.blocks, result.covariances):
        sd = np.sqrt(np.diag(cov))
        for j in range(len(block.terms)):
            for i in range(j + 1, len(block.terms)):
                denominator = sd[i] * sd[j]
                corr = float(cov[i, j] / denominator) if denominator > 0 else math.nan
                out.append(Correlation(group=block.group, term1=block.terms[j], term2=block.terms[i], corr=corr))
    return tuple(out)


def _ranef_frame(design: Design, result: EngineResult) -> pd.DataFrame:
    """Conditional modes in long form: one row per (group, level, term); factor by factor in formula order,
    within a factor level by level in the design's order (``level`` of ``a:b`` is lme4's "a1:b1" label).

    ``group``, ``level`` and ``term`` are categoricals with categories sorted as text (sorting by them
    orders as text does): each label is stored once, not once per row, which keeps the record quick to
    build and small to hold and to pickle (the fit cache) with hundreds of thousands of levels.
    """
    factors = result.ranef
    group_at, term_at, level_at = [], [], []
    terms_before = levels_before = 0
    for index, factor in enumerate(factors):
        G, q = factor.modes.shape
        group_at.append(np.full(G * q, index))
        term_at.append(np.tile(np.arange(terms_before, terms_before + q), G))
        level_at.append(np.repeat(np.arange(levels_before, levels_before + G), q))
        terms_before += q
        levels_before += G
    return pd.DataFrame({
        "group": _categorical(np.concatenate(group_at), [factor.group for factor in factors]),
        "level": _categorical(np.concatenate(level_at), np.concatenate([factor.levels for factor in factors])),
        "term": _categorical(np.concatenate(term_at), [term for factor in factors for term in factor.terms]),
        "estimate": np.concatenate([factor.modes.reshape(-1) for factor in factors]),
        "cond_sd": np.concatenate([factor.cond_sd.reshape(-1) for factor in factors]),
    })


def _categorical(positions: np.ndarray, labels: np.ndarray | list[str]) -> pd.Categorical:
    """``labels[positions]`` as a categorical whose categories are the distinct labels sorted as text."""
    text = pd.Index(np.asarray(labels, dtype=object), dtype="str")
    if text.is_monotonic_increasing and text.is_unique:  # a subject factor's levels: already sorted
        return pd.Categorical.from_codes(positions, categories=text)
    codes, categories = pd.factorize(text, sort=True)
    return pd.Categorical.from_codes(codes[positions], categories=categories)
