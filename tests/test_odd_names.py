"""A run whose data file name is not UTF-8, and a run that fails for a passing cause, under Prefect's test
harness: the run completes with U+FFFD in its name and artifacts; the failed run leaves the study
marked as needing a run, and the next run publishes and clears the mark."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "config" / "example-data" / "trial.csv"
ODD = os.fsdecode(b"tri\xe6l.csv")  # Latin-1 "triæl.csv": not UTF-8
SHOWN = "tri\ufffdl.csv"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, copy_example_study: Any) -> Path:
    """The example study reading a landing folder that holds the example data under a non-UTF-8 name."""
    folder = tmp_path_factory.mktemp("odd-names")
    config = copy_example_study(folder)
    landing = folder / "landing"
    landing.mkdir()
    shutil.copyfile(EXAMPLE_DATA, landing / ODD)
    document = yaml.safe_load(config.read_text())
    document["data"]["source"] = "landing"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


def _flow_run_and_artifacts(flow_run_id: str) -> tuple[Any, dict[str, Any]]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    return flow_run, {a.key: a for a in artifacts}


def test_a_file_name_that_is_not_utf8_runs_end_to_end(harness: None, study: Path) -> None:
    from flows.study_pipeline import study_pipeline

    run_dir = Path(study_pipeline(config_path=str(study)))

    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert [entry["path"] for entry in manifest["inputs"]] == [f"landing/{SHOWN}"]
    flow_run, artifacts = _flow_run_and_artifacts(manifest["prefect_flow_run_id"])
    assert flow_run.state.is_completed()
    assert flow_run.name.startswith(f"example-trial: {SHOWN} @ ")
    assert f"| landing/{SHOWN} | {manifest['rows']['read']} |" in artifacts["example-trial-summary"].data
    quarantine = pd.read_csv(run_dir / "quarantine.csv")
    assert set(quarantine["source_file"]) == {f"landing/{SHOWN}"}
    assert SHOWN in (run_dir / "report.html").read_text(encoding="utf-8")


def test_a_run_that_fails_for_a_passing_cause_is_picked_up_by_the_next_run(
        harness: None, study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.report
    from flows.study_pipeline import study_pipeline
    from longitudinal.reporting.run_folder import read_needs_run

    study_dir = study.parent / "reports" / "example-trial"
    latest = (study_dir / "latest").resolve()
    (study.parent / "landing" / "site-b.csv").write_text(
        EXAMPLE_DATA.read_text().replace("P0", "B0"), encoding="utf-8")  # new subjects: registered by this run

    def server_gone(*args: object) -> None:
        raise ConnectionError("All connection attempts failed")

    monkeypatch.setattr(tasks.report, "write_run_files", server_gone)
    with pytest.raises(ConnectionError):
        study_pipeline(config_path=str(study))
    marker = read_needs_run(study_dir)
    assert marker is not None and marker["last_failure"] == "ConnectionError: All connection attempts failed"
    assert (study_dir / "latest").resolve() == latest
    registry = json.loads((study_dir / "curated" / "registry.json").read_text(encoding="utf-8"))
    assert "landing/site-b.csv" in [entry["path"] for entry in registry["files"]]  # registered, unpublished

    monkeypatch.undo()
    run_dir = Path(study_pipeline(config_path=str(study)))
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert "landing/site-b.csv" in [entry["path"] for entry in manifest["inputs"]]
    assert read_needs_run(study_dir) is None
