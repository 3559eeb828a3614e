"""Prefect's embedded server for ``longitudinal run``: started once under a lock, never left orphaned.

Without ``PREFECT_API_URL`` a flow run starts a temporary local server in a subprocess. Two runs
starting at once on a new Prefect home race on its database migrations, so the start takes a lock on
the home. And if the run process dies without running its exit handlers (SIGKILL, the out-of-memory
killer), that server would outlive it, orphaned, for ever: a reaper process, started before the server,
notes the run's server children as they appear and stops them once the run is gone.

Only the standard library at import time: the reaper runs this module (``python -P -m
flows.embedded_server PID``) and must start in milliseconds; Prefect is imported by the start alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.local_server import process_alive

REAPER_POLL_SECONDS = 0.3


def start_embedded_server_once() -> None:
    """Start Prefect's embedded server under a lock on the Prefect home, with a reaper watching this process.

    The flow's client then reuses this server (a per-process singleton). Nothing to do with a server
    named by PREFECT_API_URL.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    stop_servers_with_this_process()
    with (home / ".longitudinal-server.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        SubprocessASGIServer().start()


def stop_servers_with_this_process() -> subprocess.Popen[bytes]:
    """Start the reaper of this process's Prefect server children, in its own session.

    ``-P`` keeps the working folder off ``sys.path``: a user's own ``flows/`` folder there must not
    stand in for this module. ``PYTHONPATH`` is honoured, so a benchmarked snapshot reaps with its own code.
    """
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "flows.embedded_server", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def reap_servers_of(parent: int) -> None:
    """While ``parent`` lives, note its uvicorn (Prefect server) children; once it is gone, SIGTERM them."""
    seen: set[int] = set()
    while process_alive(parent):
        try:
            seen |= _server_children(parent)
        except OSError:
            pass
        time.sleep(REAPER_POLL_SECONDS)
    for pid in seen:
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError):  # gone between the check and the signal
                os.kill(pid, signal.SIGTERM)



def _server_children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            try:
                if int(child) != os.getpid() and b"uvicorn" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(int(child))
            except OSError:
                pass
    return found


if __name__ == "__main__":
    reap_servers_of(int(sys.argv[1]))
