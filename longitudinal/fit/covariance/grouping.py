"""The rows of a structured-covariance model arranged by subject, so that ℓ costs no Python loop over subjects.

A subject's marginal covariance is V_i = Z_i G Z_iᵀ + σ² R_i (or + Σ_i for the heterogeneous structures),
R_i the structure at the subject's visit coordinates. Subjects observed at the same coordinates share V_i when
their random-effects rows Z_i are the same too (no random effects; or Z a function of the visit alone, as
``(1 | id)`` or ``(t | id)`` with t the visit's time): such a *visit pattern* needs one Cholesky factor for
all its subjects, which ℓ reads through their cross-products (``VisitPattern``). Every other subject
(irregular times, a slope on a time-varying covariate, a pattern shared by fewer than ``MIN_SHARED``) has its
own V_i: those are stacked by number of visits into ``SubjectBatch``es, whose g factorizations are batched
numpy calls. Either way the work is array arithmetic over a handful of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from longitudinal.errors import DataError

#: A visit pattern shared by fewer subjects than this joins the batches: a pattern costs about 50 µs per
#: evaluation of ℓ whatever its size (a few small numpy calls), a batched subject 1–2 µs (3–5 visits, 2 fixed
#: effects; 20,000 subjects in 957 patterns of about 21: 1.0 s shared, 0.47 s batched).
MIN_SHARED = 32


@dataclass(frozen=True, eq=False)
class VisitPattern:
    """Subjects observed at exactly the coordinates ``coords`` (s,) (visit indices, or times for sp_exp)
    with the same random-effects rows ``Z`` (s, q): one V for all of them.

    ``rows`` (g, s): each subject's rows of the data in visit order; ``subjects`` (g,): their positions in
    ``PatternGroups.subjects``; ``y`` (g, s) and ``X`` (g, s, p). ℓ reads only their ``crossproducts``.
    """

    coords: np.ndarray
    rows: np.ndarray
    subjects: np.ndarray
    y: np.ndarray
    X: np.ndarray
    Z: np.ndarray

    @property
    def n_subjects(self) -> int:
        return self.rows.shape[0]

    @cached_property
    def crossproducts(self) -> CrossProducts:
        """Σ_i over the pattern's subjects of X_i ⊗ X_i, X_i ⊗ y_i and y_i ⊗ y_i: all that ℓ needs of them."""
        g, s, p = self.X.shape
        data = np.concatenate([self.X, self.y[:, :, None]], axis=2).reshape(g, s * (p + 1))
        products = (data.T @ data).reshape(s, p + 1, s, p + 1).transpose(0, 2, 1, 3)  # one tall-skinny product
        return CrossProducts(XX=np.ascontiguousarray(products[:, :, :p, :p]),
                             Xy=np.ascontiguousarray(products[:, :, :p, p]),
                             yy=np.ascontiguousarray(products[:, :, p, p]))


@dataclass(frozen=True, eq=False)
class CrossProducts:
    """A pattern's sums over its subjects i: ``XX`` (s, s, p, p) [a, b] = Σ_i X_i[a]ᵀ X_i[b] (rows a and b of
    X_i), ``Xy`` (s, s, p) [a, b] = Σ_i X_i[a] y_i[b], ``yy`` (s, s) = Σ_i y_i y_iᵀ. With them ℓ costs
    O(s² p²) per pattern and evaluation, whatever the number of subjects (lme4's Z'Z trick for patterns)."""

    XX: np.ndarray
    Xy: np.ndarray
    yy: np.ndarray


@dataclass(frozen=True, eq=False)
class SubjectBatch:
    """g subjects with s visits each, each with its own V_i: stacked subject-major.

    ``coords`` (g, s), ``rows`` (g, s), ``subjects`` (g,), ``y`` (g, s), ``X`` (g, s, p), ``Z`` (g, s, q).
    """

    coords: np.ndarray
    rows: np.ndarray
    subjects: np.ndarray
    y: np.ndarray
    X: np.ndarray
    Z: np.ndarray

    @property
    def n_subjects(self) -> int:
        return self.rows.shape[0]


@dataclass(frozen=True, eq=False)
class PatternGroups:
    """The data arranged by subject: shared ``patterns`` (ordered by size, then coordinates) and per-subject
    ``batches`` (one per number of visits). ``subjects`` are the subject labels in order of first
    appearance (the order of per-subject results); ``n_obs`` rows, ``n_fixed`` columns of X, ``n_random``
    columns of Z, ``n_visit_patterns`` distinct sets of visit coordinates."""

    patterns: tuple[VisitPattern, ...]
    batches: tuple[SubjectBatch, ...]
    subjects: np.ndarray
    n_obs: int
    n_fixed: int
    n_random: int
    n_visit_patterns: int

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    def blocks(self) -> tuple[VisitPattern | SubjectBatch, ...]:
        return (*self.patterns, *self.batches)

    def scatter(self, per_block: list[np.ndarray]) -> np.ndarray:
        """Per-row values computed block by block ((g, s) each, in the order of ``blocks()``) put back in the
        rows' input order."""
        out = np.empty(self.n_obs)
        for block, values in zip(self.blocks(), per_block):
            out[block.rows] = values
        return out


def group_by_pattern(
    y: np.ndarray, X: np.ndarray, subject: np.ndarray, coords: np.ndarray, Z: np.ndarray | None = None,
) -> PatternGroups:
    """Arrange rows (outcome ``y``, fixed-effect matrix ``X``, subject labels, visit coordinates, and the
    random-effects model matrix ``Z`` (n, q) of the subject's one bar, None or (n, 0) for none) by subject.

    ``coords`` are visit indices 0..m−1 for the visit structures, times for ``sp_exp``. Rows with a missing
    value must have been removed already; a subject with two rows at the same coordinate raises ``DataError``.
    """
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    coords = np.asarray(coords)
    n = y.shape[0]
    Z = np.zeros((n, 0)) if Z is None else np.asarray(Z, dtype=float)
    if X.ndim != 2 or X.shape[0] != n or len(subject) != n or coords.shape != (n,) or Z.ndim != 2 \
            or Z.shape[0] != n:
        raise DataError(f"y, X, subject, coords and Z must have the same number of rows; got {n}, {X.shape}, "
                        f"{len(subject)}, {coords.shape} and {Z.shape}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(X)) and np.all(np.isfinite(coords.astype(float)))
            and np.all(np.isfinite(Z))):
        raise DataError("y, X, Z and the visit coordinates must have no missing or infinite values; "
                        "drop those rows first")
    labelled = subject if isinstance(subject, (np.ndarray, pd.Series, pd.Index)) else np.asarray(subject, dtype=object)
    codes, labels = pd.factorize(labelled, sort=False)
    following = (codes[1:] > codes[:-1]) | ((codes[1:] == codes[:-1]) & (coords[1:] > coords[:-1]))
    order = np.arange(n) if bool(np.all(following)) else np.lexsort((coords, codes))  # by subject, then visit
    sorted_codes, sorted_coords = codes[order], coords[order]
    repeated = (sorted_codes[1:] == sorted_codes[:-1]) & (sorted_coords[1:] == sorted_coords[:-1])
    if repeated.any():
        at = order[1:][repeated][0]
        label, visit = np.asarray(subject)[at:at + 1].tolist()[0], coords[at:at + 1].tolist()[0]
        raise DataError(f"subject {label!r} has more than one row at visit {visit!r}; "
                        "a subject is observed at most once per visit")
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    sizes = np.diff(np.r_[starts, n])
    patterns: list[VisitPattern] = []
    batches: list[SubjectBatch] = []
    n_visit_patterns = 0
    for size in np.unique(sizes):
        rows = order[starts[sizes == size][:, None] + np.arange(size)]  # (subjects of this size, size)
        unique, which, counts = distinct_rows(coords[rows])
        n_visit_patterns += len(unique)
        alone = np.ones(rows.shape[0], dtype=bool)
        by_pattern = np.split(np.argsort(which, kind="stable"), np.cumsum(counts)[:-1])
        for k in np.flatnonzero(counts >= MIN_SHARED):
            members = by_pattern[k]
            pattern_rows = rows[members]
            Zp = Z[pattern_rows]  # (g, s, q)
            if not np.array_equal(Zp, np.broadcast_to(Zp[:1], Zp.shape)):
                continue  # the same visits but subject-specific Z: V differs, so batched
            alone[members] = False
            patterns.append(VisitPattern(
                coords=unique[k], rows=pattern_rows, subjects=codes[pattern_rows[:, 0]], y=y[pattern_rows],
                X=X[pattern_rows], Z=np.ascontiguousarray(Zp[0]),
            ))
        if alone.any():
            batch_rows = rows[alone]
            batches.append(SubjectBatch(
                coords=coords[batch_rows], rows=batch_rows, subjects=codes[batch_rows[:, 0]], y=y[batch_rows],
                X=X[batch_rows], Z=Z[batch_rows],
            ))
    return PatternGroups(
        patterns=tuple(patterns), batches=tuple(batches), subjects=np.asarray(labels), n_obs=n,
        n_fixed=X.shape[1], n_random=Z.shape[1], n_visit_patterns=n_visit_patterns,
    )


def distinct_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, axis=0, return_inverse=True, return_counts=True)`` for a (g, s) array, by one
    lexsort over its columns (numpy's sorts rows as opaque records: 10× slower on 20,000 subjects)."""
    order = np.lexsort(values.T[::-1])
    ordered = values[order]
    new = np.r_[True, np.any(ordered[1:] != ordered[:-1], axis=1)]
    which = np.empty(len(values), dtype=np.intp)
    which[order] = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    return ordered[starts], which, np.diff(np.r_[starts, len(values)])
