"""A real ``prefect server start`` on a free loopback port, and process groups that stop whole.

Shared by the integration tests (``tests/prefect_server.py``, a pytest plugin over this module) and the
benchmark's ``--server`` mode (``benchmarks/pipeline``): both need the server ``longitudinal serve`` runs
against, started in its own process group, its own ``PREFECT_HOME``, no telemetry, and stopped with
every process it started (uvicorn workers, flow-run subprocesses) so nothing outlives the caller.

Only the standard library: the ``prefect`` executable next to this interpreter starts the server, so
importing this module costs nothing and never imports Prefect.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
SERVER_STARTUP_SECONDS = 90.0


# ------------------------------------------------------------------------------------------ processes


def find_free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it; released before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quiet_prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a Prefect process: its own home, no telemetry, no user profile, no API server
    unless ``api_url`` names one (without it, a flow run starts Prefect's embedded server)."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith("PREFECT_") or key in ("PREFECT_SERVER_ANALYTICS_ENABLED",)
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_COLORS="false",
        PYTHONUNBUFFERED="1",
    )
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def start_group(command: list[str], *, env: Mapping[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new process group, its output appended to ``log``."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, env=dict(env), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[bytes] | int, *, grace_seconds: float = 20.0) -> None:
    """Stop ``process`` and every process of its group: SIGTERM, then SIGKILL after ``grace_seconds``.

    ``process`` is the group's leader: its ``Popen``, or its pid (a leader started by another process, or
    by this one before an exec, as the background daemon's Prefect server). The group is signalled even
    when the leader has already exited, since its children (uvicorn, a flow-run subprocess) may still be alive.
    """
    group = process if isinstance(process, int) else process.pid

    def wait(timeout: float) -> None:
        if isinstance(process, int):
            _wait_pid(process, timeout)
        else:
            process.wait(timeout=timeout)
    _signal_group(group, signal.SIGTERM)
    try:
        wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace_seconds
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(group):
        _signal_group(group, signal.SIGKILL)
        wait(timeout=10)


def _wait_pid(pid: int, timeout: float) -> None:
    """Wait for ``pid`` to exit, reaping it when it is this process's child; TimeoutExpired after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not a child of this process (or reaped already): watch it
            if not process_alive(pid):
                return
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(0.1)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` of a log file, for failure messages."""
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


# ------------------------------------------------------------------------------------------ the server


class ServerDidNotStart(RuntimeError):
    """``prefect server start`` exited, or its API did not answer in time; the message holds its log's tail."""


@dataclass(frozen=True)
class PrefectServer:
    """A running ``prefect server start``: where its API and UI are, its home and log, its process group."""

    api_url: str
    ui_url: str
    home: Path
    log: Path
    process: subprocess.Popen[bytes]

    def stop(self, *, grace_seconds: float = 20.0) -> None:
        stop_group(self.process, grace_seconds=grace_seconds)


def api_healthy(api_url: str) -> bool:
    """Whether the server at ``api_url`` answers ``/health`` with 200."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_prefect_server(env: Mapping[str, str], *, log: Path, cwd: Path | None = None, ui: bool = True,
                         seconds: float = SERVER_STARTUP_SECONDS) -> PrefectServer:
    """``prefect server start`` (SQLite, scheduler, triggers; the UI if ``ui``) on a free loopback port.

    Its home is ``env``'s ``PREFECT_HOME``. Returns once ``/api/health`` answers; raises
    :class:`ServerDidNotStart`, with the group stopped, if the server exits or ``seconds`` pass first.
    """
    port = find_free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"]
    env = dict(env)
    if ui:
        env["PREFECT_SERVER_UI_API_URL"] = api_url  # or the UI calls port 4200
    else:
        command.append("--no-ui")
    process = start_group(command, env=env, log=log, cwd=cwd or log.parent)
    server = PrefectServer(api_url=api_url, ui_url=f"http://127.0.0.1:{port}", home=Path(env["PREFECT_HOME"]),
                           log=log, process=process)
    deadline = time.monotonic() + seconds
    while not api_healthy(api_url):
        if process.poll() is not None:
            problem = f"prefect server exited with {process.returncode}"
        elif time.monotonic() > deadline:
            problem = f"the Prefect server's /api/health: not within {seconds:.0f} s"
        else:
            time.sleep(0.5)
            continue
        server.stop()
        raise ServerDidNotStart(f"{problem}\n{log_tail(log)}")
    return server


@contextmanager
def running_prefect_server(env: Mapping[str, str], *, log: Path, cwd: Path | None = None, ui: bool = True,
                           seconds: float = SERVER_STARTUP_SECONDS) -> Iterator[PrefectServer]:
    """:func:`start_prefect_server` for the ``with`` block; the server's whole group stopped after it."""
    server = start_prefect_server(env, log=log, cwd=cwd, ui=ui, seconds=seconds)
    try:
        yield server
    finally:
        server.stop()
