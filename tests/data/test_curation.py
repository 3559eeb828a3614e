"""The study's curated data: which files a run ingests and analyses, and writes a failure cannot corrupt."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import longitudinal.data.curation as curation
from longitudinal.config import StudyConfig, parse_config
from longitudinal.data.curation import curate
from longitudinal.errors import DataError

HEADER = "id,week,score,arm\n"


def visits(*subjects: int) -> str:
    """Two visits per subject."""
    return HEADER + "".join(f"{s},{w},{10 * s + w},{'AB'[s % 2]}\n" for s in subjects for w in (0, 1))


def study(tmp_path: Path, source: str = "landing") -> StudyConfig:
    document = {
        "study": "s",
        "data": {"source": source, "subject": "id", "time": "week", "outcome": "score", "categorical": ["arm"]},
        "models": {"candidates": {"ri": "score ~ week + (1 | id)"}},
        "output": {"directory": "reports"},
    }
    return parse_config(document, base_dir=tmp_path)


def land(tmp_path: Path, name: str, text: str, folder: str = "landing") -> Path:
    path = tmp_path / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def registry(config: StudyConfig) -> dict[str, Any]:
    return json.loads((config.output_dir / "curated" / "registry.json").read_text())


def parts(config: StudyConfig) -> set[str]:
    return {p.name for p in (config.output_dir / "curated" / "parts").iterdir()}


def analysed(curated: curation.Curated) -> list[str]:
    return [f.path for f in curated.ingested.files]


def assert_every_entry_has_its_part(config: StudyConfig) -> None:
    for entry in registry(config)["files"]:
        part = config.output_dir / "curated" / "parts" / f"{entry['sha256']}.parquet"
        assert len(pd.read_parquet(part)) == entry["rows"]


def test_a_run_ingests_only_the_files_it_has_not_seen(tmp_path: Path) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))
    assert curate(config).new_files == ("landing/a.csv",)
    land(tmp_path, "b.csv", visits(3))
    second = curate(config)
    assert second.new_files == ("landing/b.csv",)
    assert analysed(second) == ["landing/a.csv", "landing/b.csv"]
    assert second.ingested.rows_read == 6
    third = curate(config)
    assert third.new_files == ()
    assert third.ingested.rows_read == 6
    assert [e["path"] for e in registry(config)["files"]] == ["landing/a.csv", "landing/b.csv"]


def test_the_same_content_under_another_name_is_a_duplicate_ingested_once(tmp_path: Path) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))
    shutil.copy(tmp_path / "landing" / "a.csv", tmp_path / "landing" / "a-copy.csv")
    curated = curate(config)
    assert curated.new_files == ("landing/a-copy.csv",)  # files are read in name order
    assert [(d.path, d.same_as) for d in curated.duplicates] == [("landing/a.csv", "landing/a-copy.csv")]
    assert curated.ingested.rows_read == 4
    again = curate(config)
    assert again.duplicates == ()  # recorded once, not reported on every run
    assert again.ingested.rows_read == 4
    assert len(registry(config)["files"]) == 1
    assert len(registry(config)["duplicates"]) == 1


def test_a_folder_source_accumulates_files_since_removed(tmp_path: Path) -> None:
    config = study(tmp_path)
    first = land(tmp_path, "a.csv", visits(1, 2))
    curate(config)
    first.unlink()
    land(tmp_path, "b.csv", visits(3))
    curated = curate(config)
    assert analysed(curated) == ["landing/a.csv", "landing/b.csv"]
    assert curated.ingested.rows_read == 6
    (tmp_path / "landing" / "b.csv").unlink()  # an emptied landing folder: what was received so far
    assert curate(config).ingested.rows_read == 6


def test_a_glob_or_file_source_analyses_exactly_what_it_names(tmp_path: Path) -> None:
    first = land(tmp_path, "a.csv", visits(1, 2), folder="data")
    land(tmp_path, "b.csv", visits(3), folder="data")
    both = curate(study(tmp_path, "data/*.csv"))
    assert analysed(both) == ["data/a.csv", "data/b.csv"]
    first.unlink()
    only_b = curate(study(tmp_path, "data/*.csv"))
    assert analysed(only_b) == ["data/b.csv"]
    assert only_b.new_files == ()  # known content: not read again
    assert analysed(curate(study(tmp_path, "data/b.csv"))) == ["data/b.csv"]


def test_a_file_that_ingestion_refuses_is_not_registered(tmp_path: Path) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))
    curate(config)
    before = registry(config), parts(config)
    bad = land(tmp_path, "bad.csv", visits(3).replace("id,", "subject,"))
    with pytest.raises(DataError, match=r"landing/bad.csv: column 'id' \(data.subject\) is missing"):
        curate(config)
    assert (registry(config), parts(config)) == before
    bad.write_text(visits(3), encoding="utf-8")  # fixed and saved again: a new arrival
    fixed = curate(config)
    assert fixed.new_files == ("landing/bad.csv",)
    assert fixed.ingested.rows_read == 6


def test_a_failure_before_the_registry_is_replaced_leaves_it_as_it_was(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))
    curate(config)
    before = registry(config)
    land(tmp_path, "b.csv", visits(3))
    replace = os.replace

    def fail_on_registry(source: Path, target: Path) -> None:
        if Path(target).name == "registry.json":
            raise OSError("disk full")
        replace(source, target)

    monkeypatch.setattr(curation.os, "replace", fail_on_registry)
    with pytest.raises(OSError, match="disk full"):
        curate(config)
    assert registry(config) == before
    assert len(parts(config)) == 2  # the new part, without an entry: harmless
    assert_every_entry_has_its_part(config)

    monkeypatch.setattr(curation.os, "replace", replace)
    curated = curate(config)
    assert curated.new_files == ("landing/b.csv",)
    assert [e["path"] for e in registry(config)["files"]] == ["landing/a.csv", "landing/b.csv"]
    assert not list((config.output_dir / "curated").glob(".*.tmp"))  # the unfinished write was removed


def test_a_failure_while_writing_a_part_leaves_no_part_and_no_entry(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))

    def fail(source: Path, target: Path) -> None:
        raise OSError("killed")

    monkeypatch.setattr(curation.os, "replace", fail)
    with pytest.raises(OSError, match="killed"):
        curate(config)
    assert not (config.output_dir / "curated" / "registry.json").exists()
    left = parts(config)
    assert len(left) == 1 and left.pop().endswith(".tmp")  # only the aside copy, never a part

    monkeypatch.undo()
    assert curate(config).new_files == ("landing/a.csv",)
    assert {n for n in parts(config) if n.endswith(".tmp")} == set()
    assert_every_entry_has_its_part(config)


def test_a_full_disk_while_curating_names_the_folder_and_registers_nothing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from longitudinal.errors import OutputUnwritable

    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))

    def full(source: Path, target: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(curation.os, "replace", full)
    folder = config.output_dir / "curated"
    with pytest.raises(OutputUnwritable, match=rf"cannot add the files to the study's curated data in .*{folder.name}: "
                                               r"the disk is full"):
        curate(config)
    assert not (folder / "registry.json").exists()
    monkeypatch.undo()
    assert curate(config).new_files == ("landing/a.csv",)  # the next run, with room again, registers it
    assert_every_entry_has_its_part(config)


def test_a_registry_entry_whose_part_is_missing_is_a_clear_error(tmp_path: Path) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))
    curate(config)
    for part in (config.output_dir / "curated" / "parts").iterdir():
        part.unlink()
    with pytest.raises(DataError, match=r"the curated copy of landing/a.csv is missing"):
        curate(config)


def test_registry_and_parts_are_written_aside_then_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = study(tmp_path)
    land(tmp_path, "a.csv", visits(1, 2))
    renames: list[tuple[str, str]] = []
    replace = os.replace

    def record(source: Path, target: Path) -> None:
        renames.append((Path(source).name, Path(target).name))
        replace(source, target)

    monkeypatch.setattr(curation.os, "replace", record)
    curated = curate(config)
    sha = curated.ingested.files[0].sha256
    assert renames == [
        (f".{sha}.parquet.{os.getpid()}.tmp", f"{sha}.parquet"),  # the part first,
        (f".registry.json.{os.getpid()}.tmp", "registry.json"),  # then the registry that names it
    ]


def test_dates_read_the_same_from_the_curated_copies(tmp_path: Path) -> None:
    """Parquet dates (date32), zoned timestamps and CSV dates survive the curated Parquet parts unchanged."""
    import datetime as dt

    (tmp_path / "landing").mkdir()
    pd.DataFrame({"id": [1, 1], "day": [dt.date(2024, 1, 15), dt.date(2024, 1, 29)], "score": 1.0}).to_parquet(
        tmp_path / "landing" / "a.parquet")
    zoned = pd.to_datetime(["2024-01-20 23:00", "2024-02-03 23:00"]).tz_localize("Europe/Oslo")
    pd.DataFrame({"id": [2, 2], "day": zoned, "score": 1.0}).to_parquet(tmp_path / "landing" / "b.parquet")
    land(tmp_path, "c.csv", "id,day,score\n3,2024-01-22,1\n3,2024-02-05T12:00,1\n")
    document = {
        "study": "s",
        "data": {"source": "landing", "subject": "id", "time": "day", "outcome": "score",
                 "time_unit": "weeks", "time_origin": "study"},
        "models": {"candidates": {"ri": "score ~ day + (1 | id)"}},
        "output": {"directory": "reports"},
    }
    config = parse_config(document, base_dir=tmp_path)
    first = curate(config).ingested  # from the files
    again = curate(config).ingested  # from the curated parts
    expected = [0.0, 2.0, (5 + 22 / 24) / 7, (19 + 22 / 24) / 7, 1.0, (21.5) / 7]  # Oslo 23:00 is 22:00 UTC
    for ingested in (first, again):
        assert ingested.typed["day"].tolist() == pytest.approx(expected, abs=1e-12)
        assert ingested.dates is not None and ingested.dates.origin_date == "2024-01-15"


# ---------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_the_same_whether_text_is_held_as_text_or_as_categories() -> None:
    text = pd.DataFrame({
        "id": pd.Series(["P2", "P1", "P2", None], dtype="str"), "week": [0.0, 0.0, 1.0, 1.0],
        "arm": pd.Series(["b", "a", "b", "a"], dtype="str"), "source_line": np.arange(2, 6),
    })
    held = text.assign(id=pd.Categorical(text["id"].array), arm=pd.Categorical(text["arm"].array))
    assert curation.fingerprint(held) == curation.fingerprint(text)
    # ... and the hash of text columns is what it was before categories were held (cached fits stay valid)
    before = hashlib.sha256()
    before.update(json.dumps([(str(c), str(t)) for c, t in text.dtypes.items()]).encode())
    before.update(pd.util.hash_pandas_object(text, index=False).to_numpy().tobytes())
    assert curation.fingerprint(held) == before.hexdigest()
    # other values, or a category in another order with the same codes, are other data
    assert curation.fingerprint(held.assign(arm=held["arm"].cat.rename_categories(["b", "a"]))) != before.hexdigest()
    assert curation.fingerprint(held.assign(id=held["id"].fillna("P1"))) != before.hexdigest()
