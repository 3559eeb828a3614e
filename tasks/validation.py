"""Validate: row checks quarantine, table checks fail the flow before any fit runs."""

from __future__ import annotations

from collections.abc import Collection

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from longitudinal.config import StudyConfig
from longitudinal.data.durable import printable
from longitudinal.data.validation import ensure_valid, validate_visits
from longitudinal.records import Ingested, Validated
from longitudinal.reporting.run_folder import markdown_text, write_validation
from tasks.common import artifact_key


@task(name="validate", cache_policy=NO_CACHE)
def validate(ingested: Ingested, config: StudyConfig, covariates: Collection[str]) -> Validated:
    validated = validate_visits(ingested, config, covariates)
    create_markdown_artifact(
        markdown=validation_markdown(validated),
        key=artifact_key(config.study, "validation"),
        description=f"Validation of {config.study}",
    )
    logger = get_run_logger()
    for note in validated.notes:
        logger.info("%s", printable(note))
    for warning in validated.warnings:
        logger.warning("warning: %s", printable(warning))
    logger.info(
        "%d rows read = %d analysed + %d quarantined",
        validated.rows_read, validated.rows_analysed, validated.rows_quarantined,
    )
    if not validated.success:
        folder = write_validation(validated, config)
        logger.error("validation failed; the checks and the quarantine are in %s", printable(folder))
        ensure_valid(validated, config, folder)
    return validated


def validation_markdown(validated: Validated) -> str:
    """The validation artifact: the accounting line, every check, and the quarantine reasons by rule. Check
    descriptions and reasons quote data values, so they are escaped (:func:`markdown_text`)."""
    lines = [
        "# Validation",
        "",
        f"Rows read **{validated.rows_read}** = analysed **{validated.rows_analysed}** "
        f"+ quarantined **{validated.rows_quarantined}**.",
        "",
        "| check | level | result | rows |",
        "|---|---|---|---|",
    ]
    for outcome in validated.expectations:
        result = "pass" if outcome.success else "**warning**" if outcome.level == "warning" else "**fail**"
        lines.append(f"| {markdown_text(outcome.description)} | {outcome.level} | {result} | {outcome.unexpected_count} |")
    if validated.rows_quarantined:
        lines += ["", "| quarantine reason | rows |", "|---|---|"]
        rule = validated.quarantine["reason"].str.replace(r"[:(].*$", "", regex=True).str.strip()
        for reason, count in rule.value_counts().items():
            lines.append(f"| {markdown_text(reason)} | {count} |")
    return "\n".join(lines)
