"""Model matrices for a parsed formula, built as R's ``model.matrix`` builds them and named as lme4 names them.

The fixed-effects matrix follows R: terms ordered by degree (formula order within a degree), each
categorical variable (a text column, ``factor(x)``) coded by treatment contrasts with the first level
(sorted) as reference when the term without it is in the model before it (the intercept counting as the
empty term), else by one indicator per level; without an intercept the first categorical variable of the
first term that has one gets full indicator coding, as in R. Interaction columns vary the first variable
fastest. Column names are lme4's (``(Intercept)``, ``armtreatment``, ``week:armtreatment``, ``I(week^2)``,
``poly(age, 2)1``, ``factor(visit)3``). Rank-deficient fixed-effect columns are dropped, as lmer does, and
listed in ``Design.dropped``. Random-effects bars are built by the same machinery.

Data-dependent parameters (factor levels, poly's coefficients, spline knots) are fitted once on the data and
recorded in ``Design.transforms``; ``build_design(new, formula, transforms=design.transforms)`` evaluates new
data with them, as R's ``predict`` does.

Each random-effects bar has its own grouping factor (``BlockDesign.codes``/``levels``). A formula with a
covariance structure and no bars (an MMRM) has no blocks; its subject is the design's grouping factor. An interaction factor
``a:b`` has one level per combination present in the data, labelled ``"<a level>:<b level>"`` and ordered
with ``a`` varying slowest, as lme4 builds it (``droplevels(a:b)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Collection, Literal, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from longitudinal.errors import FormulaError
from longitudinal.model.formula import (
    CONSTANTS,
    FUNCTIONS,
    Binary,
    Call,
    Expr,
    ModelFormula,
    Name,
    Number,
    Paren,
    Terms,
    Unary,
    deparse,
    expand_terms,
    format_number,
    left_spine,
)
from longitudinal.model.transforms import (
    FactorLevels,
    PolyBasis,
    ScaleParameters,
    SplineBasis,
    Transform,
    fit_poly,
    fit_scale,
    fit_spline,
    poly_basis,
    spline_basis,
)


@dataclass(frozen=True, eq=False)
class BlockDesign:
    """One random-effects bar: its model matrix ``Z`` (n × q), lme4's term names and its grouping factor.

    ``codes`` maps each row to its level of ``group`` (0..G-1), ``levels`` are the level labels (sorted as
    R sorts them for these labels; bars on the same factor share the same arrays).

    ``fixed_columns``: when the bar's columns are consecutive columns of its design's X (``(week | id)``
    beside ``1 + week``), Z is the view ``X[:, fixed_columns]`` (its rows strided; never written, like every
    design array), not a copy: 32 MB less per design at 2,000,000 rows. None when Z is its own array.
    """

    group: str
    terms: tuple[str, ...]
    Z: np.ndarray
    codes: np.ndarray
    levels: np.ndarray
    fixed_columns: slice | None = None

    @property
    def n_levels(self) -> int:
        return int(self.levels.shape[0])


@dataclass(frozen=True, eq=False)
class Design:
    """Response, fixed-effects matrix and random-effects blocks of one candidate on one data set.

    ``group``, ``codes`` and ``levels`` describe the primary grouping factor: the only one when every bar
    shares one factor (the longitudinal subject); with several factors (nested or crossed), the one with
    the most levels (the finest: ``school:pupil`` in ``(1 | school/pupil)``, ``patient`` in
    ``(t | patient) + (1 | rater)``; the first in formula order on a tie); in an MMRM (a covariance
    structure and no bars, ``blocks`` empty) the structure's subject. ``codes`` maps each row to its
    level (0..G-1, ``levels`` sorted as R sorts factor levels for these labels). Every bar also carries
    its own factor's codes and levels. Rows are in the order of the data frame given.

    ``transforms`` maps each data-dependent variable, by its name as R deparses it (``"arm"``,
    ``"factor(visit)"``, ``"poly(age, 2)"``, ``"ns(age, 3)"``), to the parameters fitted on these data
    (``FactorLevels``, ``PolyBasis``, ``SplineBasis``); it is read-only.
    """

    y: np.ndarray
    X: np.ndarray
    fixed_names: tuple[str, ...]
    dropped: tuple[str, ...]
    blocks: tuple[BlockDesign, ...]
    group: str
    codes: np.ndarray
    levels: np.ndarray
    transforms: Mapping[str, Transform] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def n_obs(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_groups(self) -> int:
        """Levels of the primary grouping factor ``group``."""
        return int(self.levels.shape[0])

    @property
    def groups(self) -> tuple[str, ...]:
        """The distinct grouping factors of the bars, in formula order."""
        return tuple(dict.fromkeys(block.group for block in self.blocks))

    @property
    def single_factor(self) -> bool:
        """True when every bar has the same grouping factor (per-group Z'Z is block-diagonal)."""
        return len(self.groups) == 1

    def levels_of(self, group: str) -> int:
        """Number of levels of grouping factor ``group`` (one of ``groups``)."""
        return next(block.n_levels for block in self.blocks if block.group == group)

    @property
    def Z(self) -> np.ndarray:
        """All blocks side by side (n × q), the per-group columns of the random effects (n × 0 in an MMRM)."""
        return np.hstack([block.Z for block in self.blocks]) if self.blocks else np.empty((self.n_obs, 0))


def build_design(
    data: pd.DataFrame, formula: ModelFormula, *, transforms: Mapping[str, Transform] | None = None,
    dropped: Collection[str] | None = None,
) -> Design:
    """Build the matrices of ``formula`` on ``data`` (typed: numbers as floats, categoricals as text).

    With ``transforms`` (a previous design's), data-dependent variables are evaluated with the recorded
    parameters instead of fitting them (a level not seen then is an error); with ``dropped`` (a previous
    design's), exactly those fixed-effect columns are dropped instead of checking the rank on these rows.
    Missing values are not handled here: validation removes every row with a missing value in a column
    any candidate uses, so all candidates are fitted on the same rows. A missing value reaching this
    point is an error.
    """
    _check_frame(data, formula)
    evaluator = _Evaluator(data, formula.text, transforms)
    y = data[formula.response].to_numpy(dtype=float)
    fixed = evaluator.columns(formula.fixed_terms)
    names = [column.name for column in fixed]
    X_all = evaluator.fill(fixed)
    if dropped is None:
        X, kept = _drop_rank_deficient(X_all)
    else:
        kept = [j for j, name in enumerate(names) if name not in set(dropped)]
        X = X_all if len(kept) == len(names) else np.ascontiguousarray(X_all[:, kept])
    del X_all
    kept_columns = [fixed[j] for j in kept]
    factors = {group: code_factor(data, group.split(":")) for group in _grouping_factors(formula)}
    blocks = []
    for block in formula.blocks:
        bar = evaluator.columns(expand_terms(block.spec, where=f"formula {formula.text!r}"))
        within = _run_of(bar, kept_columns)
        Z = X[:, within] if within is not None else evaluator.fill(bar)
        codes, levels = factors[block.group]
        blocks.append(BlockDesign(group=block.group, terms=tuple(c.name for c in bar), Z=Z, codes=codes,
                                  levels=levels, fixed_columns=within))
    # The primary factor: the one with the most levels, first in formula order on a tie.
    order = list(factors)
    group = max(order, key=lambda name: (factors[name][1].shape[0], -order.index(name)))
    codes, levels = factors[group]
    kept_set = set(kept)
    return Design(
        y=y,
        X=X,
        fixed_names=tuple(names[i] for i in kept),
        dropped=tuple(name for i, name in enumerate(names) if i not in kept_set),
        blocks=tuple(blocks),
        group=group,
        codes=codes,
        levels=levels,
        transforms=MappingProxyType(dict(evaluator.fitted)),
    )


def fixed_view(design: Design, block: BlockDesign) -> slice | None:
    """``block.fixed_columns`` where ``block.Z`` is exactly that view of ``design.X`` (the same memory, hence the
    same values), else None: a design whose X was replaced afterwards keeps its bars, not that relation."""
    window = block.fixed_columns
    if window is None:
        return None
    expected = design.X[:, window]
    same = (block.Z.shape == expected.shape and block.Z.strides == expected.strides
            and block.Z.__array_interface__["data"][0] == expected.__array_interface__["data"][0])
    return window if same else None


def _run_of(bar: list[_Column], fixed: list[_Column]) -> slice | None:
    """Where the bar's columns are consecutive columns of the fixed-effects matrix (the same factors, so the
    same values): ``(week | id)`` next to ``1 + week + ...``. None otherwise, or for a bar without columns."""
    wanted = [column.factors for column in bar]
    have = [column.factors for column in fixed]
    for start in range(len(have) - len(wanted) + 1 if wanted else 0):
        if have[start:start + len(wanted)] == wanted:
            return slice(start, start + len(wanted))
    return None


def _grouping_factors(formula: ModelFormula) -> tuple[str, ...]:
    """The bars' grouping factors in formula order; without bars (an MMRM), the covariance structure's subject.

    A structure next to bars shares their factor (``parse_formula`` refuses any other), so it adds none.
    """
    if formula.groups:
        return formula.groups
    if formula.covariance is None:
        raise FormulaError(f"formula {formula.text!r} has neither random effects nor a covariance structure")
    return (formula.covariance.subject,)


def code_factor(data: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Codes (0..G-1 per row) and labels of the grouping factor made of ``columns`` (one, or an interaction).

    Each column's values are read as text and sorted; an interaction keeps only the combinations present,
    ordered with the first column varying slowest and labelled ``"a:b"``, as lme4's ``droplevels(a:b)``.
    """
    parts = [_sorted_codes(data[column], sorted_rows=True) for column in columns]
    if len(parts) == 1:
        codes, levels = parts[0]
        return codes, levels
    key, labels = parts[0]
    for codes, levels in parts[1:]:
        # Re-coded after each column, so the combined key stays below the number of rows (no overflow).
        width = len(levels)
        used, inverse = np.unique(key * width + codes, return_inverse=True)
        labels = labels[used // width] + ":" + levels[used % width]
        key = inverse.reshape(-1).astype(np.int64)
    return key, labels


def _check_frame(data: pd.DataFrame, formula: ModelFormula) -> None:
    missing = sorted(formula.columns - set(data.columns))
    if missing:
        raise FormulaError(f"formula {formula.text!r} uses column {missing[0]!r}, which the data lack")
    holes = [c for c in sorted(formula.columns) if _has_missing(data[c])]
    if holes:
        raise FormulaError(f"column {holes[0]!r} has missing values; validation should have removed those rows")


def _has_missing(column: pd.Series) -> bool:
    """Whether ``column`` has a missing value; for a numpy float column, from its minimum (NaN exactly when a
    value is): no n-long mask per column and fit."""
    if isinstance(column.dtype, np.dtype) and column.dtype.kind == "f" and len(column):
        return bool(np.isnan(column.to_numpy().min()))
    return bool(column.isna().any())


def _sorted_codes(values: pd.Series, *, sorted_rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Codes (int64) and labels of ``values`` read as text, labels in sorted (code point) order.

    A categorical of text whose categories are in that order (validated visits hold their text columns so)
    gives its own codes (``_codes_of_categories``: no text read per row). With ``sorted_rows`` (a grouping
    factor: validated visits are sorted by subject), rows already in that order are coded by where the value
    changes (``_codes_of_runs``, 3x faster at millions of rows); otherwise ``pd.factorize(sort=True)`` on the
    text column sorts as Python's ``sorted`` does, without turning every value into a Python object first
    (5-10× faster on a column of subject identifiers).
    """
    coded = _codes_of_categories(values)
    if coded is not None:
        return coded
    text = values.astype(str)
    runs = _codes_of_runs(text) if sorted_rows else None
    if runs is not None:
        return runs
    codes, levels = pd.factorize(text, sort=True)
    return codes.astype(np.int64, copy=False), np.asarray(levels, dtype=object)


def _codes_of_categories(values: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """``_sorted_codes`` of a pandas categorical without missing values whose categories are text, strictly
    increasing in code point order (UTF-8 byte order, as Arrow compares): its codes, with the categories no
    row has left out (R's ``droplevels``). None otherwise (numbers as categories sort otherwise as text).

    Measured at 200,000 rows: 0.5 ms for the treatment arm, where reading the categorical as text and
    factorizing that took 19 ms (factorizing an Arrow text column alone, 1.9 ms).
    """
    if not isinstance(values.dtype, pd.CategoricalDtype) or len(values) == 0:
        return None
    categories = values.cat.categories
    if not isinstance(categories.dtype, pd.StringDtype):
        return None
    codes = values.cat.codes.to_numpy()
    if codes.min() < 0:
        return None
    labels = pa.array(categories.array)
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    if len(labels) > 1 and not pc.all(pc.less(labels.slice(0, len(labels) - 1), labels.slice(1))).as_py():
        return None
    present = np.bincount(codes, minlength=len(categories)) > 0
    if present.all():
        return codes.astype(np.int64), np.asarray(categories, dtype=object)
    renumbered = np.cumsum(present) - 1
    return renumbered[codes].astype(np.int64), np.asarray(categories[present], dtype=object)


def _codes_of_runs(text: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """``_sorted_codes`` of a text column stored by Arrow whose rows are sorted (byte order of UTF-8 is code
    point order) and have no missing value: each new value starts the next code. None otherwise.

    One pass over the rows finds where the value changes; the rows are sorted exactly when the values
    starting those runs are strictly increasing, which is checked on them alone.
    """
    if len(text) < 2 or not isinstance(text.dtype, pd.StringDtype) or text.dtype.storage != "pyarrow":
        return None
    array = pa.array(text.array)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.null_count:
        return None
    change = pc.not_equal(array.slice(1), array.slice(0, len(array) - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(change)
    starts += 1
    starts = np.concatenate(([0], starts))
    firsts = array.take(pa.array(starts))
    if len(firsts) > 1 and not pc.all(pc.less(firsts.slice(0, len(firsts) - 1), firsts.slice(1))).as_py():
        return None
    # Each run's code repeated over its rows: 4x faster than a running sum of the n change flags.
    codes = np.repeat(np.arange(len(starts), dtype=np.int64), np.diff(starts, append=len(array)))
    return codes, np.asarray(firsts.to_numpy(zero_copy_only=False), dtype=object)


# ------------------------------------------------------------------------------------ model matrices


@dataclass(frozen=True, eq=False)
class _Numeric:
    """A numeric variable's columns (n × k) and the suffix of each column's name (``""`` for one column)."""

    values: np.ndarray
    suffixes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class _Categorical:
    codes: np.ndarray
    levels: tuple[str, ...]


_Variable = _Numeric | _Categorical


@dataclass(frozen=True, eq=False)
class _Column:
    """One model-matrix column, not evaluated: its lme4 name and its factors, each (variable key, index): column
    ``index`` of a numeric variable, or the indicator of level ``index`` of a categorical one. The column is
    their product, left to right; no factor is the intercept. Equal factors mean equal values, bit for bit."""

    name: str
    factors: tuple[tuple[str, int], ...]


class _Evaluator:
    """Evaluates variables on one data frame, fitting (or reusing) their data-dependent parameters."""

    def __init__(self, data: pd.DataFrame, text: str, recorded: Mapping[str, Transform] | None) -> None:
        self.data, self.text, self.recorded = data, text, recorded
        self.fitted: dict[str, Transform] = {}
        self.cache: dict[str, _Variable] = {}

    def model_matrix(self, terms: Terms) -> tuple[np.ndarray, list[str]]:
        """R's ``model.matrix`` for ``terms``: columns and their lme4 names."""
        columns = self.columns(terms)
        return self.fill(columns), [column.name for column in columns]

    def columns(self, terms: Terms) -> list[_Column]:
        """The columns of R's ``model.matrix`` for ``terms``, in R's order, named and described, not evaluated."""
        columns = [_Column("(Intercept)", ())] if terms.intercept else []
        keys = [frozenset(deparse(v) for v in term.variables) for term in terms.terms]
        full_first = None if terms.intercept else self._first_categorical(terms)
        for t, term in enumerate(terms.terms):
            term_columns = [_Column("", ())]
            for variable in term.variables:
                key = deparse(variable)
                value = self.variable(variable)
                if isinstance(value, _Numeric):
                    parts = [(key + s, (key, j)) for j, s in enumerate(value.suffixes)]
                else:
                    margin = keys[t] - {key}
                    contrasts = (not margin or any(margin <= keys[s] for s in range(t))) and full_first != (t, key)
                    shown = value.levels[1:] if contrasts else value.levels
                    start = 1 if contrasts else 0
                    parts = [(key + level, (key, start + j)) for j, level in enumerate(shown)]
                # The earlier variables vary fastest, as in R.
                term_columns = [_Column(f"{left.name}:{name}" if left.name else name, left.factors + (factor,))
                                for name, factor in parts for left in term_columns]
            columns.extend(term_columns)
        return columns

    def fill(self, columns: list[_Column]) -> np.ndarray:
        """The matrix (n × len(columns), row-major) with each column evaluated straight into its place.

        Each column is the product of its factors taken left to right (as R multiplies them: the same values
        bit for bit as stacking the products), formed in one contiguous buffer (or read where it lies: a plain
        numeric column) and checked there, then written into its place once: no list of n-long columns stacked
        afterwards and no n × p finiteness mask (58 MB beside the matrix at 2,000,000 rows), and one strided
        pass over the matrix per column (a strided pass reads every cache line of the matrix: 80 MB at 2M).
        """
        X = np.empty((len(self.data), len(columns)))
        scratch = np.empty(len(self.data)) if any(len(column.factors) > 1 for column in columns) else None
        for j, column in enumerate(columns):
            X[:, j] = self._evaluate_column(column, scratch)
        return X

    def _evaluate_column(self, column: _Column, scratch: np.ndarray | None) -> np.ndarray | float:
        """The column's values, finite where numeric: 1 for the intercept, a factor as it lies when the column
        is one factor, else the product in ``scratch``."""
        if not column.factors:
            return 1.0
        factors = [self._factor(key, index) for key, index in column.factors]
        numeric = any(factor.dtype != bool for factor in factors)
        if len(factors) == 1:
            values = factors[0]
        else:
            assert scratch is not None  # fill allocates it when a column has several factors
            values = scratch
            values[...] = factors[0]
            for factor in factors[1:]:
                np.multiply(values, factor, out=values)
        # min and max are NaN or infinite exactly when a value is: no n-long mask
        if numeric and values.size and not (math.isfinite(values.min()) and math.isfinite(values.max())):
            raise FormulaError(f"formula {self.text!r}: the column {column.name!r} has values that are not finite "
                               "(a log or square root of a value outside its domain, or a division by zero)")
        return values

    def _factor(self, key: str, index: int) -> np.ndarray:
        """Column ``index`` of numeric variable ``key``, or the indicator (bool) of level ``index`` of a categorical."""
        value = self.cache[key]
        if isinstance(value, _Numeric):
            return value.values[:, index]
        return value.codes == index

    def _first_categorical(self, terms: Terms) -> tuple[int, str] | None:
        for t, term in enumerate(terms.terms):
            for variable in term.variables:
                if isinstance(self.variable(variable), _Categorical):
                    return t, deparse(variable)
        return None

    def variable(self, expr: Expr) -> _Variable:
        key = deparse(expr)
        if key not in self.cache:
            self.cache[key] = self._evaluate_variable(expr, key)
        return self.cache[key]

    def _evaluate_variable(self, expr: Expr, key: str) -> _Variable:
        if isinstance(expr, Name):
            column = self.data[expr.id]
            if _is_numeric(column):
                return _Numeric(column.to_numpy(dtype=float).reshape(-1, 1), ("",))
            return self._categorical(key, column, numeric=False)
        assert isinstance(expr, Call)  # model/formula.py admits names and calls as variables
        if expr.function == "factor":
            assert isinstance(expr.args[0], Name)
            column = self.data[expr.args[0].id]
            return self._categorical(key, column, numeric=_is_numeric(column))
        if expr.function == "poly":
            return self._poly(expr, key)
        if expr.function in ("ns", "bs"):
            return self._spline(expr, key)
        if expr.function == "scale":
            return self._scale(expr, key)
        return _Numeric(self.arithmetic(expr).reshape(-1, 1), ("",))

    def _recorded(self, key: str, kind: type) -> Transform | None:
        if self.recorded is None:
            return None
        found = self.recorded.get(key)
        if not isinstance(found, kind):
            raise FormulaError(f"formula {self.text!r}: no recorded parameters for {key!r}; the design to reuse "
                               "was built from another formula")
        return found

    def _categorical(self, key: str, column: pd.Series, *, numeric: bool) -> _Categorical:
        if numeric:  # factor(<number>): levels sorted as numbers, labelled as R's as.character
            values = column.to_numpy(dtype=float)
            unique, inverse = np.unique(values, return_inverse=True)
            labels = np.asarray([format_number(float(v)) for v in unique], dtype=object)
        else:
            inverse, labels = _sorted_codes(column)
        recorded = self._recorded(key, FactorLevels)
        if recorded is None:
            self.fitted[key] = FactorLevels(tuple(str(label) for label in labels))
            return _Categorical(inverse.reshape(-1).astype(np.int64), tuple(str(label) for label in labels))
        assert isinstance(recorded, FactorLevels)
        position = {level: i for i, level in enumerate(recorded.levels)}
        new = [str(label) for label in labels if str(label) not in position]
        if new:
            raise FormulaError(f"formula {self.text!r}: {key!r} has the level {new[0]!r}, which the fitted data did "
                               f"not have; levels were: {', '.join(recorded.levels)}")
        mapping = np.asarray([position[str(label)] for label in labels], dtype=np.int64)
        self.fitted[key] = recorded
        return _Categorical(mapping[inverse.reshape(-1)], recorded.levels)

    def _poly(self, expr: Call, key: str) -> _Numeric:
        x = self.arithmetic(expr.args[0])
        degree = int(_number(expr, "degree"))
        recorded = self._recorded(key, PolyBasis)
        if recorded is None:
            values, basis = fit_poly(x, degree, shown=f"formula {self.text!r}: {key}")
        else:
            assert isinstance(recorded, PolyBasis)
            values, basis = poly_basis(x, recorded), recorded
        self.fitted[key] = basis
        return _Numeric(values, tuple(str(i) for i in range(1, degree + 1)))

    def _spline(self, expr: Call, key: str) -> _Numeric:
        x = self.arithmetic(expr.args[0])
        kind: Literal["ns", "bs"] = "ns" if expr.function == "ns" else "bs"
        recorded = self._recorded(key, SplineBasis)
        if recorded is None:
            degree = 3 if kind == "ns" else int(dict(expr.keywords).get("degree", Number(3.0)).value)  # type: ignore[union-attr]
            spline = fit_spline(x, kind, int(_number(expr, "df")), degree, shown=f"formula {self.text!r}: {key}")
        else:
            assert isinstance(recorded, SplineBasis)
            spline = recorded
        self.fitted[key] = spline
        return _Numeric(spline_basis(x, spline), tuple(str(i) for i in range(1, spline.df + 1)))

    def _scale(self, expr: Call, key: str) -> _Numeric:
        x = self.arithmetic(expr.args[0])
        recorded = self._recorded(key, ScaleParameters)
        if recorded is None:
            recorded = fit_scale(x, shown=f"formula {self.text!r}: {key}")
        assert isinstance(recorded, ScaleParameters)
        self.fitted[key] = recorded
        return _Numeric(((x - recorded.center) / recorded.scale).reshape(-1, 1), ("",))

    def arithmetic(self, expr: Expr) -> np.ndarray:
        """An arithmetic expression as a float vector (one value per row); ``^`` is a power here."""
        n = len(self.data)
        return np.broadcast_to(np.asarray(self._value(expr), dtype=float), (n,)).copy()

    def _value(self, expr: Expr) -> np.ndarray | float:
        if isinstance(expr, Number):
            return expr.value
        if isinstance(expr, Name):
            if expr.id in CONSTANTS:
                return CONSTANTS[expr.id]
            column = self.data[expr.id]
            if not _is_numeric(column):
                raise FormulaError(f"formula {self.text!r}: column {expr.id!r} holds text; arithmetic needs numbers "
                                   f"(write factor({expr.id}) or {expr.id} alone for a categorical term)")
            return column.to_numpy(dtype=float)
        if isinstance(expr, Paren):
            return self._value(expr.inner)
        if isinstance(expr, Unary):
            operand = self._value(expr.operand)
            return -operand if expr.op == "-" else operand
        if isinstance(expr, Binary):
            base, chain = left_spine(expr)
            value = self._value(base)
            with np.errstate(all="ignore"):  # non-finite results are reported once, for the whole column
                for op, right in chain:
                    value = _OPERATORS[op](value, self._value(right))
            return value
        if isinstance(expr, Call) and expr.function == "I":
            return self._value(expr.args[0])
        assert isinstance(expr, Call) and expr.function in FUNCTIONS
        with np.errstate(all="ignore"):
            result: np.ndarray | float = getattr(np, FUNCTIONS[expr.function])(self._value(expr.args[0]))
        return result


_OPERATORS = {
    "+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "^": np.power,
}


def _number(call: Call, keyword: str) -> float:
    given = call.args[1] if len(call.args) > 1 else dict(call.keywords)[keyword]
    assert isinstance(given, Number)
    return given.value


def _is_numeric(column: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(column)) and not pd.api.types.is_bool_dtype(column)


# ------------------------------------------------------------------------------------------ rank check

#: Rows per block of the rank check's QR (a few MB per block: cache-sized pieces of a tall matrix).
_QR_BLOCK_ROWS = 65_536

#: The rank check's screen: X is of full rank, far from lme4's tolerance, when the smallest eigenvalue of X'X
#: with unit diagonal exceeds this (see ``_clearly_full_rank``).
_SCREEN_EIGENVALUE = 1e-6


def _drop_rank_deficient(X: np.ndarray, tol: float = 1e-7) -> tuple[np.ndarray, list[int]]:
    """Keep the columns that are not linear combinations of the kept columns before them, as lme4 does.

    R's ``qr(X, tol = 1e-7)`` (LINPACK ``dqrdc2``, which lme4's ``chkRank.drop.cols`` uses) moves a column to
    the end when its norm after projection on the kept earlier columns falls below ``tol`` times its own
    norm: the test is relative to each column, so rescaling a column (× 1e8) changes nothing, and of a
    collinear pair the later column goes. The projection runs on R of X = QR (the same geometry in p
    dimensions), computed block by block (tall-skinny QR: the R factors of row blocks, stacked, have the
    same R up to the signs of its rows), several times faster than one LAPACK QR of millions of rows.

    Most designs are far from that tolerance, which one pass over X shows (``_clearly_full_rank``: X'X, 0.9 ms
    where the QR took 2.3 ms at 200,000 rows × 5 columns); the QR runs only when that screen cannot tell.
    """
    n, p = X.shape
    if p == 0:
        return X, []
    if _clearly_full_rank(X):
        return X, list(range(p))
    R = _r_factor(X)
    norms = np.sqrt(np.einsum("ij,ij->j", R, R))
    basis = np.zeros((R.shape[0], 0))
    kept: list[int] = []
    for j in range(p):
        residual = R[:, j].copy()
        for _ in range(2):  # Gram-Schmidt twice is orthogonal to working precision
            residual -= basis @ (basis.T @ residual)
        size = float(np.linalg.norm(residual))
        if norms[j] == 0.0 or size < tol * norms[j]:
            continue
        kept.append(j)
        basis = np.column_stack([basis, residual / size])
    return (X if len(kept) == p else np.ascontiguousarray(X[:, kept])), kept


def _clearly_full_rank(X: np.ndarray) -> bool:
    """True when every column of X lies at least ~1e-3 of its norm from the span of all the others, so that
    ``_drop_rank_deficient``'s QR would keep every column (its threshold is 1e-7); False when that is not
    certain (then the QR decides, as before).

    With D the column norms, C = D⁻¹ X'X D⁻¹ has unit diagonal, and a column's distance from the span of the
    others, relative to its norm, is at least σ_min(X D⁻¹) = √λ_min(C). Rounding moves each computed entry of
    C by at most γ_n ≈ n u (u = 2⁻⁵³; sums of n products, bounded by the norms) and the eigenvalue by at most
    p γ_n + O(p² u): 4e-9 for 2,000,000 rows and 10 columns, far below the screen's 1e-6, whose square root
    1e-3 is 10⁴ times lme4's tolerance. Where that bound is not 100 times below the screen (some 45 million
    rows × columns), and for a zero or non-finite column, the screen is not tried.
    """
    n, p = X.shape
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is not finite, and not screened
        gram = X.T @ X
    norms = np.sqrt(np.diagonal(gram))
    rounding = p * (n + p) * np.finfo(float).eps
    if not (np.all(np.isfinite(gram)) and np.all(norms > 0.0)) or rounding > 0.01 * _SCREEN_EIGENVALUE:
        return False
    smallest = float(np.linalg.eigvalsh(gram / np.outer(norms, norms))[0])
    return smallest > _SCREEN_EIGENVALUE + rounding


def _r_factor(X: np.ndarray) -> np.ndarray:
    """R of X = QR (p × p when n ≥ p), from the R factors of blocks of rows."""
    n = X.shape[0]
    if n <= 2 * _QR_BLOCK_ROWS:
        return _qr_r(X)
    return _qr_r(np.vstack([_qr_r(X[start:start + _QR_BLOCK_ROWS]) for start in range(0, n, _QR_BLOCK_ROWS)]))


def _qr_r(X: np.ndarray) -> np.ndarray:
    R: np.ndarray = np.linalg.qr(X, mode="r")  # type: ignore[assignment]  # mode "r" returns R alone
    return R


# ------------------------------------------------------------------------------------------- new rows


def fixed_effects_matrix(
    data: pd.DataFrame, formula: ModelFormula, *, transforms: Mapping[str, Transform], dropped: Collection[str] = (),
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The fixed-effects matrix of ``formula`` on new rows and its column names, as R's
    ``model.matrix(delete.response(terms(fit)), newdata)`` that ``predict`` and emmeans build.

    ``data`` needs only the columns the fixed terms read (no outcome, no grouping factor). Data-dependent
    variables are evaluated with a fitted design's ``transforms`` (factor levels, poly's coefficients, spline
    knots; a level the fit did not see is an error) and the fitted design's ``dropped`` columns are left out,
    so the columns are those of the fit's β.
    """
    X_all, names = _Evaluator(data, formula.text, transforms).model_matrix(formula.fixed_terms)
    dropped_set = set(dropped)
    kept = [j for j, name in enumerate(names) if name not in dropped_set]
    return np.ascontiguousarray(X_all[:, kept]), tuple(names[j] for j in kept)


def random_effects_matrices(
    data: pd.DataFrame, formula: ModelFormula, *, transforms: Mapping[str, Transform],
) -> tuple[BlockDesign, ...]:
    """The random-effects bars of ``formula`` on new rows, one ``BlockDesign`` per bar as ``build_design`` builds
    them: ``Z`` evaluated with a fitted design's ``transforms`` (a factor slope's levels, poly's coefficients),
    and each row's level of the bar's grouping factor read as ``build_design`` reads it (text; an interaction
    labelled ``"a1:b1"``). ``levels`` are the labels present in ``data`` (not the fitted ones: a new level is
    not an error here; the caller decides what it predicts for it). ``data`` needs the columns the bars read.
    """
    evaluator = _Evaluator(data, formula.text, transforms)
    factors = {group: code_factor(data, group.split(":")) for group in formula.groups}
    blocks = []
    for block in formula.blocks:
        Z, z_names = evaluator.model_matrix(expand_terms(block.spec, where=f"formula {formula.text!r}"))
        codes, levels = factors[block.group]
        blocks.append(BlockDesign(group=block.group, terms=tuple(z_names), Z=Z, codes=codes, levels=levels))
    return tuple(blocks)
