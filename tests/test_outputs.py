from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

from longitudinal.outputs import discard_run, new_run_id, publish_run, start_run, write_json


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
    from longitudinal.outputs import run_id_of

    study = tmp_path / "study"
    first = run_id_of(start_run(study))
    publish_run(study / f".staging-{first}", first)
    second = run_id_of(start_run(study))
    assert second > first
    assert (study / f".staging-{second}" / "figures").is_dir()
    discard_run(study / f".staging-{second}")
