"""Where the report stage's time goes (issue 17): the bundled example and simulated studies of 200k and 2M rows.

Builds the report's inputs as the flow does, without Prefect (read the sources, validate, fit every candidate
by ML, select, refit the chosen one by REML, ``report_inference``), then times, in this process:

- ``write_run_files`` into a temporary folder, whole: first in the process, as the flow's report stage runs it
  (fonts and caches loaded then), and again (best of ``--repeats``);
- each figure of ``figure_builders`` alone: building it, and rendering it to PNG (``figure_to_png``);
- the HTML (``render_report``) from those PNGs, and the tables, JSON and data the run folder holds besides.

The example uses ``config/example.yaml`` (2,016 rows, the three candidates). The larger studies are balanced
(rows/10 subjects × 10 visits, ``longitudinal.simulate``, seed 20240601) with two random-intercept candidates, so
that their fits are quick, and the example's marginal means. ``--baseline REV`` measures the same in a second
process on ``git archive REV`` (through ``PYTHONPATH``; git state is not touched) and prints both side by side.

    .venv/bin/python benchmarks/bench_report.py                     # example, 200k, 2M: about 2 minutes
    .venv/bin/python benchmarks/bench_report.py --sizes example --baseline HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

from timing import least_time, snapshot

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240601
VISITS = 10
SIZES = {"example": 0, "200k": 200_000, "2M": 2_000_000}
LARGE_CANDIDATES = {
    "ri": "score ~ week * arm + age + (1 | patient_id)",
    "ri_no_age": "score ~ week * arm + (1 | patient_id)",
}


def study_config(size: str, folder: Path) -> Path:
    """The example's config, or one for a simulated balanced study of ``size`` rows written as Parquet."""
    if size == "example":
        return ROOT / "config" / "example.yaml"
    from longitudinal.simulate import SimulationSpec, simulate_trial

    rows = SIZES[size]
    spec = SimulationSpec(n_subjects=rows // VISITS, min_visits=VISITS, max_visits=VISITS,
                          dropout_probability=0.0, seed=SEED)
    data = folder / "data.parquet"
    simulate_trial(spec).to_parquet(data, index=False)
    lines = [f"study: bench-report-{size}", "data:", f"  source: {json.dumps(str(data))}",
             "  subject: patient_id", "  time: week", "  outcome: score", "models:", "  criterion: bic",
             "  candidates:", *[f"    {name}: {json.dumps(formula)}" for name, formula in LARGE_CANDIDATES.items()],
             "estimates:", "  by: arm", "  at: {week: [0, 3, 7]}", "output:", f"  directory: {json.dumps(str(folder))}"]
    path = folder / "study.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def report_inputs(config_path: Path):  # -> ReportInputs (imported late: --baseline runs another tree)
    """The flow's stages up to the report, in process, without Prefect or the curated store."""
    from longitudinal.config import load_config
    from longitudinal.data.ingest import read_sources
    from longitudinal.data.validation import validate_visits
    from longitudinal.fit.candidate import fit_candidate
    from longitudinal.inference.criteria import select_model
    from longitudinal.inference.reported import report_inference
    from longitudinal.model.formula import check_candidates, parse_candidates
    from longitudinal.records import ReportInputs
    from longitudinal.reporting.run_folder import package_versions

    config = load_config(config_path)
    formulas = parse_candidates(config.models.candidates)
    ingested = read_sources(config)
    covariates = check_candidates(formulas, config.data.roles, list(ingested.raw.columns))
    validated = validate_visits(ingested, config, covariates)
    visits = validated.visits
    fits = tuple(fit_candidate(visits, name, text, method="ML") for name, text in config.models.candidates.items())
    selection = select_model(fits, config.models.criterion)
    chosen = selection.selected
    refit = fit_candidate(visits, chosen, config.models.candidates[chosen], method="REML")
    reported = report_inference(refit, visits, config)
    return ReportInputs(
        study=config.study, run_id="bench", created="2026-11-30T00:00:00+00:00", config=config,
        files=ingested.files, validated=validated, selection=selection, fits=fits, selected=reported.fit,
        timings={"stages": {}, "fits": {}}, versions=package_versions(), estimates=reported.estimates,
        explained=reported.explained, df_method=reported.df_method,
    )


def write_tables(inputs, folder: Path) -> None:
    """What ``write_run_files`` writes besides the figures and the report: tables, JSON, quarantine, data."""
    from longitudinal.data.validation import validation_summary
    from longitudinal.reporting import run_folder as files

    files.write_model_comparison(inputs.selection, folder)
    files.write_json(files.selected_model_summary(inputs.selected, inputs.selection.criterion, inputs.explained,
                                                  inputs.df_used), folder / "selected_model.json")
    if inputs.estimates is not None:
        files.write_estimates(inputs.estimates, folder)
    files.write_json(validation_summary(inputs.validated), folder / "validation.json")
    files.write_quarantine(inputs.validated, folder)
    files.write_data(inputs.validated, folder)


def measure(size: str, repeats: int) -> dict[str, float]:
    """Seconds per item of the report stage at ``size``: ``report stage, first`` (``write_run_files``, whole, the
    first time in this process, as the flow's report stage runs it), ``report stage, again`` (best of ``repeats``),
    and per figure ``build <stem>`` and ``png <stem>`` (in this process), ``all figures`` (as the report stage draws
    them: ``render_pngs`` where it exists), ``html``, ``tables and data``, ``rows``, ``PNG bytes``."""
    from longitudinal.reporting import figures as figure_module
    from longitudinal.reporting.html import render_report
    from longitudinal.reporting.run_folder import write_run_files

    with tempfile.TemporaryDirectory(prefix="bench-report-") as scratch:
        folder = Path(scratch)
        inputs = report_inputs(study_config(size, folder))
        visits, config = inputs.validated.visits, inputs.config
        result: dict[str, float] = {"rows": float(len(visits))}

        def whole() -> None:
            run = folder / f"run-{time.perf_counter_ns()}"
            (run / "figures").mkdir(parents=True)
            write_run_files(run, inputs)

        result["report stage, first"] = least_time(1, whole)  # what a fresh process pays: fonts, caches
        result["report stage, again"] = least_time(repeats, whole)
        builders = figure_module.figure_builders(visits, config, inputs.selection, inputs.selected, fits=inputs.fits,
                                                 estimates=inputs.estimates)
        pngs: dict[str, bytes] = {}
        for stem, build in builders.items():
            result[f"build {stem}"] = least_time(repeats, build)
            figure = build()
            result[f"png {stem}"] = least_time(repeats, lambda: figure_module.figure_to_png(figure))
            pngs[stem] = figure_module.figure_to_png(figure)
        render = getattr(figure_module, "render_pngs", None)  # older trees drew each figure in turn
        result["all figures"] = least_time(repeats, lambda: render(builders) if render else {
            stem: figure_module.figure_to_png(build()) for stem, build in builders.items()})
        result["html"] = least_time(repeats, lambda: render_report(inputs, pngs))
        result["tables and data"] = least_time(repeats, lambda: write_tables(inputs, folder))
        result["PNG bytes"] = float(sum(len(p) for p in pngs.values()))
    return result


def measure_in(tree: Path, sizes: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """:func:`measure` in a fresh interpreter whose ``longitudinal`` is the one in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--json", "--repeats", str(repeats),
               "--sizes", ",".join(sizes)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None,
                rev: str | None) -> None:
    for size, result in results.items():
        before = (baseline or {}).get(size)
        print(f"\n### {size}: {int(result['rows']):,} rows\n")
        header = "| item | seconds |" if before is None else f"| item | {rev} (s) | working tree (s) | ratio |"
        print(header)
        print("|---|---|" if before is None else "|---|---|---|---|")
        items = [k for k in result if k not in ("rows", "PNG bytes")]
        items += [k for k in (before or {}) if k not in result and k not in ("rows", "PNG bytes")]
        figure_sum = {"figures (build + png)": sum(v for k, v in result.items() if k.startswith(("build ", "png ")))}
        for item in [*items, "figures (build + png)", "PNG bytes"]:
            now = figure_sum.get(item, result.get(item, float("nan")))
            if before is None:
                print(f"| {item} | {now:,.3f} |" if item != "PNG bytes" else f"| {item} | {now:,.0f} |")
                continue
            then = (sum(v for k, v in before.items() if k.startswith(("build ", "png ")))
                    if item == "figures (build + png)" else before.get(item, float("nan")))
            ratio = now / then if then else float("nan")
            fmt = "{:,.0f}" if item == "PNG bytes" else "{:,.3f}"
            print(f"| {item} | {fmt.format(then)} | {fmt.format(now)} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="example,200k,2M", help="comma-separated: example, 200k, 2M")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per item")
    parser.add_argument("--baseline", metavar="REV", help="also measure git archive REV, side by side")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    sizes = [s.strip() for s in options.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose among {list(SIZES)}")
    if options.json:
        print(json.dumps({size: measure(size, options.repeats) for size in sizes}))
        return
    baseline = None
    if options.baseline:
        with tempfile.TemporaryDirectory(prefix="bench-report-baseline-") as tree:
            print(f"measuring {options.baseline} ...", flush=True)
            baseline = measure_in(snapshot(options.baseline, Path(tree)), sizes, options.repeats)
    print("measuring the working tree ...", flush=True)
    results = {size: measure(size, options.repeats) for size in sizes}
    print_table(results, baseline, options.baseline)


if __name__ == "__main__":
    main()
