"""Reading the test data sets (tests/reference/data/*.csv, tests/fixtures/) as the fitting stage receives them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd


def read_reference_csv(path: Path, factors: Iterable[str]) -> pd.DataFrame:
    """R's factor columns as text, every other column as float (R wrote the CSV and reads it back)."""
    factors = list(factors)
    frame = pd.read_csv(path, dtype={column: str for column in factors})
    numeric = {column: frame[column].astype(float) for column in frame.columns if column not in factors}
    return frame.assign(**numeric)


SLEEPSTUDY = Path(__file__).resolve().parent / "fixtures" / "sleepstudy.csv"


def read_sleepstudy() -> pd.DataFrame:
    """lme4's sleepstudy (18 subjects × 10 days), written by R's write.csv(sleepstudy, row.names = FALSE)."""
    return pd.read_csv(SLEEPSTUDY, dtype={"Subject": str})

