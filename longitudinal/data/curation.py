"""The study's curated data: every file ingested, kept as Parquet, with a registry keyed by content.

``<output>/<study>/curated/`` holds one Parquet file per ingested file content (``parts/<sha256>.parquet``,
the rows exactly as read) and ``registry.json``. A run reads only the files whose content is new.

When ``data.source`` is a folder (a landing folder that sites drop exports into), data accumulate: a
run analyses everything received so far, including files since removed from the folder. The same
content under another name is recorded as a duplicate and not ingested again; a file rewritten with
new content is a new arrival (rows it repeats are then exact duplicates, which validation quarantines
as such). When ``data.source`` is a file or a glob, a run analyses exactly the files it names now; the
registry then only saves re-reading unchanged files.

Each file is read once (:func:`longitudinal.data.ingest.read_snapshot`): the hash the registry records is the
hash of the bytes parsed into the part, so a file appended to during a run is either analysed as one
consistent version or, still changing, left for the next run.

The store checks itself. Each part carries its registry entry (source name, size, modification time,
sha256, rows, how its numbers are written) in its Parquet metadata, so :func:`repair_curated` (the
``longitudinal repair`` command) can rebuild ``registry.json`` from the parts without losing a row. A run
refuses, with a one-line error naming the file and the repair command, a registry that is missing while
parts exist, is not JSON, or is not a registry ({}, [], an entry without its key), and a part that is
missing, unreadable, or whose metadata disagrees with its entry. Nothing is repaired silently: which
rows a study analyses changes only by a run or by a repair that says what it did.

Every write is atomic (written aside, flushed, then renamed), parts before the registry, all under an
exclusive lock, and the registry only once every part it names is on disk: a killed run or two runs at
once never leave a registry entry without its part. A registry change is made only by a run whose
ingestion succeeded (a file that ingestion refuses is never registered), and it records data received,
which later failures of the run (validation, fitting) do not un-receive. A killed run can leave a part
without an entry (harmless: the next run registers it when it reads that file again, or a repair does)
and a ``.*.tmp`` file, which the next run removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from longitudinal.config import StudyConfig
from longitudinal.data.durable import sync_path, writing
from longitudinal.data.ingest import FilePart, SourceListing, assemble, list_sources, read_file, read_snapshot
from longitudinal.errors import DataError
from longitudinal.records import Curated, Duplicate, SourceFile

REGISTRY_VERSION = 1
#: The Parquet metadata key under which each part keeps its registry entry.
PART_METADATA_KEY = b"longitudinal.entry"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DECIMAL_COMMA_CELL = re.compile(r"[+-]?\d*,\d+")


@dataclass(frozen=True)
class RegistryEntry:
    sha256: str
    path: str
    rows: int
    decimal_comma: bool
    ingested_at: str
    origin: str
    """The ``data.source`` (resolved) it was received through: a folder's data accumulate per folder."""
    size: int | None = None
    """Bytes read (None in entries written before parts carried it)."""
    mtime: str | None = None
    """The file's modification time when read, ISO 8601 UTC (None in older entries)."""


def curated_dir(config: StudyConfig) -> Path:
    """Where the study keeps its curated data: ``<output>/<study>/curated``."""
    return config.output_dir / "curated"


def is_new_file(config: StudyConfig, path: Path) -> bool:
    """Whether ``path``'s content has not been ingested by the study yet.

    A file a run would refuse or skip (a link, too large), or a damaged registry, counts as new: the run
    it starts then says what is wrong.
    """
    try:
        known = {entry["sha256"] for entry in _load(curated_dir(config), config)["files"]}
        return read_snapshot(path, config).sha256 not in known
    except DataError:
        return True


def check_registry(config: StudyConfig) -> None:
    """Refuse a damaged registry (the errors :func:`curate` gives), without reading any data: a cheap check."""
    folder = curated_dir(config)
    if folder.is_dir():
        _load(folder, config)


def curate(config: StudyConfig) -> Curated:
    """Ingest the new files of ``data.source`` into the study's curated data and return what to analyse.

    Each file is read once; its hash and its part come from the same bytes. New files are registered only
    once the data they join can be assembled (same role columns, readable values): a file that ingestion
    refuses is not ingested, so it cannot block later runs; fixed and saved again, it arrives anew.
    """
    folder = curated_dir(config)
    with writing(folder, "add the files to the study's curated data"):
        (folder / "parts").mkdir(parents=True, exist_ok=True)
    accumulate = config.source_path.is_dir()
    origin = str(config.source_path)
    with _locked(folder):
        _remove_leftovers(folder)
        registry = _load(folder, config)
        known = {entry["sha256"]: entry for entry in registry["files"]}
        now = _now()
        listing = _listing(config, has_history=bool(known))
        current: list[str] = []
        new_parts: dict[str, FilePart] = {}
        entries: list[dict[str, Any]] = []
        duplicates: list[Duplicate] = []
        for path in listing.files:
            snapshot = read_snapshot(path, config)
            content_hash, shown = snapshot.sha256, snapshot.shown
            if content_hash in known or content_hash in new_parts:
                first = known[content_hash]["path"] if content_hash in known else new_parts[content_hash].source.path
                seen = any(d["path"] == shown and d["sha256"] == content_hash for d in registry["duplicates"])
                if first != shown and not seen:
                    duplicates.append(Duplicate(path=shown, sha256=content_hash, same_as=first, seen_at=now))
            else:
                part = read_file(snapshot, config)
                new_parts[content_hash] = part
                entries.append(asdict(RegistryEntry(
                    sha256=content_hash, path=part.source.path, rows=part.source.rows,
                    decimal_comma=part.decimal_comma, ingested_at=now, origin=origin, size=snapshot.size,
                    mtime=_iso(snapshot.mtime_ns),
                )))
            del snapshot  # the bytes: a part holds what a run needs
            if content_hash not in current:
                current.append(content_hash)
        every = registry["files"] + entries
        if accumulate:
            analysed = [e for e in every if e["origin"] == origin or e["sha256"] in current]
        else:
            by_hash = {e["sha256"]: e for e in every}
            analysed = [by_hash[h] for h in current]
        parts = [new_parts[e["sha256"]] if e["sha256"] in new_parts else _read_part(folder, e, config) for e in analysed]
        if not parts:
            raise DataError(f"data.source {config.data.source!r}: no data files have been received yet")
        ingested = assemble(parts, config, findings=(listing.finding(),))  # raises before anything is registered
        with writing(folder, "add the files to the study's curated data"):
            for entry in entries:
                _write_part(folder, new_parts[entry["sha256"]], entry)
            if new_parts:
                sync_path(folder / "parts")  # the parts' names are on disk before the registry names them
            if entries or duplicates:
                registry["files"] = every
                registry["duplicates"] += [asdict(d) for d in duplicates]
                _save(folder, registry)
    return Curated(
        ingested=ingested, new_files=tuple(p.source.path for p in new_parts.values()), duplicates=tuple(duplicates),
        skipped=listing.skipped,
    )


def _listing(config: StudyConfig, *, has_history: bool) -> SourceListing:
    try:
        return list_sources(config)
    except DataError:
        if has_history and config.source_path.is_dir():
            return SourceListing(files=())  # the landing folder was emptied: analyse what was received before
        raise


# ------------------------------------------------------------------------------------------------ parts


def _write_part(folder: Path, part: FilePart, entry: dict[str, Any]) -> None:
    """Write a part with its registry entry in its metadata (replacing a leftover of a killed run)."""
    target = folder / "parts" / f"{part.source.sha256}.parquet"
    aside = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    table = pa.Table.from_pandas(part.raw, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), PART_METADATA_KEY: json.dumps(entry).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), aside)
    sync_path(aside)
    os.replace(aside, target)


def _read_part(folder: Path, entry: dict[str, Any], config: StudyConfig) -> FilePart:
    """A registered part, checked against its entry: present, readable, same hash and row count."""
    path = folder / "parts" / f"{entry['sha256']}.parquet"
    repair = config.repair_command
    if not path.exists():
        raise DataError(
            f"{path}: the curated copy of {entry['path']} is missing although registry.json lists it; restore it "
            f"from a backup, or run '{repair}' to register the parts that are present (the rows of "
            f"{entry['path']} are then analysed again only if that file is landed again)"
        )
    try:
        recorded = _entry_of(pq.read_schema(path))
        rows = pq.read_metadata(path).num_rows
        raw = pd.read_parquet(path, engine="pyarrow")
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: the curated copy of {entry['path']} cannot be read ({_one_line(str(exc))}); run '{repair}': "
            "it sets the damaged part aside in curated/set-aside/ and rebuilds registry.json (the rows of "
            f"{entry['path']} are analysed again when that file is landed again)"
        ) from None
    disagree = _disagreement(entry, recorded, rows)
    if disagree:
        raise DataError(
            f"{path}: the curated copy of {entry['path']} does not match registry.json ({disagree}); run "
            f"'{repair}' to rebuild registry.json from what the parts record"
        )
    source = SourceFile(path=entry["path"], sha256=entry["sha256"], rows=int(entry["rows"]))
    return FilePart(raw=raw, source=source, decimal_comma=bool(entry["decimal_comma"]))


def _entry_of(schema: pa.Schema) -> dict[str, Any] | None:
    """The registry entry a part carries, or None (a part written before parts carried one)."""
    value = (schema.metadata or {}).get(PART_METADATA_KEY)
    if value is None:
        return None
    entry = json.loads(value)
    return entry if isinstance(entry, dict) else None


def _disagreement(entry: dict[str, Any], recorded: dict[str, Any] | None, rows: int) -> str:
    if recorded is not None and recorded.get("sha256") != entry["sha256"]:
        return f"its metadata names content {str(recorded.get('sha256'))[:12]}…, the registry {entry['sha256'][:12]}…"
    if rows != entry["rows"]:
        return f"it holds {rows:,} rows, the registry says {entry['rows']:,}"
    return ""


# --------------------------------------------------------------------------------------------- registry


def _load(folder: Path, config: StudyConfig) -> dict[str, Any]:
    """The registry, checked; missing means a new study only when there are no parts either."""
    path = folder / "registry.json"
    registry, problem = _read_registry(path)
    if problem is None and registry is not None:
        return registry
    n_parts = len(list((folder / "parts").glob("*.parquet")))
    if registry is None and problem is None:  # no registry.json
        if not n_parts:
            return {"version": REGISTRY_VERSION, "files": [], "duplicates": []}
        raise DataError(
            f"{path}: is missing, but {folder / 'parts'} holds {n_parts} curated part(s); rebuild it from them "
            f"with '{config.repair_command}' (nothing is deleted)"
        )
    raise DataError(
        f"{path}: the study's file registry is damaged ({problem}); rebuild it from the {n_parts} curated part(s) "
        f"with '{config.repair_command}' (the damaged file is set aside, nothing is deleted)"
    )


def _read_registry(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(registry, None) when valid; (None, None) when there is none; (None, what is wrong) when damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    try:
        registry = json.loads(text)
    except ValueError as exc:
        return None, f"not JSON: {exc}" if text.strip() else "empty"
    problem = _registry_problem(registry)
    if problem:
        return None, problem
    registry.setdefault("duplicates", [])
    for entry in registry["files"]:
        entry.setdefault("decimal_comma", False)
        entry.setdefault("origin", "")
    return registry, None


def _registry_problem(registry: Any) -> str:
    if not isinstance(registry, dict):
        return f"a JSON {type(registry).__name__} where an object with a 'files' list belongs"
    if not isinstance(registry.get("files"), list):
        return "no 'files' list"
    for i, entry in enumerate(registry["files"], start=1):
        if not isinstance(entry, dict):
            return f"entry {i} of 'files' is not an object"
        for key, kind in (("sha256", str), ("path", str), ("rows", int)):
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                return f"entry {i} of 'files' has no valid {key!r}"
        if not _SHA256.fullmatch(entry["sha256"]):
            return f"entry {i} of 'files' has no valid 'sha256'"
    duplicates = registry.get("duplicates", [])
    if not isinstance(duplicates, list) or not all(
        isinstance(d, dict) and isinstance(d.get("path"), str) and isinstance(d.get("sha256"), str) for d in duplicates
    ):
        return "'duplicates' is not a list of objects with a path and a sha256"
    return ""


def _save(folder: Path, registry: dict[str, Any]) -> None:
    path = folder / "registry.json"
    aside = path.with_name(f".registry.json.{os.getpid()}.tmp")
    aside.write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    sync_path(aside)
    os.replace(aside, path)
    sync_path(folder)


# ----------------------------------------------------------------------------------------------- repair


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_curated` found and did."""

    folder: Path
    registry: str
    """What registry.json was: "valid", "missing", or "damaged (why)"."""
    parts: int
    entries: int
    rebuilt: tuple[str, ...] = ()
    """Entries added from parts the registry did not list (source names)."""
    lost: tuple[str, ...] = ()
    """Registry entries dropped because their part is missing or was set aside (source names)."""
    set_aside: tuple[str, ...] = field(default=())
    """"<file>: why", for each file moved to ``curated/set-aside/``."""

    def lines(self) -> list[str]:
        """The report, one line each, for the command line."""
        out = [
            f"{self.folder}: registry.json was {self.registry}; {self.parts} part(s) found, "
            f"{self.entries} entr{'y' if self.entries == 1 else 'ies'} in the rebuilt registry"
            f" ({len(self.rebuilt)} rebuilt from parts it did not list)"
        ]
        out += [f"rebuilt from its part: {name}" for name in self.rebuilt]
        out += [f"set aside (not deleted) in {self.folder / 'set-aside'}: {what}" for what in self.set_aside]
        out += [f"no part left for {name}: its rows are analysed again only if the file is landed again"
                for name in self.lost]
        return out


def repair_curated(config: StudyConfig) -> Repair:
    """Rebuild ``registry.json`` from the parts, losing nothing that can be read.

    Every part is read in full and checked (Parquet, named by the hash its metadata records, as many rows
    as it records); one that fails is moved to ``curated/set-aside/`` with the reason reported, never
    deleted, and so is a damaged registry. Entries of a readable registry keep their order and history
    where their part is sound; parts it did not list are added from their metadata (a part written before
    parts carried metadata is named after its rows' ``source_file``). Duplicates are kept from a readable
    registry. Safe to run at any time: it takes the study's curation lock.
    """
    folder = curated_dir(config)
    if not folder.is_dir():
        return Repair(folder=folder, registry="missing", parts=0, entries=0)
    (folder / "parts").mkdir(exist_ok=True)
    with _locked(folder):
        _remove_leftovers(folder)
        path = folder / "registry.json"
        old, problem = _read_registry(path)
        set_aside: list[str] = []
        if problem is not None:
            _set_aside(folder, path)
            set_aside.append(f"registry.json: {problem}")
        state = "valid" if old is not None else "missing" if problem is None else f"damaged ({problem})"
        sound: dict[str, dict[str, Any]] = {}
        files = sorted((folder / "parts").glob("*.parquet"))
        for part in files:
            entry, why = _inspect_part(part, config)
            if entry is None:
                _set_aside(folder, part)
                set_aside.append(f"parts/{part.name}: {why}")
            else:
                sound[entry["sha256"]] = entry
        entries: list[dict[str, Any]] = []
        lost: list[str] = []
        for entry in (old or {"files": []})["files"]:
            if entry["sha256"] in sound and entry["sha256"] not in {e["sha256"] for e in entries}:
                recorded = sound[entry["sha256"]]
                entries.append({**recorded, **entry, "rows": recorded["rows"]})
            elif entry["sha256"] not in sound:
                lost.append(entry["path"])
        listed = {e["sha256"] for e in entries}
        rebuilt = sorted((e for h, e in sound.items() if h not in listed), key=lambda e: (e["ingested_at"], e["path"]))
        entries += rebuilt
        duplicates = (old or {}).get("duplicates", [])
        _save(folder, {"version": REGISTRY_VERSION, "files": entries, "duplicates": duplicates})
    return Repair(
        folder=folder, registry=state, parts=len(files), entries=len(entries),
        rebuilt=tuple(e["path"] for e in rebuilt), lost=tuple(lost), set_aside=tuple(set_aside),
    )


def _inspect_part(path: Path, config: StudyConfig) -> tuple[dict[str, Any] | None, str]:
    """(its registry entry, "") for a sound part, else (None, what is wrong)."""
    if not _SHA256.fullmatch(path.stem):
        return None, "not named by a content hash"
    try:
        table = pq.read_table(path)
        recorded = _entry_of(table.schema)
    except (pa.ArrowException, OSError, ValueError) as exc:
        return None, f"cannot be read as Parquet ({_one_line(str(exc))})"
    if recorded is None:
        return _legacy_entry(path, table, config), ""
    problem = ""
    for key, kind in (("sha256", str), ("path", str), ("rows", int), ("decimal_comma", bool), ("origin", str),
                      ("ingested_at", str)):
        if not isinstance(recorded.get(key), kind):
            problem = f"its metadata has no valid {key!r}"
    if not problem and recorded["sha256"] != path.stem:
        problem = f"its metadata names content {recorded['sha256'][:12]}…, not the {path.stem[:12]}… of its name"
    if not problem and recorded["rows"] != table.num_rows:
        problem = f"it holds {table.num_rows:,} rows, its metadata says {recorded['rows']:,}"
    return (None, problem) if problem else (recorded, "")


def _legacy_entry(path: Path, table: pa.Table, config: StudyConfig) -> dict[str, Any]:
    """The entry of a part written before parts carried metadata, from what its rows say."""
    frame = table.to_pandas()
    names = frame["source_file"].dropna().astype(str) if "source_file" in frame.columns else pd.Series([], dtype=str)
    text = frame.drop(columns=[c for c in ("source_file", "source_line") if c in frame.columns]).astype(str)
    decimal_comma = bool(text.apply(lambda column: column.str.strip().str.fullmatch(_DECIMAL_COMMA_CELL.pattern)).any().any())
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return asdict(RegistryEntry(
        sha256=path.stem, path=names.iloc[0] if len(names) else f"(unknown: part {path.stem[:12]}…)",
        rows=table.num_rows, decimal_comma=decimal_comma, ingested_at=stamp, origin=str(config.source_path),
    ))


def _set_aside(folder: Path, path: Path) -> None:
    """Move a damaged file to ``curated/set-aside/`` under a name not yet taken (never overwriting)."""
    aside = folder / "set-aside"
    aside.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = aside / f"{path.name}.{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = aside / f"{path.name}.{stamp}.{n}"
    os.rename(path, target)
    sync_path(aside)
    sync_path(path.parent)


# ---------------------------------------------------------------------------------------------- helpers


def _remove_leftovers(folder: Path) -> None:
    """Remove the ``.*.tmp`` files of writes a killed run did not finish (only under the lock: then no
    other process is writing them)."""
    for aside in [*folder.glob(".*.tmp"), *(folder / "parts").glob(".*.tmp")]:
        aside.unlink(missing_ok=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _iso(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).isoformat(timespec="microseconds")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def fingerprint(frame: pd.DataFrame) -> str:
    """A content hash of a table (values, column names and dtypes; not the index): the identity of the
    rows a fit sees, used as part of the fit cache key.

    A categorical column counts as the values it holds: its dtype is that of its categories (``str`` for
    the text columns validation holds as categoricals) and pandas hashes each row's value, not its code. So
    the same rows give the same hash whether their text is held as text or as categories.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([(str(c), str(_value_dtype(t))) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def _value_dtype(dtype: Any) -> Any:
    """The dtype of the values a column holds: a categorical's categories' dtype, else its own."""
    return dtype.categories.dtype if isinstance(dtype, pd.CategoricalDtype) else dtype
