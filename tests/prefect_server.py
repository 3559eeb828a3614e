"""A real Prefect server for the integration tests, and `longitudinal serve` running against it.

Loaded as a pytest plugin (``pytest_plugins = ["prefect_server"]`` in the test modules that use it), so
its session fixtures exist once per test session and are shared by test_serve.py and test_ui.py: one
server start (10-20 s) and one served study for both.

Every process started here runs in its own process group and is stopped with its whole group
(SIGTERM, then SIGKILL after a grace period) when the session ends, so no server, uvicorn worker,
serve process or flow-run subprocess outlives the tests. Server and serve output go to log files in
the session's tmp folder; a test that times out shows their tails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLE_CONFIG = ROOT / "config" / "example.yaml"

STUDY = "served-trial"
DEPLOYMENT = f"longitudinal-study/{STUDY}"
CRON = "0 6 * * *"
TIMEZONE = "Europe/Oslo"
SERVER_STARTUP_SECONDS = 90.0
RUN_SECONDS = 120.0

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ processes


def find_free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it; released before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quiet_prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a Prefect process of the tests: its own home, no telemetry, no user profile."""
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


def start_group(command: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new process group, its output appended to ``log``."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[bytes], *, grace_seconds: float = 20.0) -> None:
    """Stop ``process`` and every process of its group: SIGTERM, then SIGKILL after ``grace_seconds``.

    The group is signalled even when the leader has already exited, since its children (uvicorn,
    a flow-run subprocess) may still be alive.
    """
    group = process.pid
    _signal_group(group, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace_seconds
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(group):
        _signal_group(group, signal.SIGKILL)
        process.wait(timeout=10)


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


def wait_for(probe: Callable[[], T | None], *, seconds: float, every: float = 1.0, what: str,
              logs: tuple[Path, ...] = ()) -> T:
    """Call ``probe`` until it returns something other than None (or False); fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds:.0f} s\n" + "\n".join(log_tail(p) for p in logs))
        time.sleep(every)


# ------------------------------------------------------------------------------------------ the server


@dataclass(frozen=True)
class PrefectServer:
    """A running ``prefect server start``: where its API and UI are, and its home and log."""

    api_url: str
    ui_url: str
    home: Path
    log: Path


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` (SQLite, UI, scheduler, triggers) on a free loopback port, its own home."""
    folder = tmp_path_factory.mktemp("prefect-server")
    home = folder / "home"
    home.mkdir()
    port = find_free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = quiet_prefect_env(home)
    env["PREFECT_SERVER_UI_API_URL"] = api_url  # or the UI calls port 4200
    log = folder / "server.log"
    process = start_group(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        env=env, log=log, cwd=folder,
    )
    try:
        wait_for(
            lambda: _healthy(api_url) or (process.poll() is not None and pytest.fail(
                f"prefect server exited with {process.returncode}\n{log_tail(log)}")),
            seconds=SERVER_STARTUP_SECONDS, every=0.5, what="the Prefect server's /api/health", logs=(log,),
        )
        yield PrefectServer(api_url=api_url, ui_url=f"http://127.0.0.1:{port}", home=home, log=log)
    finally:
        stop_group(process)


@pytest.fixture(scope="session")
def prefect_client(prefect_server: PrefectServer) -> Iterator[Any]:
    """A synchronous Prefect client of the test server (and this process's settings pointed at it)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = prefect_server.home.parent / "client-home"
    home.mkdir(exist_ok=True)
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url, PREFECT_HOME: str(home)}):
        with get_client(sync_client=True) as client:
            yield client
        _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send this process's queued logs and events while the server still runs.

    Otherwise Prefect sends them at interpreter exit, to a server already stopped, and retries for a
    minute or more ("Error logging to API"). prefect_test_harness does the same before it stops.
    """
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            logs: Any = APILogWorker.instance().drain()
            if inspect.isawaitable(logs):
                await logs
        except RuntimeError:  # never started: nothing was logged to the API
            pass
        events: Any = EventsWorker.drain_all()
        if inspect.isawaitable(events):
            await events

    run_coro_as_sync(drain())


# ------------------------------------------------------------------------------------- the served study


def write_trial(path: Path, *, subjects: int, seed: int, prefix: str = "") -> int:
    """A simulated trial as CSV (patient ids prefixed by ``prefix``); returns its number of rows."""
    from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

    frame = simulate_trial(SimulationSpec(n_subjects=subjects, min_visits=3, max_visits=6, seed=seed))
    frame = frame.assign(patient_id=prefix + frame["patient_id"].astype(str))
    # Written aside and renamed in, as a site's export would be moved into place once complete.
    aside = path.parent / f".partial-{path.name}"
    write_table(frame, aside)
    os.replace(aside, path)
    return len(frame)


def write_study_config(folder: Path) -> Path:
    """A study config whose data.source is the landing folder ``incoming/``, with a cron schedule."""
    example = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    document = {
        "study": STUDY,
        "data": {**example["data"], "source": "incoming"},
        "validation": example["validation"],
        "models": {**example["models"], "candidates": example["models"]["candidates"]},
        "output": {"directory": "reports"},
        "schedule": {"cron": CRON, "timezone": TIMEZONE},
    }
    (folder / "incoming").mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class ServedStudy:
    """``longitudinal serve`` of one study running against the test server."""

    config: Path
    landing: Path
    reports: Path
    log: Path
    process: subprocess.Popen[bytes]
    deployment_id: Any


@pytest.fixture(scope="session")
def served_study(prefect_server: PrefectServer, prefect_client: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedStudy]:
    """``longitudinal serve --config study.yaml`` running, its deployment registered on the server."""
    folder = tmp_path_factory.mktemp("served-study")
    config = write_study_config(folder)
    home = folder / "serve-home"
    home.mkdir()
    log = folder / "serve.log"
    process = start_group(
        [str(BIN / "longitudinal"), "serve", "--config", str(config), "--settle-seconds", "1",
         "--rescan-seconds", "5"],
        env=quiet_prefect_env(home, prefect_server.api_url), log=log, cwd=folder,
    )
    try:
        def deployment() -> Any:
            if process.poll() is not None:
                pytest.fail(f"longitudinal serve exited with {process.returncode}\n{log_tail(log)}")
            from prefect.exceptions import ObjectNotFound

            try:
                return prefect_client.read_deployment_by_name(DEPLOYMENT)
            except ObjectNotFound:
                return None

        found = wait_for(deployment, seconds=90, what=f"deployment {DEPLOYMENT!r}", logs=(log, prefect_server.log))
        yield ServedStudy(config=config, landing=folder / "incoming", reports=folder / "reports" / STUDY,
                          log=log, process=process, deployment_id=found.id)
    finally:
        stop_group(process)


def triggered_runs(client: Any, deployment_id: Any) -> list[Any]:
    """The deployment's flow runs not created by its cron schedule (i.e. by the arrival trigger)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return sorted((run for run in runs if not run.auto_scheduled), key=lambda run: run.created)


def wait_for_new_final_run(study: ServedStudy, client: Any, known: set[Any], *,
                           seconds: float = RUN_SECONDS) -> Any:
    """The first triggered run not in ``known`` once it reaches a final state (fails the test on timeout)."""

    def final_run() -> Any:
        if study.process.poll() is not None:
            pytest.fail(f"longitudinal serve exited with {study.process.returncode}\n{log_tail(study.log)}")
        fresh = [run for run in triggered_runs(client, study.deployment_id) if run.id not in known]
        if fresh and fresh[0].state is not None and fresh[0].state.is_final():
            return fresh[0]
        return None

    return wait_for(final_run, seconds=seconds, what="a new flow run of the served deployment reaching a final "
                    "state", logs=(study.log,))


def run_folder(study: ServedStudy, flow_run_id: Any) -> Path:
    """The run folder whose manifest names ``flow_run_id``."""
    import json

    for manifest in sorted(study.reports.glob("*/manifest.json")):
        if manifest.parent.is_symlink():  # "latest"
            continue
        if json.loads(manifest.read_text(encoding="utf-8")).get("prefect_flow_run_id") == str(flow_run_id):
            return manifest.parent
    raise AssertionError(f"no run folder under {study.reports} names flow run {flow_run_id}: "
                         f"{sorted(p.name for p in study.reports.iterdir()) if study.reports.exists() else []}")


@dataclass(frozen=True)
class CompletedRun:
    """The first triggered run of the served study: the flow run (from the API) and its run folder."""

    flow_run: Any
    folder: Path
    rows: int


@pytest.fixture(scope="session")
def first_run(served_study: ServedStudy, prefect_client: Any) -> CompletedRun:
    """Drop the first simulated export into the landing folder; the run it triggers, once final."""
    known = {run.id for run in triggered_runs(prefect_client, served_study.deployment_id)}
    rows = write_trial(served_study.landing / "site-a.csv", subjects=60, seed=1, prefix="A-")
    flow_run = wait_for_new_final_run(served_study, prefect_client, known)
    assert flow_run.state.is_completed(), (
        f"flow run {flow_run.name!r} ended {flow_run.state.type.value}: {flow_run.state.message}\n"
        + log_tail(served_study.log, 80)
    )
    return CompletedRun(flow_run=flow_run, folder=run_folder(served_study, flow_run.id), rows=rows)


def copy_into(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` aside then rename, so the watcher sees only the complete file."""
    aside = target.parent / f".partial-{target.name}"
    shutil.copyfile(source, aside)
    os.replace(aside, target)
