"""Ingestion: read the study's CSV and Parquet files into one table, remembering where every row came from.

``data.source`` is a file, a folder (its ``*.csv`` and ``*.parquet`` files, sorted by name, not
recursive) or a glob pattern. CSV is read as text, cell for cell, so that nothing is lost before
validation; Parquet keeps its native types. The union of the files is ``raw``; ``typed`` coerces the
configured roles (see :func:`coerce_types`). A value that cannot be coerced becomes missing in ``typed``
while ``raw`` keeps it, so that validation can quarantine the row and show what was read.
Columns that the config names but no file has are not an error here: validation reports them. Ingestion
refuses what cannot be a study table at all: no data row in any file, a file that is not CSV or Parquet,
a header naming a column twice, a role column that one file lacks while the others have it, and a
time column of dates not written as ISO 8601. A time column of ISO dates needs ``data.time_unit``, and
numeric time must not have it (both are config errors, found here because they depend on the data).
"""

from __future__ import annotations

import csv
import difflib
import glob
import hashlib
import io
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from longitudinal.config import TIME_UNIT_DAYS, StudyConfig
from longitudinal.errors import ConfigError, DataError, SourceUnavailable
from longitudinal.records import SOURCE_COLUMNS, Ingested, SourceFile, TimeFromDates

MISSING_TOKENS: frozenset[str] = frozenset({"", "NA", "N/A", "n/a", "na", "NaN", "nan", "null", "NULL", ".", "-"})
"""Cell values (after stripping whitespace) that mean "missing" in a CSV file or a Parquet text column."""

DATA_SUFFIXES: tuple[str, ...] = (".csv", ".parquet")

_GLOB_CHARS = re.compile(r"[*?\[]")
# Arrow (RE2) patterns, applied to whole columns at once.
_INTEGRAL_TEXT = r"^([+-]?\d+)\.0*$"
_DECIMAL_COMMA = r"^([+-]?\d*),(\d+(?:[eE][+-]?\d+)?)$"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?( ?(Z|[+-]\d{2}(:?\d{2})?))?)?$"
_OTHER_DATE = r"^(\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|\d{4}/\d{1,2}/\d{1,2}|\d{1,2}[ -][A-Za-z]{3,9}[ -]\d{2,4})$"
_MISSING_SET = pa.array(sorted(MISSING_TOKENS), type=pa.string())
_STR = pd.StringDtype("pyarrow", na_value=np.nan)  # pandas' default ``str`` dtype
_PARQUET_MAGIC = b"PAR1"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True, eq=False)
class FilePart:
    """One file as read: its rows as text (CSV) or native (Parquet), and how to parse its numbers."""

    raw: pd.DataFrame
    source: SourceFile
    decimal_comma: bool


def read_sources(config: StudyConfig) -> Ingested:
    """Read every file that ``data.source`` names and return their union, raw and typed.

    Rows keep the order of the files (sorted by name) and of the lines within each file; the index is a
    clean RangeIndex. Each row remembers ``source_file`` (relative to the config's folder when possible)
    and ``source_line`` (CSV: physical line, header = line 1; Parquet: 1-based row number). Blank lines
    and lines holding only delimiters are not rows.
    """
    return assemble([read_file(path, config) for path in find_source_files(config)], config)


def assemble(parts: Sequence[FilePart], config: StudyConfig) -> Ingested:
    """The files read (in this order) as one table, raw and typed: what :func:`read_sources` returns.

    Refuses (:class:`DataError`) when no file holds a data row and when one file lacks a role column
    the others have.
    """
    if not any(len(part.raw) for part in parts):
        has_header = any(c not in SOURCE_COLUMNS for part in parts for c in part.raw.columns)
        raise DataError(f"no rows to analyse: {describe_no_rows([part.source for part in parts], has_header)}")
    _check_columns_agree(parts, config)
    raw = _union([part.raw for part in parts])
    typed, dates = read_time(raw, coerce_types(parts, raw, config), config)
    return Ingested(raw=raw, typed=typed, files=tuple(part.source for part in parts), dates=dates)


def find_source_files(config: StudyConfig) -> list[Path]:
    """The data files that ``data.source`` names: a file, a folder's CSV/Parquet files, or a glob's matches."""
    path = config.source_path
    given = config.data.source
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
        if not files:
            raise DataError(
                f"data.source {given!r}: the folder {path} holds no .csv or .parquet files; "
                "put the data files there or point data.source at a file"
            )
        return files
    if _GLOB_CHARS.search(str(path)):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(
                f"data.source {given!r}: the pattern {path} matches no files; "
                "check the pattern or point data.source at a file or a folder"
            )
        return matches
    raise DataError(
        f"data.source {given!r}: {path} does not exist; set data.source to a .csv or .parquet file, "
        "a folder of them, or a glob such as 'incoming/*.csv'"
    )


def _check_columns_agree(parts: Sequence[FilePart], config: StudyConfig) -> None:
    """Refuse a file that lacks a role column the other files have (renamed in one export, say).

    Its rows would otherwise all be quarantined as "missing", hiding a structural problem. A column no
    file has is validation's to report; files without rows are ignored.
    """
    data = config.data
    labels = {c: "data.subject" for c in data.subject_columns}
    labels |= {data.time: "data.time", data.outcome: "data.outcome"} | {c: "data.constant" for c in data.constant}
    with_rows = [part for part in parts if len(part.raw)]
    for column, label in labels.items():
        having = [part for part in with_rows if column in part.raw.columns]
        if not having or len(having) == len(with_rows):
            continue
        lacking = next(part for part in with_rows if column not in part.raw.columns)
        columns = [c for c in lacking.raw.columns if c not in SOURCE_COLUMNS]
        raise DataError(
            f"{lacking.source.path}: column {column!r} ({label}) is missing, although {having[0].source.path} "
            f"has it; its columns are: {', '.join(columns)}{did_you_mean(column, columns)}; "
            "give every file the same column names"
        )


def describe_no_rows(files: Sequence[SourceFile], has_header: bool) -> str:
    """Why there is nothing to analyse, naming the file(s): empty, or a header line and nothing else."""
    if len(files) == 1:
        what = "has a header line but no data rows" if has_header else "is empty"
        return f"{files[0].path} {what}; check the export, or point data.source at the data file"
    return (f"none of the {len(files)} files ({', '.join(f.path for f in files)}) holds a data row; "
            "check the exports, or point data.source at the data files")


def did_you_mean(name: str, columns: Sequence[str]) -> str:
    """ "; did you mean 'Score'?" when a column is a close match of ``name`` (case first, then spelling), else ""."""
    columns = [str(c) for c in columns]
    same_case = [c for c in columns if c.strip().lower() == name.strip().lower()]
    close = same_case or difflib.get_close_matches(name.lower(), [c.lower() for c in columns], n=1, cutoff=0.75)
    if not close:
        return ""
    match = close[0] if same_case else next(c for c in columns if c.lower() == close[0])
    return f"; did you mean {match!r}?"


# ----------------------------------------------------------------------------------------- reading


def read_file(path: Path, config: StudyConfig) -> FilePart:
    """Read one CSV or Parquet file; a file that is neither, or cannot be parsed, is a :class:`DataError`."""
    shown = _display_path(path, config.base_dir)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise SourceUnavailable(
            f"{shown}: cannot be read ({exc.strerror or exc}); check that the file exists and is readable"
        ) from None
    if path.suffix.lower() == ".parquet" or content.startswith(_PARQUET_MAGIC):
        frame = _parse_parquet(content, shown)
        decimal_comma = False
        lines = np.arange(1, len(frame) + 1, dtype=np.int64)
    else:
        frame, lines, decimal_comma = _parse_csv(content, shown)
    for name in SOURCE_COLUMNS:
        if name in frame.columns:
            raise DataError(
                f"{shown}: has a column named {name!r}, which the pipeline uses to record where each row "
                "came from; rename that column"
            )
    raw = frame.assign(source_file=shown, source_line=lines).reset_index(drop=True)
    source = SourceFile(path=shown, sha256=hashlib.sha256(content).hexdigest(), rows=len(raw))
    return FilePart(raw=raw, source=source, decimal_comma=decimal_comma)


def _display_path(path: Path, base_dir: Path) -> str:
    """The path relative to the config's folder when it lies inside it, else absolute."""
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path(base_dir).resolve()))
    except ValueError:
        return str(absolute)


def _parse_parquet(content: bytes, shown: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        frame = pq.read_table(pa.BufferReader(content)).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(
            f"{shown}: cannot be read as Parquet ({_one_line(str(exc))}); check that the file is complete, "
            "or export it again as Parquet or CSV"
        ) from None
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.name is not None:
        # An index written by pandas may be a real column (e.g. the subject id): keep it as one.
        frame = frame.reset_index(drop=all(name is None for name in frame.index.names))
    frame.columns = [str(column) for column in frame.columns]
    return frame


def _parse_csv(content: bytes, shown: str) -> tuple[pd.DataFrame, np.ndarray, bool]:
    """Parse CSV bytes as text; return the rows, their physical line numbers and whether decimals use commas."""
    text = _decode(content, shown)
    if not text.strip():
        return pd.DataFrame(), np.empty(0, dtype=np.int64), False
    first_line = text.lstrip("\r\n")[:65536].splitlines()[0]  # not the whole file: splitlines copies every line
    sep = _delimiter(first_line)
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False,
        )
    except (pd.errors.ParserError, ValueError) as exc:
        hint = _decimal_comma_hint(text, str(exc)) if sep == "," else ""
        raise DataError(
            f"{shown}: cannot be parsed as CSV ({_one_line(str(exc))}); check the delimiter and the quoting "
            f"on that line{hint}"
        ) from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame(), np.empty(0, dtype=np.int64), False
    header = [name.strip() for name in next(csv.reader(io.StringIO(text.lstrip("\r\n")[:65536 * 16]), delimiter=sep))]
    twice = sorted({name for name in header if header.count(name) > 1 and name})
    if twice:
        raise DataError(
            f"{shown}: the header names column {twice[0]!r} twice; rename one of them so every column has its own name"
        )
    frame.columns = [str(column).strip() for column in frame.columns]
    lines = _physical_lines(frame, text)
    blank = _all_blank(frame)
    if blank.any():
        frame, lines = frame.loc[~blank], lines[~blank]
    return frame.reset_index(drop=True), lines, sep == ";"


def decimal_comma_hint_for(value: str) -> str:
    """The fix for a number written with a decimal comma ("10,3") in a file whose delimiter is not ';'."""
    return (
        f"values like {value!r} look like decimal commas in a comma-separated file; export with a decimal "
        "point, or use ';' as the delimiter"
    )


def _decimal_comma_hint(text: str, error: str) -> str:
    """"; values like '10,3' look like decimal commas ..." when the line pandas could not parse is too long
    because its decimal commas split numbers in two, else "".

    Evidence, not a guess from any "1,2" in the line: some merges of adjacent integer fields ("10" "3" ->
    "10,3") must give the line exactly the header's fields, with a number in every column whose values
    are all numbers on the well-formed lines before it.
    """
    found = re.search(r"fields in line (\d+), saw (\d+)", error)
    if not found:
        return ""
    lines = text.splitlines()
    number = int(found.group(1)) - 1
    start = next((i for i, line in enumerate(lines) if line.strip()), len(lines))  # the header line
    if not start < number < len(lines):
        return ""
    header = next(csv.reader([lines[start]]))
    fields = next(csv.reader([lines[number]]))
    extra = len(fields) - len(header)
    if not 0 < extra <= 4:
        return ""
    well_formed = [row for row in csv.reader(lines[start + 1:number][:200]) if len(row) == len(header)]
    numeric = [
        all(re.fullmatch(_NUMBER, v.strip()) or v.strip() in MISSING_TOKENS for v in column)
        for column in zip(*well_formed)
    ] if well_formed else [False] * len(header)
    joinable = [i for i in range(len(fields) - 1)
                if re.fullmatch(r"[+-]?\d+", fields[i].strip()) and re.fullmatch(r"\d+", fields[i + 1].strip())]
    decimals = [any("." in v for v in column) for column in zip(*well_formed)] if well_formed else [False] * len(header)
    fitting: list[tuple[int, tuple[int, ...]]] = []
    for chosen in itertools.combinations(joinable, extra):
        if any(b - a < 2 for a, b in itertools.pairwise(chosen)):
            continue
        merged: list[str] = []
        columns: list[int] = []
        skip: set[int] = set()
        for i, value in enumerate(fields):
            if i in skip:
                continue
            if i in chosen:
                columns.append(len(merged))
                merged.append(f"{value.strip()}.{fields[i + 1].strip()}")
                skip.add(i + 1)
            else:
                merged.append(value.strip())
        if all(not wanted or re.fullmatch(_NUMBER, v) or v in MISSING_TOKENS for v, wanted in zip(merged, numeric)):
            # Prefer merges into columns that hold decimals elsewhere, then the rightmost (ids come first).
            fitting.append((sum(decimals[c] for c in columns), chosen))
    if not fitting:
        return ""
    first = max(fitting)[1][0]
    return "; " + decimal_comma_hint_for(f"{fields[first].strip()},{fields[first + 1].strip()}")


def _delimiter(header_line: str) -> str:
    """Comma, or semicolon or tab when the header line uses that and no comma."""
    if ";" in header_line and "," not in header_line:
        return ";"
    if "\t" in header_line and "," not in header_line and ";" not in header_line:
        return "\t"
    return ","


def read_header(config: StudyConfig) -> list[str]:
    """The column names of the files ``data.source`` names, in order of first appearance, read cheaply.

    CSV: the header line only (the first 64 KiB); Parquet: the schema. For checks worth making before
    the whole data are read (the command line's, before Prefect starts). A file that cannot be read this
    way is a :class:`DataError`; reading the data reports it properly.
    """
    import pyarrow.parquet as pq

    columns: dict[str, None] = {}
    for path in find_source_files(config):
        shown = _display_path(path, config.base_dir)
        try:
            with path.open("rb") as handle:
                head = handle.read(65536)
            if path.suffix.lower() == ".parquet" or head.startswith(_PARQUET_MAGIC):
                names = [n for n in pq.read_schema(path).names if not n.startswith("__index_level_")]
            else:
                text = _decode(head, shown) if len(head) < 65536 else head.decode("utf-8-sig", errors="ignore")
                first = text.lstrip("\r\n").splitlines()[:1]
                names = [n.strip() for n in next(csv.reader(first, delimiter=_delimiter(first[0])))] if first else []
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise DataError(f"{shown}: cannot read its header ({exc})") from None
        columns.update(dict.fromkeys(n for n in names if n))
    return list(columns)


def _decode(content: bytes, shown: str) -> str:
    if content.startswith(_ZIP_MAGIC):
        raise DataError(
            f"{shown}: looks like an Excel workbook or a ZIP archive, not CSV or Parquet; "
            "export the sheet as CSV (UTF-8) or Parquet"
        )
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{shown}: is UTF-16 text; save it as UTF-8 CSV and run again")
    if b"\x00" in content[:65536]:
        raise DataError(
            f"{shown}: looks like a binary file, not CSV or Parquet; export the data as .csv (UTF-8) or .parquet"
        )
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{shown}: is not UTF-8 text (byte 0x{content[exc.start]:02x} on line {line}; perhaps Latin-1 or "
            "Windows-1252); save it as UTF-8 CSV (spreadsheet: Save As 'CSV UTF-8'; shell: "
            f"iconv -f WINDOWS-1252 -t UTF-8 {Path(shown).name} > utf8.csv), or export it as Parquet"
        ) from None


def _physical_lines(frame: pd.DataFrame, text: str) -> np.ndarray:
    """1-based physical line of each parsed row: header = line 1, plus the newlines quoted inside earlier cells."""
    header_lines = 1 + sum(str(column).count("\n") for column in frame.columns)
    leading_blank = text[: len(text) - len(text.lstrip("\r\n"))].count("\n")
    lines = np.arange(len(frame), dtype=np.int64) + 1 + leading_blank + header_lines
    if len(frame) and '"' in text:
        embedded = np.zeros(len(frame), dtype=np.int64)
        for column in frame.columns:
            embedded += frame[column].str.count("\n").fillna(0).to_numpy(dtype=np.int64)
        if embedded.any():
            lines = lines + np.concatenate(([0], np.cumsum(embedded)[:-1]))
    return lines


def _all_blank(frame: pd.DataFrame) -> np.ndarray:
    if frame.empty:
        return np.zeros(len(frame), dtype=bool)
    blank = np.ones(len(frame), dtype=bool)
    for column in frame.columns:
        if _is_arrow_text(frame[column]):
            empty = pc.equal(pc.binary_length(_trimmed(frame[column])), 0)
            blank &= np.asarray(pc.fill_null(empty, False).to_numpy(zero_copy_only=False), dtype=bool)
        else:
            blank &= (frame[column].str.strip() == "").to_numpy(dtype=bool)
    return blank


def _union(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Rows of every frame in order; a column a file lacks is missing in that file's rows."""
    columns = list(dict.fromkeys(c for frame in frames for c in frame.columns if c not in SOURCE_COLUMNS))
    columns += list(SOURCE_COLUMNS)
    non_empty = [frame for frame in frames if len(frame)]
    if not non_empty:
        union = pd.DataFrame({column: pd.Series([], dtype=object) for column in columns})
        return union.astype({"source_line": np.int64})
    union = pd.concat(non_empty, ignore_index=True, sort=False)
    return union.reindex(columns=columns)


# ------------------------------------------------------------------------------------------ typing


def coerce_types(parts: Sequence[FilePart], raw: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
    """The typed table: same index as ``raw``, data columns coerced by role, plus the source columns.

    Subject and ``data.categorical`` columns become text (whitespace stripped; integral numbers written
    without a decimal part, so a CSV "7" and a Parquet 7 or 7.0 are the same subject). Time and outcome
    become float64, NaN where missing or not a number; a time column of dates is left to :func:`read_time`
    (NaN here). Dates written otherwise than ISO 8601 (15/01/2024) are refused, as day and month are
    ambiguous. Every other column is float64 when all its non-missing values (over all files) are
    numbers, else text. Missing tokens (:data:`MISSING_TOKENS`) are NaN everywhere; infinite values
    count as not a number.
    """
    data_columns = [c for c in raw.columns if c not in SOURCE_COLUMNS]
    text_roles = {*config.data.subject_columns, *config.data.categorical}
    number_roles = {config.data.time, config.data.outcome}
    typed: dict[str, pd.Series] = {}
    for column in data_columns:
        if column in text_roles:
            typed[column] = _stack(parts, column, _text_of)
            continue
        if column == config.data.time:
            if parse_iso_dates(raw[column]) is not None:
                typed[column] = pd.Series(np.nan, index=raw.index, dtype=np.float64)
                continue
            _refuse_other_dates(raw, column)
        numbers = _stack(parts, column, _numbers_of)
        if column in number_roles:
            typed[column] = numbers
            continue
        present = _stack(parts, column, _presence_of)
        if bool((numbers.notna() == present).all()):
            typed[column] = numbers
        else:
            typed[column] = _stack(parts, column, _text_of)
    out = pd.DataFrame(typed, index=raw.index)
    return out.assign(source_file=raw["source_file"], source_line=raw["source_line"])


def read_time(raw: pd.DataFrame, typed: pd.DataFrame, config: StudyConfig) -> tuple[pd.DataFrame, TimeFromDates | None]:
    """``typed`` with a time column of dates turned into (date - origin) in ``data.time_unit``, and what was done.

    The origin is ``data.time_origin``: "subject" (the default: each subject's earliest date, over the rows
    whose subject and date can be read, whichever check later quarantines them; rows without a subject
    get no time), "study" (the earliest date of the data) or a given ISO date. The result is float64:
    weeks are days / 7 exactly, months days / 30.4375, years days / 365.25; a time of day keeps its
    fraction of a day. Refuses (:class:`ConfigError`) dates without ``data.time_unit`` and
    ``data.time_unit`` or ``data.time_origin`` on a time column that does not hold dates.
    """
    data = config.data
    if data.time not in raw.columns:
        return typed, None  # validation reports the missing column
    stamps = parse_iso_dates(raw[data.time])
    if stamps is None:
        _refuse_date_keys(raw, config)
        return typed, None
    if data.time_unit is None:
        first = int(np.flatnonzero(stamps.notna().to_numpy())[0])
        raise ConfigError(
            f"time {data.time!r} holds dates (e.g. {str(raw[data.time].iloc[first]).strip()!r}, "
            f"{raw['source_file'].iloc[first]} line {raw['source_line'].iloc[first]}); add data.time_unit "
            f"({' | '.join(TIME_UNIT_DAYS)}) to say in which unit to analyse the time since the origin"
        )
    origin = data.time_origin or "subject"
    origin_date: pd.Timestamp | None = None
    if origin == "subject":
        subjects = [typed[c] for c in data.subject_columns if c in typed.columns]
        if len(subjects) < len(data.subject_columns):
            start = pd.Series(pd.NaT, index=stamps.index, dtype=stamps.dtype)
        else:
            start = stamps.groupby(subjects, dropna=True, sort=False).transform("min")
            start = start.reindex(stamps.index)  # rows without a subject: no origin, so no time
    else:
        origin_date = stamps.min() if origin == "study" else _as_utc(pd.Timestamp(origin))
        start = pd.Series(origin_date, index=stamps.index)
    days = (stamps - start) / pd.Timedelta(days=1)
    elapsed = days.to_numpy(dtype=np.float64) / TIME_UNIT_DAYS[data.time_unit]
    dates = TimeFromDates(
        column=data.time, unit=data.time_unit, origin=origin,
        origin_date=None if origin_date is None else format_date(origin_date),
        dates_read=int(stamps.notna().sum()),
    )
    return typed.assign(**{data.time: pd.Series(elapsed, index=typed.index)}), dates


def parse_iso_dates(values: pd.Series) -> pd.Series | None:
    """A time column's dates as instants (datetime64, naive UTC; NaT where a value is not one), or None.

    The column holds dates when it is a date or timestamp column (Parquet; a time zone is converted to
    UTC) or when more than half of its non-missing values are ISO 8601 dates ("2024-01-15",
    "2024-01-15 08:30", "2024-01-15T08:30:00+02:00"; an offset converts to UTC) and they outnumber the
    plain numbers. Values that are not such dates (or impossible ones, 2024-02-30) are NaT, so that
    validation quarantines their rows.
    """
    if values.dtype.kind == "M":
        stamps = pd.Series(pd.to_datetime(values))
        if getattr(stamps.dt, "tz", None) is not None:
            stamps = stamps.dt.tz_convert(None)
    else:
        trimmed = _trimmed(values)
        is_date = np.asarray(pc.fill_null(pc.match_substring_regex(trimmed, pattern=_ISO_DATE), False), dtype=bool)
        n_dates = int(is_date.sum())
        if n_dates == 0:
            return None
        present = int((~_missing_in(trimmed)).sum())
        n_numbers = int(parse_numbers(values).notna().sum())
        if n_dates <= n_numbers or n_dates * 2 <= present:
            return None
        text = pd.Series(np.asarray(trimmed.to_numpy(zero_copy_only=False), dtype=object), index=values.index)
        stamps = pd.to_datetime(text.where(is_date), errors="coerce", format="ISO8601", utc=True).dt.tz_convert(None)
    if stamps.notna().sum() == 0:
        return None
    return pd.Series(stamps.to_numpy(dtype="datetime64[ns]"), index=values.index)


def format_date(stamp: pd.Timestamp) -> str:
    """2024-01-15, or 2024-01-15 08:30:00 when there is a time of day."""
    return stamp.strftime("%Y-%m-%d") if stamp == stamp.normalize() else stamp.isoformat(sep=" ")


def _as_utc(stamp: pd.Timestamp) -> pd.Timestamp:
    return stamp.tz_convert(None) if stamp.tz is not None else stamp


def _refuse_date_keys(raw: pd.DataFrame, config: StudyConfig) -> None:
    """``data.time_unit`` / ``data.time_origin`` on a time column that does not hold dates: a config error."""
    data = config.data
    keys = [f"data.{key} ({getattr(data, key)})" for key in ("time_unit", "time_origin") if getattr(data, key) is not None]
    if not keys:
        return
    present = np.flatnonzero(~is_missing(raw[data.time]))
    if not len(present):
        return  # no time at all: validation quarantines every row as "time missing"
    example = f" (e.g. {str(raw[data.time].iloc[int(present[0])]).strip()!r})"
    raise ConfigError(
        f"{' and '.join(keys)} {'is' if len(keys) == 1 else 'are'} set, but time {data.time!r} does not hold "
        f"dates{example}; a numeric time is analysed as it is: remove {' and '.join(k.split()[0] for k in keys)}, "
        "or give the time as ISO dates (2024-01-15)"
    )


def _refuse_other_dates(raw: pd.DataFrame, column: str) -> None:
    """Fail on a time column of dates not written as ISO 8601: 03/04/2024 is March or April."""
    values = raw[column]
    if values.dtype.kind in "biufM":
        return
    trimmed = _trimmed(values)
    is_other = np.asarray(pc.fill_null(pc.match_substring_regex(trimmed, pattern=_OTHER_DATE), False), dtype=bool)
    present = int((~_missing_in(trimmed)).sum())
    if not is_other.any() or is_other.sum() * 2 <= present:
        return
    first = int(np.flatnonzero(is_other)[0])
    raise DataError(
        f"column {column!r} (data.time) holds dates written like {str(values.iloc[first]).strip()!r} "
        f"({raw['source_file'].iloc[first]} line {raw['source_line'].iloc[first]}), where day and month are "
        "ambiguous; write them as ISO dates (2024-01-15) and set data.time_unit, "
        "or give the time as a number (weeks since baseline, say)"
    )


def _text_of(values: pd.Series, part: FilePart) -> pd.Series:
    """``to_text``, kept in Arrow (pandas' ``str`` dtype) when the column was read as Arrow text.

    The typed table stores text as ``str`` either way (pandas infers it from the objects); building it from
    Arrow directly skips a round trip through one Python object per cell.
    """
    if _is_arrow_text(values):
        canonical = _canonical_text(values)
        if canonical.null_count < len(canonical):
            return pd.Series(canonical, index=values.index, dtype=_STR)
    return to_text(values)


def _numbers_of(values: pd.Series, part: FilePart) -> pd.Series:
    return parse_numbers(values, decimal_comma=part.decimal_comma)


def _presence_of(values: pd.Series, part: FilePart) -> pd.Series:
    return pd.Series(~is_missing(values), index=values.index)


def _stack(
    parts: Sequence[FilePart], column: str, convert: Callable[[pd.Series, FilePart], pd.Series],
) -> pd.Series:
    """Convert ``column`` file by file (within one file a column has one dtype) and stack the results.

    Rows of a file that lacks the column get the converter's view of an all-missing column.
    """
    pieces: list[pd.Series] = []
    for part in parts:
        if not len(part.raw):
            continue
        values = part.raw[column] if column in part.raw.columns else pd.Series(np.nan, index=part.raw.index)
        pieces.append(convert(values, part))
    if not pieces:
        return convert(pd.Series([], dtype=np.float64), parts[0]) if parts else pd.Series([], dtype=object)
    if all(piece.dtype == _STR for piece in pieces):  # Arrow text stays Arrow (no object round trip)
        return pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0].reset_index(drop=True)
    return pd.Series(np.concatenate([piece.to_numpy() for piece in pieces]))


def is_missing(values: pd.Series) -> np.ndarray:
    """True where a value is missing: NaN/None, or text that strips to one of :data:`MISSING_TOKENS`."""
    if values.dtype.kind in "biufcmM":
        return np.asarray(values.isna(), dtype=bool)
    return _missing_in(_trimmed(values))


def to_text(values: pd.Series) -> pd.Series:
    """Values as canonical text (object dtype), NaN where missing.

    Whitespace is stripped and integral numbers lose their decimal part ("7.0" and 7.0 become "7"),
    so identifiers agree across CSV and Parquet files. Leading zeros are kept ("007" stays "007").
    """
    kind = values.dtype.kind
    if kind in "iuf":
        out = pd.Series(np.nan, index=values.index, dtype=object)
        present = values.notna().to_numpy(dtype=bool)
        kept = values[present]
        if kind == "f":
            floats = kept.to_numpy(dtype=np.float64)
            integral = np.isfinite(floats) & (np.floor(floats) == floats) & (np.abs(floats) < 2.0**53)
            text = kept.astype(str).to_numpy(dtype=object)
            text[integral] = kept[integral].astype(np.int64).astype(str).to_numpy(dtype=object)
        else:
            text = kept.astype(str).to_numpy(dtype=object)
        out[present] = text
        return out
    text = np.asarray(_canonical_text(values).to_numpy(zero_copy_only=False), dtype=object)
    text[pd.isna(text)] = np.nan
    return pd.Series(text, index=values.index, dtype=object)


def _canonical_text(values: pd.Series) -> pa.Array:
    """``to_text`` of a text column as an Arrow array: stripped, integral numbers without decimals, null where missing."""
    trimmed = _trimmed(values)
    canonical = pc.replace_substring_regex(trimmed, pattern=_INTEGRAL_TEXT, replacement=r"\1")
    return pc.if_else(pa.array(_missing_in(trimmed)), pa.scalar(None, type=canonical.type), canonical)


def parse_numbers(values: pd.Series, *, decimal_comma: bool = False) -> pd.Series:
    """Values as float64: NaN where missing, not a number, or infinite.

    Text is stripped first and must look like a decimal number ("12", "-1.5", "2e3"); with
    ``decimal_comma`` a value like "12,5" reads as 12.5 (files delimited by semicolons use the decimal
    comma). Booleans read as 0/1.
    """
    if values.dtype.kind in "biuf":
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        trimmed = _trimmed(values)
        if decimal_comma:
            trimmed = pc.replace_substring_regex(trimmed, pattern=_DECIMAL_COMMA, replacement=r"\1.\2")
        valid = pc.fill_null(pc.match_substring_regex(trimmed, pattern=_NUMBER), False)
        kept = pc.if_else(valid, trimmed, pa.scalar(None, type=trimmed.type))
        numbers = np.asarray(pc.cast(kept, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    numbers = np.where(np.isfinite(numbers), numbers, np.nan)
    return pd.Series(numbers, index=values.index, dtype=np.float64)


def _trimmed(values: pd.Series) -> pa.Array:
    """Values as an Arrow string array with surrounding whitespace removed (null where NaN/None).

    A column pandas already holds as Arrow text (what ``read_csv`` gives) is used as it is, without a
    Python object per cell (10-20× faster on a few million rows).
    """
    if _is_arrow_text(values):
        arrow = pa.array(values.array)
        return pc.utf8_trim_whitespace(arrow.combine_chunks() if isinstance(arrow, pa.ChunkedArray) else arrow)
    present = values.notna().to_numpy(dtype=bool)
    text = np.where(present, values.astype(str).to_numpy(dtype=object), None)
    return pc.utf8_trim_whitespace(pa.array(text, type=pa.string()))


def _is_arrow_text(values: pd.Series) -> bool:
    return isinstance(values.dtype, pd.StringDtype) and values.dtype.storage == "pyarrow"


def _missing_in(trimmed: pa.Array) -> np.ndarray:
    missing = pc.or_(pc.is_null(trimmed), pc.is_in(trimmed, value_set=_MISSING_SET.cast(trimmed.type)))
    return np.asarray(pc.fill_null(missing, True).to_numpy(zero_copy_only=False), dtype=bool)


def _one_line(text: str) -> str:
    return " ".join(text.split())


__all__ = [
    "MISSING_TOKENS", "SOURCE_COLUMNS", "FilePart", "read_sources", "read_file", "assemble", "find_source_files", "coerce_types",
    "read_time", "read_header", "is_missing", "to_text", "parse_numbers", "parse_iso_dates", "format_date", "did_you_mean", "describe_no_rows",
]
