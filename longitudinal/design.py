"""Model matrices for a parsed formula, named the way lme4 names them.

The fixed-effects matrix follows R's model.matrix: treatment contrasts with the first level (sorted)
as reference for text columns, ``a * b`` expanded to main effects and interaction. Column names are
lme4's (``(Intercept)``, ``armtreatment``, ``week:armtreatment``, ``I(week^2)``), so that estimates can
be compared by name with lme4's output. Rank-deficient fixed-effect columns are dropped, as lmer does,
and listed in ``Design.dropped``.

Each random-effects bar has its own grouping factor (``BlockDesign.codes``/``levels``). An interaction factor
``a:b`` has one level per combination present in the data, labelled ``"<a level>:<b level>"`` and ordered
with ``a`` varying slowest, as lme4 builds it (``droplevels(a:b)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from longitudinal.errors import FormulaError
from longitudinal.formula import FUNCTIONS, ModelFormula, to_patsy


@dataclass(frozen=True, eq=False)
class BlockDesign:
    """One random-effects bar: its model matrix ``Z`` (n × q), lme4's term names and its grouping factor.

    ``codes`` maps each row to its level of ``group`` (0..G-1), ``levels`` are the level labels (sorted as
    R sorts them for these labels; bars on the same factor share the same arrays).
    """

    group: str
    terms: tuple[str, ...]
    Z: np.ndarray
    codes: np.ndarray
    levels: np.ndarray

    @property
    def n_levels(self) -> int:
        return int(self.levels.shape[0])


@dataclass(frozen=True, eq=False)
class Design:
    """Response, fixed-effects matrix and random-effects blocks of one candidate on one data set.

    ``group``, ``codes`` and ``levels`` describe the primary grouping factor: the only one when every bar
    shares one factor (the longitudinal subject); with several factors (nested or crossed), the one with
    the most levels (the finest: ``school:pupil`` in ``(1 | school/pupil)``, ``patient`` in
    ``(t | patient) + (1 | rater)``; the first in formula order on a tie). ``codes`` maps each row to its
    level (0..G-1, ``levels`` sorted as R sorts factor levels for these labels). Every bar also carries
    its own factor's codes and levels. Rows are in the order of the data frame given.
    """

    y: np.ndarray
    X: np.ndarray
    fixed_names: tuple[str, ...]
    dropped: tuple[str, ...]
    blocks: tuple[BlockDesign, ...]
    group: str
    codes: np.ndarray
    levels: np.ndarray

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
        """All blocks side by side (n × q), the per-group columns of the random effects."""
        return np.hstack([block.Z for block in self.blocks])


def build_design(data: pd.DataFrame, formula: ModelFormula) -> Design:
    """Build the matrices of ``formula`` on ``data`` (typed: numbers as floats, categoricals as text).

    Missing values are not handled here: validation removes every row with a missing value in a column
    any candidate uses, so all candidates are fitted on the same rows. A missing value reaching this
    point is an error.
    """
    import patsy  # statsmodels' formula dependency; imported here to keep `import longitudinal` light

    frame = _model_frame(data, formula)
    env = patsy.EvalEnvironment([{name: getattr(np, fn) for name, fn in FUNCTIONS.items()}])
    y = frame[formula.response].to_numpy(dtype=float)
    X_all, columns = _dmatrix(patsy, to_patsy(formula.fixed), frame, env, formula.fixed)
    names = [_lme4_name(c) for c in columns]
    X, kept = _drop_rank_deficient(X_all)
    factors = {group: code_factor(data, group.split(":")) for group in formula.groups}
    blocks = []
    for block in formula.blocks:
        spec = " + ".join(("1" if block.intercept else "0",) + tuple(to_patsy(t) for t in block.terms if t != "1"))
        Z, z_columns = _dmatrix(patsy, spec, frame, env, " + ".join(block.terms))
        codes, levels = factors[block.group]
        blocks.append(BlockDesign(
            group=block.group,
            terms=tuple(_lme4_name(c) for c in z_columns),
            Z=Z,
            codes=codes,
            levels=levels,
        ))
    # The primary factor: the one with the most levels, first in formula order on a tie.
    group = max(formula.groups, key=lambda name: (factors[name][1].shape[0], -formula.groups.index(name)))
    codes, levels = factors[group]
    return Design(
        y=y,
        X=X,
        fixed_names=tuple(names[i] for i in kept),
        dropped=tuple(name for i, name in enumerate(names) if i not in set(kept)),
        blocks=tuple(blocks),
        group=group,
        codes=codes,
        levels=levels,
    )


def code_factor(data: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Codes (0..G-1 per row) and labels of the grouping factor made of ``columns`` (one, or an interaction).

    Each column's values are read as text and sorted; an interaction keeps only the combinations present,
    ordered with the first column varying slowest and labelled ``"a:b"``, as lme4's ``droplevels(a:b)``.
    """
    parts = [_sorted_codes(data[column]) for column in columns]
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


def _model_frame(data: pd.DataFrame, formula: ModelFormula) -> pd.DataFrame:
    missing = sorted(formula.columns - set(data.columns))
    if missing:
        raise FormulaError(f"formula {formula.text!r} uses column {missing[0]!r}, which the data lack")
    frame = data.loc[:, sorted(formula.columns)].reset_index(drop=True)
    holes = [c for c in frame.columns if frame[c].isna().any()]
    if holes:
        raise FormulaError(f"column {holes[0]!r} has missing values; validation should have removed those rows")
    # Text columns read by a term become categoricals with sorted levels, as R's factor() orders them.
    # A column that is only a grouping factor is coded by ``code_factor`` instead: converting it here
    # (one category per subject) would cost more than the rest of the design.
    named = set(_NAME_TOKEN.findall(" + ".join((formula.fixed, *(t for b in formula.blocks for t in b.terms)))))
    converted = {}
    for column in frame.columns:
        if column in named and column != formula.response and not pd.api.types.is_numeric_dtype(frame[column]):
            codes, levels = _sorted_codes(frame[column])
            converted[column] = pd.Categorical.from_codes(codes, categories=pd.Index(levels, dtype="str"))
    return frame.assign(**converted) if converted else frame


#: Anything that may be a column name inside a term (function names too: converting more is harmless).
_NAME_TOKEN = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")


def _sorted_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes (int64) and labels of ``values`` read as text, labels in sorted (code point) order.

    ``pd.factorize(sort=True)`` on the text column sorts as Python's ``sorted`` does, without turning
    every value into a Python object first (5-10× faster on a column of subject identifiers).
    """
    codes, levels = pd.factorize(values.astype(str), sort=True)
    return codes.astype(np.int64, copy=False), np.asarray(levels, dtype=object)


def _dmatrix(patsy: object, spec: str, frame: pd.DataFrame, env: object, shown: str) -> tuple[np.ndarray, list[str]]:
    """patsy's model matrix (C-contiguous floats) and its column names.

    Taken as patsy's own array, not as a data frame: a frame copies the matrix, and reading it back
    copies it again (two needless passes over millions of rows).
    """
    try:
        matrix = patsy.dmatrix(spec, frame, eval_env=env, return_type="matrix", NA_action="raise")  # type: ignore[attr-defined]
    except Exception as exc:  # patsy raises its own PatsyError and plain Python errors from evaluating terms
        raise FormulaError(f"cannot build the model matrix for {shown!r}: {' '.join(str(exc).split())}") from None
    columns = list(matrix.design_info.column_names)
    return np.ascontiguousarray(np.asarray(matrix, dtype=float)), columns


#: Rows per block of the rank check's QR (a few MB per block: cache-sized pieces of a tall matrix).
_QR_BLOCK_ROWS = 65_536


def _drop_rank_deficient(X: np.ndarray, tol: float = 1e-7) -> tuple[np.ndarray, list[int]]:
    """Keep the columns that are not linear combinations of the columns before them.

    The test reads |diag R| of X = QR, with R computed block by block (tall-skinny QR: the R factors of
    row blocks, stacked, have the same R up to the signs of its rows), several times faster than one
    LAPACK QR of millions of rows and as stable.
    """
    n, p = X.shape
    if p == 0:
        return X, []
    R = _r_factor(X)
    diag = np.abs(np.diag(R))
    scale = max(float(diag.max()), 1e-300)
    kept = [j for j in range(p) if diag[j] > tol * scale]
    return (X if len(kept) == p else np.ascontiguousarray(X[:, kept])), kept


def _r_factor(X: np.ndarray) -> np.ndarray:
    """R of X = QR (p × p when n ≥ p), from the R factors of blocks of rows."""
    n = X.shape[0]
    if n <= 2 * _QR_BLOCK_ROWS:
        return _qr_r(X)
    return _qr_r(np.vstack([_qr_r(X[start:start + _QR_BLOCK_ROWS]) for start in range(0, n, _QR_BLOCK_ROWS)]))


def _qr_r(X: np.ndarray) -> np.ndarray:
    R: np.ndarray = np.linalg.qr(X, mode="r")  # type: ignore[assignment]  # mode "r" returns R alone
    return R


_LEVEL = re.compile(r"^(?P<code>.*)\[(?:T\.)?(?P<level>.*)\]$")


def _lme4_name(column: str) -> str:
    """patsy's column name to lme4's: ``Intercept`` → ``(Intercept)``, ``arm[T.b]`` → ``armb``."""
    if column == "Intercept":
        return "(Intercept)"
    return ":".join(_lme4_factor(part) for part in _split_colon(column))


def _lme4_factor(part: str) -> str:
    match = _LEVEL.match(part)
    if match and not part.startswith("I("):
        return match.group("code") + match.group("level")
    return _r_code(part)


def _r_code(code: str) -> str:
    # Undo to_patsy for display: 'I(week ** 2)' → 'I(week^2)'.
    return code.replace(" ** ", "^").replace("**", "^")


def _split_colon(name: str) -> list[str]:
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(name):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == ":" and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    parts.append(name[start:])
    return parts
