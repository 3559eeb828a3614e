"""The goals of issue 6, checked against the results rows."""

from __future__ import annotations

from typing import Any

from benchmarks.pipeline.results import number, pick

GOAL_FIT_RATIO = 1 / 30  # fit stage / lme4 fits, 200,000 rows
GOAL_LOGLIK = 0.05  # |ΔlogLik| per candidate
GOAL_MEMORY_GB = 4.0  # peak memory of the whole run at 2,000,000 rows
GOAL_SCALING = 12.0  # fit time at 2,000,000 / fit time at 200,000


def evaluate_goals(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) for each goal of issue 6 that the rows allow to check."""
    goals: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**not met**")

    fit = pick(rows, 200_000, "stage", "fit")
    ratio = number(fit.get("ratio_to_lme4")) if fit else None
    goals.append((
        "200k rows: fit stage / lme4 fits (3 ML + REML refit)", f"≤ 1/30 ({GOAL_FIT_RATIO:.4f})",
        f"{number(fit['seconds']):.2f} s / {number(fit['lme4_seconds']) or float('nan'):.2f} s = "
        f"{ratio:.4f} (1/{1 / ratio:.1f})" if fit and ratio else "not measured",
        verdict(ratio <= GOAL_FIT_RATIO if ratio else None),
    ))
    deltas: list[tuple[str, float]] = [
        (r["name"], d) for r in rows
        if int(r["rows"]) == 200_000 and r["kind"] == "fit" and "(REML)" not in r["name"]
        and (d := number(r.get("delta_loglik"))) is not None
    ]
    worst = max((abs(d) for _, d in deltas), default=None)
    goals.append((
        "200k rows: |ΔlogLik| vs lme4 per ML candidate", f"≤ {GOAL_LOGLIK}",
        ", ".join(f"{n} {d:+.2e}" for n, d in deltas) or "not measured",
        verdict(worst <= GOAL_LOGLIK if worst is not None else None),
    ))
    run = pick(rows, 200_000, "run", "whole run (wall)")
    same = (run["selected"] == run["lme4_selected"]) if run and run.get("lme4_selected") else None
    goals.append((
        "200k rows: same selection as lme4", "same",
        f"ours {run['selected']}, lme4 {run['lme4_selected']}" if run and same is not None else "not measured",
        verdict(same),
    ))
    whole, theirs = (number(run["seconds"]), number(run["lme4_seconds"])) if run else (None, None)
    goals.append((
        "200k rows: whole run vs lme4 fits alone", "≤ 1×",
        f"{whole:.1f} s vs {theirs:.1f} s ({whole / theirs:.2f}×)" if whole and theirs else "not measured",
        verdict(whole <= theirs if whole and theirs else None),
    ))
    big = pick(rows, 2_000_000, "run", "whole run (wall)")
    memory = number(big.get("peak_tree_mb")) if big else None
    goals.append((
        "2M rows: peak memory of the whole run (process tree)", f"< {GOAL_MEMORY_GB:.0f} GB",
        f"{memory / 1024:.2f} GB" if memory else "not measured",
        verdict(memory / 1024 < GOAL_MEMORY_GB if memory else None),
    ))
    big_fit = pick(rows, 2_000_000, "stage", "fit")
    fit_big = number(big_fit["seconds"]) if big_fit else None
    fit_small = number(fit["seconds"]) if fit else None
    scale = fit_big / fit_small if fit_big is not None and fit_small else None
    goals.append((
        "fit stage at 2M / at 200k", f"≤ {GOAL_SCALING:.0f}",
        f"{fit_big:.2f} s / {fit_small:.2f} s = {scale:.1f}" if scale is not None else "not measured",
        verdict(scale <= GOAL_SCALING if scale is not None else None),
    ))
    return goals
