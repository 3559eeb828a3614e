"""Integrity of tests/reference/inference_reference.json (issue 15) and the CSVs it names.

The reference numbers are made by tests/reference/make_reference_inference.R; the tests that compare our
inference with them read each case's CSV with ``read_reference_csv`` and fit its formula. This file checks only
that they can: every case names a CSV that exists, whose columns include everything the formula reads and
every listed factor, with no missing values there and exactly the rows R fitted (``n_obs``), and that the
per-term arrays line up. No fitting happens here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from longitudinal.model.formula import parse_formula
from reference_data import read_reference_csv

REFERENCE_DIR = Path(__file__).parent / "reference"
REFERENCE: dict[str, Any] = json.loads((REFERENCE_DIR / "inference_reference.json").read_text())
CASES: list[dict[str, Any]] = REFERENCE["cases"]


def test_case_names_are_unique_and_both_kinds_are_present() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names))
    assert {case["heldout"] for case in CASES} == {True, False}
    assert {case["family"] for case in CASES} == {"gaussian", "binomial", "poisson"}


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_case_data_hold_what_the_formula_reads(case: dict[str, Any]) -> None:
    path = REFERENCE_DIR / "data" / case["data"]
    assert path.is_file(), f"{case['name']}: {path} is missing"
    frame = read_reference_csv(path, case["factors"])  # raises if a non-factor column is not numeric
    needed = parse_formula(case["formula"], name=case["name"]).columns | set(case["factors"])
    assert needed <= set(frame.columns), f"{case['name']}: the CSV lacks {sorted(needed - set(frame.columns))}"
    assert not frame[sorted(needed)].isna().any().any()
    assert len(frame) == case["n_obs"]
    for group, count in case["n_groups"].items():
        assert frame[group].nunique() == count


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_case_arrays_line_up(case: dict[str, Any]) -> None:
    fixed = case["fixed"]
    p = len(fixed["term"])
    blocks = [fixed["satterthwaite"], fixed["kenward_roger"]] if case["family"] == "gaussian" else [fixed]
    for block in blocks:
        assert {len(values) for key, values in block.items() if key != "term"} == {p}
    assert case["vcov"]["names"] == fixed["term"] and len(case["vcov"]["matrix"]) == p
    if case["family"] == "gaussian":
        assert case["residual_df"] == case["n_obs"] - p
        assert len(case["reml"]["theta"]) == len(case["reml"]["theta_names"])
