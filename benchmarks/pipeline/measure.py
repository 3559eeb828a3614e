"""Measuring one subprocess (wall time, peak memory of its processes — proportional, shared pages split — and
of its largest process) and the environment it runs in (its own Prefect home; the working tree, or a
committed snapshot of it); the background daemon ``longitudinal run`` may keep in that home (found through
``$PREFECT_HOME/longitudinal/background.json``; its run processes counted with the run, it and its Prefect
server apart, and stopped at the end).

Only the standard library and the shared Prefect-process environment (``flows.local_server``): no
library code is imported here, so a ``--snapshot`` measures the snapshot's code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
    daemon: int | None = None  # the background warm process the run worked in, if any
    daemon_reloads: int = 0  # times that daemon re-executed itself during the run (changed code or settings)


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


@dataclass(frozen=True)
class ProcessTable:
    """One scan of /proc: each process's children, resident pages and (read lazily) command line."""

    children: dict[int, list[int]]
    rss_pages: dict[int, int]

    @classmethod
    def scan(cls) -> ProcessTable:
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
        return cls(children, rss_pages)

    def tree(self, root: int, skip: int | None = None) -> list[int]:
        """``root`` and all its descendants (``root`` alone if it has none or is gone), without ``skip`` and
        its descendants."""
        out, stack = [], [root]
        while stack:
            pid = stack.pop()
            if pid == skip:
                continue
            out.append(pid)
            stack.extend(self.children.get(pid, ()))
        return out

    def proportional_bytes(self, pid: int) -> int:
        """``Pss`` of ``pid`` (``/proc/<pid>/smaps_rollup``: a page shared by n processes counts 1/n in each,
        so a forked helper's copy-on-write pages are not counted twice); its resident set where the kernel
        does not say (no smaps_rollup, no access); 0 for a process gone."""
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
                for line in handle:
                    if line.startswith(b"Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return self.rss_pages.get(pid, 0) * PAGE_SIZE


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_prefect_server(pid: int) -> bool:
    """Whether process ``pid`` is a Prefect server (:func:`is_prefect_server_command`)."""
    return is_prefect_server_command(command_line(pid))


def is_prefect_server_command(argv: list[str]) -> bool:
    """``prefect server start ...`` or uvicorn, by the arguments themselves, not by any path among them: a
    Prefect home's path may well hold the word ``prefect``, and a daemon's ``--server-pid`` the word server."""
    names = [Path(arg).name for arg in argv]
    for i, name in enumerate(names[:-2]):
        if name == "prefect" and names[i + 1:i + 3] == ["server", "start"]:
            return True
    return "uvicorn" in names


# ------------------------------------------------------------------ the background server of `longitudinal run`

BACKGROUND_FILE = Path("longitudinal") / "background.json"


def background_daemon(home: Path) -> int | None:
    """The pid of the warm process ``longitudinal run`` left running in this Prefect home, if any and alive.

    Without ``PREFECT_API_URL``, ``longitudinal run`` may start (on first use) a Prefect server and a warm
    process in the background and reuse them; it then records the warm process (the daemon) in
    ``$PREFECT_HOME/longitudinal/background.json`` (key ``pid``). Each run's work happens in a child forked
    from the daemon, outside the CLI's process tree; the Prefect server is another child of the daemon.
    None when the file is absent (runs start Prefect's temporary server themselves) or the daemon is gone.
    """
    pid = _background_state(home).get("pid")
    return pid if isinstance(pid, int) and _not_zombie(pid) else None


def _background_state(home: Path) -> dict[str, Any]:
    try:
        state = json.loads((home / BACKGROUND_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def daemon_reloads(home: Path) -> int:
    """How many times the daemon of this home re-executed itself so far (its log's "reloading" lines): it
    does so when the code or the environment changed, and the run that asked pays the imports again."""
    try:
        return (home / "longitudinal" / "background.log").read_text(errors="replace").count("reloading")
    except OSError:
        return 0


def background_memory(daemon: int) -> dict[str, float]:
    """MB now held by what persists across runs: the daemon alone, the Prefect server's tree, and the
    daemon's other children (a warm spare, say) with their descendants."""
    table = ProcessTable.scan()
    server = other = 0
    for child in table.children.get(daemon, ()):
        size = sum(table.proportional_bytes(pid) for pid in table.tree(child))
        if is_prefect_server(child):
            server += size
        else:
            other += size
    return {"daemon_mb": table.proportional_bytes(daemon) / 2**20, "prefect_server_mb": server / 2**20,
            "other_children_mb": other / 2**20}


def stop_background(env: dict[str, str], *, cwd: Path) -> str | None:
    """``longitudinal server stop`` in this Prefect home, if a background daemon runs there; what happened.

    If the command fails or the daemon outlives it by 20 s, the daemon and its children are sent SIGTERM
    by pid (they were started by this benchmark's runs). None when nothing ran in the background.
    """
    daemon = background_daemon(Path(env["PREFECT_HOME"]))
    if daemon is None:
        return None
    done = subprocess.run([*longitudinal_command(), "server", "stop"], env=env, cwd=cwd, capture_output=True,
                          text=True, check=False, timeout=120)
    deadline = time.monotonic() + 20
    while _not_zombie(daemon) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _not_zombie(daemon):
        table = ProcessTable.scan()
        for pid in reversed(table.tree(daemon)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return (f"`longitudinal server stop` (exit {done.returncode}) left the daemon {daemon} running: "
                f"sent SIGTERM to it and its children. {done.stderr.strip()[-200:]}")
    return f"stopped with `longitudinal server stop` (exit {done.returncode})"


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class RunProcesses:
    """The processes of one measured run: the command's tree and, when ``longitudinal run`` works in a
    background daemon of ``prefect_home``, the daemon's children that appear during the run (its forked run
    processes) and their descendants; not the daemon itself nor the Prefect server nor the children it had
    before the run, which persist across runs (:func:`background_memory` reports them).

    The daemon is looked up before the run and, while none is recorded, again at every sample: the first
    run in a Prefect home starts it (as its own child, until it exits: the daemon's tree is left out of the
    command's then too). A forked run child shares the daemon's imported pages, so its proportional set
    holds only its share of them."""

    def __init__(self, root: int, prefect_home: Path | None) -> None:
        self.root = root
        self.home = prefect_home
        self.daemon: int | None = None
        self.persistent: set[int] = set()
        self.reloads_before = daemon_reloads(prefect_home) if prefect_home is not None else 0
        self._find_daemon(ProcessTable.scan(), before_run=True)

    def _find_daemon(self, table: ProcessTable, *, before_run: bool) -> None:
        daemon = background_daemon(self.home) if self.home is not None else None
        if daemon is None or daemon == self.daemon:
            return
        self.daemon = daemon
        if before_run:
            self.persistent = set(table.children.get(daemon, ()))
        server = _background_state(self.home).get("server_pid") if self.home is not None else None
        if isinstance(server, int):
            self.persistent.add(server)

    def reloads(self) -> int:
        """The daemon's reloads during the run (see :func:`daemon_reloads`)."""
        return daemon_reloads(self.home) - self.reloads_before if self.home is not None else 0

    def pids(self, table: ProcessTable) -> list[int]:
        if self.home is not None and (self.daemon is None or self.daemon not in table.rss_pages):
            self._find_daemon(table, before_run=False)
        # The first run in a home starts the daemon as its own child for a moment: it is not the run's.
        pids = table.tree(self.root, skip=self.daemon)
        if self.daemon is None:
            return pids
        for child in table.children.get(self.daemon, ()):
            if child in self.persistent:
                continue
            if is_prefect_server(child):
                self.persistent.add(child)
            else:
                pids += table.tree(child)
        return pids


def run_measured(command: Sequence[str], *, env: dict[str, str], cwd: Path, time_tool: str | None,
                 log_dir: Path, prefect_home: Path | None = None) -> Measured:
    """Run ``command`` to completion; wall time, and peak memory sampled from /proc every 0.1 s.

    The memory of the run is the proportional set size summed over :class:`RunProcesses` (with
    ``prefect_home``, a background daemon's run children count too). Output goes to files in ``log_dir``
    (a pipe could fill up and stall a chatty run). Without /proc the tree peak is None. The largest
    process is the larger of GNU time's maximum resident set of the command and the largest sampled
    proportional set; without GNU time, ``ru_maxrss`` of children (the largest child waited for so far in
    this process: an upper bound).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(command[0]).name + "_" + "_".join(command[1:3]))[:60]
    out_path, err_path, time_path = (log_dir / f"{stem}.{ext}" for ext in ("out", "err", "time"))
    full = [time_tool, "-v", "-o", str(time_path), *command] if time_tool else list(command)
    can_sample = Path("/proc/self/stat").exists()
    peak, largest = [0], [0]
    done = threading.Event()
    began = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(full, env=env, cwd=cwd, stdout=out, stderr=err)
        processes = RunProcesses(process.pid, prefect_home) if can_sample else None

        def sample() -> None:
            assert processes is not None
            while not done.is_set():
                table = ProcessTable.scan()
                sizes = [table.proportional_bytes(pid) for pid in processes.pids(table)]
                peak[0] = max(peak[0], sum(sizes))
                largest[0] = max([largest[0], *sizes])
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
    peak_process_mb = max(peak_process_mb, largest[0] / 2**20)
    return Measured(
        returncode=returncode,
        seconds=seconds,
        peak_tree_mb=peak[0] / 2**20 if can_sample and peak[0] else None,
        peak_process_mb=peak_process_mb,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        daemon=processes.daemon if processes else None,
        daemon_reloads=processes.reloads() if processes else 0,
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
