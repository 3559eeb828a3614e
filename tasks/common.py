"""Small helpers shared by the task modules: artifact keys and the retry rule for I/O."""

from __future__ import annotations

import re
from typing import Any

from longitudinal.data.durable import refused_write
from longitudinal.errors import SourceUnavailable


def artifact_key(study: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{study}-{what}".lower()).strip("-")


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O that may succeed a moment later (a file still being written or locked, a folder briefly
    unavailable); never a data error or a bug, which fail the same way every time, nor a write the disk
    refused (full, read-only, not permitted): that takes a person, not five seconds."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(error, OSError):
        return not refused_write(error)
    return isinstance(error, SourceUnavailable)
