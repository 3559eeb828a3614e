"""The run folder: built aside, written file by file, then moved into place in one rename.

``<output>/<study>/<run id>/`` holds the report, the figures and the machine-readable results;
``<output>/<study>/latest`` is a symbolic link to the newest successful run. A run is assembled in a
hidden staging folder next to its final place (same file system, so the final ``rename`` is atomic);
a failed or killed run never moves ``latest`` and leaves no half-written run folder behind.

Runs of one study are serialized: :func:`start_run` takes the study's run lock (an ``flock`` on
``<output>/.<study>.run.lock``, next to the study's folder; waiting while another run holds it) and :func:`publish_run` or
:func:`discard_run` releases it. The kernel releases the lock of a killed process, so holding it proves
that no other run of the study is alive: :func:`start_run` then removes what killed runs left behind
(``.staging-*`` folders, a ``.latest-*`` link made just before a publish) without touching a live run.

A study "needs a run" while data it has received may be missing from ``latest``: :func:`start_run` writes
the marker ``<output>/.<study>.needs-run`` (next to the run lock) before the run ingests anything, and only
:func:`publish_run` removes it. A run that fails for a passing cause (the Prefect server or the network
gone, the disk full, a file briefly unreadable, a kill) leaves it, so the next run, or ``serve`` at its
start, knows to run again; a run that fails because of the data or the config removes the marker it
wrote (running again would fail the same way), but keeps one an earlier failed run left.

A write the disk refuses raises :class:`~longitudinal.errors.OutputUnwritable` naming the folder; the
failed run's staging folder is removed and ``latest`` keeps pointing at the previous run.
"""

from __future__ import annotations

import hashlib
import fcntl
import html
import json
import logging
import math
import os
import shutil
import subprocess
import re
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from longitudinal.config import LINKS, StudyConfig
from longitudinal.data.durable import printable, sync_path, sync_tree, writing
from longitudinal.data.validation import validation_summary
from longitudinal.errors import LongitudinalError, OutputUnwritable, SourceUnavailable
from longitudinal.records import (
    MODEL_COMPARISON_COLUMNS,
    ExplainedVariance,
    MarginalEstimates,
    Fit,
    ReportInputs,
    ResidualCovariance,
    Selection,
    SourceFile,
    Validated,
)
from longitudinal.inference.residuals import ratio_effects
from longitudinal.reporting.figures import HELPER_MAX_ROWS, figure_builders, render_pngs
from longitudinal.reporting.html import dispersion_of, overdispersion_advice, render_report

STAGING_PREFIX = ".staging-"
LATEST_PREFIX = ".latest-"
PACKAGES = ("longitudinal", "prefect", "great-expectations", "statsmodels", "numpy", "scipy", "pandas",
            "pyarrow", "matplotlib", "pydantic", "nlopt")


def new_run_id(now: datetime | None = None) -> str:
    """A run id that sorts by time (UTC, to the microsecond) and stays unique across processes."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S_%fZ')}-{uuid.uuid4().hex[:6]}"


def start_run(study_dir: Path, run_id: str | None = None) -> Path:
    """Take the study's run lock, clear what killed runs left, mark the study as needing a run, and create
    this run's staging folder.

    Waits while another run of the study holds the lock, so two runs started at once run one after the
    other: the second ingests after the first has published, and neither writes into the other's
    folders. Without ``run_id``, the id is made once the lock is held, so run ids sort in the order the
    runs are published (:func:`run_id_of` reads it back). The caller writes into the staging folder,
    then calls :func:`publish_run` (or :func:`discard_run` on failure), which releases the lock.
    """
    with writing(study_dir, "start a run"):
        study_dir.mkdir(parents=True, exist_ok=True)
        lock = _acquire_run_lock(study_dir, run_id or "(new)")
    try:
        with writing(study_dir, "start a run"):
            if run_id is None:
                run_id = new_run_id()
                os.ftruncate(lock, 0)
                os.pwrite(lock, f"{os.getpid()}, {run_id}\n".encode(), 0)
            staging = study_dir / f"{STAGING_PREFIX}{run_id}"
            remove_stale_runs(study_dir)
            earlier = read_needs_run(study_dir)
            _write_needs_run(study_dir, (earlier or {"since": _now(), "first_run": run_id}) | {"attempt": run_id})
            (staging / "figures").mkdir(parents=True)
    except BaseException:
        os.close(lock)
        raise
    _RUNS[staging] = _Run(lock=lock, marker_was_there=earlier is not None)
    return staging


def run_id_of(staging: Path) -> str:
    """The run id of a staging folder made by :func:`start_run`."""
    return staging.name.removeprefix(STAGING_PREFIX)


def publish_run(staging: Path, run_id: str) -> Path:
    """Move a finished run into place and point ``latest`` at it, each step atomic; clear the study's
    needs-run marker and release the run lock.

    The files are flushed to disk first, so a machine restart cannot leave a published run with empty
    files. A kill between the two steps leaves a complete run folder and ``latest`` on the previous run.
    When the disk refuses a step, the run is moved back to its staging folder (for :func:`discard_run`
    to remove) and ``latest`` is left as it was.
    """
    study_dir = staging.parent
    final = study_dir / run_id
    link = study_dir / "latest"
    temporary = study_dir / f"{LATEST_PREFIX}{run_id}"
    with writing(study_dir, "publish the run"):
        sync_tree(staging)
        os.rename(staging, final)
        try:
            temporary.symlink_to(run_id, target_is_directory=True)
            os.replace(temporary, link)
            sync_path(study_dir)
        except OSError:
            if link.resolve() != final.resolve():  # latest not moved: take the run back out of sight
                temporary.unlink(missing_ok=True)
                os.rename(final, staging)
            raise
    try:
        needs_run_path(study_dir).unlink(missing_ok=True)
    except OSError as exc:  # published all the same; the next run clears it
        _log.warning("could not remove %s: %s", printable(needs_run_path(study_dir)), printable(exc))
    _release_run_lock(staging)
    return final


def discard_run(staging: Path, error: BaseException | None = None) -> None:
    """Remove the staging folder of a run that failed and release the run lock.

    The study keeps its needs-run marker unless ``error`` is the data's or the config's fault (running
    again on the same input would fail the same way) and this run wrote the marker: a marker an earlier
    run left stays, since what that run registered is still unpublished.
    """
    shutil.rmtree(staging, ignore_errors=True)
    run = _RUNS.get(staging)
    study_dir = staging.parent
    try:
        if error is not None and is_input_failure(error) and run is not None and not run.marker_was_there:
            needs_run_path(study_dir).unlink(missing_ok=True)
        elif run is not None:
            marker = read_needs_run(study_dir) or {"since": _now(), "first_run": run_id_of(staging)}
            reason = "stopped" if error is None else f"{type(error).__name__}: {printable(error)}"
            _write_needs_run(study_dir, marker | {"attempt": run_id_of(staging), "last_failure": reason[:2000]})
    except OSError as exc:  # the disk that failed the run may refuse this too: the marker is a hint
        _log.warning("could not update %s: %s", printable(needs_run_path(study_dir)), printable(exc))
    finally:
        _release_run_lock(staging)


def is_input_failure(error: BaseException) -> bool:
    """Whether running again on the same data and config would fail the same way: the project's own
    data and config errors, except a file that could not be read just now and a disk that refused a write.
    Everything else (a server or network gone, an interruption, a bug) counts as passing."""
    return isinstance(error, LongitudinalError) and not isinstance(error, (SourceUnavailable, OutputUnwritable))


def needs_run_path(study_dir: Path) -> Path:
    """The study's needs-run marker: next to the study's folder, like the run lock."""
    return study_dir.parent / f".{study_dir.name}.needs-run"


def read_needs_run(study_dir: Path) -> dict[str, Any] | None:
    """The study's needs-run marker, or None when every run so far published what it ingested.

    The marker is JSON: ``since`` (when the first unpublished run started), ``first_run`` (its run id),
    ``attempt`` (the latest run that started) and, after a failure, ``last_failure`` (its error)."""
    path = needs_run_path(study_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(text)
    except ValueError:  # cut short by a full disk or a crash: still a marker
        return {"since": None}
    return marker if isinstance(marker, dict) else {"since": None}


def _write_needs_run(study_dir: Path, marker: Mapping[str, Any]) -> None:
    path = needs_run_path(study_dir)
    aside = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    aside.write_text(json.dumps(_jsonable(marker)) + "\n", encoding="utf-8")
    os.replace(aside, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def remove_stale_runs(study_dir: Path) -> list[Path]:
    """Remove the ``.staging-*`` folders and ``.latest-*`` links that killed runs left in ``study_dir``,
    and a needs-run marker's temporary file next to it.

    Call only while holding the study's run lock (as :func:`start_run` does): then no other run of the
    study is alive and everything with these prefixes is a leftover. Returns what was removed.
    """
    removed = sorted(study_dir.parent.glob(f"{needs_run_path(study_dir).name}.*.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    for path in sorted(study_dir.iterdir()):
        if path.name.startswith(LATEST_PREFIX) and path.is_symlink():
            path.unlink(missing_ok=True)
        elif path.name.startswith(STAGING_PREFIX) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        removed.append(path)
    if removed:
        _log.warning("removed what killed runs left in %s: %s", study_dir, ", ".join(p.name for p in removed))
    return removed


def run_lock_path(study_dir: Path) -> Path:
    """The file whose ``flock`` a run of the study holds: next to the study's folder, so a listing of the
    folder shows runs only."""
    return study_dir.parent / f".{study_dir.name}.run.lock"


_log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Run:
    lock: int
    """The open run-lock descriptor: the lock lives exactly as long as it."""
    marker_was_there: bool
    """An earlier run had left the needs-run marker when this run started."""


# Each staging folder this process is assembling: module state because the flow passes only paths
# between its tasks.
_RUNS: dict[Path, _Run] = {}


def _acquire_run_lock(study_dir: Path, run_id: str) -> int:
    """An exclusive ``flock`` on the study's run-lock file, waiting (and saying so) while another run holds it.

    The file records the holder's process id and run id, for the message a waiting run logs.
    """
    path = run_lock_path(study_dir)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
            _log.warning("another run of %s is in progress (process, run id: %s); run %s starts when it ends",
                         study_dir.name, holder, run_id)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}, {run_id}\n".encode(), 0)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _release_run_lock(staging: Path) -> None:
    run = _RUNS.pop(staging, None)
    if run is not None:
        os.close(run.lock)  # closing this process's only descriptor of the file releases the flock


# ------------------------------------------------------------------------------------------------ files


def write_model_comparison(selection: Selection, folder: Path) -> Path:
    path = folder / "model_comparison.csv"
    selection.table.loc[:, list(MODEL_COMPARISON_COLUMNS)].to_csv(path, index=False)
    return path


def selected_model_summary(
    fit: Fit, criterion: str, explained: ExplainedVariance | None = None, df_method: str = "normal",
) -> dict[str, Any]:
    """The contract of ``selected_model.json``: the REML refit of the selected candidate, or the ML fit of a
    binomial or Poisson one (a GLMM has no REML).

    ``family`` and ``link`` name the model ("gaussian", "identity"; "binomial", "logit"; "poisson", "log");
    ``nagq`` is glmer's nAGQ for a GLMM (1: Laplace) and null otherwise. A GLMM's fixed effects are on the link
    scale and each carries ``odds_ratio`` (binomial) or ``rate_ratio`` (Poisson): ``estimate``, ``ci_low``,
    ``ci_high``, exp of the estimate and its Wald interval. ``overdispersion`` is the Pearson check of a
    Poisson fit (``pearson_chi2``, ``df``, ``ratio``, ``p_value``, ``overdispersed``, ``note``), null otherwise.
    ``icc`` (adjusted), ``r2_marginal`` and ``r2_conditional`` come from ``explained`` (performance's ``icc`` and
    ``r2_nakagawa``, see ``longitudinal.inference.variance``; for a GLMM on the link scale with the family's
    distribution-specific variance), null when it is None (not defined for an MMRM or a failed fit).

    Each fixed effect has ``df``, the denominator degrees of freedom of its t test and interval under
    ``df_method`` (``models.df``: "satterthwaite", "kenward-roger", "residual"; null for "normal", the z test
    of every GLMM). Each entry of ``random_effects`` and ``correlations`` has ``ci_low``/``ci_high``, its
    profile-likelihood 95% interval (lme4's ``confint(method = "profile")``; a bound at 0 or ±1 is that
    value), and ``residual_sd_ci`` is ``[low, high]`` for the residual SD; null where not computed.
    """
    glmm = fit.family != "gaussian"
    fixed = [asdict(fe) for fe in fit.fixed_effects]
    if glmm:
        key = "odds_ratio" if fit.family == "binomial" else "rate_ratio"
        fixed = [entry | {key: {"estimate": exp.estimate, "ci_low": exp.ci_low, "ci_high": exp.ci_high}}
                 for entry, exp in zip(fixed, ratio_effects(fit), strict=True)]
    dispersion = dispersion_of(fit)
    return {
        "model": fit.name,
        "formula": fit.formula,
        "criterion": criterion,
        "method": fit.method,
        "family": fit.family,
        "link": LINKS.get(fit.family),
        "nagq": fit.nagq if glmm else None,
        "n_obs": fit.n_obs,
        "n_subjects": fit.n_subjects,
        "fixed_effects": fixed,
        "dropped_terms": list(fit.dropped_terms),
        "random_effects": [asdict(vc) for vc in fit.random_effects],
        "correlations": [asdict(c) for c in fit.correlations],
        "residual_sd": fit.residual_sd,
        "residual_sd_ci": None if fit.residual_sd_ci is None else list(fit.residual_sd_ci),
        "df_method": df_method,
        "loglik": fit.loglik,
        "reml_criterion": fit.reml_criterion,
        "icc": None if explained is None else explained.icc,
        "r2_marginal": None if explained is None else explained.r2_marginal,
        "r2_conditional": None if explained is None else explained.r2_conditional,
        "singular": fit.singular,
        "converged": fit.converged,
        "engine": fit.engine,
        "covariance": covariance_summary(fit.covariance) if fit.covariance is not None else None,
        "overdispersion": None if dispersion is None else asdict(dispersion) | {
            "overdispersed": dispersion.overdispersed,
            "note": overdispersion_advice(dispersion) if dispersion.overdispersed else None},
    }


def covariance_summary(covariance: ResidualCovariance) -> dict[str, Any]:
    """The ``covariance`` entry of ``selected_model.json``: the selected model's residual covariance structure,
    its matrices over ``labels`` (rows and columns in that order) and its named parameters."""
    return {
        "structure": covariance.structure,
        "term": covariance.term,
        "description": covariance.description,
        "visit": covariance.visit,
        "labels": list(covariance.labels),
        "matrix": np.asarray(covariance.matrix, dtype=float).tolist(),
        "correlation": covariance.correlation.tolist(),
        "parameters": {name: float(value) for name, value in covariance.parameters},
        "n_params": covariance.n_params,
        "heterogeneous": covariance.heterogeneous,
        "spatial": covariance.spatial,
    }


def write_estimates(estimates: MarginalEstimates, folder: Path) -> tuple[Path, Path]:
    """``marginal_means.csv`` and ``contrasts.csv`` (columns as ``MarginalEstimates`` documents them)."""
    means, contrasts = folder / "marginal_means.csv", folder / "contrasts.csv"
    spreadsheet_safe(estimates.means).to_csv(means, index=False)
    spreadsheet_safe(estimates.contrasts).to_csv(contrasts, index=False)
    return means, contrasts


def write_json(document: Mapping[str, Any], path: Path) -> Path:
    """Write JSON with NaN and infinities as null (strict JSON readers reject NaN), and text as UTF-8
    (a file name that is not UTF-8 is shown with U+FFFD, see :func:`~longitudinal.data.durable.printable`)."""
    path.write_text(json.dumps(_jsonable(document), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_quarantine(validated: Validated, folder: Path) -> Path:
    """``quarantine.csv``: the quarantined rows as read, each text cell made safe to open in a spreadsheet
    (:func:`spreadsheet_safe`)."""
    path = folder / "quarantine.csv"
    spreadsheet_safe(validated.quarantine).to_csv(path, index=False)
    return path


# A text cell a spreadsheet would evaluate as a formula (OWASP, "CSV Injection"): =, +, -, @, tab, CR.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# ... unless the whole cell is a plain number: "-5", "+1.5", "-2e3" are read as numbers, never run.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def spreadsheet_cell(value: Any) -> Any:
    """A text cell that starts like a formula gets a leading ``'`` (OWASP's advice), so a spreadsheet shows
    it as text instead of running it; a plain number such as ``-5`` is left as it is, and so is every
    value that is not text. Undecodable bytes of a name become U+FFFD."""
    if not isinstance(value, str):
        return value
    value = printable(value)
    if value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text cells and column names are :func:`spreadsheet_cell`-safe."""
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c]) and not pd.api.types.is_datetime64_any_dtype(frame[c])]
    safe = frame.assign(**{str(c): _spreadsheet_column(frame[c]) for c in text})
    return safe.rename(columns=lambda c: spreadsheet_cell(c) if isinstance(c, str) else c)


def _spreadsheet_column(column: pd.Series) -> pd.Series:
    if column.dtype == object or not pd.api.types.is_string_dtype(column):
        return column.map(spreadsheet_cell, na_action="ignore")  # mixed values, maybe undecodable names
    # A text column (pyarrow strings hold UTF-8 only): vectorized, a quarantine can have millions of rows.
    formula = column.str.match(r"[=+\-@\t\r]", na=False) & ~column.str.fullmatch(_PLAIN_NUMBER.pattern, na=False)
    return column.mask(formula, "'" + column)


def markdown_text(value: Any) -> str:
    """``value`` as plain text inside Markdown (a Prefect artifact): HTML escaped, the characters that make
    links, emphasis, code or table cells (``[ ] ( ) * _ ` | \\``) backslash-escaped, line breaks as
    spaces. Data values, file names and candidate names go through this; the UI's own sanitizer is then
    a second line of defence, not the only one."""
    text = " ".join(printable(value).splitlines()) if value is not None else ""
    text = html.escape(text, quote=True)
    return _MARKDOWN_SPECIAL.sub(r"\\\g<0>", text)


_MARKDOWN_SPECIAL = re.compile(r"[\\`*_\[\]()|]")


def write_validation(validated: Validated, config: StudyConfig) -> Path:
    """``validation.json`` and ``quarantine.csv`` in ``<output>/<study>/validations/<run id>/``: the outcome of
    the checks kept where a user finds it when there is no run folder (``longitudinal validate``, or a run
    that validation stopped). A write the disk refuses leaves no half-written folder."""
    folder = config.output_dir / "validations" / new_run_id()
    try:
        with writing(folder.parent, "write the validation results"):
            folder.mkdir(parents=True)
            write_json(validation_summary(validated), folder / "validation.json")
            write_quarantine(validated, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


#: Rows per row group of ``data.parquet``. Each group's text is made from its codes as it is written: at 2
#: million rows (4 text columns) writing the file rose 56-80 MB above what the run held with groups of 2^17
#: rows, about as writing the same rows held as text did (48-59 MB, ``DataFrame.to_parquet``'s 2^20-row
#: groups), and 133-151 MB with groups of 2^20. The price: 17.2 MB of file instead of 13.5 (source_line's
#: dictionary is tried in each group) and 0.33 s instead of 0.23.
DATA_ROW_GROUP_ROWS = 2**17


def write_data(validated: Validated, folder: Path) -> Path:
    """The analysed rows as Parquet (pyarrow), with their source file and line.

    Text columns are written as text (Parquet strings that read back as ``str``), also those the run holds
    as categoricals (validation holds text so, to hold less): the file has the schema, pandas' metadata
    included, that ``DataFrame.to_parquet`` writes for the same rows held as text. The text of a
    categorical column is made from its codes one row group (:data:`DATA_ROW_GROUP_ROWS`) at a time, as it
    is written, so writing adds one group's text to what the run holds, not every row's.
    """
    visits = validated.visits.reset_index(drop=True)
    categorical = {c: t.categories.dtype for c, t in visits.dtypes.items() if isinstance(t, pd.CategoricalDtype)}
    schema = pa.Schema.from_pandas(visits.iloc[:0].astype(categorical), preserve_index=False)
    path = folder / "data.parquet"
    with path.open("wb") as handle, pq.ParquetWriter(handle, schema) as writer:  # Python's file: a refused write keeps its errno
        for start in range(0, max(len(visits), 1), DATA_ROW_GROUP_ROWS):
            rows = pa.Table.from_pandas(visits.iloc[start:start + DATA_ROW_GROUP_ROWS], preserve_index=False)
            writer.write_table(pa.Table.from_arrays([rows.column(f.name).cast(f.type) for f in schema], schema=schema))
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(
    *, config_path: Path, config: Mapping[str, Any], files: tuple[SourceFile, ...], run_id: str,
    flow_run_id: str | None, timings: Mapping[str, Any], counts: Mapping[str, int], selected: str | None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"path": str(config_path), "sha256": file_sha256(config_path), "content": config},
        "inputs": [asdict(f) for f in files],
        "rows": dict(counts),
        "selected": selected,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "prefect_flow_run_id": flow_run_id,
        "timings": timings,
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the code that ran (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {printable(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, Path)):
        return printable(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def report_fits(fits: Sequence[Fit], selected: Fit) -> tuple[Fit, ...]:
    """The candidates' fits as the report reads them: every number, but the per-row arrays (fitted values,
    residuals, random-effect predictions) only where a figure or table draws from them.

    Those are the selected model's (``selected``: the REML refit, or a GLMM's ML fit, which is one of ``fits``;
    its candidate's ML fit when the refit has none), and, when any candidate has a residual covariance
    structure, every fit's (the residual correlation diagnostic compares the selected model with the best
    candidate without serial correlation). Without this, a run holds the fitted values and residuals of every
    candidate until the report is written: 32 MB per candidate at 2 million rows.
    """
    if selected.covariance is not None or any(f.covariance is not None for f in fits):
        return tuple(fits)
    read = [f for f in fits if f is selected or (f.name == selected.name and not selected.residuals.size)]
    return tuple(f if any(f is r for r in read) else _without_rows(f) for f in fits)


def _without_rows(fit: Fit) -> Fit:
    return replace(fit, fitted=np.empty(0), residuals=np.empty(0), normalized_residuals=np.empty(0),
                   ranef=fit.ranef.iloc[:0])


def write_run_files(folder: Path, inputs: ReportInputs) -> Path:
    """Every file of a run folder but the manifest: the comparison table, the selected model, the
    validation outcome, the quarantine, the analysed data, the figures and the report (returned).

    A write the disk refuses raises :class:`~longitudinal.errors.OutputUnwritable` naming the study's
    folder; the caller discards the staging folder."""
    with writing(folder.parent, "write the run folder"):
        return _write_run_files(folder, inputs)


def _write_run_files(folder: Path, inputs: ReportInputs) -> Path:
    write_model_comparison(inputs.selection, folder)
    write_json(selected_model_summary(inputs.selected, inputs.selection.criterion, inputs.explained,
                                      inputs.df_used), folder / "selected_model.json")
    if inputs.estimates is not None:
        write_estimates(inputs.estimates, folder)
    write_json(validation_summary(inputs.validated), folder / "validation.json")
    write_quarantine(inputs.validated, folder)
    write_data(inputs.validated, folder)
    builders = figure_builders(inputs.validated.visits, inputs.config, inputs.selection, inputs.selected,
                               fits=inputs.fits, estimates=inputs.estimates)
    pngs = render_pngs(builders, processes=1 if len(inputs.validated.visits) > HELPER_MAX_ROWS else None)
    for stem, png in pngs.items():
        (folder / "figures" / f"{stem}.png").write_bytes(png)
    report = folder / "report.html"
    report.write_text(printable(render_report(inputs, pngs)), encoding="utf-8")
    return report
