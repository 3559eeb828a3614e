"""The benchmarked study at one design and size: simulate it, run ``longitudinal run`` on it, then lme4 on
the same CSV.

Two designs: ``balanced`` (rows/10 subjects × 10 weekly visits, the library's simulator) and ``unbalanced``
(about rows/7.5 subjects with 3-12 visits at irregular times, every subject its own pattern:
``unbalanced.py``). The one place that imports the library (the balanced simulator, lazily: under
``--snapshot`` it comes from the snapshot, put on ``sys.path`` first).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.pipeline.measure import Measured, code_dir, longitudinal_command, run_measured
from benchmarks.pipeline.reference import run_lme4
from benchmarks.pipeline.unbalanced import write_unbalanced

DESIGNS: tuple[str, ...] = ("balanced", "unbalanced")
VISITS_PER_SUBJECT = 10  # balanced
SEED = 20240601
CRITERION = "bic"
CANDIDATES: dict[str, str] = {
    "ri": "score ~ week * arm + age + (1 | patient_id)",
    "ris": "score ~ week * arm + age + (week | patient_id)",
    "ris_uncorrelated": "score ~ week * arm + age + (week || patient_id)",
}


@dataclass
class PipelineRun:
    """What one ``longitudinal run`` reported: the process measures plus the run folder's numbers."""

    measured: Measured
    run_dir: Path | None
    stages: dict[str, float] = field(default_factory=dict)
    fits: dict[str, float] = field(default_factory=dict)
    logliks: dict[str, float] = field(default_factory=dict)
    selected: str | None = None
    rows_analysed: int | None = None
    error: str | None = None

    @property
    def stages_seconds(self) -> float | None:
        """The seconds of the run's stages together (from its manifest); None when it has none."""
        return sum(self.stages.values()) if self.stages else None


def simulate_study(design: str, rows: int, folder: Path, seed: int | None = None) -> tuple[Path, int]:
    """The study as CSV, and its number of subjects (``seed`` None: the design's own).

    ``balanced``: rows/10 subjects × 10 weekly visits, no dropout, no bad rows (``longitudinal.simulate``);
    ``unbalanced``: exactly ``rows`` rows, 3-12 visits per subject at irregular weeks (``unbalanced.py``).
    """
    if design == "unbalanced":
        return write_unbalanced(rows, folder / "data.csv", *(() if seed is None else (seed,)))
    if design != "balanced":
        raise ValueError(f"unknown design {design!r}; designs are {', '.join(DESIGNS)}")
    from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

    spec = SimulationSpec(
        n_subjects=max(1, rows // VISITS_PER_SUBJECT), min_visits=VISITS_PER_SUBJECT,
        max_visits=VISITS_PER_SUBJECT, dropout_probability=0.0, seed=SEED if seed is None else seed,
    )
    return write_table(simulate_trial(spec), folder / "data.csv"), spec.n_subjects


def write_study_config(data_path: Path, folder: Path, study: str) -> Path:
    """A config for the benchmark study: the three candidates, BIC, no range check (nothing quarantined)."""
    lines = [
        f"study: {study}",
        "data:",
        f"  source: {json.dumps(str(data_path))}",
        "  subject: patient_id",
        "  time: week",
        "  outcome: score",
        "  categorical: [site]",
        "validation:",
        "  min_observations_per_subject: 2",
        "models:",
        f"  criterion: {CRITERION}",
        "  candidates:",
        *(f"    {name}: {json.dumps(formula)}" for name, formula in CANDIDATES.items()),
        "output:",
        f"  directory: {json.dumps(str(folder / 'reports'))}",
    ]
    path = folder / "study.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_pipeline(config: Path, *, env: dict[str, str], time_tool: str | None, log_dir: Path) -> PipelineRun:
    """Run ``longitudinal run --config`` and collect manifest timings, logLiks and the selection.

    Without ``PREFECT_API_URL`` the run's memory includes the processes a background daemon of its Prefect
    home forks for it (``measure.RunProcesses``)."""
    home = None if env.get("PREFECT_API_URL") else Path(env["PREFECT_HOME"])
    measured = run_measured(
        [*longitudinal_command(), "run", "--config", str(config)], env=env, cwd=code_dir(env), time_tool=time_tool,
        log_dir=log_dir, prefect_home=home,
    )
    lines = [line for line in measured.stdout.splitlines() if line.strip()]
    run_dir = Path(lines[-1].strip()) if lines else None
    if measured.returncode != 0 or run_dir is None or not (run_dir / "manifest.json").exists():
        tail = (measured.stderr.strip() or measured.stdout.strip())[-800:]
        return PipelineRun(measured, None, error=f"exit {measured.returncode}: {tail}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    result = PipelineRun(
        measured, run_dir,
        stages={k: float(v) for k, v in manifest.get("timings", {}).get("stages", {}).items()},
        fits={k: float(v) for k, v in manifest.get("timings", {}).get("fits", {}).items()},
        selected=manifest.get("selected"),
        rows_analysed=manifest.get("rows", {}).get("analysed"),
    )
    comparison = run_dir / "model_comparison.csv"
    if comparison.exists():
        with comparison.open() as handle:
            for row in csv.DictReader(handle):
                result.logliks[row["model"]] = float(row["loglik"])
    selected_json = run_dir / "selected_model.json"
    if selected_json.exists() and result.selected:
        loglik = json.loads(selected_json.read_text()).get("loglik")
        if loglik is not None:
            result.logliks[f"{result.selected} (REML)"] = float(loglik)
    return result


@dataclass
class SizeResult:
    """Everything measured at one design and size."""

    design: str
    rows: int
    subjects: int
    simulate_seconds: float
    pipeline: PipelineRun
    lme4: dict[str, Any] | None
    lme4_note: str | None
    measured_at: str

    @property
    def data_rows(self) -> int:
        """Rows in the CSV: a balanced study has whole subjects of 10 visits, an unbalanced one exactly ``rows``."""
        return self.subjects * VISITS_PER_SUBJECT if self.design == "balanced" else self.rows


def measure_size(design: str, rows: int, workdir: Path, *, env: dict[str, str], time_tool: str | None,
                 lme4_problem: str | None, measured_at: str, seed: int | None = None) -> SizeResult:
    """Simulate one study, run the pipeline on it, then lme4 on the same CSV (unless ``lme4_problem`` says
    why not). ``seed`` other than the design's own gives other data (the warm-up's, whose fits must not
    be in the fit cache when a measured study runs)."""
    folder = workdir / f"{design}_{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data_path, subjects = simulate_study(design, rows, folder, seed)
    simulate_seconds = time.perf_counter() - began
    config = write_study_config(data_path, folder, f"bench-{design}-{rows}")
    print(f"  {design} {rows:,} rows ({subjects:,} subjects): data written in {simulate_seconds:.1f} s; "
          "longitudinal run ...", flush=True)
    pipeline = run_pipeline(config, env=env, time_tool=time_tool, log_dir=folder / "logs")
    if pipeline.error:
        print(f"  pipeline FAILED: {pipeline.error}", flush=True)
    else:
        peak = pipeline.measured.peak_tree_mb
        print(
            f"  run {pipeline.measured.seconds:.1f} s, peak {peak or float('nan'):.0f} MB, stages "
            + ", ".join(f"{k} {v:.2f}" for k, v in pipeline.stages.items()),
            flush=True,
        )
    lme4: dict[str, Any] | None = None
    note = lme4_problem
    if lme4_problem is None:
        print("  lme4 ...", flush=True)
        lme4, measured = run_lme4(data_path, CANDIDATES, CRITERION, log_dir=folder / "logs")
        if lme4 is None:
            note = f"lme4_fits.R failed (exit {measured.returncode}): {measured.stderr.strip()[-300:]}"
            print(f"  {note}", flush=True)
        else:
            print(f"  lme4 fits {lme4['fit_seconds_total']:.2f} s (process {measured.seconds:.1f} s)", flush=True)
    return SizeResult(
        design=design, rows=rows, subjects=subjects, simulate_seconds=simulate_seconds,
        pipeline=pipeline, lme4=lme4, lme4_note=note,
        measured_at=measured_at,
    )


def result_rows(result: SizeResult) -> list[dict[str, Any]]:
    """The results.csv rows of one design and size: the whole run, each stage, each fit, lme4's totals."""
    p, lme4 = result.pipeline, result.lme4
    base = {"design": result.design, "rows": result.rows, "subjects": result.subjects,
            "measured_at": result.measured_at}
    lme4_fits: dict[str, dict[str, Any]] = {}
    if lme4:
        lme4_fits = dict(lme4["fits"]) | {f"{lme4['selected']} (REML)": lme4["refit"]}
    lme4_total = float(lme4["fit_seconds_total"]) if lme4 else None
    out: list[dict[str, Any]] = []

    def ratio(ours: float | None, theirs: float | None) -> float | None:
        return ours / theirs if ours is not None and theirs else None

    out.append(base | {
        "kind": "run", "name": "whole run (wall)", "seconds": p.measured.seconds,
        "stages_seconds": p.stages_seconds, "lme4_seconds": lme4_total,
        "ratio_to_lme4": ratio(p.measured.seconds, lme4_total), "peak_tree_mb": p.measured.peak_tree_mb,
        "peak_process_mb": p.measured.peak_process_mb, "selected": p.selected,
        "lme4_selected": lme4["selected"] if lme4 else None,
    })
    overhead = p.measured.seconds - sum(p.stages.values()) if p.stages else None
    out.append(base | {"kind": "run", "name": "outside stages (start-up, Prefect, exit)", "seconds": overhead})
    for stage, seconds in p.stages.items():
        row = base | {"kind": "stage", "name": stage, "seconds": seconds}
        if stage == "fit":
            row |= {"lme4_seconds": lme4_total, "ratio_to_lme4": ratio(seconds, lme4_total)}
        out.append(row)
    for name in dict.fromkeys([*p.fits, *lme4_fits]):
        theirs = lme4_fits.get(name, {})
        ours_ll, their_ll = p.logliks.get(name), theirs.get("loglik")
        out.append(base | {
            "kind": "fit", "name": name, "seconds": p.fits.get(name), "lme4_seconds": theirs.get("seconds"),
            "ratio_to_lme4": ratio(p.fits.get(name), theirs.get("seconds")), "loglik": ours_ll,
            "lme4_loglik": their_ll,
            "delta_loglik": ours_ll - their_ll if ours_ll is not None and their_ll is not None else None,
        })
    if lme4:
        out.append(base | {"kind": "lme4", "name": "read CSV in R", "lme4_seconds": lme4["read_seconds"]})
    return out
