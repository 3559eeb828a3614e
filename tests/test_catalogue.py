"""The catalogue of bad inputs (README, "What happens when..."), each tried from the command line.

Every test runs ``python -m flows.cli validate --config ...`` as a new user would and checks what they
see: the exit code (1 for a table-level data problem, 2 for a config or usage error), exactly one line
on stderr naming the file, column or key and the fix, no traceback; for row-level problems the reason
in ``quarantine.csv`` and the accounting line on stdout. Runs that reach great-expectations cost a few
seconds each (its import), so the row-level entries share one run of one messy study.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HEADER = "id,week,score,arm\n"
GOOD = "".join(f"{s},{w},{10 * s + w},{'AB'[s % 2]}\n" for s in (1, 2, 3, 4) for w in (0, 1, 2))
ACCOUNTING = re.compile(r"^(\d+) rows read = (\d+) analysed \+ (\d+) quarantined$", re.M)


def write_study(tmp_path: Path, data: str | bytes | None, *, name: str = "visits.csv", **changes: Any) -> Path:
    """A study config in ``tmp_path`` reading ``name``; ``changes`` set dotted keys ("data.time")."""
    if isinstance(data, bytes):
        (tmp_path / name).write_bytes(data)
    elif data is not None:
        (tmp_path / name).write_text(data, encoding="utf-8")
    document: dict[str, Any] = {
        "study": "s",
        "data": {"source": name, "subject": "id", "time": "week", "outcome": "score", "categorical": ["arm"]},
        "validation": {"min_observations_per_subject": 1, "outcome_range": [0, 100]},
        "models": {"candidates": {"ri": "score ~ week + arm + (1 | id)"}},
        "output": {"directory": "reports"},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        target = document
        for parent in parents:
            target = target.setdefault(parent, {})
        if value is None:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", "--config", str(config)],
        capture_output=True, text=True, cwd=config.parent, timeout=300,
    )


def error_line(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The one stderr line of a failed run, without the "longitudinal validate: error: " prefix."""
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    prefix = "longitudinal validate: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0].removeprefix(prefix)


def accounting(result: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    found = ACCOUNTING.search(result.stdout)
    assert found, result.stdout
    read, analysed, quarantined = (int(g) for g in found.groups())
    assert read == analysed + quarantined
    return read, analysed, quarantined


def succeeded(result: subprocess.CompletedProcess[str]) -> Path:
    """The validation folder of a run that passed (last line of stdout), after checking stderr is empty."""
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return Path(result.stdout.strip().splitlines()[-1])


def quarantine_reasons(folder: Path) -> dict[int, str]:
    """source_line -> reason, from quarantine.csv as written."""
    table = pd.read_csv(folder / "quarantine.csv", dtype=str, keep_default_na=False)
    assert (table["reason"] != "").all()
    return dict(zip(table["source_line"].astype(int), table["reason"], strict=True))


# --------------------------------------------------------------------------- columns and whole files


@pytest.mark.slow
def test_renamed_column_names_the_key_the_file_and_the_close_match(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, HEADER.replace("score", "Score") + GOOD))
    assert error_line(result, 1) == (
        "required column 'score' (data.outcome) is missing from visits.csv; columns are: id, week, Score, arm; "
        "did you mean 'Score'?"
    )
    assert accounting(result) == (12, 0, 12)  # still written: every row quarantined as "outcome missing"


def test_column_missing_from_one_of_several_files_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(HEADER + GOOD)
    (tmp_path / "in" / "b.csv").write_text("id,week,scor,arm\n5,0,1,A\n")
    result = validate(write_study(tmp_path, None, **{"data.source": "in"}))
    assert error_line(result, 1) == (
        "in/b.csv: column 'score' (data.outcome) is missing, although in/a.csv has it; its columns are: "
        "id, week, scor, arm; did you mean 'scor'?; give every file the same column names"
    )


def test_empty_file(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, ""))
    assert error_line(result, 1) == (
        "no rows to analyse: visits.csv is empty; check the export, or point data.source at the data file"
    )


def test_header_only_file(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, HEADER))
    assert error_line(result, 1) == (
        "no rows to analyse: visits.csv has a header line but no data rows; check the export, or point "
        "data.source at the data file"
    )


def test_folder_of_empty_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("")
    (tmp_path / "in" / "b.csv").write_text(HEADER)
    result = validate(write_study(tmp_path, None, **{"data.source": "in"}))
    assert error_line(result, 1) == (
        "no rows to analyse: none of the 2 files (in/a.csv, in/b.csv) holds a data row; check the exports, "
        "or point data.source at the data files"
    )


def test_binary_file(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, bytes(range(256)) * 8))
    assert error_line(result, 1) == (
        "visits.csv: looks like a binary file, not CSV or Parquet; export the data as .csv (UTF-8) or .parquet"
    )


def test_excel_workbook_saved_as_csv(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, b"PK\x03\x04" + b"\x14\x00" * 64))
    assert "visits.csv: looks like an Excel workbook or a ZIP archive" in error_line(result, 1)


def test_latin1_text_is_refused_with_the_conversion(tmp_path: Path) -> None:
    data = (HEADER.replace("arm", "town") + "1,0,10,Zürich\n").encode("latin-1")
    message = error_line(validate(write_study(tmp_path, data, **{"data.categorical": []})), 1)
    assert message.startswith("visits.csv: is not UTF-8 text (byte 0xfc on line 2; perhaps Latin-1 or Windows-1252)")
    assert "iconv -f WINDOWS-1252 -t UTF-8 visits.csv > utf8.csv" in message


def test_ragged_line_names_the_line(tmp_path: Path) -> None:
    message = error_line(validate(write_study(tmp_path, HEADER + GOOD + "5,0,1,A,extra\n")), 1)
    assert re.match(r"visits.csv: cannot be parsed as CSV \(.*line 14.*\); check the delimiter", message)


def test_header_naming_a_column_twice(tmp_path: Path) -> None:
    message = error_line(validate(write_study(tmp_path, "id,week,score,score\n1,0,1,2\n")), 1)
    assert message == "visits.csv: the header names column 'score' twice; rename one of them so every column has its own name"


@pytest.mark.slow
def test_semicolons_and_decimal_commas_are_read(tmp_path: Path) -> None:
    text = "id;week;score;arm\n" + "".join(f"{s};{w};{s},5;A\n" for s in (1, 2, 3) for w in (0, 1)) + "4;0;120,5;A\n"
    folder = succeeded(validate(write_study(tmp_path, text)))
    assert quarantine_reasons(folder) == {8: "outcome 120,5 is outside outcome_range [0, 100] (column 'score')"}


DATED = "id,date,score,arm\n" + "".join(
    f"{s},2024-01-{14 + s + w:02d},{s + w},A\n" for s in (1, 2, 3) for w in (0, 7)
) + "3,2024-02-30,4,A\n3,31/01/2024,4,A\n"
DATED_STUDY = {"data.time": "date", "models.candidates": {"ri": "score ~ date + (1 | id)"}}


@pytest.mark.slow
def test_iso_dates_become_time_since_each_subjects_first_visit(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, DATED, **DATED_STUDY, **{"data.time_unit": "weeks"}))
    folder = succeeded(result)
    assert accounting(result) == (8, 6, 2)
    assert "time 'date' holds ISO dates: read as weeks since each subject's first visit" in result.stdout
    summary = json.loads((folder / "validation.json").read_text())
    assert summary["notes"] == ["time 'date' holds ISO dates: read as weeks since each subject's first visit"]
    assert quarantine_reasons(folder) == {
        8: "time is not an ISO date (YYYY-MM-DD): '2024-02-30' (column 'date')",
        9: "time is not an ISO date (YYYY-MM-DD): '31/01/2024' (column 'date')",
    }


@pytest.mark.slow
def test_iso_dates_since_the_studys_first_date(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, DATED, **DATED_STUDY, **{"data.time_unit": "days", "data.time_origin": "study"}))
    summary = json.loads((succeeded(result) / "validation.json").read_text())
    assert summary["notes"] == ["time 'date' holds ISO dates: read as days since 2024-01-15, the earliest date in the data"]


def test_dates_without_a_time_unit(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, DATED, **DATED_STUDY))
    assert error_line(result, 2) == (
        "time 'date' holds dates (e.g. '2024-01-15', visits.csv line 2); add data.time_unit "
        "(days | weeks | months | years) to say in which unit to analyse the time since the origin"
    )


def test_numeric_time_with_a_time_unit(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, HEADER + GOOD, **{"data.time_unit": "weeks"}))
    assert error_line(result, 2) == (
        "data.time_unit (weeks) is set, but time 'week' does not hold dates (e.g. '0'); a numeric time is "
        "analysed as it is: remove data.time_unit, or give the time as ISO dates (2024-01-15)"
    )


def test_dates_in_another_format_are_refused(tmp_path: Path) -> None:
    text = "id,date,score\n1,15/01/2024,1\n1,22/01/2024,2\n"
    result = validate(write_study(
        tmp_path, text, **{"data.time": "date", "data.categorical": [], "models.candidates": {"ri": "score ~ date + (1 | id)"}},
    ))
    assert error_line(result, 1) == (
        "column 'date' (data.time) holds dates written like '15/01/2024' (visits.csv line 2), where day and month "
        "are ambiguous; write them as ISO dates (2024-01-15) and set data.time_unit, "
        "or give the time as a number (weeks since baseline, say)"
    )


def test_decimal_commas_that_split_a_line(tmp_path: Path) -> None:
    text = "id,week,score,arm\n1,0,10.5,A\n1,1,11.5,A\n2,0,10,3,B\n"
    assert error_line(validate(write_study(tmp_path, text)), 1) == (
        "visits.csv: cannot be parsed as CSV (Error tokenizing data. C error: Expected 4 fields in line 4, saw 5); "
        "check the delimiter and the quoting on that line; values like '10,3' look like decimal commas in a "
        "comma-separated file; export with a decimal point, or use ';' as the delimiter"
    )


@pytest.mark.slow
def test_decimal_commas_in_quoted_cells(tmp_path: Path) -> None:
    folder = succeeded(validate(write_study(tmp_path, HEADER + GOOD + '5,0,"10,3",A\n')))
    assert quarantine_reasons(folder) == {14: (
        "outcome is not a number: '10,3' (column 'score'); values like '10,3' look like decimal commas in a "
        "comma-separated file; export with a decimal point, or use ';' as the delimiter"
    )}


@pytest.mark.slow
def test_every_row_quarantined_names_the_rule_and_the_validation_folder(tmp_path: Path) -> None:
    text = "id,week,score,arm,age\n" + "".join(f"{s},{w},{s + w},A,\n" for s in (1, 2, 3) for w in (0, 1))
    result = validate(write_study(tmp_path, text + "4,0,x,A,40\n", **{"models.candidates": {"ri": "score ~ week + age + (1 | id)"}}))
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert error_line(result, 1) == (
        "only 0 subjects left after the row checks (3 needed): 7 of 7 rows were quarantined, most by "
        "\"missing covariate 'age' (used by the candidate models)\" (6 rows); the checks and the quarantine "
        f"are in {folder}"
    )
    assert folder.parent == tmp_path / "reports" / "s" / "validations"
    assert json.loads((folder / "validation.json").read_text())["quarantine_reasons"]["covariate_present:age"] == 6


@pytest.mark.slow
def test_subject_ids_differing_only_by_leading_zeros_or_case_are_a_warning(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(HEADER + "068,0,1,A\n068,1,2,A\n A1 ,0,1,A\n2,0,1,A\n")
    pd.DataFrame({"id": [68, 68, 2], "week": [2.0, 3.0, 1.0], "score": [3.0, 4.0, 2.0], "arm": "A"}).to_parquet(tmp_path / "in" / "b.parquet")
    (tmp_path / "in" / "c.csv").write_text(HEADER + "a1,1,2,A\n")
    result = validate(write_study(tmp_path, None, **{"data.source": "in"}))
    folder = succeeded(result)
    warning = (
        "subject ids '068' and '68' differ only by leading zeros or letter case (2 such pairs, e.g. also 'A1' and "
        "'a1'): they are analysed as different subjects; make the ids consistent if they are the same subject"
    )
    assert f"warning: {warning}" in result.stdout.splitlines()
    summary = json.loads((folder / "validation.json").read_text())
    assert summary["warnings"] == [warning]
    check = next(e for e in summary["expectations"] if e["name"] == "subject_ids_distinct")
    assert (check["level"], check["success"], check["unexpected_count"], check["details"]) == ("warning", False, 0, warning)
    assert accounting(result) == (8, 8, 0)  # the numeric 2 and the text "2" are one subject, as always


# ----------------------------------------------------------------------------------------- the config


def test_misspelt_key_suggests_the_right_one(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, HEADER + GOOD, **{"validation.min_observation_per_subject": 2}))
    assert error_line(result, 2) == str(tmp_path / "study.yaml") + (
        ": unknown key 'validation.min_observation_per_subject' (did you mean "
        "'min_observations_per_subject'? allowed here: min_observations_per_subject, outcome_range, max_file_bytes)"
    )


def test_formula_with_a_syntax_error(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, HEADER + GOOD, **{"models.candidates": {"ri": "score ~ week + (1 | id"}}))
    assert re.fullmatch(r"candidate 'ri'.*: unbalanced parentheses", error_line(result, 2))


def test_formula_naming_a_missing_column(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, HEADER + GOOD, **{"models.candidates": {"ri": "score ~ week + age + (1 | id)"}}))
    message = error_line(result, 2)
    assert message.startswith("candidate 'ri' uses column 'age', which the data lack; columns are: ")
    assert set(message.split("columns are: ")[1].split(", ")) == {"id", "week", "score", "arm"}


def test_empty_candidate_list(tmp_path: Path) -> None:
    result = validate(write_study(tmp_path, HEADER + GOOD, **{"models.candidates": {}}))
    assert error_line(result, 2) == str(tmp_path / "study.yaml") + (
        ": models.candidates: the candidate list is empty; name at least one model formula"
    )


# ------------------------------------------------------------------------------------------ row level

# One messy study: line -> reason. Lines 2-10 are three clean subjects of three visits.
MESSY = [
    (",1,5,A", "subject missing (column 'id')"),
    ("4,,5,A", "time missing (column 'week')"),
    ("4,x,5,A", "time is not a number: 'x' (column 'week')"),
    ("4,3,,A", "outcome missing (column 'score')"),
    ("4,4,n/a,A", "outcome missing (column 'score')"),
    ("4,5,abc,A", "outcome is not a number: 'abc' (column 'score')"),
    ("4,6,150,A", "outcome 150 is outside outcome_range [0, 100] (column 'score')"),
    ("4,7,5,", "missing covariate 'arm' (used by the candidate models)"),
    ("1,0,10,A", "exact duplicate of visits.csv line 2"),
    ("2,1,99,A", "conflicting duplicate visit: subject 2 at time 1 appears 2 times with different values"),
    ("5,0,50,A", "subject 5 has 1 row, fewer than min_observations_per_subject = 2"),
    ("6,0,60,A", "column 'arm' changes within subject 6 ('A', 'B'); data.constant says it does not"),
    ("6,1,61,B", "column 'arm' changes within subject 6 ('A', 'B'); data.constant says it does not"),
    ("id,week,score,arm", "a repeated header line (its cells are the column names)"),
    ("3,3,", "outcome missing (column 'score')"),  # the file cut off mid-line
]
CLEAN = "".join(f"{s},{w},{10 * s + w},A\n" for s in (1, 2, 3) for w in (0, 1, 2))


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[int, str]]:
    folder = tmp_path_factory.mktemp("messy")
    text = HEADER + CLEAN + "\n".join(row for row, _ in MESSY)  # no final newline: truncated
    config = write_study(folder, text, **{"validation.min_observations_per_subject": 2, "data.constant": ["arm"]})
    result = validate(config)
    return result, quarantine_reasons(succeeded(result))


def _expect(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]], *rows: int) -> None:
    """Rows of MESSY (0-based) are quarantined with their reason; the accounting line is whole."""
    result, reasons = messy
    for row in rows:
        assert reasons[11 + row] == MESSY[row][1]
    assert accounting(result) == (9 + len(MESSY), 8, 1 + len(MESSY))


@pytest.mark.slow
def test_every_row_is_accounted_for(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _, reasons = messy
    expected = {11 + i: reason for i, (_, reason) in enumerate(MESSY)}
    expected[6] = MESSY[9][1]  # the first copy of the conflicting visit goes too
    assert reasons == expected
    _expect(messy)


@pytest.mark.slow
def test_missing_value_in_each_role(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _expect(messy, 0, 1, 3, 4, 7)


@pytest.mark.slow
def test_values_that_are_not_numbers(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _expect(messy, 2, 5)


@pytest.mark.slow
def test_out_of_range_outcome(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _expect(messy, 6)


@pytest.mark.slow
def test_exact_and_conflicting_duplicates(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _expect(messy, 8, 9)
    assert messy[1][6] == MESSY[9][1]  # line 6 is the first copy


@pytest.mark.slow
def test_subject_with_too_few_visits(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _expect(messy, 10)


@pytest.mark.slow
def test_covariate_declared_constant_that_changes(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _expect(messy, 11, 12)


@pytest.mark.slow
def test_repeated_header_and_truncated_last_line(messy: tuple[subprocess.CompletedProcess[str], dict[int, str]]) -> None:
    _expect(messy, 13, 14)
