"""Small-sample inference against R: tests/reference/inference_reference.json, written by
tests/reference/make_reference_inference.R (lme4 1.1.31 REML fits with bobyqa at rhoend 1e-12, lmerTest 3.1.3,
pbkrtest 0.5.2; the versions are in the JSON's ``meta``).

One test function per concern, each parametrized over the cases it applies to; the fits are made once per
module (``_fit``, cached) and shared by every concern, so a case costs one REML fit whatever is checked.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.candidate import fit_candidate
from longitudinal.inference.ddf import FixedEffectInference, fixed_effect_inference
from longitudinal.records import Fit
from tests.reference_data import read_reference_csv

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = json.loads((ROOT / "tests" / "reference" / "inference_reference.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}
GAUSSIAN = sorted(name for name, case in CASES.items() if case["family"] == "gaussian")

#: The JSON's key for each of our df methods.
DF_KEYS = {"satterthwaite": "satterthwaite", "kenward-roger": "kenward_roger"}


@functools.cache
def _visits(name: str) -> pd.DataFrame:
    case = CASES[name]
    return read_reference_csv(ROOT / "tests" / "reference" / "data" / case["data"], case["factors"])


@functools.cache
def _fit(name: str) -> Fit:
    """The case's fit by our lme4-style engine: REML for a Gaussian model (lmerTest's), ML for a GLMM."""
    case = CASES[name]
    if case["family"] == "gaussian":
        return fit_candidate(_visits(name), name, case["formula"], method="REML")
    return fit_candidate(_visits(name), name, case["formula"], method="ML", family=case["family"])


@functools.cache
def _inference(name: str, method: str) -> FixedEffectInference:
    return fixed_effect_inference(_fit(name), _visits(name), method)


def _by_term(case: dict[str, Any], method: str) -> dict[str, dict[str, float]]:
    """R's numbers for ``method`` keyed by coefficient name: estimate, se, df, t, p."""
    fixed = case["fixed"]
    columns = fixed[DF_KEYS[method]]
    return {term: {"estimate": fixed["estimate"][i], **{key: columns[key][i] for key in ("se", "df", "t", "p")}}
            for i, term in enumerate(fixed["term"])}


@pytest.mark.parametrize("name", GAUSSIAN)
def test_estimates_match_lme4(name: str) -> None:
    expected = _by_term(CASES[name], "satterthwaite")
    found = {fe.term: fe.estimate for fe in _fit(name).fixed_effects}
    assert set(found) == set(expected)
    for term, numbers in expected.items():
        assert found[term] == pytest.approx(numbers["estimate"], rel=1e-4, abs=1e-8), term


@pytest.mark.parametrize("method", sorted(DF_KEYS))
@pytest.mark.parametrize("name", GAUSSIAN)
def test_fixed_effect_tests_match_lmertest(name: str, method: str) -> None:
    """lmerTest's summary(fit, ddf = ...): SE (Kenward–Roger's from pbkrtest's adjusted vcov), df, p.

    Tolerances: df 1e-2 relative, SE 1e-3, p-values on the log scale: log p within 1e-2 (1% of p) or 1e-3
    relative (p far in the tail, 1e-108, moves with the df). Reached when written: Satterthwaite df
    within 6e-5 (both sides difference numerically, lmerTest in the data's units, we on the standardized
    design), Kenward–Roger df within 2e-8, SEs within 3e-5 (BodyWeight, where the two optima differ most).
    """
    expected = _by_term(CASES[name], method)
    found = {fe.term: fe for fe in _inference(name, method).fixed_effects()}
    for term, numbers in expected.items():
        fe = found[term]
        assert fe.std_error == pytest.approx(numbers["se"], rel=1e-3), (term, "se")
        assert fe.df == pytest.approx(numbers["df"], rel=1e-2), (term, "df")
        assert np.log(fe.p_value) == pytest.approx(np.log(numbers["p"]), rel=1e-3, abs=1e-2), (term, "p")


@pytest.mark.parametrize("name", GAUSSIAN)
def test_kenward_roger_vcov_matches_pbkrtest(name: str) -> None:
    """The whole adjusted covariance (pbkrtest's vcovAdj), which marginal means and contrasts use."""
    case = CASES[name]
    expected = case["vcov_kenward_roger"]
    found = _inference(name, "kenward-roger")
    order = [found.names.index(term) for term in expected["names"]]
    adjusted = found.vcov[np.ix_(order, order)]
    reference = np.array(expected["matrix"])
    scale = np.sqrt(np.outer(np.diagonal(reference), np.diagonal(reference)))
    assert adjusted / scale == pytest.approx(reference / scale, abs=2e-3)
