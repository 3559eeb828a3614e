"""Where the pipeline meets the operating system: durable writes, writes the disk refuses, names as text.

Writers write aside, ``fsync`` the new file, rename it into place, then ``fsync`` the folder so the new
name survives a machine restart too. A write the disk refuses (full, over quota, read-only, not
permitted) becomes :class:`OutputUnwritable`, one line naming the folder and what to free or change,
instead of a bare ``OSError``. A file name is bytes to the OS and may not be UTF-8; :func:`printable`
turns such a name into text every later step can encode (run names, JSON, logs, reports).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from longitudinal.errors import OutputUnwritable


def sync_path(path: Path) -> None:
    """``fsync`` a file or a folder (a folder's sync makes the renames and new names in it durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_tree(folder: Path) -> None:
    """``fsync`` every file and folder under ``folder``, the files first."""
    entries = sorted(folder.rglob("*"))
    for path in entries:
        if path.is_file():
            sync_path(path)
    for directory in [folder, *(p for p in entries if p.is_dir())]:
        sync_path(directory)


# errno -> (what happened, what to do), for the folder named in the message.
_REFUSALS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full (no space left on device)",
                   "free space on that file system (older run folders, Prefect's cached fits), or set "
                   "output.directory to a folder with room"),
    errno.EDQUOT: ("the disk quota is exceeded",
                   "free space within the quota or have it raised, or set output.directory to another folder"),
    errno.EROFS: ("the file system is read-only",
                  "remount it read-write, or set output.directory to a writable folder"),
    errno.EACCES: ("permission denied",
                   "make the folder writable by the user running the pipeline, or set output.directory to a "
                   "writable folder"),
    errno.EPERM: ("the operation is not permitted",
                  "make the folder writable by the user running the pipeline, or set output.directory to a "
                  "writable folder"),
}


def refused_write(error: OSError) -> bool:
    """Whether ``error`` is the disk refusing a write (full, quota, read-only, permissions)."""
    return error.errno in _REFUSALS


@contextmanager
def writing(folder: Path, what: str) -> Iterator[None]:
    """Turn a write the disk refuses into :class:`OutputUnwritable` naming ``folder``; other errors pass.

    ``what`` completes "cannot ...": "write the run folder", "start a run". The caller removes what the
    failed write left (a staging folder, a temporary file).
    """
    try:
        yield
    except OSError as exc:
        if not refused_write(exc):
            raise
        raise OutputUnwritable(unwritable_message(folder, what, exc)) from exc


def unwritable_message(folder: Path, what: str, error: OSError) -> str:
    happened, advice = _REFUSALS.get(error.errno or 0, (error.strerror or str(error), "check the folder"))
    named = error.filename if isinstance(error.filename, (str, bytes, os.PathLike)) else None
    outside = named is not None and not Path(os.fsdecode(named)).is_relative_to(folder)
    where = f" ({printable(error.filename)})" if outside else ""  # e.g. the run lock beside the folder
    user = ""
    if error.errno in (errno.EACCES, errno.EPERM):
        user = f" for user id {os.geteuid()}"
    return f"cannot {what} in {printable(folder)}: {happened}{user}{where}; {advice}"


def printable(name: object) -> str:
    """``name`` as text that encodes as UTF-8: bytes the OS gave that are not UTF-8 become U+FFFD.

    Python keeps an undecodable byte of a file name as a lone surrogate (``'\\udce6'``), which fails as
    soon as the name is encoded: in a Prefect run name, JSON, Parquet, a log line. A name that is already
    text is returned unchanged.
    """
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes the OS gave, back
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte: replace it too
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")
