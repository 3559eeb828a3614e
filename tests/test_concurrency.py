"""Two runs of one study at once: they run one after the other, and neither corrupts the other's output.

The run lock (an ``flock`` taken by ``start_run``, released by ``publish_run``/``discard_run``) is what
serializes them. The end-to-end test makes the race certain rather than likely: it holds the study's lock
itself until both ``longitudinal run`` processes are waiting for it, then lets them go at the same moment.
Both runs use the test session's Prefect server (two embedded servers starting at once on a new Prefect
home race on its database migrations: a Prefect matter, outside the run lock).
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from longitudinal.reporting.run_folder import discard_run, publish_run, run_lock_path, start_run
from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

pytest.register_assert_rewrite("prefect_server")
from prefect_server import PrefectServer, quiet_prefect_env  # noqa: E402

pytest_plugins = ["prefect_server"]

ROOT = Path(__file__).resolve().parents[1]
RUN_SECONDS = 300
WAITING = "another run of race-trial is in progress"
CONTRACT = {"report.html", "figures", "model_comparison.csv", "selected_model.json", "validation.json",
            "quarantine.csv", "data.parquet", "manifest.json"}


@pytest.mark.slow
def test_two_runs_started_at_once_run_one_after_the_other(tmp_path: Path, prefect_server: PrefectServer,
                                                          prefect_client: Any) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "study": "race-trial",
        "data": {"source": "landing", "subject": "patient_id", "time": "week", "outcome": "score"},
        "validation": {"min_observations_per_subject": 2, "outcome_range": [0, 100]},
        "models": {"candidates": {"ri": "score ~ week * arm + (1 | patient_id)"}},
        "output": {"directory": "reports"},
    }, sort_keys=False))
    write_table(simulate_trial(SimulationSpec(n_subjects=12, min_visits=4, max_visits=6, seed=5)),
                tmp_path / "landing" / "arrival.csv")
    study_dir = tmp_path / "reports" / "race-trial"
    study_dir.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    env = quiet_prefect_env(home, api_url=prefect_server.api_url)
    logs = [tmp_path / f"run-{i}.log" for i in (1, 2)]

    with run_lock_path(study_dir).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = [
            subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
                stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
            )
            for log in logs
        ]
        try:
            _wait_until(lambda: all(WAITING in log.read_text() for log in logs), logs)
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)  # both waiting: let them race for the lock
        codes = [run.wait(timeout=RUN_SECONDS) for run in runs]

    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    folders = [Path(log.read_text().strip().splitlines()[-1]) for log in logs]
    manifests = [_complete_run(folder) for folder in folders]
    assert folders[0] != folders[1]
    assert manifests[0]["inputs"] == manifests[1]["inputs"] == [
        {"path": "landing/arrival.csv", "sha256": manifests[0]["inputs"][0]["sha256"], "rows": manifests[0]["rows"]["read"]},
    ]
    published_last = max(folders, key=lambda f: (f / "manifest.json").stat().st_mtime_ns)
    assert (study_dir / "latest").resolve() == published_last.resolve()
    registry = json.loads((study_dir / "curated" / "registry.json").read_text())
    assert [e["path"] for e in registry["files"]] == ["landing/arrival.csv"]
    assert sorted(p.name for p in study_dir.iterdir()) == sorted(["curated", "latest", *(f.name for f in folders)])
    # With PREFECT_API_URL set, `longitudinal run` records its run on that server (README, "Prefect"), named
    # after its study and the data it saw: "<study>: <newest file> @ <UTC time>".
    for manifest in manifests:
        flow_run = prefect_client.read_flow_run(manifest["prefect_flow_run_id"])
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        assert re.fullmatch(r"race-trial: arrival\.csv @ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", flow_run.name), flow_run.name


def _complete_run(folder: Path) -> dict:
    assert CONTRACT <= {p.name for p in folder.iterdir()}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["run_id"] == folder.name
    assert manifest["rows"]["read"] == manifest["rows"]["analysed"] + manifest["rows"]["quarantined"]
    assert len(pd.read_parquet(folder / "data.parquet")) == manifest["rows"]["analysed"]
    return manifest


def _wait_until(condition, logs: list[Path], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the runs did not both wait for the run lock:\n" + "\n".join(
                log.read_text()[-2000:] for log in logs))
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------- unit level


def test_a_second_run_waits_until_the_first_publishes_and_keeps_its_run(tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    first = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from pathlib import Path; from longitudinal.reporting.run_folder import publish_run, start_run; "
            f"s = start_run(Path({str(study_dir)!r}), 'r1'); print(s, flush=True); sys.stdin.readline(); "
            "(s / 'report.html').write_text('one'); publish_run(s, 'r1')"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert first.stdout.readline().strip() == str(study_dir / ".staging-r1")
    started: list[Path] = []
    second = threading.Thread(target=lambda: started.append(start_run(study_dir, "r2")))
    second.start()
    second.join(timeout=1.0)
    assert started == [] and (study_dir / ".staging-r1").is_dir()  # waiting, and the first run untouched

    first.communicate("go\n", timeout=30)
    second.join(timeout=30)

    assert started == [study_dir / ".staging-r2"]
    assert (study_dir / "latest" / "report.html").read_text() == "one"
    publish_run(started[0], "r2")
    assert (study_dir / "latest").resolve().name == "r2"
    assert sorted(p.name for p in study_dir.iterdir()) == ["latest", "r1", "r2"]


def test_a_discarded_run_releases_the_lock(tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    discard_run(start_run(study_dir, "r1"))
    with run_lock_path(study_dir).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
