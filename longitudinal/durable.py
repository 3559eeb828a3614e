"""Flushing to disk: what makes a rename a durable commit point.

Writers write aside, ``fsync`` the new file, rename it into place, then ``fsync`` the folder so the new
name survives a machine restart too.
"""

from __future__ import annotations

import os
from pathlib import Path


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
