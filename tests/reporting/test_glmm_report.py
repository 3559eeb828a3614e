"""The report of a binomial or Poisson study (GLMMs as glmer fits them), built from hand-made records: odds and
rate ratios, observed against fitted proportions or counts over time, binned and quantile residuals, the
Pearson dispersion, and the family throughout the text and in selected_model.json."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from test_figures import assert_readable, overlapping_texts
from test_html import PNG, comparison_table, make_inputs, make_validated

from longitudinal.config import parse_config
from longitudinal.inference.nested import compare_nested, compute_aicc
from longitudinal.records import Fit, FixedEffect, ReportInputs, Selection, Validated, VarianceComponent
from longitudinal.reporting.figures import FIGURE_KEYS, GLMM_FIGURE_KEYS, build_figures
from longitudinal.reporting.html import render_report
from longitudinal.reporting.run_folder import selected_model_summary

BINARY = "relapse ~ week * arm + (1 | pid)"
COUNT = "seizures ~ week * arm + (1 | pid)"


def make_glmm_visits(family: str, n_subjects: int = 120, seed: int = 8) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A two-arm trial over weeks 0-5 with a random intercept (SD 1 on the link scale): the visits, each row's
    conditional mean μ (what a fit's ``fitted`` holds) and each subject's random intercept."""
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"s{i:03d}" for i in range(n_subjects)], 6)
    week = np.tile(np.arange(6.0), n_subjects)
    arm = np.repeat(np.where(np.arange(n_subjects) % 2 == 0, "control", "active"), 6)
    intercepts = rng.normal(0.0, 1.0, n_subjects)
    b = np.repeat(intercepts, 6)
    active = arm == "active"
    if family == "binomial":
        mu = expit(-0.5 + 0.15 * week - 0.35 * week * active + b)
        y = rng.binomial(1, mu).astype(float)
        outcome = "relapse"
    else:
        mu = np.exp(1.0 + 0.05 * week - 0.12 * week * active + 0.5 * b)
        y = rng.poisson(mu).astype(float)
        outcome = "seizures"
    visits = pd.DataFrame({"pid": pid, "week": week, "arm": arm, outcome: y, "source_file": "trial.csv",
                           "source_line": np.arange(2, 2 + len(pid))})
    return visits, mu, intercepts


def make_glmm_inputs(family: str = "binomial", nagq: int = 1, dispersion: float = 1.0) -> ReportInputs:
    """A binomial (or Poisson) study: a random-intercept candidate (selected, its ML fit reported) against one
    without the week-by-arm interaction. ``dispersion`` > 1 makes the Poisson counts vary that many times more
    than the fitted means allow."""
    visits, mu, intercepts = make_glmm_visits(family)
    outcome = "relapse" if family == "binomial" else "seizures"
    if dispersion != 1.0:  # gamma-Poisson counts about the same means: variance ≈ dispersion × μ
        rng = np.random.default_rng(9)
        shape = mu / (dispersion - 1.0)
        visits = visits.assign(**{outcome: rng.poisson(rng.gamma(shape, mu / shape)).astype(float)})
    y = visits[outcome].to_numpy(float)
    n, subjects = len(visits), visits["pid"].nunique()
    if family == "binomial":
        fixed = (FixedEffect("(Intercept)", -0.52, 0.16, -0.834, -0.206, 0.0012),
                 FixedEffect("week", 0.16, 0.045, 0.072, 0.248, 0.0004),
                 FixedEffect("armactive", 0.05, 0.22, -0.381, 0.481, 0.82),
                 FixedEffect("week:armactive", -0.36, 0.065, -0.487, -0.233, 3e-8))
    else:
        fixed = (FixedEffect("(Intercept)", 1.02, 0.07, 0.883, 1.157, 1e-40),
                 FixedEffect("week", 0.048, 0.012, 0.0245, 0.0715, 6e-5),
                 FixedEffect("armactive", -0.01, 0.1, -0.206, 0.186, 0.92),
                 FixedEffect("week:armactive", -0.118, 0.018, -0.153, -0.083, 5e-11))
    ranef = pd.DataFrame({"group": "pid", "level": visits["pid"].unique(), "term": "(Intercept)",
                          "estimate": 0.8 * intercepts, "cond_sd": 0.45})
    common = {"method": "ML", "engine": "lme4-style", "converged": True, "singular": False, "message": "",
              "n_obs": n, "n_subjects": subjects, "family": family, "nagq": nagq, "optimizer": "bobyqa",
              "fitted": mu, "residuals": y - mu, "ranef": ranef,
              "random_effects": (VarianceComponent("pid", "(Intercept)", 0.98),)}
    fits = (
        Fit(name="main", formula=f"{outcome} ~ week + arm + (1 | pid)", n_params=4, loglik=-452.0,
            fixed_effects=fixed[:3], **common),
        Fit(name="interaction", formula=f"{outcome} ~ week * arm + (1 | pid)", n_params=5, loglik=-431.0,
            fixed_effects=fixed, **common),
    )
    selection = Selection(criterion="bic", table=comparison_table(fits, "interaction"), selected="interaction",
                          aicc={f.name: compute_aicc(f) for f in fits}, tests=compare_nested(fits))
    validated = Validated(visits=visits, quarantine=make_validated().quarantine.iloc[:0],
                          expectations=make_validated().expectations[:1], rows_read=n)
    config = parse_config({
        "study": f"{family}-trial",
        "data": {"source": "trial.csv", "subject": "pid", "time": "week", "outcome": outcome},
        "models": {"criterion": "bic", "candidates": {f.name: f.formula for f in fits}},
    })
    return replace(make_inputs(), study=f"{family}-trial", config=config, validated=validated, selection=selection,
                   fits=fits, selected=fits[1], timings={})


def build(inputs: ReportInputs) -> dict:
    return build_figures(inputs.validated.visits, inputs.config, inputs.selection, inputs.selected, fits=inputs.fits)


@pytest.fixture(scope="module")
def binary() -> ReportInputs:
    return make_glmm_inputs("binomial")


@pytest.fixture(scope="module")
def binary_page(binary: ReportInputs) -> str:
    return render_report(binary, {key: PNG for key in GLMM_FIGURE_KEYS})


def section_of(page: str, anchor: str, following: str) -> str:
    return page[page.index(f'<section id="{anchor}">'):page.index(f'<section id="{following}">')]


# ------------------------------------------------------------------------------------------------ figures


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_a_glmm_study_has_the_figures_of_its_family_readable_and_without_overlaps(family: str) -> None:
    figures = build(make_glmm_inputs(family))
    assert tuple(figures) == GLMM_FIGURE_KEYS
    assert not {"residuals_vs_fitted", "qq", "residuals_over_time"} & set(figures)  # the Gaussian-only ones
    for key, figure in figures.items():
        assert_readable(figure)
        assert overlapping_texts(figure) == [], key


def test_the_coefficients_are_odds_ratios_on_a_log_axis_with_the_line_at_one(binary: ReportInputs) -> None:
    intercept_ax, others_ax = build(binary)["coefficients"].axes
    assert others_ax.get_xscale() == "log" and intercept_ax.get_xscale() == "log"
    assert others_ax.get_xlabel() == "Odds ratio per unit of the term, log scale"
    assert intercept_ax.get_xlabel() == "Baseline odds: exp(intercept), log scale"
    (line_at_one,) = [line for line in others_ax.lines if list(line.get_xdata()) == [1.0, 1.0]]
    assert line_at_one.get_linestyle() == "--"
    assert "1" in [t.get_text() for t in others_ax.get_xticklabels()]
    dots = others_ax.lines[0]  # week, armactive, week:armactive from the top
    np.testing.assert_allclose(dots.get_xdata(), np.exp([0.16, 0.05, -0.36]))
    np.testing.assert_allclose(intercept_ax.lines[0].get_xdata(), [math.exp(-0.52)])
    assert "Odds ratios with Wald 95% confidence intervals" in intercept_ax.get_title()


def test_observed_against_fitted_proportions_over_time_per_arm(binary: ReportInputs) -> None:
    ax = build(binary)["observed_vs_fitted_over_time"].axes[0]
    assert ax.get_ylabel() == "Proportion with relapse = 1"
    assert ax.get_title() == "Observed and fitted proportion with relapse = 1 over time (interaction)"
    visits = binary.validated.visits.assign(mu=binary.selected.fitted)
    by_hand = visits.groupby(["arm", "week"])[["relapse", "mu"]].mean()
    fitted_lines = [line for line in ax.lines if line.get_linewidth() == 2.0]
    assert len(fitted_lines) == 2  # active, control: sorted by name
    for arm, line in zip(["active", "control"], fitted_lines, strict=True):
        np.testing.assert_allclose(line.get_ydata(), by_hand.loc[arm, "mu"])
    observed = [c for c in ax.containers]  # one error bar per arm: points at the proportions of 1s
    np.testing.assert_allclose(observed[0].lines[0].get_ydata(), by_hand.loc["active", "relapse"])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["arm = active", "arm = control", "observed proportion, 95% Wilson interval",
                      "mean fitted probability (subjects' conditional fits averaged)"]


def test_the_trajectories_of_counts_are_mean_counts_per_time(binary: ReportInputs) -> None:
    inputs = make_glmm_inputs("poisson")
    ax = build(inputs)["trajectories"].axes[0]
    assert ax.get_ylabel() == "Mean seizures" and ax.get_title() == "Observed mean seizures over time, all subjects"
    means = inputs.validated.visits.groupby(["arm", "week"])["seizures"].mean()
    np.testing.assert_allclose(ax.containers[1].lines[0].get_ydata(), means.loc["control"])


def test_residual_checks_are_binned_and_quantile_residuals(binary: ReportInputs) -> None:
    figures = build(binary)
    binned = figures["binned_residuals"].axes[0]
    assert re.fullmatch(r"Binned residuals of interaction: \d+ of 26 bins outside ±2 SE \(28 rows per bin\)",
                        binned.get_title())
    assert binned.get_xlabel() == "Mean fitted probability μ̂ in the bin"
    qq, spread = figures["quantile_residuals"].axes[:2]
    points = qq.collections[0].get_offsets()
    assert len(points) == 720
    assert float(np.std(points[:, 1])) == pytest.approx(1.0, abs=0.1)  # simulated from μ: N(0, 1)
    assert "conditional on the random effects" in spread.get_xlabel()


# ----------------------------------------------------------------------------------------------- the page


def test_the_summary_names_the_family_link_approximation_and_maximum_likelihood(binary_page: str) -> None:
    summary = section_of(binary_page, "summary", "data")
    assert ("It is a logistic mixed model (binomial, logit link), fitted by maximum likelihood with the Laplace "
            "approximation, as glmer fits it; a generalized linear mixed model has no REML") in summary
    assert "as odds ratios" in summary and "REML refit" not in summary
    assert "<h2>5. Selected model (ML estimates)</h2>" in binary_page
    assert "REML" not in binary_page.replace("no REML", "")
    assert "maximum-likelihood fit of the selected model (a generalized linear mixed model has no REML)" in binary_page


def test_adaptive_quadrature_is_named_with_its_points() -> None:
    inputs = make_glmm_inputs("binomial", nagq=10)
    fits = tuple(replace(f, nagq=10) for f in inputs.fits)
    page = render_report(replace(inputs, fits=fits, selected=fits[1]), {})
    assert "with the adaptive Gauss–Hermite quadrature with 10 points, as glmer fits it" in section_of(page, "summary", "data")
    assert "adaptive Gauss–Hermite quadrature with 10 points (engine lme4-style)" in section_of(page, "selected",
                                                                                                  "random-effects")


def test_the_fixed_effects_read_in_odds_ratios_with_the_baseline_odds(binary_page: str) -> None:
    section = section_of(binary_page, "selected", "random-effects")
    assert ("<th>Term</th><th>Estimate (log-odds)</th><th>SE</th><th>95% CI</th><th>z</th><th>p</th>"
            "<th>Odds ratio</th><th>95% CI (odds ratio)</th>") in section
    # exp(−0.52) = 0.5945, exp(−0.834) = 0.4343, exp(−0.206) = 0.8138; week:armactive exp(−0.36) = 0.6977
    assert '<td class="num">0.5945 (baseline odds)</td><td class="num">0.4343 to 0.8138</td>' in section
    assert '<td class="num">0.6977</td><td class="num">0.6145 to 0.7922</td>' in section
    assert "the odds of relapse = 1 when every covariate is 0" in section
    assert "conditional (subject-specific)" in section
    assert "<th>SD (log-odds)</th>" in section and "Residual SD" not in section and "<td>Residual</td>" not in section
    assert "Pearson" not in section  # binary outcomes: no dispersion check
    assert "<dt>Method</dt><dd>maximum likelihood (no REML for a GLMM), Laplace approximation" in section


def test_the_comparison_counts_k_as_glmer_does(binary_page: str) -> None:
    section = section_of(binary_page, "comparison", "selected")
    assert ("All candidates are logistic mixed models (binomial, logit link), fitted by maximum likelihood with "
            "the Laplace approximation as glmer fits them") in section
    assert "k = fixed effects + random-effect (co)variance parameters, with no residual variance" in section
    assert "+ 1 residual variance" not in section
    diagnostics = section[section.index("Fit diagnostics per candidate"):]
    assert diagnostics.count("<td>interaction</td>") == 1 and "(refit)" not in diagnostics
    assert "penalized iteratively reweighted least squares (PIRLS)" in diagnostics


def test_the_diagnostics_and_observed_fitted_sections_suit_a_binary_outcome(binary_page: str) -> None:
    diagnostics = section_of(binary_page, "diagnostics", "observed-fitted")
    assert 'id="fig-binned_residuals"' in diagnostics and 'id="fig-quantile_residuals"' in diagnostics
    assert "SE = √(mean μ̂(1 − μ̂) / n)" in diagnostics
    assert "conditional on the predicted random effects" in diagnostics
    assert "they are not the unconditional residuals that draw new random effects" in diagnostics
    assert "expect a tilt even from a correct model" in diagnostics
    assert "standardized residuals" not in diagnostics and "fig-qq" not in diagnostics
    observed = section_of(binary_page, "observed-fitted", "reproducibility")
    assert ("Observed proportion with relapse = 1 at each time, per level of arm (points, with 95% Wilson "
            "intervals) against the model&#x27;s mean fitted probability (lines)") in observed
    assert observed.index("fig-observed_vs_fitted_over_time") < observed.index('id="fig-observed_vs_fitted"')
    trajectories = section_of(binary_page, "trajectories", "comparison")
    assert "Observed proportion with relapse = 1 at each time, per level of arm, with 95% Wilson intervals" in trajectories
    assert binary_page.count("data:image/png;base64,") == len(GLMM_FIGURE_KEYS)


def test_a_poisson_study_reads_in_rate_ratios_with_its_dispersion() -> None:
    inputs = make_glmm_inputs("poisson")
    page = render_report(inputs, {key: PNG for key in GLMM_FIGURE_KEYS})
    assert "It is a Poisson mixed model (log link), fitted by maximum likelihood" in page
    section = section_of(page, "selected", "random-effects")
    assert "<th>Rate ratio</th>" in section and "(baseline rate)" in section and "<th>SD (log rate)</th>" in section
    y = inputs.validated.visits["seizures"].to_numpy(float)
    mu = inputs.selected.fitted
    chi2 = float(np.sum((y - mu) ** 2 / mu))
    ratio = chi2 / (720 - 5)
    assert 0.85 < ratio < 1.15  # counts drawn from μ
    assert f"<dt>Pearson χ²/df</dt><dd>{ratio:.3f} (χ² = {chi2:,.2f} on 715 df" in section
    assert "<h3>Overdispersion</h3>" in section and "(1 | obs)" not in page
    assert "SE = √(mean μ̂ / n)" in page


def test_overdispersed_counts_get_the_note_in_the_summary_and_the_selected_model() -> None:
    page = render_report(make_glmm_inputs("poisson", dispersion=2.5), {})
    summary = section_of(page, "summary", "data")
    section = section_of(page, "selected", "random-effects")
    for part in (summary, section):
        assert "Counts vary more than a Poisson model allows (Pearson χ²/df = " in part
        assert "observation-level random effect (1 | obs)" in part and "negative binomial model" in part
    assert '<p class="warning">Counts vary more than a Poisson model allows' in section


# ------------------------------------------------------------------------------------- selected_model.json


def test_selected_model_json_has_the_family_link_and_odds_ratios(binary: ReportInputs) -> None:
    summary = selected_model_summary(binary.selected, "bic")
    assert (summary["family"], summary["link"], summary["nagq"], summary["method"]) == ("binomial", "logit", 1, "ML")
    interaction = summary["fixed_effects"][3]
    assert interaction["term"] == "week:armactive" and interaction["estimate"] == -0.36  # the link scale, unchanged
    assert interaction["odds_ratio"] == pytest.approx(
        {"estimate": math.exp(-0.36), "ci_low": math.exp(-0.487), "ci_high": math.exp(-0.233)})
    assert "rate_ratio" not in interaction and summary["overdispersion"] is None
    assert summary["residual_sd"] != summary["residual_sd"]  # NaN, written as null


def test_selected_model_json_has_rate_ratios_and_the_overdispersion_of_counts() -> None:
    from longitudinal.inference.residuals import pearson_dispersion

    inputs = make_glmm_inputs("poisson", dispersion=2.5)
    summary = selected_model_summary(inputs.selected, "bic")
    assert (summary["family"], summary["link"]) == ("poisson", "log")
    assert summary["fixed_effects"][0]["rate_ratio"]["estimate"] == pytest.approx(math.exp(1.02))
    expected = pearson_dispersion(inputs.validated.visits["seizures"].to_numpy(float), inputs.selected.fitted, 5)
    overdispersion = summary["overdispersion"]
    assert overdispersion["ratio"] == pytest.approx(expected.ratio) and overdispersion["df"] == 715
    assert overdispersion["ratio"] > 2 and overdispersion["overdispersed"] is True
    assert "(1 | obs)" in overdispersion["note"]


def test_the_gaussian_json_keeps_its_keys_and_says_its_family() -> None:
    summary = selected_model_summary(make_inputs().selected, "bic")
    assert (summary["family"], summary["link"], summary["nagq"], summary["overdispersion"]) == (
        "gaussian", "identity", None, None)
    assert all(set(fe) == {"term", "estimate", "std_error", "ci_low", "ci_high", "p_value", "df"}
               for fe in summary["fixed_effects"])


def test_a_binary_run_folder_holds_every_figure_and_the_report(tmp_path: Path, binary: ReportInputs) -> None:
    from longitudinal.reporting.run_folder import write_run_files

    run = tmp_path / "study" / "run"
    (run / "figures").mkdir(parents=True)
    report = write_run_files(run, binary)
    assert sorted(p.stem for p in (run / "figures").iterdir()) == sorted(GLMM_FIGURE_KEYS)
    page = report.read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') == len(GLMM_FIGURE_KEYS)
    written = json.loads((run / "selected_model.json").read_text())
    assert written["fixed_effects"][1]["odds_ratio"]["estimate"] == pytest.approx(math.exp(0.16))
    assert written["residual_sd"] is None
    assert set(FIGURE_KEYS) - set(GLMM_FIGURE_KEYS) == {"residuals_vs_fitted", "qq", "residuals_over_time"}


def test_a_failed_glmm_fit_gives_notes_not_errors(binary: ReportInputs) -> None:
    from longitudinal.records import failed_fit

    failed = replace(failed_fit("interaction", BINARY, "ML", "lme4-style", "PIRLS did not converge", n_obs=720,
                                n_subjects=120, n_params=5), family="binomial")
    figures = build(replace(binary, selected=failed))
    assert tuple(figures) == GLMM_FIGURE_KEYS
    assert "has no fitted values" in figures["binned_residuals"].axes[0].texts[0].get_text()
    assert figures["trajectories"].axes[0].get_ylabel() == "Proportion with relapse = 1"  # from the data
    page = render_report(replace(binary, selected=failed), {})
    assert "The selected fit did not pass lme4's convergence checks: PIRLS did not converge" in page
    assert selected_model_summary(failed, "bic")["fixed_effects"] == []
