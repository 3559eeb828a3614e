"""The HTML report: every section, escaped user text, self-contained, the row accounting stated."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from longitudinal.config import parse_config
from longitudinal.errors import FitError
from longitudinal.inference.nested import compare_nested, compute_aicc
from longitudinal.records import (
    ExpectationOutcome,
    Fit,
    FixedEffect,
    OptimizerAttempt,
    ReportInputs,
    ResidualCovariance,
    Selection,
    SourceFile,
    Validated,
    VarianceComponent,
    failed_fit,
)
from longitudinal.reporting.figures import FIGURE_KEYS
from longitudinal.reporting.html import SECTIONS, format_number, format_p, render_report

PNG = b"\x89PNG\r\n\x1a\nnot-really-an-image"
BAD_NAME = "evil<script>alert(1)</script>"


def make_validated(n_quarantined: int = 3) -> Validated:
    visits = pd.DataFrame({
        "pid": np.repeat(["a", "b", "c", "d"], [3, 4, 5, 4]),
        "week": [0.0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 3],
        "score": np.linspace(10, 20, 16),
        "source_file": "visits.csv",
        "source_line": np.arange(2, 18),
    })
    quarantine = pd.DataFrame({
        "pid": ["e"] * n_quarantined,
        "week": ["x"] * n_quarantined,
        "score": ["12"] * n_quarantined,
        "source_file": "visits.csv",
        "source_line": np.arange(18, 18 + n_quarantined),
        "reason": ["time not a number"] * (n_quarantined - 1) + ["<b>odd</b> reason"],
    })
    expectations = (
        ExpectationOutcome("required_columns_present", "table", None, True, 0, "pid, week and score exist"),
        ExpectationOutcome("time_is_number", "row", "week", False, n_quarantined, "week is a number"),
    )
    return Validated(visits=visits, quarantine=quarantine, expectations=expectations,
                     rows_read=len(visits) + n_quarantined)


def make_fits() -> tuple[Fit, ...]:
    common = {"engine": "test", "converged": True, "singular": False, "message": "", "n_obs": 16, "n_subjects": 4}
    attempts = (OptimizerAttempt("bobyqa", -30.0, True, 40, 0.01),
                OptimizerAttempt("lbfgs", -30.25, True, 22, 0.02, "stopped short"))
    return (
        Fit(name="ri", formula="score ~ week + (1 | pid)", method="ML", n_params=4, loglik=-32.0, **common),
        Fit(name="ris", formula="score ~ week + (week | pid)", method="ML", n_params=6, loglik=-30.0,
            optimizer="bobyqa", attempts=attempts, iterations=40, **common),
        failed_fit(BAD_NAME, "score ~ week + (week || pid)", "ML", "test", "log-likelihood is not finite (inf)",
                   n_obs=16, n_subjects=4, n_params=5),
    )


def comparison_table(fits: tuple[Fit, ...], selected: str) -> pd.DataFrame:
    """The comparison table of ``fits`` (the columns of ``model_comparison.csv``), built by hand."""
    rows = []
    for fit in fits:
        rows.append({"model": fit.name, "formula": fit.formula, "converged": fit.converged, "singular": fit.singular,
                     "n_obs": fit.n_obs, "n_subjects": fit.n_subjects, "n_params": fit.n_params,
                     "loglik": fit.loglik, "aic": fit.aic, "bic": fit.bic})
    table = pd.DataFrame(rows)
    for criterion in ("aic", "bic"):
        table[f"delta_{criterion}"] = table[criterion] - table[criterion].min()
        weight = np.exp(-table[f"delta_{criterion}"] / 2)
        table[f"{criterion}_weight"] = weight / weight.sum()
    table["selected"] = table["model"] == selected
    return table


def make_selection(fits: tuple[Fit, ...]) -> Selection:
    """The selection of ``fits`` with its table built by hand, and the AICc and likelihood-ratio tests the
    select stage adds (a refusal recorded, as the report shows it, for fits no test can compare)."""
    table = comparison_table(fits, "ris")
    try:
        tests, refused = compare_nested(fits), ""
    except FitError as error:
        tests, refused = (), str(error)
    return Selection(criterion="bic", table=table, selected="ris", aicc={f.name: compute_aicc(f) for f in fits},
                     tests=tests, tests_refused=refused)


def make_selected() -> Fit:
    return Fit(
        name="ris", formula="score ~ week + (week | pid)", method="REML", engine="test", converged=True,
        singular=False, message="", n_obs=16, n_subjects=4, n_params=6, loglik=-31.5, reml_criterion=63.0,
        fixed_effects=(FixedEffect("(Intercept)", 10.123456, 0.5, 9.143, 11.10, 2e-9),
                       FixedEffect("week", 0.5, 0.25, 0.01, 0.99, 0.0456)),
        random_effects=(VarianceComponent("pid", "(Intercept)", 1.5), VarianceComponent("pid", "week", 0.1)),
        residual_sd=0.8,
    )


def make_inputs(**changes: object) -> ReportInputs:
    """The demo inputs with ``changes``; new ``fits`` come with their selection unless one is given."""
    fits = make_fits()
    if "fits" in changes and "selection" not in changes:
        changes["selection"] = make_selection(changes["fits"])  # type: ignore[arg-type]
    config = parse_config({
        "study": "demo-study",
        "data": {"source": "visits.csv", "subject": "pid", "time": "week", "outcome": "score"},
        "models": {"criterion": "bic", "candidates": {"ri": "score ~ week + (1 | pid)",
                                                      "ris": "score ~ week + (week | pid)"}},
    })
    inputs = ReportInputs(
        study="demo-study", run_id="20250101T000000Z", created="2025-01-01T00:00:00+00:00", config=config,
        files=(SourceFile("visits.csv", "0123456789abcdef" * 4, 19),), validated=make_validated(),
        selection=make_selection(fits), fits=fits, selected=make_selected(),
        timings={"stages": {"ingest": 0.012, "fit": 1.5}, "fits": {"ri": 0.2, "ris": 0.3}},
        versions={"numpy": "2.4.0", "pandas": "3.1.1"},
    )
    return replace(inputs, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(make_inputs(), {key: PNG for key in FIGURE_KEYS})


def test_every_section_heading_appears_in_order(page: str) -> None:
    positions = [page.index(f"<h2>{title}</h2>") for _, title in SECTIONS]
    assert page.index("<h2>Summary</h2>") < positions[0]
    assert positions == sorted(positions)
    for anchor, _ in SECTIONS:
        assert f'href="#{anchor}"' in page and f'id="{anchor}"' in page


def test_summary_names_the_selected_model_criterion_and_counts(page: str) -> None:
    summary = page[page.index('<section id="summary">'):page.index('<section id="data">')]
    assert "<strong>ris</strong>" in summary
    assert "lowest BIC" in summary
    assert "16 rows from 4 subjects" in summary
    assert "3 of the 19 rows read were quarantined" in summary


def test_the_row_accounting_is_stated_with_its_numbers(page: str) -> None:
    assert "Rows read = rows analysed + rows quarantined: 19 = 16 + 3." in page
    assert "does not add up" not in page


def test_broken_accounting_is_flagged() -> None:
    broken = replace(make_validated(), rows_read=25)
    page = render_report(make_inputs(validated=broken), {})
    assert "25 = 16 + 3. This does not add up (+6 rows unaccounted for)" in page


def test_user_text_is_escaped() -> None:
    page = render_report(make_inputs(study=BAD_NAME), {})
    assert "<script" not in page
    assert "evil&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;odd&lt;/b&gt; reason" in page


def test_the_page_is_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page and "@import" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == len(FIGURE_KEYS)


def test_missing_figures_become_notes() -> None:
    page = render_report(make_inputs(), {"trajectories": PNG})
    assert page.count("data:image/png;base64,") == 1
    for key in FIGURE_KEYS[1:]:
        assert f"Figure <code>{key}</code> was not produced for this run." in page


def test_model_comparison_table_marks_the_selected_and_lists_failures(page: str) -> None:
    section = page[page.index('<section id="comparison">'):page.index('<section id="selected">')]
    assert section.count('<tr class="selected">') == 1
    assert "✔ selected" in section
    assert "k = fixed effects + random-effect (co)variance parameters + 1 residual variance" in section
    assert "n = 16 rows analysed" in section
    assert "log-likelihood is not finite (inf)" in section
    assert "-30.00" in section  # logLik of ris with two decimals


def test_selected_model_section_formats_estimates_and_p_values(page: str) -> None:
    section = page[page.index('<section id="selected">'):page.index('<section id="random-effects">')]
    assert ">10.12<" in section  # four significant digits
    assert "&lt;0.001" in section and ">0.046<" in section
    assert ">20.25<" in section  # Wald z = 10.123456 / 0.5
    assert "Residual" in section and ">0.6400<" in section  # residual variance 0.8²
    assert "Singular fit" not in section


def test_a_singular_selected_fit_is_warned_about() -> None:
    page = render_report(make_inputs(selected=replace(make_selected(), singular=True)), {})
    assert "Singular fit." in page


def test_quarantine_preview_shows_the_first_twenty_rows_with_source_line() -> None:
    page = render_report(make_inputs(validated=make_validated(n_quarantined=25)), {})
    assert "Showing the first 20 of 25 quarantined rows" in page
    assert ">37<" in page and ">38<" not in page  # source lines 18..37 shown, 38.. not
    assert "time not a number</td><td class=\"num\">24<" in page  # counted by reason


def test_reproducibility_lists_timings_versions_and_optimizer_attempts(page: str) -> None:
    section = page[page.index('<section id="reproducibility">'):]
    assert ">12 ms<" in section and ">1.50 s<" in section
    assert "<code>2.4.0</code>" in section
    assert "↳ lbfgs" in section and ">0.250<" in section  # how far lbfgs stopped short
    assert "stopped short" in section


@pytest.mark.parametrize(("value", "expected"), [
    (12.3456, "12.35"), (0.000123456, "1.235e-04"), (1234567.0, "1.235e+06"), (-0.5, "-0.5000"),
    (math.nan, "—"), (None, "—"), (7, "7"), (12345, "12,345"),
])
def test_format_number(value: object, expected: str) -> None:
    assert format_number(value) == expected


@pytest.mark.parametrize(("value", "expected"), [(0.0004, "<0.001"), (0.001, "0.001"), (0.04567, "0.046"),
                                                 (1.0, "1.000"), (math.nan, "—")])
def test_format_p(value: float, expected: str) -> None:
    assert format_p(value) == expected


# ------------------------------------------------------------------ comparison: AICc, LR tests, diagnostics


def comparison_section(page: str) -> str:
    return page[page.index('<section id="comparison">'):page.index('<section id="selected">')]


def test_model_comparison_table_shows_aicc_by_hand(page: str) -> None:
    section = comparison_section(page)
    assert "<th>AICc</th>" in section
    # ri: AIC = 64 + 8 = 72, + 2·4·5/(16 − 4 − 1) = 75.64; ris: AIC = 60 + 12 = 72, + 2·6·7/9 = 81.33
    assert ">75.64<" in section and ">81.33<" in section


def test_likelihood_ratio_table_tests_ri_against_ris_with_the_boundary_mixture(page: str) -> None:
    section = comparison_section(page)
    table = section[section.index("Likelihood-ratio tests between nested candidates"):
                    section.index("Fit diagnostics per candidate")]
    # LR = 2(−30 + 32) = 4 on 2 df; p = ½ P(χ²₁ > 4) + ½ P(χ²₂ > 4) = ½ 0.0455 + ½ 0.1353 = 0.090
    assert '<td>ri</td><td>ris</td><td>variance of week | pid; 1 random-effect covariance</td>' in table
    assert '<td class="num">2</td><td class="num">4.00</td><td class="num">0.090</td>' in table
    assert "50:50 mixture of χ²(1) and χ²(2)" in table
    assert "Self &amp; Liang 1987; Stram &amp; Lee 1994" in table
    assert "a small p-value (below 0.05, say) means the data support the parameters the larger model adds" in table
    # The failed candidate is nested by its formula (issue 9: nesting from formulas, not from which fits
    # succeeded): its pairs are listed, escaped, with no statistic and the reason no test was computed.
    assert BAD_NAME not in table
    assert ('<td>ri</td><td>evil&lt;script&gt;alert(1)&lt;/script&gt;</td><td>variance of week | pid</td>'
            '<td class="num">1</td><td>—</td><td>no test</td>') in table
    assert ("ri against evil&lt;script&gt;alert(1)&lt;/script&gt;: no test: the fit of "
            "&#x27;evil&lt;script&gt;alert(1)&lt;/script&gt;&#x27; failed (log-likelihood is not finite (inf)).") in table


def test_without_nested_candidates_the_report_says_no_test_applies() -> None:
    fits = make_fits()
    other = replace(fits[1], formula="score ~ 1 + (0 + week | pid)")
    page = render_report(make_inputs(fits=(fits[0], other)), {})
    assert "no likelihood-ratio test applies" in comparison_section(page)


def test_a_comparison_the_tests_refuse_is_reported_not_raised() -> None:
    fits = make_fits()
    page = render_report(make_inputs(fits=(fits[0], replace(fits[1], n_obs=15))), {})
    assert "No likelihood-ratio test: candidates were fitted on different rows (ri n=16, ris n=15)" in page


def test_diagnostics_table_has_one_row_per_fit_and_the_refit(page: str) -> None:
    section = comparison_section(page)
    table = section[section.index("Fit diagnostics per candidate"):]
    for header in ("Engine", "Optimizer", "Evaluations", "max |gradient|", "Converged", "Singular", "Message"):
        assert f"<th>{header}</th>" in table
    assert "<td>ris</td><td>ML</td><td>test</td><td>bobyqa</td><td class=\"num\">40</td>" in table
    assert "<td>ris (refit)</td><td>REML</td>" in table
    assert "log-likelihood is not finite (inf)" in table
    assert "lme4 warns above 0.002" in table


def test_diagnostics_table_flags_a_singular_candidate() -> None:
    fits = make_fits()
    page = render_report(make_inputs(fits=(fits[0], replace(fits[1], singular=True), fits[2])), {})
    table = comparison_section(page)[comparison_section(page).index("Fit diagnostics per candidate"):]
    assert '<tr class="singular"><td>ris</td>' in table
    assert '<span class="warning-text">yes</span>' in table


def ranef_of(n_levels: int) -> pd.DataFrame:
    return pd.DataFrame({"group": "pid", "level": [f"s{i}" for i in range(n_levels)], "term": "(Intercept)",
                         "estimate": np.linspace(-1, 1, n_levels), "cond_sd": 0.2})


def test_caterpillar_caption_says_every_level_is_shown_when_levels_are_few() -> None:
    page = render_report(make_inputs(selected=replace(make_selected(), ranef=ranef_of(12))), {"caterpillar": PNG})
    section = page[page.index('<section id="random-effects">'):page.index('<section id="diagnostics">')]
    assert 'id="fig-caterpillar"' in section
    assert "95% conditional intervals (mode ± 1.96 conditional SD)" in section
    assert "Every level is shown." in section


def test_caterpillar_caption_says_which_levels_are_shown_when_levels_are_many() -> None:
    page = render_report(make_inputs(selected=replace(make_selected(), ranef=ranef_of(500))), {"caterpillar": PNG})
    assert ("For pid: (Intercept) (500 levels), only the 30 lowest and 30 highest levels are shown" in page)


def test_a_subject_of_several_columns_is_counted_by_its_combined_key() -> None:
    config = parse_config({
        "study": "demo-study",
        "data": {"source": "visits.csv", "subject": ["site", "pid"], "time": "week", "outcome": "score"},
        "models": {"candidates": {"ri": "score ~ week + (1 | site:pid)"}},
    })
    validated = make_validated()
    visits = validated.visits.assign(site="S", **{"site:pid": "S:" + validated.visits["pid"]})
    page = render_report(make_inputs(config=config, validated=replace(validated, visits=visits)), {})
    assert "<dt>Subjects analysed</dt><dd>4</dd>" in page
    assert "subject site × pid" in page


def test_the_report_is_the_same_whether_the_visits_hold_text_as_text_or_as_categories(page: str) -> None:
    validated = make_validated()
    text = validated.visits
    held = text.assign(**{c: pd.Categorical(text[c].array) for c in ("pid", "source_file")})
    assert render_report(make_inputs(validated=replace(validated, visits=held)), {key: PNG for key in FIGURE_KEYS}) == page


def test_a_large_share_of_quarantined_rows_is_called_out_in_the_summary_and_the_data_section() -> None:
    # 3 of 19 rows (16%) is counted but not called out; 6 of 22 rows (27%) stands out.
    quiet = render_report(make_inputs(), {key: PNG for key in FIGURE_KEYS})
    assert "of the rows read were quarantined (" not in quiet
    loud = render_report(make_inputs(validated=make_validated(n_quarantined=6)), {key: PNG for key in FIGURE_KEYS})
    summary = loud[loud.index('<section id="summary">'):loud.index('<section id="data">')]
    data = loud[loud.index('<section id="data">'):loud.index('<section id="validation">')]
    sentence = "27% of the rows read were quarantined (6 of 22); the most common reason (5 rows): time not a number."
    assert sentence in summary and sentence in data
    assert '<p class="warning">27% of the rows read' in data


def test_the_optimizer_note_says_several_attempts_only_when_several_ran(page: str) -> None:
    assert "1 of 4 fits ran more than one optimizer attempt (bobyqa, lbfgs)" in page
    one_each = tuple(replace(f, attempts=f.attempts[:1]) for f in make_fits())
    single = render_report(make_inputs(fits=one_each), {key: PNG for key in FIGURE_KEYS})
    assert "Each fit ran one optimizer attempt (bobyqa)" in single
    assert "several optimizers" not in single and "more than one optimizer attempt" not in single


def test_dropped_collinear_columns_are_named_in_the_summary_the_selected_model_and_the_json(tmp_path) -> None:
    import json

    from longitudinal.reporting.run_folder import selected_model_summary

    note = "fixed-effect model matrix is rank deficient so dropping 1 column / coefficient: x2"
    selected = replace(make_selected(), dropped_terms=("x2",), message=note)
    page = render_report(make_inputs(selected=selected), {key: PNG for key in FIGURE_KEYS})
    summary = page[page.index('<section id="summary">'):page.index('<section id="data">')]
    assert "Collinear fixed-effect column dropped from the selected model: x2" in summary
    assert "so 1 column was dropped, as lme4 drops it: <code>x2</code>" in page
    assert selected_model_summary(selected, "bic")["dropped_terms"] == ["x2"]
    assert selected_model_summary(make_selected(), "bic")["dropped_terms"] == []


def test_a_fit_with_a_convergence_warning_competes_and_its_warning_is_shown() -> None:
    fits = make_fits()
    warned = replace(fits[1], converged=False, message="failed to converge with max|grad| = 0.0031 (tol = 0.002)")
    kept = (fits[0], warned, fits[2])
    page = render_report(make_inputs(fits=kept, selection=make_selection(kept)), {key: PNG for key in FIGURE_KEYS})
    summary = page[page.index('<section id="summary">'):page.index('<section id="data">')]
    assert "2 gave a valid likelihood (1 with a convergence warning, kept in the comparison as lme4 keeps it: ris)" in summary
    section = comparison_section(page)
    assert '<span class="warning-text">convergence warning</span>' in section
    assert "<li><strong>ris</strong>: failed to converge with max|grad| = 0.0031 (tol = 0.002)</li>" in section


def test_the_singular_message_names_the_term_and_validation_warnings_stand_out() -> None:
    message = "boundary (singular) fit: the variance of 'week' for pid is zero"
    selected = replace(make_selected(), singular=True, message=message)
    warning = ExpectationOutcome("subject_ids_distinct", "warning", "pid", False, 0, "ids are distinct",
                                 "subject ids '068' and '68' differ only by leading zeros")
    validated = replace(make_validated(), expectations=(*make_validated().expectations, warning))
    page = render_report(make_inputs(selected=selected, validated=validated), {key: PNG for key in FIGURE_KEYS})
    assert "<strong>Singular fit.</strong> Boundary (singular) fit: the variance of &#x27;week&#x27; for pid is zero." in page
    summary = page[page.index('<section id="summary">'):page.index('<section id="data">')]
    assert "Validation found 1 thing to check (section 2): subject ids &#x27;068&#x27; and &#x27;68&#x27;" in summary
    validation = page[page.index('<section id="validation">'):page.index('<section id="trajectories">')]
    assert '<p class="warning">subject ids &#x27;068&#x27; and &#x27;68&#x27; differ only by leading zeros</p>' in validation
    assert '<span class="warning-text">warning</span>' in validation


def test_the_report_shows_the_tests_and_aicc_of_the_selection_and_computes_none() -> None:
    # Nested fits, but a selection that carries no test and no AICc: the report shows what the record holds.
    selection = replace(make_selection(make_fits()), aicc={}, tests=())
    section = comparison_section(render_report(make_inputs(selection=selection), {}))
    assert "no likelihood-ratio test applies" in section
    assert ">75.64<" not in section and ">81.33<" not in section


# ------------------------------------------------------------------- residual covariance structures (MMRM)


def ar1_covariance(sigma: float = 2.0, rho: float = 0.6, visits: int = 4, **changes: object) -> ResidualCovariance:
    """The AR(1) residual covariance σ²ρ^|i−j| over weeks 0, 1, ..., as the engine would record it."""
    lag = np.abs(np.subtract.outer(np.arange(visits), np.arange(visits)))
    covariance = ResidualCovariance(
        structure="ar1", term="ar1(week | pid)", description="AR(1)", visit="week",
        labels=tuple(str(v) for v in range(visits)), matrix=sigma ** 2 * rho ** lag, n_params=2,
        parameters=(("sigma", sigma), ("rho", rho)), heterogeneous=False, spatial=False,
    )
    return replace(covariance, **changes)  # type: ignore[arg-type]


def ar1h_covariance() -> ResidualCovariance:
    sd = np.array([1.0, 2.0, 3.0, 4.0])
    lag = np.abs(np.subtract.outer(np.arange(4), np.arange(4)))
    return ResidualCovariance(
        structure="ar1h", term="ar1h(week | pid)", description="AR(1), heterogeneous variances", visit="week",
        labels=("0", "1", "2", "3"), matrix=np.outer(sd, sd) * 0.5 ** lag, n_params=5,
        parameters=(("sd[week 0]", 1.0), ("sd[week 1]", 2.0), ("sd[week 2]", 3.0), ("sd[week 3]", 4.0),
                    ("rho", 0.5)),
        heterogeneous=True, spatial=False,
    )


MMRM_FORMULA = "score ~ factor(week) * arm + ar1(week | pid)"


def make_mmrm_visits(n_subjects: int = 40, rho: float = 0.6, seed: int = 5) -> tuple[pd.DataFrame, np.ndarray]:
    """A two-arm trial, weeks 0-3, a fifth of the subjects dropping out after week 1; and each row's AR(1)
    residual (ρ, unit variance), the serial correlation the lme4-style candidate leaves in its residuals."""
    rng = np.random.default_rng(seed)
    noise = np.empty((n_subjects, 4))
    noise[:, 0] = rng.normal(size=n_subjects)
    for week in range(1, 4):
        noise[:, week] = rho * noise[:, week - 1] + math.sqrt(1 - rho ** 2) * rng.normal(size=n_subjects)
    kept = np.ones((n_subjects, 4), dtype=bool)
    kept[: n_subjects // 5, 2:] = False
    pid = np.repeat([f"s{i:02d}" for i in range(n_subjects)], 4)[kept.ravel()]
    week = np.tile(np.arange(4.0), n_subjects)[kept.ravel()]
    arm = np.repeat(["A" if i % 2 else "B" for i in range(n_subjects)], 4)[kept.ravel()]
    residual = noise.ravel()[kept.ravel()]
    visits = pd.DataFrame({"pid": pid, "week": week, "arm": arm, "score": 10.0 + week + 2.0 * residual,
                           "source_file": "trial.csv", "source_line": np.arange(2, 2 + len(pid))})
    return visits, residual


def make_mmrm_inputs(covariance: ResidualCovariance | None = None, n_subjects: int = 40) -> ReportInputs:
    """A study whose candidates are a random intercept, an AR(1) MMRM (selected) and an unstructured one that
    failed; the selected refit carries ``covariance`` (AR(1), σ = 2, ρ = 0.6 by default)."""
    covariance = covariance or ar1_covariance()
    visits, residual = make_mmrm_visits(n_subjects)
    n, subjects = len(visits), visits["pid"].nunique()
    fitted = 10.0 + visits["week"].to_numpy(float)
    whitened = np.random.default_rng(6).normal(size=n)  # what whitening AR(1) residuals gives: no correlation left
    common = {"engine": "test", "converged": True, "singular": False, "message": "", "n_obs": n,
              "n_subjects": subjects, "fitted": fitted}
    fixed = (FixedEffect("(Intercept)", 10.0, 0.3, 9.4, 10.6, 1e-12),)
    fits = (
        Fit(name="ri", formula="score ~ factor(week) * arm + (1 | pid)", method="ML", n_params=10,
            loglik=-330.0, random_effects=(VarianceComponent("pid", "(Intercept)", 1.4),), residual_sd=1.5,
            residuals=2.0 * residual, fixed_effects=fixed, **common),
        Fit(name="ar1", formula=MMRM_FORMULA, method="ML", n_params=10, loglik=-300.0, residual_sd=2.0,
            covariance=covariance, residuals=2.0 * residual, normalized_residuals=whitened, fixed_effects=fixed,
            **common),
        failed_fit("us", "score ~ factor(week) * arm + us(week | pid)", "ML", "test", "did not converge",
                   n_obs=n, n_subjects=subjects, n_params=18),
    )
    selected = replace(fits[1], method="REML", loglik=-298.0, reml_criterion=596.0)
    selection = Selection(criterion="bic", table=comparison_table(fits, "ar1"), selected="ar1",
                          aicc={f.name: compute_aicc(f) for f in fits})
    validated = Validated(visits=visits, quarantine=make_validated().quarantine.iloc[:0],
                          expectations=make_validated().expectations[:1], rows_read=n)
    config = parse_config({
        "study": "mmrm-trial",
        "data": {"source": "trial.csv", "subject": "pid", "time": "week", "outcome": "score"},
        "models": {"criterion": "bic", "candidates": {f.name: f.formula for f in fits}},
    })
    return replace(make_inputs(), study="mmrm-trial", config=config, validated=validated, selection=selection,
                   fits=fits, selected=selected, timings={})


@pytest.fixture(scope="module")
def mmrm_page() -> str:
    from longitudinal.reporting.figures import STRUCTURE_FIGURE_KEYS

    return render_report(make_mmrm_inputs(), {key: PNG for key in (*FIGURE_KEYS, *STRUCTURE_FIGURE_KEYS)})


def section_of(page: str, anchor: str, following: str) -> str:
    return page[page.index(f'<section id="{anchor}">'):page.index(f'<section id="{following}">')]


def test_the_selected_model_shows_its_residual_covariance_with_both_matrices(mmrm_page: str) -> None:
    section = section_of(mmrm_page, "selected", "random-effects")
    assert "<h3>Residual covariance: AR(1) (<code>ar1(week | pid)</code>)</h3>" in section
    assert 'id="fig-residual_covariance"' in section
    covariance = section[section.index("<caption>Covariance matrix"):section.index("<caption>Correlation matrix")]
    # σ²ρ^|i−j| with σ = 2, ρ = 0.6: 4, 2.4, 1.44, 0.864 along the first row; visits as headers
    assert "<th>Visit</th><th>0</th><th>1</th><th>2</th><th>3</th>" in covariance
    assert ('<td><strong>0</strong></td><td class="num">4.000</td><td class="num">2.400</td>'
            '<td class="num">1.440</td><td class="num">0.8640</td>') in covariance
    correlation = section[section.index("<caption>Correlation matrix"):section.index("<caption>Covariance parameters")]
    assert ('<td><strong>3</strong></td><td class="num">0.216</td><td class="num">0.360</td>'
            '<td class="num">0.600</td><td class="num">1.000</td>') in correlation
    parameters = section[section.index("<caption>Covariance parameters"):]
    assert '<td><code>sigma</code></td><td class="num">2.000</td>' in parameters
    assert '<td><code>rho</code></td><td class="num">0.6000</td>' in parameters
    assert "Without random effects this is the whole covariance" in section
    assert "per visit" not in section  # a homogeneous structure: one σ


def test_the_summary_and_random_effects_sections_speak_of_a_model_without_random_effects(mmrm_page: str) -> None:
    summary = section_of(mmrm_page, "summary", "data")
    assert "Its residual covariance within subjects is AR(1) (<code>ar1(week | pid)</code>)." in summary
    assert "The selected model has no random effects" in section_of(mmrm_page, "random-effects", "diagnostics")
    assert "fixed effects alone: the model has no random effects" in section_of(mmrm_page, "observed-fitted",
                                                                                "reproducibility")


def test_a_heterogeneous_structure_lists_the_sd_and_variance_per_visit() -> None:
    page = render_report(make_mmrm_inputs(ar1h_covariance()), {})
    section = section_of(page, "selected", "random-effects")
    assert "<h3>Residual covariance: AR(1), heterogeneous variances (<code>ar1h(week | pid)</code>)</h3>" in section
    table = section[section.index("<caption>Residual SD and variance per visit"):]
    assert '<td>3</td><td class="num">4.000</td><td class="num">16.00</td>' in table
    assert "<dt>Residual SD</dt><dd>per visit (see the residual covariance below)</dd>" in section


def test_a_structure_over_many_visits_shows_the_figure_and_no_matrix_tables() -> None:
    page = render_report(make_mmrm_inputs(ar1_covariance(visits=13)), {})
    section = section_of(page, "selected", "random-effects")
    assert "Over 13 visits the matrices are too large to read as tables" in section
    assert "<caption>Covariance matrix" not in section
    assert "<caption>Covariance parameters" in section


def test_the_comparison_describes_each_candidates_covariance(mmrm_page: str) -> None:
    section = comparison_section(mmrm_page)
    assert "<th>Covariance</th>" in section
    assert "<td>random effects; independent residuals</td>" in section
    assert "<td>residuals AR(1) (2 parameters)</td>" in section
    assert "<td>residuals us(week | pid)</td>" in section  # a failed fit: the term as written
    assert ("k = fixed effects + random-effect (co)variance parameters + the structure's parameters, its variances "
            "included, as nlme's and mmrm's logLik df count") in section


def test_the_lme4_only_report_has_no_covariance_column_or_section(page: str) -> None:
    assert "<th>Covariance</th>" not in page
    assert "Residual covariance" not in page and "fig-residual_correlation" not in page


def test_describe_covariance_reads_random_effects_and_structures_from_the_formula() -> None:
    from longitudinal.reporting.html import describe_covariance

    assert describe_covariance("y ~ t * arm + (1 | id) + ar1(t | id)", None) == "random effects; residuals ar1(t | id)"
    assert describe_covariance("y ~ poly(t, 2) + (t || site/id)", None) == "random effects; independent residuals"
    assert describe_covariance("y ~ factor(visit) + (1 | a) + (1 | b)", None) == "random effects; independent residuals"
    assert (describe_covariance("y ~ factor(visit) + us(visit | id)", ar1_covariance(term="us(visit | id)",
                                                                                       description="unstructured", n_params=10))
            == "residuals unstructured (10 parameters)")


def test_the_residual_correlation_diagnostic_compares_the_selected_with_the_best_without_serial_correlation(
        mmrm_page: str) -> None:
    section = section_of(mmrm_page, "diagnostics", "observed-fitted")
    assert "<h3>Residual correlation within subjects</h3>" in section
    assert 'id="fig-residual_correlation"' in section
    assert ("for ar1 (the selected model, REML fit) and ri (the best candidate without serial correlation by BIC, "
            "ML fit)") in section
    assert "uncorrelated at every lag: points near 0" in section
    assert "Residuals (observed − fitted fixed effects: the model has no random effects)" in section
    assert "Normal QQ plot of normalized residuals" in section


def visit_tables_of(page: str) -> tuple[str, str]:
    """The "Per visit" and "Dropout pattern" tables of the data section."""
    data = section_of(page, "data", "validation")
    per_visit = data[data.index("<h3>Per visit</h3>"):data.index("<h3>Dropout pattern</h3>")]
    return per_visit, data[data.index("<h3>Dropout pattern</h3>"):data.index("<h3>Input files</h3>")]


def visit_row(*cells: str) -> str:
    return "<tr>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>"


def test_the_data_section_counts_subjects_and_averages_the_outcome_per_visit(page: str) -> None:
    # Weeks 0-2: a, b, c, d; week 3: b, c, d; week 4: c. Scores are linspace(10, 20, 16): at week 3,
    # rows 6, 10 and 15 (14, 16.67, 20), mean 16.89, SD 3.006.
    per_visit, dropout = visit_tables_of(page)
    assert "<th>Visit (week)</th><th>subjects</th><th>mean (SD)</th>" in per_visit
    assert visit_row("0", "4", "13.67 (3.464)") in per_visit
    assert visit_row("3", "3", "16.89 (3.006)") in per_visit
    assert visit_row("4", "1", "17.33 (—)") in per_visit
    assert "<th>Visit (week)</th><th>last seen</th><th>still observed</th>" in dropout
    assert visit_row("1", "0", "4 (100%)") in dropout
    assert visit_row("2", "1", "4 (100%)") in dropout  # a
    assert visit_row("3", "2", "3 (75%)") in dropout  # b and d
    assert visit_row("4", "1", "1 (25%)") in dropout  # c


def test_the_visit_tables_split_by_the_trajectories_group_and_a_binary_outcome_shows_proportions() -> None:
    validated = make_validated()
    visits = validated.visits.assign(arm=np.where(validated.visits["pid"].isin(["a", "b"]), "x", "y"),
                                     score=(validated.visits["score"] > 14).astype(float))
    selected = replace(make_selected(), formula="score ~ week + arm + (1 | pid)", family="binomial", method="ML")
    page = render_report(make_inputs(validated=replace(validated, visits=visits), selected=selected), {})
    per_visit, dropout = visit_tables_of(page)
    assert "per level of arm" in per_visit and "proportion of rows with score = 1" in per_visit
    assert ("<th>x: subjects</th><th>x: proportion of 1s</th><th>y: subjects</th><th>y: proportion of 1s</th>"
            in per_visit)
    assert visit_row("3", "1", "0.000", "2", "1.000") in per_visit
    assert visit_row("4", "0", "—", "1", "1.000") in per_visit
    assert visit_row("3", "1", "1 (50%)", "1", "2 (100%)") in dropout
    assert visit_row("4", "0", "0 (0%)", "1", "1 (50%)") in dropout


def test_many_visits_show_the_first_and_last_ten_and_many_times_are_binned() -> None:
    def page_with_times(n: int) -> str:
        visits = pd.DataFrame({"pid": np.repeat(["a", "b"], n), "week": np.tile(np.arange(n, dtype=float), 2),
                               "score": np.arange(2 * n, dtype=float)})
        validated = replace(make_validated(), visits=visits, rows_read=2 * n + 3)
        return render_report(make_inputs(validated=validated), {})

    # Subject a scores 0, 1, ... and b n, n + 1, ... at weeks 0, 1, ...: at week w, mean w + n/2, SD n/√2.
    per_visit, dropout = visit_tables_of(page_with_times(25))
    assert "25 visits: showing the first 10 and the last 10." in per_visit
    assert visit_row("9", "2", "21.50 (17.68)") in per_visit and visit_row("15", "2", "27.50 (17.68)") in per_visit
    assert '<td class="num">12</td>' not in per_visit and '<td class="na">…</td>' in per_visit
    assert visit_row("24", "2", "2 (100%)") in dropout
    binned, _ = visit_tables_of(page_with_times(40))
    assert "Time has 40 distinct values, so each row is one of 10 quantile bins of time" in binned
    # The first bin holds weeks 0-3 of both subjects: scores 0-3 and 40-43, mean 21.5, SD 21.41.
    assert visit_row("0 to 3", "2", "21.50 (21.41)") in binned
