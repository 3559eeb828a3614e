"""Fit: one task per candidate and method. No retries: the statistics are deterministic."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from longitudinal.fitting import fit_candidate
from longitudinal.records import Fit, Method


@task(name="fit", task_run_name="fit-{name}-{method}", cache_policy=NO_CACHE)
def fit(visits: pd.DataFrame, name: str, formula: str, method: Method, engine: str) -> Fit:
    result = fit_candidate(visits, name, formula, method=method, engine=engine)
    logger = get_run_logger()
    if result.usable:
        logger.info(
            "%s (%s): logLik %.4f, %d parameters, %s%s in %.2f s",
            name, method, result.loglik, result.n_params, result.optimizer,
            ", singular" if result.singular else "", result.seconds,
        )
    else:
        logger.warning("%s (%s) failed: %s", name, method, result.message)
    return result
