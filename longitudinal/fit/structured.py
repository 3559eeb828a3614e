"""Fit a candidate with a covariance-structure term (MMRM, or random effects with serial correlation).

``fit_candidate`` sends here every formula with a term such as ``us(visit | id)`` or ``(1 | id) + ar1(t | id)``.
The visits are the sorted distinct values of the term's visit column (numbers sorted as numbers, text as
text): a visit structure sees each row's position among them (``ar1`` assumes equally spaced visits in that
order, as mmrm and nlme's ``corAR1`` over an integer index do), ``sp_exp`` the times themselves. The
likelihood is ``fit.covariance``'s (every observed row, valid under missing at random) and the record the
same ``Fit`` as an lme4-style candidate's: ``n_params`` = fixed effects + random-effect covariance
parameters + the structure's parameters (nlme's and mmrm's logLik df), so AIC and BIC compare across both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from longitudinal.errors import ConfigError
from longitudinal.fit.covariance import CovarianceFit, CovarianceStructure, fit_covariance, group_by_pattern
from longitudinal.fit.covariance.structures import describe, named_parameters
from longitudinal.fit.failure import FitFailure
from longitudinal.fit.wald import wald_fixed_effects
from longitudinal.model.design import Design
from longitudinal.model.formula import CovarianceTerm
from longitudinal.records import Correlation, Fit, ResidualCovariance, VarianceComponent, failed_fit

#: Structures with a variance per visit (no common σ).
HETEROGENEOUS = ("us", "csh", "ar1h", "toeph", "adh")
#: sp_exp's covariance is shown at the distinct times when there are at most this many, else on a grid.
MAX_SHOWN_TIMES = 12


def visit_positions(values: pd.Series) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each row's position among the sorted distinct visits, and the visits as labels.

    Numbers sort as numbers (a numeric time column is read as discrete visits); text sorts as text,
    except that text which is all numbers (``"1"``, ``"2"``, ``"10"``) sorts as the numbers.
    """
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.to_numpy(dtype=float)
        distinct = np.unique(numbers)
        return np.searchsorted(distinct, numbers), tuple(_format_time(v) for v in distinct)
    text = values.astype(str)
    distinct_text = pd.unique(text)
    as_numbers = pd.to_numeric(pd.Series(distinct_text), errors="coerce")
    if as_numbers.notna().all():
        ordered = [distinct_text[i] for i in np.argsort(as_numbers.to_numpy(), kind="stable")]
    else:
        ordered = sorted(distinct_text)
    position = {label: i for i, label in enumerate(ordered)}
    return text.map(position).to_numpy(dtype=int), tuple(ordered)


def fit_structured(
    visits: pd.DataFrame, design: Design, term: CovarianceTerm, *, name: str, formula: str,
    method: Literal["ML", "REML"],
) -> Fit:
    """Fit ``design`` with the residual structure ``term`` (and the design's random effects, if any).

    A structure that cannot be fitted to these data (fewer than two visits, a likelihood that cannot be
    evaluated at the start) comes back as a failed ``Fit`` saying why.
    """
    began = time.perf_counter()
    Z = design.blocks[0].Z if design.blocks else None
    column = visits[term.visit]
    structure_name = term.structure
    if structure_name == "sp_exp":
        if not pd.api.types.is_numeric_dtype(column):
            raise ConfigError(f"candidate {name!r}: {term.text} needs numeric times in {term.visit!r}")
        coords = column.to_numpy(dtype=float)
        labels: tuple[str, ...] = ()
        n_visits = 2
    else:
        coords, labels = visit_positions(column)
        n_visits = len(labels)
    n_random = 0 if Z is None else Z.shape[1]
    try:
        structure = CovarianceStructure(structure_name, max(n_visits, 2) if structure_name == "sp_exp" else n_visits)
    except ConfigError as exc:
        return failed_fit(
            name, formula, method, "lme4-style", f"candidate {name!r}: {exc}", n_obs=design.n_obs,
            n_subjects=design.n_groups, n_params=design.X.shape[1] + n_random * (n_random + 1) // 2,
            seconds=time.perf_counter() - began,
        )
    n_params = design.X.shape[1] + structure.n_params + n_random * (n_random + 1) // 2
    # the subject's codes from the design (a subject written as columns joined by ':' is one factor there)
    groups = group_by_pattern(design.y, design.X, design.codes, coords, Z)
    try:
        result = fit_covariance(groups, structure, reml=method == "REML")
    except (FitFailure, np.linalg.LinAlgError) as exc:
        return failed_fit(
            name, formula, method, "lme4-style", f"candidate {name!r}: {exc}", n_obs=design.n_obs,
            n_subjects=design.n_groups, n_params=n_params, attempts=getattr(exc, "attempts", ()),
            seconds=time.perf_counter() - began,
        )
    shown = _shown_coordinates(coords, labels, spatial=structure.spatial)
    terms = design.blocks[0].terms if design.blocks else ()
    return Fit(
        name=name,
        formula=formula,
        method=method,
        engine="lme4-style",
        converged=result.converged,
        singular=result.singular,
        message=_messages(result, term, terms),
        n_obs=design.n_obs,
        n_subjects=result.n_subjects,
        n_params=result.n_params,
        loglik=result.loglik,
        reml_criterion=-2.0 * result.loglik if result.reml else None,
        fixed_effects=wald_fixed_effects(design.fixed_names, result.beta, result.vcov),
        vcov=np.asarray(result.vcov, dtype=float),
        random_effects=tuple(
            VarianceComponent(group=term.subject, term=t, sd=float(math.sqrt(max(result.random_covariance[i, i], 0.0))))
            for i, t in enumerate(terms)
        ),
        correlations=_correlations(term.subject, terms, result.random_covariance),
        residual_sd=result.sigma,
        ranef=_ranef_frame(term.subject, terms, result, design.levels),
        fitted=result.fitted,
        residuals=result.residuals,
        optimizer=result.optimizer,
        attempts=result.attempts,
        gradient_max=result.gradient_max,
        iterations=result.evaluations,
        seconds=time.perf_counter() - began,
        covariance=ResidualCovariance(
            structure=structure_name,
            term=term.text,
            description=describe(structure_name),
            visit=term.visit,
            labels=shown[1],
            matrix=result.residual_covariance(shown[0] if structure.spatial else None),
            n_params=structure.n_params,
            parameters=_labelled(named_parameters(structure, _structure_theta(result, structure)), labels, term.visit),
            heterogeneous=structure_name in HETEROGENEOUS,
            spatial=structure.spatial,
        ),
        normalized_residuals=result.normalized_residuals,
    )


def _structure_theta(result: CovarianceFit, structure: CovarianceStructure) -> np.ndarray:
    """The structure's own parameters: the first ``structure.n_params`` entries of θ."""
    return np.asarray(result.theta[:structure.n_params], dtype=float)


def _shown_coordinates(coords: np.ndarray, labels: tuple[str, ...], *, spatial: bool) -> tuple[np.ndarray, tuple[str, ...]]:
    """Where the report shows Σ: every visit; for sp_exp the distinct times when few, else a grid of six."""
    if not spatial:
        return np.arange(len(labels)), labels
    distinct = np.unique(coords)
    if distinct.size > MAX_SHOWN_TIMES:
        distinct = np.unique(np.array([float(f"{v:.3g}") for v in np.linspace(distinct[0], distinct[-1], 6)]))
    return distinct, tuple(_format_time(v) for v in distinct)


def _format_time(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _labelled(
    parameters: Sequence[tuple[str, float]], labels: Sequence[str], visit: str,
) -> tuple[tuple[str, float], ...]:
    """Parameter names with visit positions (``sd[2]``, ``corr[3,1]``) replaced by the visits, named by their
    column (``sd[week 4]``, ``corr[week 8, week 4]``)."""
    out = []
    for name, value in parameters:
        if "[" in name and labels and not name.startswith("rho[lag"):
            head, inside = name[:-1].split("[", 1)
            try:
                shown = ", ".join(f"{visit} {labels[int(part) - 1]}" for part in inside.split(","))
            except (ValueError, IndexError):
                shown = inside
            name = f"{head}[{shown}]"
        out.append((name, float(value)))
    return tuple(out)


def _messages(result: CovarianceFit, term: CovarianceTerm, terms: Sequence[str]) -> str:
    notes = []
    if result.singular and terms:
        notes.append(f"boundary (singular) fit: a random-effect variance of ({' + '.join(terms)} | {term.subject}) "
                     "is estimated as zero next to the residual structure")
    if not result.converged:
        notes.append(f"failed to converge: max|grad| = {result.gradient_max:.3g} ({result.message})")
    return "; ".join(notes)


def _correlations(group: str, terms: Sequence[str], G: np.ndarray) -> tuple[Correlation, ...]:
    out = []
    sd = np.sqrt(np.maximum(np.diag(G), 0.0)) if G.size else np.empty(0)
    for j in range(len(terms)):
        for i in range(j + 1, len(terms)):
            denominator = sd[i] * sd[j]
            corr = float(G[i, j] / denominator) if denominator > 0 else math.nan
            out.append(Correlation(group=group, term1=terms[j], term2=terms[i], corr=corr))
    return tuple(out)


def _ranef_frame(group: str, terms: Sequence[str], result: CovarianceFit, levels: np.ndarray) -> pd.DataFrame:
    """Conditional modes in the long form of ``Fit.ranef`` (one row per subject and term); the engine's
    subjects are the design's codes, ``levels`` their labels (sorted, distinct: the categories as they are)."""
    if not terms:
        return pd.DataFrame(columns=["group", "level", "term", "estimate", "cond_sd"])
    codes = np.asarray(result.subjects, dtype=int)
    q = len(terms)
    term_categories = sorted(set(terms))
    return pd.DataFrame({
        "group": pd.Categorical.from_codes(np.zeros(codes.size * q, dtype=int), categories=[group]),
        "level": pd.Categorical.from_codes(np.repeat(codes, q), categories=pd.Index(np.asarray(levels).astype(str))),
        "term": pd.Categorical.from_codes(np.tile([term_categories.index(t) for t in terms], codes.size),
                                          categories=term_categories),
        "estimate": np.asarray(result.modes, dtype=float).reshape(-1),
        "cond_sd": np.asarray(result.cond_sd, dtype=float).reshape(-1),
    })
