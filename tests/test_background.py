"""`longitudinal run`'s background Prefect server and warm process, as a user meets them.

One Prefect home for the module: the first run starts the server and the warm process, later runs reuse
them (their flow runs are on that server, so in its UI), exit codes and Ctrl-C pass through, a changed
environment reloads the warm process but keeps the server, and `longitudinal server stop` leaves nothing.
The rest of the suite runs with LONGITUDINAL_BACKGROUND=off (conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.background import Daemon, Paths, configured_api_url
from flows.local_server import process_alive, quiet_prefect_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@dataclass
class Home:
    path: Path
    env: dict[str, str]
    study: Path

    def run(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "longitudinal"), *args], capture_output=True, text=True, timeout=300,
                              env={**self.env, **(extra_env or {})}, cwd=self.study.parent)

    def daemon(self) -> Daemon:
        daemon = Daemon.read(Paths(self.path))
        assert daemon is not None, "no background.json"
        return daemon



@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, copy_example_study) -> Iterator[Home]:
    folder = tmp_path_factory.mktemp("background")
    prefect_home = folder / "prefect-home"
    prefect_home.mkdir()
    env = quiet_prefect_env(prefect_home)
    env.update(LONGITUDINAL_BACKGROUND="on", LONGITUDINAL_BACKGROUND_IDLE_MINUTES="15")
    state = Home(path=prefect_home, env=env, study=copy_example_study(folder / "study"))
    try:
        yield state
    finally:
        subprocess.run([str(BIN / "longitudinal"), "server", "stop"], env=env, capture_output=True, timeout=120)
        leftover = Daemon.read(Paths(prefect_home))
        if leftover is not None:  # a failed stop must not leave processes behind
            for pid in (leftover.pid, leftover.server_pid):
                if process_alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return list(json.loads(response.read()))


def test_the_first_run_starts_a_server_that_later_runs_reuse_and_show_in_its_ui(home: Home) -> None:
    first = home.run("run", "--config", str(home.study))
    assert first.returncode == 0, first.stderr
    assert "starting a background Prefect server" in first.stdout
    assert (Path(first.stdout.strip().splitlines()[-1]) / "report.html").exists()
    daemon = home.daemon()
    status = home.run("server", "status")
    assert daemon.ui_url in status.stdout

    # A changed candidate: the second run fits again, in the same warm process and against the same server.
    text = home.study.read_text().replace("(week || patient_id)", "(1 | patient_id) + (0 + week | patient_id)")
    assert text != home.study.read_text()
    home.study.write_text(text)
    second = home.run("run", "--config", str(home.study))
    assert second.returncode == 0, second.stderr
    assert "starting a background Prefect server" not in second.stdout
    assert f"View at {daemon.ui_url}/" in second.stdout  # Prefect's link to the run in the server's UI
    folder = Path(second.stdout.strip().splitlines()[-1])
    assert (folder / "report.html").exists()
    assert home.daemon() == daemon
    runs = {run["id"]: run["state_type"] for run in _flow_runs(daemon.api_url)}
    assert list(runs.values()) == ["COMPLETED", "COMPLETED"]
    assert json.loads((folder / "manifest.json").read_text())["prefect_flow_run_id"] in runs


def test_errors_and_exit_codes_come_through_as_from_a_run_in_the_caller(home: Home, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(home.study.read_text().replace("models:", "modles:"))
    config_error = home.run("run", "--config", str(bad))
    assert config_error.returncode == 2
    [line] = config_error.stderr.strip().splitlines()
    assert line.startswith("longitudinal run: error: ") and "unknown key 'modles'" in line

    no_data = tmp_path / "no-data.yaml"
    no_data.write_text(home.study.read_text().replace("trial.csv", "missing.csv"))
    data_error = home.run("run", "--config", str(no_data))
    assert data_error.returncode == 1
    assert "missing.csv" in data_error.stderr.strip().splitlines()[-1]
    assert "Traceback" not in config_error.stderr + data_error.stderr


def test_ctrl_c_stops_the_run_in_the_warm_process(home: Home) -> None:
    process = subprocess.Popen([str(BIN / "longitudinal"), "run", "--config", str(home.study)], env=home.env,
                               cwd=home.study.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "Beginning flow run" in line:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "longitudinal run: interrupted" in stderr


def test_a_changed_environment_reloads_the_warm_process_and_keeps_the_server(home: Home) -> None:
    before = home.daemon()
    result = home.run("run", "--config", str(home.study), extra_env={"PYTHONWARNINGS": "ignore::DeprecationWarning"})
    assert result.returncode == 0, result.stderr
    after = home.daemon()
    assert (after.pid, after.server_pid, after.api_url) == (before.pid, before.server_pid, before.api_url)
    assert after.code != before.code
    assert "reloading" in Paths(home.path).log.read_text()


def test_serve_without_a_server_of_its_own_uses_the_background_server(home: Home, tmp_path: Path) -> None:
    from flows.local_server import start_group, stop_group

    daemon = home.daemon()
    landing = tmp_path / "incoming"
    landing.mkdir()
    import yaml

    document = yaml.safe_load(home.study.read_text())
    document["study"] = "served-trial"
    document["data"]["source"] = str(landing)
    config = tmp_path / "served.yaml"
    config.write_text(yaml.safe_dump(document))
    log = tmp_path / "serve.log"
    process = start_group([str(BIN / "longitudinal"), "serve", "--config", str(config)], env=home.env, log=log,
                          cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        names: list[str] = []
        while "served-trial" not in names and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            request = urllib.request.Request(f"{daemon.api_url}/deployments/filter", data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                names = [deployment["name"] for deployment in json.loads(response.read())]
        assert "served-trial" in names, log.read_text()
    finally:
        stop_group(process)
    assert home.daemon().pid == daemon.pid


def test_server_stop_leaves_no_process_behind(home: Home) -> None:
    daemon = home.daemon()
    result = home.run("server", "stop")
    assert result.returncode == 0, result.stderr
    assert f"stopped the background Prefect server at {daemon.ui_url}" in result.stdout
    assert not process_alive(daemon.pid) and not process_alive(daemon.server_pid)
    assert not Paths(home.path).state.exists() and not daemon.socket.exists()
    assert "no background server" in home.run("server", "status").stdout


def test_a_prefect_api_url_in_the_active_profile_means_no_background_server(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    (tmp_path / "profiles.toml").write_text(
        'active = "shared"\n[profiles.shared]\nPREFECT_API_URL = "http://prefect.example:4200/api"\n'
        '[profiles.local]\n')
    assert configured_api_url(tmp_path) == "http://prefect.example:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert configured_api_url(tmp_path) is None


def test_the_socket_path_fits_however_long_the_prefect_home(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8)
    assert len(str(Paths(deep).socket)) < 100
    assert Paths(deep).socket != Paths(tmp_path).socket


def test_served_runs_start_as_forks_of_the_warm_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` hands Prefect's runner a flow; Prefect starts its run with run_flow_in_subprocess, which
    warm_flow_runs turns from a spawned interpreter (imports everything again) into a fork of the
    preloaded forkserver. This guards the point where the two meet, should Prefect change it."""
    import multiprocessing.forkserver

    import prefect.flow_engine

    from flows.serve import warm_flow_runs
    from flows.study_pipeline import study_pipeline

    monkeypatch.setattr(prefect.flow_engine, "multiprocessing", prefect.flow_engine.multiprocessing)  # restored after
    warm_flow_runs()
    process = prefect.flow_engine.run_flow_in_subprocess(study_pipeline, parameters={"config_path": "/nonexistent"})
    try:
        assert type(process).__name__ == "ForkServerProcess"
        assert multiprocessing.forkserver._forkserver._preload_modules == ["flows.preloaded"]  # type: ignore[attr-defined]
    finally:
        process.kill()
        process.join(timeout=30)
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
