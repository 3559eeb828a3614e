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
"""

from __future__ import annotations

import hashlib
import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from longitudinal.config import StudyConfig
from longitudinal.durable import sync_path, sync_tree
from longitudinal.records import Fit, Selection, SourceFile, Validated
from longitudinal.selection import COLUMNS

if TYPE_CHECKING:
    from longitudinal.report import ReportInputs

STAGING_PREFIX = ".staging-"
LATEST_PREFIX = ".latest-"
PACKAGES = ("longitudinal", "prefect", "great-expectations", "statsmodels", "numpy", "scipy", "pandas",
            "pyarrow", "matplotlib", "pydantic", "nlopt")


def new_run_id(now: datetime | None = None) -> str:
    """A run id that sorts by time (UTC, to the microsecond) and stays unique across processes."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S_%fZ')}-{uuid.uuid4().hex[:6]}"


def start_run(study_dir: Path, run_id: str | None = None) -> Path:
    """Take the study's run lock, clear what killed runs left, and create this run's staging folder.

    Waits while another run of the study holds the lock, so two runs started at once run one after the
    other: the second ingests after the first has published, and neither writes into the other's
    folders. Without ``run_id``, the id is made once the lock is held, so run ids sort in the order the
    runs are published (:func:`run_id_of` reads it back). The caller writes into the staging folder,
    then calls :func:`publish_run` (or :func:`discard_run` on failure), which releases the lock.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = _acquire_run_lock(study_dir, run_id or "(new)")
    try:
        if run_id is None:
            run_id = new_run_id()
            os.ftruncate(lock, 0)
            os.pwrite(lock, f"{os.getpid()}, {run_id}\n".encode(), 0)
        staging = study_dir / f"{STAGING_PREFIX}{run_id}"
        remove_stale_runs(study_dir)
        (staging / "figures").mkdir(parents=True)
    except BaseException:
        os.close(lock)
        raise
    _RUN_LOCKS[staging] = lock
    return staging


def run_id_of(staging: Path) -> str:
    """The run id of a staging folder made by :func:`start_run`."""
    return staging.name.removeprefix(STAGING_PREFIX)


def publish_run(staging: Path, run_id: str) -> Path:
    """Move a finished run into place and point ``latest`` at it, each step atomic; release the run lock.

    The files are flushed to disk first, so a machine restart cannot leave a published run with empty
    files. A kill between the two steps leaves a complete run folder and ``latest`` on the previous run.
    """
    study_dir = staging.parent
    final = study_dir / run_id
    sync_tree(staging)
    os.rename(staging, final)
    link = study_dir / "latest"
    temporary = study_dir / f"{LATEST_PREFIX}{run_id}"
    temporary.symlink_to(run_id, target_is_directory=True)
    os.replace(temporary, link)
    sync_path(study_dir)
    _release_run_lock(staging)
    return final


def discard_run(staging: Path) -> None:
    """Remove the staging folder of a run that failed and release the run lock."""
    shutil.rmtree(staging, ignore_errors=True)
    _release_run_lock(staging)


def remove_stale_runs(study_dir: Path) -> list[Path]:
    """Remove the ``.staging-*`` folders and ``.latest-*`` links that killed runs left in ``study_dir``.

    Call only while holding the study's run lock (as :func:`start_run` does): then no other run of the
    study is alive and everything with these prefixes is a leftover. Returns what was removed.
    """
    removed = []
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

# The open run-lock descriptor of each staging folder this process is assembling: module state because
# the flow passes only paths between its tasks. The lock lives exactly as long as the descriptor.
_RUN_LOCKS: dict[Path, int] = {}


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
    descriptor = _RUN_LOCKS.pop(staging, None)
    if descriptor is not None:
        os.close(descriptor)  # closing this process's only descriptor of the file releases the flock


# ------------------------------------------------------------------------------------------------ files


def write_model_comparison(selection: Selection, folder: Path) -> Path:
    path = folder / "model_comparison.csv"
    selection.table.loc[:, list(COLUMNS)].to_csv(path, index=False)
    return path


def selected_model_summary(fit: Fit, criterion: str) -> dict[str, Any]:
    """The contract of ``selected_model.json``: the REML refit of the selected candidate."""
    return {
        "model": fit.name,
        "formula": fit.formula,
        "criterion": criterion,
        "method": fit.method,
        "n_obs": fit.n_obs,
        "n_subjects": fit.n_subjects,
        "fixed_effects": [asdict(fe) for fe in fit.fixed_effects],
        "dropped_terms": list(fit.dropped_terms),
        "random_effects": [asdict(vc) for vc in fit.random_effects],
        "correlations": [asdict(c) for c in fit.correlations],
        "residual_sd": fit.residual_sd,
        "loglik": fit.loglik,
        "reml_criterion": fit.reml_criterion,
        "singular": fit.singular,
        "converged": fit.converged,
        "engine": fit.engine,
    }


def write_json(document: Mapping[str, Any], path: Path) -> Path:
    """Write JSON with NaN and infinities as null (strict JSON readers reject NaN)."""
    path.write_text(json.dumps(_jsonable(document), indent=2) + "\n", encoding="utf-8")
    return path


def write_quarantine(validated: Validated, folder: Path) -> Path:
    path = folder / "quarantine.csv"
    validated.quarantine.to_csv(path, index=False)
    return path


def write_validation(validated: Validated, config: StudyConfig) -> Path:
    """``validation.json`` and ``quarantine.csv`` in ``<output>/<study>/validations/<run id>/``: the outcome of
    the checks kept where a user finds it when there is no run folder (``longitudinal validate``, or a run
    that validation stopped)."""
    from longitudinal.validation import validation_summary

    folder = config.output_dir / "validations" / new_run_id()
    folder.mkdir(parents=True)
    write_json(validation_summary(validated), folder / "validation.json")
    write_quarantine(validated, folder)
    return folder


def write_data(validated: Validated, folder: Path) -> Path:
    """The analysed rows as Parquet (pyarrow), with their source file and line."""
    path = folder / "data.parquet"
    validated.visits.reset_index(drop=True).to_parquet(path, engine="pyarrow", index=False)
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
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def write_run_files(folder: Path, inputs: ReportInputs) -> Path:
    """Every file of a run folder but the manifest: the comparison table, the selected model, the
    validation outcome, the quarantine, the analysed data, the figures and the report (returned)."""
    from longitudinal.figures import build_figures, figure_to_png
    from longitudinal.report import render_report
    from longitudinal.validation import validation_summary

    write_model_comparison(inputs.selection, folder)
    write_json(selected_model_summary(inputs.selected, inputs.selection.criterion), folder / "selected_model.json")
    write_json(validation_summary(inputs.validated), folder / "validation.json")
    write_quarantine(inputs.validated, folder)
    write_data(inputs.validated, folder)
    pngs = {}
    for stem, figure in build_figures(inputs.validated.visits, inputs.config, inputs.selection, inputs.selected).items():
        pngs[stem] = figure_to_png(figure)
        (folder / "figures" / f"{stem}.png").write_bytes(pngs[stem])
    report = folder / "report.html"
    report.write_text(render_report(inputs, pngs), encoding="utf-8")
    return report
