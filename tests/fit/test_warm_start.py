"""A REML refit started from its ML fit's θ (``fit_lmm(start=...)``): the same optimum as lme4's start, in
fewer evaluations; θ carried between the data's units and the standardized design exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from longitudinal.fit.lmm import fit_lmm, standardized_theta
from longitudinal.fit.scaling import standardize
from longitudinal.model.design import build_design
from longitudinal.model.formula import parse_formula
from reference_data import read_sleepstudy


def test_standardized_theta_inverts_restore_units() -> None:
    # Days shifted and scaled so that the standardization moves the random slope's column: θ changes.
    frame = read_sleepstudy().assign(Days=lambda d: 3.0 * d.Days + 40.0)
    design = build_design(frame, parse_formula("Reaction ~ Days + (Days | Subject)"))
    fit = fit_lmm(design, reml=False)
    standardized, standardization = standardize(design)
    theta = standardized_theta(fit.theta, design, standardization)
    assert not np.allclose(theta, fit.theta)
    # Back through restore_units' own map: Λ Λᵀ in the data's units again.
    from longitudinal.fit.theta import layout_theta

    layout = layout_theta((2,))
    back = standardization.relative_factor(0, layout.lambda_matrix(theta))
    lam = layout.lambda_matrix(fit.theta)
    assert back @ back.T == pytest.approx(lam @ lam.T, rel=1e-12, abs=1e-12)


def test_a_warm_start_reaches_the_cold_optimum_in_fewer_evaluations() -> None:
    from longitudinal.fit.lmm import profiled_deviance
    from longitudinal.fit.lmm.crossproducts import compute_crossproducts
    from longitudinal.fit.optimize import minimize_deviance
    from longitudinal.fit.theta import layout_theta

    design, _ = standardize(build_design(read_sleepstudy(), parse_formula("Reaction ~ Days + (Days | Subject)")))
    products = compute_crossproducts(design)
    layout = layout_theta((2,))
    evaluations = {"ML": 0, "REML": 0}

    def deviance(reml: bool):  # type: ignore[no-untyped-def]
        def at(theta: np.ndarray) -> float:
            evaluations["REML" if reml else "ML"] += 1
            return profiled_deviance(products, theta, reml)
        return at

    ml, _ = minimize_deviance(deviance(False), layout)
    evaluations["REML"] = 0
    cold, _ = minimize_deviance(deviance(True), layout)
    cold_evaluations = evaluations["REML"]
    evaluations["REML"] = 0
    warm, attempts = minimize_deviance(deviance(True), layout, start=ml.theta)
    assert warm.converged and attempts[0].optimizer == "bobyqa"
    assert warm.deviance == pytest.approx(cold.deviance, abs=1e-7)
    assert warm.theta == pytest.approx(cold.theta, abs=1e-4)
    assert evaluations["REML"] < cold_evaluations


def test_a_refit_from_its_ml_theta_gives_lme4s_reml_fit_in_fewer_evaluations() -> None:
    from longitudinal.fit.candidate import fit_candidate

    frame = read_sleepstudy()
    formula = "Reaction ~ Days + (Days | Subject)"
    ml = fit_candidate(frame, "ris", formula, method="ML")
    cold = fit_candidate(frame, "ris", formula, method="REML")
    warm = fit_candidate(frame, "ris", formula, method="REML", start=list(ml.theta))
    assert warm.reml_criterion == pytest.approx(cold.reml_criterion, abs=1e-6)
    assert [f.estimate for f in warm.fixed_effects] == pytest.approx([f.estimate for f in cold.fixed_effects], rel=1e-6)
    assert warm.random_effects[0].sd == pytest.approx(cold.random_effects[0].sd, rel=1e-5)
    assert warm.attempts[0].iterations < cold.attempts[0].iterations
    # A start that does not fit the design (another formula's θ, or not finite) is lme4's start again.
    assert fit_candidate(frame, "ris", formula, method="REML", start=[1.0]).attempts[0].iterations == \
        cold.attempts[0].iterations
    assert fit_candidate(frame, "ris", formula, method="REML", start=[math.nan] * 3).attempts[0].iterations == \
        cold.attempts[0].iterations
