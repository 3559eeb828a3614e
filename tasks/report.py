"""Report: write the run's files and the HTML report into the staging folder, then publish the run.

Writing is retried (an output folder can be briefly unavailable); every write is idempotent. A write the
disk refuses (full, read-only, not permitted) is not retried: it fails the run with one line naming the
folder, and the flow removes the staging folder.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from longitudinal.data.durable import printable
from longitudinal.records import ReportInputs
from longitudinal.reporting.run_folder import markdown_text, publish_run, write_json, write_run_files
from tasks.common import artifact_key, transient_failure


@task(name="write-outputs", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=transient_failure,
      cache_policy=NO_CACHE)
def write_outputs(staging: Path, inputs: ReportInputs) -> Path:
    """Every file of the run folder but the manifest: tables, JSON, data, figures and the report."""
    report = write_run_files(staging, inputs)
    get_run_logger().info("run files and report written to %s", printable(staging))
    return report


@task(name="publish", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=transient_failure,
      cache_policy=NO_CACHE)
def publish(staging: Path, run_id: str, manifest: dict, study: str, summary_markdown: str) -> Path:
    write_json(manifest, staging / "manifest.json")
    run_dir = publish_run(staging, run_id)
    report = run_dir / "report.html"
    create_link_artifact(
        link=report.resolve().as_uri(), link_text=f"{markdown_text(study)} report ({run_id})",
        key=artifact_key(study, "report"), description="The run's HTML report (a file on the machine that ran it)",
    )
    create_markdown_artifact(
        markdown=summary_markdown, key=artifact_key(study, "summary"),
        description=f"Run summary for {markdown_text(study)}",
    )
    get_run_logger().info("run published at %s", printable(run_dir))
    return run_dir
