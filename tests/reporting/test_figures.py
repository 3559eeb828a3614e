"""Figure builders: each returns a titled, labelled Figure; sampling bounds hold; bad alignment raises."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.text import Text

from longitudinal.config import StudyConfig, parse_config
from longitudinal.records import (
    Correlation,
    Fit,
    FixedEffect,
    ResidualCovariance,
    Selection,
    VarianceComponent,
    failed_fit,
)
from longitudinal.reporting.figures import (
    CATERPILLAR_LEVELS,
    FIGURE_KEYS,
    build_figures,
    caterpillar_rows,
    choose_group_column,
    figure_builders,
    figure_to_png,
    plot_caterpillar,
    plot_coefficients,
    plot_model_comparison,
    plot_observed_vs_fitted,
    plot_qq,
    plot_random_effects,
    plot_residuals_over_time,
    plot_residuals_vs_fitted,
    plot_trajectories,
    render_pngs,
)

FORMULA = "score ~ week * arm + (week | pid)"


def make_visits(n_subjects: int = 6, n_visits: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    pid = np.repeat([f"p{i}" for i in range(n_subjects)], n_visits)
    week = np.tile(np.arange(n_visits, dtype=float), n_subjects)
    arm = np.repeat(["control" if i % 2 else "active" for i in range(n_subjects)], n_visits)
    score = 20.0 - 0.5 * week + rng.normal(0, 1, len(pid))
    return pd.DataFrame({"pid": pid, "week": week, "score": score, "arm": arm, "site": "A"})


def make_fit(visits: pd.DataFrame, name: str = "ris") -> Fit:
    subjects = visits["pid"].unique()
    ranef = pd.DataFrame({
        "group": "pid",
        "level": np.concatenate([subjects, subjects]),
        "term": ["(Intercept)"] * len(subjects) + ["week"] * len(subjects),
        "estimate": np.linspace(-1, 1, 2 * len(subjects)),
        "cond_sd": 0.3,
    })
    fitted = 20.0 - 0.5 * visits["week"].to_numpy(float)
    return Fit(
        name=name, formula=FORMULA, method="REML", engine="test", converged=True, singular=False, message="",
        n_obs=len(visits), n_subjects=len(subjects), n_params=7, loglik=-40.0, reml_criterion=80.0,
        fixed_effects=(
            FixedEffect("(Intercept)", 20.0, 0.5, 19.02, 20.98, 1e-10),
            FixedEffect("week", -0.5, 0.1, -0.696, -0.304, 1e-6),
            FixedEffect("armcontrol", 0.2, 0.6, -0.976, 1.376, 0.74),
            FixedEffect("week:armcontrol", 0.05, 0.14, -0.224, 0.324, 0.72),
        ),
        random_effects=(VarianceComponent("pid", "(Intercept)", 1.2), VarianceComponent("pid", "week", 0.2)),
        correlations=(Correlation("pid", "(Intercept)", "week", -0.3),),
        residual_sd=1.0, ranef=ranef, fitted=fitted,
        residuals=visits["score"].to_numpy(float) - fitted,
    )


def make_selection() -> Selection:
    table = pd.DataFrame({
        "model": ["ri", "ris", "broken"],
        "formula": ["score ~ week * arm + (1 | pid)", FORMULA, "score ~ week + (week | pid)"],
        "converged": [True, True, False],
        "singular": [False, False, False],
        "n_obs": [24, 24, 24],
        "n_subjects": [6, 6, 6],
        "n_params": [6, 8, 6],
        "loglik": [-45.0, -40.0, math.nan],
        "aic": [102.0, 96.0, math.nan],
        "bic": [109.07, 105.42, math.nan],
        "delta_aic": [6.0, 0.0, math.nan],
        "delta_bic": [3.65, 0.0, math.nan],
        "aic_weight": [0.047, 0.953, math.nan],
        "bic_weight": [0.139, 0.861, math.nan],
        "selected": [False, True, False],
    })
    return Selection(criterion="bic", table=table, selected="ris")


def make_config() -> StudyConfig:
    return parse_config({
        "study": "demo",
        "data": {"source": "data.csv", "subject": "pid", "time": "week", "outcome": "score"},
        "models": {"candidates": {"ri": "score ~ week * arm + (1 | pid)", "ris": FORMULA}},
    })


def texts(fig: Figure) -> tuple[list[str], list[str], list[str]]:
    """Titles, x labels and y labels anywhere in the figure (figure-level ones included)."""
    titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
    xlabels = [fig.get_supxlabel()] + [ax.get_xlabel() for ax in fig.axes]
    ylabels = [fig.get_supylabel()] + [ax.get_ylabel() for ax in fig.axes]
    return [t for t in titles if t], [t for t in xlabels if t], [t for t in ylabels if t]


def assert_readable(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    titles, xlabels, ylabels = texts(fig)
    assert titles, "figure has no title"
    assert xlabels, "figure has no x-axis label"
    assert ylabels, "figure has no y-axis label"


def drawn_texts(fig: Figure) -> list[Text]:
    """Every non-empty text the renderer draws: figure and axes titles, labels, legends, annotations and
    the tick labels inside the view limits (matplotlib keeps a few ticks beyond the limits, undrawn)."""
    found: list[Text] = list(fig.texts)
    for legend in fig.legends:
        found += legend.get_texts()
    for ax in fig.axes:
        found += ax.texts
        if not ax.axison:
            continue
        found += [ax.title, ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend() is not None:
            found += ax.get_legend().get_texts()
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = (high - low) * 1e-9
            found += [tick.label1 for tick in axis.get_major_ticks()
                      if low - slack <= tick.get_loc() <= high + slack and tick.label1.get_visible()]
    return [t for t in found if t.get_visible() and t.get_text().strip()]


def overlapping_texts(fig: Figure) -> list[tuple[str, str]]:
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


@pytest.fixture(scope="module")
def visits() -> pd.DataFrame:
    return make_visits()


@pytest.fixture(scope="module")
def fit(visits: pd.DataFrame) -> Fit:
    return make_fit(visits)


def test_trajectories_have_title_labels_and_one_mean_line_per_group(visits: pd.DataFrame) -> None:
    fig = plot_trajectories(visits, "pid", "week", "score", group="arm")
    assert_readable(fig)
    titles, xlabels, ylabels = texts(fig)
    assert xlabels == ["week"] and ylabels == ["score"]
    legend = fig.axes[0].get_legend()
    assert sorted(t.get_text() for t in legend.get_texts()) == ["arm = active (mean)", "arm = control (mean)"]


def test_trajectories_draw_at_most_max_subjects_lines() -> None:
    many = make_visits(n_subjects=50, n_visits=3)
    fig = plot_trajectories(many, "pid", "week", "score", max_subjects=7, seed=1)
    (collection,) = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert len(collection.get_segments()) == 7
    assert "7 of 50 subjects" in fig.axes[0].get_title()


def test_trajectories_sample_is_reproducible_with_the_seed() -> None:
    many = make_visits(n_subjects=40, n_visits=3)

    def segments(seed: int) -> list[np.ndarray]:
        fig = plot_trajectories(many, "pid", "week", "score", max_subjects=5, seed=seed)
        return [c for c in fig.axes[0].collections if isinstance(c, LineCollection)][0].get_segments()

    first, again, other = segments(0), segments(0), segments(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_choose_group_column_takes_a_text_fixed_effect_column_with_few_levels(visits: pd.DataFrame) -> None:
    assert choose_group_column(visits, FORMULA, exclude=("pid", "week", "score")) == "arm"
    # site has one level; pid only appears inside the bar; week is numeric
    assert choose_group_column(visits, "score ~ week + site + (1 | pid)", exclude=("pid",)) is None
    assert choose_group_column(visits, "score ~ week + (week | arm)") is None


def test_model_comparison_marks_failed_and_selected_candidates() -> None:
    fig = plot_model_comparison(make_selection())
    assert_readable(fig)
    assert "selection criterion" in " ".join(ax.get_title() for ax in fig.axes if "BIC" in ax.get_title())
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.texts]
        assert any("failed" in label for label in labels)
        assert any("selected" in label for label in labels)
    left = fig.axes[0]
    ticks = sorted(zip(left.get_yticks(), (t.get_text() for t in left.get_yticklabels()), strict=True))
    assert [label for _, label in reversed(ticks)] == ["ri", "ris", "broken"]


def test_coefficients_put_the_intercept_on_its_own_scale(fit: Fit) -> None:
    fig = plot_coefficients(fit)
    assert_readable(fig)
    intercept_ax, others_ax = fig.axes
    assert [t.get_text() for t in intercept_ax.get_yticklabels()] == ["(Intercept)"]
    ticks = sorted(zip(others_ax.get_yticks(), (t.get_text() for t in others_ax.get_yticklabels()), strict=True))
    assert [label for _, label in reversed(ticks)] == ["week", "armcontrol", "week:armcontrol"]  # table order, top down
    low, high = others_ax.get_xlim()
    assert low < 0 < high


def test_random_effects_show_one_histogram_per_term(fit: Fit) -> None:
    fig = plot_random_effects(fit)
    assert_readable(fig)
    assert [ax.get_title() for ax in fig.axes] == ["pid: (Intercept)", "pid: week"]


def many_levels_fit(n_levels: int) -> Fit:
    """A fit whose random intercepts are 0, 1, ..., n−1 (level "s<i>"), conditional SD 0.25."""
    visits = make_visits()
    ranef = pd.DataFrame({
        "group": "pid", "level": [f"s{i}" for i in range(n_levels)], "term": "(Intercept)",
        "estimate": np.arange(n_levels, dtype=float)[::-1].copy(), "cond_sd": 0.25,
    })
    return replace(make_fit(visits), ranef=ranef)


def interval_segments(ax: object) -> list[tuple[float, float, float]]:
    """(low, high, y) of every horizontal error bar drawn on ``ax``."""
    found = []
    for container in ax.containers:  # type: ignore[attr-defined]
        for collection in container.lines[2]:
            found += [(seg[0][0], seg[1][0], seg[0][1]) for seg in collection.get_segments()]
    return sorted(found, key=lambda s: s[2])


def test_caterpillar_shows_every_level_sorted_with_its_95_percent_conditional_interval(fit: Fit) -> None:
    fig = plot_caterpillar(fit)
    assert_readable(fig)
    intercepts = fig.axes[0]
    assert intercepts.get_title() == "pid: (Intercept)\n6 levels"
    expected = fit.ranef[fit.ranef["term"] == "(Intercept)"].sort_values("estimate")
    assert [t.get_text() for t in intercepts.get_yticklabels()] == list(expected["level"])
    segments = interval_segments(intercepts)
    assert [(low + high) / 2 for low, high, _ in segments] == pytest.approx(list(expected["estimate"]))
    assert [high - low for low, high, _ in segments] == pytest.approx([2 * 1.96 * 0.3] * 6)
    assert "1.96 cond. SD" in intercepts.get_xlabel()


def test_caterpillar_draws_intervals_that_exclude_zero_in_their_own_colour(fit: Fit) -> None:
    ax = plot_caterpillar(fit).axes[0]
    colour_of = {}
    for container in ax.containers:
        collection = container.lines[2][0]
        colour = tuple(np.round(collection.get_colors()[0], 3))
        colour_of.update({(seg[0][0], seg[1][0]): colour for seg in collection.get_segments()})
    excludes = {(low, high): low > 0 or high < 0 for low, high in colour_of}
    # intercepts −1, −0.82, −0.64, −0.45, −0.27, −0.09 with half-width 0.588: the three lowest exclude zero
    assert sum(excludes.values()) == 3
    assert len({colour_of[k] for k, out in excludes.items() if out}) == 1
    assert {colour_of[k] for k, out in excludes.items() if out}.isdisjoint(
        {colour_of[k] for k, out in excludes.items() if not out})


def test_caterpillar_with_many_levels_shows_the_lowest_and_highest_and_says_how_many_are_hidden() -> None:
    fig = plot_caterpillar(many_levels_fit(200))
    ax = fig.axes[0]
    assert ax.get_title() == "pid: (Intercept)\n30 lowest, 30 highest of 200 levels"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 61 and labels[30] == "… 140 more …"
    assert labels[:30] == [f"s{i}" for i in range(199, 169, -1)]  # estimates 0..29, lowest first
    assert labels[31:] == [f"s{i}" for i in range(29, -1, -1)]  # estimates 170..199
    assert len(interval_segments(ax)) == 60
    assert overlapping_texts(fig) == []


def test_caterpillar_rows_keep_every_level_up_to_the_limit_and_drop_missing_modes() -> None:
    part = many_levels_fit(CATERPILLAR_LEVELS).ranef  # estimates 0..59
    shown, hidden = caterpillar_rows(part)
    assert (len(shown), hidden) == (CATERPILLAR_LEVELS, 0)
    without_top = part.assign(estimate=part["estimate"].where(part["level"] != "s0"))  # s0 had 59
    shown, hidden = caterpillar_rows(without_top, max_levels=7)
    assert hidden == 59 - 7
    assert list(shown["estimate"]) == [0.0, 1.0, 2.0, 55.0, 56.0, 57.0, 58.0]


def test_caterpillar_without_predictions_gives_a_titled_note() -> None:
    empty = failed_fit("x", FORMULA, "REML", "test", "did not converge", n_obs=0, n_subjects=0, n_params=7)
    fig = plot_caterpillar(empty)
    assert "random effects" in fig.axes[0].get_title().lower()


def test_random_effects_without_predictions_give_a_titled_note(fit: Fit) -> None:
    empty = failed_fit("x", FORMULA, "REML", "test", "did not converge", n_obs=0, n_subjects=0, n_params=7)
    fig = plot_random_effects(empty)
    assert "random effects" in fig.axes[0].get_title().lower()


@pytest.mark.parametrize("builder", [plot_residuals_vs_fitted, plot_qq])
def test_residual_plots_are_readable(builder: object, fit: Fit) -> None:
    assert_readable(builder(fit))  # type: ignore[operator]


def test_residuals_over_time_label_the_time_axis(fit: Fit, visits: pd.DataFrame) -> None:
    fig = plot_residuals_over_time(fit, visits["week"], time_label="week")
    assert_readable(fig)
    assert fig.axes[0].get_xlabel() == "week"


def test_residuals_over_time_refuse_misaligned_times(fit: Fit) -> None:
    with pytest.raises(ValueError, match=r"3 time values given for fit 'ris' with 24 residuals"):
        plot_residuals_over_time(fit, np.arange(3.0))


def test_qq_draws_a_bounded_number_of_points() -> None:
    big = make_visits(n_subjects=2500, n_visits=4)
    fig = plot_qq(make_fit(big))
    (points,) = fig.axes[0].collections
    assert len(points.get_offsets()) <= 4000


def test_observed_vs_fitted_draws_one_panel_per_sampled_subject(fit: Fit, visits: pd.DataFrame) -> None:
    fig = plot_observed_vs_fitted(visits, fit, "pid", "week", "score", n_subjects=4)
    assert_readable(fig)
    shown = [ax.get_title() for ax in fig.axes if ax.axison]
    assert len(shown) == 4 and set(shown) <= set(visits["pid"])
    assert [ax.get_xlabel() for ax in fig.axes] == ["week"] * 4  # one row: every panel is a bottom panel
    assert fig.get_supylabel() == "score"


def test_observed_vs_fitted_refuses_misaligned_fits(fit: Fit, visits: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"fit 'ris' has 24 fitted values but the visits have 8 rows"):
        plot_observed_vs_fitted(visits.head(8), fit, "pid", "week", "score")


def test_build_figures_returns_every_key_in_report_order(fit: Fit, visits: pd.DataFrame) -> None:
    figures = build_figures(visits, make_config(), make_selection(), fit)
    assert tuple(figures) == FIGURE_KEYS
    for figure in figures.values():
        assert_readable(figure)


def test_no_text_overlaps_in_any_figure(fit: Fit, visits: pd.DataFrame) -> None:
    long_name = "random_intercept_and_slope_with_a_quadratic_time_trend_uncorrelated"
    figures = build_figures(visits, make_config(), make_selection(), replace(fit, name=long_name))
    for key, figure in figures.items():
        assert overlapping_texts(figure) == [], key


def test_overlap_check_detects_overlapping_text() -> None:
    fig = Figure()
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "first label")
    ax.text(0.5, 0.5, "second label")
    assert ("first label", "second label") in overlapping_texts(fig)


def test_observed_vs_fitted_labels_time_under_the_lowest_panel_of_each_column() -> None:
    visits = make_visits(n_subjects=7)
    fig = plot_observed_vs_fitted(visits, make_fit(visits), "pid", "week", "score", n_subjects=7)
    # 2 rows of 4: panels 0-2 have a panel below them, 3 has none (slot 7 is empty), 4-6 are at the bottom
    assert [ax.get_xlabel() for ax in fig.axes[:7]] == ["", "", "", "week", "week", "week", "week"]
    assert not fig.axes[7].axison


def test_figure_to_png_renders_names_with_dollar_signs_literally() -> None:
    visits = make_visits(n_subjects=3).assign(pid=lambda d: d["pid"] + r"$\frac$")
    fig = plot_observed_vs_fitted(visits, make_fit(visits), "pid", "week", "score")
    png = figure_to_png(fig)  # an unescaped "$\frac$" would fail to parse as mathtext here
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_render_pngs_gives_the_same_bytes_in_one_process_or_two(fit: Fit, visits: pd.DataFrame) -> None:
    builders = figure_builders(visits, make_config(), make_selection(), fit)
    serial = render_pngs(builders, processes=1)
    assert list(serial) == list(FIGURE_KEYS)
    assert serial["qq"] == figure_to_png(builders["qq"]())
    assert render_pngs(builders, processes=2) == serial
    assert list(render_pngs(builders, processes=2)) == list(FIGURE_KEYS)


def test_render_pngs_raises_a_figure_error_in_the_caller(fit: Fit, visits: pd.DataFrame) -> None:
    def broken() -> Figure:
        raise ValueError("no such column 'dose'")

    builders = figure_builders(visits, make_config(), make_selection(), fit) | {"broken": broken}
    with pytest.raises(ValueError, match="no such column 'dose'"):
        render_pngs(builders, processes=2)


def test_render_pngs_draws_what_a_dead_helper_did_not_deliver(fit: Fit, visits: pd.DataFrame) -> None:
    caller = os.getpid()
    builders = figure_builders(visits, make_config(), make_selection(), fit)

    def dying_in_the_helper(build: Callable[[], Figure]) -> Callable[[], Figure]:
        def guarded() -> Figure:
            if os.getpid() != caller:
                os._exit(9)  # the helper dies at its first figure, as if killed, having sent nothing
            return build()
        return guarded

    pngs = render_pngs({stem: dying_in_the_helper(build) for stem, build in builders.items()}, processes=2)
    assert pngs == render_pngs(builders, processes=1)


def test_render_pngs_never_waits_on_a_stalled_helper(fit: Fit, visits: pd.DataFrame) -> None:
    # A helper stuck (say on a lock another thread held when it was forked) is killed after the grace period
    # and its figures are drawn here: the run goes on.
    import time

    from longitudinal.reporting.figures import _render_with_helper

    caller = os.getpid()
    builders = figure_builders(visits, make_config(), make_selection(), fit)

    def stalling_in_the_helper(build: Callable[[], Figure]) -> Callable[[], Figure]:
        def guarded() -> Figure:
            if os.getpid() != caller:
                time.sleep(600)
            return build()
        return guarded

    stalling = {stem: stalling_in_the_helper(build) for stem, build in builders.items()}
    began = time.perf_counter()
    drawn_here = _render_with_helper(stalling, list(stalling), grace=1.0)
    assert time.perf_counter() - began < 60
    assert 0 < len(drawn_here) < len(builders)  # the helper took one figure and delivered nothing
    missing = [stem for stem in builders if stem not in drawn_here]
    assert len(missing) == 1
    assert drawn_here | {missing[0]: figure_to_png(builders[missing[0]]())} == render_pngs(builders, processes=1)


def test_build_figures_follows_a_subject_made_of_several_columns(fit: Fit, visits: pd.DataFrame) -> None:
    # data.subject: [site, pid]: validation adds the combined column "site:pid" ("A:p0") to the visits.
    config = parse_config({
        "study": "demo",
        "data": {"source": "data.csv", "subject": ["site", "pid"], "time": "week", "outcome": "score"},
        "models": {"candidates": {"ris": FORMULA}},
    })
    keyed = visits.assign(**{"site:pid": visits["site"] + ":" + visits["pid"]})
    figures = build_figures(keyed, config, make_selection(), fit, n_panels=4)
    titles = [ax.get_title() for ax in figures["observed_vs_fitted"].axes]
    assert len(titles) == 4 and all(title.startswith("A:p") for title in titles)


def test_caterpillar_rows_pick_the_extremes_with_ties_resolved_by_level() -> None:
    part = pd.DataFrame({
        "level": ["e", "d", "c", "b", "a", "f", "g"],
        "estimate": [0.0, 0.0, 0.0, 5.0, 9.0, 9.0, np.nan],
        "cond_sd": 1.0,
    })
    shown, hidden = caterpillar_rows(part, max_levels=4)
    assert hidden == 2
    # the full order is (0, c) (0, d) (0, e) (5, b) (9, a) (9, f): ties at both cuts go by level
    assert list(shown["level"]) == ["c", "d", "a", "f"]


def test_a_time_read_from_dates_carries_its_unit_and_origin_on_every_time_axis(fit: Fit, visits: pd.DataFrame) -> None:
    from longitudinal.reporting.figures import time_axis_label, with_time_unit

    config = parse_config({
        "study": "demo",
        "data": {"source": "data.csv", "subject": "pid", "time": "week", "outcome": "score", "time_unit": "weeks"},
        "models": {"candidates": {"ris": FORMULA}},
    })
    label = "week (weeks since each subject's first visit)"
    assert time_axis_label(config.data) == label
    assert time_axis_label(make_config().data) == "week"  # numeric time: as given, no unit invented
    assert with_time_unit("week:armtreatment", config.data) == "week:armtreatment (per week)"
    assert with_time_unit("armtreatment", config.data) == "armtreatment"
    figures = build_figures(visits, config, make_selection(), fit, n_panels=4)
    for key in ("trajectories", "residuals_over_time", "observed_vs_fitted"):
        assert label in [ax.get_xlabel() for ax in figures[key].axes], key
    ticks = [t.get_text() for ax in figures["coefficients"].axes for t in ax.get_yticklabels()]
    assert "week (per week)" in ticks
    study = parse_config({
        "study": "demo",
        "data": {"source": "data.csv", "subject": "pid", "time": "week", "outcome": "score", "time_unit": "years",
                 "time_origin": "2020-01-01"},
        "models": {"candidates": {"ris": FORMULA}},
    })
    assert time_axis_label(study.data) == "week (years since 2020-01-01)"


# ------------------------------------------------------------------- residual covariance structures (MMRM)


def test_the_residual_correlation_kind_follows_the_structure_and_the_number_of_times() -> None:
    from test_html import ar1_covariance

    from longitudinal.reporting.figures import residual_correlation_kind

    many = np.linspace(0, 10, 40)
    assert residual_correlation_kind(many, ar1_covariance()) == "lag"  # a visit structure: visits
    assert residual_correlation_kind(many, None) == "variogram"
    assert residual_correlation_kind(many, ar1_covariance(structure="sp_exp", spatial=True)) == "variogram"
    assert residual_correlation_kind(np.arange(8.0), None) == "lag"


def test_the_diagnostic_compares_the_selected_fit_with_the_best_fit_without_serial_correlation() -> None:
    from test_html import make_mmrm_inputs

    from longitudinal.reporting.figures import serial_diagnostic_fits

    inputs = make_mmrm_inputs()
    compared = serial_diagnostic_fits(inputs.selected, inputs.fits, "bic")
    assert [(role, fit.name, fit.method) for role, fit in compared] == [
        ("selected", "ar1", "REML"), ("best without serial correlation", "ri", "ML")]
    # compound symmetry is not serial: a cs candidate competes with ri, and the better one by the criterion is shown
    cs = replace(inputs.fits[1], name="cs", loglik=-320.0, covariance=replace(inputs.fits[1].covariance,
                                                                              structure="cs"))
    compared = serial_diagnostic_fits(inputs.selected, (*inputs.fits, cs), "aic")
    assert [fit.name for _, fit in compared] == ["ar1", "cs"]
    # the selected model without serial correlation is its own comparison
    ri = replace(inputs.fits[0], method="REML")
    assert [fit.name for _, fit in serial_diagnostic_fits(ri, inputs.fits, "bic")] == ["ri"]


def test_the_residual_covariance_heatmap_writes_each_correlation_on_a_fixed_scale() -> None:
    from test_html import make_mmrm_inputs

    from longitudinal.reporting.figures import plot_residual_covariance

    fig = plot_residual_covariance(make_mmrm_inputs().selected)
    assert_readable(fig)
    heat = fig.axes[0]
    assert heat.images[0].get_clim() == (-1.0, 1.0)
    assert [t.get_text() for t in heat.texts] == [f"{0.6 ** abs(i - j):.2f}" for i in range(4) for j in range(4)]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["0", "1", "2", "3"]
    assert heat.get_xlabel() == "Visit (week)"
    assert "AR(1) (ar1(week | pid))" in fig.get_suptitle()
    assert overlapping_texts(fig) == []


def test_a_heterogeneous_structure_adds_the_sd_per_visit_and_many_visits_drop_the_numbers() -> None:
    from test_html import ar1_covariance, ar1h_covariance, make_mmrm_inputs

    from longitudinal.reporting.figures import plot_residual_covariance

    fit = make_mmrm_inputs().selected
    fig = plot_residual_covariance(replace(fit, covariance=ar1h_covariance()))
    sd_panel = next(ax for ax in fig.axes if ax.get_title() == "Residual SD per visit")
    np.testing.assert_allclose(sd_panel.lines[0].get_ydata(), [1.0, 2.0, 3.0, 4.0])
    assert sd_panel.get_ylabel() == "Residual SD (score units)"
    assert overlapping_texts(fig) == []
    many = plot_residual_covariance(replace(fit, covariance=ar1_covariance(visits=20)))
    assert len(many.axes[0].texts) == 0 and overlapping_texts(many) == []


def test_an_exponential_structure_is_drawn_against_the_time_between_visits() -> None:
    from test_html import make_mmrm_inputs

    from longitudinal.reporting.figures import plot_residual_covariance, structure_range

    times = np.array([0.0, 0.5, 2.0, 7.0])
    matrix = 4.0 * np.exp(-np.abs(np.subtract.outer(times, times)) / 2.5)
    covariance = ResidualCovariance(
        structure="sp_exp", term="sp_exp(week | pid)", description="spatial exponential", visit="week",
        labels=tuple(f"{t:g}" for t in times), matrix=matrix, n_params=2,
        parameters=(("sigma", 2.0), ("range", 2.5)), heterogeneous=False, spatial=True)
    assert structure_range(covariance) == 2.5
    assert structure_range(replace(covariance, parameters=(("sigma", 2.0),))) == pytest.approx(2.5)
    fig = plot_residual_covariance(replace(make_mmrm_inputs().selected, covariance=covariance), time_label="week")
    assert_readable(fig)
    ax = fig.axes[0]
    curve = ax.lines[0]
    np.testing.assert_allclose(curve.get_ydata(), np.exp(-curve.get_xdata() / 2.5))
    assert ax.get_xlabel() == "Time between two visits of a subject, d (week)"
    assert len(ax.collections[0].get_offsets()) == 6  # the six pairs of the four times
    assert overlapping_texts(fig) == []


def test_the_residual_correlation_figure_draws_one_line_per_compared_fit_with_its_band() -> None:
    from test_html import make_mmrm_inputs

    from longitudinal.reporting.figures import plot_residual_correlation, serial_diagnostic_fits

    inputs = make_mmrm_inputs()
    compared = serial_diagnostic_fits(inputs.selected, inputs.fits, "bic")
    fig = plot_residual_correlation(compared, inputs.validated.visits, "pid", "week")
    assert_readable(fig)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ar1 (selected, REML)", "ri (best without serial correlation, ML)",
                      "±2/√pairs: zero correlation"]
    selected_line, plain_line = ax.lines[1:]  # after the zero line
    assert plain_line.get_ydata()[0] > 0.4  # ri leaves the AR(1) correlation (ρ = 0.6) in its residuals
    assert abs(selected_line.get_ydata()[0]) < 0.25  # the whitened residuals of ar1 have none
    assert overlapping_texts(fig) == []
    variogram = plot_residual_correlation(compared, inputs.validated.visits, "pid", "week", kind="variogram")
    assert variogram.axes[0].get_ylabel() == "Semivariance γ of normalized residuals"
    assert overlapping_texts(variogram) == []


def test_build_figures_adds_the_structure_figures_in_report_order() -> None:
    from test_html import make_mmrm_inputs

    inputs = make_mmrm_inputs()
    figures = build_figures(inputs.validated.visits, inputs.config, inputs.selection, inputs.selected,
                            fits=inputs.fits)
    assert tuple(figures) == (*FIGURE_KEYS[:3], "residual_covariance", *FIGURE_KEYS[3:8], "residual_correlation",
                              FIGURE_KEYS[8])
    for key, figure in figures.items():
        if key not in ("random_effects", "caterpillar"):  # notes: the model has no random effects
            assert_readable(figure)
        assert overlapping_texts(figure) == [], key
    qq = figures["qq"].axes[0]
    assert qq.get_ylabel() == "Normalized residual (whitened by the fitted covariance)"
