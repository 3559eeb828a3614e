"""What a statistician signs, from real fits through the run folder: df-corrected fixed effects, profile
intervals, marginal means and treatment contrasts (issue 15's contracts for ``selected_model.json``,
``marginal_means.csv`` and ``contrasts.csv``), and the report sections that show them.

The numbers themselves are checked against lmerTest, pbkrtest, emmeans and lme4 in tests/inference/ and
tests/test_reference_inference.py; here, that they reach the files and the page as the contract says.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_glmm_report import make_glmm_visits
from test_html import make_inputs

from longitudinal.config import parse_config
from longitudinal.errors import ConfigError
from longitudinal.fit.candidate import fit_candidate
from longitudinal.inference.criteria import select_model
from longitudinal.inference.reported import check_estimates, report_inference
from longitudinal.model.formula import parse_candidates
from longitudinal.records import ReportInputs, Validated, failed_fit
from longitudinal.reporting.html import render_report
from longitudinal.reporting.run_folder import selected_model_summary, write_run_files

MEANS_COLUMNS = ["arm", "week", "estimate", "se", "df", "ci_low", "ci_high"]
CONTRAST_COLUMNS = ["contrast", "week", "estimate", "se", "df", "ci_low", "ci_high", "p_value", "adjustment"]


def make_trial(n_subjects: int = 24, seed: int = 3) -> pd.DataFrame:
    """A small two-arm trial (weeks 0-4, a random intercept and slope): few subjects, so df are far from n."""
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"p{i:02d}" for i in range(n_subjects)], 5)
    week = np.tile(np.arange(5.0), n_subjects)
    arm = np.repeat(np.where(np.arange(n_subjects) % 2 == 0, "control", "treated"), 5)
    b0 = np.repeat(rng.normal(0, 3, n_subjects), 5)
    b1 = np.repeat(rng.normal(0, 0.6, n_subjects), 5)
    score = 20 + b0 + (b1 - 0.5 * (arm == "treated")) * week + rng.normal(0, 1.5, len(pid))
    return pd.DataFrame({"pid": pid, "week": week, "arm": arm, "score": score, "source_file": "trial.csv",
                         "source_line": np.arange(2, 2 + len(pid))})


def study_inputs(visits: pd.DataFrame, candidates: dict[str, str], *, family: str = "gaussian",
                 df: str | None = None, estimates: dict | None = None, outcome: str = "score") -> ReportInputs:
    """ReportInputs as the flow assembles them: ML fits, the selection, the reported fit and its inference."""
    models: dict = {"criterion": "bic", "candidates": candidates, "family": family}
    if df is not None:
        models["df"] = df
    config = parse_config({"study": "trial", "models": models,
                           "data": {"source": "trial.csv", "subject": "pid", "time": "week", "outcome": outcome},
                           **({"estimates": estimates} if estimates is not None else {})})
    fits = tuple(fit_candidate(visits, name, formula, family=family) for name, formula in candidates.items())
    selection = select_model(fits, "bic")
    chosen = selection.selected
    reported_fit = (fit_candidate(visits, chosen, candidates[chosen], method="REML") if family == "gaussian"
                    else next(f for f in fits if f.name == chosen))
    reported = report_inference(reported_fit, visits, config)
    validated = Validated(visits=visits, quarantine=pd.DataFrame(columns=[*visits.columns, "reason"]),
                          expectations=(), rows_read=len(visits))
    return replace(make_inputs(), study="trial", config=config, validated=validated, selection=selection, fits=fits,
                   selected=reported.fit, estimates=reported.estimates, explained=reported.explained,
                   df_method=reported.df_method, timings={})


@pytest.fixture(scope="module")
def trial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs = study_inputs(make_trial(), {"ris": "score ~ week * arm + (week | pid)"},
                          estimates={"by": "arm", "at": {"week": [0, 4]}})
    run = tmp_path_factory.mktemp("run")
    (run / "figures").mkdir()
    write_run_files(run, inputs)
    return run


def test_selected_model_json_carries_df_and_profile_intervals(trial_run: Path) -> None:
    summary = json.loads((trial_run / "selected_model.json").read_text())
    assert summary["df_method"] == "satterthwaite"
    for effect in summary["fixed_effects"]:
        # 24 subjects: Satterthwaite's df are near the number of subjects, far below the 120 rows
        assert 10 < effect["df"] < 40, effect
        assert effect["ci_low"] < effect["estimate"] < effect["ci_high"]
    for entry in summary["random_effects"] + summary["correlations"]:
        assert entry["ci_low"] is not None and entry["ci_low"] <= entry.get("sd", entry.get("corr")) <= entry["ci_high"]
    low, high = summary["residual_sd_ci"]
    assert low < summary["residual_sd"] < high


def test_t_intervals_are_wider_than_wald_ones_with_few_subjects(trial_run: Path) -> None:
    for effect in json.loads((trial_run / "selected_model.json").read_text())["fixed_effects"]:
        half_width = (effect["ci_high"] - effect["ci_low"]) / 2
        assert half_width > 1.959964 * effect["std_error"] * 1.01


def test_marginal_means_and_contrasts_have_the_contract_columns(trial_run: Path) -> None:
    means = pd.read_csv(trial_run / "marginal_means.csv")
    contrasts = pd.read_csv(trial_run / "contrasts.csv")
    assert list(means.columns) == MEANS_COLUMNS
    assert sorted(zip(means["arm"], means["week"])) == [("control", 0), ("control", 4), ("treated", 0),
                                                         ("treated", 4)]
    assert list(contrasts.columns) == CONTRAST_COLUMNS
    assert list(contrasts["contrast"]) == ["treated - control"] * 2
    assert set(contrasts["adjustment"]) == {"none"}  # one contrast per week
    # a contrast is the difference of the two means at that week
    for _, row in contrasts.iterrows():
        at_week = means[means["week"] == row["week"]].set_index("arm")["estimate"]
        assert row["estimate"] == pytest.approx(at_week["treated"] - at_week["control"], rel=1e-9, abs=1e-9)


def test_the_report_shows_df_means_contrasts_and_profile_intervals(trial_run: Path) -> None:
    page = (trial_run / "report.html").read_text()
    assert "Satterthwaite" in page and "<th>df</th>" in page
    assert "Estimated marginal means" in page and "Treatment differences" in page
    assert "treated - control" in page
    assert "95% CI (profile)" in page
    assert (trial_run / "figures" / "marginal_means.png").stat().st_size > 10_000


def test_a_binomial_study_gets_probabilities_and_odds_ratios_on_the_normal() -> None:
    visits, _, _ = make_glmm_visits("binomial", n_subjects=80)
    inputs = study_inputs(visits, {"ri": "relapse ~ week * arm + (1 | pid)"}, family="binomial",
                          estimates={"by": "arm", "at": {"week": [0, 5]}}, outcome="relapse")
    assert inputs.config.models.df == "normal"
    assert all(math.isinf(fe.df) for fe in inputs.selected.fixed_effects)
    assert inputs.estimates is not None and inputs.estimates.scale == "probability"
    assert inputs.estimates.ratio == "odds ratio"
    assert ((inputs.estimates.means["estimate"] > 0) & (inputs.estimates.means["estimate"] < 1)).all()
    # R's reference level is the first in sorted order ("active"); a ratio is written as emmeans writes it
    assert list(inputs.estimates.contrasts["contrast"]) == ["control / active"] * 2
    assert (inputs.estimates.contrasts["estimate"] > 0).all()


def test_a_binomial_study_may_not_ask_for_satterthwaite() -> None:
    with pytest.raises(ConfigError, match="normal distribution"):
        parse_config({"study": "s", "data": {"source": "x.csv", "subject": "id", "time": "t", "outcome": "y"},
                      "models": {"family": "binomial", "df": "satterthwaite", "candidates": {"a": "y ~ t + (1 | id)"}}})


@pytest.mark.parametrize(("estimates", "message"), [
    ({"by": "region"}, "no column 'region'"),
    ({"by": "age"}, "'age' holds numbers"),
    ({"at": {"arm": [1]}}, "'arm' is categorical"),
])
def test_estimates_the_data_cannot_answer_are_refused_before_any_fit(estimates: dict, message: str) -> None:
    config = parse_config({"study": "s", "data": {"source": "x.csv", "subject": "pid", "time": "week",
                                                  "outcome": "score", "categorical": ["site"]},
                           "models": {"candidates": {"a": "score ~ week + (1 | pid)"}}, "estimates": estimates})
    visits = make_trial().assign(age=40.0, site="A")
    with pytest.raises(ConfigError, match=message):
        check_estimates(config, visits, parse_candidates(config.models.candidates))


def test_an_at_value_no_candidate_can_estimate_is_refused_before_any_fit() -> None:
    # a week that is not a level of factor(week) in one candidate: refused with the candidate named, not after
    # every fit
    config = parse_config({"study": "s", "data": {"source": "x.csv", "subject": "pid", "time": "week",
                                                  "outcome": "score"},
                           "models": {"candidates": {"slope": "score ~ week * arm + (1 | pid)",
                                                     "visits": "score ~ factor(week) * arm + (1 | pid)"}},
                           "estimates": {"by": "arm", "at": {"week": [0, 2.5]}}})
    with pytest.raises(ConfigError, match=r"candidate 'visits'.*2\.5 is not a level of factor\(week\)"):
        check_estimates(config, make_trial(), parse_candidates(config.models.candidates))


def test_a_df_method_that_cannot_be_computed_falls_back_to_the_normal_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import longitudinal.inference.reported as reported_module

    real = reported_module.fixed_effect_inference

    def refuse(fit, visits, method):  # type: ignore[no-untyped-def]
        if method != "normal":
            raise ConfigError("Kenward–Roger needs the n × n covariance of a crossed design of 90,000 rows")
        return real(fit, visits, method)

    monkeypatch.setattr(reported_module, "fixed_effect_inference", refuse)
    inputs = study_inputs(make_trial(), {"ri": "score ~ week * arm + (1 | pid)"}, df="kenward-roger")
    assert all(math.isinf(fe.df) for fe in inputs.selected.fixed_effects)
    assert "the df by Kenward–Roger's method (as pbkrtest) could not be computed" in inputs.selected.message
    assert "normal distribution" in inputs.selected.message
    # the files say what was used, not what was asked for
    assert inputs.df_used == "normal"
    summary = selected_model_summary(inputs.selected, "bic", inputs.explained, inputs.df_used)
    assert summary["df_method"] == "normal" and all(math.isinf(fe["df"]) for fe in summary["fixed_effects"])
    page = render_report(inputs, {})
    assert "models.df: kenward-roger) could not be computed for this model" in page


def test_a_failed_fit_says_why_its_estimates_are_missing() -> None:
    config = parse_config({"study": "s", "data": {"source": "x.csv", "subject": "pid", "time": "week", "outcome": "score"},
                           "models": {"candidates": {"a": "score ~ week + (1 | pid)"}}, "estimates": {"by": "arm"}})
    failed = failed_fit("a", "score ~ week + (1 | pid)", "REML", "lme4-style", "candidate 'a': it failed", n_obs=10,
                        n_subjects=2, n_params=4)
    reported = report_inference(failed, make_trial(), config)
    assert reported.estimates is None
    assert "were not computed: the selected model's fit failed" in reported.fit.message


def test_an_mmrm_says_it_has_no_profile_intervals() -> None:
    visits = make_trial()
    config = parse_config({"study": "s", "data": {"source": "x.csv", "subject": "pid", "time": "week", "outcome": "score"},
                           "models": {"candidates": {"us": "score ~ factor(week) * arm + ar1(week | pid)"}}})
    fit = fit_candidate(visits, "ar1", "score ~ factor(week) * arm + ar1(week | pid)", method="REML")
    reported = report_inference(fit, visits, config)
    assert reported.df_method == "satterthwaite" and all(1 < fe.df < 200 for fe in reported.fit.fixed_effects)
    assert "no profile-likelihood intervals for a model with a residual covariance structure" in reported.fit.message


def test_the_means_plot_draws_a_line_per_group_and_value_of_a_second_at_column() -> None:
    from longitudinal.reporting.figures import plot_marginal_means

    rng = np.random.default_rng(5)
    visits = make_trial().assign(age=lambda d: np.repeat(rng.uniform(30, 70, d["pid"].nunique()), 5))
    config = parse_config({"study": "s", "data": {"source": "x.csv", "subject": "pid", "time": "week", "outcome": "score"},
                           "models": {"candidates": {"a": "score ~ week * arm + age + (1 | pid)"}},
                           "estimates": {"by": "arm", "at": {"week": [0, 4], "age": [40, 55]}}})
    fit = fit_candidate(visits, "a", "score ~ week * arm + age + (1 | pid)", method="REML")
    estimates = report_inference(fit, visits, config).estimates
    assert estimates is not None and len(estimates.means) == 2 * 2 * 2
    figure = plot_marginal_means(estimates, visits, "score", time="week", subject="pid")
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    model_lines = [label for label in labels if "model mean" in label]
    assert sorted(model_lines) == sorted(f"arm = {arm}, age = {age}: model mean, 95% band"
                                         for arm in ("control", "treated") for age in (40, 55))
    for line in figure.axes[0].get_lines():  # each model line runs over the two weeks, one age at a time
        if "model mean" in line.get_label():
            assert list(line.get_xdata()) == [0.0, 4.0]
    assert sorted(label for label in labels if "observed" in label) == [
        "arm = control: observed mean", "arm = treated: observed mean"]
