from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from longitudinal.data.landing import LandingWatcher


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _watcher(folder: Path, batches: list[list[str]], clock: Clock, **kwargs: object) -> LandingWatcher:
    return LandingWatcher(
        folder, lambda batch: batches.append([p.name for p in batch]), settle_seconds=2.0,
        rescan_seconds=60.0, clock=clock, **kwargs,  # type: ignore[arg-type]
    )


def _grow(path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # mtime moves even within one tick


def test_a_file_is_reported_once_it_stops_growing(tmp_path: Path) -> None:
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock)
    data = tmp_path / "site1.csv"
    _grow(data, "id,t,y\n")
    watcher.notice(data)
    clock.now += 1.5
    _grow(data, "a,0,1\n")  # still being written
    assert watcher.tick() == []
    clock.now += 1.5
    assert watcher.tick() == []  # changed 1.5 s ago: not settled yet
    clock.now += 1.0
    assert watcher.tick() == [data]
    assert batches == [["site1.csv"]]
    clock.now += 10
    assert watcher.tick() == []  # reported once


def test_a_file_moved_into_place_is_reported_at_once_unless_it_changes_again(tmp_path: Path) -> None:
    """A rename into the folder means the writer has finished: no two-second wait (file arrival to
    report is what `serve` is judged by). Files moved in together still make one batch, and a file that
    changes after its move settles as any other."""
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock)
    first, second, appended = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    for path in (first, second):
        _grow(path, "id,t,y\n")
    watcher.notice(first, complete=True)
    clock.now += 0.1
    watcher.notice(second, complete=True)
    assert watcher.tick() == []  # the second one moved in 0 s ago: the burst is still landing
    clock.now += 0.35
    assert watcher.tick() == [first, second]
    assert batches == [["a.csv", "b.csv"]]
    _grow(appended, "id,t,y\n")
    watcher.notice(appended, complete=True)
    _grow(appended, "a,0,1\n")  # written to after its move: wait for it to settle
    clock.now += 0.5
    assert watcher.tick() == []
    clock.now += 2.0
    assert watcher.tick() == [appended]


def test_a_burst_of_files_is_one_batch(tmp_path: Path) -> None:
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock)
    for i in range(3):
        path = tmp_path / f"part{i}.parquet"
        path.write_bytes(b"x" * (i + 1))
        watcher.notice(path)
        clock.now += 1.0
    watcher.tick()
    clock.now += 2.0
    watcher.tick()
    assert batches == [["part0.parquet", "part1.parquet", "part2.parquet"]]


def test_other_files_and_hidden_partial_files_are_ignored(tmp_path: Path) -> None:
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock)
    for name in ("notes.txt", ".site1.csv.part", ".hidden.csv"):
        (tmp_path / name).write_text("x")
    watcher.rescan()
    clock.now += 5
    watcher.tick()
    assert batches == []


def test_the_rescan_catches_missed_notifications(tmp_path: Path) -> None:
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock)
    watcher.tick()  # first tick scans
    (tmp_path / "missed.csv").write_text("id,t,y\n")
    clock.now += 30
    watcher.tick()
    assert batches == []  # no notification, no rescan yet
    clock.now += 31
    watcher.tick()  # rescan: noticed now
    clock.now += 2.5
    watcher.tick()
    assert batches == [["missed.csv"]]


def test_is_new_filters_what_was_already_ingested(tmp_path: Path) -> None:
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock, is_new=lambda p: p.name != "old.csv")
    for name in ("old.csv", "new.csv"):
        (tmp_path / name).write_text(name)
        watcher.notice(tmp_path / name)
    clock.now += 3
    watcher.tick()
    assert batches == [["new.csv"]]


def test_a_failed_delivery_is_offered_again(tmp_path: Path) -> None:
    clock = Clock()
    calls: list[list[Path]] = []

    def flaky(batch: list[Path]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise ConnectionError("server briefly away")

    watcher = LandingWatcher(tmp_path, flaky, settle_seconds=1.0, rescan_seconds=10.0, clock=clock)
    (tmp_path / "a.csv").write_text("x")
    watcher.rescan()
    clock.now += 2
    with pytest.raises(ConnectionError):
        watcher.tick()
    clock.now += 11  # rescan
    watcher.tick()
    clock.now += 2
    watcher.tick()
    assert [[p.name for p in c] for c in calls] == [["a.csv"], ["a.csv"]]


def test_the_real_watcher_thread_reports_a_landed_file(tmp_path: Path) -> None:
    landed = threading.Event()
    seen: list[str] = []

    def on_batch(batch: list[Path]) -> None:
        seen.extend(p.name for p in batch)
        landed.set()

    watcher = LandingWatcher(tmp_path, on_batch, settle_seconds=0.3, poll_seconds=0.05).start()
    try:
        (tmp_path / "site9.csv").write_text("id,t,y\na,0,1\n")
        assert landed.wait(timeout=20)
    finally:
        watcher.stop()
    assert seen == ["site9.csv"]


# -------------------------------------------------------------- one odd or unreadable entry stops nothing

ODD = os.fsdecode(b"site-\xe6\xff.csv")  # not UTF-8: Python keeps the bytes as lone surrogates


def test_a_name_that_is_not_utf8_is_reported_with_the_good_file_next_to_it(tmp_path: Path) -> None:
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock)
    (tmp_path / ODD).write_text("id,t,y\n")
    (tmp_path / "good.csv").write_text("id,t,y\n")
    watcher.tick()  # the first tick rescans
    clock.now += 3
    watcher.tick()
    assert batches == [sorted(["good.csv", ODD])]


def test_a_file_the_callback_cannot_take_does_not_hold_back_the_others(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """As when the event could not carry a name: the batch fails, each file is tried alone, the good one
    goes through, and only the bad one waits for the next rescan."""
    clock = Clock()
    delivered: list[list[str]] = []

    def refuses_odd_names(batch: list[Path]) -> None:
        for path in batch:
            path.name.encode("utf-8")  # raises UnicodeEncodeError, as pydantic's JSON did in emit_event
        delivered.append([p.name for p in batch])

    watcher = LandingWatcher(tmp_path, refuses_odd_names, settle_seconds=1.0, rescan_seconds=10.0, clock=clock)
    (tmp_path / ODD).write_text("x")
    (tmp_path / "good.csv").write_text("y")
    watcher.rescan()
    clock.now += 2
    with pytest.raises(UnicodeEncodeError):
        watcher.tick()
    assert delivered == [["good.csv"]]
    assert "could not report site-\ufffd\ufffd.csv" in caplog.text
    clock.now += 11
    assert watcher.tick() == []  # the rescan offers the odd file again (the good one is done) ...
    clock.now += 2
    with pytest.raises(UnicodeEncodeError):  # ... and it fails alone
        watcher.tick()
    assert delivered == [["good.csv"]]


def test_a_file_that_cannot_be_checked_is_left_for_the_rescan(tmp_path: Path) -> None:
    batches: list[list[str]] = []
    clock = Clock()

    def is_new(path: Path) -> bool:
        if path.name == "locked.csv":
            raise PermissionError(13, "Permission denied", str(path))
        return True

    watcher = _watcher(tmp_path, batches, clock, is_new=is_new)
    (tmp_path / "locked.csv").write_text("x")
    (tmp_path / "good.csv").write_text("y")
    watcher.tick()
    clock.now += 3
    watcher.tick()
    assert batches == [["good.csv"]]


def test_a_folder_that_cannot_be_listed_is_retried_and_logged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    batches: list[list[str]] = []
    clock = Clock()
    watcher = _watcher(tmp_path, batches, clock)
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    for _ in range(3):
        watcher.tick()
        clock.now += 61
    assert caplog.text.count("cannot list the landing folder") == 1
    monkeypatch.setattr(Path, "iterdir", real_iterdir)
    (tmp_path / "late.csv").write_text("z")
    watcher.tick()
    clock.now += 3
    watcher.tick()
    assert batches == [["late.csv"]]


def test_the_real_watcher_reports_a_good_file_landing_next_to_an_odd_one(tmp_path: Path) -> None:
    seen: list[str] = []
    landed = threading.Event()

    def on_batch(batch: list[Path]) -> None:
        seen.extend(p.name for p in batch)
        if {"good.csv", ODD} <= set(seen):
            landed.set()

    watcher = LandingWatcher(tmp_path, on_batch, settle_seconds=0.3, poll_seconds=0.05).start()
    try:
        (tmp_path / ODD).write_text("id,t,y\na,0,1\n")
        (tmp_path / "good.csv").write_text("id,t,y\na,0,1\n")
        assert landed.wait(timeout=20)
        assert watcher._thread is not None and watcher._thread.is_alive()
    finally:
        watcher.stop()
    assert sorted(seen) == sorted([ODD, "good.csv"])
