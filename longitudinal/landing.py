"""Watch a study's landing folder and report batches of complete, new data files.

A site's export lands as a file that grows for a while; it is reported only once its size and
modification time have stopped changing for ``settle_seconds``. Files that settle close together are
reported as one batch (one pipeline run for a burst of arrivals). A periodic rescan backs up the
file-system notifications, which can be missed (network file systems, a watcher restarted while files
landed). What counts as "new" is decided by the caller (e.g. a content hash not yet ingested).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DATA_SUFFIXES = (".csv", ".parquet")

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
        poll_seconds: float = 0.5,
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

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> LandingWatcher:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory:
                    return
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    if raw:
                        path = Path(raw if isinstance(raw, str) else raw.decode())
                        watcher.notice(path)

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

    def notice(self, path: Path) -> None:
        """A file changed (from a notification or a rescan): (re)start its settling clock."""
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
                self._pending[path] = _Pending(signature, self.clock())

    def rescan(self) -> None:
        """Look at every file of the folder (the backstop for missed notifications)."""
        self._last_scan = self.clock()
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.iterdir()):
            if path.is_file():
                self.notice(path)

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
            try:
                self.on_batch(batch)
            except BaseException:
                with self._lock:  # not delivered: the next rescan offers these files again
                    for path in batch:
                        self._reported.pop(path, None)
                raise
        return batch

    def _safe_is_new(self, path: Path) -> bool:
        try:
            return self.is_new(path)
        except OSError as exc:  # vanished or unreadable between settling and hashing: the rescan retries
            log.warning("cannot read %s yet: %s", path, exc)
            with self._lock:
                self._reported.pop(path, None)
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception:  # the watcher must outlive one bad callback; the rescan retries
                log.exception("landing watcher for %s failed to report a batch", self.folder)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)
