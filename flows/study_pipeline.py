"""The ``longitudinal-study`` flow: ingest → validate → fit every candidate → select → infer → report.

Composition only: every step is a task calling one library function. The run is assembled in a
staging folder and published (moved into place, ``latest`` updated) only when every step succeeded.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from longitudinal.config import ExecutionConfig, StudyConfig, load_config
from longitudinal.data.curation import fingerprint
from longitudinal.data.durable import printable
from longitudinal.data.ingest import find_source_files
from longitudinal.fit.allocator import release_freed_memory
from longitudinal.inference.reported import check_estimates
from longitudinal.model.formula import check_candidates, check_family, check_same_response, parse_candidates
from longitudinal.records import Fit, ReportInputs, Selection, SourceFile
from longitudinal.reporting.run_folder import (
    build_manifest,
    discard_run,
    markdown_text,
    package_versions,
    report_fits,
    run_id_of,
    start_run,
)
from tasks.fitting import describe_family, fit
from tasks.inference import infer
from tasks.ingest import ingest
from tasks.report import publish, write_outputs
from tasks.selection import select
from tasks.validation import validate


def _run_name() -> str:
    """``<study>: <newest data file> (+N more) @ <time>``: the study and the data the run saw.

    A file name that is not UTF-8 is shown with U+FFFD: Prefect cannot store it as it is."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    try:
        config = load_config(flow_run.parameters["config_path"])
    except Exception:  # the flow itself reports a bad config; the name is only a label
        return f"study @ {stamp}"
    try:
        files = sorted(find_source_files(config), key=lambda p: p.stat().st_mtime)
    except Exception:  # no data (yet): the run will say so
        return f"{config.study}: no data @ {stamp}"
    more = f" (+{len(files) - 1} more)" if len(files) > 1 else ""
    return f"{config.study}: {printable(files[-1].name)}{more} @ {stamp}"


@flow(name="longitudinal-study", flow_run_name=_run_name, log_prints=False)
def study_pipeline(config_path: str, criterion: str | None = None) -> str:
    """Run the whole pipeline for one study config; returns the published run folder."""
    config = load_config(config_path).with_criterion(criterion)
    formulas = parse_candidates(config.models.candidates)
    check_same_response(formulas, config.data.outcome)
    check_family(formulas, family=config.models.family, nagq=config.models.nagq)
    staging = start_run(config.output_dir)
    run_id = run_id_of(staging)
    try:
        run_dir = _run_stages(config, Path(config_path), formulas, staging, run_id)
    except BaseException as error:
        discard_run(staging, error)  # keeps the study's needs-run marker unless the input is at fault
        raise
    return str(run_dir)


def _run_stages(config: StudyConfig, config_path: Path, formulas: dict, staging: Path, run_id: str) -> Path:
    stages: dict[str, float] = {}
    clock = time.perf_counter()

    curated = ingest(config)
    ingested, files = curated.ingested, curated.ingested.files
    del curated  # the rows as read and as typed are validation's input only: not held while the models fit
    clock = _stage_done(stages, "ingest", clock)

    covariates = check_candidates(formulas, config.data.roles, list(ingested.raw.columns))
    validated = validate(ingested, config, covariates)
    del ingested
    release_freed_memory()
    check_estimates(config, validated.visits, formulas)
    clock = _stage_done(stages, "validate", clock)

    names = list(formulas)
    models = config.models
    engine, family, nagq = models.engine, models.family, models.nagq
    data_hash = fingerprint(validated.visits)
    formulas_text = [models.candidates[n] for n in names]
    get_run_logger().info("fitting %d candidates by ML, family %s", len(names), describe_family(family, nagq))
    if config.execution.task_runner == "threads":
        # In the flow's own thread, one after another: a fit is pure numpy and Python, so threads only
        # contend for the interpreter lock (measured: 3 fits 3-10x slower in a thread pool than in turn).
        fits = [fit(validated.visits, n, f, "ML", engine, data_hash, family, nagq) for n, f in zip(names, formulas_text)]
    else:
        fit_stage = fit_candidates.with_options(task_runner=task_runner(config.execution))
        fits = fit_stage(validated.visits, names, formulas_text, engine, data_hash, family, nagq)
    clock = _stage_done(stages, "fit", clock)

    selection = select(fits, models.criterion, config.study)
    clock = _stage_done(stages, "select", clock)

    chosen = selection.selected
    chosen_ml = next(f for f in fits if f.name == chosen)
    fit_seconds = {f.name: round(f.seconds, 4) for f in fits}
    # The report reads per-row arrays of the selected model only (run_folder.report_fits): the other candidates'
    # are not held through the REML refit, the inference and the report (32 MB each at 2 million rows).
    fits = list(report_fits(fits, chosen_ml))
    if family == "gaussian":
        refit = fit.with_options(task_run_name=f"refit-{chosen}-REML")
        # From the ML optimum: REML's is near it (measured: 47 -> 27 evaluations for a correlated slope).
        start = [float(t) for t in chosen_ml.theta] if chosen_ml.theta.size else None
        selected = refit(validated.visits, chosen, models.candidates[chosen], "REML", engine, data_hash, family, nagq,
                         start)
        clock = _stage_done(stages, "fit", clock)
        fit_seconds[f"{selected.name} (REML)"] = round(selected.seconds, 4)
    else:
        # A GLMM has no REML (glmer fits by ML only): the selected model is reported as its ML fit.
        selected = chosen_ml

    fits = list(report_fits(fits, selected))  # the chosen candidate's ML arrays too, when its refit has its own
    release_freed_memory()
    reported = infer(selected, validated.visits, config)
    release_freed_memory()
    clock = _stage_done(stages, "infer", clock)

    timings: dict[str, Any] = {"stages": stages, "fits": fit_seconds}
    inputs = ReportInputs(
        study=config.study, run_id=run_id, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=config, files=files, validated=validated, selection=selection, fits=tuple(fits),
        selected=reported.fit, timings=timings, versions=package_versions(), estimates=reported.estimates,
        explained=reported.explained, df_method=reported.df_method,
    )
    write_outputs(staging, inputs)
    _stage_done(stages, "report", clock)

    counts = {"read": validated.rows_read, "analysed": validated.rows_analysed,
              "quarantined": validated.rows_quarantined}
    manifest = build_manifest(
        config_path=config_path.resolve(), config=config.model_dump(mode="json", exclude={"base_dir"}),
        files=files, run_id=run_id, flow_run_id=str(flow_run.id) if flow_run.id else None,
        timings={"stages": {k: round(v, 4) for k, v in stages.items()}, "fits": timings["fits"]},
        counts=counts, selected=chosen,
    )
    summary = _summary_markdown(config, selection, counts, run_id, files)
    return publish(staging, run_id, manifest, config.study, summary)


@flow(name="fit-candidates", flow_run_name="fit {engine} {family}: ML fits of the candidates", log_prints=False)
def fit_candidates(visits: Any, names: list[str], formulas: list[str], engine: str, data_hash: str, family: str,
                   nagq: int) -> list[Fit]:
    """Fit every candidate by ML, one task each, on the task runner the study's ``execution`` names."""
    return list(fit.map(unmapped(visits), names, formulas, unmapped("ML"), unmapped(engine), unmapped(data_hash),
                        unmapped(family), unmapped(nagq)).result())



def task_runner(execution: ExecutionConfig) -> Any:
    """The Prefect task runner for ``execution.task_runner`` ``processes`` or ``dask`` (an existing cluster
    at ``address``, else a local one started for the run)."""
    if execution.task_runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=execution.address) if execution.address else DaskTaskRunner()


def _stage_done(stages: dict[str, float], name: str, clock: float) -> float:
    """Add the time since ``clock`` to stage ``name`` (a Gaussian study's REML refit adds to "fit"), log it,
    restart the clock."""
    stages[name] = stages.get(name, 0.0) + _lap(clock)
    get_run_logger().info("stage %s: %.2f s", name, stages[name])
    return time.perf_counter()


def _lap(start: float) -> float:
    return time.perf_counter() - start


def _summary_markdown(config: StudyConfig, selection: Selection, counts: dict[str, int], run_id: str,
                      files: tuple[SourceFile, ...]) -> str:
    """The run-summary artifact. Candidate and file names are escaped: the UI renders it as Markdown."""
    table = selection.table
    lines = [
        f"# {markdown_text(config.study)}: run {run_id}",
        "",
        f"Selected **{markdown_text(selection.selected)}** by {selection.criterion.upper()}.",
        "",
        f"Rows read {counts['read']} = analysed {counts['analysed']} + quarantined {counts['quarantined']}.",
        "",
        "| model | converged | logLik | AIC | BIC | selected |",
        "|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {markdown_text(row.model)} | {row.converged} | {row.loglik:.3f} | {row.aic:.2f} | {row.bic:.2f} | "
            f"{'yes' if row.selected else ''} |"
        )
    lines += ["", "| input file | rows | sha256 |", "|---|---|---|"]
    lines += [f"| {markdown_text(f.path)} | {f.rows} | {f.sha256[:12]} |" for f in files]
    return "\n".join(lines)
