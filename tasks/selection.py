"""Select: compare the ML fits by AIC/BIC and publish the comparison table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from longitudinal.inference.criteria import select_model
from longitudinal.records import Fit, Selection
from longitudinal.reporting.run_folder import markdown_text
from tasks.common import artifact_key


@task(name="select", cache_policy=NO_CACHE)
def select(fits: Sequence[Fit], criterion: Literal["aic", "bic"], study: str) -> Selection:
    selection = select_model(fits, criterion)
    table = selection.table.round(4).astype(object).where(selection.table.notna(), None)
    create_table_artifact(
        table=table.to_dict(orient="records"),
        key=artifact_key(study, "model-comparison"),
        description=(f"Model comparison for {markdown_text(study)} by {criterion.upper()}; "
                     f"selected: {markdown_text(selection.selected)}"),  # the UI renders descriptions as Markdown
    )
    get_run_logger().info("selected %s by %s", selection.selected, criterion.upper())
    return selection
