"""Crash safety: a run killed at any point leaves the previous run, the landed files and the curated data
intact, and the next run completes normally.

Fault injection without hooks in production code: a small wrapper script (written below, run as a
subprocess in a new session) replaces one library function with a SIGKILL of its whole process group,
the embedded Prefect server included, then calls the command line. Each case lands a new data file (so
the killed run has something to ingest and no cached fit to reuse), kills a run at one point, checks
what is left, then runs again and checks that the run completes and moves ``latest``.

Every run uses the test session's Prefect server, which saves the 10-20 s of an embedded server's
start-up per run, except the run killed during ingestion: it starts the embedded server a user's
``longitudinal run`` starts, to check that killing the run's process group leaves no server behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from longitudinal.reporting.run_folder import discard_run, publish_run, read_needs_run, remove_stale_runs, start_run
from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

pytest.register_assert_rewrite("prefect_server")
from prefect_server import PrefectServer, quiet_prefect_env  # noqa: E402

pytest_plugins = ["prefect_server"]

ROOT = Path(__file__).resolve().parents[1]
RUN_SECONDS = 300
CONTRACT = {"report.html", "figures", "model_comparison.csv", "selected_model.json", "validation.json",
            "quarantine.csv", "data.parquet", "manifest.json"}

WRAPPER = '''\
"""Run the command line with one library function replaced by a SIGKILL of this process group."""
import importlib
import os
import signal
import sys

POINTS = {
    "ingest": ("longitudinal.data.curation", "_save"),              # parts written, registry not yet
    "fit": ("longitudinal.fit.candidate", "fit_candidate"),         # in a worker thread of the fit subflow
    "report": ("longitudinal.reporting.html", "render_report"),     # data files and figures written, report not
    "publish": ("longitudinal.reporting.run_folder", "publish_run"),  # manifest written, not yet renamed
}

point, *argv = sys.argv[1:]
module, name = POINTS[point]


def kill(*args, **kwargs):
    os.killpg(os.getpgid(0), signal.SIGKILL)


# Before flows.cli imports the flow, so the tasks' `from ... import name` binds the replacement.
setattr(importlib.import_module(module), name, kill)
from flows.cli import main

code = main(argv)
print(f"the kill point {point} was never reached (exit code {code})", file=sys.stderr)
sys.exit(3)
'''


@dataclass(frozen=True)
class Study:
    config: Path
    landing: Path
    study_dir: Path
    home: Path
    marker: str


def land(study: Study, name: str, seed: int) -> Path:
    """A new data file in the landing folder: 12 new subjects (ids prefixed by ``name``)."""
    frame = simulate_trial(SimulationSpec(n_subjects=12, min_visits=4, max_visits=6, seed=seed))
    frame = frame.assign(patient_id=name + "-" + frame["patient_id"].astype(str))
    return write_table(frame, study.landing / f"{name}.csv")


def run(study: Study, server: PrefectServer) -> Path:
    """A run that must complete (against the session's Prefect server); returns the run folder it printed."""
    env = quiet_prefect_env(study.home, api_url=server.api_url)
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(study.config)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=RUN_SECONDS, start_new_session=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def run_killed(study: Study, point: str, tmp_path: Path, server: PrefectServer | None) -> None:
    """A run killed at ``point`` (with an embedded Prefect server when ``server`` is None); asserts that
    no process of it survives."""
    wrapper = tmp_path / "kill_at.py"
    wrapper.write_text(WRAPPER)
    env = quiet_prefect_env(study.home, api_url=server.api_url if server else None)
    env["CRASH_TEST_MARKER"] = study.marker
    process = subprocess.Popen(
        [sys.executable, str(wrapper), point, "run", "--config", str(study.config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_SECONDS)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, stdout[-3000:] + stderr[-3000:]
    # The CLI's reaper (its own session, same environment) outlives the run by design, for the moment it
    # takes to stop the embedded server; give it that moment, then nothing of the run may be left.
    deadline = time.monotonic() + 10
    while survivors(session=process.pid, marker=study.marker) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert survivors(session=process.pid, marker=study.marker) == []


def survivors(*, session: int, marker: str) -> list[str]:
    """Live processes (zombies aside) of the killed run's session or carrying its environment marker."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True, check=True)
    alive = []
    for line in listing.stdout.splitlines():
        pid, sid, stat, *args = line.split(None, 3)
        if stat.startswith("Z"):
            continue
        if int(sid) == session or _has_marker(int(pid), marker):
            alive.append(line.strip())
    return alive


def _has_marker(pid: int, marker: str) -> bool:
    try:
        return f"CRASH_TEST_MARKER={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def snapshot(study: Study) -> dict[str, Any]:
    """What a killed run must leave as it was: ``latest`` and its files, the landed files, the registry."""
    latest = (study.study_dir / "latest").resolve()
    registry = study.study_dir / "curated" / "registry.json"
    return {
        "latest": latest,
        "latest_files": {p.relative_to(latest): _sha(p) for p in latest.rglob("*") if p.is_file()},
        "landed": {p.name: _sha(p) for p in study.landing.iterdir()},
        "registry": json.loads(registry.read_text()) if registry.exists() else {"files": []},
    }


def assert_complete_run(folder: Path) -> dict[str, Any]:
    """Every contract file present and a manifest that names this run and accounts for every row."""
    assert CONTRACT <= {p.name for p in folder.iterdir()}, sorted(p.name for p in folder.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["run_id"] == folder.name
    rows = manifest["rows"]
    assert rows["read"] == rows["analysed"] + rows["quarantined"] > 0
    assert len(pd.read_parquet(folder / "data.parquet")) == rows["analysed"]
    assert pd.read_csv(folder / "model_comparison.csv")["selected"].sum() == 1
    return manifest


def assert_curated_consistent(study: Study) -> list[dict[str, Any]]:
    """Every registry entry has its part, with the rows the entry records."""
    curated = study.study_dir / "curated"
    entries = json.loads((curated / "registry.json").read_text())["files"]
    for entry in entries:
        part = curated / "parts" / f"{entry['sha256']}.parquet"
        assert part.is_file(), f"registry lists {entry['path']} but {part} is missing"
        assert len(pd.read_parquet(part)) == entry["rows"]
    return entries


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_folders(study_dir: Path) -> set[str]:
    return {p.name for p in study_dir.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name not in {"curated", "validations"}}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, prefect_server: PrefectServer) -> Study:
    """A study with a landing folder and one successful run; shared by the kill points."""
    folder = tmp_path_factory.mktemp("crash")
    document = {
        "study": "crash-trial",
        "data": {"source": "landing", "subject": "patient_id", "time": "week", "outcome": "score",
                 "categorical": ["site"]},
        "validation": {"min_observations_per_subject": 2, "outcome_range": [0, 100]},
        "models": {"criterion": "bic", "candidates": {
            "ri": "score ~ week * arm + (1 | patient_id)",
            "ris": "score ~ week * arm + (week | patient_id)",
        }},
        "output": {"directory": "reports"},
    }
    config = folder / "study.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    (folder / "landing").mkdir()
    (folder / "home").mkdir()
    created = Study(config=config, landing=folder / "landing", study_dir=folder / "reports" / "crash-trial",
                    home=folder / "home", marker=folder.name)
    land(created, "first", seed=1)
    assert_complete_run(run(created, prefect_server))
    return created


@pytest.mark.slow
@pytest.mark.parametrize("seed, point, embedded", [
    (11, "ingest", True), (12, "fit", False), (13, "report", False), (14, "publish", False),
])
def test_a_killed_run_leaves_everything_intact_and_the_next_run_completes(
    study: Study, prefect_server: PrefectServer, tmp_path: Path, point: str, seed: int, embedded: bool,
) -> None:
    new = land(study, f"killed-at-{point}", seed=seed)
    before = snapshot(study)
    runs_before = _run_folders(study.study_dir)

    run_killed(study, point, tmp_path, None if embedded else prefect_server)

    after = snapshot(study)
    assert after["latest"] == before["latest"]
    assert after["latest_files"] == before["latest_files"]
    assert after["landed"] == before["landed"]
    assert _run_folders(study.study_dir) == runs_before  # no new run folder, half-written or whole
    entries = assert_curated_consistent(study)
    added = [e["path"] for e in entries[len(before["registry"]["files"]):]]
    assert entries[:len(before["registry"]["files"])] == before["registry"]["files"]
    assert added in ([], [f"landing/{new.name}"])  # unchanged, or the new file complete
    assert added == ([] if point == "ingest" else [f"landing/{new.name}"])
    assert read_needs_run(study.study_dir) is not None  # what the killed run registered awaits a run

    published = run(study, prefect_server)
    assert read_needs_run(study.study_dir) is None

    assert (study.study_dir / "latest").resolve() == published.resolve() != before["latest"]
    manifest = assert_complete_run(published)
    assert f"landing/{new.name}" in {f["path"] for f in manifest["inputs"]}
    assert [e["path"] for e in assert_curated_consistent(study)].count(f"landing/{new.name}") == 1
    leftovers = [p.name for p in study.study_dir.iterdir() if p.name.startswith((".staging-", ".latest-"))]
    assert leftovers == []
    assert not list((study.study_dir / "curated").rglob("*.tmp"))


# ------------------------------------------------------------------------------- stale staging, unit level


def test_a_killed_runs_staging_is_removed_by_the_next_run(tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    publish_run(start_run(study_dir, "r1"), "r1")
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from longitudinal.reporting.run_folder import start_run; "
            f"s = start_run(Path({str(study_dir)!r}), 'r2'); (s / 'report.html').write_text('half'); "
            "print(s, flush=True); time.sleep(600)"
        )],
        stdout=subprocess.PIPE, text=True,
    )
    staging = Path(holder.stdout.readline().strip())
    (study_dir / ".latest-r2").symlink_to("r2")  # as if killed between the two steps of a publish
    holder.kill()
    holder.wait()

    third = start_run(study_dir, "r3")

    assert not staging.exists()
    assert sorted(p.name for p in study_dir.iterdir()) == [".staging-r3", "latest", "r1"]
    assert (study_dir / "latest").resolve().name == "r1"
    discard_run(third)


def test_stale_cleanup_keeps_runs_latest_and_curated_data(tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    publish_run(start_run(study_dir, "r1"), "r1")
    (study_dir / "curated").mkdir()
    (study_dir / ".staging-r0" / "figures").mkdir(parents=True)
    removed = remove_stale_runs(study_dir)
    assert [p.name for p in removed] == [".staging-r0"]
    assert sorted(p.name for p in study_dir.iterdir()) == ["curated", "latest", "r1"]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in task.read_text().split()]
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_the_embedded_server_does_not_outlive_a_killed_run(tmp_path: Path, copy_example_study) -> None:
    """SIGKILL of the run process alone (not its group) still stops Prefect's embedded server."""

    config = copy_example_study(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    server = None
    try:
        deadline = time.monotonic() + 120
        while server is None and time.monotonic() < deadline and run.poll() is None:
            for child in _children(run.pid):
                if "uvicorn" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    server = child
            time.sleep(0.2)
        assert server is not None, "the run's embedded Prefect server was not seen"
        time.sleep(1.0)  # the reaper notes new server children every 0.3 s: a kill within that window can miss
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 30
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _running(server), "the embedded server outlived the killed run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        if server is not None and _running(server):
            os.kill(server, signal.SIGKILL)


REAPED_PARENT = '''\
import subprocess, sys, time
from flows.embedded_server import stop_servers_with_this_process

reaper = stop_servers_with_this_process()
server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "uvicorn"])
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "not-a-server"])
print(reaper.pid, server.pid, other.pid, flush=True)
time.sleep(300)
'''


def test_the_reaper_stops_only_the_server_children_of_a_killed_process() -> None:
    """The reaper alone, without Prefect: SIGKILL of a process leaves no uvicorn child of it running, spares
    its other children, and the reaper itself exits."""
    parent = subprocess.Popen([sys.executable, "-c", REAPED_PARENT], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              start_new_session=True)
    reaper = server = other = None
    try:
        reaper, server, other = (int(pid) for pid in parent.stdout.readline().split())  # type: ignore[union-attr]
        time.sleep(1.0)  # the reaper notes new server children every 0.3 s
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while (_running(server) or _running(reaper)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server), "the server child outlived its killed parent"
        assert not _running(reaper), "the reaper outlived the process it watched"
        assert _running(other), "the reaper stopped a child that is not a Prefect server"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        for pid in (reaper, server, other):
            if pid is not None and _running(pid):
                os.kill(pid, signal.SIGKILL)
