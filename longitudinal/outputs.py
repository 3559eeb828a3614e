"""The run folder: built aside, written file by file, then moved into place in one rename.

``<output>/<study>/<run id>/`` holds the report, the figures and the machine-readable results;
``<output>/<study>/latest`` is a symbolic link to the newest successful run. A run is assembled in a
hidden staging folder next to its final place (same file system, so the final ``rename`` is atomic);
a failed or killed run never moves ``latest`` and leaves no half-written run folder behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from longitudinal.config import StudyConfig
from longitudinal.records import Fit, Selection, SourceFile, Validated
from longitudinal.selection import COLUMNS

STAGING_PREFIX = ".staging-"
PACKAGES = ("longitudinal", "prefect", "great-expectations", "statsmodels", "numpy", "scipy", "pandas",
            "pyarrow", "matplotlib", "pydantic", "nlopt")


def new_run_id(now: datetime | None = None) -> str:
    """A run id that sorts by time (UTC, to the microsecond) and stays unique across processes."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S_%fZ')}-{uuid.uuid4().hex[:6]}"


def start_run(study_dir: Path, run_id: str) -> Path:
    """Create the staging folder of a run; the caller writes into it, then calls :func:`publish_run`."""
    study_dir.mkdir(parents=True, exist_ok=True)
    staging = study_dir / f"{STAGING_PREFIX}{run_id}"
    (staging / "figures").mkdir(parents=True)
    return staging


def publish_run(staging: Path, run_id: str) -> Path:
    """Move a finished run into place and point ``latest`` at it, each step atomic."""
    study_dir = staging.parent
    final = study_dir / run_id
    os.rename(staging, final)
    link = study_dir / "latest"
    temporary = study_dir / f".latest-{run_id}"
    temporary.symlink_to(run_id, target_is_directory=True)
    os.replace(temporary, link)
    return final


def discard_run(staging: Path) -> None:
    """Remove the staging folder of a run that failed."""
    shutil.rmtree(staging, ignore_errors=True)


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
