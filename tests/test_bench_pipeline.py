"""The pipeline benchmark's pure helpers: the unbalanced study's shape, the plan of studies, the goals' verdicts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pipeline.__main__ import parse_skips, plan_studies
from benchmarks.pipeline.goals import evaluate_goals
from benchmarks.pipeline.unbalanced import simulate_unbalanced, visits_per_subject


@pytest.mark.parametrize("rows", [3, 4, 10, 11, 2_000, 20_001])
def test_visit_counts_sum_to_the_rows_asked_each_within_3_to_12(rows: int) -> None:
    counts = visits_per_subject(rows, np.random.default_rng(rows))
    assert counts.sum() == rows
    assert counts.min() >= 3 and counts.max() <= 12


def test_every_subject_of_the_unbalanced_study_has_its_own_visit_times() -> None:
    frame = simulate_unbalanced(5_000)
    assert list(frame.columns) == ["patient_id", "week", "arm", "age", "site", "score"]
    assert len(frame) == 5_000
    patterns = frame.groupby("patient_id")["week"].apply(tuple)
    assert patterns.nunique() == len(patterns)
    assert (frame.groupby("patient_id")["week"].diff().dropna() > 0).all()
    assert simulate_unbalanced(5_000).equals(frame)  # a fixed seed


def test_studies_run_by_size_with_lme4_skipped_where_asked() -> None:
    planned = plan_studies(("balanced", "unbalanced"), None)
    assert planned == [("balanced", 2_000), ("balanced", 20_000), ("balanced", 200_000), ("unbalanced", 200_000),
                       ("balanced", 2_000_000), ("unbalanced", 2_000_000)]
    assert plan_studies(("unbalanced",), (2_000,)) == [("unbalanced", 2_000)]
    assert parse_skips("balanced:2M") == {("balanced", 2_000_000)}
    assert parse_skips("none") == frozenset()


def _row(design: str, rows: int, kind: str, name: str, **cells: object) -> dict[str, object]:
    return {"design": design, "rows": str(rows), "kind": kind, "name": name, **{k: str(v) for k, v in cells.items()}}


def test_goals_read_ratios_of_one_design_and_medians_of_the_repeats() -> None:
    rows = [
        _row("balanced", 200_000, "stage", "fit", seconds=0.2, lme4_seconds=8.0),
        _row("unbalanced", 200_000, "stage", "fit", seconds=0.5, lme4_seconds=10.0),
        _row("balanced", 200_000, "run", "whole run (wall)", seconds=7.0, lme4_seconds=8.0, selected="ris",
             lme4_selected="ris"),
        _row("example", 2_016, "second run", "second run 1", seconds=3.0),
        _row("example", 2_016, "second run", "second run 2", seconds=9.0),
        _row("example", 2_016, "second run", "second run 3", seconds=4.0),
        _row("unbalanced", 2_000_000, "stage", "fit", seconds=7.0),
        _row("unbalanced", 2_000_000, "run", "whole run (wall)", seconds=30.0, peak_tree_mb=1100),
        _row("unbalanced", 200_000, "fit", "ris", delta_loglik=-0.06),
    ]
    verdicts = {goal: (measured, verdict) for goal, _, measured, verdict in evaluate_goals(rows)}
    by_start = {goal.split(":")[0]: value for goal, value in verdicts.items()}
    assert by_start["200k rows balanced"][1] == "met"  # 1/40
    assert by_start["200k rows unbalanced"][1] == "**not met**"  # 1/20
    assert by_start["bundled example"][0].startswith("median 4.00 s, min 3.00 s")
    assert by_start["bundled example"][1] == "met"
    assert by_start["2M rows unbalanced"] == ("7.00 s / 0.50 s = 14.0", "**not met**")
    assert by_start["2M rows"][1] == "**not met**"  # 1.07 GB
    assert verdicts["|ΔlogLik| vs lme4, every fit (ML candidates and the REML refit)"][1] == "**not met**"
    assert by_start["bundled example under `longitudinal serve`"][1] == "n/a"


def test_the_prefect_server_is_told_from_the_daemon_by_its_arguments() -> None:
    from benchmarks.pipeline.measure import is_prefect_server_command

    assert is_prefect_server_command(["/v/bin/python", "/v/bin/prefect", "server", "start", "--port", "4200"])
    assert is_prefect_server_command(["/v/bin/python", "-m", "uvicorn", "--factory", "prefect.server.api.server"])
    daemon = ["/v/bin/python", "-P", "-m", "flows.background", "--home", "/tmp/b/prefect-home", "--server-pid", "7"]
    assert not is_prefect_server_command(daemon)


def test_a_run_counts_what_the_background_daemon_forks_for_it_not_the_daemon_or_its_server(tmp_path: Path) -> None:
    """A stand-in daemon (its state file as `longitudinal run` writes it) with a 'prefect server start' child of
    200 MB; the measured command asks it for a run, which it forks: a child of 80 MB. The run's memory holds
    the fork's 80 MB and neither the server's 200 MB nor the daemon's own."""
    from benchmarks.pipeline.measure import background_memory, run_measured

    home = tmp_path / "home"
    (home / "longitudinal").mkdir(parents=True)
    hold = "import sys, time; block = bytearray(int(sys.argv[1]) * 2**20); time.sleep(float(sys.argv[2]))"
    daemon_code = f"""
import json, os, subprocess, sys, time
from pathlib import Path
home = Path(sys.argv[1])
server = subprocess.Popen([sys.executable, "-c", {hold!r}, "200", "60", "prefect", "server", "start"])
(home / "longitudinal" / "background.json").write_text(json.dumps({{"pid": os.getpid(), "server_pid": server.pid}}))
request = home / "run-request"
while not request.exists():
    time.sleep(0.02)
child = os.fork()
if child == 0:
    block = bytearray(80 * 2**20)
    time.sleep(1.5)
    os._exit(0)
os.waitpid(child, 0)
(home / "run-done").touch()
time.sleep(60)
"""
    daemon = subprocess.Popen([sys.executable, "-c", daemon_code, str(home)])
    try:
        deadline = time.monotonic() + 20
        while not (home / "longitudinal" / "background.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the server's 200 MB allocated
        run = ("import pathlib, sys, time; home = pathlib.Path(sys.argv[1]); (home / 'run-request').touch()\n"
               "while not (home / 'run-done').exists(): time.sleep(0.02)")
        measured = run_measured([sys.executable, "-c", run, str(home)], env=dict(os.environ), cwd=tmp_path,
                                time_tool=None, log_dir=tmp_path / "logs", prefect_home=home)
        assert measured.returncode == 0
        assert measured.daemon == daemon.pid
        assert measured.peak_tree_mb is not None and 80 <= measured.peak_tree_mb < 150
        held = background_memory(daemon.pid)
        assert held["prefect_server_mb"] >= 200 and held["other_children_mb"] == 0
    finally:
        state = home / "longitudinal" / "background.json"
        server = json.loads(state.read_text())["server_pid"] if state.exists() else None
        daemon.kill()
        daemon.wait()
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)
