"""Validation: decide which rows are analysed and set the others aside, each with one reason.

The checks run as great-expectations 1.x expectations on an ephemeral context (imported lazily: the
import costs seconds). Table-level expectations fail the run (:func:`ensure_valid`); row-level ones
quarantine rows. Each quarantined row gets the reason of the first rule it breaks, in this order:

0. a repeated header line; 1. subject missing (any of its columns); 2. time missing, 3. time not a
number (not an ISO date when the column holds dates); 4. outcome missing, 5. outcome not a number (for
a binomial outcome: not binary, see below; for a Poisson outcome also: not a count, a whole number ≥ 0);
6. outcome outside ``validation.outcome_range``; 7. the same (subject, time) twice among the rows still
in: an exact duplicate (equal in every data column) keeps its first copy, conflicting copies all go;
8. a covariate used by a candidate model missing (or not a number); 9. a ``data.constant`` column
taking two values within a subject (every row of that subject goes); 10. a subject left with fewer
than ``validation.min_observations_per_subject`` rows.

A missing required column counts as missing in every row, so the accounting stays whole:
``rows_read == rows_analysed + rows_quarantined`` always holds.

The family (``models.family``) decides what an outcome may be. A binomial outcome is 0 or 1 as a number,
FALSE or TRUE as text or a boolean (R's spellings: also false/true, False/True), or, when
``data.outcome_levels`` names them, exactly those two texts (case-sensitive, as R's factor levels; the
second is 1); ``visits`` holds it as 0.0/1.0, ``quarantine`` as it was written. A Poisson outcome is a
count: a whole number ≥ 0 (2.0 is 2; 2.5 and -1 are quarantined). Outside the Gaussian family an outcome
that takes one value in every row analysed fails the run (there is nothing to fit), while a subject whose
outcome never changes is kept: it tells how far subjects differ.

Warning-level checks (level "warning") report what a person should look at without failing the run or
quarantining anything: subject ids that differ only by leading zeros or letter case.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from longitudinal.config import StudyConfig
from longitudinal.data.ingest import (
    decimal_comma_hint_for, describe_no_rows, did_you_mean, is_missing, parse_numbers, to_text,
)
from longitudinal.errors import DataError
from longitudinal.records import SOURCE_COLUMNS, ExpectationOutcome, Ingested, TimeFromDates, Validated

MIN_SUBJECTS = 3
QUARANTINE_FILE = "quarantine.csv"

_PREFIX = "__lv_"
_ELIGIBLE_FOR_DUPLICATES = f"{_PREFIX}dup_eligible"
_SUBJECT_ROWS = f"{_PREFIX}subject_rows"
_SURVIVOR = f"{_PREFIX}survivor"
_KEPT = f"{_PREFIX}kept"
_KEY = f"{_PREFIX}subject"
_HEADER_LINE = f"{_PREFIX}header_line"
_COUNT = f"{_PREFIX}count"
_PER_COLUMN_RULES = ("covariate_", "constant_")
_TEXT = pd.StringDtype("pyarrow", na_value=np.nan)  # pandas' default ``str`` dtype
#: Joins the parts of a subject given by several columns: lme4 labels the levels of dog:side "D1:L".
KEY_SEPARATOR = ":"
#: A binomial outcome's texts without ``data.outcome_levels``: R's logical spellings (``as.logical``'s, less
#: its one-letter T and F, which are as often initials), with the value each is analysed as.
BINARY_TEXT: dict[str, float] = {"FALSE": 0.0, "false": 0.0, "False": 0.0, "TRUE": 1.0, "true": 1.0, "True": 1.0}

_GX = "great_expectations "
_CHECKS = {
    "subject_present": _GX + "expect_column_values_to_not_be_null",
    "time_present": _GX + "expect_column_values_to_not_be_null on the value as read",
    "time_is_number": _GX + "expect_column_values_to_not_be_null on the value as a number",
    "outcome_present": _GX + "expect_column_values_to_not_be_null on the value as read",
    "outcome_is_number": _GX + "expect_column_values_to_not_be_null on the value as a number",
    "outcome_is_binary": _GX + "expect_column_values_to_not_be_null on the value coded 0/1 (coded in pandas)",
    "outcome_is_count": "whole numbers ≥ 0 found in pandas, then " + _GX + "expect_column_values_to_be_between",
    "outcome_in_range": _GX + "expect_column_values_to_be_between",
    "no_exact_duplicates": _GX + "expect_compound_columns_to_be_unique; copies equal in every column told apart in pandas",
    "no_conflicting_duplicates": _GX + "expect_compound_columns_to_be_unique; copies that differ told apart in pandas",
    "covariate_present": _GX + "expect_column_values_to_not_be_null on the value as read",
    "covariate_is_number": _GX + "expect_column_values_to_not_be_null on the value as a number",
    "not_a_header_line": "rows whose subject, time and outcome cells equal the column names, found in pandas, then "
    + _GX + "expect_column_values_to_be_between",
    "constant_within_subject": "distinct values per subject counted in pandas, then " + _GX + "expect_column_values_to_be_between",
    "min_observations_per_subject": "rows per subject counted in pandas, then " + _GX + "expect_column_values_to_be_between",
}



@dataclass(frozen=True)
class _Rule:
    """A row rule: where it fails (positions), the reason text for each failing row (indexed by its position:
    only the failing rows, so that a dozen rules over millions of rows do not hold a dozen columns of NaN), and
    that reason without the values (``label``: what the run's error names when the rule emptied the data)."""

    name: str
    column: str | None
    description: str
    failing: np.ndarray
    reasons: pd.Series
    label: str


def validate_visits(ingested: Ingested, config: StudyConfig, covariates: Collection[str]) -> Validated:
    """Run the table- and row-level checks; return the rows to analyse and the quarantine.

    ``covariates`` are the columns other than subject, time and outcome that any candidate uses: a row
    missing one of them is quarantined so that every candidate is fitted on the same rows. A covariate
    not listed in ``data.categorical`` whose values are mostly numbers is analysed as a number, and a
    row where it is not one is quarantined. When ``data.subject`` names several columns, their
    combination is the subject throughout, and ``visits`` gains the text column ``data.subject_key``
    ("dog:side", values "D1:L") next to the original columns. ``visits`` keeps the index labels of
    ``ingested.typed`` and is sorted by subject (numerically when every id is a number) then time; its text
    columns are pandas categoricals of the values analysed (:func:`_take_text_as_categories`: a fraction of
    the memory). ``quarantine`` keeps read order, the same index labels and the values as read.

    The rules are listed in the order that decides each row's reason (module docstring). Three
    great-expectations validations find the failing rows: each row on its own, then groups of rows
    (duplicate visits, ``data.constant``) among what the first rules left, then subjects among the rest.
    """
    v = _prepare(ingested, config, covariates)
    rows = _check_rows(v)
    rules = [
        _repeated_header_line(v, rows),
        *_subject_missing(v, rows),
        _time_missing(v, rows),
        _time_not_a_number(v, rows),
        _outcome_missing(v, rows),
        _outcome_not_binary(v, rows) if v.family == "binomial" else _outcome_not_a_number(v, rows),
        *_outcome_not_a_count(v, rows),
        *_outcome_out_of_range(v, rows),
    ]
    eligible = ~_any_failure(rules, v.n)
    groups = _check_groups(v, eligible)
    rules += [
        *_duplicate_visits(v, groups, eligible),
        *_covariate_missing_or_not_a_number(v, rows),
        *_constant_changes_within_subject(v, groups),
    ]
    counts = _count_subject_rows(v, survivor=~_any_failure(rules, v.n))
    rules.append(_too_few_rows(v, counts))

    reason = _assign_reasons(rules, v.n)
    outcomes = (
        *ingested.findings,  # links and other entries ingestion skipped, first
        *_table_outcomes(v, rows, ingested),
        *_row_outcomes(v, rules, reason),
        _enough_subjects(v, counts),
        *_outcome_varies(v, counts),
        _lookalike_ids(v.key[counts.kept], config.data.subject_key),
    )
    visits, quarantine = _split_rows(v, _reason_texts(rules, reason, v.n), counts.kept)
    return Validated(visits=visits, quarantine=quarantine, expectations=outcomes, rows_read=v.n)


# ------------------------------------------------------------------------------- the rows under check


@dataclass(frozen=True, eq=False)
class _Visits:
    """The rows under validation, by position 0..n-1, and what the rules read from the config.

    ``typed`` has the numeric covariates parsed (:func:`_numeric_covariates`); ``labels`` are the index
    labels of ``Ingested.typed``, given back to the rows at the end. ``key`` is each row's subject as text.
    """

    config: StudyConfig
    raw: pd.DataFrame
    typed: pd.DataFrame
    labels: pd.Index
    dates: TimeFromDates | None
    covariates: tuple[str, ...]
    numeric_covariates: tuple[str, ...]
    constant: tuple[str, ...]
    required: tuple[str, ...]
    present: frozenset[str]
    data_columns: list[str]
    key: pd.Series

    @property
    def n(self) -> int:
        return len(self.typed)

    @property
    def subjects(self) -> tuple[str, ...]:
        return self.config.data.subject_columns

    @property
    def time(self) -> str:
        return self.config.data.time

    @property
    def outcome(self) -> str:
        return self.config.data.outcome

    @property
    def family(self) -> str:
        return self.config.models.family

    @property
    def checked_constant(self) -> list[str]:
        """The ``data.constant`` columns the data have (an absent one is a missing required column)."""
        return [c for c in self.constant if c in self.present]

    def as_read(self, column: str) -> pd.Series | None:
        """``column`` as read (None when the data lack it), for reasons that show the value."""
        return self.raw[column] if column in self.present else None


def _prepare(ingested: Ingested, config: StudyConfig, covariates: Collection[str]) -> _Visits:
    data = config.data
    covariates = tuple(dict.fromkeys(c for c in covariates if c not in data.roles))
    constant = tuple(dict.fromkeys(data.constant))
    typed = ingested.typed.reset_index(drop=True)
    raw = ingested.raw.reset_index(drop=True)
    if config.models.family == "binomial" and data.outcome in typed.columns:
        typed = typed.assign(**{data.outcome: binary_outcome(raw[data.outcome], typed[data.outcome], data.outcome_levels)})
    numeric_covariates = _numeric_covariates(typed, covariates, config)
    required = tuple(dict.fromkeys((*data.subject_columns, data.time, data.outcome, *covariates, *constant)))
    return _Visits(
        config=config,
        raw=raw,
        typed=typed.assign(**{c: parse_numbers(typed[c], decimal_comma=True) for c in numeric_covariates}),
        labels=ingested.typed.index,
        dates=ingested.dates,
        covariates=covariates,
        numeric_covariates=numeric_covariates,
        constant=constant,
        required=required,
        present=frozenset(c for c in required if c in typed.columns),
        data_columns=[c for c in typed.columns if c not in SOURCE_COLUMNS],
        key=_subject_key(typed, data.subject_columns),
    )


# ------------------------------------------------------------------ the three great-expectations passes


def _check_rows(v: _Visits) -> _Stage:
    """The table-level basics (required columns, at least one row) and every check of a row on its own."""
    stage = _Stage()
    for column in v.required:
        stage.expect("column_exists", column, "ExpectColumnToExist", column=column)
    stage.expect("table_has_rows", None, "ExpectTableRowCountToBeBetween", min_value=1)
    present = [c for c in v.required if c in v.present]
    frame = v.typed[present]  # a new frame sharing the columns (copy on write): the flags below are added to it alone
    for column in present:
        if column not in v.subjects:
            # "Was a value read?" as 1.0 / NaN: the same null check as on the raw text, without handing
            # great-expectations millions of strings to fingerprint (it hashes every batch frame).
            frame[_read(column)] = np.where(is_missing(v.raw[column]), np.nan, 1.0)
    frame[_HEADER_LINE] = _repeated_header(v.raw, [c for c in (*v.subjects, v.time, v.outcome) if c in v.present])
    stage.expect("not_a_header_line", None, "ExpectColumnValuesToBeBetween", column=_HEADER_LINE, max_value=0)
    for column in v.subjects:
        if column in v.present:
            stage.expect("subject_present", column, "ExpectColumnValuesToNotBeNull", column=column)
    for column in (v.time, v.outcome):
        if column in v.present:
            role = _role_of(column, v.config)
            stage.expect(f"{role}_present", column, "ExpectColumnValuesToNotBeNull", column=_read(column))
            is_binary = column == v.outcome and v.family == "binomial"  # the outcome coded 0/1 by _prepare
            stage.expect("outcome_is_binary" if is_binary else f"{role}_is_number", column,
                         "ExpectColumnValuesToNotBeNull", column=column)
    if v.family == "poisson" and v.outcome in v.present:
        frame[_COUNT] = _is_count(v.typed[v.outcome])
        stage.expect("outcome_is_count", v.outcome, "ExpectColumnValuesToBeBetween", column=_COUNT, min_value=1)
    low_high = v.config.validation.outcome_range
    if low_high is not None and v.outcome in v.present:
        stage.expect(
            "outcome_in_range", v.outcome, "ExpectColumnValuesToBeBetween", column=v.outcome,
            min_value=low_high[0], max_value=low_high[1],
        )
    for column in v.covariates:
        if column in v.present:
            stage.expect("covariate_present", column, "ExpectColumnValuesToNotBeNull", column=_read(column))
            if column in v.numeric_covariates:
                stage.expect("covariate_is_number", column, "ExpectColumnValuesToNotBeNull", column=column)
    return stage.run(frame)


def _check_groups(v: _Visits, eligible: np.ndarray) -> _Stage:
    """The checks of groups of rows: the same (subject, time) twice among the ``eligible`` rows (those the
    checks of a row on its own left), and ``data.constant`` columns changing within a subject (judged on
    every row whose subject is known)."""
    stage = _Stage()
    frame = pd.DataFrame(index=range(v.n))
    if eligible.any():
        frame = frame.assign(**{c: v.typed[c] for c in (*v.subjects, v.time)}, **{_ELIGIBLE_FOR_DUPLICATES: eligible})
        stage.expect(
            "unique_subject_time", None, "ExpectCompoundColumnsToBeUnique", column_list=[*v.subjects, v.time],
            only_where=_ELIGIBLE_FOR_DUPLICATES,
        )
    for column in v.checked_constant:
        frame[_distinct(column)] = _distinct_within(v.typed[column], v.key)
        stage.expect("constant_within_subject", column, "ExpectColumnValuesToBeBetween", column=_distinct(column), max_value=1)
    return stage.run(frame)


@dataclass(frozen=True, eq=False)
class _SubjectRows:
    """Rows per subject among the ``survivor`` rows (no earlier rule quarantined them), and the verdicts."""

    survivor: np.ndarray
    rows: np.ndarray
    """For each survivor, its subject's number of surviving rows (0 for the other rows)."""
    too_few: np.ndarray
    enough_subjects: bool | None
    """great-expectations' verdict on the subjects kept; None when it had no row to judge."""
    outcome_varies: bool | None = None
    """Its verdict on whether the outcome kept takes two values or more (binomial and Poisson only); None
    when it had no row to judge or the family is Gaussian."""

    @property
    def kept(self) -> np.ndarray:
        return self.survivor & ~self.too_few


def _count_subject_rows(v: _Visits, survivor: np.ndarray) -> _SubjectRows:
    """Rows per subject counted in pandas; great-expectations then finds the subjects below the minimum
    and judges whether enough subjects are left (and, for a binomial or Poisson outcome, whether the outcome
    kept varies)."""
    minimum = v.config.validation.min_observations_per_subject
    key_label = v.config.data.subject_key
    # Each subject as a number (-1 without one): counted and handed to great-expectations as numbers, not as
    # millions of strings (mapping text ids to their counts made a Python object per row).
    codes, ids = pd.factorize(v.key)
    subject_rows = np.zeros(v.n, dtype=np.int64)
    if survivor.any():  # a survivor has a subject: "subject missing" quarantined the others
        counts = np.bincount(codes[survivor], minlength=len(ids))
        subject_rows[survivor] = counts[codes[survivor]]
    too_few = survivor & (subject_rows < minimum)
    kept = survivor & ~too_few
    stage = _Stage()
    if survivor.any():
        subject = np.where(codes < 0, np.nan, codes.astype(np.float64))
        frame = pd.DataFrame({_KEY: subject, _SUBJECT_ROWS: subject_rows, _SURVIVOR: survivor, _KEPT: kept})
        stage.expect(
            "min_observations_per_subject", key_label, "ExpectColumnValuesToBeBetween", column=_SUBJECT_ROWS,
            min_value=minimum, only_where=_SURVIVOR,
        )
        if kept.any():
            stage.expect(
                "enough_subjects", key_label, "ExpectColumnUniqueValueCountToBeBetween", column=_KEY,
                min_value=MIN_SUBJECTS, only_where=_KEPT,
            )
            if v.family != "gaussian":
                frame[v.outcome] = v.typed[v.outcome]
                stage.expect("outcome_varies", v.outcome, "ExpectColumnUniqueValueCountToBeBetween",
                             column=v.outcome, min_value=2, only_where=_KEPT)
        too_few = stage.run(frame).failing("min_observations_per_subject", key_label, v.n) & survivor
    return _SubjectRows(survivor=survivor, rows=subject_rows, too_few=too_few,
                        enough_subjects=stage.success("enough_subjects", key_label),
                        outcome_varies=stage.success("outcome_varies", v.outcome))


def _flagged(v: _Visits, stage: _Stage, name: str, column: str | None) -> np.ndarray:
    """The rows failing ``name`` on ``column``; every row when the data lack the column (missing everywhere)."""
    if column is not None and column not in v.present:
        return np.ones(v.n, dtype=bool)
    return stage.failing(name, column, v.n)


# -------------------------------------------------------------------------- the row rules, in order


def _repeated_header_line(v: _Visits, rows: _Stage) -> _Rule:
    return _constant_rule("not_a_header_line", None, "no row repeats the header line",
                          _flagged(v, rows, "not_a_header_line", None),
                          "a repeated header line (its cells are the column names)", v.n)


def _subject_missing(v: _Visits, rows: _Stage) -> list[_Rule]:
    """One rule per subject column."""
    return [
        _constant_rule("subject_present", column, f"subject ({column!r}) is not missing",
                       _flagged(v, rows, "subject_present", column), f"subject missing (column {column!r})", v.n)
        for column in v.subjects
    ]


def _time_missing(v: _Visits, rows: _Stage) -> _Rule:
    time = v.time
    return _constant_rule("time_present", time, f"time ({time!r}) is not missing",
                          _flagged(v, rows, "time_present", time), f"time missing (column {time!r})", v.n)


def _time_not_a_number(v: _Visits, rows: _Stage) -> _Rule:
    """Not a number, or not an ISO date when the column holds dates."""
    time = v.time
    kind = "an ISO date (YYYY-MM-DD)" if v.dates is not None else "a number"
    return _value_rule("time_is_number", time, f"time ({time!r}) is {kind}", _flagged(v, rows, "time_is_number", time),
                       f"time is not {kind}: " + "'{}'" + f" (column {time!r})", v.as_read(time), v.n,
                       decimal_comma_hint=v.dates is None)


def _outcome_missing(v: _Visits, rows: _Stage) -> _Rule:
    outcome = v.outcome
    return _constant_rule("outcome_present", outcome, f"outcome ({outcome!r}) is not missing",
                          _flagged(v, rows, "outcome_present", outcome), f"outcome missing (column {outcome!r})", v.n)


def _outcome_not_a_number(v: _Visits, rows: _Stage) -> _Rule:
    outcome = v.outcome
    return _value_rule("outcome_is_number", outcome, f"outcome ({outcome!r}) is a number",
                       _flagged(v, rows, "outcome_is_number", outcome),
                       "outcome is not a number: '{}'" + f" (column {outcome!r})", v.as_read(outcome), v.n,
                       decimal_comma_hint=True)


def _outcome_not_binary(v: _Visits, rows: _Stage) -> _Rule:
    """A binomial outcome that is not 0/1, FALSE/TRUE, nor (when given) one of ``data.outcome_levels``."""
    outcome, levels = v.outcome, v.config.data.outcome_levels
    if levels is None:
        description = f"outcome ({outcome!r}) is 0 or 1, FALSE or TRUE (binomial)"
        template = ("outcome is not binary: '{}'" + f" (column {outcome!r}); a binomial outcome is 0 or 1, FALSE or "
                    "TRUE (also false/true, False/True), or the two texts given as data.outcome_levels")
    else:
        no, yes = levels
        description = f"outcome ({outcome!r}) is {no!r} or {yes!r} (data.outcome_levels)"
        template = ("outcome is neither of data.outcome_levels: '{}'" + f" (column {outcome!r}); allowed: {no!r} "
                    f"(0) or {yes!r} (1), compared as text, case-sensitive")
    return _value_rule("outcome_is_binary", outcome, description, _flagged(v, rows, "outcome_is_binary", outcome),
                       template, v.as_read(outcome), v.n)


def _outcome_not_a_count(v: _Visits, rows: _Stage) -> list[_Rule]:
    """A Poisson outcome that is a number but not a whole number ≥ 0; no rule for the other families."""
    if v.family != "poisson":
        return []
    outcome = v.outcome
    failing = rows.failing("outcome_is_count", outcome, v.n) if outcome in v.present else np.zeros(v.n, dtype=bool)
    return [_value_rule(
        "outcome_is_count", outcome, f"outcome ({outcome!r}) is a count, a whole number ≥ 0 (poisson)", failing,
        "outcome is not a count: '{}'" + f" (column {outcome!r}); a poisson outcome is a whole number, 0 or more",
        v.as_read(outcome), v.n,
    )]


def _outcome_out_of_range(v: _Visits, rows: _Stage) -> list[_Rule]:
    """Outside ``validation.outcome_range``; no rule without one."""
    low_high = v.config.validation.outcome_range
    if low_high is None:
        return []
    outcome = v.outcome
    range_text = f"[{_format_float(low_high[0])}, {_format_float(low_high[1])}]"
    failing = rows.failing("outcome_in_range", outcome, v.n) if outcome in v.present else np.zeros(v.n, dtype=bool)
    return [_value_rule(
        "outcome_in_range", outcome, f"outcome ({outcome!r}) within outcome_range {range_text}", failing,
        "outcome {} is outside outcome_range " + range_text + f" (column {outcome!r})", v.as_read(outcome), v.n,
    )]


def _duplicate_visits(v: _Visits, groups: _Stage, eligible: np.ndarray) -> list[_Rule]:
    """The same (subject, time) twice among the ``eligible`` rows, two rules: exact copies (all but the
    first go) and conflicting visits (every copy goes)."""
    typed, subjects, time, key, n = v.typed, v.subjects, v.time, v.key, v.n
    in_group = groups.failing("unique_subject_time", None, n) & eligible
    exact = np.zeros(n, dtype=bool)
    conflicting = np.zeros(n, dtype=bool)
    exact_reasons = conflict_reasons = _NO_REASONS
    if in_group.any():
        rows = typed.loc[in_group]
        keys = [rows[column] for column in (*subjects, time)]
        distinct = (~rows.duplicated(subset=v.data_columns, keep="first")).groupby(keys).transform("sum")
        size = rows.groupby(keys)[time].transform("size")
        is_conflict = (distinct > 1).to_numpy()
        is_extra_copy = (~is_conflict) & rows.duplicated(subset=[*subjects, time], keep="first").to_numpy()
        positions = np.flatnonzero(in_group)
        exact[positions[is_extra_copy]] = True
        conflicting[positions[is_conflict]] = True
        first_file = rows.groupby(keys)["source_file"].transform("first")
        first_line = rows.groupby(keys)["source_line"].transform("first")
        exact_reasons = _reasons_at(exact, (
            "exact duplicate of " + first_file[is_extra_copy].astype(str) + " line " + first_line[is_extra_copy].astype(str)
        ))
        conflict_reasons = _reasons_at(conflicting, (
            "conflicting duplicate visit: subject " + key[in_group][is_conflict].astype(str)
            + " at time " + _format_numbers(rows.loc[is_conflict, time]) + " appears "
            + size[is_conflict].astype(str) + " times with different values"
        ))
    return [
        _Rule("no_exact_duplicates", None, "no exact duplicate row of a (subject, time) visit (the first copy is kept)",
              exact, exact_reasons, "exact duplicate of an earlier row"),
        _Rule("no_conflicting_duplicates", None, "no (subject, time) visit recorded twice with different values",
              conflicting, conflict_reasons, "conflicting duplicate visit (same subject and time, different values)"),
    ]


def _covariate_missing_or_not_a_number(v: _Visits, rows: _Stage) -> list[_Rule]:
    """Per covariate a candidate uses: missing, then (for one analysed as a number) not a number."""
    rules = []
    for column in v.covariates:
        rules.append(_constant_rule(
            "covariate_present", column, f"covariate {column!r} is not missing",
            _flagged(v, rows, "covariate_present", column),
            f"missing covariate {column!r} (used by the candidate models)", v.n,
        ))
        if column in v.numeric_covariates:
            rules.append(_value_rule(
                "covariate_is_number", column, f"covariate {column!r} is a number",
                _flagged(v, rows, "covariate_is_number", column),
                f"covariate {column!r} is not a number: " + "'{}' (used by the candidate models)",
                v.as_read(column), v.n,
            ))
    return rules


def _constant_changes_within_subject(v: _Visits, groups: _Stage) -> list[_Rule]:
    """One rule per ``data.constant`` column the data have."""
    return [_changing_rule(column, v.typed[column], v.key, groups.failing("constant_within_subject", column, v.n))
            for column in v.checked_constant]


def _changing_rule(column: str, values: pd.Series, key: pd.Series, failing: np.ndarray) -> _Rule:
    """Every row of a subject whose ``data.constant`` column takes more than one value: which copy is right is unknown."""
    reasons = _NO_REASONS
    if failing.any():
        shown = _format_numbers(values) if values.dtype.kind == "f" else values.astype(object)
        rows = pd.DataFrame({"key": key[failing], "value": shown[failing].where(values[failing].notna())})
        listed = rows.dropna().groupby("key")["value"].agg(lambda v: ", ".join(repr(str(x)) for x in sorted(set(v))))
        reasons = _reasons_at(failing, (
            f"column {column!r} changes within subject " + rows["key"].astype(str) + " ("
            + rows["key"].map(listed).astype(str) + "); data.constant says it does not"
        ))
    return _Rule(
        "constant_within_subject", column, f"{column!r} takes one value within each subject (data.constant)",
        failing, reasons, f"column {column!r} changes within a subject; data.constant says it does not",
    )


def _too_few_rows(v: _Visits, counts: _SubjectRows) -> _Rule:
    """Subjects left with fewer than ``validation.min_observations_per_subject`` rows: all their rows go."""
    minimum = v.config.validation.min_observations_per_subject
    too_few = counts.too_few
    reasons = _NO_REASONS
    if too_few.any():
        left = pd.Series(counts.rows[too_few], index=v.typed.index[too_few])
        reasons = _reasons_at(too_few, (
            "subject " + v.key[too_few].astype(str) + " has " + left.astype(str)
            + np.where(left == 1, " row", " rows") + f", fewer than min_observations_per_subject = {minimum}"
        ))
    return _Rule(
        "min_observations_per_subject", v.config.data.subject_key,
        f"every subject keeps at least {minimum} rows after the other checks", too_few, reasons,
        f"subject has fewer than min_observations_per_subject = {minimum} rows",
    )


# ------------------------------------------------------------------------------------- the outcomes


def _table_outcomes(v: _Visits, rows: _Stage, ingested: Ingested) -> list[ExpectationOutcome]:
    """Required columns present, at least one row, and how a time column of dates was read."""
    outcomes = []
    available = ", ".join(v.data_columns) if v.data_columns else "(none)"
    for column in v.required:
        ok = bool(rows.success("column_exists", column))
        outcomes.append(ExpectationOutcome(
            name="column_exists", level="table", column=column, success=ok, unexpected_count=0,
            description=f"required column {column!r} ({_label_of(column, v.config)}) is present",
            details="" if ok else f"columns are: {available}{did_you_mean(column, v.data_columns)}",
        ))
    outcomes.append(ExpectationOutcome(
        name="table_has_rows", level="table", column=None, success=bool(rows.success("table_has_rows", None)),
        unexpected_count=0, description="the data have at least one row",
        details=f"{v.n} rows read" if v.n or not ingested.files else _why_no_rows(ingested, v.data_columns),
    ))
    if v.dates is not None:
        outcomes.append(ExpectationOutcome(
            name="time_read_as_dates", level="table", column=v.time, success=True, unexpected_count=0,
            description=v.dates.note,
            details=f"{v.dates.dates_read} dates read; a value that is not an ISO date is quarantined",
        ))
    return outcomes


def _row_outcomes(v: _Visits, rules: list[_Rule], reason: np.ndarray) -> list[ExpectationOutcome]:
    """One outcome per rule, counting the rows it quarantined (a row counts for the first rule it breaks)."""
    outcomes = []
    for index, rule in enumerate(rules):
        count = int((reason == index).sum())
        failing = int(rule.failing.sum())
        details = _CHECKS.get(rule.name, "")
        if rule.column is not None and rule.column not in v.present and rule.name.endswith("_present"):
            details = f"column {rule.column!r} is absent, so it counts as missing in every row"
        if failing != count:
            details += f"; {failing} rows fail this check, {failing - count} of them quarantined for an earlier reason"
        outcomes.append(ExpectationOutcome(
            name=rule.name, level="row", column=rule.column, success=count == 0, unexpected_count=count,
            description=rule.description, details=details, reason=rule.label,
        ))
    return outcomes


def _enough_subjects(v: _Visits, counts: _SubjectRows) -> ExpectationOutcome:
    subjects_left = int(v.key[counts.kept].nunique()) if counts.kept.any() else 0
    return ExpectationOutcome(
        name="enough_subjects", level="table", column=v.config.data.subject_key,
        success=bool(counts.enough_subjects) if counts.enough_subjects is not None else subjects_left >= MIN_SUBJECTS,
        unexpected_count=0, description=f"at least {MIN_SUBJECTS} subjects left after the row checks",
        details=f"{subjects_left} subjects left",
    )


def _outcome_varies(v: _Visits, counts: _SubjectRows) -> list[ExpectationOutcome]:
    """Outside the Gaussian family, the outcome analysed must take two values or more: with one value (every
    visit 0, say) the likelihood has no maximum. A subject whose outcome never changes is not judged here."""
    if v.family == "gaussian":
        return []
    values = v.typed.loc[counts.kept, v.outcome] if v.outcome in v.present else pd.Series(dtype=np.float64)
    tally = values.value_counts().sort_index()
    if tally.empty:
        details = "no rows analysed"
    elif len(tally) == 1:
        details = f"every analysed outcome is {_outcome_text(v, float(tally.index[0]))}: a {v.family} model has nothing to fit"
    elif v.family == "binomial":
        details = f"{len(values):,} rows analysed: " + " and ".join(
            f"{int(count):,} {'is' if count == 1 else 'are'} {_outcome_text(v, float(value))}" for value, count in tally.items()
        )
    else:
        details = f"{len(values):,} rows analysed: counts from {_format_float(tally.index[0])} to " \
                  f"{_format_float(tally.index[-1])}, mean {values.mean():.3g}"
    return [ExpectationOutcome(
        name="outcome_varies", level="table", column=v.outcome,
        success=counts.outcome_varies is not False,
        unexpected_count=0, description=f"the analysed outcome ({v.outcome!r}) takes more than one value ({v.family})",
        details=details,
    )]


def _outcome_text(v: _Visits, value: float) -> str:
    """An analysed outcome value as a reader knows it: 0 and 1 with their outcome_levels text ("1 ('yes')")."""
    levels = v.config.data.outcome_levels
    shown = _format_float(value)
    return f"{shown} ({levels[int(value)]!r})" if levels is not None and v.family == "binomial" else shown


def _split_rows(v: _Visits, reason_texts: pd.Series, kept: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The visits (typed, sorted, with the combined subject column) and the quarantine (as read, with reasons)."""
    kept_rows = np.flatnonzero(kept)
    ordering = [c for c in (*v.subjects, v.time) if c in v.typed.columns]  # all of them when a row is kept
    rows = kept_rows[_visit_order(v.typed[ordering].iloc[kept_rows], v.subjects, v.time)]
    visits = _take_text_as_categories(v.typed, rows)  # the one copy of the rows analysed, already in order
    if len(v.subjects) > 1:
        visits = _with_subject_key(visits, v.key.take(rows), v.config)
    visits = visits.set_axis(v.labels[rows])
    quarantined = ~kept
    quarantine = v.raw.loc[quarantined].assign(reason=reason_texts[quarantined].to_numpy(dtype=object))
    return visits, quarantine.set_axis(v.labels[quarantined])


def _take_text_as_categories(typed: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """The rows ``rows`` of ``typed`` (positions), each text column held as a pandas categorical: the distinct
    values of those rows (sorted, as ``pd.Categorical`` sorts them; ``str`` still) and a small integer code
    per row.

    The run holds these rows from validation to the report. Text columns repeat a few values millions of
    times (the source file, an arm, a site): as Arrow text each row costs its bytes plus an 8-byte offset,
    as a code 1 byte (4 for a subject id). Measured at 2 million rows (``benchmarks/bench_memory.py``:
    patient_id, arm, site, source_file), 107 MB of text became 16 MB. The values, their order and their
    missing values are unchanged: ``curation.fingerprint`` hashes the frame as before, the design reads the
    values as text, and ``reporting.run_folder.write_data`` writes the columns back as text. The columns are
    coded before the rows are taken, so the text of the rows analysed is never copied.
    """
    text = [column for column in typed.columns if isinstance(typed[column].dtype, pd.StringDtype)]
    taken = typed.assign(**{column: pd.Categorical(typed[column].array) for column in text}).take(rows)
    if len(rows) == len(typed):
        return taken
    # A value only quarantined rows had is no category of the rows analysed.
    return taken.assign(**{column: taken[column].cat.remove_unused_categories() for column in text})


def ensure_valid(validated: Validated, config: StudyConfig, folder: Path | None = None) -> None:
    """Raise :class:`DataError` with one line for the first failing table-level expectation.

    No rows at all comes first: every column of an empty file is "missing", which would mislead. When
    too few subjects are left, the line names the rule that quarantined the most rows and ``folder``,
    where the checks and the quarantine were written.
    """
    failing = [e for e in validated.expectations if e.level == "table" and not e.success]
    failing.sort(key=lambda e: e.name != "table_has_rows")
    for outcome in failing:
        if outcome.name == "table_has_rows":
            raise DataError(f"no rows to analyse: {outcome.details}")
        if outcome.name == "column_exists":
            column = outcome.column or ""
            raise DataError(
                f"required column {column!r} ({_label_of(column, config)}) is missing from "
                f"{_source_text(config)}; {outcome.details}"
            )
        if outcome.name == "outcome_varies":
            where = f"the checks and the quarantine are in {folder}" if folder is not None else f"see {QUARANTINE_FILE}"
            raise DataError(f"{outcome.details}; {_why_quarantined(validated)}; {where}")
        if outcome.name == "enough_subjects":
            key = config.data.subject_key
            visits = validated.visits
            left = _subject_key(visits, config.data.subject_columns).nunique() if set(config.data.subject_columns) <= set(visits) else 0
            subjects = f"{_plural(left, 'subject')}{'' if len(config.data.subject_columns) == 1 else f' ({key})'}"
            where = f"the checks and the quarantine are in {folder}" if folder is not None else f"see {QUARANTINE_FILE}"
            raise DataError(
                f"only {subjects} left after the row checks ({MIN_SUBJECTS} needed): "
                f"{_why_quarantined(validated)}; {where}"
            )
        raise DataError(f"validation failed: {outcome.description} ({outcome.details})")


def validation_summary(validated: Validated) -> dict[str, Any]:
    """A JSON-ready summary for ``validation.json``: the counts, the reasons by rule, every expectation.

    ``quarantine_reasons`` counts quarantined rows by rule, never by reason text (which shows values):
    the rule's name, with the column for the rules checked column by column ("covariate_present:age",
    "constant_within_subject:arm", "subject_present:side" when the subject has several columns).
    ``quarantine_rules`` lists the same counts with each rule's description, for a report table.
    ``notes`` says how the data were read where that changes the numbers (dates turned into weeks, say).
    ``warnings`` repeats the findings of the warning-level checks (level "warning" among ``expectations``),
    which never fail a run and quarantine nothing.
    """
    reasons: dict[str, int] = {}
    rules: list[dict[str, Any]] = []
    subject_rules = sum(1 for e in validated.expectations if e.level == "row" and e.name == "subject_present")
    for outcome in validated.expectations:
        if outcome.level != "row":
            continue
        per_column = outcome.name.startswith(_PER_COLUMN_RULES) or (outcome.name == "subject_present" and subject_rules > 1)
        key = f"{outcome.name}:{outcome.column}" if per_column else outcome.name
        reasons[key] = reasons.get(key, 0) + int(outcome.unexpected_count)
        rules.append({"rule": key, "column": outcome.column, "description": outcome.description,
                      "rows": int(outcome.unexpected_count)})
    return {
        "success": bool(validated.success),
        "rows_read": int(validated.rows_read),
        "rows_analysed": int(validated.rows_analysed),
        "rows_quarantined": int(validated.rows_quarantined),
        "quarantine_reasons": reasons,
        "quarantine_rules": rules,
        "notes": list(validated.notes),
        "warnings": list(validated.warnings),
        "expectations": [dataclasses.asdict(outcome) for outcome in validated.expectations],
    }


# ----------------------------------------------------------------------------------------- helpers


def _read(column: str) -> str:
    """Name of the helper column holding ``column`` as read (NaN where the cell was empty or a missing token)."""
    return f"{_PREFIX}read_{column}"


def _role_of(column: str, config: StudyConfig) -> str:
    data = config.data
    if column in data.subject_columns:
        return "subject"
    return "time" if column == data.time else "outcome" if column == data.outcome else "covariate"


def _label_of(column: str, config: StudyConfig) -> str:
    """The config key that makes ``column`` required: "data.subject", ..., "data.constant", or the models."""
    role = _role_of(column, config)
    if role != "covariate":
        return f"data.{role}"
    return "data.constant" if column in config.data.constant else "used by the candidate models"


def _source_text(config: StudyConfig) -> str:
    return f"data.source {config.data.source!r}" if config.source_path.is_dir() else config.data.source


def _why_no_rows(ingested: Ingested, data_columns: list[str]) -> str:
    return describe_no_rows(ingested.files, bool(data_columns))


def _subject_key(frame: pd.DataFrame, subjects: tuple[str, ...]) -> pd.Series:
    """The subject of each row as text: the subject column, or the parts joined by ":"; NaN when a part is missing.

    One subject column is used as it is (text already, Arrow-backed from a CSV file): a copy as Python
    objects would cost about 50 bytes a row."""
    if any(column not in frame.columns for column in subjects):
        return pd.Series(np.nan, index=frame.index, dtype=object)
    if len(subjects) == 1:
        return frame[subjects[0]]
    parts = [frame[column].astype(object) for column in subjects]
    known = np.logical_and.reduce([part.notna().to_numpy(dtype=bool) for part in parts])
    joined = parts[0].astype(str)
    for part in parts[1:]:
        joined = joined + KEY_SEPARATOR + part.astype(str)
    return joined.where(known).astype(object)


def _with_subject_key(visits: pd.DataFrame, key: pd.Series, config: StudyConfig) -> pd.DataFrame:
    """``visits`` with the combined subject column ``data.subject_key`` added, once it is known to be safe."""
    name = config.data.subject_key
    subjects = list(config.data.subject_columns)
    if name in visits.columns:
        raise DataError(
            f"the data have a column named {name!r}, the name given to the combined subject "
            f"(data.subject: {subjects}); rename that column"
        )
    if len(visits) and key.nunique() != len(visits.drop_duplicates(subjects)):
        raise DataError(
            f"the subject columns {subjects} hold values containing {KEY_SEPARATOR!r}, so joined with it two "
            f"subjects read the same; remove {KEY_SEPARATOR!r} from those values"
        )
    if not set(subjects) <= set(visits.columns):  # a subject column is absent: no row is kept
        return visits.assign(**{name: key.to_numpy(dtype=object)})
    position = visits.columns.get_loc(subjects[-1]) + 1
    # Held as a categorical, as the other text columns (``_take_text_as_categories``).
    held = pd.Categorical(pd.array(key.to_numpy(dtype=object), dtype=_TEXT))
    return visits.assign(**{name: held})[[*visits.columns[:position], name, *visits.columns[position:]]]


def _repeated_header(raw: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """0/1 per row: 1 where every role cell reads as its own column name (a second header pasted in)."""
    if not columns or raw.empty:
        return np.zeros(len(raw), dtype=np.int64)
    same = np.ones(len(raw), dtype=bool)
    for column in columns:
        values = raw[column]
        if isinstance(values.dtype, pd.StringDtype):  # vectorized text comparison, no object per cell
            matches = (values.str.strip() == column).to_numpy(dtype=bool, na_value=False)
        else:
            matches = values.astype(str).str.strip().to_numpy(dtype=object) == column
        same &= values.notna().to_numpy(dtype=bool) & matches
    return same.astype(np.int64)


def _distinct(column: str) -> str:
    return f"{_PREFIX}distinct_{column}"


def _distinct_within(values: pd.Series, key: pd.Series) -> np.ndarray:
    """For each row, how many distinct non-missing values of ``values`` its subject has (NaN without a subject)."""
    counts = values.groupby(key, dropna=True).nunique(dropna=True)
    return key.map(counts).to_numpy(dtype=np.float64)


def binary_outcome(raw: pd.Series, numbers: pd.Series, levels: tuple[str, str] | None) -> pd.Series:
    """A binomial outcome as 0.0/1.0, NaN where it is missing or not a value the outcome may take.

    ``raw`` is the column as read, ``numbers`` the same values as ingestion read them as numbers. With
    ``levels`` (``data.outcome_levels``) the values must be exactly those texts (after the whitespace
    ingestion strips; whole numbers without a decimal part, so ``2.0`` is "2"), the second being 1. Without,
    0 and 1 as numbers and the texts of :data:`BINARY_TEXT` (booleans read as 0/1).
    """
    if levels is not None:
        return to_text(raw).map({levels[0]: 0.0, levels[1]: 1.0}).astype(np.float64)
    coded = numbers.where(numbers.isin((0.0, 1.0)))
    if raw.dtype.kind not in "biuf":
        coded = coded.fillna(to_text(raw).map(BINARY_TEXT).astype(np.float64))
    return coded.astype(np.float64)


def _is_count(values: pd.Series) -> np.ndarray:
    """1.0 where a number is a whole number ≥ 0, 0.0 where another number, NaN where not a number."""
    numbers = values.to_numpy(dtype=np.float64)
    whole = (numbers >= 0) & (np.floor(numbers) == numbers)
    return np.where(np.isnan(numbers), np.nan, whole.astype(np.float64))


def _numeric_covariates(typed: pd.DataFrame, covariates: tuple[str, ...], config: StudyConfig) -> tuple[str, ...]:
    """Covariates read as text whose values are mostly numbers: analysed as numbers, the rest quarantined.

    Ingestion makes a column numeric only when every value parses; a numeric covariate with a few typos
    ("unknown", "12 y") would otherwise turn into a factor with one level per value. Columns listed in
    ``data.categorical`` always stay text.
    """
    chosen = []
    for column in covariates:
        if column not in typed.columns or column in config.data.categorical:
            continue
        values = typed[column]
        if values.dtype.kind == "f":
            continue
        present = int(values.notna().sum())
        numbers = int(parse_numbers(values, decimal_comma=True).notna().sum())
        if present and numbers * 2 > present:
            chosen.append(column)
    return tuple(chosen)


def _constant_rule(name: str, column: str | None, description: str, failing: np.ndarray, reason: str, n: int) -> _Rule:
    positions = np.flatnonzero(failing)
    return _Rule(name, column, description, failing, pd.Series(reason, index=positions, dtype=object), reason)


_NO_REASONS = pd.Series([], dtype=object)


def _reasons_at(failing: np.ndarray, texts: pd.Series) -> pd.Series:
    """``texts`` (one per failing row, in row order) indexed by the failing rows' positions."""
    return pd.Series(texts.to_numpy(dtype=object), index=np.flatnonzero(failing), dtype=object)


def _value_rule(
    name: str, column: str | None, description: str, failing: np.ndarray, template: str,
    raw_text: pd.Series | None, n: int, *, decimal_comma_hint: bool = False,
) -> _Rule:
    """A rule whose reason shows the value as read: ``template`` has one ``{}`` for it.

    With ``decimal_comma_hint``, a value like "10,3" (a decimal comma where the file's delimiter is not
    ';', so it was not read as 10.3) gets the fix appended to its reason.
    """
    reasons = _NO_REASONS
    if failing.any() and raw_text is not None:
        before, after = template.split("{}", 1)
        shown = raw_text[failing].astype(object).astype(str).str.strip()
        text = before + shown + after
        if decimal_comma_hint:
            comma = shown.str.fullmatch(_DECIMAL_COMMA_VALUE).fillna(False).to_numpy(dtype=bool)
            if comma.any():
                text[comma] = text[comma] + "; " + shown[comma].map(decimal_comma_hint_for)
        reasons = _reasons_at(failing, text)
    label = re.sub(r":? ?'?\{\}'?", "", template).replace("  ", " ")
    return _Rule(name, column, description, failing, reasons, label)


_DECIMAL_COMMA_VALUE = r"[+-]?\d*,\d+"
_DECIMAL_COMMA_HINT = "look like decimal commas"


def _why_quarantined(validated: Validated) -> str:
    """"2,025 of 2,025 rows were quarantined, most by "<reason>" (2,025 rows)", plus the decimal-comma fix
    when some reason carries it."""
    read, quarantined = validated.rows_read, validated.rows_quarantined
    if quarantined == 0:
        return f"no row was quarantined ({read:,} {'row' if read == 1 else 'rows'} read)"
    rows = [e for e in validated.expectations if e.level == "row" and e.unexpected_count > 0]
    top = max(rows, key=lambda e: e.unexpected_count)  # the first of equals, in rule order
    text = (
        f"{quarantined:,} of {read:,} rows {'was' if quarantined == 1 else 'were'} quarantined, most by "
        f"\"{top.reason or top.description}\" ({_plural(top.unexpected_count, 'row', thousands=True)})"
    )
    hinted = validated.quarantine["reason"].astype(str)
    hinted = hinted[hinted.str.contains(_DECIMAL_COMMA_HINT, regex=False)]
    if len(hinted):
        text += "; " + hinted.iloc[0][hinted.iloc[0].index("values like "):]
    return text


def _lookalike_ids(ids: pd.Series, column: str) -> ExpectationOutcome:
    """A warning for subject ids that differ only by leading zeros or letter case ('068' and '68', 'A1' and 'a1').

    They are different subjects to the models, and usually the same person exported twice in two ways.
    Surrounding spaces never get this far: ingestion strips them, so ' A1' and 'A1' are one subject.
    Judged on the subjects analysed; quarantines nothing.
    """
    distinct = [str(i) for i in pd.unique(ids.dropna())]
    zeros = re.compile(r"(^|\D)0+(?=\d)")
    folded: dict[str, list[str]] = {}
    for value in distinct:
        folded.setdefault(zeros.sub(r"\1", value).lower(), []).append(value)
    groups = sorted(sorted(group) for group in folded.values() if len(group) > 1)
    description = "no two subject ids differ only by leading zeros or letter case"
    if not groups:
        return ExpectationOutcome(
            name="subject_ids_distinct", level="warning", column=column, success=True, unexpected_count=0,
            description=description, details=f"{len(distinct):,} subject ids analysed",
        )
    by_zeros = any(len({v.lower() for v in g}) > 1 for g in groups)
    by_case = any(len({zeros.sub(r"\1", v) for v in g}) > 1 for g in groups)
    kind = " or ".join(k for k, used in (("leading zeros", by_zeros), ("letter case", by_case)) if used)
    noun = "pairs" if all(len(g) == 2 for g in groups) else "sets"
    more = ""
    if len(groups) > 1:
        examples = "; ".join(_and(g) for g in groups[1:4])
        more = f" ({len(groups):,} such {noun}, e.g. also {examples})"
    details = (
        f"subject ids {_and(groups[0])} differ only by {kind}{more}: they are analysed as different subjects; "
        "make the ids consistent if they are the same subject"
    )
    return ExpectationOutcome(
        name="subject_ids_distinct", level="warning", column=column, success=False, unexpected_count=0,
        description=description, details=details,
    )


def _and(values: list[str]) -> str:
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _any_failure(rules: list[_Rule], n: int) -> np.ndarray:
    taken = np.zeros(n, dtype=bool)
    for rule in rules:
        taken |= rule.failing
    return taken


def _assign_reasons(rules: list[_Rule], n: int) -> np.ndarray:
    """The position in ``rules`` of the first rule each row breaks (-1 when none).

    By position, not name: a rule checked column by column (covariate_present for age, then for arm)
    appears once per column, and a row breaking two of them counts once, for the first.
    """
    reason = np.full(n, -1, dtype=np.int64)
    for index, rule in enumerate(rules):
        reason[rule.failing & (reason < 0)] = index
    return reason


def _reason_texts(rules: list[_Rule], reason: np.ndarray, n: int) -> pd.Series:
    texts = np.full(n, np.nan, dtype=object)
    for index, rule in enumerate(rules):
        mine = np.flatnonzero(reason == index)
        if len(mine):
            texts[mine] = rule.reasons.reindex(mine).to_numpy(dtype=object)
    return pd.Series(texts, dtype=object)


def _visit_order(visits: pd.DataFrame, subjects: tuple[str, ...], time: str) -> np.ndarray:
    """The positions that sort ``visits`` by subject (outermost column first; numerically when every id is a
    number), then time; stable, so equal keys keep their order."""
    if visits.empty:
        return np.arange(0)
    keys = [visits[time].to_numpy(dtype=np.float64)]
    for column in reversed(subjects):
        ids = visits[column]
        # Ids that are not all numbers usually show it in the first rows: then the whole column is not
        # converted (pd.to_numeric on millions of text ids takes seconds).
        numeric = bool(pd.to_numeric(ids.iloc[:64], errors="coerce").notna().all())
        as_numbers = pd.to_numeric(ids, errors="coerce") if numeric else None
        key = as_numbers if as_numbers is not None and bool(as_numbers.notna().all()) else ids
        keys.append(pd.factorize(key, sort=True)[0])
    return np.lexsort(keys)


def _format_numbers(values: pd.Series) -> pd.Series:
    """Floats as short text: 3.0 → "3", 2.5 → "2.5"."""
    floats = values.to_numpy(dtype=np.float64)
    text = values.astype(str).astype(object)
    integral = np.isfinite(floats) & (np.floor(floats) == floats) & (np.abs(floats) < 2.0**53)
    if integral.any():
        text[integral] = values[integral].astype(np.int64).astype(str).to_numpy(dtype=object)
    return text


def _plural(count: int, noun: str, *, thousands: bool = False) -> str:
    shown = f"{count:,}" if thousands else str(count)
    return f"{shown} {noun}" if count == 1 else f"{shown} {noun}s"


def _format_float(value: float) -> str:
    return f"{value:g}"


# ------------------------------------------------------------------------------- great_expectations


class _Stage:
    """One great-expectations validation of one frame: the expectations to run, then their results."""

    def __init__(self) -> None:
        self._expectations: list[tuple[str, str | None, str, dict[str, Any]]] = []
        self._results: dict[tuple[str, str | None], Mapping[str, Any]] = {}

    def expect(self, name: str, column: str | None, kind: str, /, **kwargs: Any) -> None:
        """Add the expectation ``kind`` with ``kwargs``; ``only_where=<boolean column>`` limits it to those rows."""
        self._expectations.append((name, column, kind, kwargs))

    def run(self, frame: pd.DataFrame) -> _Stage:
        """Validate ``frame`` (RangeIndex) and keep each result by (name, column); return self."""
        if not self._expectations:
            return self
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.expectations.row_conditions import Column

        frame = frame.reset_index(drop=True)
        with _GX_LOCK:
            batch_definition = _batch_definition()  # the context must exist before a suite is built
            suite = gx.ExpectationSuite(name="longitudinal-visits")
            for index, (_, _, kind, kwargs) in enumerate(self._expectations):
                arguments = dict(kwargs)
                only_where = arguments.pop("only_where", None)
                if only_where is not None:
                    arguments["row_condition"] = Column(only_where) == True  # noqa: E712 (builds a condition)
                suite.add_expectation(getattr(gxe, kind)(**arguments, meta={"index": index}))
            try:
                batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
                result = batch.validate(suite, result_format="COMPLETE")
            finally:
                _forget_batches(batch_definition)
        for item in result.results:
            index = int(item.expectation_config.meta["index"])
            name, column, kind, _ = self._expectations[index]
            error = _raised(item.exception_info)
            if error:
                raise RuntimeError(f"great_expectations could not evaluate {kind} for {name} ({error})")
            self._results[(name, column)] = {"success": bool(item.success), **dict(item.result)}
        return self

    def failing(self, name: str, column: str | None, n: int) -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        result = self._results.get((name, column))
        if result is not None:
            positions = np.asarray(result.get("unexpected_index_list") or [], dtype=np.int64)
            mask[positions] = True
        return mask

    def success(self, name: str, column: str | None) -> bool | None:
        result = self._results.get((name, column))
        return None if result is None else bool(result["success"])


def _raised(info: Any) -> str:
    """The message of an exception great-expectations caught while evaluating, or ""."""
    if not isinstance(info, Mapping):
        return ""
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    for value in info.values():
        message = _raised(value)
        if message:
            return message
    return ""


_GX_LOCK = threading.Lock()
_GX_BATCH_DEFINITION: Any = None


def preload_great_expectations() -> threading.Thread:
    """Import great-expectations and build its ephemeral context in a background thread (started, returned).

    The import alone takes 2-5 s and cannot be narrowed (any ``great_expectations`` submodule runs the
    package's ``__init__``, which imports the whole library). Started at the entry point, it overlaps
    with what the run waits for anyway (Prefect's temporary server, reading the files) instead of
    adding to it. ``validate_visits`` works whether or not this ran or finished: it waits for the same
    lock and import. A failure here is ignored: validation raises it where it is reported properly.
    """
    def load() -> None:
        try:
            with _GX_LOCK:
                _batch_definition()
        except Exception:  # noqa: BLE001 (reported by validate_visits, which repeats the same steps)
            pass

    thread = threading.Thread(target=load, name="preload-great-expectations", daemon=True)
    thread.start()
    return thread


def _forget_batches(batch_definition: Any) -> None:
    """Drop what great-expectations keeps after a validation: the batch's frame and every metric computed
    on it (row masks and index lists as long as the data). Its execution engine lives as long as the
    process's context and would otherwise hold the last frame and the metrics of every validation run in
    this process (a run's three frames; in ``longitudinal serve``, every run's)."""
    engine = batch_definition.data_asset.datasource.get_execution_engine()
    engine.batch_manager.reset_batch_cache()
    engine.batch_manager.batch_data_cache.clear()
    metrics = getattr(engine, "_metric_cache", None)  # no public way to empty it (great-expectations 1.x)
    if isinstance(metrics, dict):
        metrics.clear()


def _batch_definition() -> Any:
    """One ephemeral context per process, with a pandas dataframe asset and a whole-frame batch definition."""
    global _GX_BATCH_DEFINITION
    if _GX_BATCH_DEFINITION is None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = context.data_sources.add_pandas("longitudinal")
        asset = source.add_dataframe_asset("visits")
        _GX_BATCH_DEFINITION = asset.add_batch_definition_whole_dataframe("all rows")
    return _GX_BATCH_DEFINITION
