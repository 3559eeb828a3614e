"""`longitudinal serve` against a real Prefect server: schedule, arrival trigger, duplicates, accumulation.

The server, the serve process and the first triggered run are session fixtures of prefect_server.py,
shared with test_ui.py. The tests below run in file order on one landing folder: the first export,
then a copy of it under another name, then an export with new subjects.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("prefect_server")  # its fixtures assert too: show their values on failure

from prefect_server import (  # noqa: E402
    CRON,
    STUDY,
    TIMEZONE,
    CompletedRun,
    PrefectServer,
    ServedStudy,
    copy_into,
    run_folder,
    triggered_runs,
    wait_for,
    wait_for_new_final_run,
    write_study_config,
    write_trial,
)

pytest_plugins = ["prefect_server"]
pytestmark = pytest.mark.slow

# Settle (1 s) + watcher poll (0.5 s) + event -> automation -> scheduled run -> picked up by serve
# (its runner polls every few seconds) is well under this when a run is triggered at all.
QUIET_SECONDS = 15.0


def _registry(study: ServedStudy) -> dict[str, Any]:
    return json.loads((study.reports / "curated" / "registry.json").read_text(encoding="utf-8"))


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _input_names(manifest: dict[str, Any]) -> list[str]:
    return sorted(Path(entry["path"]).name for entry in manifest["inputs"])


def test_deployment_shows_the_cron_schedule_and_one_run_at_a_time(served_study: ServedStudy,
                                                                    prefect_client: Any) -> None:
    deployment = prefect_client.read_deployment(served_study.deployment_id)
    crons = [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules if s.active]
    assert crons == [(CRON, TIMEZONE)]
    assert deployment.parameters == {"config_path": str(served_study.config.resolve())}
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options is not None
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert deployment.paused is False


def test_deployment_is_started_by_the_arrival_event(served_study: ServedStudy, prefect_client: Any) -> None:
    automations = prefect_client.read_resource_related_automations(
        f"prefect.deployment.{served_study.deployment_id}")
    expects = [set(a.trigger.expect) for a in automations if a.enabled]
    assert expects == [{"longitudinal.data.arrived"}]


def test_a_landed_file_starts_a_run_that_completes_with_artifacts_and_report(
        first_run: CompletedRun, served_study: ServedStudy, prefect_client: Any) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run = first_run.flow_run
    assert flow_run.deployment_id == served_study.deployment_id
    assert flow_run.name.startswith(f"{STUDY}: site-a.csv")
    assert (first_run.folder / "report.html").stat().st_size > 0
    manifest = _manifest(first_run.folder)
    assert manifest["rows"]["read"] == first_run.rows
    assert _input_names(manifest) == ["site-a.csv"]

    artifacts = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {f"{STUDY}-model-comparison", f"{STUDY}-summary", f"{STUDY}-report"} <= set(by_key)
    comparison = by_key[f"{STUDY}-model-comparison"]
    assert comparison.type == "table"
    table = json.loads(comparison.data) if isinstance(comparison.data, str) else comparison.data
    assert {row["model"] for row in table} == {"ri", "ris", "ris_uncorrelated"}
    # Prefect 3 stores a link artifact as markdown: [text](link)
    assert f"({(first_run.folder / 'report.html').resolve().as_uri()})" in by_key[f"{STUDY}-report"].data


def test_the_same_content_under_another_name_adds_nothing(first_run: CompletedRun, served_study: ServedStudy,
                                                         prefect_client: Any) -> None:
    known = {run.id for run in triggered_runs(prefect_client, served_study.deployment_id)}
    registry_before = _registry(served_study)
    copy_into(served_study.landing / "site-a.csv", served_study.landing / "site-a-resent.csv")

    # The watcher hashes the settled file, finds its content ingested and sends no event.
    time.sleep(QUIET_SECONDS)
    new_runs = [run for run in triggered_runs(prefect_client, served_study.deployment_id) if run.id not in known]
    assert new_runs == [], f"a copy of ingested content started runs: {[r.name for r in new_runs]}"
    assert _registry(served_study)["files"] == registry_before["files"]


def test_new_subjects_are_analysed_with_the_first_file_and_the_copy_is_a_duplicate(
        first_run: CompletedRun, served_study: ServedStudy, prefect_client: Any) -> None:
    known = {run.id for run in triggered_runs(prefect_client, served_study.deployment_id)}
    rows = write_trial(served_study.landing / "site-b.csv", subjects=40, seed=2, prefix="B-")

    flow_run = wait_for_new_final_run(served_study, prefect_client, known)
    assert flow_run.state.is_completed(), f"{flow_run.name!r} ended {flow_run.state.type.value}"
    # Named after the newest file and how many others the folder holds (README, "Prefect").
    others = len(list(served_study.landing.glob("*.csv"))) - 1
    assert re.fullmatch(rf"{re.escape(STUDY)}: site-b\.csv \(\+{others} more\) @ \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d",
                        flow_run.name), flow_run.name
    folder = run_folder(served_study, flow_run.id)
    manifest = _manifest(folder)
    assert manifest["rows"]["read"] == first_run.rows + rows
    assert _input_names(manifest) == ["site-a.csv", "site-b.csv"]
    assert (folder / "report.html").exists()

    registry = _registry(served_study)
    assert sorted(Path(entry["path"]).name for entry in registry["files"]) == ["site-a.csv", "site-b.csv"]
    duplicates = [(Path(d["path"]).name, Path(d["same_as"]).name) for d in registry["duplicates"]]
    assert duplicates == [("site-a-resent.csv", "site-a.csv")]


def test_a_transient_fault_in_ingest_succeeds_on_retry(prefect_client: Any, prefect_server: PrefectServer,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       copy_example_study: Any) -> None:
    """Reading a file fails once with OSError (briefly locked); the ingest task's retry completes the flow.

    The real ``curate`` runs both attempts, so this also shows a failed attempt leaves no partial
    registry entry: the file is ingested exactly once.
    """
    from prefect import flow

    import longitudinal.data.curation
    from longitudinal.config import load_config
    from tasks.ingest import ingest

    real_read_file = longitudinal.data.curation.read_file
    calls: list[Path] = []

    def locked_once(path: Path, config: Any) -> Any:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(f"{path}: file is locked")
        return real_read_file(path, config)

    monkeypatch.setattr(longitudinal.data.curation, "read_file", locked_once)
    config = load_config(copy_example_study(tmp_path))

    @flow(name="ingest-with-a-transient-fault")
    def ingest_once() -> Any:
        return ingest(config, return_state=True)

    task_state: Any = ingest_once()  # the ingest task's final State
    assert task_state.is_completed()
    curated = task_state.result()
    assert len(calls) == 2
    assert len(curated.new_files) == 1
    registry = json.loads((config.output_dir / "curated" / "registry.json").read_text(encoding="utf-8"))
    assert [entry["rows"] for entry in registry["files"]] == [curated.ingested.rows_read]

    task_run_id = task_state.state_details.task_run_id

    def recorded_attempts() -> int | None:  # task runs reach the server through events: a little later
        task_run = prefect_client.read_task_run(task_run_id)
        return task_run.run_count if task_run.state and task_run.state.is_completed() else None

    assert wait_for(recorded_attempts, seconds=30, what="the ingest task run on the server",
                    logs=(prefect_server.log,)) == 2


def test_serve_starts_a_run_for_a_study_whose_last_run_did_not_publish(
        prefect_server: PrefectServer, prefect_client: Any, tmp_path: Path) -> None:
    """A run registered a landed file, then failed for a passing cause (the server went away): at its
    start, serve sees the study's needs-run marker and starts the run that publishes the file."""
    import yaml

    from longitudinal.config import load_config
    from longitudinal.data.curation import curate
    from longitudinal.reporting.run_folder import discard_run, read_needs_run, start_run
    from prefect_server import BIN, quiet_prefect_env, start_group, stop_group

    config_path = write_study_config(tmp_path)
    document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    document["study"] = "unpublished-trial"
    del document["schedule"]
    config_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    config = load_config(config_path)
    rows = write_trial(tmp_path / "incoming" / "site-c.csv", subjects=30, seed=3, prefix="C-")
    staging = start_run(config.output_dir)
    curate(config)  # registered, so the watcher will not announce it again ...
    discard_run(staging, ConnectionError("All connection attempts failed"))  # ... and never published
    assert read_needs_run(config.output_dir) is not None

    log = tmp_path / "serve.log"
    (tmp_path / "home").mkdir()
    process = start_group(
        [str(BIN / "longitudinal"), "serve", "--config", str(config_path), "--settle-seconds", "1"],
        env=quiet_prefect_env(tmp_path / "home", prefect_server.api_url), log=log, cwd=tmp_path,
    )
    try:
        def finished() -> Any:
            if process.poll() is not None:
                pytest.fail(f"longitudinal serve exited with {process.returncode}")
            runs = _deployment_runs(prefect_client, "longitudinal-study/unpublished-trial")
            return runs if runs and all(r.state is not None and r.state.is_final() for r in runs) else None

        runs = wait_for(finished, seconds=180, what="the run serve starts for the unpublished study",
                        logs=(log, prefect_server.log))
    finally:
        stop_group(process)
    assert [(r.state.is_completed(), "needs-run" in r.tags) for r in runs] == [(True, True)]
    assert "did not publish" in log.read_text(encoding="utf-8", errors="replace")
    manifest = _manifest(config.output_dir / "latest")
    assert (_input_names(manifest), manifest["rows"]["read"]) == (["site-c.csv"], rows)
    assert read_needs_run(config.output_dir) is None


def _deployment_runs(client: Any, name: str) -> list[Any]:
    """Every flow run of the deployment ``name`` (none while it is not registered yet)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        return []
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


def test_an_arrival_with_a_name_that_is_not_utf8_is_announced(prefect_client: Any, tmp_path: Path) -> None:
    """The event carries the name with U+FFFD; before, pydantic could not serialize it, emit_event sent
    nothing and the watcher offered the batch (and the good file in it) again for ever."""
    import os

    from flows.serve import announce_arrival
    from longitudinal.config import load_config

    config = load_config(write_study_config(tmp_path))
    odd = tmp_path / "incoming" / os.fsdecode(b"site-\xe6.csv")
    announce_arrival(config, [odd, tmp_path / "incoming" / "good.csv"])  # raises when nothing was sent
