"""summary.md (the goals, per size, per fit, the example's fixed costs) and scaling.png, from the results rows."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.pipeline.goals import evaluate_goals
from benchmarks.pipeline.measure import Measured
from benchmarks.pipeline.results import number, pick
from benchmarks.pipeline.study import PipelineRun


def write_summary(rows: list[dict[str, Any]], example: dict[str, Any] | None, notes: list[str], path: Path) -> None:
    """summary.md: the goals, a per-size table, per-fit comparison and the example's fixed costs."""
    sizes = sorted({int(r["rows"]) for r in rows})
    lines = ["# Pipeline benchmark", "", f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
             f"on {os.cpu_count()} cores; `{sys.executable} -m benchmarks.pipeline`.", ""]
    stamps = sorted({r["measured_at"] for r in rows if r.get("measured_at")})
    if len(stamps) > 1:
        lines += [f"Sizes come from more than one invocation ({', '.join(stamps)}): ratios across sizes "
                  "mix machine states.", ""]
    lines += ["## Goals (issue 6)", "", "| goal | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {m} | {v} |" for g, t, m, v in evaluate_goals(rows)]
    lines += ["", "## Per size (seconds; memory in MB)", ""]
    stage_names = list(dict.fromkeys(r["name"] for r in rows if r["kind"] == "stage"))
    header = ["rows", "subjects", "whole run", "outside stages", *stage_names, "lme4 fits", "fit / lme4",
              "run / lme4", "peak tree MB", "peak process MB", "selected (ours / lme4)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sizes:
        run = pick(rows, size, "run", "whole run (wall)") or {}
        outside = pick(rows, size, "run", "outside stages (start-up, Prefect, exit)") or {}
        fit = pick(rows, size, "stage", "fit") or {}
        cells = [f"{size:,}", run.get("subjects", ""), _fmt(run.get("seconds")), _fmt(outside.get("seconds"))]
        cells += [_fmt((pick(rows, size, "stage", s) or {}).get("seconds")) for s in stage_names]
        fit_ratio = number(fit.get("ratio_to_lme4"))
        run_ratio = number(run.get("ratio_to_lme4"))
        cells += [
            _fmt(run.get("lme4_seconds")),
            _ratio_text(fit_ratio),
            _ratio_text(run_ratio),
            _fmt(run.get("peak_tree_mb"), 0), _fmt(run.get("peak_process_mb"), 0),
            f"{run.get('selected', '')} / {run.get('lme4_selected') or '-'}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## Per fit (seconds; ML unless marked REML)", "",
              "| rows | fit | ours | lme4 | ours / lme4 | logLik (ours) | ΔlogLik vs lme4 |", "|---|---|---|---|---|---|---|"]
    for size in sizes:
        for r in rows:
            if int(r["rows"]) == size and r["kind"] == "fit":
                ratio = number(r.get("ratio_to_lme4"))
                delta = number(r.get("delta_loglik"))
                loglik = number(r.get("loglik"))
                lines.append(
                    f"| {size:,} | {r['name']} | {_fmt(r.get('seconds'), 3)} | {_fmt(r.get('lme4_seconds'), 3)} | "
                    f"{_ratio_text(ratio)} | {f'{loglik:.4f}' if loglik is not None else ''} | "
                    f"{f'{delta:+.2e}' if delta is not None else ''} |"
                )
    if example:
        lines += _example_lines(example)
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    lines += ["", "![time against rows](scaling.png)", ""]
    path.write_text("\n".join(lines))


def _example_lines(example: dict[str, Any]) -> list[str]:
    lines = ["", "## The bundled example (config/example.yaml), end to end", "",
             "| run | wall s | stages s | outside stages s | ingest | validate | fit | select | report | peak tree MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label in ("cold", "warm"):
        run: PipelineRun = example[label]
        if run.error:
            lines.append(f"| {label} | failed: {run.error[:120]} |")
            continue
        stages = sum(run.stages.values())
        lines.append(
            f"| {label} Prefect home | {run.measured.seconds:.2f} | {stages:.2f} | {run.measured.seconds - stages:.2f} | "
            + " | ".join(_fmt(run.stages.get(s), 3) for s in ("ingest", "validate", "fit", "select", "report"))
            + f" | {_fmt(run.measured.peak_tree_mb, 0)} |"
        )
    validate_only: Measured = example["validate_only"]
    lines += ["", f"`longitudinal validate` (ingest + validation, no Prefect): {validate_only.seconds:.2f} s "
              f"(exit {validate_only.returncode}); `python -c pass`: {example['python_start']:.2f} s.", "",
              "Import time in a fresh interpreter (each alone, so shared dependencies count in each):", "",
              "| module | -X importtime cumulative s | wall s (minus interpreter start) |", "|---|---|---|"]
    for row in example["imports"]:
        lines.append(f"| {row['module']} | {_fmt(row['importtime_seconds'], 2)} | {_fmt(row['wall_seconds'], 2)}"
                     f"{'' if row['ok'] else ' (import failed)'} |")
    lines += ["", f"Heavy modules loaded by `import flows.study_pipeline`: {', '.join(example['loaded_by_flow']) or 'none'}.",
              f"By `import longitudinal.fit.lmm`: {', '.join(example['loaded_by_engine']) or 'none'}."]
    return lines


def _ratio_text(ratio: float | None) -> str:
    """0.02 as '1/50', 2.5 as '2.5×'."""
    if ratio is None:
        return ""
    return f"1/{1 / ratio:.0f}" if ratio < 1 else f"{ratio:.1f}×"


def _fmt(value: Any, digits: int = 2) -> str:
    parsed = number(value)
    return "" if parsed is None else f"{parsed:.{digits}f}"


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log time against rows: whole run, fit stage, lme4's fits; a dotted line of slope 1 for scale."""
    from matplotlib.figure import Figure

    series = {
        "whole longitudinal run": lambda size: number((pick(rows, size, "run", "whole run (wall)") or {}).get("seconds")),
        "fit stage (3 ML + REML refit)": lambda size: number((pick(rows, size, "stage", "fit") or {}).get("seconds")),
        "lme4 fits (3 ML + REML refit)": lambda size: number(
            (pick(rows, size, "run", "whole run (wall)") or {}).get("lme4_seconds")),
    }
    sizes = sorted({int(r["rows"]) for r in rows})
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    for (label, value), marker in zip(series.items(), ("o", "s", "^")):
        points = [(s, value(s)) for s in sizes if value(s)]
        if points:
            axes.plot(*zip(*points), marker=marker, label=label)
    fit_points = [(s, v) for s in sizes if (v := series["fit stage (3 ML + REML refit)"](s))]
    if fit_points:
        s0, v0 = fit_points[0]
        axes.plot([s0, sizes[-1]], [v0, v0 * sizes[-1] / s0], linestyle=":", color="grey",
                  label="linear in rows (from the smallest fit stage)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("rows (subjects × 10 visits)")
    axes.set_ylabel("seconds")
    axes.set_title("longitudinal vs lme4: time against rows")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
