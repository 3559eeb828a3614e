"""The goals of issue 17 (and issue 6's that still say something), checked against the results rows.

Ratios come from one invocation: the fit stage (the manifest's ``timings.stages.fit``: three ML fits and
the REML refit) against lme4's same four fits on the same CSV. The example's second run and the serve
latency are judged on the median of their repeats (the minimum is shown beside it).
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.pipeline.results import number, pick, pick_all

GOAL_FIT_RATIO = 1 / 30  # fit stage / lme4's fits, 200,000 rows, both designs
GOAL_RUN_RATIO = 1.0  # whole run (fresh process) / lme4's fits, 200,000 rows balanced
GOAL_SECOND_RUN = 5.0  # seconds: the example's second run with a changed candidate
GOAL_SERVE = 5.0  # seconds: file arrival to published report under `longitudinal serve`
GOAL_SCALING = 12.0  # fit stage at 2,000,000 / at 200,000 rows (linear)
GOAL_MEMORY_GB = 1.0  # peak memory of the run at 2,000,000 rows
GOAL_LOGLIK = 0.05  # |ΔlogLik| per candidate
SMALL, LARGE = 200_000, 2_000_000

Goal = tuple[str, str, str, str]  # goal, target, measured, verdict


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def _fit_ratio(rows: list[dict[str, Any]], design: str) -> Goal:
    fit = pick(rows, SMALL, "stage", "fit", design)
    ours = number(fit["seconds"]) if fit else None
    theirs = number(fit.get("lme4_seconds")) if fit else None
    ratio = ours / theirs if ours is not None and theirs else None
    return (
        f"200k rows {design}: fit stage / lme4 (3 ML + REML refit)", f"≤ 1/{1 / GOAL_FIT_RATIO:.0f}",
        f"{ours:.2f} s / {theirs:.2f} s = 1/{1 / ratio:.1f}" if ratio else "not measured",
        verdict(ratio <= GOAL_FIT_RATIO if ratio else None),
    )


def _whole_run(rows: list[dict[str, Any]]) -> Goal:
    run = pick(rows, SMALL, "run", "whole run (wall)", "balanced")
    whole, theirs = (number(run["seconds"]), number(run.get("lme4_seconds"))) if run else (None, None)
    return (
        "200k rows balanced: whole run (fresh `longitudinal run`, start-up included) / lme4's fits",
        f"≤ {GOAL_RUN_RATIO:g}",
        f"{whole:.1f} s / {theirs:.1f} s = {whole / theirs:.2f}" if whole and theirs else "not measured",
        verdict(whole / theirs <= GOAL_RUN_RATIO if whole and theirs else None),
    )


def _repeats(goal: str, values: list[float], failed: int, target: float) -> Goal:
    if not values:
        return goal, f"≤ {target:g} s", "not measured" if not failed else f"{failed} failed", verdict(None)
    middle = statistics.median(values)
    shown = ", ".join(f"{v:.2f}" for v in values)
    return (goal, f"≤ {target:g} s (median)",
            f"median {middle:.2f} s, min {min(values):.2f} s ({shown})" + (f"; {failed} failed" if failed else ""),
            verdict(middle <= target and not failed))


def _scaling(rows: list[dict[str, Any]], design: str) -> Goal:
    big, small = pick(rows, LARGE, "stage", "fit", design), pick(rows, SMALL, "stage", "fit", design)
    fit_big = number(big["seconds"]) if big else None
    fit_small = number(small["seconds"]) if small else None
    scale = fit_big / fit_small if fit_big is not None and fit_small else None
    return (
        f"2M rows {design}: fit stage / 200k fit stage", f"≤ {GOAL_SCALING:.0f}",
        f"{fit_big:.2f} s / {fit_small:.2f} s = {scale:.1f}" if scale is not None else "not measured",
        verdict(scale <= GOAL_SCALING if scale is not None else None),
    )


def _memory(rows: list[dict[str, Any]]) -> Goal:
    measured = [(design, mb) for design in ("unbalanced", "balanced")
                if (run := pick(rows, LARGE, "run", "whole run (wall)", design))
                and (mb := number(run.get("peak_tree_mb"))) is not None]
    return (
        "2M rows: peak memory of the run (its processes, proportional set)", f"≤ {GOAL_MEMORY_GB:g} GB",
        ", ".join(f"{design} {mb / 1024:.2f} GB" for design, mb in measured) or "not measured",
        verdict(all(mb / 1024 <= GOAL_MEMORY_GB for _, mb in measured) if measured else None),
    )


def _same_answers(rows: list[dict[str, Any]]) -> list[Goal]:
    deltas = [(r, d) for r in rows if r["kind"] == "fit" and (d := number(r.get("delta_loglik"))) is not None]
    worst = max(deltas, key=lambda item: abs(item[1]), default=None)
    compared = sorted({(r["design"], int(r["rows"])) for r, _ in deltas}, key=lambda key: (key[0], key[1]))
    runs = [r for r in rows if r["kind"] == "run" and r["name"] == "whole run (wall)" and r.get("lme4_selected")]
    differ = [f"{r['design']} {int(r['rows']):,}: ours {r['selected']}, lme4 {r['lme4_selected']}"
              for r in runs if r["selected"] != r["lme4_selected"]]
    where = "; ".join(f"{d} {n:,}" for d, n in compared)
    return [
        ("|ΔlogLik| vs lme4, every fit (ML candidates and the REML refit)", f"≤ {GOAL_LOGLIK}",
         f"largest {abs(worst[1]):.1e} ({worst[0]['design']} {int(worst[0]['rows']):,}, {worst[0]['name']}); "
         f"compared at {where}" if worst else "not measured",
         verdict(abs(worst[1]) <= GOAL_LOGLIK if worst else None)),
        ("same selection as lme4", "same",
         ("; ".join(differ) if differ else f"same at all {len(runs)} studies compared") if runs else "not measured",
         verdict(not differ if runs else None)),
    ]


def evaluate_goals(rows: list[dict[str, Any]]) -> list[Goal]:
    """(goal, target, measured, verdict) for each goal of issue 17, then issue 6's balanced scaling."""
    second = pick_all(rows, "example", "second run")
    serve = pick_all(rows, "serve", "latency")
    return [
        _fit_ratio(rows, "balanced"),
        _fit_ratio(rows, "unbalanced"),
        _whole_run(rows),
        _repeats("bundled example: second `longitudinal run` in a row, a candidate changed (fits not cached)",
                 [v for r in second if (v := number(r.get("seconds"))) is not None],
                 sum(number(r.get("seconds")) is None for r in second), GOAL_SECOND_RUN),
        _repeats("bundled example under `longitudinal serve`: file arrival to published report",
                 [v for r in serve if (v := number(r.get("seconds"))) is not None], 0, GOAL_SERVE),
        _scaling(rows, "unbalanced"),
        _memory(rows),
        *_same_answers(rows),
        _scaling(rows, "balanced"),  # issue 6's
    ]
