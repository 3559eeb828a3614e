"""Watch a study's landing folder and report batches of complete, new data files.

A site's export lands as a file that grows for a while; it is reported only once its size and
modification time have stopped changing for ``settle_seconds``. A file renamed into the folder (written
aside, then moved into place, as careful exports and ``rsync`` do) is complete when it appears: it waits
only ``MOVED_SETTLE_SECONDS``, so that files moved in together still form one batch. Files that settle
close together are reported as one batch (one pipeline run for a burst of arrivals). A periodic rescan backs up the
file-system notifications, which can be missed (network file systems, a watcher restarted while files
landed). What counts as "new" is decided by the caller (e.g. a content hash not yet ingested).

One bad entry never stops the watcher or delays the other files: a name that is not UTF-8 is handled as
any other (logged with U+FFFD), a file that cannot be read or checked is left out and offered again at
the next rescan, and when a batch cannot be delivered, its files are delivered one by one so that only
the file at fault waits. A folder that cannot be listed is reported once and retried at each rescan.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from longitudinal.data.durable import printable

DATA_SUFFIXES = (".csv", ".parquet")
MOVED_SETTLE_SECONDS = 0.3

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    signature: tuple[int, int]
    changed_at: float


class LandingWatcher:
    """Report settled new data files of ``folder`` to ``on_batch``, from a background thread.

    ``is_new(path)`` filters what is reported (default: every settled file once per signature).
    ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        folder: Path,
        on_batch: Callable[[list[Path]], None],
        *,
        is_new: Callable[[Path], bool] | None = None,
        settle_seconds: float = 2.0,
        rescan_seconds: float = 60.0,
        poll_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.on_batch = on_batch
        self.is_new = is_new or (lambda path: True)
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._pending: dict[Path, _Pending] = {}
        self._reported: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: object | None = None
        self._last_scan = -float("inf")
        self._listing_error: str | None = None

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> LandingWatcher:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory:
                    return
                moved = event.event_type == "moved"
                for raw, complete in ((event.src_path, False), (getattr(event, "dest_path", ""), moved)):
                    if not raw:
                        continue
                    try:
                        watcher.notice(Path(os.fsdecode(raw)), complete=complete)  # non-UTF-8 bytes stay escaped
                    except Exception:  # an exception here would end watchdog's thread; the rescan covers it
                        log.exception("cannot look at %s", printable(raw))

        self.folder.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(), str(self.folder), recursive=False)
        observer.start()
        self._observer = observer
        self._thread = threading.Thread(target=self._loop, name=f"landing-{self.folder.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()  # type: ignore[attr-defined]
            self._observer.join(timeout=5)  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -------------------------------------------------------------------------------------- the work

    def notice(self, path: Path, *, complete: bool = False) -> None:
        """A file changed (from a notification or a rescan): (re)start its settling clock. A ``complete``
        file (renamed into the folder) settles after ``MOVED_SETTLE_SECONDS``, unless it changes again."""
        if path.suffix.lower() not in DATA_SUFFIXES or path.name.startswith("."):
            return
        signature = _signature(path)
        if signature is None:
            with self._lock:
                self._pending.pop(path, None)
            return
        with self._lock:
            if self._reported.get(path) == signature:
                return
            current = self._pending.get(path)
            if current is None or current.signature != signature:
                waited = max(self.settle_seconds - MOVED_SETTLE_SECONDS, 0.0) if complete else 0.0
                self._pending[path] = _Pending(signature, self.clock() - waited)

    def rescan(self) -> None:
        """Look at every file of the folder (the backstop for missed notifications).

        An entry that cannot be examined is skipped; a folder that cannot be listed is logged once (until
        it can be listed again) and tried again at the next rescan."""
        self._last_scan = self.clock()
        try:
            entries = sorted(self.folder.iterdir()) if self.folder.is_dir() else []
        except OSError as exc:
            message = f"cannot list the landing folder {printable(self.folder)}: {printable(exc.strerror or exc)}"
            if message != self._listing_error:
                log.warning("%s; trying again every %.0f s", message, self.rescan_seconds)
            self._listing_error = message
            return
        self._listing_error = None
        for path in entries:
            try:
                if path.is_file():
                    self.notice(path)
            except OSError as exc:  # e.g. a name too long or a loop of links: not a data file
                log.warning("skipping %s: %s", printable(path), printable(exc))

    def tick(self) -> list[Path]:
        """Report the batch that has settled, if any; returns what was reported."""
        if self.clock() - self._last_scan >= self.rescan_seconds:
            self.rescan()
        now = self.clock()
        with self._lock:
            for path in list(self._pending):
                signature = _signature(path)
                if signature is None:
                    del self._pending[path]
                elif signature != self._pending[path].signature:
                    self._pending[path] = _Pending(signature, now)
            if not self._pending:
                return []
            # A burst is one batch: wait until every pending file has settled.
            if any(now - p.changed_at < self.settle_seconds for p in self._pending.values()):
                return []
            settled = dict(self._pending)
            self._pending.clear()
            self._reported.update({path: p.signature for path, p in settled.items()})
        batch = [path for path in sorted(settled) if self._safe_is_new(path)]
        if batch:
            self._deliver(batch)
        return batch

    def _deliver(self, batch: list[Path]) -> None:
        """``on_batch(batch)``; if that fails, each file alone, so that one file at fault does not hold
        back the others. What was not delivered is offered again at the next rescan; the first failure
        is raised once the others are delivered."""
        try:
            self.on_batch(batch)
            return
        except BaseException as exc:
            if len(batch) == 1 or not isinstance(exc, Exception):
                self._offer_again(batch)
                raise
            first: BaseException = exc
        failed = []
        for path in batch:
            try:
                self.on_batch([path])
            except Exception:
                failed.append(path)
        self._offer_again(failed)
        if failed:
            log.warning("could not report %s; trying again at the next rescan",
                        ", ".join(printable(p.name) for p in failed))
            raise first

    def _offer_again(self, paths: list[Path]) -> None:
        with self._lock:
            for path in paths:
                self._reported.pop(path, None)

    def _safe_is_new(self, path: Path) -> bool:
        try:
            return self.is_new(path)
        except Exception as exc:  # vanished, unreadable or not checkable now: the rescan retries
            log.warning("cannot read %s yet: %s", printable(path), printable(exc))
            self._offer_again([path])
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception:  # the watcher must outlive one bad callback; the rescan retries
                log.exception("landing watcher for %s failed to report a batch", printable(self.folder))


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)
