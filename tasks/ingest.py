"""Ingest: add the study's new files to its curated data (retried: a file may still be being written
or briefly locked) and return all the data received so far."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from longitudinal.config import StudyConfig
from longitudinal.data.curation import curate
from longitudinal.records import Curated
from tasks.common import transient_failure


@task(name="ingest", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=transient_failure,
      cache_policy=NO_CACHE)
def ingest(config: StudyConfig) -> Curated:
    curated = curate(config)
    logger = get_run_logger()
    for skipped in curated.skipped:
        logger.warning("warning: %s", skipped)
    for duplicate in curated.duplicates:
        logger.warning("%s has the same content as %s: recorded as a duplicate, not ingested again",
                       duplicate.path, duplicate.same_as)
    logger.info(
        "%d new file(s) ingested%s; analysing %d rows from %d file(s)",
        len(curated.new_files), f" ({', '.join(curated.new_files)})" if curated.new_files else "",
        curated.ingested.rows_read, len(curated.ingested.files),
    )
    return curated
