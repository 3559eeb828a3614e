"""The study's curated data: every file ingested, kept as Parquet, with a registry keyed by content.

``<output>/<study>/curated/`` holds one Parquet file per ingested file content (``parts/<sha256>.parquet``,
the rows exactly as read) and ``registry.json``. A run reads only the files whose content is new.

When ``data.source`` is a folder (a landing folder that sites drop exports into), data accumulate: a
run analyses everything received so far, including files since removed from the folder. The same
content under another name is recorded as a duplicate and not ingested again; a file rewritten with
new content is a new arrival (rows it repeats are then exact duplicates, which validation quarantines
as such). When ``data.source`` is a file or a glob, a run analyses exactly the files it names now; the
registry then only saves re-reading unchanged files.

Every write is atomic (written aside, flushed, then renamed), parts before the registry, all under an
exclusive lock: a killed run or two runs at once never leave a registry entry without its part. A
killed run can leave a part without an entry (harmless: the next run registers it when it reads that
file again) and a ``.*.tmp`` file, which the next run removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from longitudinal.config import StudyConfig
from longitudinal.durable import sync_path
from longitudinal.errors import DataError, SourceUnavailable
from longitudinal.ingest import FilePart, assemble, find_source_files, read_file
from longitudinal.records import Ingested, SourceFile

REGISTRY_VERSION = 1


@dataclass(frozen=True)
class RegistryEntry:
    sha256: str
    path: str
    rows: int
    decimal_comma: bool
    ingested_at: str
    origin: str
    """The ``data.source`` (resolved) it was received through: a folder's data accumulate per folder."""


@dataclass(frozen=True)
class Duplicate:
    path: str
    sha256: str
    same_as: str
    seen_at: str


@dataclass(frozen=True)
class Curated:
    """What a run analyses (all data so far) and what this run added."""

    ingested: Ingested
    new_files: tuple[str, ...]
    duplicates: tuple[Duplicate, ...]


def curated_dir(config: StudyConfig) -> Path:
    """Where the study keeps its curated data: ``<output>/<study>/curated``."""
    return config.output_dir / "curated"


def is_new_file(config: StudyConfig, path: Path) -> bool:
    """Whether ``path``'s content has not been ingested by the study yet."""
    known = {entry["sha256"] for entry in _load(curated_dir(config))["files"]}
    return _sha256(path.read_bytes()) not in known


def curate(config: StudyConfig) -> Curated:
    """Ingest the new files of ``data.source`` into the study's curated data and return what to analyse.

    New files are registered only once the data they join can be assembled (same role columns, readable
    values): a file that ingestion refuses is not ingested, so it cannot block later runs; fixed and
    saved again, it arrives anew.
    """
    folder = curated_dir(config)
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    accumulate = config.source_path.is_dir()
    origin = str(config.source_path)
    with _locked(folder):
        _remove_leftovers(folder)
        registry = _load(folder)
        known = {entry["sha256"]: entry for entry in registry["files"]}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        current: list[str] = []
        new_parts: dict[str, FilePart] = {}
        duplicates: list[Duplicate] = []
        for path in _source_files(config, has_history=bool(known)):
            content_hash = _sha256(_read_bytes(config, path))
            shown = _shown(config, path)
            if content_hash in known or content_hash in new_parts:
                first = known[content_hash]["path"] if content_hash in known else new_parts[content_hash].source.path
                seen = any(d["path"] == shown and d["sha256"] == content_hash for d in registry["duplicates"])
                if first != shown and not seen:
                    duplicates.append(Duplicate(path=shown, sha256=content_hash, same_as=first, seen_at=now))
            else:
                new_parts[content_hash] = read_file(path, config)
            if content_hash not in current:
                current.append(content_hash)
        entries = [
            asdict(RegistryEntry(
                sha256=h, path=part.source.path, rows=part.source.rows, decimal_comma=part.decimal_comma,
                ingested_at=now, origin=origin,
            ))
            for h, part in new_parts.items()
        ]
        every = registry["files"] + entries
        if accumulate:
            analysed = [e for e in every if e["origin"] == origin or e["sha256"] in current]
        else:
            by_hash = {e["sha256"]: e for e in every}
            analysed = [by_hash[h] for h in current]
        parts = [new_parts[e["sha256"]] if e["sha256"] in new_parts else _read_part(folder, e) for e in analysed]
        if not parts:
            raise DataError(f"data.source {config.data.source!r}: no data files have been received yet")
        ingested = assemble(parts, config)  # raises before anything is registered
        for part in new_parts.values():
            _write_part(folder, part)
        if new_parts:
            sync_path(folder / "parts")  # the parts' names are on disk before the registry names them
        if entries or duplicates:
            registry["files"] = every
            registry["duplicates"] += [asdict(d) for d in duplicates]
            _save(folder, registry)
    return Curated(
        ingested=ingested, new_files=tuple(p.source.path for p in new_parts.values()), duplicates=tuple(duplicates),
    )


def _source_files(config: StudyConfig, *, has_history: bool) -> list[Path]:
    try:
        return find_source_files(config)
    except DataError:
        if has_history and config.source_path.is_dir():
            return []  # the landing folder was emptied: analyse what was received before
        raise


def _shown(config: StudyConfig, path: Path) -> str:
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(config.base_dir.resolve()))
    except ValueError:
        return str(absolute)


def _write_part(folder: Path, part: FilePart) -> None:
    target = folder / "parts" / f"{part.source.sha256}.parquet"
    if target.exists():
        return
    aside = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    part.raw.to_parquet(aside, engine="pyarrow", index=False)
    sync_path(aside)
    os.replace(aside, target)


def _read_part(folder: Path, entry: dict[str, Any]) -> FilePart:
    path = folder / "parts" / f"{entry['sha256']}.parquet"
    if not path.exists():
        raise DataError(
            f"{path}: the curated copy of {entry['path']} is missing although registry.json lists it; restore "
            "the curated folder from a backup, or move it aside to ingest the landed files afresh"
        )
    raw = pd.read_parquet(path, engine="pyarrow")
    source = SourceFile(path=entry["path"], sha256=entry["sha256"], rows=int(entry["rows"]))
    return FilePart(raw=raw, source=source, decimal_comma=bool(entry["decimal_comma"]))


def _load(folder: Path) -> dict[str, Any]:
    path = folder / "registry.json"
    if not path.exists():
        return {"version": REGISTRY_VERSION, "files": [], "duplicates": []}
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: the study's file registry cannot be read ({exc}); restore it from a backup "
                        "or move the curated folder aside to start afresh") from None
    return registry


def _save(folder: Path, registry: dict[str, Any]) -> None:
    path = folder / "registry.json"
    aside = path.with_name(f".registry.json.{os.getpid()}.tmp")
    aside.write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    sync_path(aside)
    os.replace(aside, path)
    sync_path(folder)


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


def _read_bytes(config: StudyConfig, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SourceUnavailable(
            f"{_shown(config, path)}: cannot be read ({exc.strerror or exc}); check that the file exists and is readable"
        ) from None


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def fingerprint(frame: pd.DataFrame) -> str:
    """A content hash of a table (values, column names and dtypes; not the index): the identity of the
    rows a fit sees, used as part of the fit cache key."""
    digest = hashlib.sha256()
    digest.update(json.dumps([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()
