"""The curated store checks itself and is repaired without losing data; a file changing while it is read
is analysed as one version or left for the next run, never registered with another version's rows."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longitudinal.data.ingest as ingest
from longitudinal.config import StudyConfig, load_config, parse_config
from longitudinal.data.curation import PART_METADATA_KEY, curate, repair_curated
from longitudinal.errors import DataError, SourceUnavailable

ROOT = Path(__file__).resolve().parents[1]
HEADER = "id,week,score\n"


def rows(*subjects: int) -> str:
    return HEADER + "".join(f"{s},{w},{s * 10 + w}\n" for s in subjects for w in (0, 1))


def study(tmp_path: Path) -> StudyConfig:
    config = tmp_path / "study.yaml"
    config.write_text(
        "study: s\ndata: {source: landing, subject: id, time: week, outcome: score}\n"
        "models: {candidates: {ri: 'score ~ week + (1 | id)'}}\n"
    )
    return load_config(config)


def land(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "landing" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def curated(tmp_path: Path) -> Path:
    return tmp_path / "reports" / "s" / "curated"


def registry(tmp_path: Path) -> dict[str, Any]:
    return json.loads((curated(tmp_path) / "registry.json").read_text(encoding="utf-8"))


def assert_registry_and_parts_agree(tmp_path: Path) -> None:
    """Every entry has its part, whose metadata names the entry's content and whose rows are the entry's."""
    for entry in registry(tmp_path)["files"]:
        part = curated(tmp_path) / "parts" / f"{entry['sha256']}.parquet"
        recorded = json.loads(pq.read_schema(part).metadata[PART_METADATA_KEY])
        assert recorded["sha256"] == entry["sha256"]
        assert len(pd.read_parquet(part)) == entry["rows"] == recorded["rows"]
        assert {"size", "mtime", "path"} <= recorded.keys()


def two_files_one_removed(tmp_path: Path) -> StudyConfig:
    """A landing-folder study holding a.csv (since removed from the folder) and b.csv: 8 rows in all."""
    config = study(tmp_path)
    first = land(tmp_path, "a.csv", rows(1, 2))
    curate(config)
    first.unlink()
    land(tmp_path, "b.csv", rows(3, 4))
    assert curate(config).ingested.rows_read == 8
    return config


# ------------------------------------------------------------------------------- a file being written


def grow_after_reads(monkeypatch: pytest.MonkeyPatch, path: Path, times: int) -> list[int]:
    """Append a row to ``path`` right after each of its first ``times`` reads: a writer racing the run."""
    real = ingest._read_all
    reads: list[int] = []

    def racing(handle: BinaryIO, limit: int) -> bytes:
        content = real(handle, limit)
        if os.fstat(handle.fileno()).st_ino == path.stat().st_ino:
            reads.append(len(content))
            if len(reads) <= times:
                with path.open("a") as writer:
                    writer.write(f"{90 + len(reads)},0,1\n")
        return content

    monkeypatch.setattr(ingest, "_read_all", racing)
    return reads


def test_a_file_appended_to_while_it_is_read_is_analysed_as_one_version(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = study(tmp_path)
    path = land(tmp_path, "a.csv", rows(1, 2))
    reads = grow_after_reads(monkeypatch, path, times=1)
    result = curate(config)
    assert len(reads) == 2  # the first read saw the file change, the second did not
    content = path.read_bytes()
    [entry] = registry(tmp_path)["files"]
    assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    assert entry["rows"] == result.ingested.rows_read == 5 == content.count(b"\n") - 1
    assert_registry_and_parts_agree(tmp_path)
    monkeypatch.undo()
    assert curate(config).ingested.rows_read == 5  # the next run succeeds, nothing to edit by hand


def test_a_file_that_keeps_changing_is_left_for_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", rows(1, 2))
    curate(config)
    before = registry(tmp_path)
    path = land(tmp_path, "b.csv", rows(3, 4))
    grow_after_reads(monkeypatch, path, times=ingest.STABLE_READ_ATTEMPTS)
    with pytest.raises(SourceUnavailable, match=(
        r"^landing/b.csv: changed while being read \(from 42 to 63 bytes over 3 reads\); it is still being written: "
        r"it is read again on the next run"
    )):
        curate(config)
    assert registry(tmp_path) == before
    monkeypatch.undo()
    assert curate(config).ingested.rows_read == 4 + 4 + ingest.STABLE_READ_ATTEMPTS
    assert_registry_and_parts_agree(tmp_path)


# ------------------------------------------------------------------------------- a damaged registry


@pytest.mark.parametrize("damage, problem", [
    (None, r"is missing, but .*/parts holds 2 curated part\(s\); rebuild it from them with "),
    ("{}", r"the study's file registry is damaged \(no 'files' list\); rebuild it from the 2 curated part\(s\) with "),
    ("[]", r"damaged \(a JSON list where an object with a 'files' list belongs\)"),
    ('{"files": [{"path": "landing/a.csv", "rows": 4}]}', r"damaged \(entry 1 of 'files' has no valid 'sha256'\)"),
    ('{"files": [', r"damaged \(not JSON: "),
    ("", r"damaged \(empty\)"),
])
def test_a_damaged_registry_is_a_one_line_error_and_repair_loses_nothing(tmp_path: Path, damage: str | None,
                                                                         problem: str) -> None:
    config = two_files_one_removed(tmp_path)
    path = curated(tmp_path) / "registry.json"
    if damage is None:
        path.unlink()
    else:
        path.write_text(damage)
    with pytest.raises(DataError, match=problem) as raised:
        curate(config)
    message = str(raised.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert f"longitudinal repair --config {tmp_path / 'study.yaml'}" in message

    report = repair_curated(config)

    assert report.parts == 2 and report.entries == 2 and report.lost == ()
    assert sorted(report.rebuilt) == ["landing/a.csv", "landing/b.csv"]
    assert len(report.set_aside) == (0 if damage is None else 1)
    if damage is not None:  # the damaged registry is kept, not deleted
        [kept] = (curated(tmp_path) / "set-aside").iterdir()
        assert kept.read_text() == damage
    assert curate(config).ingested.rows_read == 8  # a.csv left the folder long ago: still analysed
    assert_registry_and_parts_agree(tmp_path)


def test_repair_keeps_a_valid_registry_and_its_duplicates(tmp_path: Path) -> None:
    config = two_files_one_removed(tmp_path)
    land(tmp_path, "b-again.csv", rows(3, 4))
    curate(config)
    before = registry(tmp_path)
    report = repair_curated(config)
    assert (report.registry, report.rebuilt, report.lost, report.set_aside) == ("valid", (), (), ())
    assert registry(tmp_path) == before


# ---------------------------------------------------------------------------------------- a damaged part


def _part_of(tmp_path: Path, name: str) -> Path:
    entry = next(e for e in registry(tmp_path)["files"] if e["path"] == f"landing/{name}")
    return curated(tmp_path) / "parts" / f"{entry['sha256']}.parquet"


@pytest.mark.parametrize("damage, problem", [
    ("truncate", r"the curated copy of landing/a.csv cannot be read \("),
    ("not parquet", r"the curated copy of landing/a.csv cannot be read \("),
    ("other content", r"the curated copy of landing/a.csv does not match registry.json \(its metadata names content "),
    ("missing", r"the curated copy of landing/a.csv is missing although registry.json lists it; restore it from a "
                r"backup, or run 'longitudinal repair --config "),
])
def test_a_damaged_part_is_a_one_line_error_and_repair_sets_it_aside(tmp_path: Path, damage: str, problem: str) -> None:
    config = two_files_one_removed(tmp_path)
    part, other = _part_of(tmp_path, "a.csv"), _part_of(tmp_path, "b.csv")
    original = part.read_bytes()
    if damage == "truncate":
        part.write_bytes(original[: len(original) // 2])
    elif damage == "not parquet":
        part.write_text("id,week,score\n")
    elif damage == "other content":
        shutil.copyfile(other, part)
    else:
        part.unlink()
    damaged = part.read_bytes() if part.exists() else None
    with pytest.raises(DataError, match=problem) as raised:
        curate(config)
    assert str(raised.value).startswith(str(part)) and "longitudinal repair --config" in str(raised.value)

    report = repair_curated(config)

    assert report.lost == ("landing/a.csv",)
    assert len(report.set_aside) == (0 if damage == "missing" else 1)
    if damage != "missing":
        [kept] = (curated(tmp_path) / "set-aside").iterdir()
        assert kept.name.startswith(part.name) and kept.read_bytes() == damaged  # kept, not deleted
    assert curate(config).ingested.rows_read == 4  # b.csv; a.csv comes back when landed again
    land(tmp_path, "a.csv", rows(1, 2))
    assert curate(config).ingested.rows_read == 8
    assert_registry_and_parts_agree(tmp_path)


def test_a_registry_whose_row_count_disagrees_with_its_part_is_refused(tmp_path: Path) -> None:
    config = two_files_one_removed(tmp_path)
    document = registry(tmp_path)
    document["files"][0]["rows"] = 3
    (curated(tmp_path) / "registry.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"does not match registry.json \(it holds 4 rows, the registry says 3\)"):
        curate(config)
    repair_curated(config)
    assert registry(tmp_path)["files"][0]["rows"] == 4
    assert curate(config).ingested.rows_read == 8


def test_repair_rebuilds_a_part_written_before_parts_carried_metadata(tmp_path: Path) -> None:
    config = two_files_one_removed(tmp_path)
    part = _part_of(tmp_path, "a.csv")
    pd.read_parquet(part).to_parquet(part, index=False)  # as an older version wrote it: no entry inside
    (curated(tmp_path) / "registry.json").unlink()
    report = repair_curated(config)
    assert sorted(report.rebuilt) == ["landing/a.csv", "landing/b.csv"]
    assert curate(config).ingested.rows_read == 8


# ---------------------------------------------------------------------------------------- command line


def test_repair_command_says_what_it_found(tmp_path: Path) -> None:
    config = two_files_one_removed(tmp_path)
    (curated(tmp_path) / "registry.json").write_text("[]")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config.config_file)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"longitudinal run: error: {curated(tmp_path) / 'registry.json'}: the study's file registry")
    assert line.endswith(f"with 'longitudinal repair --config {config.config_file}' (the damaged file is set aside, "
                         "nothing is deleted)")

    result = subprocess.run([sys.executable, "-m", "flows.cli", "repair", "--config", str(config.config_file)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == (
        f"{curated(tmp_path)}: registry.json was damaged (a JSON list where an object with a 'files' list "
        "belongs); 2 part(s) found, 2 entries in the rebuilt registry (2 rebuilt from parts it did not list)"
    )
    assert lines[-1].startswith(f"set aside (not deleted) in {curated(tmp_path) / 'set-aside'}: registry.json: ")


# -------------------------------------------------------------------------------------------- property


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Steps on a landing folder of three names: land new content, rewrite, truncate, remove, land while
    it grows during the read, or damage the registry; each step is followed by a run."""
    steps = ["land", "rewrite", "truncate", "remove", "grow", "break-registry"]
    return draw(st.lists(st.tuples(st.sampled_from(steps), st.integers(0, 2), st.integers(0, 10**6)),
                         min_size=1, max_size=6))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(history=histories())
def test_whatever_happens_to_the_files_registry_and_parts_agree_and_every_row_is_counted(
    tmp_path_factory: pytest.TempPathFactory, history: list[tuple[str, int, int]],
) -> None:
    tmp_path = tmp_path_factory.mktemp("history")
    config = study(tmp_path)
    land(tmp_path, "seed.csv", rows(100, 101))
    curate(config)
    serial = 0
    for step, which, seed in history:
        serial += 1
        name = f"f{which}.csv"
        path = tmp_path / "landing" / name
        grows = step == "grow"
        if step in ("land", "rewrite", "grow") or (step == "truncate" and not path.exists()):
            land(tmp_path, name, rows(serial * 10 + which, seed % 50 + 200 + serial))
        if step == "truncate":
            content = path.read_bytes()
            cut = len(HEADER) + seed % (len(content) - len(HEADER) + 1)
            path.write_bytes(content[:cut])
        if step == "remove":
            path.unlink(missing_ok=True)
        if step == "break-registry":
            (curated(tmp_path) / "registry.json").write_text(["", "{}", "[]", "{\"files\": [{}]}"][seed % 4])
            with pytest.raises(DataError, match="longitudinal repair --config"):
                curate(config)
            report = repair_curated(config)
            assert report.lost == ()
        with pytest.MonkeyPatch.context() as patch:
            if grows:
                grow_after_reads(patch, path, times=1)
            result = curate(config)
        assert_registry_and_parts_agree(tmp_path)
        entries = registry(tmp_path)["files"]
        # A landing folder accumulates: every registered file is analysed, each row once.
        assert result.ingested.rows_read == sum(e["rows"] for e in entries)
        assert len({e["sha256"] for e in entries}) == len(entries)
        for landed in sorted((tmp_path / "landing").iterdir()):
            content = landed.read_bytes()
            entry = next(e for e in entries if e["sha256"] == hashlib.sha256(content).hexdigest())
            lines = [line for line in content.split(b"\n")[1:] if line]
            assert entry["rows"] == len(lines)
