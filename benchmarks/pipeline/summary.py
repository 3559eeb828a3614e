"""summary.md (the goals, per study, per fit, the example and serve), scaling.png and the draft of the README's
Performance section, from the results rows."""

from __future__ import annotations

import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.pipeline.goals import evaluate_goals
from benchmarks.pipeline.measure import Measured
from benchmarks.pipeline.results import number, pick, pick_all

STUDY_DESIGNS = ("balanced", "unbalanced")


def studies(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(design, rows) of every simulated study in the rows, balanced first, by size."""
    keys = {(r["design"], int(r["rows"])) for r in rows if r["design"] in STUDY_DESIGNS}
    return sorted(keys, key=lambda key: (STUDY_DESIGNS.index(key[0]), key[1]))


def write_summary(rows: list[dict[str, Any]], extras: dict[str, Any], notes: list[str], path: Path) -> None:
    """summary.md: the goals, a per-study table, per-fit comparison, the example, serve and the notes.

    ``extras`` holds what only this invocation measured and results.csv does not keep: ``example`` (validate
    and import times), ``serve`` (its start-up, an error) and ``background`` (memory of the processes that
    persist across runs)."""
    command = " ".join([sys.executable, "-m", "benchmarks.pipeline", *sys.argv[1:]])
    lines = ["# Pipeline benchmark", "", f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
             f"on {os.cpu_count()} cores; `{command}`.", ""]
    stamps = sorted({r["measured_at"] for r in rows if r.get("measured_at")})
    if len(stamps) > 1:
        lines += [f"Rows come from more than one invocation ({', '.join(stamps)}): ratios across them mix "
                  "machine states.", ""]
    lines += ["## Goals (issue 17)", "", "| goal | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {_cell(g)} | {t} | {_cell(m)} | {v} |" for g, t, m, v in evaluate_goals(rows)]
    lines += _study_lines(rows) + _fit_lines(rows)
    lines += _example_lines(rows, extras.get("example")) + _serve_lines(rows, extras.get("serve"))
    background = extras.get("background")
    if background:
        lines += ["", "## Processes that persist across runs", "",
                  "`longitudinal run` worked in a background daemon of the benchmark's Prefect home (its forked "
                  "run processes count in each run's memory above). What stays between runs, measured after the "
                  "last study (proportional set, MB):", "",
                  "| daemon | Prefect server (tree) | daemon's other children |", "|---|---|---|",
                  f"| {background['daemon_mb']:.0f} | {background['prefect_server_mb']:.0f} | "
                  f"{background['other_children_mb']:.0f} |"]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    lines += ["", "![time against rows](scaling.png)", ""]
    path.write_text("\n".join(lines))


def _study_lines(rows: list[dict[str, Any]]) -> list[str]:
    stage_names = list(dict.fromkeys(r["name"] for r in rows if r["kind"] == "stage"))
    header = ["design", "rows", "subjects", "whole run", "outside stages", *stage_names, "lme4 fits", "fit / lme4",
              "run / lme4", "peak MB", "peak process MB", "selected (ours / lme4)"]
    lines = ["", "## Per study (seconds; memory in MB)", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for design, size in studies(rows):
        run = pick(rows, size, "run", "whole run (wall)", design) or {}
        outside = pick(rows, size, "run", "outside stages (start-up, Prefect, exit)", design) or {}
        fit = pick(rows, size, "stage", "fit", design) or {}
        subjects = number(run.get("subjects"))
        cells = [design, f"{size:,}", f"{subjects:,.0f}" if subjects else "", _fmt(run.get("seconds")),
                 _fmt(outside.get("seconds"))]
        cells += [_fmt((pick(rows, size, "stage", s, design) or {}).get("seconds")) for s in stage_names]
        cells += [
            _fmt(run.get("lme4_seconds")) or "-",
            ratio_text(number(fit.get("ratio_to_lme4"))),
            ratio_text(number(run.get("ratio_to_lme4"))),
            _fmt(run.get("peak_tree_mb"), 0), _fmt(run.get("peak_process_mb"), 0),
            f"{run.get('selected') or 'failed'} / {run.get('lme4_selected') or '-'}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _fit_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Per fit (seconds; ML unless marked REML)", "",
             "| design | rows | fit | ours | lme4 | ours / lme4 | logLik (ours) | ΔlogLik vs lme4 |",
             "|---|---|---|---|---|---|---|---|"]
    for design, size in studies(rows):
        for r in rows:
            if r["design"] == design and int(r["rows"]) == size and r["kind"] == "fit":
                delta, loglik = number(r.get("delta_loglik")), number(r.get("loglik"))
                lines.append(
                    f"| {design} | {size:,} | {r['name']} | {_fmt(r.get('seconds'), 3)} | "
                    f"{_fmt(r.get('lme4_seconds'), 3)} | {ratio_text(number(r.get('ratio_to_lme4')))} | "
                    f"{f'{loglik:.4f}' if loglik is not None else ''} | "
                    f"{f'{delta:+.2e}' if delta is not None else ''} |"
                )
    return lines


def _wall_stages_outside(row: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """A row's wall seconds, its stages' seconds and the difference (the time outside the stages)."""
    wall, stages = number(row.get("seconds")), number(row.get("stages_seconds"))
    return wall, stages, (wall - stages if wall is not None and stages is not None else None)


def _example_lines(rows: list[dict[str, Any]], example: dict[str, Any] | None) -> list[str]:
    runs = pick_all(rows, "example", "run") + pick_all(rows, "example", "second run")
    if not runs:
        return []
    lines = ["", "## The bundled example (config/example.yaml)", "",
             "A first run in a new Prefect home, then second runs in a row, each with candidate `ri` changed "
             "(its fit not cached; the others' and the REML refit are), each a fresh `longitudinal run` process "
             "timed to its exit.", "",
             "| run | wall s | stages s | outside stages s | peak MB | selected |", "|---|---|---|---|---|---|"]
    for r in runs:
        wall, stages, outside = _wall_stages_outside(r)
        lines.append(f"| {_cell(r['name'])} | {_fmt(wall) or 'failed'} | {_fmt(stages)} | {_fmt(outside)} | "
                     f"{_fmt(r.get('peak_tree_mb'), 0)} | {r.get('selected') or ''} |")
    seconds = [v for r in pick_all(rows, "example", "second run") if (v := number(r.get("seconds"))) is not None]
    if seconds:
        lines += ["", f"Second run: min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s."]
    if example:
        validate_only: Measured = example["validate_only"]
        lines += ["", f"`longitudinal validate` (ingest + validation, no Prefect): {validate_only.seconds:.2f} s "
                  f"(exit {validate_only.returncode}); `python -c pass`: {example['python_start']:.2f} s.", "",
                  "Import time in a fresh interpreter (each alone, so shared dependencies count in each):", "",
                  "| module | -X importtime cumulative s | wall s (minus interpreter start) |", "|---|---|---|"]
        for row in example["imports"]:
            lines.append(f"| {row['module']} | {_fmt(row['importtime_seconds'])} | {_fmt(row['wall_seconds'])}"
                         f"{'' if row['ok'] else ' (import failed)'} |")
        lines += ["", "Heavy modules loaded by `import flows.study_pipeline`: "
                  f"{', '.join(example['loaded_by_flow']) or 'none'}.",
                  f"By `import longitudinal.fit.lmm`: {', '.join(example['loaded_by_engine']) or 'none'}."]
    return lines


def _serve_lines(rows: list[dict[str, Any]], serve: dict[str, Any] | None) -> list[str]:
    arrivals = pick_all(rows, "serve", "latency")
    if not arrivals and not serve:
        return []
    lines = ["", "## The bundled example under `longitudinal serve`", "",
             "A Prefect server, `longitudinal serve` (its defaults: a file renamed in counts after 0.3 s) on a copy of the example whose "
             "`data.source` is a landing folder; each arrival is the example's rows under new subject ids, moved "
             "into the folder at once, timed until the study's `latest` link points at a new run folder with "
             "`report.html`. Each run analyses every file landed so far.", "",
             "| arrival | rows analysed | file to report s | stages s | outside stages s |", "|---|---|---|---|---|"]
    for r in arrivals:
        wall, stages, outside = _wall_stages_outside(r)
        lines.append(f"| {r['name']} | {int(r['rows']):,} | {_fmt(wall)} | {_fmt(stages)} | {_fmt(outside)} |")
    seconds = [v for r in arrivals if (v := number(r.get("seconds"))) is not None]
    if seconds:
        lines += ["", f"File to report: min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s."]
    if serve and serve.get("serve_ready_seconds") is not None:
        lines += ["", f"`longitudinal serve` was serving {serve['serve_ready_seconds']:.1f} s after it started."]
    if serve and serve.get("error"):
        lines += ["", "Serve failed:", "", "```", serve["error"], "```"]
    return lines


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a formula's ``|`` escaped."""
    return text.replace("|", "\\|")


def ratio_text(ratio: float | None) -> str:
    """0.02 as '1/50', 0.78 as '0.78×', 2.5 as '2.5×'."""
    if ratio is None:
        return ""
    if ratio <= 0.5:
        return f"1/{1 / ratio:.0f}"
    return f"{ratio:.2f}×" if ratio < 1 else f"{ratio:.1f}×"


def _fmt(value: Any, digits: int = 2) -> str:
    parsed = number(value)
    return "" if parsed is None else f"{parsed:.{digits}f}"


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log seconds against rows, per design: whole run, fit stage, lme4's fits; a dotted slope-1 line."""
    from matplotlib.figure import Figure

    measures = {
        "whole run": lambda d, s: (pick(rows, s, "run", "whole run (wall)", d) or {}).get("seconds"),
        "fit stage": lambda d, s: (pick(rows, s, "stage", "fit", d) or {}).get("seconds"),
        "lme4 fits": lambda d, s: (pick(rows, s, "run", "whole run (wall)", d) or {}).get("lme4_seconds"),
    }
    colours = {"whole run": "tab:blue", "fit stage": "tab:green", "lme4 fits": "tab:red"}
    styles = {"balanced": ("-", "o"), "unbalanced": ("--", "s")}
    keys = studies(rows)
    figure = Figure(figsize=(7.2, 4.8), layout="constrained")
    axes = figure.add_subplot()
    all_sizes = sorted({s for _, s in keys})
    for design in STUDY_DESIGNS:
        sizes = [s for d, s in keys if d == design]
        line, marker = styles[design]
        for label, value in measures.items():
            points = [(s, v) for s in sizes if (v := number(value(design, s)))]
            if points:
                axes.plot(*zip(*points), linestyle=line, marker=marker, color=colours[label],
                          label=f"{label}, {design}")
    fit_points = [(s, v) for d, s in keys if (v := number(measures["fit stage"](d, s)))]
    if fit_points and len(all_sizes) > 1:
        s0, v0 = min(fit_points)
        axes.plot([s0, all_sizes[-1]], [v0, v0 * all_sizes[-1] / s0], linestyle=":", color="grey",
                  label="linear in rows (from the smallest fit stage)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("rows")
    axes.set_ylabel("seconds")
    axes.set_title("longitudinal vs lme4 (3 ML fits + REML refit): time against rows")
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small", loc="upper left")
    else:
        axes.text(0.5, 0.5, "no study measured yet", transform=axes.transAxes, ha="center")
    figure.savefig(path, dpi=120)


def write_readme_draft(rows: list[dict[str, Any]], path: Path) -> None:
    """A draft of the README's Performance section from these rows: the goals and the per-study table."""
    stamps = sorted({r["measured_at"][:10] for r in rows if r.get("measured_at")})
    lines = ["## Performance", "",
             "`make bench` simulates balanced studies (10 weekly visits per subject) and unbalanced ones (3–12 "
             "visits per subject at irregular times, every subject its own pattern), runs the whole `longitudinal run` "
             "(three candidates, selection by BIC, REML refit of the winner) as a new process each time, and fits "
             "the same formulas with lme4 on the same CSV in the same invocation; it also times the bundled "
             "example's second run and a file's way to its report under `longitudinal serve` (details: "
             "`benchmarks/README.md`; full tables: `benchmarks/results/summary.md`). "
             f"Last run ({', '.join(stamps)}), on this project's 2-core shared machine (compare ratios, not seconds):",
             "", "| goal (issue 17) | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {_cell(g)} | {t} | {_cell(m)} | {v} |" for g, t, m, v in evaluate_goals(rows)]
    lines += ["", "| study | rows | subjects | whole run | fit stage | lme4's fits | fit / lme4 | peak memory |",
              "|---|---|---|---|---|---|---|---|"]
    for design, size in studies(rows):
        run = pick(rows, size, "run", "whole run (wall)", design) or {}
        fit = pick(rows, size, "stage", "fit", design) or {}
        peak, theirs = number(run.get("peak_tree_mb")), number(run.get("lme4_seconds"))
        lines.append(
            f"| {design} | {size:,} | {int(number(run.get('subjects')) or 0):,} | {_fmt(run.get('seconds'), 1)} s | "
            f"{_fmt(fit.get('seconds'))} s | {f'{theirs:.1f} s' if theirs else '-'} | "
            f"{ratio_text(number(fit.get('ratio_to_lme4'))) or '-'} | {f'{peak / 1024:.2f} GB' if peak else ''} |")
    lines += ["", *_slowest_stages(rows), "", *HOW_MEASURED, "", "![time against rows](benchmarks/results/scaling.png)",
              ""]
    path.write_text("\n".join(lines))


HOW_MEASURED = (
    "How each number is measured (`benchmarks/README.md`): the fit stage is the manifest's `timings.stages.fit` "
    "(three ML fits and the REML refit); lme4's are the same four `lmer` fits timed inside R on the same CSV. The "
    "whole run is a fresh `longitudinal run` process, start-up to exit; without `PREFECT_API_URL` it reuses the "
    "background Prefect server and warm process an earlier run started, and its memory counts the processes that "
    "warm process forks for the run (the warm process and the server, which stay between runs, are in "
    "`summary.md`). The example's second run changes a candidate's formula each time, so its fit is not cached; "
    "serve's latency runs from a file's rename into the landing folder to the published `report.html` (serve "
    "counts a renamed-in file as landed after 0.3 s; one written in place, after 2 s unchanged).",
)


def _slowest_stages(rows: list[dict[str, Any]]) -> list[str]:
    """Where the time of each design's largest run went: its slowest stage and the time outside the stages."""
    out = []
    for design in STUDY_DESIGNS:
        sizes = [s for d, s in studies(rows) if d == design]
        if not sizes:
            continue
        size = max(sizes)
        run = number((pick(rows, size, "run", "whole run (wall)", design) or {}).get("seconds"))
        stages = [(r["name"], v) for r in rows if r["design"] == design and int(r["rows"]) == size
                  and r["kind"] == "stage" and (v := number(r.get("seconds"))) is not None]
        outside = number((pick(rows, size, "run", "outside stages (start-up, Prefect, exit)", design) or {})
                         .get("seconds"))
        if run and stages:
            name, seconds = max(stages, key=lambda item: item[1])
            out.append(f"{design.capitalize()}, {size:,} rows: the run took {run:.1f} s, of which the slowest "
                       f"stage, `{name}`, {seconds:.1f} s, the fit stage "
                       f"{dict(stages).get('fit', float('nan')):.1f} s and everything outside the stages "
                       f"(start-up, Prefect, exit) {outside or 0:.1f} s.")
    return out
