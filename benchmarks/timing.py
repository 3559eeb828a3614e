"""Timing for the bench scripts (imported by them as a sibling module: they run as files, ``python
benchmarks/bench_x.py``, so their folder is first on ``sys.path``). The machine is shared and noisy: the
least time of several calls is the signal; ``snapshot`` extracts a commit's code, to time it beside the
working tree's in the same run (``--baseline REV``)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


def best_of(repeats: int, call: Callable[[], T]) -> tuple[float, T]:
    """The shortest wall time of ``repeats`` calls (at least one), and the last call's result."""
    times = []
    for _ in range(max(repeats, 1)):
        began = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - began)
    return min(times), result


def least_time(repeats: int, call: Callable[[], object]) -> float:
    """The shortest wall time of ``repeats`` calls, in seconds."""
    return best_of(repeats, call)[0]


def snapshot(rev: str, folder: Path) -> Path:
    """The repository's files at ``rev`` (``git archive``), extracted into ``folder``; returns it."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder
