"""results.csv: one row per design × size × item, read back to keep the studies an invocation did not measure.

``design`` is ``balanced`` or ``unbalanced`` (a simulated study at ``rows`` rows), ``example`` (the bundled
example: its second runs) or ``serve`` (the bundled example under ``longitudinal serve``: arrival to report).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

CSV_FIELDS = (
    "design", "rows", "subjects", "kind", "name", "seconds", "stages_seconds", "lme4_seconds", "ratio_to_lme4",
    "loglik", "lme4_loglik", "delta_loglik", "peak_tree_mb", "peak_process_mb", "selected", "lme4_selected",
    "measured_at",
)


def read_previous(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier results.csv (to keep sizes not measured this time), or none."""
    if not path.exists():
        return []
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [{**row, "design": row.get("design") or "balanced"} for row in rows]  # files before designs


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One row per size × stage/fit; empty cells where a number does not apply."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell(row.get(k)) for k in CSV_FIELDS})


def cell(value: Any) -> Any:
    """A value as results.csv writes it: empty for None or non-finite, floats to 12 significant digits."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.12g}" if math.isfinite(value) else ""
    return value


def number(value: Any) -> float | None:
    """A cell read back as a finite float, else None."""
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        return None
    return parsed if math.isfinite(parsed) else None


def pick(rows: list[dict[str, Any]], size: int, kind: str, name: str,
         design: str = "balanced") -> dict[str, Any] | None:
    """The row of this design at ``size`` rows with this kind and name, if any."""
    for row in rows:
        if row["design"] == design and int(row["rows"]) == size and row["kind"] == kind and row["name"] == name:
            return row
    return None


def pick_all(rows: list[dict[str, Any]], design: str, kind: str) -> list[dict[str, Any]]:
    """Every row of this design and kind, in file order."""
    return [row for row in rows if row["design"] == design and row["kind"] == kind]
