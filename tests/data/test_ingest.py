"""Ingestion: file discovery, CSV/Parquet reading with source lines, unions, and type coercion."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from longitudinal.config import StudyConfig, parse_config
from longitudinal.data.ingest import did_you_mean, is_missing, parse_iso_dates, parse_numbers, read_sources, to_text
from longitudinal.errors import ConfigError, DataError


def make_config(base: Path, source: str, **data: Any) -> StudyConfig:
    return parse_config(
        {
            "study": "s",
            "data": {"source": source, "subject": "id", "time": "week", "outcome": "score", **data},
            "models": {"candidates": {"ri": "score ~ week + (1 | id)"}},
        },
        base_dir=base,
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------ finding


def test_reads_one_csv_as_text_with_source_lines(tmp_path: Path) -> None:
    write(tmp_path / "visits.csv", "id,week,score\n1,0,10.50\n1,1, 11 \n2,0,9\n")
    ingested = read_sources(make_config(tmp_path, "visits.csv"))
    raw = ingested.raw
    assert list(raw.columns) == ["id", "week", "score", "source_file", "source_line"]
    assert raw["score"].tolist() == ["10.50", " 11 ", "9"]  # exactly as read
    assert raw["source_file"].tolist() == ["visits.csv"] * 3
    assert raw["source_line"].tolist() == [2, 3, 4]
    assert isinstance(raw.index, pd.RangeIndex) and raw.index.tolist() == [0, 1, 2]
    assert ingested.rows_read == 3
    typed = ingested.typed
    assert typed["score"].tolist() == [10.5, 11.0, 9.0]
    assert typed["score"].dtype == np.float64 and typed["week"].dtype == np.float64
    assert typed["id"].tolist() == ["1", "1", "2"]
    assert typed["source_line"].tolist() == [2, 3, 4]
    assert typed.index.equals(raw.index)


def test_source_lines_count_quoted_newlines_and_skip_blank_lines(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", 'id,week,score,note\n1,0,1,"two\nlines"\n\n2,0,2,x\n,,,\n3,0,3,y\n')
    ingested = read_sources(make_config(tmp_path, "v.csv"))
    assert ingested.raw["id"].tolist() == ["1", "2", "3"]
    assert ingested.raw["source_line"].tolist() == [2, 5, 7]
    assert ingested.raw["note"].tolist()[0] == "two\nlines"
    assert ingested.files[0].rows == 3


def test_folder_reads_csv_and_parquet_sorted_by_name_and_unions_columns(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    write(folder / "b.csv", "id,week,score,site\n2,0,5,north\n")
    write(folder / "a.csv", "id,week,score\n1,0,4\n1,1,6\n")
    write(folder / "notes.txt", "not data\n")
    pd.DataFrame({"id": [3], "week": [0.0], "score": [7.5], "age": [40]}).to_parquet(folder / "c.parquet")
    ingested = read_sources(make_config(tmp_path, "incoming"))
    raw = ingested.raw
    assert raw["source_file"].tolist() == ["incoming/a.csv", "incoming/a.csv", "incoming/b.csv", "incoming/c.parquet"]
    assert raw["source_line"].tolist() == [2, 3, 2, 1]
    assert list(raw.columns) == ["id", "week", "score", "site", "age", "source_file", "source_line"]
    assert raw["site"].isna().tolist() == [True, True, False, True]
    typed = ingested.typed
    assert typed["id"].tolist() == ["1", "1", "2", "3"]
    assert typed["score"].tolist() == [4.0, 6.0, 5.0, 7.5]
    assert typed["age"].isna().tolist() == [True, True, True, False]
    assert typed["site"].tolist()[2] == "north"
    assert [f.path for f in ingested.files] == ["incoming/a.csv", "incoming/b.csv", "incoming/c.parquet"]
    assert [f.rows for f in ingested.files] == [2, 1, 1]
    assert ingested.files[0].sha256 == hashlib.sha256((folder / "a.csv").read_bytes()).hexdigest()


def test_glob_pattern_selects_matching_files(tmp_path: Path) -> None:
    write(tmp_path / "data" / "site1.csv", "id,week,score\n1,0,1\n")
    write(tmp_path / "data" / "site2.csv", "id,week,score\n2,0,2\n")
    write(tmp_path / "data" / "old.csv", "id,week,score\n9,0,9\n")
    ingested = read_sources(make_config(tmp_path, "data/site*.csv"))
    assert ingested.raw["source_file"].tolist() == ["data/site1.csv", "data/site2.csv"]
    assert ingested.typed["id"].tolist() == ["1", "2"]


def test_source_outside_base_dir_is_shown_as_absolute_path(tmp_path: Path) -> None:
    data = write(tmp_path / "elsewhere" / "v.csv", "id,week,score\n1,0,1\n")
    ingested = read_sources(make_config(tmp_path / "study", str(data)))
    assert ingested.raw["source_file"].tolist() == [str(data.resolve())]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing.csv", r"data.source 'missing.csv': .*missing.csv does not exist; set data.source to a .csv"),
        ("empty_folder", r"data.source 'empty_folder': the folder .*empty_folder holds no .csv or .parquet files"),
        ("data/*.csv", r"data.source 'data/\*.csv': the pattern .*data/\*.csv matches no files"),
    ],
)
def test_nothing_to_read_is_a_data_error_naming_the_source(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "empty_folder").mkdir()
    write(tmp_path / "empty_folder" / "readme.txt", "nothing\n")
    with pytest.raises(DataError, match=message):
        read_sources(make_config(tmp_path, source))


# ------------------------------------------------------------------------------------ odd files


def test_empty_and_header_only_files_contribute_no_rows(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a_empty.csv", "")
    write(tmp_path / "in" / "b_header.csv", "id,week,score\n")
    write(tmp_path / "in" / "c_rows.csv", "id,week,score\n1,0,1\n1,1,2\n")
    ingested = read_sources(make_config(tmp_path, "in"))
    assert ingested.rows_read == 2
    assert [f.rows for f in ingested.files] == [0, 0, 2]
    assert ingested.raw["source_file"].tolist() == ["in/c_rows.csv"] * 2


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.csv": ""}, r"^no rows to analyse: in/a.csv is empty; check the export"),
        ({"a.csv": "id,week,score\n\n"}, r"^no rows to analyse: in/a.csv has a header line but no data rows"),
        ({"a.csv": "", "b.csv": "id,week,score\n"}, r"^no rows to analyse: none of the 2 files \(in/a.csv, in/b.csv\)"),
    ],
)
def test_no_data_row_in_any_file_is_a_data_error(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        write(tmp_path / "in" / name, text)
    with pytest.raises(DataError, match=message):
        read_sources(make_config(tmp_path, "in"))


def test_binary_garbage_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "garbage.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"^garbage.csv: looks like a binary file, not CSV or Parquet; export"):
        read_sources(make_config(tmp_path, "garbage.csv"))


def test_non_utf8_text_is_a_data_error_saying_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "latin.csv").write_bytes("id,week,score,town\n1,0,1,Zürich\n".encode("latin-1"))
    message = r"^latin.csv: is not UTF-8 text \(byte 0xfc on line 2; perhaps Latin-1 .*\); save it as UTF-8 CSV .*iconv"
    with pytest.raises(DataError, match=message):
        read_sources(make_config(tmp_path, "latin.csv"))


def test_excel_workbook_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "visits.csv").write_bytes(b"PK\x03\x04" + b"\x14\x00" * 50)
    with pytest.raises(DataError, match=r"visits.csv: looks like an Excel workbook .*export the sheet as CSV"):
        read_sources(make_config(tmp_path, "visits.csv"))


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "v.parquet").write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match=r"^v.parquet: cannot be read as Parquet \(.*\); check that the file is complete"):
        read_sources(make_config(tmp_path, "v.parquet"))


def test_ragged_csv_is_a_data_error_pointing_at_the_line(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "id,week,score\n1,0,1\n1,1,2,3\n")
    with pytest.raises(DataError, match=r"^v.csv: cannot be parsed as CSV \(.*line 3.*\); check the delimiter"):
        read_sources(make_config(tmp_path, "v.csv"))


def test_column_clashing_with_source_columns_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "id,week,score,source_line\n1,0,1,x\n")
    with pytest.raises(DataError, match=r"v.csv: has a column named 'source_line'.*; rename that column"):
        read_sources(make_config(tmp_path, "v.csv"))


# ------------------------------------------------------------------------------------------ typing


def test_semicolon_file_with_decimal_commas(tmp_path: Path) -> None:
    write(tmp_path / "eu.csv", "id;week;score;dose\n1;0;12,5;0,25\n1;1;13;1\n")
    ingested = read_sources(make_config(tmp_path, "eu.csv"))
    assert ingested.raw["score"].tolist() == ["12,5", "13"]
    assert ingested.typed["score"].tolist() == [12.5, 13.0]
    assert ingested.typed["dose"].tolist() == [0.25, 1.0]
    assert ingested.typed["dose"].dtype == np.float64


def test_missing_tokens_and_text_in_numeric_columns(tmp_path: Path) -> None:
    write(
        tmp_path / "v.csv",
        "id,week,score,age,arm\n1,0,n/a,30,A\n1,1,abc,NA,B\n1,2, . ,null,-\n1,3,7,31,N/A\n",
    )
    ingested = read_sources(make_config(tmp_path, "v.csv"))
    typed, raw = ingested.typed, ingested.raw
    assert raw["score"].tolist() == ["n/a", "abc", " . ", "7"]
    assert typed["score"].isna().tolist() == [True, True, True, False]
    assert typed["age"].dtype == np.float64
    assert typed["age"].isna().tolist() == [False, True, True, False]
    assert typed["arm"].tolist()[:2] == ["A", "B"]
    assert typed["arm"].isna().tolist() == [False, False, True, True]


def test_a_column_with_any_text_stays_text(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "id,week,score,dose\n1,0,1,10\n1,1,2,high\n")
    typed = read_sources(make_config(tmp_path, "v.csv")).typed
    assert typed["dose"].tolist() == ["10", "high"]
    assert typed["dose"].dtype.kind == "O" or pd.api.types.is_string_dtype(typed["dose"])


def test_subject_ids_agree_across_csv_and_parquet(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.csv", "id,week,score\n7,0,1\n7.0,1,2\n 8 ,0,1\n007,0,1\n")
    pd.DataFrame({"id": [7, 8], "week": [2, 1], "score": [3.0, 2.0]}).to_parquet(tmp_path / "in" / "b.parquet")
    pd.DataFrame({"id": [7.0, np.nan], "week": [3, 3], "score": [4.0, 4.0]}).to_parquet(tmp_path / "in" / "c.parquet")
    typed = read_sources(make_config(tmp_path, "in")).typed
    assert typed["id"].tolist()[:7] == ["7", "7", "8", "007", "7", "8", "7"]
    assert pd.isna(typed["id"].iloc[7])


def test_categorical_codes_become_text(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "id,week,score,site\n1,0,1,1\n2,0,1,2.0\n3,0,1,\n")
    typed = read_sources(make_config(tmp_path, "v.csv", categorical=["site"])).typed
    assert typed["site"].tolist()[:2] == ["1", "2"]
    assert pd.isna(typed["site"].iloc[2])


def test_parquet_keeps_native_types_in_raw(tmp_path: Path) -> None:
    pd.DataFrame({"id": ["a", "b"], "week": [0, 1], "score": [1.5, None]}).to_parquet(tmp_path / "v.parquet")
    ingested = read_sources(make_config(tmp_path, "v.parquet"))
    assert ingested.raw["week"].dtype.kind == "i"
    assert ingested.raw["source_line"].tolist() == [1, 2]
    assert ingested.typed["score"].isna().tolist() == [False, True]


def test_required_columns_absent_are_not_an_ingest_error(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "patient,visit,value\n1,0,1\n")
    ingested = read_sources(make_config(tmp_path, "v.csv"))
    assert "score" not in ingested.typed.columns
    assert ingested.typed["value"].tolist() == [1.0]


def test_parse_numbers_rules() -> None:
    values = pd.Series(["1", " -2.5 ", "1e3", "inf", "nan", "abc", None, "12,5", "1.", ".5"])
    assert parse_numbers(values).tolist()[:3] == [1.0, -2.5, 1000.0]
    assert parse_numbers(values).isna().tolist() == [False, False, False, True, True, True, True, True, False, False]
    assert parse_numbers(values, decimal_comma=True).iloc[7] == 12.5
    assert parse_numbers(pd.Series([1.0, np.inf, np.nan])).isna().tolist() == [False, True, True]


def test_to_text_and_is_missing() -> None:
    assert to_text(pd.Series([" a ", "NULL", "3.00", "-", "x.0"])).tolist()[:1] == ["a"]
    text = to_text(pd.Series([" a ", "NULL", "3.00", "-", "x.0"]))
    assert text.isna().tolist() == [False, True, False, True, False]
    assert text[2] == "3" and text[4] == "x.0"
    assert to_text(pd.Series([1.0, 2.5, np.nan])).tolist()[:2] == ["1", "2.5"]
    assert is_missing(pd.Series(["", " NA ", "na", "0", "nan", "NaN", "x"])).tolist() == [
        True, True, True, False, True, True, False,
    ]


# ------------------------------------------------------------------------------------ dates, columns


# Two subjects: 1 from 2024-01-15 (visits at +0, +14 and +21 days and 12 hours), 2 from 2024-01-22.
DATES = ["2024-01-15", "2024-01-29", "2024-02-05 12:00", "2024-01-22", "2024-02-26"]
SUBJECT_DAYS = [0.0, 14.0, 21.5, 0.0, 35.0]
STUDY_DAYS = [0.0, 14.0, 21.5, 7.0, 42.0]


def dated_csv(tmp_path: Path) -> Path:
    return write(tmp_path / "v.csv", "id,day,score\n" + "".join(
        f"{s},{d},1\n" for s, d in zip([1, 1, 1, 2, 2], DATES)
    ))


def dated_parquet(tmp_path: Path, tz: str | None) -> Path:
    stamps = pd.to_datetime(DATES, format="ISO8601")
    if tz is not None:  # the same instants, written in another zone
        stamps = stamps.tz_localize("UTC").tz_convert(tz)
    path = tmp_path / "v.parquet"
    pd.DataFrame({"id": [1, 1, 1, 2, 2], "day": stamps, "score": 1.0}).to_parquet(path)
    return path


def read_time(tmp_path: Path, source: str, **data: Any) -> list[float]:
    return read_sources(make_config(tmp_path, source, time="day", **data)).typed["day"].tolist()


@pytest.mark.parametrize("unit, days", [("days", 1.0), ("weeks", 7.0), ("months", 30.4375), ("years", 365.25)])
@pytest.mark.parametrize("origin, expected", [("subject", SUBJECT_DAYS), ("study", STUDY_DAYS),
                                              ("2024-01-01", [d + 14.0 for d in STUDY_DAYS])])
@pytest.mark.parametrize("form", ["csv", "parquet", "parquet-utc", "parquet-zoned"])
def test_dates_become_time_since_the_origin_in_the_unit(
    tmp_path: Path, unit: str, days: float, origin: str, expected: list[float], form: str,
) -> None:
    if form == "csv":
        source = dated_csv(tmp_path).name
    else:
        source = dated_parquet(tmp_path, {"parquet": None, "parquet-utc": "UTC", "parquet-zoned": "America/New_York"}[form]).name
    time = read_time(tmp_path, source, time_unit=unit, time_origin=origin)
    assert time == [d / days for d in expected]  # exactly: weeks are days / 7


def test_subject_origin_is_the_default_and_weeks_are_days_over_7_exactly(tmp_path: Path) -> None:
    dated_csv(tmp_path)
    days = read_time(tmp_path, "v.csv", time_unit="days")
    weeks = read_time(tmp_path, "v.csv", time_unit="weeks")
    assert days == SUBJECT_DAYS
    assert weeks == [d / 7 for d in days]
    ingested = read_sources(make_config(tmp_path, "v.csv", time="day", time_unit="weeks"))
    assert ingested.dates is not None
    assert ingested.dates.note == "time 'day' holds ISO dates: read as weeks since each subject's first visit"


def test_subject_origin_is_the_earliest_readable_date_of_each_subject(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "id,day,score\n1,2024-01-20,1\n1,2024-01-15,2\n2,2024-01-16 12:00,3\n2,2024-02-30,4\n"
          "2,,5\n2,2024-01-16T18:00:00+02:00,6\n,2024-01-01,7\n")
    time = read_time(tmp_path, "v.csv", time_unit="days")
    assert time[:3] == [5.0, 0.0, 0.0] and time[5] == 4 / 24  # 18:00+02:00 is 16:00 UTC
    assert np.isnan(time[3]) and np.isnan(time[4])  # an impossible date and a missing one: quarantined later
    assert np.isnan(time[6])  # no subject, no origin (quarantined as "subject missing")


def test_fixed_origin_and_study_origin_are_noted(tmp_path: Path) -> None:
    dated_csv(tmp_path)
    study = read_sources(make_config(tmp_path, "v.csv", time="day", time_unit="days", time_origin="study")).dates
    fixed = read_sources(make_config(tmp_path, "v.csv", time="day", time_unit="years", time_origin="2024-01-01")).dates
    assert study is not None and fixed is not None
    assert study.note == "time 'day' holds ISO dates: read as days since 2024-01-15, the earliest date in the data"
    assert fixed.note == "time 'day' holds ISO dates: read as years since 2024-01-01 (data.time_origin)"
    assert (study.dates_read, fixed.origin_date) == (5, "2024-01-01")


def test_dates_without_a_time_unit_are_a_config_error(tmp_path: Path) -> None:
    dated_csv(tmp_path)
    with pytest.raises(ConfigError, match=(
        r"^time 'day' holds dates \(e.g. '2024-01-15', v.csv line 2\); add data.time_unit "
        r"\(days \| weeks \| months \| years\) to say in which unit to analyse the time since the origin$"
    )):
        read_time(tmp_path, "v.csv")
    dated_parquet(tmp_path, None)
    with pytest.raises(ConfigError, match=r"^time 'day' holds dates \(e.g. '2024-01-15 00:00:00', v.parquet line 1\)"):
        read_time(tmp_path, "v.parquet")


@pytest.mark.parametrize("keys, named", [
    ({"time_unit": "weeks"}, "data.time_unit (weeks) is set"),
    ({"time_origin": "study"}, "data.time_origin (study) is set"),
    ({"time_unit": "days", "time_origin": "2024-01-01"}, "data.time_unit (days) and data.time_origin (2024-01-01) are set"),
])
def test_numeric_time_with_date_keys_is_a_config_error(tmp_path: Path, keys: dict[str, str], named: str) -> None:
    write(tmp_path / "v.csv", "id,week,score\n1,0,1\n1,1,1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(named)}, but time 'week' does not hold dates \(e.g. '0'\); "
                                          r"a numeric time is analysed as it is: remove data.time"):
        read_sources(make_config(tmp_path, "v.csv", **keys))


def test_parquet_datetimes_and_csv_dates_share_one_origin(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.csv", "id,day,score\n1,2024-01-15,1\n")
    pd.DataFrame({"id": [2], "day": [pd.Timestamp("2024-01-10")], "score": [1.0]}).to_parquet(tmp_path / "in" / "b.parquet")
    assert read_time(tmp_path, "in", time_unit="days", time_origin="study") == [5.0, 0.0]
    stamps = parse_iso_dates(pd.Series(pd.to_datetime(["2024-03-02", "2024-03-01"])))
    assert stamps is not None and stamps.tolist() == [pd.Timestamp("2024-03-02"), pd.Timestamp("2024-03-01")]


def test_numbers_with_a_stray_date_stay_numbers(tmp_path: Path) -> None:
    assert parse_iso_dates(pd.Series(["0", "1", "2024-01-15"])) is None
    write(tmp_path / "v.csv", "id,week,score\n1,0,1\n1,1,1\n1,2024-01-15,1\n")
    assert read_sources(make_config(tmp_path, "v.csv")).typed["week"].isna().tolist() == [False, False, True]


@pytest.mark.parametrize("date", ["15/01/2024", "01.15.2024", "15-Jan-2024"])
def test_dates_in_other_formats_are_refused_naming_the_fix(tmp_path: Path, date: str) -> None:
    write(tmp_path / "v.csv", f"id,week,score\n1,{date},1\n1,{date},1\n")
    with pytest.raises(DataError, match=(
        rf"^column 'week' \(data.time\) holds dates written like '{date}' \(v.csv line 2\), where day and month "
        r"are ambiguous; write them as ISO dates \(2024-01-15\)"
    )):
        read_sources(make_config(tmp_path, "v.csv"))


def test_a_file_lacking_a_role_column_the_others_have_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.csv", "id,week,score\n1,0,1\n")
    write(tmp_path / "in" / "b.csv", "id,Week,score\n1,1,1\n")
    write(tmp_path / "in" / "c.csv", "id,score\n")  # no rows: ignored
    with pytest.raises(DataError, match=(
        r"^in/b.csv: column 'week' \(data.time\) is missing, although in/a.csv has it; its columns are: "
        r"id, Week, score; did you mean 'Week'\?; give every file the same column names$"
    )):
        read_sources(make_config(tmp_path, "in"))


def test_subject_columns_become_text(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "dog,side,week,score\n7,1,0,1\n7.0,2.0,1,1\n")
    typed = read_sources(make_config(tmp_path, "v.csv", subject=["dog", "side"])).typed
    assert typed["dog"].tolist() == ["7", "7"] and typed["side"].tolist() == ["1", "2"]


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "id,week,score,week\n1,0,1,2\n")
    with pytest.raises(DataError, match=r"^v.csv: the header names column 'week' twice; rename one of them"):
        read_sources(make_config(tmp_path, "v.csv"))


def test_did_you_mean() -> None:
    assert did_you_mean("score", ["id", "Score"]) == "; did you mean 'Score'?"
    assert did_you_mean("patient_id", ["patientid", "week"]) == "; did you mean 'patientid'?"
    assert did_you_mean("score", ["id", "week"]) == ""


def test_arrow_and_object_text_columns_read_the_same() -> None:
    cells = [" a ", "NULL", "3.00", "-", "x.0", None, " 12 ", "1e3", "inf", "", "007"]
    arrow, objects = pd.Series(cells, dtype="str"), pd.Series(cells, dtype=object)
    assert arrow.dtype.storage == "pyarrow"
    pd.testing.assert_series_equal(to_text(arrow), to_text(objects))
    pd.testing.assert_series_equal(parse_numbers(arrow), parse_numbers(objects))
    np.testing.assert_array_equal(is_missing(arrow), is_missing(objects))
