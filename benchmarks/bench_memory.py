"""Peak memory per stage of a run (issue 17: 2M rows within 1 GB), in this process, without Prefect.

Simulates the benchmark study (``longitudinal.simulate``: patient_id, week, arm, age, site, score; balanced,
rows/10 subjects x 10 visits, or ``--design unbalanced``: 3-12 visits at irregular times), writes it as CSV
(or Parquet), then runs the library's stage functions as ``flows/study_pipeline.py``'s ``_run_stages`` does,
holding what it holds: ingest (``curate``, into a temporary output folder) -> validate -> fit the three
candidates by ML -> select (BIC) -> REML refit -> infer -> write the run folder.

After each stage it prints the stage's peak resident set (``VmHWM``, reset before the stage through
``/proc/self/clear_refs``), its rise above the resident set at the stage's start (the stage's own working set,
as far as it did not reuse memory the process had freed but kept), the resident set left when it ends (what the
run still holds) and, with
``--trace``, the lines that allocated most during the stage (tracemalloc: numpy and Python objects; Arrow's own
pool is not traced, so compare with the RSS columns). ``--repeat-run`` runs the stages a second time on the same
output folder, as a second run reads the curated Parquet parts instead of the CSV.

    .venv/bin/python benchmarks/bench_memory.py                        # 2M rows balanced, CSV: about 2 minutes
    .venv/bin/python benchmarks/bench_memory.py --design unbalanced --trace
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240601
CANDIDATES = {
    "ri": "score ~ week * arm + age + (1 | patient_id)",
    "ris": "score ~ week * arm + age + (week | patient_id)",
    "ris_uncorrelated": "score ~ week * arm + age + (week || patient_id)",
}


def simulate(rows: int, design: str):  # -> pd.DataFrame
    """The study: balanced (rows/10 subjects x 10 weekly visits) or unbalanced (3-12 visits, jittered times)."""
    from longitudinal.simulate import SimulationSpec, simulate_trial

    if design == "balanced":
        spec = SimulationSpec(n_subjects=rows // 10, min_visits=10, max_visits=10, dropout_probability=0.0, seed=SEED)
        return simulate_trial(spec)
    # 3 guaranteed visits, then 9 more at most with a 15 % dropout before each: 6.5 visits on average.
    spec = SimulationSpec(n_subjects=int(rows / 6.5), min_visits=3, max_visits=12, dropout_probability=0.15,
                          seed=SEED)
    frame = simulate_trial(spec)
    jitter = np.random.default_rng(SEED + 1).uniform(-0.35, 0.35, size=len(frame))
    week = frame["week"].to_numpy(dtype=np.float64)
    return frame.assign(week=np.round(np.where(week > 0, week + jitter, week), 2))


def write_study(rows: int, design: str, data_format: str, folder: Path, estimates: bool) -> Path:
    from longitudinal.simulate import write_table

    data = write_table(simulate(rows, design), folder / f"data.{data_format}")
    lines = [
        "study: bench-memory", "data:", f"  source: {json.dumps(str(data))}", "  subject: patient_id",
        "  time: week", "  outcome: score", "  categorical: [site]", "validation:",
        "  min_observations_per_subject: 2", "models:", "  criterion: bic", "  candidates:",
        *(f"    {name}: {json.dumps(formula)}" for name, formula in CANDIDATES.items()),
        *(["estimates:", "  by: arm", "  at: {week: [0, 3, 7]}"] if estimates else []),
        "output:", f"  directory: {json.dumps(str(folder / 'reports'))}",
    ]
    path = folder / "study.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")  # resets VmHWM to the current RSS


class Stages:
    """Runs stages one after another, recording each one's peak and final resident set (MB)."""

    def __init__(self, trace: bool, top: int, trim: bool = False) -> None:
        self.trace, self.top, self.trim = trace, top, trim
        self.rows: list[tuple[str, float, float, float, float]] = []

    def run(self, name: str, call: Callable[[], Any]) -> Any:
        gc.collect()
        if self.trim:
            import pyarrow

            pyarrow.default_memory_pool().release_unused()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        _reset_peak()
        start = _status_kib("VmRSS") / 1024
        if self.trace:
            tracemalloc.start(25)
        began = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - began
        peak, now = _status_kib("VmHWM") / 1024, _status_kib("VmRSS") / 1024
        if self.trace:
            snapshot = tracemalloc.take_snapshot()
            traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            self._print_top(name, snapshot, traced_peak)
        self.rows.append((name, seconds, peak, peak - start, now))
        arrow = sys.modules["pyarrow"].total_allocated_bytes() / 2**20 if "pyarrow" in sys.modules else 0.0
        print(f"{name:<22} {seconds:7.1f} s   peak {peak:7.0f} MB (+{peak - start:4.0f})   after {now:7.0f} MB   "
              f"(Arrow holds {arrow:.0f} MB)", flush=True)
        return result

    def _print_top(self, name: str, snapshot: tracemalloc.Snapshot, traced_peak: float) -> None:
        """What the stage still holds, by the innermost library line that allocated it (not where it peaked)."""
        filtered = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        stats = filtered.statistics("traceback")
        print(f"  {name}: traced peak {traced_peak:.0f} MB; held at its end, biggest:")
        for stat in stats[: self.top]:
            frames = [f for f in stat.traceback if "/longitudinal/" in f.filename or "/tasks/" in f.filename]
            where = frames[-1] if frames else stat.traceback[-1]
            print(f"    {stat.size / 2**20:8.1f} MB  {Path(where.filename).name}:{where.lineno}")

    def table(self) -> str:
        lines = ["| stage | seconds | peak RSS (MB) | above its start (MB) | RSS after (MB) |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {s:.1f} | {p:.0f} | {w:.0f} | {a:.0f} |" for n, s, p, w, a in self.rows]
        overall = max(p for _, _, p, _, _ in self.rows)
        lines.append(f"| **run** | {sum(s for _, s, _, _, _ in self.rows):.1f} | **{overall:.0f}** | | |")
        return "\n".join(lines)


def run_stages(config_path: Path, stages: Stages) -> None:
    """The flow's ``_run_stages``, in process: the same library calls, the same objects held until the end."""
    from longitudinal.config import load_config
    from longitudinal.data.curation import curate, fingerprint
    from longitudinal.data.validation import validate_visits
    from longitudinal.fit.candidate import fit_candidate
    from longitudinal.inference.criteria import select_model
    from longitudinal.inference.reported import check_estimates, report_inference
    from longitudinal.model.formula import check_candidates, parse_candidates
    from longitudinal.records import ReportInputs
    from longitudinal.reporting.run_folder import (
        package_versions, publish_run, report_fits, run_id_of, start_run, write_run_files,
    )

    config = load_config(config_path)
    formulas = parse_candidates(config.models.candidates)
    staging = start_run(config.output_dir)

    curated = stages.run("ingest", lambda: curate(config))
    ingested, files = curated.ingested, curated.ingested.files
    del curated

    def validate() -> Any:
        covariates = check_candidates(formulas, config.data.roles, list(ingested.raw.columns))
        validated = validate_visits(ingested, config, covariates)
        check_estimates(config, validated.visits, formulas)
        return validated

    validated = stages.run("validate", validate)
    del ingested  # as the flow does: the rows as read and as typed are validation's input only
    visits = validated.visits
    data_hash = stages.run("fingerprint", lambda: fingerprint(visits))
    fits = [stages.run(f"fit {name} ML", lambda n=name, f=text: fit_candidate(visits, n, f, method="ML"))
            for name, text in config.models.candidates.items()]
    selection = stages.run("select", lambda: select_model(fits, config.models.criterion))
    chosen = selection.selected
    fits = list(report_fits(fits, next(f for f in fits if f.name == chosen)))  # as the flow does
    selected = stages.run(f"fit {chosen} REML",
                          lambda: fit_candidate(visits, chosen, config.models.candidates[chosen], method="REML"))
    fits = list(report_fits(fits, selected))
    reported = stages.run("infer", lambda: report_inference(selected, visits, config))
    inputs = ReportInputs(
        study=config.study, run_id=run_id_of(staging), created="2026-11-30T00:00:00+00:00", config=config,
        files=files, validated=validated, selection=selection, fits=tuple(fits), selected=reported.fit,
        timings={"stages": {}, "fits": {}}, versions=package_versions(), estimates=reported.estimates,
        explained=reported.explained, df_method=reported.df_method,
    )
    stages.run("report", lambda: write_run_files(staging, inputs))
    publish_run(staging, run_id_of(staging))  # releases the study's run lock (a second run waits for it)
    print(f"data hash {data_hash[:12]}; selected {chosen}; rows read {validated.rows_read} = analysed "
          f"{validated.rows_analysed} + quarantined {validated.rows_quarantined}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--design", choices=("balanced", "unbalanced"), default="balanced")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv", dest="data_format")
    parser.add_argument("--estimates", action="store_true", help="marginal means by arm at weeks 0, 3, 7")
    parser.add_argument("--repeat-run", action="store_true", help="run again, reading the curated parts")
    parser.add_argument("--trace", action="store_true", help="tracemalloc: what each stage allocated")
    parser.add_argument("--trim", action="store_true",
                        help="before each stage, Arrow's pool and glibc's heap give freed memory back to the system")
    parser.add_argument("--top", type=int, default=6, help="with --trace: lines shown per stage")
    parser.add_argument("--keep", type=Path, help="simulate into this folder and keep it (else a temporary one)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        folder = options.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        config = write_study(options.rows, options.design, options.data_format, folder, options.estimates)
        gc.collect()
        print(f"{options.rows:,} rows, {options.design}, {options.data_format}; RSS before the run "
              f"{_status_kib('VmRSS') / 1024:.0f} MB (the simulation's peak: {_status_kib('VmHWM') / 1024:.0f} MB)",
              flush=True)
        for attempt in range(2 if options.repeat_run else 1):
            stages = Stages(options.trace, options.top, options.trim)
            if attempt:
                print("\nsecond run (the curated parts):")
            run_stages(config, stages)
            print("\n" + stages.table())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
