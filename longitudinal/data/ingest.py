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

Each file is checked before it is read (a regular file, not over ``validation.max_file_bytes``; a
symbolic link is read only with ``data.follow_symlinks``), read once, and hashed and parsed from the same
bytes. File names are kept as the OS gives them for reading and shown with U+FFFD where they are not UTF-8.
"""

from __future__ import annotations

import csv
import difflib
import errno
import fnmatch
import hashlib
import io
import itertools
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from longitudinal.config import TIME_UNIT_DAYS, StudyConfig
from longitudinal.errors import ConfigError, DataError, SourceUnavailable
from longitudinal.records import SOURCE_COLUMNS, ExpectationOutcome, Ingested, SourceFile, TimeFromDates

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
    listing = list_sources(config)
    return assemble([read_file(path, config) for path in listing.files], config, findings=(listing.finding(),))


def assemble(
    parts: Sequence[FilePart], config: StudyConfig, *, findings: Sequence[ExpectationOutcome] = (),
) -> Ingested:
    """The files read (in this order) as one table, raw and typed: what :func:`read_sources` returns.

    Refuses (:class:`DataError`) when no file holds a data row and when one file lacks a role column
    the others have. ``findings`` (what ingestion noticed, e.g. links skipped) travel with the data to
    validation.
    """
    if not any(len(part.raw) for part in parts):
        has_header = any(c not in SOURCE_COLUMNS for part in parts for c in part.raw.columns)
        raise DataError(f"no rows to analyse: {describe_no_rows([part.source for part in parts], has_header)}")
    _check_columns_agree(parts, config)
    raw = _union([part.raw for part in parts])
    typed, dates = read_time(raw, coerce_types(parts, raw, config), config)
    return Ingested(raw=raw, typed=typed, files=tuple(part.source for part in parts), dates=dates,
                    findings=tuple(findings))


def find_source_files(config: StudyConfig) -> list[Path]:
    """The data files that ``data.source`` names: a file, a folder's CSV/Parquet files, or a glob's matches."""
    return list(list_sources(config).files)


@dataclass(frozen=True)
class SourceListing:
    """The files a run reads, and the entries it passed over, one sentence each (a warning finding)."""

    files: tuple[Path, ...]
    skipped: tuple[str, ...] = ()

    def finding(self) -> ExpectationOutcome:
        """The warning-level check saying which matches were not read and why."""
        return ExpectationOutcome(
            name="source_files_are_regular", level="warning", column=None, success=not self.skipped,
            unexpected_count=0,
            description="every match of data.source is a regular file (links only with data.follow_symlinks)",
            details="; ".join(self.skipped),
        )


def list_sources(config: StudyConfig) -> SourceListing:
    """The regular files ``data.source`` names, checked before anything is read.

    ``data.source`` itself is used as given, link or not (the user named it). Inside a folder or among a
    glob's matches, a symbolic link is skipped with a warning unless ``data.follow_symlinks``; followed,
    each target is read once (a second link to it is skipped) and a glob never walks a directory twice,
    so link loops end. A FIFO, device or socket is never opened. A file larger than
    ``validation.max_file_bytes`` is refused here, by its size, before a byte is read.
    """
    path = config.source_path
    given = config.data.source
    seen: dict[tuple[int, int], str] = {}
    skipped: list[str] = []
    if path.is_dir():
        names = sorted(os.listdir(path))  # str names: bytes that are not UTF-8 come as surrogate escapes
        candidates = [path / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in DATA_SUFFIXES]
        files = [c for c in candidates if _admit(c, config, seen, skipped)]
        if not files:
            raise DataError(
                f"data.source {given!r}: the folder {printable(str(path))} holds no .csv or .parquet files"
                f"{_skipped_note(skipped)}; "
                "put the data files there or point data.source at a file"
            )
        return SourceListing(tuple(files), tuple(skipped))
    if os.path.lexists(path):
        if not _admit(path, config, seen, skipped, named=True):
            raise DataError(f"data.source {given!r}: {skipped[0]}")
        return SourceListing((path,))
    if _GLOB_CHARS.search(str(path)):
        matches = [m for m in _walk_glob(path, config.data.follow_symlinks) if _admit(m, config, seen, skipped)]
        if not matches:
            raise DataError(
                f"data.source {given!r}: the pattern {printable(str(path))} matches no files{_skipped_note(skipped)}; "
                "check the pattern or point data.source at a file or a folder"
            )
        return SourceListing(tuple(matches), tuple(skipped))
    raise DataError(
        f"data.source {given!r}: {printable(str(path))} does not exist; set data.source to a .csv or .parquet file, "
        "a folder of them, or a glob such as 'incoming/*.csv'"
    )


def _admit(path: Path, config: StudyConfig, seen: dict[tuple[int, int], str], skipped: list[str],
           *, named: bool = False) -> bool:
    """Whether to read ``path``; if not, why goes to ``skipped``. Refuses a file over the size limit."""
    shown = shown_path(path, config.base_dir)
    follow = named or config.data.follow_symlinks
    try:
        link = path.is_symlink()
        if link and not follow:
            skipped.append(
                f"{shown} is a symbolic link (to {printable(os.readlink(path))}), not read; copy the file into "
                "place, or set data.follow_symlinks: true"
            )
            return False
        status = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            skipped.append(f"{shown} is a symbolic link that loops, not read")
            return False
        if exc.errno == errno.ENOENT:
            skipped.append(f"{shown} is a broken symbolic link (its target does not exist), not read")
            return False
        raise SourceUnavailable(
            f"{shown}: cannot be read ({exc.strerror or exc}); check that the file exists and is readable"
        ) from None
    if not stat.S_ISREG(status.st_mode):
        skipped.append(f"{shown} is {_kind(status.st_mode)}, not a data file; not read")
        return False
    key = (status.st_dev, status.st_ino)
    if key in seen:
        skipped.append(f"{shown} is the same file as {seen[key]} (a link), read once")
        return False
    seen[key] = shown
    _check_size(shown, status.st_size, config)
    return True


def _skipped_note(skipped: list[str]) -> str:
    """`` (2 skipped: a; b)`` for an error saying no file was found, or "" when nothing was skipped."""
    return f" ({len(skipped)} skipped: {'; '.join(skipped)})" if skipped else ""


def _walk_glob(pattern: Path, follow: bool) -> list[Path]:
    """The matches of a glob pattern (``**`` for any depth), walking the tree once.

    ``glob.glob(recursive=True)`` follows directory links without remembering where it has been: a
    link loop makes it run for ever, or read the same file many times. Here each directory is entered
    at most once (by device and inode), links only when ``follow``; hidden names match only a pattern
    that starts with a dot, as in glob.
    """
    parts = pattern.parts
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    base, rest = Path(*parts[:first]), parts[first:]
    if not base.is_dir():
        return []
    recursive = "**" in rest
    visited = {_identity(base)}
    matches: list[Path] = []
    for root, dirs, files in os.walk(base, followlinks=follow):
        depth = len(Path(root).relative_to(base).parts)
        for name in [*files, *(d for d in dirs if Path(d).suffix.lower() in DATA_SUFFIXES)]:
            relative = (*Path(root).relative_to(base).parts, name)
            if _matches(rest, relative):
                matches.append(Path(root) / name)
        kept = []
        for name in dirs:
            if not recursive and depth + 1 >= len(rest):
                break
            identity = _identity(Path(root) / name) if follow else None
            if identity is not None and identity in visited:
                continue  # a loop, or a second way into a folder already walked
            if identity is not None:
                visited.add(identity)
            kept.append(name)
        dirs[:] = kept
    return sorted(dict.fromkeys(matches))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def _matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        if _matches(pattern[1:], parts):
            return True
        return bool(parts) and not parts[0].startswith(".") and _matches(pattern, parts[1:])
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _matches(pattern[1:], parts[1:])


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_size(shown: str, size: int, config: StudyConfig) -> None:
    limit = config.validation.max_file_bytes
    if size > limit:
        raise DataError(
            f"{shown}: is {size:,} bytes, more than validation.max_file_bytes ({limit:,}); split the export "
            "into smaller files, or raise validation.max_file_bytes in the study config"
        )


def printable(text: str) -> str:
    """``text`` with bytes that are not UTF-8 (file names arrive with them as surrogate escapes) shown as U+FFFD.

    What a message, a registry or a data file records; the path itself keeps its bytes for reading.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def shown_path(path: Path, base_dir: Path) -> str:
    """How a data file is named in messages and records: relative to the config's folder when inside it,
    else absolute; the file's own name as given (a link is named, not its target); printable."""
    absolute = Path(os.path.abspath(path))
    absolute = absolute.parent.resolve() / absolute.name
    try:
        shown = str(absolute.relative_to(Path(base_dir).resolve()))
    except ValueError:
        shown = str(absolute)
    return printable(shown)


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


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One file's bytes as read in one go, with their hash: what is parsed is exactly what is hashed."""

    path: Path
    shown: str
    content: bytes
    size: int
    mtime_ns: int
    sha256: str


#: How often a file that changes while it is read is read again before the run gives up on it.
STABLE_READ_ATTEMPTS = 3


def read_snapshot(path: Path, config: StudyConfig) -> Snapshot:
    """Read a data file once, checking its type and size first, and return its bytes and their sha256.

    The file is opened without following a link (unless ``data.follow_symlinks`` or it is ``data.source``
    itself) and without blocking, so a FIFO or device is refused, never read. Its size and modification
    time are compared before and after the read: a file that changed meanwhile (still being written) is
    read again, and after :data:`STABLE_READ_ATTEMPTS` attempts it is :class:`SourceUnavailable` (the
    run fails without registering it, and a retry or the next run reads it complete).
    """
    shown = shown_path(path, config.base_dir)
    follow = config.data.follow_symlinks or path == config.source_path
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    sizes: list[int] = []
    for _ in range(STABLE_READ_ATTEMPTS):
        try:
            descriptor = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP and not follow:
                raise DataError(
                    f"{shown}: is a symbolic link, which is not followed; copy the file into place, or set "
                    "data.follow_symlinks: true"
                ) from None
            raise SourceUnavailable(
                f"{shown}: cannot be read ({exc.strerror or exc}); check that the file exists and is readable"
            ) from None
        with os.fdopen(descriptor, "rb") as handle:
            before = os.fstat(descriptor)
            if not stat.S_ISREG(before.st_mode):
                raise DataError(f"{shown}: is {_kind(before.st_mode)}, not a data file; it is not read")
            _check_size(shown, before.st_size, config)
            # At most one byte more than the file holds now (or than the limit): a growing file shows, and a
            # read is never asked for max_file_bytes (Python allocates what it is asked for, then shrinks).
            content = _read_all(handle, min(before.st_size, config.validation.max_file_bytes))
            after = os.fstat(descriptor)
        _check_size(shown, len(content), config)
        if len(content) == after.st_size and (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            return Snapshot(
                path=path, shown=shown, content=content, size=len(content), mtime_ns=after.st_mtime_ns,
                sha256=hashlib.sha256(content).hexdigest(),
            )
        sizes += [before.st_size, after.st_size]
        time.sleep(0.1)
    raise SourceUnavailable(
        f"{shown}: changed while being read (from {sizes[0]:,} to {sizes[-1]:,} bytes over {STABLE_READ_ATTEMPTS} "
        "reads); it is still being "
        "written: it is read again on the next run (land files complete: write them under a hidden name, "
        "then rename)"
    )


def _read_all(handle: BinaryIO, limit: int) -> bytes:
    """Read the rest of an open file, at most ``limit + 1`` bytes (so a file growing past the limit shows)."""
    return handle.read(limit + 1)


def read_file(file: Path | Snapshot, config: StudyConfig) -> FilePart:
    """Parse one CSV or Parquet file (a path is read first, with :func:`read_snapshot`); a file that is
    neither, or cannot be parsed, is a :class:`DataError`. The part's hash is that of the bytes parsed."""
    snapshot = file if isinstance(file, Snapshot) else read_snapshot(file, config)
    shown, content = snapshot.shown, snapshot.content
    if snapshot.path.suffix.lower() == ".parquet" or content.startswith(_PARQUET_MAGIC):
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
    source = SourceFile(path=shown, sha256=snapshot.sha256, rows=len(raw))
    return FilePart(raw=raw, source=source, decimal_comma=decimal_comma)


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
        # From the bytes (decoded above, so known to be UTF-8): a StringIO of the text would hold it as four
        # bytes a character, and the parser encodes it back to UTF-8 anyway.
        frame = pd.read_csv(
            io.BytesIO(content), encoding="utf-8-sig", sep=sep, dtype=str, keep_default_na=False,
            skip_blank_lines=False,
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
        shown = shown_path(path, config.base_dir)
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
        if values.dtype == _STR and canonical.null_count == 0 and canonical.equals(_arrow_of(values)):
            return values  # already canonical (the usual case): typed shares raw's text instead of a copy
        if canonical.null_count < len(canonical):
            return pd.Series(canonical, index=values.index, dtype=_STR)
    return to_text(values)


def _arrow_of(values: pd.Series) -> pa.Array:
    arrow = pa.array(values.array)
    return arrow.combine_chunks() if isinstance(arrow, pa.ChunkedArray) else arrow


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
    "MISSING_TOKENS", "SOURCE_COLUMNS", "FilePart", "Snapshot", "SourceListing", "read_sources", "read_file",
    "read_snapshot", "list_sources", "shown_path", "printable", "assemble", "find_source_files", "coerce_types",
    "read_time", "read_header", "is_missing", "to_text", "parse_numbers", "parse_iso_dates", "format_date", "did_you_mean", "describe_no_rows",
]
