"""A background Prefect server and a warm process for ``longitudinal run``: a run costs its work.

Without a Prefect server of the user's own, every ``longitudinal run`` used to start Prefect's temporary
server and import Prefect and great-expectations: 10-15 s before any work, and a run the UI never showed.
Now the first run in a Prefect home starts, in its own session, a daemon that

- starts ``prefect server start`` (API, UI, scheduler) on a free loopback port and keeps it, so every
  ad-hoc run is in the UI too;
- imports once everything a run needs (Prefect, great-expectations, pandas, matplotlib, the pipeline), then
  waits on a Unix socket (mode 0600, in a 0700 folder of the user's). For each run, the ``longitudinal``
  command, which imports none of that, sends its arguments, working folder, environment and standard
  streams; the daemon forks a child that runs the command exactly as the caller would have, writing to the
  caller's terminal, and sends its exit status back. Ctrl-C in the caller reaches the child.

Each run is a fresh fork of a process that never ran anything, so runs share no state. The daemon execs
itself anew (keeping the server) when the code or the environment it imported under changes, stops with
the server after ``LONGITUDINAL_BACKGROUND_IDLE_MINUTES`` (60) minutes without a run, and stops on
``longitudinal server stop``. ``LONGITUDINAL_BACKGROUND=off``, a ``PREFECT_API_URL`` of the user's own
(environment or Prefect profile) or ``--debug`` run in the calling process, as before.

Only the standard library at import time: the command must start in milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from flows.local_server import log_tail, process_alive, start_prefect_server, stop_group

STARTUP_SECONDS = 120.0
LOG_BYTES = 10_000_000
IDLE_MINUTES = 60.0
# The environment a daemon's imports depend on: a caller whose values differ gets a daemon reloaded under its own.
IMPORT_ENV_PREFIXES = ("PREFECT_", "PYTHON", "OPENBLAS_", "OMP_", "MKL_", "MPL", "GX_", "LONGITUDINAL_", "DO_NOT_TRACK")
NOT_IMPORT_ENV = ("PREFECT_API_URL", "LONGITUDINAL_BACKGROUND_IDLE_MINUTES", "LONGITUDINAL_WARM_CHILD")
PACKAGES = ("flows", "tasks", "longitudinal")
# Modules a run imports on the way that the pipeline's own imports do not (measured: sys.modules after a run
# of the example, less those after preload's imports); each is imported if this environment has it.
RUN_MODULES = (
    "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.JpegImagePlugin", "PIL.PpmImagePlugin",
    "anyio._backends._asyncio", "anyio.streams.memory", "anyio.streams.stapled", "anyio.streams.tls",
    "encodings.utf_8_sig", "fastapi", "graphviz", "multiprocessing.synchronize", "nlopt", "opentelemetry._logs",
    "opentelemetry.metrics", "pandas.core.arrays.arrow.extension_types", "pandas.core.methods.to_dict",
    "pandas.io.formats.csvs", "prefect._internal.attempt_control", "prefect._internal.control_listener",
    "prefect._internal.metrics", "prefect._internal.retries", "prefect._internal.states", "prefect.concurrency",
    "prefect.engine", "prefect.flow_engine", "prefect.task_engine", "prefect.telemetry",
    "prefect.utilities.visualization", "pyarrow.csv", "pyarrow.dataset", "pyarrow.json", "pyarrow.parquet",
    "pydantic.color", "rich._emoji_codes", "starlette.applications", "starlette.requests", "starlette.responses",
    "starlette.routing", "starlette.staticfiles", "starlette.websockets",
)


# ------------------------------------------------------------------------------------------ where


@dataclass(frozen=True)
class Paths:
    """A Prefect home's daemon files: its state, log and lock under ``<home>/longitudinal/``, its socket."""

    home: Path

    @property
    def folder(self) -> Path:
        return self.home / "longitudinal"

    @property
    def state(self) -> Path:
        return self.folder / "background.json"

    @property
    def log(self) -> Path:
        return self.folder / "background.log"

    @property
    def lock(self) -> Path:
        return self.folder / "background.lock"

    @property
    def socket(self) -> Path:
        """Short and private: a Unix socket path has at most 107 bytes, a Prefect home's may not."""
        folder = Path(tempfile.gettempdir()) / f"longitudinal-{os.getuid()}"
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:24]
        return folder / f"{digest}.sock"


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def configured_api_url(home: Path) -> str | None:
    """``PREFECT_API_URL`` from the environment or the active Prefect profile (read without importing Prefect)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import tomllib

    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or document.get("active") or "ephemeral"
    value = document.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(value) if value else None


def enabled() -> bool:
    return os.environ.get("LONGITUDINAL_BACKGROUND", "on").strip().lower() not in ("off", "0", "no", "false")


def idle_seconds() -> float:
    try:
        return 60.0 * float(os.environ.get("LONGITUDINAL_BACKGROUND_IDLE_MINUTES", IDLE_MINUTES))
    except ValueError:
        return 60.0 * IDLE_MINUTES


def code_fingerprint(env: dict[str, str]) -> str:
    """What a daemon's imports depend on: this interpreter, the pipeline's sources, the installed packages
    (their folders' modification times) and the environment variables that steer imports."""
    digest = hashlib.sha256(sys.executable.encode())
    root = Path(__file__).resolve().parents[1]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}:{stat.st_mtime_ns}:{stat.st_size}\n".encode())
    for entry in sys.path:
        if entry.endswith(("site-packages", "dist-packages")) and os.path.isdir(entry):
            digest.update(f"{entry}:{os.stat(entry).st_mtime_ns}\n".encode())
    for key in sorted(env):
        if key.startswith(IMPORT_ENV_PREFIXES) and key not in NOT_IMPORT_ENV:
            digest.update(f"{key}={env[key]}\n".encode())
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------------------------------ the caller's side


@dataclass(frozen=True)
class Daemon:
    """A running daemon as its state file describes it."""

    pid: int
    server_pid: int
    api_url: str
    code: str
    socket: Path
    started: str

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def running(self) -> bool:
        """Both processes there, and the daemon's pid still this daemon's (a state file read after a
        reboot may name pids that other processes now have)."""
        return process_alive(self.pid) and _is_ours(self.pid) and process_alive(self.server_pid)

    @classmethod
    def read(cls, paths: Paths) -> Daemon | None:
        try:
            state = json.loads(paths.state.read_text())
            return cls(pid=int(state["pid"]), server_pid=int(state["server_pid"]), api_url=str(state["api_url"]),
                       code=str(state["code"]), socket=Path(state["socket"]), started=str(state["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def run_in_background(argv: list[str], *, check: Callable[[], None]) -> int | None:
    """Run ``longitudinal <argv>`` in a fork of this Prefect home's warm daemon (started if needed).

    ``check`` (the config's checks) runs first when the daemon has to be started or reloaded, so that a
    mistake costs a second, not the server's start. Returns the run's exit status; None when the caller
    should run the command itself, after setting ``PREFECT_API_URL`` to the background server where one
    is running (a daemon busy with runs of older code, say) or with Prefect's temporary server where none
    could start (the reason is printed)."""
    paths = Paths(prefect_home())
    if not enabled() or configured_api_url(paths.home):
        return None
    daemon = _ready_daemon(paths, check)
    if daemon is None:
        return None
    try:
        return _run_through(daemon, argv)
    except _NotServed as exc:
        print(f"longitudinal: the background process did not take the run ({exc}); running it here, "
              f"against the background server {daemon.api_url}", file=sys.stderr, flush=True)
        os.environ["PREFECT_API_URL"] = daemon.api_url
        return None


class _NotServed(Exception):
    """The daemon could not start the run (it is reloading, or went away before the fork)."""


def _ready_daemon(paths: Paths, check: Callable[[], None]) -> Daemon | None:
    env = dict(os.environ)
    code = code_fingerprint(env)
    paths.folder.mkdir(parents=True, exist_ok=True)
    daemon = Daemon.read(paths)
    if daemon is not None and daemon.code == code and daemon.running():
        return daemon
    check()
    with _locked(paths.lock):
        daemon = Daemon.read(paths)
        if daemon is not None and daemon.running():
            if daemon.code == code:  # started by a concurrent run while this one waited for the lock
                return daemon
            try:
                reply = _request(daemon.socket, {"op": "reload", "env": env})
            except OSError:
                reply = {}
            if reply.get("busy"):  # runs in flight keep the old code; this one uses the server directly
                os.environ["PREFECT_API_URL"] = daemon.api_url
                return None
            if reply.get("ok"):
                return _wait_ready(paths, code, process=None)
        if daemon is not None:
            _stop_leftovers(daemon)
        with contextlib.suppress(FileNotFoundError):
            paths.state.unlink()  # a failed start's note, or a dead daemon's state
        print("longitudinal: starting a background Prefect server for this and later runs "
              f"(Prefect home {paths.home}; it stays up, with its UI, until 'longitudinal server stop' or "
              f"{idle_seconds() / 60:g} idle minutes)", flush=True)
        started = _start_daemon(paths, env)
        return _wait_ready(paths, code, process=started)


def _start_daemon(paths: Paths, env: dict[str, str]) -> subprocess.Popen[bytes]:
    paths.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if paths.log.stat().st_size > LOG_BYTES:  # one older log kept
            os.replace(paths.log, paths.log.with_suffix(".log.1"))
    with paths.log.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "flows.background", "--home", str(paths.home)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=paths.folder, env=env,
            start_new_session=True,
        )


def _wait_ready(paths: Paths, code: str, *, process: subprocess.Popen[bytes] | None) -> Daemon | None:
    """The daemon once its state names this code; None (why printed) if it fails, exits (``process``, the
    daemon just started; else the pid in its state) or takes too long."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        daemon = Daemon.read(paths)
        if daemon is not None and daemon.code == code and process_alive(daemon.pid):
            print(f"longitudinal: background Prefect server at {daemon.ui_url}", flush=True)
            return daemon
        failure = _failure(paths)
        if failure:
            break
        if process is not None and process.poll() is not None:
            failure = f"it exited with {process.returncode}"
            break
        if process is None and daemon is not None and not process_alive(daemon.pid):
            failure = "it exited while reloading"
            break
        time.sleep(0.1)
    else:
        failure = f"not ready within {STARTUP_SECONDS:.0f} s"
    print(f"longitudinal: the background Prefect server could not start ({failure}); this run starts Prefect's "
          f"temporary server instead. Its log: {paths.log}\n{log_tail(paths.log, 15)}", file=sys.stderr, flush=True)
    return None


def _failure(paths: Paths) -> str | None:
    try:
        state = json.loads(paths.state.read_text())
    except (OSError, ValueError):
        return None
    return str(state["failed"]) if "failed" in state else None


def _run_through(daemon: Daemon, argv: list[str]) -> int:
    request = {"op": "run", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    try:
        connection = _connect(daemon.socket)
    except OSError as exc:
        raise _NotServed(f"cannot connect: {exc}") from exc
    with connection:
        _send(connection, request, fds=[0, 1, 2])
        reader = connection.makefile("rb")
        first = _receive(reader)
        if "pid" not in first:
            raise _NotServed(first.get("error") or "no answer")
        child = int(first["pid"])
        forward = _forward_signals(child)
        try:
            reply = _receive(reader)
        finally:
            for sig, previous in forward.items():
                signal.signal(sig, previous)
    if "exit" not in reply:
        print("longitudinal: the run's process ended without an exit status (killed?); see the Prefect UI "
              f"at {daemon.ui_url}", file=sys.stderr, flush=True)
        return 1
    return int(reply["exit"])


def _forward_signals(child: int) -> dict[int, Any]:
    """Ctrl-C (and SIGTERM, SIGHUP) sent to the caller go to the run's process group."""
    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            try:
                os.killpg(child, sig)
            except ProcessLookupError:
                os.kill(child, sig)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def background_server_for_serve() -> str | None:
    """The background server's API URL for ``longitudinal serve`` (the daemon started if needed), held
    against the idle stop for as long as this process lives; None where there is none to use (disabled,
    a ``PREFECT_API_URL`` of the user's own, or it could not start: the reason is printed)."""
    import threading

    paths = Paths(prefect_home())
    if not enabled() or configured_api_url(paths.home):
        return None
    daemon = _ready_daemon(paths, lambda: None)
    if daemon is None:
        return None

    def hold() -> None:
        """Keep a lease open; take a new one when the daemon reloads (its sockets close at exec)."""
        while True:
            current = Daemon.read(paths)
            if current is None or not process_alive(current.pid):
                return  # stopped ('longitudinal server stop'): the server is gone too, and serve says so
            try:
                with _connect(current.socket) as connection:
                    _send(connection, {"op": "lease"})
                    while connection.recv(1):
                        pass
            except OSError:
                pass
            time.sleep(1.0)

    threading.Thread(target=hold, name="background-server-lease", daemon=True).start()
    return daemon.api_url


def stop_background(home: Path | None = None, *, seconds: float = 30.0) -> Daemon | None:
    """Stop the home's daemon and its server (runs in flight are interrupted); the daemon that was running."""
    paths = Paths(home or prefect_home())
    daemon = Daemon.read(paths)
    if daemon is None:
        return None
    with contextlib.suppress(OSError):
        _request(daemon.socket, {"op": "stop"})
    deadline = time.monotonic() + seconds
    while (process_alive(daemon.pid) or process_alive(daemon.server_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    _stop_leftovers(daemon)
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
    return daemon


def background_status(home: Path | None = None) -> tuple[Paths, Daemon | None]:
    paths = Paths(home or prefect_home())
    daemon = Daemon.read(paths)
    if daemon is not None and not daemon.running():
        daemon = None
    return paths, daemon


def _stop_leftovers(daemon: Daemon) -> None:
    """SIGKILL a daemon and server that are still there (a daemon killed without its handlers, say)."""
    for pid in (daemon.pid, daemon.server_pid):
        if process_alive(pid) and _is_ours(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(daemon.server_pid, signal.SIGKILL)  # the server's own children (its group)


def _is_ours(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"flows.background" in command or b"prefect" in command


# ------------------------------------------------------------------------------------------ the wire


def _connect(path: Path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        raise
    return connection


def _request(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    with _connect(path) as connection:
        connection.settimeout(10)
        _send(connection, message)
        return _receive(connection.makefile("rb"))


def _send(connection: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """A length, with ``fds`` attached, then the JSON body."""
    body = json.dumps(message).encode()
    header = struct.pack("!Q", len(body))
    if fds:
        socket.send_fds(connection, [header], fds)
    else:
        connection.sendall(header)
    connection.sendall(body)


def _receive_request(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    header, fds, _flags, _address = socket.recv_fds(connection, 8, 3)
    (size,) = struct.unpack("!Q", _read_exactly(connection, 8, header))
    return json.loads(_read_exactly(connection, size)), list(fds)


def _read_exactly(connection: socket.socket, size: int, start: bytes = b"") -> bytes:
    """``start`` and what follows it on ``connection`` up to ``size`` bytes; ConnectionError if cut short."""
    data = start
    while len(data) < size:
        more = connection.recv(min(size - len(data), 1 << 20))
        if not more:
            raise ConnectionError("request cut short")
        data += more
    return data


def _receive(reader: Any) -> dict[str, Any]:
    line = reader.readline()
    return json.loads(line) if line else {}


def _reply(connection: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(json.dumps(message).encode() + b"\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield



# ------------------------------------------------------------------------------------------ the daemon


class _Daemon:
    """The daemon's loop: accept requests, fork runs, reap them, stop when idle or told."""

    def __init__(self, paths: Paths, server_pid: int, api_url: str):
        self.paths = paths
        self.server_pid = server_pid
        self.api_url = api_url
        self.runs: dict[int, socket.socket] = {}
        self.leases: list[socket.socket] = []  # `longitudinal serve` processes using the server: never idle
        self.abandoned: set[int] = set()  # runs whose caller went away, sent SIGTERM
        self.last_active = time.monotonic()
        self.stopping = False

    def serve(self, code: str) -> None:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop_signal)
        signal.signal(signal.SIGINT, self._stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        socket_path = self.paths.socket
        socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)
        try:
            listener.bind(str(socket_path))
        finally:
            os.umask(old_mask)
        listener.listen(16)
        self._write_state(code=code, socket=str(socket_path))
        self.wake = (wake_read, wake_write)
        self.listener = listener
        print(f"ready: {self.api_url}, socket {socket_path}", flush=True)
        while not self.stopping:
            callers = [conn for pid, conn in self.runs.items() if pid not in self.abandoned]
            watched = [listener, wake_read, *self.leases, *callers]
            ready, _, _ = select.select(watched, [], [], min(10.0, idle_seconds() / 2))
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 4096)
            self._reap()
            for pid, connection in list(self.runs.items()):
                if connection in ready and pid not in self.abandoned:  # the caller is gone (killed): its run
                    self.abandoned.add(pid)                              # stops too, as it would in it
                    print(f"run {pid}: its caller is gone: stopping it", flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGTERM)
            for lease in [sock for sock in self.leases if sock in ready]:  # readable: its holder is gone
                self.leases.remove(lease)
                lease.close()
                self.last_active = time.monotonic()
            if listener in ready:
                self._accept()
            if not self.runs and not self.leases and time.monotonic() - self.last_active > idle_seconds():
                print(f"idle for {idle_seconds() / 60:g} minutes: stopping", flush=True)
                self.stopping = True
        self.shutdown()

    def _stop_signal(self, *_: object) -> None:
        self.stopping = True

    def _accept(self) -> None:
        connection, _ = self.listener.accept()
        connection.settimeout(10)
        try:
            request, fds = _receive_request(connection)
        except (OSError, ValueError) as exc:
            print(f"a request could not be read: {exc}", flush=True)
            connection.close()
            return
        self.last_active = time.monotonic()
        op = request.get("op")
        if op == "run" and len(fds) == 3:
            self._fork_run(connection, request, fds)
            return
        for fd in fds:
            os.close(fd)
        if op == "lease":
            _reply(connection, {"ok": True})
            connection.settimeout(None)
            self.leases.append(connection)
            return
        if op == "stop":
            _reply(connection, {"ok": True})
            self.stopping = True
        elif op == "reload":
            if self.runs:
                _reply(connection, {"busy": True})
            else:
                _reply(connection, {"ok": True})
                connection.close()
                self._reload(request.get("env") or dict(os.environ))
        else:
            _reply(connection, {"error": f"unknown request {op!r}"})
        connection.close()

    def _fork_run(self, connection: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the run: never returns
            _run_child(request, fds, close=[self.listener, connection, *self.runs.values(), *self.leases],
                       pipe=self.wake)
        for fd in fds:
            os.close(fd)
        connection.settimeout(None)
        self.runs[pid] = connection
        _reply(connection, {"pid": pid})
        print(f"run {pid}: {' '.join(request.get('argv', []))} (in {request.get('cwd')})", flush=True)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.server_pid:
                print(f"the Prefect server exited ({os.waitstatus_to_exitcode(status)}): stopping", flush=True)
                self.server_pid = -1
                self.stopping = True
                continue
            connection = self.runs.pop(pid, None)
            self.abandoned.discard(pid)
            self.last_active = time.monotonic()
            if connection is not None:
                code = os.waitstatus_to_exitcode(status)
                _reply(connection, {"exit": code if code >= 0 else 128 - code})
                connection.close()
                print(f"run {pid}: exit {code}", flush=True)

    def _write_state(self, **extra: Any) -> None:
        state = {"pid": os.getpid(), "server_pid": self.server_pid, "api_url": self.api_url,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        temporary = self.paths.state.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=1))
        os.replace(temporary, self.paths.state)

    def _reload(self, env: dict[str, str]) -> None:
        """Exec the daemon anew under ``env`` (new code or settings), keeping the server (a child, kept by exec)."""
        print("reloading: the code or the environment changed", flush=True)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        signal.set_wakeup_fd(-1)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-P", "-m", "flows.background", "--home", str(self.paths.home),
                                   "--server-pid", str(self.server_pid), "--api-url", self.api_url], env)

    def shutdown(self) -> None:
        for pid in list(self.runs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while self.runs and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        if self.server_pid > 0:
            stop_group(self.server_pid)
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.paths.state.unlink()
        print("stopped", flush=True)


def _run_child(request: dict[str, Any], fds: list[int], *, close: list[socket.socket], pipe: tuple[int, int]) -> None:
    """In the forked child: become the caller's ``longitudinal`` command, then exit without returning."""
    code: int = 1
    api_url = os.environ["PREFECT_API_URL"]
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sock in close:
            sock.close()
        for fd in pipe:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(_RUN_ENV, PREFECT_API_URL=api_url)
        # New text streams over the caller's descriptors (the daemon's were opened on its log file).
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace",
                                      line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace",
                                      line_buffering=True)
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)  # Prefect's console handler, bound to the caller's terminal
        from flows.cli import main

        sys.argv = ["longitudinal", *request["argv"]]
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 (a bug in this wrapper: shown, and the run fails)
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            import atexit

            atexit._run_exitfuncs()  # Prefect's log and event flushes, the run folder's last lines
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# What the daemon imports under and every run sees (set before Prefect is imported).
_RUN_ENV: dict[str, str] = {
    "LONGITUDINAL_WARM_CHILD": "1",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM": "ext://sys.stdout",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


def preload() -> None:
    """Import what a run uses, so that every fork starts warm. No threads may be left running: the
    daemon forks."""
    import importlib
    import pkgutil
    import threading

    import great_expectations  # noqa: F401 (2-5 s: the point of the daemon)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    for name in PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, f"{name}."):
            # this module (the daemon runs it as __main__) and the one whose import calls this function
            if module.name not in ("flows.background", "flows.preloaded") and not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    for name in RUN_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    if threading.active_count() != 1:
        names = ", ".join(thread.name for thread in threading.enumerate())
        raise RuntimeError(f"threads left running after the imports ({names}): forking would be unsafe")


def daemon_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.background")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--api-url")
    args = parser.parse_args(argv)
    paths = Paths(args.home)
    paths.folder.mkdir(parents=True, exist_ok=True)
    code = code_fingerprint(dict(os.environ))  # of the caller's environment, before the run's settings
    os.environ["PREFECT_HOME"] = str(args.home)
    daemon = None
    try:
        if args.server_pid and args.api_url and process_alive(args.server_pid):
            server_pid, api_url = args.server_pid, args.api_url
        else:  # its own process group, its output in this daemon's log
            server_env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
            server = start_prefect_server(server_env, log=paths.log, cwd=paths.folder, seconds=STARTUP_SECONDS)
            server_pid, api_url = server.process.pid, server.api_url
        daemon = _Daemon(paths, server_pid, api_url)
        daemon._write_state(code="starting", socket="")
        os.environ.update(_RUN_ENV)
        os.environ["PREFECT_API_URL"] = api_url
        started = time.monotonic()
        preload()
        print(f"imports: {time.monotonic() - started:.1f} s", flush=True)
        daemon.serve(code)
        return 0
    except BaseException as exc:  # noqa: BLE001 (written where the waiting caller reads it, then stop)
        print(f"failed: {type(exc).__name__}: {exc}", flush=True)
        with contextlib.suppress(OSError):
            paths.state.write_text(json.dumps({"failed": f"{type(exc).__name__}: {exc}"}))
        if daemon is not None and daemon.server_pid > 0:
            stop_group(daemon.server_pid)
        return 1


if __name__ == "__main__":
    sys.exit(daemon_main(sys.argv[1:]))
