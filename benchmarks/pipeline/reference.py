"""The reference: lme4's ``lmer`` on the same CSV, through ``Rscript benchmarks/lme4_fits.R``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.pipeline.measure import ROOT, Measured, run_measured

LME4_SCRIPT = ROOT / "benchmarks" / "lme4_fits.R"
APT_LME4 = ["r-base-core", "r-cran-lme4", "r-cran-jsonlite"]


def find_lme4(*, install: bool) -> str | None:
    """None when ``Rscript`` with lme4 and jsonlite works, else why not (after one apt-get try if asked)."""

    def check() -> str | None:
        if not shutil.which("Rscript"):
            return "Rscript not found"
        probe = subprocess.run(
            ["Rscript", "-e", "suppressPackageStartupMessages({library(lme4); library(jsonlite)})"],
            capture_output=True, text=True, check=False,
        )
        return None if probe.returncode == 0 else f"R packages missing: {probe.stderr.strip()[-200:]}"

    problem = check()
    if problem and install and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"{problem}; trying apt-get install -y {' '.join(APT_LME4)} ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", *APT_LME4], capture_output=True, check=False)
        problem = check()
    return problem


def run_lme4(data_path: Path, candidates: Mapping[str, str], criterion: str, *,
             log_dir: Path) -> tuple[dict[str, Any] | None, Measured]:
    """lme4's fits on the same CSV: the JSON of ``lme4_fits.R`` (None if it failed) and the process measures."""
    pairs = [f"{name}={formula}" for name, formula in candidates.items()]
    measured = run_measured(
        ["Rscript", str(LME4_SCRIPT), str(data_path), criterion, *pairs], env=dict(os.environ), cwd=data_path.parent,
        time_tool=None, log_dir=log_dir,
    )
    if measured.returncode != 0:
        return None, measured
    return json.loads(measured.stdout), measured
