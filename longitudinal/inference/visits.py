"""What the data hold at each visit, per group, before any model: subjects observed and the outcome's mean and SD,
and the dropout pattern (how many subjects were last seen at each visit, and the share still observed at or
after it). A reader checks these before trusting a longitudinal fit: a mean trajectory drawn through visits
that lost half of one arm describes the subjects who stayed.

The report (``longitudinal.reporting``) computes no statistics: it calls :func:`summarize_visits` and lays
out what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Up to this many distinct times, each is a visit; above, the times are cut into :data:`N_VISIT_BINS` bins.
MAX_VISITS = 30
#: Quantile bins of time when there are more than :data:`MAX_VISITS` distinct times.
N_VISIT_BINS = 10
#: The group's name when the subjects are not split into groups.
ALL_SUBJECTS = "all"
#: The group's name for rows whose group is missing.
MISSING_GROUP = "NA"


@dataclass(frozen=True)
class VisitSummary:
    """The per-visit tables of one data set.

    ``visits``: one row per visit, in time order: ``visit`` (0, 1, ...), ``time_low`` and ``time_high`` (the
    smallest and largest time in it: equal unless the times were binned).
    ``per_visit``: one row per visit and group (every pair, empty ones included): ``visit``, ``group``,
    ``subjects`` (distinct subjects with a row there), ``rows``, ``mean`` and ``sd`` of the outcome (over the
    rows; SD with ddof 1, NaN for fewer than two rows; for a 0/1 outcome the mean is the proportion of 1s).
    ``dropout``: one row per visit and group: ``visit``, ``group``, ``last_seen`` (subjects whose last visit
    it is), ``still_observed`` (subjects whose last visit is this one or a later one) and ``share_still_observed``
    (that over the group's subjects).
    ``groups`` in the order the tables use; ``n_times`` the number of distinct times; ``binned`` whether the
    visits are quantile bins of time.
    """

    visits: pd.DataFrame
    per_visit: pd.DataFrame
    dropout: pd.DataFrame
    groups: tuple[str, ...]
    n_times: int
    binned: bool


def summarize_visits(visits: pd.DataFrame, subject: str | Sequence[str], time: str, outcome: str,
                     group: str | None = None) -> VisitSummary:
    """Subjects observed and the outcome's mean (SD) per visit and group, and the dropout pattern.

    A visit is a distinct value of the numeric ``time``; with more than :data:`MAX_VISITS` distinct values,
    a quantile bin of time among :data:`N_VISIT_BINS` (right-closed as ``pandas.qcut``'s, duplicate edges
    merged, so tied times share a bin). ``subject`` is a column or several whose combination is the subject.
    A row counts where its subject, time and outcome are all present (booleans are 0/1); others are left out.
    Rows whose ``group`` is missing form the group :data:`MISSING_GROUP`; without ``group``, all subjects are
    one group, :data:`ALL_SUBJECTS`.

    A subject is last seen at the latest visit where it has a row, whatever visits it missed before (an
    intermittent gap is not dropout), and counted in the group of that last row.
    """
    subjects = _subject_codes(visits, [subject] if isinstance(subject, str) else list(subject))
    times = pd.to_numeric(visits[time], errors="coerce").to_numpy(dtype=float) if time in visits else \
        np.full(len(visits), np.nan)
    values = _numeric(visits[outcome]) if outcome in visits else np.full(len(visits), np.nan)
    keep = (subjects >= 0) & np.isfinite(times) & np.isfinite(values)
    rows = pd.DataFrame({"subject": subjects[keep], "time": times[keep], "y": values[keep],
                         "group": _group_labels(visits, group)[keep]})
    codes, n_times, binned = _visit_codes(rows["time"].to_numpy(dtype=float))
    rows = rows.assign(visit=codes)
    groups = tuple(sorted(rows["group"].unique(), key=str)) if len(rows) else (
        (ALL_SUBJECTS,) if group is None else ())
    table = rows.groupby("visit")["time"].agg(time_low="min", time_high="max").reset_index()
    every = pd.MultiIndex.from_product([table["visit"], list(groups)], names=["visit", "group"])
    return VisitSummary(visits=table, per_visit=_per_visit(rows, every), dropout=_dropout(rows, every),
                        groups=groups, n_times=n_times, binned=binned)


def _per_visit(rows: pd.DataFrame, every: pd.MultiIndex) -> pd.DataFrame:
    cells = rows.groupby(["visit", "group"], observed=True)
    table = pd.DataFrame({
        "subjects": cells["subject"].nunique(),
        "rows": cells.size(),
        "mean": cells["y"].mean(),
        "sd": cells["y"].std(ddof=1),
    }).reindex(every)
    counts = {"subjects": table["subjects"].fillna(0).astype(int), "rows": table["rows"].fillna(0).astype(int)}
    return table.assign(**counts).reset_index()


def _dropout(rows: pd.DataFrame, every: pd.MultiIndex) -> pd.DataFrame:
    last = rows.sort_values(["subject", "visit"], kind="stable").groupby("subject").tail(1)
    seen = last.groupby(["visit", "group"], observed=True).size().reindex(every, fill_value=0).astype(int)
    table = seen.rename("last_seen").reset_index()
    # Subjects still observed at a visit: those last seen there or later, a cumulative sum from the last visit.
    still = table.iloc[::-1].groupby("group", sort=False)["last_seen"].cumsum().iloc[::-1]
    totals = table.groupby("group")["last_seen"].transform("sum")
    return table.assign(still_observed=still.astype(int),
                        share_still_observed=still / totals.where(totals > 0, np.nan))


def _group_labels(visits: pd.DataFrame, group: str | None) -> np.ndarray | pd.Categorical:
    """Each row's group as text (:data:`MISSING_GROUP` where missing, :data:`ALL_SUBJECTS` without ``group``),
    coded: a text object per row would cost some 60 bytes a row (a few hundred MB at 2 million rows)."""
    if group is None or not len(visits):
        return np.full(len(visits), ALL_SUBJECTS if group is None else MISSING_GROUP, dtype=object)
    codes, uniques = pd.factorize(visits[group], use_na_sentinel=True)
    names = np.array([str(value) for value in uniques] + [MISSING_GROUP], dtype=object)
    merged, categories = pd.factorize(names)  # values shown alike are one group, as their text is
    return pd.Categorical.from_codes(merged[np.where(codes < 0, len(names) - 1, codes)],
                                     categories=categories.astype(object))


def _subject_codes(visits: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Each row's subject as an integer code, −1 where a part of the subject is missing (or a column absent)."""
    if not len(visits) or any(column not in visits for column in columns):
        return np.full(len(visits), -1, dtype=np.int64)
    if len(columns) == 1:
        codes, _ = pd.factorize(visits[columns[0]], use_na_sentinel=True)
        return np.asarray(codes, dtype=np.int64)
    numbered = visits.groupby(columns, sort=False, dropna=True).ngroup()
    return numbered.fillna(-1).to_numpy(dtype=np.int64)


def _numeric(values: pd.Series) -> np.ndarray:
    """The outcome as floats: booleans as 0/1, anything not a number as NaN."""
    if values.dtype == object and values.map(lambda v: isinstance(v, (bool, np.bool_))).any():
        values = values.map(lambda v: float(v) if isinstance(v, (bool, np.bool_)) else v)
    if pd.api.types.is_bool_dtype(values):
        return values.astype(float).to_numpy(dtype=float, na_value=np.nan)
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _visit_codes(times: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """Each time's visit (0, 1, ... in time order), the number of distinct times and whether they were binned."""
    levels = np.unique(times)
    if len(levels) <= MAX_VISITS:
        return np.searchsorted(levels, times).astype(np.int64), len(levels), False
    edges = np.unique(np.quantile(times, np.linspace(0.0, 1.0, N_VISIT_BINS + 1)))
    bins = np.clip(np.searchsorted(edges, times, side="left") - 1, 0, len(edges) - 2)
    _, codes = np.unique(bins, return_inverse=True)  # renumbered, so that no visit is empty
    return codes.astype(np.int64), len(levels), True
