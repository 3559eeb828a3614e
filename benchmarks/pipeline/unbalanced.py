"""The unbalanced study of issue 17: every subject 3-12 visits at irregular times, so every subject is its
own visit pattern and the engine's grouping of identical patterns does not apply.

Numpy and pandas only (not the library's simulator, which draws whole-week visits): the same columns as
the balanced study (``patient_id, week, arm, age, site, score``) and the same data-generating model, so
the benchmark's three candidates apply unchanged. A fixed seed: the same rows on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20261700
MIN_VISITS, MAX_VISITS = 3, 12
JITTER_WEEKS = 0.35  # a visit happens within ± this many weeks of its nominal week (the first: after week 0)
MEAN_VISITS = (MIN_VISITS + MAX_VISITS) / 2


def visits_per_subject(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Visit counts, each in [3, 12], summing to exactly ``rows`` (about rows / 7.5 subjects).

    Counts are drawn uniformly until they reach ``rows``; the last subjects drawn then lose one visit each
    (never below 3) until the total is exactly ``rows``.
    """
    if rows < MIN_VISITS:
        raise ValueError(f"an unbalanced study needs at least {MIN_VISITS} rows, got {rows}")
    counts = rng.integers(MIN_VISITS, MAX_VISITS + 1, size=rows // MIN_VISITS + 1)  # enough to reach rows
    keep = int(np.searchsorted(np.cumsum(counts), rows)) + 1  # the shortest prefix reaching `rows`
    counts = counts[:keep].copy()
    excess = int(counts.sum()) - rows  # < 12: less than the last subject's visits
    while excess > 0:
        spare = np.flatnonzero(counts > MIN_VISITS)[::-1][:excess]
        if spare.size == 0:  # every subject at 3 visits: the last one goes, its visits to the first ones
            counts = counts[:-1]
            counts[: MIN_VISITS - excess] += 1
            break
        counts[spare] -= 1
        excess -= spare.size
    return counts


def simulate_unbalanced(rows: int, seed: int = SEED) -> pd.DataFrame:
    """A two-arm trial of exactly ``rows`` rows at irregular times, sorted by subject and week.

    score = 40 + 0.5 treated + 0.2 age + u0 + (−1 − 1 treated + u1) week + e, with (u0, u1) of SDs 7 and 0.8
    and correlation −0.45, e of SD 4 (the balanced simulator's defaults); weeks rounded to 3 decimals and
    scores to 2, as a case report form would hold them.
    """
    rng = np.random.default_rng(seed)
    counts = visits_per_subject(rows, rng)
    n = counts.size
    subject = np.repeat(np.arange(n), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    nominal = np.arange(subject.size) - np.repeat(starts, counts)
    week = np.round(np.abs(nominal + rng.uniform(-JITTER_WEEKS, JITTER_WEEKS, size=subject.size)), 3)
    treated = rng.permutation(np.arange(n) % 2 == 1)
    site = rng.permutation(np.arange(n) % 4) + 1
    age = np.clip(np.round(rng.normal(45.0, 12.0, size=n)), 18, 80).astype(np.int64)
    z = rng.standard_normal((n, 2))
    u0 = 7.0 * z[:, 0]
    u1 = 0.8 * (-0.45 * z[:, 0] + np.sqrt(1 - 0.45**2) * z[:, 1])
    level = 40.0 + 0.5 * treated + 0.2 * age + u0
    slope = -1.0 - 1.0 * treated + u1
    score = level[subject] + slope[subject] * week + rng.normal(0.0, 4.0, size=subject.size)
    width = max(4, len(str(n)))
    ids = np.char.add("U", np.char.zfill(np.arange(1, n + 1).astype(str), width))
    return pd.DataFrame({
        "patient_id": ids[subject],
        "week": week,
        "arm": np.where(treated, "treatment", "control")[subject],
        "age": age[subject],
        "site": site[subject],
        "score": np.round(score, 2),
    })


def write_unbalanced(rows: int, path: Path, seed: int = SEED) -> tuple[Path, int]:
    """Simulate and write the study as CSV; the path and the number of subjects."""
    frame = simulate_unbalanced(rows, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path, int(frame["patient_id"].nunique())
