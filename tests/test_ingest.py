"""Ingestion: file discovery, CSV/Parquet reading with source lines, unions, and type coercion."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from longitudinal.config import StudyConfig, parse_config
from longitudinal.errors import DataError
from longitudinal.ingest import did_you_mean, is_missing, parse_iso_dates, parse_numbers, read_sources, to_text


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


def test_iso_dates_in_the_time_column_become_days_since_the_earliest(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", "id,day,score\n1,2024-01-20,1\n1,2024-01-15,2\n2,2024-01-16 12:00,3\n2,2024-02-30,4\n2,,5\n")
    typed = read_sources(make_config(tmp_path, "v.csv", time="day")).typed
    assert typed["day"].tolist()[:3] == [5.0, 0.0, 1.5]
    assert typed["day"].isna().tolist() == [False, False, False, True, True]  # impossible date, missing


def test_parquet_datetimes_and_csv_dates_share_one_origin(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.csv", "id,day,score\n1,2024-01-15,1\n")
    pd.DataFrame({"id": [2], "day": [pd.Timestamp("2024-01-10")], "score": [1.0]}).to_parquet(tmp_path / "in" / "b.parquet")
    assert read_sources(make_config(tmp_path, "in", time="day")).typed["day"].tolist() == [5.0, 0.0]
    stamps = parse_iso_dates(pd.Series(pd.to_datetime(["2024-03-02", "2024-03-01"])))
    assert stamps is not None and stamps.days.tolist() == [1.0, 0.0] and stamps.origin == pd.Timestamp("2024-03-01")


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
