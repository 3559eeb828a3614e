"""Estimated marginal means and treatment contrasts of the reported (REML) model, as emmeans computes them.

The reference grid is emmeans' default one (``ref_grid``): the levels of ``estimates.by`` × the values of
``estimates.at``; every other numeric column the fixed effects read is held at its mean over the rows the
model was fitted on, and every other factor is averaged over its levels with equal weights (the mean of the
design rows over those levels' grid, emmeans' ``weights = "equal"``). A numeric column the model reads as
``factor(week)`` is a factor of the grid, as emmeans treats such coerced factors: ``at`` values must be
among its levels, and without ``at`` it is averaged over them like any other factor. Each grid cell's mean
is ``L β`` with ``L`` the (averaged) row of the fixed-effects matrix, built by the design machinery with the
fitted design's transforms (factor levels, poly and spline bases), so a ``poly(week, 2)`` or ``ns(age, 3)``
term is evaluated at the grid's values, not averaged column by column.

Nesting and estimability, as emmeans. A factor whose every level occurs with only one level of another grid
factor (centres within arms), or that the model has only in interactions (``arm/site``), is nested in it
(emmeans' ``.find_nests``, from the data and from the terms): it is averaged,
within each level of its nesting factor, over the levels present there, not over the full product of levels,
and a note names the nesting. L is built on the full design, the columns lme4 dropped as collinear
included; a row with |L N|² ≥ 1e-8 |L|², N a basis of the null space of the full fixed-effects matrix
(estimability's ``nonest.basis`` and ``is.estble``), depends on what the data cannot separate: its
estimate, SE, df, bounds and p-value are NaN, as emmeans' nonEst, and a note names it. Estimable rows use
the kept columns.

Contrasts are each level of ``by`` minus the reference level (the first in R's order) at each ``at``
combination: emmeans' ``contrast(emm, "trt.vs.ctrl")``. Their intervals and p-values are adjusted with
emmeans' ``dunnettx`` (its approximation to Dunnett's distribution, ``.pdunnx``/``.qdunnx``) within each
``at`` combination when it holds more than one contrast, and not adjusted ("none") when it holds one.

Standard errors and df come from a ``FixedEffectInference`` (``longitudinal.inference.ddf``), so the means
agree with the fixed-effect table: Satterthwaite's or Kenward–Roger's df per row of L, or the normal
distribution (df inf). A GLMM's means are on the response scale (emmeans' ``type = "response"``: the
inverse link of the linear predictor, the fit's own ``Family`` (``longitudinal.fit.glmm.families``), SE by
the delta method, the interval back-transformed from the link scale), its contrasts odds ratios (binomial,
logit) or rate ratios (Poisson, log): exp of the link-scale difference, SE by the delta method, interval
back-transformed, p-value of the link-scale z test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from longitudinal.config import EstimatesConfig
from longitudinal.errors import ConfigError
from longitudinal.fit.glmm.families import Family, family_named
from longitudinal.inference.ddf import LEVEL, FixedEffectInference, t_interval
from longitudinal.model.design import build_design, fixed_effects_matrix
from longitudinal.model.formula import Call, Expr, ModelFormula, Name, deparse, expression_columns, parse_formula
from longitudinal.model.transforms import FactorLevels, Transform
from longitudinal.records import Fit, MarginalEstimates

MEAN_COLUMNS = ("estimate", "se", "df", "ci_low", "ci_high")
CONTRAST_COLUMNS = ("estimate", "se", "df", "ci_low", "ci_high", "p_value", "adjustment")

#: emmeans' root-finding tolerance for the dunnettx quantile (``uniroot(..., tol = .0005)`` in ``.qdunnx``).
DUNNETTX_TOLERANCE = 0.0005
#: Above this df R's ``ptukey`` uses the studentized range of infinite df.
_PTUKEY_LARGE_DF = 25000.0
#: estimability's ``nonest.basis.svd``: singular values below this fraction of the largest span the null space.
NULL_SPACE_TOLERANCE = 5e-8
#: estimability's ``is.estble``: a row x is estimable when |N'x|² < this × |x|² (× 1 when |x|² is below it).
ESTIMABILITY_TOLERANCE = 1e-8

#: What a GLMM's means and contrasts are on the response scale, by the family's (canonical) link.
_RESPONSE_SCALES = {"logit": ("probability", "odds ratio"), "log": ("rate", "rate ratio")}


def estimate_means(
    fit: Fit, visits: pd.DataFrame, estimates: EstimatesConfig, inference: FixedEffectInference,
) -> MarginalEstimates:
    """Estimated marginal means per ``estimates.by`` level and ``estimates.at`` value, and each level against
    the reference level, from ``fit`` (the REML fit of the selected model; a GLMM's ML fit) and ``inference``
    (its fixed effects with the study's df method), ``visits`` being the rows it was fitted on.

    A model without a term in ``by`` still gets its means (equal across the levels, by construction) but no
    contrasts, which emmeans refuses to compute: a note says why. An ``at`` column the model does not read
    is kept in the tables, with a note that the means do not vary with it. A mean or contrast that is not
    estimable from the full design (see the module's docstring) is NaN, with a note naming it.
    """
    formula = parse_formula(fit.formula, name=fit.name)
    transforms = build_design(visits, formula, dropped=fit.dropped_terms).transforms
    grid = reference_grid(visits, formula, transforms, estimates)
    X, all_names = fixed_effects_matrix(grid.rows, formula, transforms=transforms)
    kept = [j for j, name in enumerate(all_names) if name not in set(fit.dropped_terms)]
    names = tuple(all_names[j] for j in kept)
    if names != inference.names:
        raise ValueError(f"the grid's columns {names} are not the fit's fixed effects {inference.names}")
    L_full = _cell_means(X, grid.cell_of_row, len(grid.cells))
    null_basis = None
    if fit.dropped_terms:
        null_basis = nonestimable_basis(fixed_effects_matrix(visits, formula, transforms=transforms)[0])
    family = None if fit.family == "gaussian" else family_named(fit.family)
    scale, ratio = ("outcome", None) if family is None else _RESPONSE_SCALES[family.link]
    estimable = is_estimable(L_full, null_basis)
    means = _means_table(grid, L_full[:, kept], estimable, inference, family)
    notes = list(grid.notes)
    if not estimable.all():
        notes.append(_nonestimable_note(grid, estimable, fit.dropped_terms))
    if estimates.by is None:
        contrasts = _empty_contrasts(grid.at_columns)
    elif not grid.by_in_model:
        contrasts = _empty_contrasts(grid.at_columns)
        notes.append(f"No contrasts: the selected model has no term in {estimates.by!r}, so the means of its "
                     "levels are equal by construction.")
    else:
        contrasts, contrast_notes = _contrasts_table(grid, L_full, kept, null_basis, inference, family)
        notes.extend(contrast_notes)
    return MarginalEstimates(by=estimates.by, at=grid.at_columns, means=means, contrasts=contrasts, scale=scale,
                             ratio=ratio, notes=tuple(notes))


def check_reference_grid(
    estimates: EstimatesConfig, formulas: Mapping[str, ModelFormula], visits: pd.DataFrame,
) -> None:
    """Refuse, before any fit, an ``estimates`` section that ``estimate_means`` would refuse for one of the
    candidate ``formulas`` (name -> parsed formula) fitted on ``visits``: an ``at`` value that is not a level of
    the candidate's ``factor(<at column>)``, ``at`` on a column the candidate uses as a category, ``by`` on a
    column it uses as a number. Raises ``ConfigError`` naming the candidate, the value and the fix.

    The grid is built from each candidate's design on ``visits`` (the same factor levels its fit will have),
    so whichever candidate is selected, its means can be computed. Columns missing from ``visits`` are
    ``check_estimates``' to report (``longitudinal.inference.reported``).
    """
    for name, formula in formulas.items():
        try:
            reference_grid(visits, formula, build_design(visits, formula).transforms, estimates)
        except ConfigError as exc:
            raise ConfigError(f"candidate {name!r}: {exc}") from exc


# ------------------------------------------------------------------------------------- the reference grid


@dataclass(frozen=True, eq=False)
class ReferenceGrid:
    """emmeans' reference grid of a model for a ``by`` × ``at`` request.

    ``cells`` has one row per mean (the ``by`` level labels, then the ``at`` values; ``at`` combinations
    slowest, levels fastest); ``rows`` the data rows whose fixed-effects rows are averaged (with equal
    weights) into each cell's L row, ``cell_of_row`` the cell of each: for each cell, the combinations of the
    averaged factors' levels, less those a nesting rules out (none left: the cell's L row is NaN). ``levels``
    are the ``by`` levels in R's order (the first is the reference); ``by_in_model`` says whether any
    fixed-effect term reads the ``by`` column. ``averaged`` maps each factor averaged over to its levels,
    ``held`` each numeric column held at its mean to that mean, ``nests`` each nested factor to the factors
    it is nested in.
    """

    cells: pd.DataFrame
    rows: pd.DataFrame
    cell_of_row: np.ndarray
    by: str | None
    levels: tuple[str, ...]
    at_columns: tuple[str, ...]
    by_in_model: bool
    averaged: Mapping[str, tuple[str, ...]]
    held: Mapping[str, float]
    nests: Mapping[str, tuple[str, ...]]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Factor:
    """A factor of the grid: its level labels (R's order) and the value each stands for in the data column."""

    labels: tuple[str, ...]
    values: tuple[object, ...]


def reference_grid(
    visits: pd.DataFrame, formula: ModelFormula, transforms: Mapping[str, Transform], estimates: EstimatesConfig,
) -> ReferenceGrid:
    """emmeans' default reference grid for ``formula`` fitted on ``visits`` (``transforms`` its design's):
    ``estimates.by`` levels × ``estimates.at`` values, other numeric columns at their mean over ``visits``,
    other factors at each of their levels (averaged later with equal weights) or, for a factor nested in
    another (``find_nests``), at each of its levels present with that factor's level.

    Raises ``ConfigError`` when an ``at`` value is not a level of a ``factor(column)`` the model uses, when
    ``at`` names a text column, or when ``by`` names a column the model uses as a number.
    """
    factors, numeric = _predictors(visits, formula, transforms)
    notes: list[str] = []
    by = estimates.by
    levels: tuple[str, ...] = ()
    by_values: tuple[object, ...] = ()
    by_in_model = by is not None and by in factors
    if by is not None:
        if by in numeric:
            raise ConfigError(f"estimates: by {by!r} is a number in the model formula {formula.text!r}; by needs a "
                              f"categorical column (or write factor({by}) in the formula)")
        factor = factors[by] if by_in_model else _data_levels(visits[by])
        levels, by_values = factor.labels, factor.values
    at_values: dict[str, tuple[object, ...]] = {}
    for column, values in estimates.at.items():
        at_values[column] = _at_values(column, values, factors, numeric, formula)
        if column not in factors and column not in numeric:
            notes.append(f"The selected model does not use {column!r}: its means are the same at every {column} given.")
    averaged = {name: factor for name, factor in factors.items() if name != by and name not in at_values}
    held = {column: float(visits[column].mean()) for column in numeric if column not in at_values}
    grid_levels = {name: (by_values if name == by else at_values.get(name, factors[name].values)) for name in factors}
    nests = find_nests(visits, grid_levels, _factor_terms(formula, factors), intercept=formula.fixed_terms.intercept)
    notes.extend(_grid_notes(estimates.at, held, averaged, nests))
    observed = {name: _observed(visits, grid_levels, name, within) for name, within in nests.items()}

    at_columns = tuple(at_values)
    combinations = list(itertools.product(*at_values.values()))
    by_pairs = list(zip(levels, by_values, strict=True)) if by is not None else [(None, None)]
    averaged_rows = list(itertools.product(*(factor.values for factor in averaged.values())))
    cells: list[dict[str, object]] = []
    rows: list[dict[str, object]] = []
    cell_of_row: list[int] = []
    for combination in combinations:
        for label, value in by_pairs:
            cells.append(({by: label} if by is not None else {}) | dict(zip(at_columns, combination, strict=True)))
            fixed = held | dict(zip(at_columns, combination, strict=True)) | ({by: value} if by is not None else {})
            for averaged_values in averaged_rows:
                row: dict[str, object] = fixed | dict(zip(averaged, averaged_values, strict=True))
                if all(tuple(row[c] for c in (name, *nests[name])) in seen for name, seen in observed.items()):
                    rows.append(row)
                    cell_of_row.append(len(cells) - 1)
    cell_columns = ([by] if by is not None else []) + list(at_columns)
    return ReferenceGrid(
        cells=pd.DataFrame(cells, columns=cell_columns),
        rows=pd.DataFrame(rows, columns=list(dict.fromkeys([*held, *at_columns, *([by] if by else []), *averaged]))),
        cell_of_row=np.array(cell_of_row, dtype=int),
        by=by,
        levels=levels,
        at_columns=at_columns,
        by_in_model=by_in_model,
        averaged={column: factor.labels for column, factor in averaged.items()},
        held=held,
        nests=nests,
        notes=tuple(notes),
    )


def find_nests(
    visits: pd.DataFrame, grid_levels: Mapping[str, Sequence[object]], terms: Sequence[frozenset[str]] = (),
    *, intercept: bool = True,
) -> dict[str, tuple[str, ...]]:
    """Which factors of the grid are nested in which, as emmeans' ``.find_nests``, among the factors with more
    than one level in the grid (``grid_levels``: factor -> its values there).

    From the data (the rows of ``visits`` whose values are all in the grid): a factor is nested in another
    when each of its levels occurs with only one level of the other (one not already found nested in it).
    From the model's ``terms`` (each the set of its variables, a factor by its column name, and
    ``intercept``): a factor without a main effect (``arm/site``, ``arm:site``) is nested in the factors its
    interactions code without contrasts (R's ``factors`` attribute: v is coded so in a term when the term
    without v is not in the model). Then the factors a nesting factor is itself nested in are added, and a
    factor nested in itself dropped.
    """
    names = [name for name, values in grid_levels.items() if len(values) > 1]
    if len(names) < 2:
        return {}
    in_grid = np.logical_and.reduce([visits[name].isin(list(grid_levels[name])).to_numpy() for name in names])
    present = visits.loc[in_grid, names]
    nests: dict[str, list[str]] = {}
    for name in names:
        excluded = {other for other, within in nests.items() if name in within}
        others = [other for other in names if other != name and other not in excluded]
        within = [other for other in others if present.groupby(name)[other].nunique().max() == 1]
        if within:
            nests[name] = within
    for name, within in _nests_from_terms(names, terms, intercept).items():
        nests[name] = list(dict.fromkeys([*nests.get(name, []), *within]))
    for name in list(nests):
        nests[name] = list(dict.fromkeys([*(f for w in nests[name] for f in nests.get(w, [])), *nests[name]]))
    return {name: tuple(within) for name, within in nests.items() if name not in within}


def _nests_from_terms(names: Sequence[str], terms: Sequence[frozenset[str]], intercept: bool) -> dict[str, list[str]]:
    """The term-based half of ``.find_nests``: each factor of ``names`` without a main effect, nested in the
    factors coded without contrasts in the terms where it is coded with them (the smallest such sets)."""
    in_model: set[frozenset[str]] = set(terms) | ({frozenset()} if intercept else set())

    def full_dummies(term: frozenset[str], variable: str) -> bool:
        return term - {variable} not in in_model

    nests: dict[str, list[str]] = {}
    for name in names:
        containing = [term for term in terms if name in term]
        if not containing or frozenset({name}) in in_model:
            continue
        coded = [term for term in containing if not full_dummies(term, name)] or containing
        groups = [frozenset(v for v in term if v in names and v != name and full_dummies(term, v)) for term in coded]
        minimal = [group for group in groups if not any(other < group for other in groups)]
        within = [v for v in names if any(v in group for group in minimal)]
        if within and all(minimal):
            nests[name] = within
    return nests


def _factor_terms(formula: ModelFormula, factors: Mapping[str, _Factor]) -> list[frozenset[str]]:
    """The fixed terms as sets of their variables: a factor by its column, any other variable by its label."""
    def key(variable: Expr) -> str:
        if isinstance(variable, Call) and variable.function == "factor" and isinstance(variable.args[0], Name):
            return variable.args[0].id
        if isinstance(variable, Name) and variable.id in factors:
            return variable.id
        return deparse(variable)

    return [frozenset(key(variable) for variable in term.variables) for term in formula.fixed_terms.terms]


def _observed(
    visits: pd.DataFrame, grid_levels: Mapping[str, Sequence[object]], name: str, within: Sequence[str],
) -> set[tuple[object, ...]]:
    """The combinations of ``name`` and the factors it is nested in that occur in the data."""
    columns = [name, *within]
    present = visits[columns].drop_duplicates()
    return {tuple(row) for row in present.itertuples(index=False) if all(
        value in grid_levels[column] for column, value in zip(columns, row, strict=True))}


def _predictors(
    visits: pd.DataFrame, formula: ModelFormula, transforms: Mapping[str, Transform],
) -> tuple[dict[str, _Factor], list[str]]:
    """The columns the fixed effects read, split as emmeans' reference grid splits them: factors (text columns
    and numbers the formula wraps in ``factor()``), with their levels, and numeric covariates."""
    factors: dict[str, _Factor] = {}
    numeric: list[str] = []
    for term in formula.fixed_terms.terms:
        for variable in term.variables:
            if isinstance(variable, Call) and variable.function == "factor" and isinstance(variable.args[0], Name):
                column = variable.args[0].id
                factors[column] = _recorded_levels(transforms, f"factor({column})", visits[column])
            elif isinstance(variable, Name) and not _is_numeric(visits[variable.id]):
                factors[variable.id] = _recorded_levels(transforms, variable.id, visits[variable.id])
            else:
                numeric.extend(sorted(expression_columns(variable)))
    return factors, [column for column in dict.fromkeys(numeric) if column not in factors]


def _recorded_levels(transforms: Mapping[str, Transform], key: str, column: pd.Series) -> _Factor:
    recorded = transforms[key]
    assert isinstance(recorded, FactorLevels)
    labels = recorded.levels
    values: tuple[object, ...] = tuple(float(label) for label in labels) if _is_numeric(column) else labels
    return _Factor(labels, values)


def _data_levels(column: pd.Series) -> _Factor:
    """The levels of a column the model does not use, sorted as the design sorts factor levels."""
    _, labels = pd.factorize(column.astype(str), sort=True)
    shown = tuple(str(label) for label in labels)
    return _Factor(shown, shown)


def _at_values(
    column: str, values: Sequence[float], factors: Mapping[str, _Factor], numeric: Sequence[str], formula: ModelFormula,
) -> tuple[object, ...]:
    if column not in factors:
        return tuple(values)
    factor = factors[column]
    if not all(isinstance(value, float) for value in factor.values):
        raise ConfigError(f"estimates: at {column!r} gives numbers, but {column!r} is a categorical column in the "
                          f"model formula {formula.text!r}; use by for it")
    missing = [value for value in values if value not in factor.values]
    if missing:
        raise ConfigError(f"estimates: at {column}: {missing[0]:g} is not a level of factor({column}) in the model "
                          f"formula {formula.text!r}; its levels are {', '.join(factor.labels)}")
    return tuple(values)


def _grid_notes(
    at: Mapping[str, Sequence[float]], held: Mapping[str, float], averaged: Mapping[str, _Factor],
    nests: Mapping[str, Sequence[str]],
) -> list[str]:
    notes = [f"Means at {column} = {', '.join(f'{value:g}' for value in values)}." for column, values in at.items()]
    if held:
        notes.append("Held at the mean over the rows fitted: "
                     + ", ".join(f"{column} = {value:.4g}" for column, value in held.items()) + ".")
    if averaged:
        notes.append("Averaged with equal weights over the levels of "
                     + ", ".join(f"{column} ({', '.join(factor.labels)})" for column, factor in averaged.items()) + ".")
    for name, within in nests.items():
        if name in averaged:
            where = " and ".join(within)
            notes.append(f"{name} is nested in {where}: averaged within each {where} over its own levels "
                         "(emmeans' nesting).")
    return notes


def _is_numeric(column: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(column)) and not pd.api.types.is_bool_dtype(column)


# ---------------------------------------------------------------------------------------------- estimability


def _cell_means(X: np.ndarray, cell_of_row: np.ndarray, n_cells: int) -> np.ndarray:
    """The mean of ``X``'s rows per cell (NaN for a cell with no row)."""
    sums = np.zeros((n_cells, X.shape[1]))
    np.add.at(sums, cell_of_row, X)
    counts = np.bincount(cell_of_row, minlength=n_cells).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def nonestimable_basis(X: np.ndarray) -> np.ndarray:
    """A basis of the null space of the full (undropped) fixed-effects matrix ``X``, as estimability's
    ``nonest.basis`` (from the SVD: the right singular vectors whose singular values are below
    ``NULL_SPACE_TOLERANCE`` × the largest); no columns when ``X`` has full column rank."""
    # X's singular values and right singular vectors are its R factor's: an n × n U is never formed.
    square = np.linalg.qr(X, mode="r") if X.shape[0] > X.shape[1] else X
    _, d, vt = np.linalg.svd(square, full_matrices=True)
    d = np.concatenate([d, np.zeros(vt.shape[0] - d.shape[0])])
    return np.ascontiguousarray(vt[d < d[0] * NULL_SPACE_TOLERANCE].T)


def is_estimable(L: np.ndarray, null_basis: np.ndarray | None) -> np.ndarray:
    """Which rows of ``L`` (full-design coefficients) are estimable, as estimability's ``is.estble``:
    |N'x|² < ``ESTIMABILITY_TOLERANCE`` × |x|². A row with a NaN (a cell with no data) is not."""
    finite = np.isfinite(L).all(axis=1)
    if null_basis is None or null_basis.shape[1] == 0:
        return finite
    x = np.where(np.isfinite(L), L, 0.0)
    squares = (x * x).sum(axis=1)
    squares = np.where(squares < ESTIMABILITY_TOLERANCE, 1.0, squares)
    return finite & (((x @ null_basis) ** 2).sum(axis=1) < ESTIMABILITY_TOLERANCE * squares)


def _nonestimable_note(grid: ReferenceGrid, estimable: np.ndarray, dropped: Sequence[str]) -> str:
    cells = grid.cells[~estimable]
    shown = "; ".join(", ".join(f"{column} = {_shown(value)}" for column, value in row.items())
                      for _, row in cells.iterrows())
    why = (f"the fitted design drops {', '.join(dropped)} as collinear with its other columns, and these means "
           "depend on it" if dropped else "no data combination is left in these cells")
    return f"Not estimable ({len(cells)} of {len(grid.cells)} means, left blank as emmeans' nonEst): {why}: {shown}."


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _estimate_rows(
    L: np.ndarray, estimable: np.ndarray, inference: FixedEffectInference,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``inference.contrasts`` of the estimable rows of ``L``; NaN for the others."""
    out = tuple(np.full(L.shape[0], math.nan) for _ in range(3))
    if estimable.any():
        for column, values in zip(out, inference.contrasts(L[estimable]), strict=True):
            column[estimable] = values
    return out[0], out[1], out[2]


# ------------------------------------------------------------------------------------------------ tables


def _means_table(
    grid: ReferenceGrid, L: np.ndarray, estimable: np.ndarray, inference: FixedEffectInference, family: Family | None,
) -> pd.DataFrame:
    eta, se, df = _estimate_rows(L, estimable, inference)
    low, high, _ = t_interval(eta, se, df)
    if family is not None:
        # The delta method: SE(μ) = dμ/dη SE(η), dμ/dη being the canonical link's working weight.
        slope = family.evaluate(eta, np.zeros_like(eta), np.zeros_like(eta)).weight
        eta, se, low, high = family.mean(eta), slope * se, family.mean(low), family.mean(high)
    return grid.cells.assign(estimate=eta, se=se, df=df, ci_low=low, ci_high=high)


def _contrasts_table(
    grid: ReferenceGrid, L_full: np.ndarray, kept: Sequence[int], null_basis: np.ndarray | None,
    inference: FixedEffectInference, family: Family | None,
) -> tuple[pd.DataFrame, list[str]]:
    n_levels = len(grid.levels)
    k = n_levels - 1
    if k == 0:
        return _empty_contrasts(grid.at_columns), [f"No contrasts: {grid.by} has one level, {grid.levels[0]}."]
    per_combination = L_full.reshape(-1, n_levels, L_full.shape[1])
    full_differences = (per_combination[:, 1:, :] - per_combination[:, :1, :]).reshape(-1, L_full.shape[1])
    estimable = is_estimable(full_differences, null_basis)
    estimate, se, df = _estimate_rows(full_differences[:, kept], estimable, inference)
    if k == 1:
        low, high, p_value = t_interval(estimate, se, df)
        adjustment = "none"
    else:
        critical = dunnettx_quantile(LEVEL, k, df)
        low, high = estimate - critical * se, estimate + critical * se
        p_value = np.full(estimate.shape, math.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            p_value[estimable] = dunnettx_p_value(np.abs(estimate / se)[estimable], k, df[estimable])
        adjustment = "dunnettx"
    ratio = family is not None
    if ratio:
        # The delta method on exp: SE(exp d) = exp(d) SE(d); tests stay on the link scale (null ratio 1).
        estimate, se, low, high = np.exp(estimate), np.exp(estimate) * se, np.exp(low), np.exp(high)
    sign = "/" if ratio else "-"
    at = grid.cells[list(grid.at_columns)].iloc[::n_levels].reset_index(drop=True)
    shown = [f"{grid.by}{level}" for level in grid.levels] if _all_numbers(grid.levels) else list(grid.levels)
    labels = [f"{level} {sign} {shown[0]}" for level in shown[1:]]
    table = pd.DataFrame({"contrast": labels * len(at)})
    for column in grid.at_columns:
        table[column] = np.repeat(at[column].to_numpy(), k)
    table = table.assign(estimate=estimate, se=se, df=df, ci_low=low, ci_high=high, p_value=p_value,
                         adjustment=adjustment)
    what = {"logit": "odds ratios", "log": "rate ratios"}.get(family.link, "ratios") if family else "differences"
    where = f"at each combination of {', '.join(grid.at_columns)}" if grid.at_columns else "in the family"
    if k == 1:
        note = (f"Contrasts are {what} of {grid.levels[1]} against the reference level {grid.levels[0]} of "
                f"{grid.by}; one contrast {where}, so intervals and p-values are not adjusted.")
    else:
        note = (f"Contrasts are {what} of each level of {grid.by} against the reference level {grid.levels[0]}; "
                f"intervals and p-values are adjusted for the {k} contrasts {where} with emmeans' dunnettx "
                "(its approximation to Dunnett's method).")
    notes = [note]
    if not estimable.all():
        blank = ", ".join(f"{label} ({', '.join(f'{c} = {_shown(v)}' for c, v in zip(grid.at_columns, at_row))})"
                          if grid.at_columns else label
                          for label, *at_row in table.loc[~estimable, ["contrast", *grid.at_columns]].itertuples(
                              index=False))
        notes.append(f"Not estimable ({int((~estimable).sum())} of {len(table)} contrasts, left blank as emmeans' "
                     f"nonEst): they depend on columns the fitted design drops as collinear: {blank}.")
    return table, notes


def _all_numbers(levels: Sequence[str]) -> bool:
    """True when every level reads as a number, where emmeans labels contrasts "Diet2 - Diet1", not "2 - 1"."""
    try:
        return all(not math.isnan(float(level)) and "_" not in level for level in levels)
    except ValueError:
        return False


def _empty_contrasts(at_columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=["contrast", *at_columns, *CONTRAST_COLUMNS])


# ---------------------------------------------------------------------------------------------- dunnettx


def dunnettx_cdf(x: np.ndarray | float, k: int, df: np.ndarray | float) -> np.ndarray:
    """emmeans' ``.pdunnx``: P(max |T_i| ≤ x) for ``k`` contrasts against one control, approximated by the mix
    ((k - 1)/k) · Tukey's studentized range cdf of √2 x with (1 + √(1 + 8k))/2 means + (1/k) · the Sidak
    bound P(|T| ≤ x)^k, on ``df`` (inf for the normal). As R's ``ptukey``: NaN where df < 2, the infinite-df
    range where df > 25000.
    """
    from scipy.special import stdtr
    from scipy.stats import studentized_range

    x, df = (np.asarray(a, dtype=float) for a in np.broadcast_arrays(x, df))
    means = (1.0 + math.sqrt(1.0 + 8.0 * k)) / 2.0
    range_df = np.where(df > _PTUKEY_LARGE_DF, np.inf, df)
    tukey = np.full(x.shape, np.nan)
    for index in np.ndindex(x.shape):
        if range_df[index] < 2.0:
            continue
        q = math.sqrt(2.0) * x[index]
        tukey[index] = 0.0 if q <= 0 else 1.0 if math.isinf(q) else studentized_range.cdf(q, means, range_df[index])
    sidak = (1.0 - 2.0 * stdtr(df, -np.abs(x))) ** k
    weight = (k - 1) / k
    return np.asarray(weight * tukey + (1.0 - weight) * sidak, dtype=float)


def dunnettx_p_value(statistic: np.ndarray | float, k: int, df: np.ndarray | float) -> np.ndarray:
    """emmeans' dunnettx-adjusted two-sided p-value of |t| = ``statistic`` among ``k`` contrasts: 1 − .pdunnx."""
    return 1.0 - dunnettx_cdf(np.abs(np.asarray(statistic, dtype=float)), k, df)


def dunnettx_quantile(level: float, k: int, df: np.ndarray | float) -> np.ndarray:
    """emmeans' ``.qdunnx``: the critical value of ``level`` intervals for ``k`` contrasts on each ``df``.

    As emmeans: the t quantile when k = 1; else the root of .pdunnx(x) = level between the Tukey quantile
    (qtukey(level, (1 + √(1 + 8k))/2, df)/√2) and the Sidak one (√qf(level^(1/k), 1, df)), by Brent's method
    with tolerance 0.0005 as R's ``uniroot``, or the Tukey quantile when the two are within 0.0005.
    """
    from scipy.special import ndtri, stdtrit
    from scipy.stats import studentized_range

    df = np.atleast_1d(np.asarray(df, dtype=float))
    if k < 1.005:
        upper = 0.5 * (1.0 + level)
        return np.where(np.isfinite(df), stdtrit(np.where(np.isfinite(df), df, 1.0), upper), ndtri(upper))
    means = (1.0 + math.sqrt(1.0 + 8.0 * k)) / 2.0
    found: dict[float, float] = {}
    for d in df:
        if d in found or not d >= 2.0:
            found.setdefault(float(d), math.nan)
            continue
        tukey = float(studentized_range.ppf(level, means, np.inf if d > _PTUKEY_LARGE_DF else d)) / math.sqrt(2.0)
        sidak_level = 0.5 * (1.0 + level ** (1.0 / k))
        sidak = float(stdtrit(d, sidak_level) if math.isfinite(d) else ndtri(sidak_level))
        if abs(tukey - sidak) < DUNNETTX_TOLERANCE:
            found[float(d)] = tukey
        else:
            found[float(d)] = zeroin(lambda x: float(dunnettx_cdf(x, k, d)) - level, tukey, sidak, DUNNETTX_TOLERANCE)
    return np.array([found[float(d)] for d in df])


def zeroin(f: Callable[[float], float], a: float, b: float, tol: float, max_iterations: int = 1000) -> float:
    """A root of ``f`` in [a, b] by Brent's method (the ZEROIN of Forsythe, Malcolm & Moler), stopping as R's
    ``uniroot`` does: when the bracket is within 2·eps·|b| + tol/2 of the best point. ``f(a)`` and ``f(b)``
    must have opposite signs (or one be zero)."""
    eps = np.finfo(float).eps
    fa, fb = f(a), f(b)
    if fa == 0.0:
        return a
    if fb == 0.0:
        return b
    if (fa > 0) == (fb > 0):
        raise ValueError(f"f({a}) = {fa} and f({b}) = {fb} have the same sign")
    c, fc = a, fa
    for _ in range(max_iterations):
        previous_step = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        tol_act = 2.0 * eps * abs(b) + tol / 2.0
        new_step = (c - b) / 2.0
        if abs(new_step) <= tol_act or fb == 0.0:
            return b
        if abs(previous_step) >= tol_act and abs(fa) > abs(fb):
            cb = c - b
            if a == c:  # two points: the secant
                t1 = fb / fa
                p, q = cb * t1, 1.0 - t1
            else:  # three points: inverse quadratic interpolation
                q, t1, t2 = fa / fc, fb / fc, fb / fa
                p = t2 * (cb * q * (q - t1) - (b - a) * (t1 - 1.0))
                q = (q - 1.0) * (t1 - 1.0) * (t2 - 1.0)
            if p > 0:
                q = -q
            else:
                p = -p
            if p < 0.75 * cb * q - abs(tol_act * q) / 2.0 and p < abs(previous_step * q / 2.0):
                new_step = p / q
        if abs(new_step) < tol_act:
            new_step = tol_act if new_step > 0 else -tol_act
        a, fa = b, fb
        b += new_step
        fb = f(b)
        if (fb > 0 and fc > 0) or (fb < 0 and fc < 0):
            c, fc = a, fa
    return b
