"""results.csv: one row per size × item, read back to keep the sizes an invocation did not measure."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

CSV_FIELDS = (
    "rows", "subjects", "kind", "name", "seconds", "lme4_seconds", "ratio_to_lme4", "loglik", "lme4_loglik",
    "delta_loglik", "peak_tree_mb", "peak_process_mb", "selected", "lme4_selected", "measured_at",
)


def read_previous(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier results.csv (to keep sizes not measured this time), or none."""
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


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


def pick(rows: list[dict[str, Any]], size: int, kind: str, name: str) -> dict[str, Any] | None:
    """The row of ``size`` rows with this kind and name, if any."""
    for row in rows:
        if int(row["rows"]) == size and row["kind"] == kind and row["name"] == name:
            return row
    return None
