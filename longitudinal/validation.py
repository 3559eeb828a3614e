"""Validation: decide which rows are analysed and set the others aside, each with one reason.

The checks run as great-expectations 1.x expectations on an ephemeral context (imported lazily: the
import costs seconds). Table-level expectations fail the run (:func:`ensure_valid`); row-level ones
quarantine rows. Each quarantined row gets the reason of the first rule it breaks, in this order:

1. subject missing; 2. time missing, 3. time not a number; 4. outcome missing, 5. outcome not a number;
6. outcome outside ``validation.outcome_range``; 7. the same (subject, time) twice among the rows still
in: an exact duplicate (equal in every data column) keeps its first copy, conflicting copies all go;
8. a covariate used by a candidate model missing (or not a number); 9. a subject left with fewer than
``validation.min_observations_per_subject`` rows.

A missing required column counts as missing in every row, so the accounting stays whole:
``rows_read == rows_analysed + rows_quarantined`` always holds.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from longitudinal.config import StudyConfig
from longitudinal.errors import DataError
from longitudinal.ingest import SOURCE_COLUMNS, is_missing, parse_numbers
from longitudinal.records import ExpectationOutcome, Ingested, Validated

MIN_SUBJECTS = 3
QUARANTINE_FILE = "quarantine.csv"

_PREFIX = "__lv_"
_ELIGIBLE_FOR_DUPLICATES = f"{_PREFIX}dup_eligible"
_SUBJECT_ROWS = f"{_PREFIX}subject_rows"
_SURVIVOR = f"{_PREFIX}survivor"
_KEPT = f"{_PREFIX}kept"

_GX = "great_expectations "
_CHECKS = {
    "subject_present": _GX + "expect_column_values_to_not_be_null",
    "time_present": _GX + "expect_column_values_to_not_be_null on the value as read",
    "time_is_number": _GX + "expect_column_values_to_not_be_null on the value as a number",
    "outcome_present": _GX + "expect_column_values_to_not_be_null on the value as read",
    "outcome_is_number": _GX + "expect_column_values_to_not_be_null on the value as a number",
    "outcome_in_range": _GX + "expect_column_values_to_be_between",
    "no_exact_duplicates": _GX + "expect_compound_columns_to_be_unique; copies equal in every column told apart in pandas",
    "no_conflicting_duplicates": _GX + "expect_compound_columns_to_be_unique; copies that differ told apart in pandas",
    "covariate_present": _GX + "expect_column_values_to_not_be_null on the value as read",
    "covariate_is_number": _GX + "expect_column_values_to_not_be_null on the value as a number",
    "min_observations_per_subject": "rows per subject counted in pandas, then " + _GX + "expect_column_values_to_be_between",
}

_ROLE_LABELS = {"subject": "data.subject", "time": "data.time", "outcome": "data.outcome"}


@dataclass(frozen=True)
class _Rule:
    """A row rule: where it fails (positions) and the reason text for each failing row."""

    name: str
    column: str | None
    description: str
    failing: np.ndarray
    reasons: pd.Series
    details: str


def validate_visits(ingested: Ingested, config: StudyConfig, covariates: Collection[str]) -> Validated:
    """Run the table- and row-level checks; return the rows to analyse and the quarantine.

    ``covariates`` are the columns other than subject, time and outcome that any candidate uses: a row
    missing one of them is quarantined so that every candidate is fitted on the same rows. A covariate
    not listed in ``data.categorical`` whose values are mostly numbers is analysed as a number, and a
    row where it is not one is quarantined. ``visits`` keeps the index labels of ``ingested.typed`` and
    is sorted by subject (numerically when every id is a number) then time; ``quarantine`` keeps read
    order and the same index labels.
    """
    subject, time, outcome = config.data.subject, config.data.time, config.data.outcome
    covariates = tuple(dict.fromkeys(c for c in covariates if c not in (subject, time, outcome)))
    raw = ingested.raw.reset_index(drop=True)
    typed = ingested.typed.reset_index(drop=True)
    labels = ingested.typed.index
    n = len(typed)
    data_columns = [c for c in typed.columns if c not in SOURCE_COLUMNS]
    numeric_covariates = _numeric_covariates(typed, covariates, config)
    typed = typed.assign(**{c: parse_numbers(typed[c], decimal_comma=True) for c in numeric_covariates})

    # Stage 1: per-row checks that need nothing but the row itself (plus the table-level basics).
    stage1 = _Stage()
    for column in (subject, time, outcome, *covariates):
        stage1.expect("column_exists", column, "ExpectColumnToExist", column=column)
    stage1.expect("table_has_rows", None, "ExpectTableRowCountToBeBetween", min_value=1)
    present = {c for c in (subject, time, outcome, *covariates) if c in typed.columns}
    frame1 = typed[[c for c in (subject, time, outcome, *covariates) if c in present]].copy()
    for column in present:
        if column != subject:
            frame1[_read(column)] = raw[column].where(~is_missing(raw[column]))
    if subject in present:
        stage1.expect("subject_present", subject, "ExpectColumnValuesToNotBeNull", column=subject)
    for column in (time, outcome):
        if column in present:
            stage1.expect(f"{_role_of(column, config)}_present", column, "ExpectColumnValuesToNotBeNull", column=_read(column))
            stage1.expect(f"{_role_of(column, config)}_is_number", column, "ExpectColumnValuesToNotBeNull", column=column)
    low_high = config.validation.outcome_range
    if low_high is not None and outcome in present:
        stage1.expect(
            "outcome_in_range", outcome, "ExpectColumnValuesToBeBetween", column=outcome,
            min_value=low_high[0], max_value=low_high[1],
        )
    for column in covariates:
        if column in present:
            stage1.expect("covariate_present", column, "ExpectColumnValuesToNotBeNull", column=_read(column))
            if column in numeric_covariates:
                stage1.expect("covariate_is_number", column, "ExpectColumnValuesToNotBeNull", column=column)
    found1 = stage1.run(frame1)

    def flagged(name: str, column: str | None) -> np.ndarray:
        if column is not None and column not in present:
            return np.ones(n, dtype=bool)
        return found1.failing(name, column, n)

    raw_text = {c: raw[c] for c in present}
    range_text = "" if low_high is None else f"[{_format_float(low_high[0])}, {_format_float(low_high[1])}]"
    rules: list[_Rule] = [
        _constant_rule("subject_present", subject, f"subject ({subject!r}) is not missing",
                       flagged("subject_present", subject), f"subject missing (column {subject!r})", n),
        _constant_rule("time_present", time, f"time ({time!r}) is not missing",
                       flagged("time_present", time), f"time missing (column {time!r})", n),
        _value_rule("time_is_number", time, f"time ({time!r}) is a number",
                    flagged("time_is_number", time), "time is not a number: '{}'" + f" (column {time!r})",
                    raw_text.get(time), n),
        _constant_rule("outcome_present", outcome, f"outcome ({outcome!r}) is not missing",
                       flagged("outcome_present", outcome), f"outcome missing (column {outcome!r})", n),
        _value_rule("outcome_is_number", outcome, f"outcome ({outcome!r}) is a number",
                    flagged("outcome_is_number", outcome), "outcome is not a number: '{}'" + f" (column {outcome!r})",
                    raw_text.get(outcome), n),
    ]
    if low_high is not None:
        rules.append(_value_rule(
            "outcome_in_range", outcome, f"outcome ({outcome!r}) within outcome_range {range_text}",
            flagged("outcome_in_range", outcome) if outcome in present else np.zeros(n, dtype=bool),
            "outcome {} is outside outcome_range " + range_text + f" (column {outcome!r})", raw_text.get(outcome), n,
        ))
    taken = _any_failure(rules, n)

    # Stage 2: the same (subject, time) twice, among rows that passed stage 1.
    eligible = ~taken
    in_duplicate_group = np.zeros(n, dtype=bool)
    if eligible.any():
        frame2 = typed[[subject, time]].assign(**{_ELIGIBLE_FOR_DUPLICATES: eligible})
        stage2 = _Stage()
        stage2.expect(
            "unique_subject_time", None, "ExpectCompoundColumnsToBeUnique", column_list=[subject, time],
            only_where=_ELIGIBLE_FOR_DUPLICATES,
        )
        in_duplicate_group = stage2.run(frame2).failing("unique_subject_time", None, n) & eligible
    exact, conflicting = _duplicate_rules(typed, data_columns, subject, time, in_duplicate_group)
    rules += [exact, conflicting]
    for column in covariates:
        rules.append(_constant_rule(
            "covariate_present", column, f"covariate {column!r} is not missing",
            flagged("covariate_present", column), f"missing covariate {column!r} (used by the candidate models)", n,
        ))
        if column in numeric_covariates:
            rules.append(_value_rule(
                "covariate_is_number", column, f"covariate {column!r} is a number",
                flagged("covariate_is_number", column),
                f"covariate {column!r} is not a number: " + "'{}' (used by the candidate models)",
                raw_text.get(column), n,
            ))
    taken = _any_failure(rules, n)

    # Stage 3: rows per subject among the survivors, and the subjects left.
    minimum = config.validation.min_observations_per_subject
    survivor = ~taken
    subject_rows = np.zeros(n, dtype=np.int64)
    if survivor.any():
        subjects = typed[subject]
        counts = subjects[survivor].value_counts()
        subject_rows[survivor] = subjects[survivor].map(counts).to_numpy(dtype=np.int64)
    too_few = survivor & (subject_rows < minimum)
    kept = survivor & ~too_few
    stage3 = _Stage()
    if survivor.any():
        frame3 = pd.DataFrame({
            subject: typed[subject], _SUBJECT_ROWS: subject_rows, _SURVIVOR: survivor, _KEPT: kept,
        })
        stage3.expect(
            "min_observations_per_subject", subject, "ExpectColumnValuesToBeBetween", column=_SUBJECT_ROWS,
            min_value=minimum, only_where=_SURVIVOR,
        )
        if kept.any():
            stage3.expect(
                "enough_subjects", subject, "ExpectColumnUniqueValueCountToBeBetween", column=subject,
                min_value=MIN_SUBJECTS, only_where=_KEPT,
            )
        # great-expectations finds the rows; the pandas counts above are what it checks against.
        too_few = stage3.run(frame3).failing("min_observations_per_subject", subject, n) & survivor
        kept = survivor & ~too_few
    subjects_left = int(typed.loc[kept, subject].nunique()) if kept.any() else 0
    few_reasons = pd.Series(np.nan, index=range(n), dtype=object)
    if too_few.any():
        left = pd.Series(subject_rows[too_few], index=typed.index[too_few])
        few_reasons[too_few] = (
            "subject " + typed.loc[too_few, subject].astype(str) + " has " + left.astype(str)
            + np.where(left == 1, " row", " rows") + f", fewer than min_observations_per_subject = {minimum}"
        ).to_numpy(dtype=object)
    rules.append(_Rule(
        "min_observations_per_subject", subject,
        f"every subject keeps at least {minimum} rows after the other checks", too_few, few_reasons,
        "",
    ))
    reason = _assign_reasons(rules, n)

    # Table-level outcomes, then the row-level ones with the rows each rule quarantined.
    outcomes: list[ExpectationOutcome] = []
    available = ", ".join(data_columns) if data_columns else "(none)"
    for column, role in [(subject, "subject"), (time, "time"), (outcome, "outcome")] + [(c, "covariate") for c in covariates]:
        ok = bool(found1.success("column_exists", column))
        outcomes.append(ExpectationOutcome(
            name="column_exists", level="table", column=column, success=ok, unexpected_count=0,
            description=f"required column {column!r} ({_role_label(role)}) is present",
            details="" if ok else f"columns are: {available}",
        ))
    outcomes.append(ExpectationOutcome(
        name="table_has_rows", level="table", column=None, success=bool(found1.success("table_has_rows", None)),
        unexpected_count=0,
        description="the data have at least one row", details=f"{n} rows read",
    ))
    for rule in rules:
        count = int(((reason == rule.name) & rule.failing).sum())
        failing = int(rule.failing.sum())
        details = rule.details or _CHECKS.get(rule.name, "")
        if rule.column is not None and rule.column not in present and rule.name.endswith("_present"):
            details = f"column {rule.column!r} is absent, so it counts as missing in every row"
        if failing != count:
            details += f"; {failing} rows fail this check, {failing - count} of them quarantined for an earlier reason"
        outcomes.append(ExpectationOutcome(
            name=rule.name, level="row", column=rule.column, success=count == 0, unexpected_count=count,
            description=rule.description, details=details,
        ))
    enough = stage3.success("enough_subjects", subject)
    outcomes.append(ExpectationOutcome(
        name="enough_subjects", level="table", column=subject,
        success=bool(enough) if enough is not None else subjects_left >= MIN_SUBJECTS,
        unexpected_count=0, description=f"at least {MIN_SUBJECTS} subjects left after the row checks",
        details=f"{subjects_left} subjects left",
    ))
    reason_texts = _reason_texts(rules, reason, n)
    visits = _sort_visits(typed.loc[kept].set_axis(labels[kept]), subject, time)
    quarantined = ~kept
    quarantine = raw.loc[quarantined].assign(reason=reason_texts[quarantined].to_numpy(dtype=object))
    quarantine = quarantine.set_axis(labels[quarantined])
    return Validated(visits=visits, quarantine=quarantine, expectations=tuple(outcomes), rows_read=n)


def ensure_valid(validated: Validated, config: StudyConfig) -> None:
    """Raise :class:`DataError` with one line for the first failing table-level expectation."""
    for outcome in validated.expectations:
        if outcome.level != "table" or outcome.success:
            continue
        if outcome.name == "column_exists":
            role = _role_of(outcome.column or "", config)
            raise DataError(f"required column {outcome.column!r} ({_role_label(role)}) is missing; {outcome.details}")
        if outcome.name == "table_has_rows":
            raise DataError(f"no rows to analyse: 0 rows read from {config.data.source}")
        if outcome.name == "enough_subjects":
            left = validated.visits[config.data.subject].nunique() if config.data.subject in validated.visits else 0
            quarantined = validated.rows_quarantined
            raise DataError(
                f"only {_plural(left, 'subject')} left after the row checks ({MIN_SUBJECTS} needed); "
                f"{_plural(quarantined, 'row')} {'was' if quarantined == 1 else 'were'} quarantined, "
                f"see {QUARANTINE_FILE}"
            )
        raise DataError(f"validation failed: {outcome.description} ({outcome.details})")


def validation_summary(validated: Validated) -> dict[str, Any]:
    """A JSON-ready summary for ``validation.json``: the counts, the reasons by rule, every expectation."""
    reasons: dict[str, int] = {}
    for outcome in validated.expectations:
        if outcome.level == "row":
            key = outcome.name if not outcome.name.startswith("covariate_") else f"{outcome.name}:{outcome.column}"
            reasons[key] = reasons.get(key, 0) + int(outcome.unexpected_count)
    return {
        "success": bool(validated.success),
        "rows_read": int(validated.rows_read),
        "rows_analysed": int(validated.rows_analysed),
        "rows_quarantined": int(validated.rows_quarantined),
        "quarantine_reasons": reasons,
        "expectations": [dataclasses.asdict(outcome) for outcome in validated.expectations],
    }


# ------------------------------------------------------------------------------------------- rules


def _read(column: str) -> str:
    """Name of the helper column holding ``column`` as read (NaN where the cell was empty or a missing token)."""
    return f"{_PREFIX}read_{column}"


def _role_of(column: str, config: StudyConfig) -> str:
    for role in ("subject", "time", "outcome"):
        if getattr(config.data, role) == column:
            return role
    return "covariate"


def _role_label(role: str) -> str:
    return _ROLE_LABELS.get(role, "used by the candidate models")


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
    reasons = pd.Series(np.nan, index=range(n), dtype=object)
    reasons[failing] = reason
    return _Rule(name, column, description, failing, reasons, "")


def _value_rule(
    name: str, column: str | None, description: str, failing: np.ndarray, template: str,
    raw_text: pd.Series | None, n: int,
) -> _Rule:
    """A rule whose reason shows the value as read: ``template`` has one ``{}`` for it."""
    reasons = pd.Series(np.nan, index=range(n), dtype=object)
    if failing.any() and raw_text is not None:
        before, after = template.split("{}", 1)
        shown = raw_text[failing].astype(object).astype(str).str.strip()
        reasons[failing] = (before + shown + after).to_numpy(dtype=object)
    return _Rule(name, column, description, failing, reasons, "")


def _duplicate_rules(
    typed: pd.DataFrame, data_columns: list[str], subject: str, time: str, in_group: np.ndarray,
) -> tuple[_Rule, _Rule]:
    """Split the (subject, time) duplicates into exact copies (all but the first) and conflicting visits."""
    n = len(typed)
    exact = np.zeros(n, dtype=bool)
    conflicting = np.zeros(n, dtype=bool)
    exact_reasons = pd.Series(np.nan, index=range(n), dtype=object)
    conflict_reasons = pd.Series(np.nan, index=range(n), dtype=object)
    if in_group.any():
        rows = typed.loc[in_group]
        keys = [rows[subject], rows[time]]
        distinct = (~rows.duplicated(subset=data_columns, keep="first")).groupby(keys).transform("sum")
        size = rows.groupby(keys)[subject].transform("size")
        is_conflict = (distinct > 1).to_numpy()
        is_extra_copy = (~is_conflict) & rows.duplicated(subset=[subject, time], keep="first").to_numpy()
        positions = np.flatnonzero(in_group)
        exact[positions[is_extra_copy]] = True
        conflicting[positions[is_conflict]] = True
        first_file = rows.groupby(keys)["source_file"].transform("first")
        first_line = rows.groupby(keys)["source_line"].transform("first")
        exact_reasons[exact] = (
            "exact duplicate of " + first_file[is_extra_copy].astype(str) + " line " + first_line[is_extra_copy].astype(str)
        ).to_numpy(dtype=object)
        conflict_reasons[conflicting] = (
            "conflicting duplicate visit: subject " + rows.loc[is_conflict, subject].astype(str)
            + " at time " + _format_numbers(rows.loc[is_conflict, time]) + " appears "
            + size[is_conflict].astype(str) + " times with different values"
        ).to_numpy(dtype=object)
    return (
        _Rule("no_exact_duplicates", None, "no exact duplicate row of a (subject, time) visit (the first copy is kept)",
              exact, exact_reasons, ""),
        _Rule("no_conflicting_duplicates", None, "no (subject, time) visit recorded twice with different values",
              conflicting, conflict_reasons, ""),
    )


def _any_failure(rules: list[_Rule], n: int) -> np.ndarray:
    taken = np.zeros(n, dtype=bool)
    for rule in rules:
        taken |= rule.failing
    return taken


def _assign_reasons(rules: list[_Rule], n: int) -> np.ndarray:
    """The name of the first rule each row breaks ("" when none)."""
    reason = np.full(n, "", dtype=object)
    for rule in rules:
        new = rule.failing & (reason == "")
        reason[new] = rule.name
    return reason


def _reason_texts(rules: list[_Rule], reason: np.ndarray, n: int) -> pd.Series:
    texts = pd.Series(np.nan, index=range(n), dtype=object)
    for rule in rules:
        mine = (reason == rule.name) & rule.failing & texts.isna().to_numpy()
        texts[mine] = rule.reasons[mine].to_numpy(dtype=object)
    return texts


def _sort_visits(visits: pd.DataFrame, subject: str, time: str) -> pd.DataFrame:
    if visits.empty:
        return visits
    ids = visits[subject]
    as_numbers = pd.to_numeric(ids, errors="coerce")
    key = as_numbers if bool(as_numbers.notna().all()) else ids
    order = np.lexsort((visits[time].to_numpy(dtype=np.float64), pd.factorize(key, sort=True)[0]))
    return visits.iloc[order]


def _format_numbers(values: pd.Series) -> pd.Series:
    """Floats as short text: 3.0 → "3", 2.5 → "2.5"."""
    floats = values.to_numpy(dtype=np.float64)
    text = values.astype(str).astype(object)
    integral = np.isfinite(floats) & (np.floor(floats) == floats) & (np.abs(floats) < 2.0**53)
    if integral.any():
        text[integral] = values[integral].astype(np.int64).astype(str).to_numpy(dtype=object)
    return text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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
            batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
            result = batch.validate(suite, result_format="COMPLETE")
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
