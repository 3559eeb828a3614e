from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from longitudinal.errors import DataError, OutputUnwritable, SourceUnavailable
from longitudinal.reporting.run_folder import discard_run, new_run_id, publish_run, start_run, write_json


def test_run_ids_sort_by_time_and_are_unique() -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ids = [new_run_id(start + timedelta(microseconds=i * 7919)) for i in range(50)]
    assert ids == sorted(ids)
    assert len({new_run_id(start) for _ in range(20)}) == 20


def test_publish_moves_the_run_into_place_and_points_latest(tmp_path: Path) -> None:
    study = tmp_path / "study"
    first = start_run(study, "20260101T000000_000000Z-aaaaaa")
    (first / "report.html").write_text("one")
    assert first.name.startswith(".staging-")
    published = publish_run(first, "20260101T000000_000000Z-aaaaaa")
    assert published == study / "20260101T000000_000000Z-aaaaaa"
    assert (study / "latest" / "report.html").read_text() == "one"

    second = start_run(study, "20260102T000000_000000Z-bbbbbb")
    (second / "report.html").write_text("two")
    # Until published, latest still shows the previous run and no run folder exists for the new one.
    assert (study / "latest" / "report.html").read_text() == "one"
    assert not (study / "20260102T000000_000000Z-bbbbbb").exists()
    publish_run(second, "20260102T000000_000000Z-bbbbbb")
    assert (study / "latest").resolve() == (study / "20260102T000000_000000Z-bbbbbb").resolve()
    assert sorted(p.name for p in study.iterdir()) == [
        "20260101T000000_000000Z-aaaaaa", "20260102T000000_000000Z-bbbbbb", "latest",
    ]


def test_a_discarded_run_leaves_nothing_and_keeps_latest(tmp_path: Path) -> None:
    study = tmp_path / "study"
    publish_run(start_run(study, "r1"), "r1")
    failed = start_run(study, "r2")
    (failed / "report.html").write_text("half")
    discard_run(failed)
    assert sorted(p.name for p in study.iterdir()) == ["latest", "r1"]
    assert (study / "latest").resolve().name == "r1"


def test_json_has_no_nan(tmp_path: Path) -> None:
    path = write_json({"a": math.nan, "b": [1.5, math.inf], "c": Path("/x")}, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": "/x"}


def test_a_run_id_made_under_the_lock_sorts_after_the_runs_before_it(tmp_path: Path) -> None:
    from longitudinal.reporting.run_folder import run_id_of

    study = tmp_path / "study"
    first = run_id_of(start_run(study))
    publish_run(study / f".staging-{first}", first)
    second = run_id_of(start_run(study))
    assert second > first
    assert (study / f".staging-{second}" / "figures").is_dir()
    discard_run(study / f".staging-{second}")


# ------------------------------------------------------------------------------ the needs-run marker


def test_a_run_marks_the_study_until_it_publishes(tmp_path: Path) -> None:
    from longitudinal.reporting.run_folder import needs_run_path, read_needs_run

    study = tmp_path / "study"
    staging = start_run(study, "r1")
    assert read_needs_run(study) == {"since": read_needs_run(study)["since"], "first_run": "r1", "attempt": "r1"}
    assert needs_run_path(study) == tmp_path / ".study.needs-run"  # beside the study: its listing shows runs
    publish_run(staging, "r1")
    assert read_needs_run(study) is None
    assert sorted(p.name for p in study.iterdir()) == ["latest", "r1"]


@pytest.mark.parametrize("error", [
    ConnectionError("the Prefect server went away"),
    OutputUnwritable("cannot write the run folder in x: the disk is full"),
    SourceUnavailable("a.csv: cannot be read (locked)"),
    KeyboardInterrupt(),
    RuntimeError("a bug"),
])
def test_a_run_that_fails_for_a_passing_cause_leaves_the_marker(tmp_path: Path, error: BaseException) -> None:
    from longitudinal.reporting.run_folder import read_needs_run

    study = tmp_path / "study"
    publish_run(start_run(study, "r1"), "r1")
    discard_run(start_run(study, "r2"), error)
    marker = read_needs_run(study)
    assert marker is not None and marker["first_run"] == "r2"
    assert marker["last_failure"].startswith(type(error).__name__)
    # The next run keeps the first unpublished run in the marker, and its publish clears it.
    third = start_run(study, "r3")
    assert read_needs_run(study) == marker | {"attempt": "r3"}
    publish_run(third, "r3")
    assert read_needs_run(study) is None


def test_a_run_that_fails_on_its_data_clears_its_own_marker_but_not_an_earlier_one(tmp_path: Path) -> None:
    from longitudinal.reporting.run_folder import read_needs_run

    study = tmp_path / "study"
    discard_run(start_run(study, "r1"), DataError("only 2 subjects left after the row checks (3 needed)"))
    assert read_needs_run(study) is None  # running again would fail the same way: nothing to retry

    discard_run(start_run(study, "r2"), ConnectionError("server gone"))
    discard_run(start_run(study, "r3"), DataError("b.csv: column 'score' is missing"))
    marker = read_needs_run(study)  # r2's data are still unpublished
    assert marker is not None and (marker["first_run"], marker["attempt"]) == ("r2", "r3")
    assert marker["last_failure"] == "DataError: b.csv: column 'score' is missing"


def test_a_killed_run_leaves_the_marker(tmp_path: Path) -> None:
    import subprocess
    import sys

    from longitudinal.reporting.run_folder import read_needs_run

    study = tmp_path / "study"
    subprocess.run([sys.executable, "-c", (
        "import os; from pathlib import Path; from longitudinal.reporting.run_folder import start_run; "
        f"start_run(Path({str(study)!r}), 'r1'); os._exit(9)"
    )], check=False)
    assert read_needs_run(study) == {"since": read_needs_run(study)["since"], "first_run": "r1", "attempt": "r1"}
    staging = start_run(study, "r2")  # the killed run's staging is removed, its marker kept
    assert not (study / ".staging-r1").exists()
    assert read_needs_run(study)["first_run"] == "r1"
    publish_run(staging, "r2")
    assert read_needs_run(study) is None


# --------------------------------------------------------------- writes the disk refuses (fault injection)


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_the_run_leaves_no_trace_and_keeps_latest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_html import make_inputs

    from longitudinal.reporting.run_folder import read_needs_run, write_run_files

    study = tmp_path / "study"
    publish_run(start_run(study, "r1"), "r1")

    def half_then_full(self: pq.ParquetWriter, table: Any, **kwargs: object) -> None:
        self.where.write(b"PAR1 half a file")  # data.parquet's file, opened by write_data
        _no_space()

    monkeypatch.setattr(pq.ParquetWriter, "write_table", half_then_full)
    staging = start_run(study, "r2")
    with pytest.raises(OutputUnwritable) as caught:
        try:
            write_run_files(staging, make_inputs())
        except BaseException as error:
            discard_run(staging, error)  # as the flow does
            raise
    message = str(caught.value)
    assert message == (f"cannot write the run folder in {study}: the disk is full (no space left on device); "
                       "free space on that file system (older run folders, Prefect's cached fits), or set "
                       "output.directory to a folder with room")
    assert "\n" not in message
    assert sorted(p.name for p in study.iterdir()) == ["latest", "r1"]  # no staging, no r2
    assert (study / "latest").resolve().name == "r1"
    assert read_needs_run(study)["last_failure"].startswith("OutputUnwritable: cannot write the run folder")


@pytest.mark.parametrize("code, says", [
    (errno.EROFS, "the file system is read-only; remount it read-write, or set output.directory"),
    (errno.EACCES, "permission denied for user id"),
    (errno.EDQUOT, "the disk quota is exceeded; free space within the quota"),
])
def test_publishing_on_a_refusing_disk_keeps_latest_and_leaves_no_run_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, says: str) -> None:
    import longitudinal.reporting.run_folder

    study = tmp_path / "study"
    publish_run(start_run(study, "r1"), "r1")
    staging = start_run(study, "r2")
    (staging / "report.html").write_text("two")
    real_replace = os.replace

    def refuse_latest(source: Any, target: Any) -> None:
        if Path(target).name == "latest":
            raise OSError(code, os.strerror(code), str(target))
        real_replace(source, target)

    monkeypatch.setattr(longitudinal.reporting.run_folder.os, "replace", refuse_latest)
    with pytest.raises(OutputUnwritable, match=rf"^cannot publish the run in {study}: {says}"):
        try:
            publish_run(staging, "r2")
        except BaseException as error:
            discard_run(staging, error)
            raise
    assert sorted(p.name for p in study.iterdir()) == ["latest", "r1"]
    assert (study / "latest" / "report.html").exists() is False and (study / "latest").resolve().name == "r1"


def test_a_read_only_output_folder_stops_the_run_before_it_starts(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, where chmod does not stop a write: the refusal is injected at the first write
    (as a read-only mount refuses it); as another user, a chmod-ed folder is tried too."""
    output = tmp_path / "reports"
    output.mkdir()
    if os.geteuid() != 0:
        output.chmod(0o555)
        try:
            with pytest.raises(OutputUnwritable, match=rf"^cannot start a run in {output / 'study'}: permission"):
                start_run(output / "study")
        finally:
            output.chmod(0o755)
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: _raise(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(OutputUnwritable, match=rf"^cannot start a run in {output / 'study'}: the file system is "
                                               "read-only; remount it read-write"):
        start_run(output / "study")
    assert list(output.iterdir()) == []


def _raise(error: BaseException) -> None:
    raise error


def test_validate_says_in_one_line_which_folder_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str],
                                                        copy_example_study: Any) -> None:
    from flows.cli import main

    config = copy_example_study(tmp_path)
    real_write_text = Path.write_text

    def full_for_json(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.suffix == ".json":
            real_write_text(self, "{\"half\": ")
            _no_space()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_json)
    assert main(["validate", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    validations = tmp_path / "reports" / "example-trial" / "validations"
    assert err == (f"longitudinal validate: error: cannot write the validation results in {validations}: the disk "
                   "is full (no space left on device); free space on that file system (older run folders, "
                   "Prefect's cached fits), or set output.directory to a folder with room\n")
    assert list(validations.iterdir()) == []  # the half-written check folder is gone


# ----------------------------------------------------------------------- text safe to open and to render


@pytest.mark.parametrize("cell, written", [
    ("=HYPERLINK(\"http://x\",\"y\")", "'=HYPERLINK(\"http://x\",\"y\")"),
    ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"),
    ("\rx", "'\rx"),
    ("-", "'-"),
    ("-5", "-5"), ("+1.5", "+1.5"), ("-2e3", "-2e3"), ("-.5", "-.5"),  # plain numbers: read as numbers
    ("12", "12"), ("a=b", "a=b"), ("", ""),
    ("tri\udce6l.csv", "tri\ufffdl.csv"),
    (3.5, 3.5), (-5, -5),
])
def test_spreadsheet_cells(cell: object, written: object) -> None:
    from longitudinal.reporting.run_folder import spreadsheet_cell

    assert spreadsheet_cell(cell) == written


def test_quarantine_csv_cannot_run_formulas(tmp_path: Path) -> None:
    from test_html import make_validated

    from longitudinal.reporting.run_folder import write_quarantine

    validated = make_validated()
    quarantine = validated.quarantine.assign(
        pid=["=1+1", "-5", "@x"], score=[-3, 4, 5], **{"=cmd": ["+a", None, "ok"]})
    path = write_quarantine(replace(validated, quarantine=quarantine), tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "pid,week,score,source_file,source_line,reason,'=cmd"
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert back["pid"].tolist() == ["'=1+1", "-5", "'@x"]
    assert back["score"].tolist() == ["-3", "4", "5"]  # numbers stay numbers
    assert back["'=cmd"].tolist() == ["'+a", "", "ok"]


@pytest.mark.parametrize("value, shown", [
    ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert\\(1\\)&gt;"),
    ("a|b", "a\\|b"),
    ("[click](javascript:alert(1))", "\\[click\\]\\(javascript:alert\\(1\\)\\)"),
    ("*bold* _it_ `code` \\", "\\*bold\\* \\_it\\_ \\`code\\` \\\\"),
    ("two\nlines", "two lines"),
    ("it's \"q\" & co", "it&#x27;s &quot;q&quot; &amp; co"),
    ("tri\udce6l.csv", "tri\ufffdl.csv"),
    ("ris_uncorrelated", "ris\\_uncorrelated"),
])
def test_markdown_text_escapes_html_and_table_syntax(value: str, shown: str) -> None:
    from longitudinal.reporting.run_folder import markdown_text

    assert markdown_text(value) == shown


def test_the_validation_artifact_keeps_data_values_in_their_cells() -> None:
    from test_html import make_validated

    from tasks.validation import validation_markdown

    validated = make_validated()
    quarantine = validated.quarantine.assign(reason=["outcome is not a number: '<script>x</script>|y' (column 'score')"] * 3)
    markdown = validation_markdown(replace(validated, quarantine=quarantine))
    assert "<" not in markdown and "<script>" not in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| outcome is not a number")]
    assert rows == ["| outcome is not a number | 3 |"]  # the rule, not the value, names the row
    checks = validation_markdown(replace(validated, expectations=(
        replace(validated.expectations[0], description="column '<b>a|b</b>' exists"),)))
    (row,) = [line for line in checks.splitlines() if "exists" in line]
    assert row == "| column &#x27;&lt;b&gt;a\\|b&lt;/b&gt;&#x27; exists | table | pass | 0 |"


def test_json_outputs_are_utf8_with_replacement_characters(tmp_path: Path) -> None:
    path = write_json({"inputs": [{"path": "landing/tri\udce6l.csv"}], Path("k\udcff"): 1}, tmp_path / "m.json")
    assert json.loads(path.read_text(encoding="utf-8")) == {"inputs": [{"path": "landing/tri\ufffdl.csv"}],
                                                           "k\ufffd": 1}


# ------------------------------------------------------------------- residual covariance structures (MMRM)


def test_a_structured_selected_model_writes_its_covariance_figures_and_json_entry(tmp_path: Path) -> None:
    from test_html import make_inputs, make_mmrm_inputs

    from longitudinal.reporting.run_folder import write_run_files

    run = tmp_path / "study" / "run"
    (run / "figures").mkdir(parents=True)
    report = write_run_files(run, make_mmrm_inputs())
    for stem in ("residual_covariance", "residual_correlation"):
        assert (run / "figures" / f"{stem}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), stem
    page = report.read_text(encoding="utf-8")
    assert page.count('id="fig-residual_covariance"><img src="data:image/png;base64,') == 1
    assert page.count('id="fig-residual_correlation"><img src="data:image/png;base64,') == 1
    covariance = json.loads((run / "selected_model.json").read_text())["covariance"]
    assert {k: covariance[k] for k in ("structure", "term", "description", "visit", "labels", "n_params")} == {
        "structure": "ar1", "term": "ar1(week | pid)", "description": "AR(1)", "visit": "week",
        "labels": ["0", "1", "2", "3"], "n_params": 2}
    assert covariance["parameters"] == {"sigma": 2.0, "rho": 0.6}
    assert covariance["matrix"][0] == pytest.approx([4.0, 2.4, 1.44, 0.864])
    assert covariance["correlation"][3] == pytest.approx([0.216, 0.36, 0.6, 1.0])

    plain = tmp_path / "study" / "plain"
    (plain / "figures").mkdir(parents=True)
    write_run_files(plain, make_inputs())
    assert json.loads((plain / "selected_model.json").read_text())["covariance"] is None
    assert not (plain / "figures" / "residual_covariance.png").exists()
    assert not (plain / "figures" / "residual_correlation.png").exists()


# ------------------------------------------------------------------------------------------ data.parquet


@pytest.mark.parametrize("row_group_rows", [2**17, 5])
def test_data_parquet_holds_text_as_text_when_the_run_holds_it_as_categories(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row_group_rows: int) -> None:
    import pyarrow as pa
    from test_html import make_validated

    import longitudinal.reporting.run_folder as run_folder

    monkeypatch.setattr(run_folder, "DATA_ROW_GROUP_ROWS", row_group_rows)
    validated = make_validated()
    text = validated.visits.assign(pid=lambda v: v["pid"].where(v["week"] != 1.0))  # a missing value too
    held = text.assign(pid=pd.Categorical(text["pid"].array), source_file=pd.Categorical(text["source_file"].array))
    (tmp_path / "held").mkdir()
    path = run_folder.write_data(replace(validated, visits=held), tmp_path / "held")

    schema = pq.read_schema(path)
    assert not [f.name for f in schema if pa.types.is_dictionary(f.type)]
    assert schema.field("pid").type == schema.field("source_file").type == pa.large_string()
    # the schema (pandas' metadata too) of the file pandas writes for the rows held as text
    text.to_parquet(tmp_path / "text.parquet", engine="pyarrow", index=False)
    assert schema.equals(pq.read_schema(tmp_path / "text.parquet"), check_metadata=True)
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-len(text) // row_group_rows)
    back = pd.read_parquet(path)
    assert back["pid"].dtype == back["source_file"].dtype == "str"
    pd.testing.assert_frame_equal(back, text.reset_index(drop=True))
