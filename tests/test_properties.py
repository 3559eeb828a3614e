"""Property-based tests: small studies written as CSV, corrupted at random, then ingested and validated.

Whatever the corruption (a cell dropped, blanked or retyped, a line duplicated or dropped, the file cut
off mid-line), the library either refuses with one of our own errors or returns rows whose accounting
is whole: every row read is analysed or quarantined with a reason, never both, never neither.
In process (not the command line) for speed.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from longitudinal.config import StudyConfig, parse_config
from longitudinal.data.ingest import read_sources
from longitudinal.data.validation import ensure_valid, validate_visits
from longitudinal.errors import DataError, LongitudinalError
from longitudinal.records import Validated

COLUMNS = ["dog", "side", "week", "score", "arm", "age"]
ODD_CELLS = ["", "NA", "n/a", "abc", "1,5", "-", "1e999", "inf", "2024-01-15", "  7 ", "é", '"', "week", "3.0", "0"]


@st.composite
def studies(draw: st.DrawFn) -> list[list[str]]:
    """Rows of cells (header first): dogs × sides × weeks, a constant arm and age per dog."""
    dogs = draw(st.integers(1, 5))
    weeks = draw(st.integers(1, 4))
    rows = [COLUMNS]
    for dog in range(1, dogs + 1):
        for side in ("L", "R"):
            for week in range(weeks):
                score = draw(st.floats(-10, 110, allow_nan=False).map(lambda x: f"{x:.2f}"))
                rows.append([f"D{dog}", side, str(week), score, "AB"[dog % 2], str(30 + dog)])
    return rows


#: The edits, each once, except that a line with an extra cell (which stops ingestion as a parse error)
#: is drawn a third as often, so that most examples reach validation and its accounting.
KINDS = [*(["blank", "retype", "duplicate", "drop_row", "drop_cell", "header"] * 3), "extra_cell"]


@st.composite
def corruptions(draw: st.DrawFn, rows: list[list[str]]) -> tuple[list[list[str]], int | None]:
    """The rows after a few random edits, and where to cut the written file (None: do not)."""
    rows = [list(row) for row in rows]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(KINDS))
        i = draw(st.integers(1, max(1, len(rows) - 1))) if len(rows) > 1 else 0
        if i >= len(rows):
            continue
        j = draw(st.integers(0, len(COLUMNS) - 1))
        if kind == "blank" and j < len(rows[i]):
            rows[i][j] = ""
        elif kind == "retype" and j < len(rows[i]):
            rows[i][j] = draw(st.sampled_from(ODD_CELLS))
        elif kind == "duplicate":
            copy = list(rows[i])
            if draw(st.booleans()) and len(copy) > 3:
                copy[3] = "99"  # the same visit with another value
            rows.insert(draw(st.integers(1, len(rows))), copy)
        elif kind == "drop_row" and len(rows) > 1:
            del rows[i]
        elif kind == "drop_cell" and j < len(rows[i]):
            del rows[i][j]
        elif kind == "extra_cell":
            rows[i].append("x")
        elif kind == "header":
            rows[0][j] = draw(st.sampled_from(["Score", "", "week", "wk"]))
    # A file cut off in a quarter of the examples (cut early, it has no data rows and is refused whole).
    cut = draw(st.integers(0, 400)) if draw(st.integers(0, 3)) == 0 else None
    return rows, cut


def write_csv(path: Path, rows: list[list[str]], cut: int | None) -> None:
    text = "".join(",".join(_quoted(cell) for cell in row) + "\n" for row in rows)
    data = text.encode("utf-8")
    path.write_bytes(data if cut is None else data[:cut])


def _quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"' if any(ch in cell for ch in ',"\n') else cell


def make_config(base: Path, **data: Any) -> StudyConfig:
    return parse_config(
        {
            "study": "p",
            "data": {"source": "visits.csv", "subject": ["dog", "side"], "time": "week", "outcome": "score",
                     "categorical": ["arm"]} | data,
            "validation": {"min_observations_per_subject": 2, "outcome_range": [0, 100]},
            "models": {"candidates": {"ri": "score ~ week + arm + age + (1 | dog/side)"}},
        },
        base_dir=base,
    )


def assert_accounted(validated: Validated, config: StudyConfig) -> None:
    assert validated.rows_read == validated.rows_analysed + validated.rows_quarantined
    assert validated.quarantine["reason"].notna().all()
    assert (validated.quarantine["reason"].astype(str).str.len() > 0).all()
    assert sorted([*validated.visits.index, *validated.quarantine.index]) == list(range(validated.rows_read))
    counted = sum(e.unexpected_count for e in validated.expectations if e.level == "row")
    assert counted == validated.rows_quarantined
    visits = validated.visits
    if len(visits):
        subjects = list(config.data.subject_columns)
        assert visits[[*subjects, "week", "score"]].notna().all().all()
        assert not visits.duplicated([*subjects, "week"]).any()
        assert visits["score"].between(0, 100).all()


#: At most this share of the generated examples may end in one of our own errors before any row is
#: accounted for: above it, the property below would mostly check refusals and say little about accounting.
#: (Measured: 23 of the 60 derandomized examples end in an error: empty, header-only or unparseable files.)
MAX_REFUSED_SHARE = 0.5
EXAMPLES = 60


# Derandomized: hypothesis' search is not a run of independent draws (the share of examples that end in
# a parse error ranged from 3% to over 50% between seeds), so a bound on that share must see the same
# examples every run. No shrinking: each example validates with great-expectations (~0.1 s), so shrinking a failure takes
# minutes; the studies are small enough to read unshrunk. To shrink one, rerun with the printed seed
# (--hypothesis-seed=...) after removing ``phases``. No example database: nothing is written to the repo.
def test_corrupted_studies_fail_cleanly_or_account_for_every_row() -> None:
    """Every example ends in our own one-line error that names what is wrong, or in whole accounting;
    the share that ends in an error is counted and bounded, so the accounting check is not vacuous."""
    outcomes: dict[str, int] = {"refused": 0, "accounted": 0}
    messages: list[str] = []

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate], derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data(), single_subject=st.booleans(), constant=st.booleans())
    def corrupted_study(data: st.DataObject, single_subject: bool, constant: bool) -> None:
        rows, cut = data.draw(studies().flatmap(corruptions))
        with TemporaryDirectory() as folder:
            base = Path(folder)
            write_csv(base / "visits.csv", rows, cut)
            changes: dict[str, Any] = {"constant": ["arm", "age"] if constant else []}
            if single_subject:
                changes["subject"] = "dog"
            config = make_config(base, **changes)
            try:
                ingested = read_sources(config)
                validated = validate_visits(ingested, config, ["arm", "age"])
            except LongitudinalError as exc:
                assert_names_its_cause(str(exc), folder)
                outcomes["refused"] += 1
                messages.append(str(exc))
                return
            outcomes["accounted"] += 1
            assert validated.rows_read == ingested.rows_read
            assert_accounted(validated, config)
            try:
                ensure_valid(validated, config)
            except DataError as exc:
                assert_names_its_cause(str(exc), folder)

    corrupted_study()
    total = outcomes["refused"] + outcomes["accounted"]
    assert total >= EXAMPLES // 2, outcomes
    assert outcomes["refused"] <= MAX_REFUSED_SHARE * total, (outcomes, messages[:5])


def assert_names_its_cause(message: str, folder: str) -> None:
    """Our errors are one line, say which file, column or value is at fault, and hide no internal error."""
    assert message and "\n" not in message, message
    assert "internal error" not in message and "Traceback" not in message, message
    named = ("visits.csv" in message or any(f"'{column}'" in message for column in [*COLUMNS, "dog:side"])
             or "subject" in message)
    assert named, message
    assert folder not in message.replace(f"{folder}/visits.csv", ""), message  # the file, not just its folder


def test_a_clean_study_passes_untouched() -> None:
    """The generator's studies are valid before corruption: the property above is not vacuous."""
    rows = [COLUMNS] + [[f"D{d}", s, str(w), "50", "AB"[d % 2], str(30 + d)] for d in (1, 2) for s in "LR" for w in (0, 1)]
    with TemporaryDirectory() as folder:
        write_csv(Path(folder) / "visits.csv", rows, None)
        config = make_config(Path(folder), constant=["arm", "age"])
        validated = validate_visits(read_sources(config), config, ["arm", "age"])
    assert_accounted(validated, config)
    assert validated.rows_quarantined == 0
    ensure_valid(validated, config)
    assert validated.visits["dog:side"].tolist() == ["D1:L", "D1:L", "D1:R", "D1:R", "D2:L", "D2:L", "D2:R", "D2:R"]
    assert list(validated.visits.columns[:3]) == ["dog", "side", "dog:side"]
    assert np.array_equal(validated.visits["week"].to_numpy(), np.tile([0.0, 1.0], 4))
    assert isinstance(validated.visits, pd.DataFrame)
