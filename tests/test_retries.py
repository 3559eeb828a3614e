"""Which failures Prefect retries (README, "Prefect"): transient I/O while reading or writing is retried,
statistics and data errors are not.

Each test injects a fault into the library function a task calls (the task's own retry rule then decides)
and reads the task run back from the test harness's server: ``run_count`` is how many times Prefect ran it.
Every run analyses its own small simulated study, so no fit is served from the cache of an earlier test.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Callable

import pytest

from prefect_server import wait_for

pytestmark = pytest.mark.slow
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "config" / "example-data" / "trial.csv"


def _study(tmp_path: Path, copy_example_study: Callable[..., Path], seed: int) -> Path:
    """The example study's config on 40 simulated patients of its own (``seed``), reports in ``tmp_path``."""
    from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

    data = write_table(simulate_trial(SimulationSpec(n_subjects=40, seed=seed)), tmp_path / "trial.csv")
    config = copy_example_study(tmp_path)
    config.write_text(config.read_text().replace(str(EXAMPLE_DATA), str(data)))
    return config


def _run(config: Path) -> Any:
    """The flow's final state (the flow does not raise: a failure is a state to inspect)."""
    from flows.study_pipeline import study_pipeline

    return study_pipeline(config_path=str(config), return_state=True)


def _task_run(flow_state: Any, name: str) -> Any:
    """The flow run's task run named ``name`` (Prefect adds a suffix unless the task names its runs) once the server holds its final state.

    Task runs reach the server through events, a moment after the flow returns.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id

    def final() -> Any:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        named = [run for run in runs if name in (run.name, run.name.rsplit("-", 1)[0])]
        assert len(named) <= 1, [run.name for run in runs]
        if named and named[0].state is not None and named[0].state.is_final():
            return named[0]
        return None

    return wait_for(final, seconds=30, every=0.5, what=f"the final state of task {name!r} on the server")


def _failing_once(real: Callable[..., Any], error: BaseException) -> tuple[Callable[..., Any], list[int]]:
    """``real``, except that its first call raises ``error``; the list counts the calls."""
    calls: list[int] = []

    def once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    return once, calls


def _published(state: Any) -> Path:
    assert state.is_completed(), state
    run_dir = Path(state.result())
    assert (run_dir / "report.html").is_file() and (run_dir / "manifest.json").is_file()
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".staging-")]
    return run_dir


def _nothing_published(config: Path) -> None:
    study = config.parent / "reports" / "example-trial"
    assert not (study / "latest").exists()
    assert not [p for p in study.iterdir() if p.name not in ("curated", "validations")], list(study.iterdir())


# ------------------------------------------------------------------------- transient I/O: retried


@pytest.mark.parametrize("task, target", [
    ("write-outputs", "write_run_files"),  # writing the run's files: the output folder briefly unavailable
    ("publish", "publish_run"),            # moving the run into place and pointing latest at it
])
def test_a_transient_write_failure_is_retried_and_the_run_completes(
        harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy_example_study: Any,
        task: str, target: str) -> None:
    import tasks.report

    once, calls = _failing_once(getattr(tasks.report, target),
                                OSError(errno.EBUSY, "Device or resource busy (injected)"))
    monkeypatch.setattr(tasks.report, target, once)
    config = _study(tmp_path, copy_example_study, seed=11)
    state = _run(config)
    _published(state)
    assert len(calls) == 2
    task_run = _task_run(state, task)
    assert task_run.state.is_completed() and task_run.run_count == 2


def test_a_folder_briefly_unavailable_while_reading_is_retried(
        harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy_example_study: Any) -> None:
    import tasks.ingest
    from longitudinal.errors import SourceUnavailable

    once, calls = _failing_once(tasks.ingest.curate, SourceUnavailable("incoming/ is not mounted (injected)"))
    monkeypatch.setattr(tasks.ingest, "curate", once)
    config = _study(tmp_path, copy_example_study, seed=12)
    _published(state := _run(config))
    assert len(calls) == 2
    assert _task_run(state, "ingest").run_count == 2


# ------------------------------------------------------------ refused writes, data, statistics: not retried


def test_a_full_disk_is_not_retried(harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    copy_example_study: Any) -> None:
    import tasks.report

    once, calls = _failing_once(tasks.report.write_run_files,
                                OSError(errno.ENOSPC, "No space left on device (injected)"))
    monkeypatch.setattr(tasks.report, "write_run_files", once)
    config = _study(tmp_path, copy_example_study, seed=13)
    state = _run(config)
    assert state.is_failed()
    assert len(calls) == 1
    task_run = _task_run(state, "write-outputs")
    assert task_run.state.is_failed() and task_run.run_count == 1
    _nothing_published(config)


def test_a_data_error_while_reading_is_not_retried(harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   copy_example_study: Any) -> None:
    import tasks.ingest
    from longitudinal.errors import DataError

    once, calls = _failing_once(tasks.ingest.curate, DataError("trial.csv: looks like a binary file (injected)"))
    monkeypatch.setattr(tasks.ingest, "curate", once)
    config = _study(tmp_path, copy_example_study, seed=14)
    state = _run(config)
    assert state.is_failed()
    assert len(calls) == 1
    task_run = _task_run(state, "ingest")
    assert task_run.state.is_failed() and task_run.run_count == 1
    _nothing_published(config)


@pytest.mark.parametrize("task, module, target, error", [
    ("fit-ri-ML", "tasks.fitting", "fit_candidate", FloatingPointError("overflow in the deviance (injected)")),
    ("select", "tasks.selection", "select_model", ArithmeticError("AIC is not a number (injected)")),
])
def test_a_statistics_failure_is_not_retried_and_fails_the_flow(
        harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy_example_study: Any,
        task: str, module: str, target: str, error: BaseException) -> None:
    import importlib

    tasks_module = importlib.import_module(module)
    once, calls = _failing_once(getattr(tasks_module, target), error)
    monkeypatch.setattr(tasks_module, target, once)
    config = _study(tmp_path, copy_example_study, seed=15 if target == "fit_candidate" else 16)
    state = _run(config)
    assert state.is_failed()
    assert len(calls) == 1
    task_run = _task_run(state, task)
    assert task_run.state.is_failed() and task_run.run_count == 1
    _nothing_published(config)


# ------------------------------------------------------------------ README, "Prefect": what a run logs


def test_a_run_logs_each_stage_and_each_fit_with_its_time(harness: None, tmp_path: Path,
                                                          copy_example_study: Any) -> None:
    import re

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    state = _run(_study(tmp_path, copy_example_study, seed=17))
    run_dir = _published(state)
    chosen = (run_dir / "selected_model.json").read_text()
    flow_run_id = state.state_details.flow_run_id
    stages = {"ingest", "validate", "fit-ri-ML", "fit-ris-ML", "fit-ris_uncorrelated-ML", "select", "infer",
              "write-outputs", "publish"}

    def logged_by_task() -> dict[str, list[str]] | None:  # logs reach the server in batches, a little later
        with get_client(sync_client=True) as client:
            names = {run.id: run.name for run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        by_task: dict[str, list[str]] = {}
        for log in logs:
            if log.task_run_id in names and not log.message.startswith("Finished in state"):  # Prefect's own line
                name = names[log.task_run_id]
                by_task.setdefault(name if name.startswith(("fit-", "refit-")) else name.rsplit("-", 1)[0], []).append(log.message)
        refits = [name for name in by_task if name.startswith("refit-")]
        return by_task if stages <= set(by_task) and refits else None

    by_task = wait_for(logged_by_task, seconds=30, every=0.5, what="a log line from every stage and fit")
    # The flow logs each stage's time as it ends (the REML refit adds to "fit", so "fit" is logged twice).
    def stage_lines() -> list[str] | None:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        found = [log.message for log in logs if log.task_run_id is None and log.message.startswith("stage ")]
        return found if len(found) >= 7 else None

    timed = wait_for(stage_lines, seconds=30, every=0.5, what="the flow's stage times")
    assert [re.fullmatch(r"stage (\w+): \d+\.\d\d s", line).group(1) for line in timed] == [  # type: ignore[union-attr]
        "ingest", "validate", "fit", "select", "fit", "infer", "report"]
    (refit,) = [name for name in by_task if name.startswith("refit-")]
    assert refit.removeprefix("refit-").removesuffix("-REML") in chosen
    for name in ["fit-ri-ML", "fit-ris-ML", "fit-ris_uncorrelated-ML", refit]:
        candidate, method = name.split("-")[1], name.split("-")[-1]
        line = re.compile(rf"{re.escape(candidate)} \({method}\): logLik -?\d+\.\d{{4}}, \d+ parameters, .+ in \d+\.\d\d s")
        assert any(line.fullmatch(message) for message in by_task[name]), by_task[name]
