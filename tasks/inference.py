"""Infer: the selected model's df-corrected tests, profile intervals and marginal means, for the report."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from longitudinal.config import StudyConfig
from longitudinal.inference.reported import report_inference
from longitudinal.records import Fit, ReportedModel


@task(name="infer", task_run_name="infer-{fit.name}", cache_policy=NO_CACHE)
def infer(fit: Fit, visits: pd.DataFrame, config: StudyConfig) -> ReportedModel:
    """Deterministic statistics on records already in memory: no retries, nothing to cache."""
    reported = report_inference(fit, visits, config)
    get_run_logger().info("inference for %s: df %s%s", fit.name, config.models.df,
                          "" if reported.estimates is None else f", {len(reported.estimates.means)} marginal means")
    return reported
