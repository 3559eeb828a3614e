"""The ``longitudinal-study`` flow: ingest → validate → fit every candidate → select → report.

Composition only: every step is a task calling one library function. The run is assembled in a
staging folder and published (moved into place, ``latest`` updated) only when every step succeeded.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.runtime import flow_run

from longitudinal.config import StudyConfig, load_config
from longitudinal.formula import candidate_covariates, check_columns, check_same_response, parse_candidates
from longitudinal.outputs import (
    build_manifest,
    discard_run,
    new_run_id,
    package_versions,
    selected_model_summary,
    start_run,
    write_data,
    write_json,
    write_model_comparison,
    write_quarantine,
)
from longitudinal.records import SOURCE_COLUMNS
from longitudinal.report import ReportInputs
from longitudinal.validation import validation_summary
from tasks.fitting import fit
from tasks.ingest import ingest
from tasks.report import publish, write_report
from tasks.selection import select
from tasks.validation import validate


def _run_name() -> str:
    parameters = flow_run.parameters
    try:
        study = load_config(parameters["config_path"]).study
    except Exception:  # the flow itself reports a bad config; the name is only cosmetic
        study = "study"
    return f"{study}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


@flow(name="longitudinal-study", flow_run_name=_run_name, log_prints=False)
def study_pipeline(config_path: str, criterion: str | None = None) -> str:
    """Run the whole pipeline for one study config; returns the published run folder."""
    config = load_config(config_path).with_criterion(criterion)
    formulas = parse_candidates(config.models.candidates)
    check_same_response(formulas, config.data.outcome)
    run_id = new_run_id()
    staging = start_run(config.output_dir, run_id)
    try:
        run_dir = _run_stages(config, Path(config_path), formulas, staging, run_id)
    except BaseException:
        discard_run(staging)
        raise
    return str(run_dir)


def _run_stages(config: StudyConfig, config_path: Path, formulas: dict, staging: Path, run_id: str) -> Path:
    stages: dict[str, float] = {}
    clock = time.perf_counter()

    ingested = ingest(config)
    stages["ingest"] = _lap(clock)
    clock = time.perf_counter()

    data = config.data
    roles = {data.subject, data.time, data.outcome}
    columns = [c for c in ingested.raw.columns if c not in SOURCE_COLUMNS]
    check_columns(formulas, set(columns) | roles)
    covariates = candidate_covariates(formulas, roles)
    validated = validate(ingested, config, covariates)
    stages["validate"] = _lap(clock)
    clock = time.perf_counter()

    names = list(formulas)
    engine = config.models.engine
    fits = fit.map(
        unmapped(validated.visits), names, [config.models.candidates[n] for n in names],
        unmapped("ML"), unmapped(engine),
    ).result()
    stages["fit"] = _lap(clock)
    clock = time.perf_counter()

    selection = select(fits, config.models.criterion, config.study)
    stages["select"] = _lap(clock)
    clock = time.perf_counter()

    chosen = selection.selected
    refit = fit.with_options(task_run_name=f"refit-{chosen}-REML")
    selected = refit(validated.visits, chosen, config.models.candidates[chosen], "REML", engine)
    stages["fit"] += _lap(clock)
    clock = time.perf_counter()

    write_model_comparison(selection, staging)
    write_json(selected_model_summary(selected, selection.criterion), staging / "selected_model.json")
    write_json(validation_summary(validated), staging / "validation.json")
    write_quarantine(validated, staging)
    write_data(validated, staging)
    timings: dict[str, Any] = {
        "stages": stages,
        "fits": {f.name: round(f.seconds, 4) for f in fits} | {f"{selected.name} (REML)": round(selected.seconds, 4)},
    }
    inputs = ReportInputs(
        study=config.study, run_id=run_id, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=config, files=ingested.files, validated=validated, selection=selection, fits=tuple(fits),
        selected=selected, timings=timings, versions=package_versions(),
    )
    write_report(staging, inputs)
    stages["report"] = _lap(clock)

    counts = {"read": validated.rows_read, "analysed": validated.rows_analysed,
              "quarantined": validated.rows_quarantined}
    manifest = build_manifest(
        config_path=config_path.resolve(), config=config.model_dump(mode="json", exclude={"base_dir"}),
        files=ingested.files, run_id=run_id, flow_run_id=str(flow_run.id) if flow_run.id else None,
        timings={"stages": {k: round(v, 4) for k, v in stages.items()}, "fits": timings["fits"]},
        counts=counts, selected=chosen,
    )
    return publish(staging, run_id, manifest, config.study, _summary_markdown(config, selection, counts, run_id))


def _lap(start: float) -> float:
    return time.perf_counter() - start


def _summary_markdown(config: StudyConfig, selection: Any, counts: dict[str, int], run_id: str) -> str:
    table = selection.table
    lines = [
        f"# {config.study}: run {run_id}",
        "",
        f"Selected **{selection.selected}** by {selection.criterion.upper()}.",
        "",
        f"Rows read {counts['read']} = analysed {counts['analysed']} + quarantined {counts['quarantined']}.",
        "",
        "| model | converged | logLik | AIC | BIC | selected |",
        "|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.model} | {row.converged} | {row.loglik:.3f} | {row.aic:.2f} | {row.bic:.2f} | "
            f"{'yes' if row.selected else ''} |"
        )
    return "\n".join(lines)
