"""Ingest: read the study's files (retried: a file may still be being written or briefly locked)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from longitudinal.config import StudyConfig
from longitudinal.ingest import read_sources
from longitudinal.records import Ingested


@task(name="ingest", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def ingest(config: StudyConfig) -> Ingested:
    ingested = read_sources(config)
    get_run_logger().info(
        "read %d rows from %d file(s) under %s", ingested.rows_read, len(ingested.files), config.source_path
    )
    return ingested
