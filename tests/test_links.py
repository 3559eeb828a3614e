"""What ingestion reads from a landing folder or a glob: links, loops, FIFOs, sizes and file names.

A symbolic link is skipped with a warning naming it unless ``data.follow_symlinks``; followed, each
target is read once and a glob never walks a directory loop. Files are checked for type and size before
a byte is read. File names the OS gives work whatever their bytes, shown with U+FFFD where not UTF-8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import longitudinal.data.ingest as ingest
from longitudinal.config import StudyConfig, parse_config
from longitudinal.data.curation import curate
from longitudinal.data.ingest import read_sources
from longitudinal.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
HEADER = "id,week,score\n"


def rows(*subjects: int) -> str:
    return HEADER + "".join(f"{s},{w},{s + w}\n" for s in subjects for w in (0, 1))


def study(base: Path, source: str, *, follow: bool = False, **validation: Any) -> StudyConfig:
    return parse_config({
        "study": "s",
        "data": {"source": source, "subject": "id", "time": "week", "outcome": "score", "follow_symlinks": follow},
        "validation": validation,
        "models": {"candidates": {"ri": "score ~ week + (1 | id)"}},
    }, base_dir=base)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def warnings_of(ingested: Any) -> str:
    return " | ".join(f.details for f in ingested.findings if f.level == "warning" and not f.success)


# ----------------------------------------------------------------------------------------------- links


def test_a_link_to_a_file_outside_is_skipped_with_a_warning_naming_it(tmp_path: Path) -> None:
    write(tmp_path / "landing" / "a.csv", rows(1, 2))
    secret = write(tmp_path / "elsewhere" / "secret.csv", "SECRET LINE,week,score\n9,0,9\n")
    (tmp_path / "landing" / "b.csv").symlink_to(secret)
    ingested = read_sources(study(tmp_path, "landing"))
    assert ingested.raw["source_file"].unique().tolist() == ["landing/a.csv"]
    assert warnings_of(ingested) == (
        f"landing/b.csv is a symbolic link (to {secret}), not read; copy the file into place, or set "
        "data.follow_symlinks: true"
    )
    assert "SECRET" not in warnings_of(ingested)


def test_curation_neither_copies_nor_registers_a_link(tmp_path: Path) -> None:
    write(tmp_path / "landing" / "a.csv", rows(1, 2))
    (tmp_path / "landing" / "b.csv").symlink_to(write(tmp_path / "outside.csv", rows(7)))
    curated = curate(study(tmp_path, "landing"))
    assert curated.new_files == ("landing/a.csv",)
    assert curated.skipped and curated.skipped[0].startswith("landing/b.csv is a symbolic link")
    registry = json.loads((tmp_path / "reports" / "s" / "curated" / "registry.json").read_text())
    assert [e["path"] for e in registry["files"]] == ["landing/a.csv"]


def test_followed_links_read_each_target_once(tmp_path: Path) -> None:
    target = write(tmp_path / "outside.csv", rows(7))
    write(tmp_path / "landing" / "a.csv", rows(1, 2))
    (tmp_path / "landing" / "b.csv").symlink_to(target)
    (tmp_path / "landing" / "c.csv").symlink_to(target)
    ingested = read_sources(study(tmp_path, "landing", follow=True))
    assert ingested.raw["source_file"].value_counts().to_dict() == {"landing/a.csv": 4, "landing/b.csv": 2}
    assert warnings_of(ingested) == "landing/c.csv is the same file as landing/b.csv (a link), read once"


def test_a_link_loop_and_a_broken_link_are_skipped_with_a_word(tmp_path: Path) -> None:
    write(tmp_path / "landing" / "a.csv", rows(1, 2))
    (tmp_path / "landing" / "x.csv").symlink_to("y.csv")
    (tmp_path / "landing" / "y.csv").symlink_to("x.csv")
    (tmp_path / "landing" / "z.csv").symlink_to("gone.csv")
    ingested = read_sources(study(tmp_path, "landing", follow=True))
    assert ingested.rows_read == 4
    assert warnings_of(ingested) == (
        "landing/x.csv is a symbolic link that loops, not read; landing/y.csv is a symbolic link that loops, "
        "not read; landing/z.csv is a broken symbolic link (its target does not exist), not read"
    )


def test_data_source_itself_may_be_a_link(tmp_path: Path) -> None:
    (tmp_path / "v.csv").symlink_to(write(tmp_path / "real" / "v.csv", rows(1, 2)))
    assert read_sources(study(tmp_path, "v.csv")).rows_read == 4


@pytest.mark.parametrize("follow", [False, True])
def test_a_recursive_glob_over_looping_directory_links_ends_and_reads_each_file_once(tmp_path: Path,
                                                                                   follow: bool) -> None:
    write(tmp_path / "data" / "sub" / "v.csv", rows(1, 2))
    (tmp_path / "data" / "sub" / "up").symlink_to("..")
    (tmp_path / "data" / "other").mkdir()
    (tmp_path / "data" / "other" / "back").symlink_to("../sub")
    ingested = read_sources(study(tmp_path, "data/**/*.csv", follow=follow))
    assert ingested.raw["source_file"].value_counts().to_dict() == {"data/sub/v.csv": 4}


def test_a_glob_skips_a_matching_link_unless_links_are_followed(tmp_path: Path) -> None:
    write(tmp_path / "data" / "a.csv", rows(1, 2))
    (tmp_path / "data" / "b.csv").symlink_to(write(tmp_path / "outside" / "b.csv", rows(5)))
    assert read_sources(study(tmp_path, "data/*.csv")).rows_read == 4
    assert read_sources(study(tmp_path, "data/*.csv", follow=True)).rows_read == 6


def test_a_glob_matches_hidden_names_only_when_asked_as_glob_does(tmp_path: Path) -> None:
    write(tmp_path / "data" / "a.csv", rows(1, 2))
    write(tmp_path / "data" / ".hidden.csv", rows(3))
    write(tmp_path / "data" / ".cache" / "c.csv", rows(4))
    assert read_sources(study(tmp_path, "data/**/*.csv")).raw["source_file"].unique().tolist() == ["data/a.csv"]


# ------------------------------------------------------------------------------------ types and sizes


def test_a_fifo_or_a_directory_in_the_landing_folder_is_skipped_never_opened(tmp_path: Path) -> None:
    write(tmp_path / "landing" / "a.csv", rows(1, 2))
    os.mkfifo(tmp_path / "landing" / "pipe.csv")
    (tmp_path / "landing" / "dir.csv").mkdir()
    ingested = read_sources(study(tmp_path, "landing"))
    assert ingested.rows_read == 4
    assert warnings_of(ingested) == (
        "landing/dir.csv is a directory, not a data file; not read; "
        "landing/pipe.csv is a FIFO (named pipe), not a data file; not read"
    )


def test_a_fifo_as_data_source_is_refused_clearly(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(DataError, match=r"^data.source 'pipe.csv': pipe.csv is a FIFO \(named pipe\), not a data file"):
        read_sources(study(tmp_path, "pipe.csv"))


def test_a_file_over_max_file_bytes_is_refused_by_its_size_before_it_is_read(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "landing" / "big.csv"
    big.parent.mkdir()
    with big.open("wb") as handle:
        handle.truncate(3_000_000_000)  # sparse: takes no disk space
    monkeypatch.setattr(ingest, "_read_all", lambda *a: pytest.fail("the file was read"))
    with pytest.raises(DataError, match=(
        r"^landing/big.csv: is 3,000,000,000 bytes, more than validation.max_file_bytes \(2,000,000,000\); "
        r"split the export into smaller files, or raise validation.max_file_bytes in the study config$"
    )):
        read_sources(study(tmp_path, "landing"))


def test_max_file_bytes_is_a_config_key(tmp_path: Path) -> None:
    write(tmp_path / "v.csv", rows(1, 2))
    with pytest.raises(DataError, match=r"v.csv: is 38 bytes, more than validation.max_file_bytes \(30\)"):
        read_sources(study(tmp_path, "v.csv", max_file_bytes=30))
    assert read_sources(study(tmp_path, "v.csv", max_file_bytes=38)).rows_read == 4


# --------------------------------------------------------------------------------------------- names


def _land_bytes_name(folder: Path, name: bytes, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as handle:
        handle.write(text.encode("utf-8"))
    return Path(os.fsdecode(path))


def test_a_file_name_that_is_not_utf8_is_read_and_shown_with_replacement_characters(tmp_path: Path) -> None:
    _land_bytes_name(tmp_path / "landing", b"caf\xe9.csv", rows(1, 2))
    config = study(tmp_path, "landing")
    curated = curate(config)
    assert curated.new_files == ("landing/caf\ufffd.csv",)
    assert set(curated.ingested.raw["source_file"]) == {"landing/caf\ufffd.csv"}
    registry = json.loads((tmp_path / "reports" / "s" / "curated" / "registry.json").read_text(encoding="utf-8"))
    assert registry["files"][0]["path"] == "landing/caf\ufffd.csv"
    assert curate(config).ingested.rows_read == 4  # the next run reads it from the curated part


def test_an_error_about_a_file_whose_name_is_not_utf8_can_be_printed(tmp_path: Path) -> None:
    _land_bytes_name(tmp_path / "landing", b"\xff.csv", "id,id,score\n1,2,3\n")
    with pytest.raises(DataError) as raised:
        read_sources(study(tmp_path, "landing"))
    assert str(raised.value).startswith("landing/\ufffd.csv: the header names column 'id' twice")
    str(raised.value).encode("utf-8")  # no lone surrogate left


def test_validate_works_end_to_end_with_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    _land_bytes_name(tmp_path / "landing", b"r\xe9sultats.csv", rows(1, 2, 3) + "4,0,abc\n")
    (tmp_path / "landing" / "link.csv").symlink_to(tmp_path / "landing" / "nothing.csv")
    config = tmp_path / "study.yaml"
    config.write_text(
        "study: s\ndata: {source: landing, subject: id, time: week, outcome: score}\n"
        "models: {candidates: {ri: 'score ~ week + (1 | id)'}}\n"
    )
    result = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "warning: landing/link.csv is a symbolic link" in result.stdout
    assert "7 rows read = 6 analysed + 1 quarantined" in result.stdout
    folder = Path(result.stdout.strip().splitlines()[-1])
    quarantine = (folder / "quarantine.csv").read_text(encoding="utf-8")
    assert "landing/r\ufffdsultats.csv" in quarantine
    checks = json.loads((folder / "validation.json").read_text(encoding="utf-8"))
    assert any("landing/link.csv is a symbolic link" in w for w in checks["warnings"])
