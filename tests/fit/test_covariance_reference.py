"""fit.covariance against nlme: every gls and lme fit of tests/reference/nlme_reference_covariance.json (made by
tests/reference/make_reference_covariance.R) on its four data sets, ML and REML, and nlme's per-row numbers.

The R calls, per JSON entry (m visits, visit_index = the visit's position 1..m):
  us(visit | id)    gls(correlation = corSymm(form = ~ visit_index | id), weights = varIdent(form = ~ 1 | visit))
  cs / csh          corCompSymm(form = ~ visit_index | id) (+ varIdent for csh)
  ar1 / ar1h        corAR1(form = ~ visit_index | id) (+ varIdent)
  toep / toeph      corARMA(form = ~ visit_index | id, p = m - 1) (+ varIdent), opt = "nlminb"
  sp_exp(t | id)    corExp(form = ~ t | id)
  ri_ar1            lme(random = ~ 1 | id, correlation = corAR1(form = ~ visit_index | id))
  ri_sp_exp         lme(random = ~ 1 | id, correlation = corExp(form = ~ t | id))
  ris_sp_exp        lme(random = ~ t | id, correlation = corExp(form = ~ t | id))
each the best of several optimizer settings and starts; where nlme stops short of the likelihood written out
and maximized directly in R (``reference_source`` "direct_optimum", up to 5e-5 units), that optimum is the
reference. nlme's REML logLik has no ½ log|XᵀX| term, as ours.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.covariance import (
    CovarianceFit, CovarianceStructure, fit_covariance, group_by_pattern, named_parameters,
)

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "nlme_reference_covariance.json"
RANDOM_EFFECTS = {"ri_ar1": ("ar1", "1"), "ri_sp_exp": ("sp_exp", "1"), "ris_sp_exp": ("sp_exp", "time")}


@cache
def reference() -> dict[str, Any]:
    out: dict[str, Any] = json.loads(REFERENCE.read_text())
    return out


@cache
def frame_of(dataset: str) -> pd.DataFrame:
    info = reference()["datasets"][dataset]
    return pd.read_csv(REFERENCE.parent / info["file"], dtype={info["subject"]: str, "visit": str})


def mean_design(dataset: str, frame: pd.DataFrame, mean: str) -> np.ndarray:
    """X of the reference script's mean model ``mean``, R's treatment contrasts (C collation)."""
    n = len(frame)
    if mean == "y ~ visit * arm":  # cov_sim_mmrm's MMRM mean
        visit = frame["visit"].astype(int).to_numpy()
        dummies = np.column_stack([(visit == v).astype(float) for v in range(2, 7)])
        treated = (frame["arm"] == "treatment").to_numpy(float)[:, None]
        return np.column_stack([np.ones(n), dummies, treated, dummies * treated])
    if mean == "y ~ t * arm":  # cov_sim_mmrm with random effects, cov_sim_irregular
        t, treated = frame["t"].to_numpy(float), (frame["arm"] == "treatment").to_numpy(float)
        return np.column_stack([np.ones(n), t, treated, t * treated])
    if mean == "distance ~ age * Sex":
        age, male = frame["age"].to_numpy(float), (frame["Sex"] == "Male").to_numpy(float)
        return np.column_stack([np.ones(n), age, male, age * male])
    assert mean == "follicles ~ sin(2*pi*Time) + cos(2*pi*Time)", mean
    time = frame["Time"].to_numpy(float)
    return np.column_stack([np.ones(n), np.sin(2 * math.pi * time), np.cos(2 * math.pi * time)])


@cache
def our_fit(dataset: str, name: str, method: str) -> CovarianceFit:
    """The JSON entry's model fitted by us on the same CSV."""
    info, ref = reference()["datasets"][dataset], reference()["fits"][dataset][name][method]
    frame = frame_of(dataset)
    structure_name, bar = RANDOM_EFFECTS.get(name, (name, ""))
    time = frame[info["time"]].to_numpy(float)
    if structure_name == "sp_exp":
        structure, coords = CovarianceStructure("sp_exp", 0), time
    else:
        visit = frame["visit"].astype(int).to_numpy() - 1
        structure, coords = CovarianceStructure(structure_name, int(visit.max()) + 1), visit
    Z = None if not bar else np.ones((len(frame), 1)) if bar == "1" else np.column_stack([np.ones(len(frame)), time])
    groups = group_by_pattern(frame[info["outcome"]].to_numpy(float), mean_design(dataset, frame, ref["mean"]),
                              frame[info["subject"]].to_numpy(), coords, Z)
    return fit_covariance(groups, structure, reml=method == "REML")


def fits_of(kinds: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [(dataset, name, method) for dataset, fits in reference()["fits"].items() for name in fits
            if name in kinds for method in ("ML", "REML")]


RESIDUAL_STRUCTURES = ("us", "cs", "csh", "ar1", "ar1h", "toep", "toeph", "sp_exp")


@pytest.mark.parametrize(("dataset", "name", "method"), fits_of(RESIDUAL_STRUCTURES + tuple(RANDOM_EFFECTS)))
def test_logliks_and_fixed_effects_match_nlme(dataset: str, name: str, method: str) -> None:
    ref = reference()["fits"][dataset][name][method]
    target = ref["direct_optimum"] if ref["reference_source"] == "direct_optimum" else ref
    fit = our_fit(dataset, name, method)
    assert fit.converged, fit.message
    assert fit.loglik == pytest.approx(target["logLik"], abs=1e-4)
    assert fit.n_params == ref["df"]
    # the fixed effects to 1e-4 relative; where the optimum is flat (an unidentified sp_exp range, a boundary
    # variance) they still agree, as β̂ depends on V, which is well determined there
    estimates = np.array([effect["estimate"] for effect in target["fixed_effects"].values()])
    np.testing.assert_allclose(fit.beta, estimates, rtol=1e-4, atol=1e-9)


def test_every_reference_fit_is_tested() -> None:
    covered = set(fits_of(RESIDUAL_STRUCTURES + tuple(RANDOM_EFFECTS)))
    listed = {(dataset, name, method) for dataset, fits in reference()["fits"].items()
              for name, by_method in fits.items() for method in by_method}
    assert covered == listed


@pytest.mark.parametrize(("dataset", "name", "method"), fits_of(tuple(RANDOM_EFFECTS)))
def test_random_effect_covariances_match_nlme(dataset: str, name: str, method: str) -> None:
    # G, σ and the correlation parameter where nlme's optimum determines them. A random-effect variance at the
    # boundary (nlme's note; or the direct optimum's G of rank 1) makes the fit singular, and only the
    # likelihood is comparable; an unidentified sp_exp range (below a quarter of the time spacing) leaves G and
    # σ determined but not the range.
    ref = reference()["fits"][dataset][name][method]
    fit = our_fit(dataset, name, method)
    boundary = any("boundary" in note for note in ref["notes"])
    if ref["reference_source"] == "direct_optimum":
        G = np.array(ref["direct_optimum"]["random_effects_covariance"])
        boundary = boundary or bool(np.linalg.eigvalsh(G).min() < 1e-6 * np.trace(G))
    assert fit.singular == boundary
    if boundary:
        return
    np.testing.assert_allclose(fit.random_covariance, ref["random_effects"]["covariance"], rtol=1e-4)
    assert fit.sigma == pytest.approx(ref["sigma"], rel=1e-5)
    if any("not identified" in note for note in ref["notes"]):
        return
    correlation = dict(named_parameters(CovarianceStructure(fit.structure, fit.n_visits), fit.theta))
    if "range" in correlation:
        assert correlation["range"] == pytest.approx(ref["parameters"]["range"], rel=1e-4)
    else:
        assert correlation["rho"] == pytest.approx(ref["parameters"]["phi"], rel=1e-4)


def test_a_singular_fit_reaches_the_boundary_optimum() -> None:
    # cov_sim_mmrm's random intercept next to AR(1) has its variance at 0 (nlme's note): the optimum is the
    # AR(1) model without random effects, which the fit reaches on the Cholesky scale and calls singular.
    ri_ar1 = our_fit("cov_sim_mmrm", "ri_ar1", "ML")
    assert ri_ar1.singular and ri_ar1.converged
    assert ri_ar1.random_covariance[0, 0] < 1e-6 * ri_ar1.sigma**2
    frame = frame_of("cov_sim_mmrm")
    visit = frame["visit"].astype(int).to_numpy() - 1
    groups = group_by_pattern(frame["y"].to_numpy(float), mean_design("cov_sim_mmrm", frame, "y ~ t * arm"),
                              frame["id"].to_numpy(), visit)
    ar1 = fit_covariance(groups, CovarianceStructure("ar1", 6), reml=False)
    assert ri_ar1.loglik == pytest.approx(ar1.loglik, abs=1e-6)
    np.testing.assert_allclose(ri_ar1.beta, ar1.beta, rtol=1e-5)


@pytest.mark.parametrize("check", range(5))
def test_per_row_numbers_match_nlme(check: int) -> None:
    # residuals(fit, type = "normalized"), fitted(fit), residuals(fit) and ranef(fit) of one nlme fit
    entry = reference()["per_row"][check]
    dataset = entry["dataset"]
    fit = our_fit(dataset, entry["model"], entry["method"])
    assert fit.loglik == pytest.approx(entry["logLik"], abs=1e-4)
    info = reference()["datasets"][dataset]
    frame = frame_of(dataset)
    ours = pd.DataFrame({
        "subject": frame[info["subject"]], "time": frame[info["time"]].astype(float),
        "normalized": fit.normalized_residuals, "fitted": fit.fitted, "residuals": fit.residuals,
    })
    theirs = pd.DataFrame({"subject": entry["subject"], "time": np.asarray(entry["time"], dtype=float),
                           "normalized": entry["normalized_residuals"], "fitted": entry["fitted"],
                           "residuals": entry["residuals"]})
    joined = theirs.merge(ours, on=["subject", "time"], suffixes=("_nlme", ""), validate="one_to_one")
    assert len(joined) == len(frame)
    for column in ("normalized", "fitted", "residuals"):
        np.testing.assert_allclose(joined[column], joined[f"{column}_nlme"], atol=5e-5, err_msg=column)
    if "ranef" in entry:
        position = {label: k for k, label in enumerate(fit.subjects)}
        order = [position[label] for label in entry["ranef"]["subjects"]]
        np.testing.assert_allclose(fit.modes[order], entry["ranef"]["modes"], atol=5e-5)
