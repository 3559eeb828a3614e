"""Measuring one subprocess (wall time, peak memory of its tree — proportional, shared pages split — and of
its largest process) and the environment it runs in (its own Prefect home; the working tree, or a committed
snapshot of it).

Only the standard library and the shared Prefect-process environment (``flows.local_server``): no
library code is imported here, so a ``--snapshot`` measures the snapshot's code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flows.local_server import quiet_prefect_env

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Measured:
    """One subprocess: exit code, wall seconds, peak memory (MB) of its tree and of its largest process."""

    returncode: int
    seconds: float
    peak_tree_mb: float | None
    peak_process_mb: float | None
    stdout: str
    stderr: str


def find_time_tool(*, install: bool) -> str | None:
    """Path of GNU time (for ``-v``'s maximum resident set), installing Debian's ``time`` once if asked."""
    if Path("/usr/bin/time").exists():
        return "/usr/bin/time"
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing GNU time (apt-get install -y time) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "time"], capture_output=True, check=False)
        if Path("/usr/bin/time").exists():
            return "/usr/bin/time"
    return None


def read_tree_rss(root_pid: int) -> int:
    """Bytes in memory of ``root_pid`` and all its descendants, read from /proc (0 if unreadable): each
    process's proportional set size (``Pss`` of ``/proc/<pid>/smaps_rollup``: a page shared by n processes
    counts 1/n in each), so that a forked helper's copy-on-write pages (the report's figure helper) are not
    counted twice; its resident set size where ``smaps_rollup`` cannot be read."""
    children: dict[int, list[int]] = {}
    rss_pages: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
            # The command name is in parentheses and may hold spaces: split after the last ')'.
            fields = stat[stat.rindex(b")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(pid)
            rss_pages[pid] = int(fields[21])
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [root_pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        total += _proportional_bytes(pid, rss_pages.get(pid, 0) * page)
        stack.extend(children.get(pid, ()))
    return total


def _proportional_bytes(pid: int, resident: int) -> int:
    """``Pss`` of ``pid`` in bytes, or ``resident`` when the kernel does not say (no smaps_rollup, no access)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resident


def run_measured(command: Sequence[str], *, env: dict[str, str], cwd: Path, time_tool: str | None,
                 log_dir: Path) -> Measured:
    """Run ``command`` to completion; wall time, and peak memory sampled from /proc every 0.1 s.

    Output goes to files in ``log_dir`` (a pipe could fill up and stall a chatty run). Without /proc the
    tree peak is None; without GNU time the largest-process peak falls back to ``ru_maxrss`` of children
    (the largest child waited for so far in this process, so only an upper bound).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(command[0]).name + "_" + "_".join(command[1:3]))[:60]
    out_path, err_path, time_path = (log_dir / f"{stem}.{ext}" for ext in ("out", "err", "time"))
    full = [time_tool, "-v", "-o", str(time_path), *command] if time_tool else list(command)
    can_sample = Path("/proc/self/stat").exists()
    peak = [0]
    done = threading.Event()
    began = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(full, env=env, cwd=cwd, stdout=out, stderr=err)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], read_tree_rss(process.pid))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        if can_sample:
            sampler.start()
        returncode = process.wait()
        seconds = time.perf_counter() - began
        done.set()
        if can_sample:
            sampler.join()
    peak_process_mb: float | None = None
    if time_tool and time_path.exists():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_path.read_text())
        peak_process_mb = int(match.group(1)) / 1024 if match else None
    if peak_process_mb is None:
        import resource

        peak_process_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return Measured(
        returncode=returncode,
        seconds=seconds,
        peak_tree_mb=peak[0] / 2**20 if can_sample and peak[0] else None,
        peak_process_mb=peak_process_mb,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def prefect_env(home: Path, source: Path | None = None) -> dict[str, str]:
    """The environment of a benchmarked run: its own Prefect home, no telemetry, no API server configured.

    With ``source`` (a snapshot of the repository), ``PYTHONPATH`` puts its packages before the editable
    install, so the run measures that code.
    """
    env = quiet_prefect_env(home)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
    return env


def export_snapshot(revision: str, folder: Path) -> Path:
    """The committed tree at ``revision`` extracted into ``folder`` (``git archive``; git state untouched).

    Lets the benchmark measure committed code while colleagues edit the working tree.
    """
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--snapshot {revision}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def code_dir(env: dict[str, str]) -> Path:
    """Where the measured code lives: the snapshot on ``PYTHONPATH`` if any, else the repository.

    Subprocesses run there, because ``python -c`` puts the working folder first on ``sys.path``.
    """
    first = env.get("PYTHONPATH", "").split(os.pathsep)[0]
    return Path(first) if first else ROOT


def longitudinal_command() -> list[str]:
    """The ``longitudinal`` console script next to this interpreter, else the CLI module through it."""
    script = Path(sys.executable).parent / "longitudinal"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"]


def python_wall(arguments: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, *arguments], env=env, cwd=code_dir(env), capture_output=True, check=False)
    return time.perf_counter() - began
