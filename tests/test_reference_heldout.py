"""Structured-covariance candidates against nlme on data sets the engine was not developed on.

tests/reference/make_reference_heldout.R fits nlme::Oxboys, nlme::BodyWeight and lme4::sleepstudy with every
structure R implements (nlme ``gls``/``lme`` with corSymm, corCompSymm, corAR1, corARMA(p = m − 1), corExp and
varIdent; the best of several optimizer settings and restarts) and the lme4-style candidates with ``lmer``.
Here every candidate is fitted through ``fit_candidate``, from the formula the pipeline would read, on the same
CSV. Issue 13's bar: each maximum log-likelihood equals nlme's to 0.02 or is higher (nlme stops short on
some), k equals nlme's logLik df, and the choice by AIC and by BIC among all candidates is R's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from longitudinal.fit.candidate import fit_candidate
from longitudinal.inference.criteria import select_model
from longitudinal.records import Fit
from reference_data import read_reference_csv

REFERENCE_DIR = Path(__file__).parent / "reference"
REFERENCE: dict[str, Any] = json.loads((REFERENCE_DIR / "nlme_reference_heldout.json").read_text())
#: nlme's maximum may be short of the true one, never above it by more than this (issue 13: "to 0.02")
TOLERANCE = 0.02
#: Columns R read as factors.
FACTORS = {"heldout_oxboys": ["Subject"], "heldout_bodyweight": ["Rat", "Diet"], "heldout_sleepstudy": ["Subject"]}

CASES = [
    (dataset, model, method)
    for dataset, models in REFERENCE["fits"].items()
    for model in models
    for method in ("ML", "REML")
]


def formula_of(dataset: str, model: str) -> str:
    record = REFERENCE["fits"][dataset][model]["ML"]
    return record["formula"]


@pytest.fixture(scope="module")
def fits() -> dict[tuple[str, str, str], Fit]:
    out = {}
    for dataset in REFERENCE["fits"]:
        visits = read_reference_csv(REFERENCE_DIR / REFERENCE["datasets"][dataset]["file"], FACTORS[dataset])
        for model in REFERENCE["fits"][dataset]:
            for method in ("ML", "REML"):
                out[dataset, model, method] = fit_candidate(visits, model, formula_of(dataset, model), method=method)
    return out


@pytest.mark.parametrize(("dataset", "model", "method"), CASES, ids=["-".join(c) for c in CASES])
def test_maximum_likelihood_and_k_match_r(fits: dict[tuple[str, str, str], Fit], dataset: str, model: str,
                                          method: str) -> None:
    ref = REFERENCE["fits"][dataset][model][method]
    fit = fits[dataset, model, method]
    assert fit.usable, fit.message
    assert fit.n_params == ref["df"]
    assert fit.loglik >= ref["logLik"] - TOLERANCE, (fit.loglik, ref["logLik"], fit.message)
    # and not implausibly above it: nlme's best of several starts is at most a little short
    assert fit.loglik <= ref["logLik"] + 1.0, (fit.loglik, ref["logLik"])


@pytest.mark.parametrize("dataset", list(REFERENCE["choices"]))
@pytest.mark.parametrize("criterion", ["aic", "bic"])
def test_the_choice_by_aic_and_bic_is_rs(fits: dict[tuple[str, str, str], Fit], dataset: str, criterion: str) -> None:
    candidates = [fits[dataset, model, "ML"] for model in REFERENCE["fits"][dataset]]
    selection = select_model(candidates, criterion)  # type: ignore[arg-type]
    assert selection.selected == REFERENCE["choices"][dataset][f"by_{criterion}"]


def test_every_data_set_has_its_rows() -> None:
    for dataset, info in REFERENCE["datasets"].items():
        frame = pd.read_csv(REFERENCE_DIR / info["file"])
        assert len(frame) == info["nrow"] and frame[info["subject"]].nunique() == info["n_subjects"]
