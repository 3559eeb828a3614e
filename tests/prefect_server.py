"""A real Prefect server for the integration tests, and `longitudinal serve` running against it.

Loaded as a pytest plugin (``pytest_plugins = ["prefect_server"]`` in the test modules that use it), so
its session fixtures exist once per test session and are shared by test_serve.py and test_ui.py: one
server start (10-20 s) and one served study for both.

Every process started here runs in its own process group and is stopped with its whole group
(SIGTERM, then SIGKILL after a grace period) when the session ends, so no server, uvicorn worker,
serve process or flow-run subprocess outlives the tests. Server and serve output go to log files in
the session's tmp folder; a test that times out shows their tails.

Starting the server and the process groups is ``flows/local_server.py``, shared with the benchmark's
``--server`` mode; this module adds what only pytest needs (fixtures, ``wait_for`` failing the test, the
served study) and re-exports the shared names the test modules import from here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from flows.local_server import (  # noqa: F401  (re-exported: the test modules import them from here)
    BIN,
    SERVER_STARTUP_SECONDS,
    PrefectServer,
    ServerDidNotStart,
    find_free_port,
    log_tail,
    quiet_prefect_env,
    start_group,
    start_prefect_server,
    stop_group,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "config" / "example.yaml"

STUDY = "served-trial"
DEPLOYMENT = f"longitudinal-study/{STUDY}"
CRON = "0 6 * * *"
TIMEZONE = "Europe/Oslo"
RUN_SECONDS = 120.0

T = TypeVar("T")


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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` (SQLite, UI, scheduler, triggers) on a free loopback port, its own home."""
    folder = tmp_path_factory.mktemp("prefect-server")
    home = folder / "home"
    home.mkdir()
    try:
        server = start_prefect_server(quiet_prefect_env(home), log=folder / "server.log", cwd=folder, ui=True,
                                      seconds=SERVER_STARTUP_SECONDS)
    except ServerDidNotStart as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


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
