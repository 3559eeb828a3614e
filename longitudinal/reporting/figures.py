"""Figures for the report: each builder returns a :class:`matplotlib.figure.Figure` and never saves it.

Builders use ``Figure()`` directly (no pyplot), so they hold no global backend state and need no
``close``; :func:`figure_to_png` renders one with Agg. Every figure has a title and labelled axes,
and uses constrained layout so that labels do not overlap. Large studies stay fast: trajectories
and subject panels draw a seeded sample of subjects (their means use every row), dense scatters
become hexagonal bins over every row, the QQ plot draws at most a few thousand quantiles, and
rows are selected through integer codes rather than string comparisons. Drawing, matplotlib's
per-text work, is most of the remaining cost: :func:`render_pngs` shares it between this process and one
forked helper where two CPUs are available.

User-provided text (column, candidate and subject names) goes through :func:`_plain`, so a ``$`` in
a name is shown as written instead of starting matplotlib's math mode.
"""

from __future__ import annotations

import gc
import io
import math
import os
import pickle
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator
from scipy.special import ndtri

from longitudinal.config import LINKS, DataConfig, StudyConfig
from longitudinal.inference.residuals import (
    MAX_DISTINCT_X, MAX_PAIRS, binned_means, binned_residuals, lag_correlation, normalized_residuals,
    RatioEffect, observed_response, outcome_over_time, randomized_quantile_residuals, ratio_effects,
    semivariogram, visit_positions,
)
from longitudinal.inference.visits import ALL_SUBJECTS, summarize_visits
from longitudinal.records import Fit, FixedEffect, MarginalEstimates, ResidualCovariance, Selection

FIGURE_KEYS: tuple[str, ...] = (
    "trajectories",
    "model_comparison",
    "coefficients",
    "random_effects",
    "caterpillar",
    "residuals_vs_fitted",
    "qq",
    "residuals_over_time",
    "observed_vs_fitted",
)
"""File stems of the report's figures, in the order the report shows them."""

PALETTE: tuple[str, ...] = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
"""Colour-blind-tolerable, print-distinguishable colours for up to six groups."""

_HIGHLIGHT = "#1f5fa8"
_MUTED = "#9aa5b1"
_SMOOTH = "#d62728"
_DENSE_ROWS = 5_000  # above this many points a scatter becomes hexagonal bins

QQ_POINTS = 4_000
"""Most order statistics the QQ plot draws: evenly spaced, both extremes included."""

CATERPILLAR_LEVELS = 60
"""Most levels a caterpillar panel shows one by one; above that, the lowest and highest halves."""

STRUCTURE_FIGURE_KEYS: tuple[str, ...] = ("residual_covariance", "residual_correlation")
"""Stems of the figures a study with covariance-structure candidates adds: the selected model's residual
covariance (shown after ``coefficients``) and the residual correlation diagnostic (after
``residuals_over_time``)."""

ANNOTATED_VISITS = 12
"""Most visits whose correlations the heatmap writes in its cells (and the report shows as tables)."""

DISCRETE_TIMES = 30
"""Up to this many distinct times, residual correlation is shown by lag in visits; above, by a semivariogram."""

CorrelationKind = Literal["lag", "variogram"]
"""How the residual correlation diagnostic shows serial correlation: by lag in visits, or by a semivariogram."""

GLMM_FIGURE_KEYS: tuple[str, ...] = (
    "trajectories",
    "model_comparison",
    "coefficients",
    "random_effects",
    "caterpillar",
    "binned_residuals",
    "quantile_residuals",
    "observed_vs_fitted_over_time",
    "observed_vs_fitted",
)
"""File stems of the figures of a binomial or Poisson study, in report order: the Gaussian residual plots
(residuals against fitted values, normal QQ, residuals over time) give way to binned residuals and randomized
quantile residuals, and the observed proportions or mean counts over time sit beside the fitted ones."""


def family_description(family: str, plural: bool = False) -> str:
    """The model in words, as a glmer user names it: "logistic mixed model (binomial, logit link)" ("logistic
    mixed models (...)" with ``plural``)."""
    model = "mixed models" if plural else "mixed model"
    return {"binomial": f"logistic {model} (binomial, logit link)",
            "poisson": f"Poisson {model} (log link)"}.get(family, f"linear {model}")


def approximation_description(nagq: int) -> str:
    """How glmer's likelihood was evaluated: "Laplace approximation" (nAGQ = 1) or "adaptive Gauss–Hermite
    quadrature with 10 points"."""
    return "Laplace approximation" if nagq <= 1 else f"adaptive Gauss–Hermite quadrature with {nagq} points"


def ratio_name(family: str) -> str:
    """What exp(coefficient) is: "odds ratio" (logit link) or "rate ratio" (log link)."""
    return "odds ratio" if family == "binomial" else "rate ratio"


def baseline_name(family: str) -> str:
    """What exp(intercept) is: "baseline odds" or "baseline rate"."""
    return "baseline odds" if family == "binomial" else "baseline rate"


def outcome_scale_label(family: str, outcome: str) -> str:
    """What the response-scale axis of a binomial or Poisson study shows: "proportion with smoker = 1" or
    "mean seizures"; for a Gaussian study the outcome alone."""
    if family == "binomial":
        return f"proportion with {outcome} = 1"
    return f"mean {outcome}" if family == "poisson" else outcome




@contextmanager
def _style() -> Iterator[None]:
    """The report's look, applied while artists are created and restored afterwards."""
    with matplotlib.rc_context({
        "font.size": 9.0,
        "axes.titlesize": 10.0,
        "axes.labelsize": 9.0,
        "figure.titlesize": 11.0,
        "legend.fontsize": 8.0,
        "xtick.labelsize": 8.0,
        "ytick.labelsize": 8.0,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e3e6ea",
        "grid.linewidth": 0.6,
        "axes.axisbelow": True,
        "figure.facecolor": "white",
        "savefig.facecolor": "white",
    }):
        yield


def _plain(text: object) -> str:
    """``text`` as literal figure text: escape ``$`` so matplotlib does not read it as math."""
    return str(text).replace("$", r"\$")


def time_axis_label(data: DataConfig) -> str:
    """The time column as an axis or table shows it: with its unit and origin when it was read from dates
    (``visit_date (weeks since each subject's first visit)``), else the column name alone."""
    if data.time_unit is None:
        return data.time
    origin = data.time_origin or "subject"
    since = {"subject": "each subject's first visit", "study": "the study's first date"}.get(origin, origin)
    return f"{data.time} ({data.time_unit} since {since})"


def with_time_unit(term: str, data: DataConfig) -> str:
    """A fixed-effect term shown with the time unit it is per: ``visit_date`` → ``visit_date (per week)``,
    ``visit_date:armB`` likewise; other terms unchanged (also when time is analysed as given)."""
    if data.time_unit is None or data.time not in term.split(":"):
        return term
    return f"{term} (per {data.time_unit.removesuffix('s')})"


def _shorten(text: object, limit: int = 28) -> str:
    value = str(text)
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


_PNG_OPTIONS: dict[str, int] = {"compress_level": 1}
"""zlib level 1 instead of Pillow's 6: encoding takes 40% less time for files about 6% larger."""


def figure_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render ``fig`` as PNG bytes with the Agg renderer; the figure is left as it was.

    One draw, layout included: ``savefig`` would draw twice (a dry run for the layout, then the
    rendering), and drawing is most of a report's cost. The pixels are the same.
    """
    canvas, original_dpi = fig.canvas, fig.dpi
    buffer = io.BytesIO()
    try:
        fig.dpi = dpi
        FigureCanvasAgg(fig).print_png(buffer, pil_kwargs=dict(_PNG_OPTIONS))
    finally:
        fig.dpi = original_dpi
        fig.set_canvas(canvas)
    return buffer.getvalue()


def render_pngs(builders: Mapping[str, Callable[[], Figure]], processes: int | None = None) -> dict[str, bytes]:
    """Build every figure of ``builders`` and render it as PNG (:func:`figure_to_png`), keyed in their order.

    With ``processes`` > 1 (default: 2 on Linux, where ``fork`` is safe to use, when this process may run on two
    CPUs) one forked helper takes figures from a shared queue while this process takes the others: a report's
    figures are independent, and drawing them is pure Python, so a thread would not help. The helper inherits the
    builders and the data (nothing is pickled but the PNG bytes it sends back) and always ends with this call.
    Rendering is deterministic, so the bytes do not depend on which process drew a figure; a figure the helper
    did not deliver (it failed, or was killed) is drawn here, where its error, if any, is raised.
    """
    stems = list(builders)
    workers = _default_processes() if processes is None else processes
    if workers < 2 or not 2 <= len(stems) <= 255:  # the helper's queue holds one byte per figure
        return {stem: figure_to_png(builders[stem]()) for stem in stems}
    done = _render_with_helper(builders, stems)
    return {stem: done[stem] if stem in done else figure_to_png(builders[stem]()) for stem in stems}


HELPER_MAX_ROWS = 500_000
"""Above this many rows analysed the report draws its figures in one process: the forked helper's pages (what it
touches of the heap it inherits, and its own figures' arrays) are then hundreds of MB for a second at most
(2.26 million rows at irregular times: the run's processes' peak proportional set 1.37-1.44 GB with the helper,
1.13 GB without; the figures 5.2 s and 4.3-4.8 s)."""


def _default_processes() -> int:
    if sys.platform != "linux" or not hasattr(os, "fork"):
        return 1  # macOS and Windows: fork after threads (Prefect's) is unsafe or missing
    return min(2, len(os.sched_getaffinity(0)))


_DRAWN_FIRST = ("caterpillar", "observed_vs_fitted", "residual_correlation")
"""The figures with the most axes and tick labels, the slowest to draw: started first, so that the two
processes of :func:`render_pngs` finish at about the same time."""


HELPER_GRACE_SECONDS = 30.0
"""How long, at least, this process waits for the forked helper after drawing its own share of the figures (or
four times what its share took, if longer). A helper that has not delivered by then — stalled on a lock that
another thread held when it was forked, say — is killed and its figures are drawn here: a run is never stuck
on it."""


def _render_with_helper(builders: Mapping[str, Callable[[], Figure]], stems: Sequence[str], *,
                        grace: float = HELPER_GRACE_SECONDS) -> dict[str, bytes]:
    """Render ``stems`` in this process and one forked helper, each taking the next figure from a pipe of
    indices (one byte each: a read of one byte from a pipe is atomic); the helper's PNGs come back pickled,
    within ``grace`` seconds of this process finishing its share (see :data:`HELPER_GRACE_SECONDS`)."""
    queue_read, queue_write = os.pipe()
    result_read, result_write = os.pipe()
    order = sorted(range(len(stems)), key=lambda i: stems[i] not in _DRAWN_FIRST)
    os.write(queue_write, bytes(order))  # far below a pipe's buffer
    os.close(queue_write)
    gc.freeze()  # the helper's garbage collections then leave the inherited objects, and their pages, alone
    try:
        pid = os.fork()
    except OSError:  # no process to spare (a limit, memory): everything is drawn here
        gc.unfreeze()
        for descriptor in (queue_read, result_read, result_write):
            os.close(descriptor)
        return {}
    if pid == 0:  # the helper: never returns into the caller's code
        status = 1
        try:
            os.close(result_read)
            mine = _take_figures(builders, stems, queue_read, keep_going=True)
            with os.fdopen(result_write, "wb") as out:
                pickle.dump(mine, out, protocol=pickle.HIGHEST_PROTOCOL)
            status = 0
        finally:
            os._exit(status)
    gc.unfreeze()
    os.close(result_write)
    began = time.perf_counter()
    try:
        done = _take_figures(builders, stems, queue_read, keep_going=False)
        received = _read_all(result_read, max(grace, 4.0 * (time.perf_counter() - began)))
        if received is not None:
            os.waitpid(pid, 0)
            pid = 0
    finally:
        os.close(result_read)
        os.close(queue_read)
        if pid:  # an error or an interruption here: stop the helper and reap it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    try:
        helped: dict[str, bytes] = pickle.loads(received) if received is not None else {}
    except Exception:  # the helper died before sending everything: what it drew is drawn again here
        helped = {}
    return done | helped


def _read_all(descriptor: int, seconds: float) -> bytes | None:
    """Everything written to the pipe ``descriptor`` until its writer closes it; None if that takes longer than
    ``seconds``."""
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([descriptor], [], [], left)[0]:
            return None
        chunk = os.read(descriptor, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _take_figures(builders: Mapping[str, Callable[[], Figure]], stems: Sequence[str], queue: int, *,
                  keep_going: bool) -> dict[str, bytes]:
    """Render figures whose indices this process reads from ``queue`` until it is empty. The helper
    (``keep_going``) skips a figure that raises, which the caller then draws and raises itself."""
    done: dict[str, bytes] = {}
    while (index := os.read(queue, 1)):
        stem = stems[index[0]]
        try:
            done[stem] = figure_to_png(builders[stem]())
        except Exception:
            if not keep_going:
                raise
    return done


def _message_figure(title: str, message: str) -> Figure:
    """A titled placeholder that says why a figure has nothing to draw (e.g. a failed refit)."""
    with _style():
        fig = _new_figure(7.0, 2.2)
        ax = fig.add_subplot()
        ax.set_title(_plain(title))
        ax.text(0.5, 0.5, _plain(message), ha="center", va="center", wrap=True, color="#555555")
        ax.set_axis_off()
    return fig


def _outcome_of(formula: str) -> str:
    """The response named left of ``~`` in an lme4 formula (used to put units on axes)."""
    left = formula.split("~", 1)[0].strip()
    return left or "outcome"


# ------------------------------------------------------------------------------------ trajectories


def _is_text(series: pd.Series) -> bool:
    return bool(pd.api.types.is_string_dtype(series) or isinstance(series.dtype, pd.CategoricalDtype))


def choose_group_column(visits: pd.DataFrame, formula: str, exclude: Sequence[str] = ()) -> str | None:
    """The first text column among ``formula``'s fixed-effect columns with 2 to 6 levels, else None.

    Bars ``( ... | ... )`` are removed before looking, so the subject factor is never chosen; used to
    colour trajectories by a treatment arm or similar.
    """
    right = formula.split("~", 1)[1] if "~" in formula else formula
    while True:
        stripped = re.sub(r"\([^()]*\|[^()]*\)", " ", right)
        if stripped == right:
            break
        right = stripped
    seen: list[str] = []
    for token in re.findall(r"[A-Za-z_.][A-Za-z0-9_.]*", right):
        if token in seen or token in exclude or token not in visits.columns:
            continue
        seen.append(token)
        column = visits[token]
        if _is_text(column) and 2 <= column.nunique(dropna=True) <= 6:
            return str(token)
    return None


def _code_subjects(ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each row's subject as an integer code (−1 where missing) and the distinct subjects as text.

    One hash pass over the column, so that selecting a few subjects out of millions of rows compares
    integers instead of strings.
    """
    codes, uniques = pd.factorize(ids, use_na_sentinel=True)
    return codes, np.asarray(pd.Index(uniques).astype(str), dtype=object)


def _sample_codes(names: np.ndarray, present: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Codes of a seeded sample of at most ``n`` of the ``present`` subjects, in sorted order of their names.

    The sample is drawn from the names sorted as text, so it depends on the subjects, not on row order.
    """
    candidates = np.flatnonzero(present)
    candidates = candidates[np.argsort(names[candidates].astype(str), kind="stable")]
    if len(candidates) > n:
        picked = np.random.default_rng(seed).choice(len(candidates), size=n, replace=False)
        candidates = candidates[np.sort(picked)]
    return candidates


def _rows_of(codes: np.ndarray, chosen: np.ndarray, n_codes: int) -> np.ndarray:
    """A row mask: True where the row's code is one of ``chosen`` (missing codes never are)."""
    lookup = np.zeros(n_codes + 1, dtype=bool)  # the extra last slot is the −1 of missing codes
    lookup[chosen] = True
    return lookup[codes]


def plot_trajectories(
    visits: pd.DataFrame, subject: str, time: str, outcome: str, group: str | None = None,
    max_subjects: int = 200, seed: int = 0, time_label: str | None = None,
) -> Figure:
    """Spaghetti plot of observed trajectories with the mean trend per time point.

    Thin translucent lines: a seeded sample of at most ``max_subjects`` subjects. Bold lines: the mean
    outcome over *all* subjects per time point (per quantile bin of time when times are many), per level
    of ``group`` when given, with a ±1.96 SE band. Rows with a missing time or outcome are not drawn.
    """
    t = visits[time].to_numpy(float)
    y = visits[outcome].to_numpy(float)
    codes, names = _code_subjects(visits[subject])
    finite = np.isfinite(t) & np.isfinite(y)
    present = np.bincount(codes[finite & (codes >= 0)], minlength=len(names)) > 0
    n_subjects = int(present.sum())
    sample = _sample_codes(names, present, max_subjects, seed)
    rank = np.full(len(names) + 1, -1)
    rank[sample] = np.arange(len(sample))
    shown = np.flatnonzero(finite & (rank[codes] >= 0))
    shown = shown[np.lexsort((t[shown], rank[codes[shown]]))]  # by sampled subject (sorted by name), then time
    levels: list[object] = [None]
    group_codes = np.zeros(len(visits), dtype=np.intp)
    if group is not None:
        group_codes, group_levels = pd.factorize(visits[group], use_na_sentinel=True)
        seen = np.bincount(group_codes[finite & (group_codes >= 0)], minlength=len(group_levels)) > 0
        order = sorted(np.flatnonzero(seen).tolist(), key=lambda i: str(group_levels[i]))
        levels = [group_levels[i] for i in order]
        level_codes = order
    else:
        level_codes = [0]

    with _style():
        fig = _new_figure(8.0, 4.6)
        ax = fig.add_subplot()
        for index, (level, code) in enumerate(zip(levels, level_codes, strict=True)):
            colour = PALETTE[index % len(PALETTE)] if group is not None else "#7f8c99"
            part = shown[group_codes[shown] == code]
            starts = np.flatnonzero(np.diff(codes[part], prepend=-2) != 0)
            segments = [np.column_stack([t[rows], y[rows]]) for rows in np.split(part, starts[1:])] if part.size else []
            ax.add_collection(LineCollection(segments, colors=colour, linewidths=0.6,
                                             alpha=0.18 if group is not None else 0.3))
            everyone = finite & (group_codes == code)
            trend = binned_means(t[everyone], y[everyone])
            mean_colour = colour if group is not None else "#111111"
            label = "mean, all subjects" if level is None else f"{_plain(group)} = {_plain(level)} (mean)"
            ax.fill_between(trend["x"], trend["mean"] - 1.96 * trend["se"].fillna(0),
                            trend["mean"] + 1.96 * trend["se"].fillna(0), color=mean_colour, alpha=0.15,
                            linewidth=0)
            ax.plot(trend["x"], trend["mean"], color=mean_colour, linewidth=2.4, marker="o", markersize=3.5,
                    label=label)
        ax.autoscale_view()
        shown_text = f"{len(sample):,} of {n_subjects:,} subjects" if len(sample) < n_subjects \
            else f"all {n_subjects:,} subjects"
        ax.set_title(f"Observed trajectories of {_plain(outcome)} ({shown_text} drawn; means over all)")
        ax.set_xlabel(_plain(time_label or time))
        ax.set_ylabel(_plain(outcome))
        ax.legend(loc="best", frameon=False, title="band: ±1.96 SE" if len(levels) else None)
    return fig


# -------------------------------------------------------------------------------- model comparison


def plot_model_comparison(selection: Selection) -> Figure:
    """ΔAIC and ΔBIC from the best converged candidate, one bar per candidate.

    The selected candidate is highlighted; candidates that did not converge (no Δ) are marked
    "failed" in place of a bar. Δ values come from the comparison table (``delta_aic``,
    ``delta_bic``); when absent they are computed from ``aic``/``bic`` over converged rows.
    """
    table = selection.table.reset_index(drop=True)
    names = [str(n) for n in table["model"]]
    selected = [str(n) == selection.selected for n in table["model"]]
    converged = table["converged"].astype(bool).to_numpy() if "converged" in table else np.ones(len(table), bool)
    height = 1.4 + 0.42 * max(len(names), 1)
    with _style():
        fig = _new_figure(8.5, height)
        axes = fig.subplots(1, 2, sharey=True)
        positions = np.arange(len(names))[::-1]
        for ax, criterion in zip(axes, ("aic", "bic"), strict=True):
            delta = _deltas(table, criterion, converged)
            finite = np.isfinite(delta)
            top = float(np.nanmax(delta)) if finite.any() else 0.0
            span = top if top > 0 else 1.0
            colours = [_HIGHLIGHT if s else _MUTED for s in selected]
            ax.barh(positions[finite], delta[finite], color=np.array(colours)[finite], height=0.6)
            for pos, value, ok, chosen in zip(positions, delta, finite, selected, strict=True):
                if ok:
                    text = f"{value:,.2f}" + ("  selected" if chosen else "")
                    ax.text(value + span * 0.02, pos, text, va="center", fontsize=8,
                            fontweight="bold" if chosen else "normal")
                else:
                    ax.text(span * 0.02, pos, "failed (not compared)", va="center", fontsize=8,
                            color="#b03a2e", fontstyle="italic")
            ax.set_xlim(0, span * 1.45)
            ax.set_yticks(positions, [_plain(_shorten(n)) for n in names])
            ax.set_ylim(-0.6, len(names) - 0.4)
            ax.grid(axis="y", visible=False)
            used = " (selection criterion)" if criterion == selection.criterion else ""
            ax.set_title(f"Δ{criterion.upper()} from best{used}")
            ax.set_xlabel(f"Δ{criterion.upper()} (lower is better)")
        axes[0].set_ylabel("Candidate model")
        fig.suptitle("Model comparison by ML fit: information criteria relative to the best candidate")
    return fig


def _deltas(table: pd.DataFrame, criterion: str, converged: np.ndarray) -> np.ndarray:
    column = f"delta_{criterion}"
    if column in table:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
    else:
        raw = pd.to_numeric(table[criterion], errors="coerce").to_numpy(float)
        raw = np.where(converged, raw, np.nan)
        best = np.nanmin(raw) if np.isfinite(raw).any() else np.nan
        values = raw - best
    return np.where(converged, values, np.nan)


# ------------------------------------------------------------------------------------ coefficients


E = TypeVar("E", FixedEffect, RatioEffect)


def _intercept_apart(effects: Sequence[E]) -> list[list[E]]:
    """The coefficient plot's panels: the intercept alone (its scale is another), then the other terms."""
    intercept = [e for e in effects if e.term == "(Intercept)"]
    others = [e for e in effects if e.term != "(Intercept)"]
    return [p for p in (intercept, others) if p]


def _coefficient_axes(panels: Sequence[Sequence[object]]) -> tuple[Figure, np.ndarray]:
    """A figure with one stacked axis per panel, each as tall as its number of terms."""
    fig = _new_figure(8.0, 1.5 + 0.38 * sum(len(p) for p in panels) + 0.5 * (len(panels) - 1))
    axes = fig.subplots(len(panels), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [max(len(p), 1) + 0.6 for p in panels]})[:, 0]
    return fig, axes


def plot_coefficients(fit: Fit, data: DataConfig | None = None) -> Figure:
    """Forest plot of the fixed effects: estimate and Wald 95% interval, with a zero line.

    The intercept sits in its own panel with its own scale, since it is on the outcome's level while
    the other terms are changes; drawn on one axis it would squash every other interval. A binomial or
    Poisson fit is drawn in odds or rate ratios (:func:`plot_ratio_coefficients`).
    """
    if not fit.fixed_effects:
        return _message_figure("Fixed effects", f"No fixed effects to draw for {fit.name!r}: {fit.message}")
    if fit.family != "gaussian":
        return plot_ratio_coefficients(fit, data)
    outcome = _outcome_of(fit.formula)
    panels = _intercept_apart(fit.fixed_effects)
    with _style():
        fig, axes = _coefficient_axes(panels)
        for ax, effects in zip(axes, panels, strict=True):
            est = np.array([fe.estimate for fe in effects])
            low = np.array([fe.ci_low for fe in effects])
            high = np.array([fe.ci_high for fe in effects])
            pos = np.arange(len(effects))[::-1]
            ax.hlines(pos, low, high, color=_HIGHLIGHT, linewidth=1.6)
            ax.plot(est, pos, "o", color=_HIGHLIGHT, markersize=5)
            finite = np.concatenate([low, high, est])
            finite = finite[np.isfinite(finite)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
            width = max(hi - lo, abs(hi) * 0.05, 1e-9)
            if effects[0].term != "(Intercept)" or lo - width <= 0 <= hi + width:
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                ax.axvline(0.0, color="#333333", linewidth=0.9, linestyle="--")
            pad = (hi - lo) * 0.06 or 1.0
            ax.set_xlim(lo - pad, hi + pad)
            shown = [with_time_unit(fe.term, data) if data is not None else fe.term for fe in effects]
            ax.set_yticks(pos, [_plain(_shorten(term, 36)) for term in shown])
            ax.set_ylim(-0.7, len(effects) - 0.3)
            ax.grid(axis="y", visible=False)
            ax.set_ylabel("Term")
            ax.set_xlabel(f"Estimate ({_plain(outcome)} units)" if effects[0].term == "(Intercept)"
                          else f"Estimate (change in {_plain(outcome)} per unit of the term)")
        t_based = any(math.isfinite(fe.df) for fe in fit.fixed_effects)
        axes[0].set_title(f"Fixed-effect estimates with {'t-based' if t_based else 'Wald'} 95% confidence intervals")
        fig.suptitle(f"Fixed effects of {_plain(_shorten(fit.name, 40))} ({fit.method})")
    return fig


_RATIO_MANTISSAS = (1.0, 2.0, 5.0)
_FINE_MANTISSAS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
_FINEST_MANTISSAS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)


def ratio_ticks(low: float, high: float) -> list[float]:
    """Ticks of a log-scale ratio axis from ``low`` to ``high`` (both > 0) that read as plain numbers: 0.1,
    0.2, 0.5, 1, 2, 5, ... over a wide range, 0.8, 1, 1.25, 1.5, ... over a narrow one, 0.9, 1, 1.1, ... over
    a narrower one; at most nine."""
    span = high / low
    mantissas = _FINEST_MANTISSAS if span < 3 else _FINE_MANTISSAS if span < 10 else _RATIO_MANTISSAS
    decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
    ticks = [m * 10.0 ** d for d in decades for m in mantissas]
    ticks = [t for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
    step = max(1, math.ceil(len(ticks) / 9))
    if 1.0 in ticks:  # keep 1, the line of no effect, among the thinned ticks
        anchor = ticks.index(1.0)
        return [t for i, t in enumerate(ticks) if (i - anchor) % step == 0]
    return ticks[::step]


def _ratio_text(value: float) -> str:
    return f"{value:g}" if 1e-3 <= value < 1e5 else f"{value:.0e}"


def plot_ratio_coefficients(fit: Fit, data: DataConfig | None = None) -> Figure:
    """Forest plot of a binomial or Poisson fit's fixed effects as odds or rate ratios (exp of the estimate
    and of its Wald 95% interval, :func:`~longitudinal.inference.residuals.ratio_effects`) on a log axis,
    with the line of no effect at 1. The intercept's exp, the baseline odds or rate, sits in its own panel.
    Non-finite bounds (an overflowing exp) are left out of the axis range."""
    effects = ratio_effects(fit)
    ratio, baseline = ratio_name(fit.family), baseline_name(fit.family)
    panels = _intercept_apart(effects)
    with _style():
        fig, axes = _coefficient_axes(panels)
        for ax, part in zip(axes, panels, strict=True):
            est = np.array([e.estimate for e in part])
            low = np.array([e.ci_low for e in part])
            high = np.array([e.ci_high for e in part])
            pos = np.arange(len(part))[::-1]
            drawable = np.isfinite(est) & (est > 0)
            ax.set_xscale("log")
            ax.hlines(pos[drawable], np.clip(low[drawable], 1e-300, None), high[drawable], color=_HIGHLIGHT,
                      linewidth=1.6)
            ax.plot(est[drawable], pos[drawable], "o", color=_HIGHLIGHT, markersize=5)
            values = np.concatenate([low, high, est])
            values = values[np.isfinite(values) & (values > 0)]
            lo, hi = (float(values.min()), float(values.max())) if values.size else (0.5, 2.0)
            if part[0].term != "(Intercept)":  # 1 is no effect; for the baseline odds or rate it marks nothing
                lo, hi = min(lo, 1.0), max(hi, 1.0)
                ax.axvline(1.0, color="#333333", linewidth=0.9, linestyle="--")
            if hi / lo < 1.5:  # an interval too narrow to read on a log axis: widen it around its centre
                centre = math.sqrt(lo * hi)
                lo, hi = centre / 1.25, centre * 1.25
            pad = (hi / lo) ** 0.06
            ax.set_xlim(lo / pad, hi * pad)
            ticks = ratio_ticks(lo / pad, hi * pad)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(FixedFormatter([_ratio_text(t) for t in ticks]))
            ax.xaxis.set_minor_locator(NullLocator())
            shown = [with_time_unit(e.term, data) if data is not None else e.term for e in part]
            ax.set_yticks(pos, [_plain(_shorten(term, 36)) for term in shown])
            ax.set_ylim(-0.7, len(part) - 0.3)
            ax.grid(axis="y", visible=False)
            ax.set_ylabel("Term")
            ax.set_xlabel(f"{baseline.capitalize()}: exp(intercept), log scale" if part[0].term == "(Intercept)"
                          else f"{ratio.capitalize()} per unit of the term, log scale")
        axes[0].set_title(f"{ratio.capitalize()}s with Wald 95% confidence intervals (exp of the "
                          f"{LINKS.get(fit.family, 'link')}-scale estimates)")
        fig.suptitle(f"Fixed effects of {_plain(_shorten(fit.name, 40))}: {family_description(fit.family)}, "
                     f"{fit.method} fit")
    return fig


# ---------------------------------------------------------------------------------- random effects


def _ranef_panels(ranef: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The rows of a long ``ranef`` frame per (group, term) pair, pairs in the order they first appear.

    One grouping pass (not one string comparison over all rows per pair), since a term of a large
    study has as many rows as subjects.
    """
    keys = ranef[["group", "term"]].astype(str)
    grouped = ranef.groupby([keys["group"], keys["term"]], sort=False, observed=True)
    return [(str(group), str(term), part) for (group, term), part in grouped]


def _mode_label(outcome: str, term: str, family: str = "gaussian") -> str:
    if family != "gaussian":  # random effects of a GLMM live on the link scale
        scale = "log-odds" if family == "binomial" else "log rate"
        return scale if term == "(Intercept)" else f"{scale} per unit of {_plain(_shorten(term, 20))}"
    return (f"{_plain(outcome)} units" if term == "(Intercept)"
            else f"{_plain(outcome)} per unit of {_plain(_shorten(term, 20))}")


def plot_random_effects(fit: Fit) -> Figure:
    """Predicted random effects (conditional modes) per term: the distribution over levels.

    Each histogram carries the model's N(0, SD²) for reference (predictions are shrunk, so they spread
    less than that). The levels one by one, with their conditional intervals, are in
    :func:`plot_caterpillar`.
    """
    ranef = fit.ranef
    if ranef is None or ranef.empty:
        return _message_figure("Predicted random effects", f"No random effects were predicted for {fit.name!r}.")
    outcome = _outcome_of(fit.formula)
    keys = _ranef_panels(ranef)
    sds = {(vc.group, vc.term): vc.sd for vc in fit.random_effects}
    ncols = min(len(keys), 4)
    nrows = math.ceil(len(keys) / ncols)
    with _style():
        fig = _new_figure(max(4.5, 3.4 * ncols), 0.8 + 2.7 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for index, (group, term, part) in enumerate(keys):
            values = part["estimate"].to_numpy(float)
            values = values[np.isfinite(values)]
            ax = axes[index // ncols, index % ncols]
            bins = int(min(60, max(10, math.sqrt(max(len(values), 1)))))
            ax.hist(values, bins=bins, color=_MUTED, edgecolor="white", linewidth=0.4)
            sd = sds.get((group, term), math.nan)
            if values.size and math.isfinite(sd) and sd > 0:
                width = (values.max() - values.min()) / bins if values.max() > values.min() else sd
                grid = np.linspace(min(values.min(), -3 * sd), max(values.max(), 3 * sd), 200)
                density = np.exp(-0.5 * (grid / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
                ax.plot(grid, density * values.size * width, color=_SMOOTH, linewidth=1.2,
                        label=f"N(0, {sd:.3g}²) from model")
                ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom so the legend sits above the bars
                ax.legend(loc="upper right", frameon=False)
            ax.set_title(f"{_plain(group)}: {_plain(_shorten(term))}")
            ax.set_xlabel(f"Conditional mode ({_mode_label(outcome, term, fit.family)})")
            ax.set_ylabel(f"Levels of {_plain(group)}")
        for flat, ax in enumerate(axes.ravel()):
            if flat >= len(keys):
                ax.set_axis_off()
        fig.suptitle(f"Predicted random effects of {_plain(_shorten(fit.name, 40))} by term")
    return fig


def caterpillar_rows(part: pd.DataFrame, max_levels: int = CATERPILLAR_LEVELS) -> tuple[pd.DataFrame, int]:
    """The levels of one term a caterpillar panel shows, sorted by conditional mode, and how many it hides.

    Up to ``max_levels`` levels are all shown; beyond that, the ``max_levels // 2`` lowest and the
    ``max_levels - max_levels // 2`` highest, where outlying levels are. Levels with a missing mode are
    dropped; a missing conditional SD draws no interval.
    """
    estimate = pd.to_numeric(part["estimate"], errors="coerce").to_numpy(float)
    finite = np.flatnonzero(np.isfinite(estimate))
    n = finite.size
    low, high = max_levels // 2, max_levels - max_levels // 2
    rows = finite
    if n > max_levels:
        # Sort only the candidates: values up to the low-th smallest or from the high-th largest, ties at
        # either cut included, so the sort by (mode, level) below picks exactly what a full sort would.
        values = estimate[finite]
        below = np.partition(values, low - 1)[low - 1] if low else -np.inf
        above = np.partition(values, n - high)[n - high] if high else np.inf
        rows = finite[(values <= below) | (values >= above)]
    ordered = part.iloc[rows].sort_values(["estimate", "level"], kind="stable")
    if n <= max_levels:
        return ordered, 0
    shown = pd.concat([ordered.iloc[:low], ordered.iloc[len(ordered) - high:]])
    return shown, n - max_levels


def plot_caterpillar(fit: Fit, max_levels: int = CATERPILLAR_LEVELS) -> Figure:
    """Caterpillar plot: each level's conditional mode with its 95% conditional interval, per term.

    The interval is mode ± 1.96 conditional SD (lme4's ``dotplot(ranef(fit, condVar = TRUE))``), levels
    sorted by mode, one labelled row each. A term with more than ``max_levels`` levels shows its lowest
    and highest ``max_levels / 2`` (see :func:`caterpillar_rows`); a marked row says how many are hidden,
    and the panel title says which are shown. Intervals that exclude zero are drawn darker.
    """
    ranef = fit.ranef
    if ranef is None or ranef.empty:
        return _message_figure("Conditional modes of the random effects",
                               f"No random effects were predicted for {fit.name!r}.")
    outcome = _outcome_of(fit.formula)
    keys = _ranef_panels(ranef)
    panels = [(group, term, *caterpillar_rows(part, max_levels)) for group, term, part in keys]
    ncols = min(len(keys), 4)
    nrows = math.ceil(len(keys) / ncols)
    tallest = max(len(shown) + (1 if hidden else 0) for _, _, shown, hidden in panels)
    row_height = 1.5 + 0.13 * max(tallest, 8)
    with _style():
        fig = _new_figure(max(5.0, 4.0 * ncols), 0.6 + row_height * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for index, (group, term, shown, hidden) in enumerate(panels):
            _draw_caterpillar(axes[index // ncols, index % ncols], shown, hidden, group, term, outcome,
                              fit.family)
        for flat, ax in enumerate(axes.ravel()):
            if flat >= len(panels):
                ax.set_axis_off()
        # one panel is narrow: the title on two lines, or it runs off the figure's edges
        fig.suptitle(f"Conditional modes of the random effects of {_plain(_shorten(fit.name, 40))}"
                     + ("\n" if ncols == 1 else " ") + "with 95% conditional intervals")
    return fig


def _draw_caterpillar(ax: Axes, shown: pd.DataFrame, hidden: int, group: str, term: str, outcome: str,
                      family: str = "gaussian") -> None:
    """One term: levels bottom (lowest mode) to top, a gap row marking the hidden middle levels."""
    est = shown["estimate"].to_numpy(float)
    half = 1.96 * pd.to_numeric(shown["cond_sd"], errors="coerce").fillna(0.0).to_numpy(float)
    labels = [_plain(_shorten(level, 18)) for level in shown["level"].astype(str)]
    y = np.arange(len(est), dtype=float)
    if hidden:
        low = len(est) // 2
        y[low:] += 1  # leave one row for the marker of the hidden levels
        ax.axhline(low, color=_MUTED, linewidth=0.8, linestyle=":")
    clear = (est - half > 0) | (est + half < 0)
    for mask, colour in ((~clear, _MUTED), (clear, _HIGHLIGHT)):
        if mask.any():
            ax.errorbar(est[mask], y[mask], xerr=half[mask], fmt="o", markersize=2.8, color=colour,
                        ecolor=colour, elinewidth=1.0, capsize=0)
    ax.axvline(0.0, color="#333333", linewidth=0.8, linestyle="--")
    ticks, tick_labels = list(y), labels
    if hidden:
        ticks = [*y[:low], float(low), *y[low:]]
        tick_labels = [*labels[:low], f"… {hidden:,} more …", *labels[low:]]
    _set_labelled_yticks(ax, ticks, tick_labels)
    ax.tick_params(axis="y", labelsize=6.5 if len(ticks) > 30 else 7.5)
    ax.set_ylim(-0.8, (max(ticks) if ticks else 0) + 0.8)
    ax.grid(axis="y", visible=False)
    n_levels = len(est) + hidden
    which = (f"{len(est) // 2} lowest, {len(est) - len(est) // 2} highest of {n_levels:,} levels" if hidden
             else f"{n_levels:,} levels")
    ax.set_title(f"{_plain(group)}: {_plain(_shorten(term))}\n{which}")
    ax.set_xlabel(f"Conditional mode ± 1.96 cond. SD\n({_mode_label(outcome, term, family)})")
    ax.set_ylabel(f"Level of {_plain(group)}")


def _set_labelled_yticks(ax: Axes, ticks: Sequence[float], labels: Sequence[str]) -> None:
    """``ax.set_yticks(ticks, labels)`` without creating the tick artists now: they are made when drawn.

    Creating 60 labelled ticks costs about as much as drawing them; deferred, it is paid once, when the
    figure is rendered.
    """
    ax.yaxis.set_major_locator(FixedLocator(list(ticks)))
    ax.yaxis.set_major_formatter(FixedFormatter(list(labels)))


# ----------------------------------------------------------------------------- residual covariance


def plot_residual_covariance(fit: Fit, time_label: str | None = None) -> Figure:
    """The selected model's residual covariance structure, as a statistician reads it.

    Over visits: a heatmap of the correlation matrix (diverging colours fixed to [−1, 1], the values written
    in the cells up to :data:`ANNOTATED_VISITS` visits) and, for a structure with a variance per visit, the
    residual SD at each visit beside it. For ``sp_exp``, whose labels are times: the correlation against the
    time between two visits, exp(−d / range), with the study's own distances marked.
    """
    covariance = fit.covariance
    if covariance is None or not len(covariance.labels):
        return _message_figure("Residual covariance", f"{fit.name!r} has no residual covariance structure.")
    if covariance.spatial:
        return _plot_spatial_correlation(fit, covariance, time_label)
    outcome = _outcome_of(fit.formula)
    m = len(covariance.labels)
    side = min(max(0.42 * m + 2.4, 4.6), 9.0)
    with _style():
        fig = _new_figure(side + (3.8 if covariance.heterogeneous else 1.2), side)
        if covariance.heterogeneous:
            heat, spread = fig.subplots(1, 2, gridspec_kw={"width_ratios": [side, 3.0]})
        else:
            heat, spread = fig.add_subplot(), None
        _draw_correlation_heatmap(fig, heat, covariance)
        if spread is not None:
            _draw_sd_per_visit(spread, covariance, outcome)
        fig.suptitle(f"Residual covariance of {_plain(_shorten(fit.name, 40))}: {_plain(covariance.description)} "
                     f"({_plain(covariance.term)})")
    return fig


def _visit_ticks(labels: Sequence[str], most: int = 30) -> tuple[list[int], list[str]]:
    """Positions and text of the visit ticks: every visit up to ``most``, else at most ``most`` evenly spaced."""
    step = max(1, math.ceil(len(labels) / most))
    positions = list(range(0, len(labels), step))
    return positions, [_plain(_shorten(labels[i], 12)) for i in positions]


def _set_visit_xticks(ax: Axes, positions: Sequence[int], texts: Sequence[str]) -> None:
    """Visit labels under an axis: upright when short and few, else vertical (never slanted: slanted labels
    crowd each other's boxes)."""
    upright = len(positions) <= 8 and max((len(t) for t in texts), default=0) <= 4
    ax.set_xticks(list(positions), list(texts), rotation=0 if upright else 90)


def _draw_correlation_heatmap(fig: Figure, ax: Axes, covariance: ResidualCovariance) -> None:
    correlation = covariance.correlation
    m = correlation.shape[0]
    # aspect "auto": the figure's size keeps the cells near square, and a fixed aspect would fight the layout
    image = ax.imshow(correlation, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest", aspect="auto")
    if m <= ANNOTATED_VISITS:
        size = 8.0 if m <= 8 else 6.5
        for i in range(m):
            for j in range(m):
                value = correlation[i, j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=size,
                        color="white" if abs(value) > 0.6 else "#1d232a")
    positions, texts = _visit_ticks(covariance.labels)
    _set_visit_xticks(ax, positions, texts)
    ax.set_yticks(positions, texts)
    ax.grid(False)
    ax.tick_params(length=0)
    ax.set_xlabel(f"Visit ({_plain(covariance.visit)})")
    ax.set_ylabel(f"Visit ({_plain(covariance.visit)})")
    ax.set_title("Correlation of a subject's residuals between visits")
    fig.colorbar(image, ax=ax, label="Correlation", shrink=0.85)


def _draw_sd_per_visit(ax: Axes, covariance: ResidualCovariance, outcome: str) -> None:
    sd = covariance.sd
    x = np.arange(len(sd))
    ax.plot(x, sd, color=_HIGHLIGHT, marker="o", markersize=4, linewidth=1.4)
    positions, texts = _visit_ticks(covariance.labels, most=8)  # a narrow panel
    _set_visit_xticks(ax, positions, texts)
    ax.set_ylim(0, float(np.nanmax(sd)) * 1.15 if np.isfinite(sd).any() else 1.0)
    ax.set_xlabel(f"Visit ({_plain(covariance.visit)})")
    ax.set_ylabel(f"Residual SD ({_plain(outcome)} units)")
    ax.set_title("Residual SD per visit")


def structure_range(covariance: ResidualCovariance) -> float:
    """The range φ of an exponential spatial structure (corr = exp(−d/φ)): its parameter named "range", or,
    without one, recovered from the correlation matrix at the largest time distance. NaN if neither."""
    for name, value in covariance.parameters:
        if name.lower() == "range":
            return float(value)
    times = pd.to_numeric(pd.Series(covariance.labels), errors="coerce").to_numpy(float)
    correlation = covariance.correlation
    if times.size < 2 or not np.isfinite(times).all():
        return math.nan
    i, j = np.triu_indices(times.size, k=1)
    distance, corr = np.abs(times[i] - times[j]), correlation[i, j]
    usable = (distance > 0) & (corr > 0) & (corr < 1)
    if not usable.any():
        return math.nan
    far = np.argmax(np.where(usable, distance, -np.inf))
    return float(-distance[far] / math.log(corr[far]))


def _plot_spatial_correlation(fit: Fit, covariance: ResidualCovariance, time_label: str | None) -> Figure:
    times = pd.to_numeric(pd.Series(covariance.labels), errors="coerce").to_numpy(float)
    correlation = covariance.correlation
    phi = structure_range(covariance)
    i, j = np.triu_indices(times.size, k=1)
    distance = np.abs(times[i] - times[j])
    observed = np.isfinite(distance)
    far = float(distance[observed].max()) if observed.any() else math.nan
    if not math.isfinite(far) or far <= 0:
        far = 3.0 * phi if math.isfinite(phi) and phi > 0 else 1.0
    label = _plain(time_label or covariance.visit)
    with _style():
        fig = _new_figure(7.5, 4.4)
        ax = fig.add_subplot()
        if math.isfinite(phi) and phi > 0:
            grid = np.linspace(0.0, far, 200)
            ax.plot(grid, np.exp(-grid / phi), color=_HIGHLIGHT, linewidth=1.8, label=f"exp(−d / {phi:.3g})")
            if phi <= far:
                ax.axvline(phi, color=_MUTED, linewidth=0.9, linestyle=":",
                           label=f"range {phi:.3g}: correlation e⁻¹ ≈ 0.37")
        if observed.any():
            ax.scatter(distance[observed], correlation[i, j][observed], s=12, color=_SMOOTH, zorder=3,
                       label="between the study's times", linewidths=0)
        ax.set_ylim(0.0, 1.05)
        ax.set_xlim(0.0, far * 1.02)
        ax.legend(loc="upper right", frameon=False)
        ax.set_title(f"Residual correlation of {_plain(_shorten(fit.name, 40))}: {_plain(covariance.description)} "
                     f"({_plain(covariance.term)})")
        ax.set_xlabel(f"Time between two visits of a subject, d ({label})")
        ax.set_ylabel("Correlation of the residuals")
    return fig


# ------------------------------------------------------------------------------------ diagnostics


def _aligned(fit: Fit) -> tuple[np.ndarray, np.ndarray]:
    fitted = np.asarray(fit.fitted, dtype=float)
    residuals = np.asarray(fit.residuals, dtype=float)
    if fitted.shape != residuals.shape:
        raise ValueError(
            f"fit {fit.name!r} has {fitted.size} fitted values but {residuals.size} residuals; "
            "both must align with the rows the candidate was fitted on"
        )
    return fitted, residuals


def _density_scatter(fig: Figure, ax: Axes, x: np.ndarray, y: np.ndarray) -> None:
    """A scatter for few points; hexagonal bins (with a count colour bar) for many."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size > _DENSE_ROWS:
        hexes = ax.hexbin(x, y, gridsize=70, mincnt=1, cmap="Blues", bins="log", linewidths=0)
        fig.colorbar(hexes, ax=ax, label="Rows per hexagon (log scale)")
    else:
        ax.scatter(x, y, s=9, alpha=0.45, color=_HIGHLIGHT, linewidths=0)


def _draw_smooth(ax: Axes, x: np.ndarray, y: np.ndarray, label: str) -> None:
    means = binned_means(x, y)
    if not means.empty:
        ax.plot(means["x"], means["mean"], color=_SMOOTH, linewidth=1.8, marker="o", markersize=3, label=label)
        ax.legend(loc="upper right", frameon=False)


def plot_residuals_vs_fitted(fit: Fit) -> Figure:
    """Conditional residuals (observed − fitted, random effects included) against fitted values.

    A zero line and the mean residual per quantile bin of the fitted values show curvature or drift;
    a funnel shape indicates variance growing with the mean.
    """
    fitted, residuals = _aligned(fit)
    if fitted.size == 0:
        return _message_figure("Residuals against fitted values", f"{fit.name!r} has no fitted values: {fit.message}")
    outcome = _plain(_outcome_of(fit.formula))
    with _style():
        fig = _new_figure(7.5, 4.4)
        ax = fig.add_subplot()
        _density_scatter(fig, ax, fitted, residuals)
        ax.axhline(0.0, color="#333333", linewidth=0.9, linestyle="--")
        _draw_smooth(ax, fitted, residuals, "binned mean")
        ax.set_title(f"Residuals against fitted values ({_plain(_shorten(fit.name, 40))}, {fit.method})")
        ax.set_xlabel(f"Fitted value ({outcome} units)")
        ax.set_ylabel(f"Residual ({outcome} units)")
    return fig


def plot_qq(fit: Fit) -> Figure:
    """Normal QQ plot of standardized residuals (residual / σ̂) with a reference line through the quartiles.

    The line is R's ``qqline``: it judges the shape (tails, skew) rather than the scale, since
    conditional residuals are shrunk and spread a little less than σ̂.

    A fit with a residual covariance structure plots its normalized residuals instead (nlme's
    ``qqnorm(fit, ~ resid(., type = "n"))``): whitened by the fitted covariance, they are the ones that
    should be independent N(0, 1).

    Plotting positions (i − 0.5)/n; with many rows, at most a few thousand evenly spaced order
    statistics are drawn (always including both extremes). NaN residuals are dropped.
    """
    _, residuals = _aligned(fit)
    whitened = fit.normalized_residuals.size > 0
    residuals = normalized_residuals(fit) if whitened else residuals
    residuals = residuals[np.isfinite(residuals)]
    if residuals.size < 2:
        return _message_figure("Normal QQ plot of residuals", f"{fit.name!r} has too few residuals to draw.")
    scale = 1.0 if whitened else fit.residual_sd if math.isfinite(fit.residual_sd) and fit.residual_sd > 0 \
        else float(np.std(residuals, ddof=1))
    ordered = np.sort(residuals / scale)
    n = ordered.size
    index = np.unique(np.linspace(0, n - 1, min(n, QQ_POINTS)).round().astype(int))
    theoretical = ndtri((index + 0.5) / n)
    q25, q75 = np.quantile(ordered, [0.25, 0.75])
    slope = (q75 - q25) / (2 * ndtri(0.75))
    intercept = (q25 + q75) / 2
    with _style():
        fig = _new_figure(5.6, 5.0)
        ax = fig.add_subplot()
        ax.scatter(theoretical, ordered[index], s=9, color=_HIGHLIGHT, alpha=0.6, linewidths=0)
        edge = float(max(np.abs(theoretical).max(), 1.0))
        ax.plot([-edge, edge], [intercept - slope * edge, intercept + slope * edge], color=_SMOOTH,
                linewidth=1.2, label="normal line through the quartiles")
        ax.legend(loc="upper left", frameon=False)
        which = "normalized" if whitened else "standardized"
        ax.set_title(f"Normal QQ plot of {which} residuals ({_plain(_shorten(fit.name, 40))})")
        ax.set_xlabel("Theoretical N(0, 1) quantile")
        ax.set_ylabel("Normalized residual (whitened by the fitted covariance)" if whitened
                      else "Standardized residual (residual / σ̂)")
    return fig


def plot_residuals_over_time(fit: Fit, time_values: np.ndarray | pd.Series, time_label: str = "Time") -> Figure:
    """Conditional residuals against time, with the mean residual per time point (or time bin).

    A systematic pattern in the means suggests a misspecified time trend (e.g. a missing quadratic term).
    ``time_values`` must align with the fit's rows.
    """
    _, residuals = _aligned(fit)
    time = np.asarray(time_values, dtype=float)
    if residuals.size == 0:
        return _message_figure("Residuals over time", f"{fit.name!r} has no residuals: {fit.message}")
    if time.shape != residuals.shape:
        raise ValueError(
            f"{time.size} time values given for fit {fit.name!r} with {residuals.size} residuals; "
            "pass the time column of the rows the candidate was fitted on"
        )
    outcome = _plain(_outcome_of(fit.formula))
    keep = np.isfinite(time) & np.isfinite(residuals)
    levels = np.unique(time[keep])
    discrete = levels.size <= MAX_DISTINCT_X
    with _style():
        fig = _new_figure(7.5, 4.4)
        ax = fig.add_subplot()
        if discrete and levels.size:
            spacing = float(np.diff(levels).min()) if levels.size > 1 else 1.0
            if keep.sum() > _DENSE_ROWS // 2:
                kept_time, kept = time[keep], residuals[keep]
                order = np.argsort(kept_time, kind="stable")
                groups = np.split(kept[order], np.searchsorted(kept_time[order], levels[1:]))
                ax.boxplot(groups, positions=levels, widths=0.5 * spacing, manage_ticks=False,
                           flierprops={"markersize": 2, "alpha": 0.4, "markeredgecolor": _MUTED},
                           medianprops={"color": _HIGHLIGHT}, boxprops={"color": "#555555"})
            else:
                jitter = np.random.default_rng(0).uniform(-0.15, 0.15, keep.sum()) * spacing
                ax.scatter(time[keep] + jitter, residuals[keep], s=9, alpha=0.45, color=_HIGHLIGHT, linewidths=0)
        else:
            _density_scatter(fig, ax, time, residuals)
        ax.axhline(0.0, color="#333333", linewidth=0.9, linestyle="--")
        _draw_smooth(ax, time, residuals, "mean per time" if discrete else "mean per time bin")
        ax.set_title(f"Residuals over time ({_plain(_shorten(fit.name, 40))}, {fit.method})")
        ax.set_xlabel(_plain(time_label))
        ax.set_ylabel(f"Residual ({outcome} units)")
    return fig


def plot_observed_vs_fitted(
    visits: pd.DataFrame, fit: Fit, subject: str, time: str, outcome: str, n_subjects: int = 12, seed: int = 0,
    time_label: str | None = None, observed: np.ndarray | None = None,
) -> Figure:
    """Small multiples for a seeded sample of subjects: observed points and the fitted trajectory.

    Fitted values are conditional (fixed effects plus the subject's predicted random effects; the fixed
    effects alone for a model without random effects) and must align positionally with ``visits``. Panels
    share both axes so subjects compare at a glance. ``observed`` replaces the ``outcome`` column (a
    binomial or Poisson fit passes the outcome as it saw it, :func:`observed_response`); for such a fit the
    line is the subject's fitted probability or mean count.
    """
    fitted, _ = _aligned(fit)
    if fitted.size == 0:
        return _message_figure("Observed and fitted trajectories", f"{fit.name!r} has no fitted values: {fit.message}")
    if fitted.size != len(visits):
        raise ValueError(
            f"fit {fit.name!r} has {fitted.size} fitted values but the visits have {len(visits)} rows; "
            "pass the rows the candidate was fitted on, in the same order"
        )
    codes, names = _code_subjects(visits[subject])
    present = np.bincount(codes[codes >= 0], minlength=len(names)) > 0
    chosen = _sample_codes(names, present, n_subjects, seed)
    rows = np.flatnonzero(_rows_of(codes, chosen, len(names)))
    values = visits[outcome].to_numpy(float) if observed is None else np.asarray(observed, dtype=float)
    data = pd.DataFrame({
        "code": codes[rows],
        "time": visits[time].to_numpy(float)[rows],
        "observed": values[rows],
        "fitted": fitted[rows],
    })
    sample = names[chosen].astype(str)
    fitted_label = ("fitted (fixed effects + the subject's random effects)" if fit.random_effects or fit.covariance is None
                    else "fitted (fixed effects; the model has no random effects)")
    y_label = _plain(outcome)
    if fit.family != "gaussian":
        what = "probability" if fit.family == "binomial" else "mean count"
        fitted_label = f"fitted {what} (fixed effects + the subject's random effects)"
        y_label = (f"{_plain(outcome)} (0/1) and fitted probability" if fit.family == "binomial"
                   else f"{_plain(outcome)} (count) and fitted mean count")
    ncols = min(4, max(len(sample), 1))
    nrows = max(math.ceil(len(sample) / ncols), 1)
    with _style():
        fig = _new_figure(2.45 * ncols + 0.6, 2.0 * nrows + 1.0)
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        for ax, sid, code in zip(axes.ravel(), sample, chosen, strict=False):
            part = data[data["code"] == code].sort_values("time", kind="stable")
            ax.plot(part["time"], part["fitted"], color=_SMOOTH, linewidth=1.5, label=fitted_label)
            ax.plot(part["time"], part["observed"], "o", color=_HIGHLIGHT, markersize=4, label="observed")
            ax.set_title(_plain(_shorten(sid, 22)), fontsize=8.5)
        for index, ax in enumerate(axes.ravel()):
            if index >= len(sample):
                ax.set_axis_off()
            elif index + ncols >= len(sample):  # the lowest panel of its column: label its time axis
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel(_plain(time_label or time))
        handles, labels = axes[0, 0].get_legend_handles_labels()
        # below the panels: a figure legend beside the suptitle would collide with a long title
        fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
        fig.suptitle(f"Observed and fitted trajectories of {_plain(_shorten(fit.name, 40))}, "
                     f"{len(sample)} sampled subjects")
        fig.supylabel(y_label)
    return fig


# --------------------------------------------------------------- binomial and Poisson outcomes (GLMM)


def plot_outcome_over_time(
    table: pd.DataFrame, family: str, outcome: str, *, group: str | None = None, time_label: str = "Time",
    title: str = "",
) -> Figure:
    """The observed proportion (binomial) or mean count (Poisson) per time with its 95% interval, per group,
    and, where ``table`` has them, the mean fitted values as lines (:func:`outcome_over_time`'s table).

    Groups share the time axis; each group's points are nudged sideways a little so that intervals at the
    same time do not hide each other. Without fitted values the observed points are joined by thin lines.
    """
    if table.empty:
        return _message_figure(title or "Outcome over time", "No rows with a time and an outcome to draw.")
    fitted_shown = bool(table["fitted"].notna().any())
    levels = list(dict.fromkeys(table["group"].tolist()))
    times = table["time"].to_numpy(float)
    span = float(times.max() - times.min()) or 1.0
    nudge = 0.012 * span if len(levels) > 1 else 0.0
    interval = "95% Wilson interval" if family == "binomial" else "±1.96 SE"
    handles: list[Line2D] = []
    with _style():
        fig = _new_figure(8.0, 4.8)
        ax = fig.add_subplot()
        for index, level in enumerate(levels):
            colour = PALETTE[index % len(PALETTE)] if group is not None else "#111111"
            part = table[[g == level for g in table["group"]]]
            x = part["time"].to_numpy(float) + (index - (len(levels) - 1) / 2) * nudge
            observed = part["observed"].to_numpy(float)
            below = np.clip(observed - part["ci_low"].to_numpy(float), 0, None)
            above = np.clip(part["ci_high"].to_numpy(float) - observed, 0, None)
            ax.errorbar(x, observed, yerr=[np.nan_to_num(below), np.nan_to_num(above)], fmt="o",
                        markersize=4.5, color=colour, ecolor=colour, elinewidth=1.0, capsize=2,
                        linestyle="none" if fitted_shown else "-", linewidth=0.8, alpha=0.9)
            if fitted_shown:
                ax.plot(part["time"], part["fitted"], color=colour, linewidth=2.0)
            label = "all subjects" if group is None else f"{_plain(group)} = {_plain(_shorten(level, 20))}"
            handles.append(Line2D([], [], color=colour, marker="o", markersize=4.5,
                                  linestyle="-" if fitted_shown else "none", label=label))
        what = "proportion" if family == "binomial" else "mean"
        handles.append(Line2D([], [], color="#555555", marker="o", linestyle="none", markersize=4.5,
                              label=f"observed {what}, {interval}"))
        if fitted_shown:
            fitted_what = "probability" if family == "binomial" else "count"
            handles.append(Line2D([], [], color="#555555", linewidth=2.0,
                                  label=f"mean fitted {fitted_what} (subjects' conditional fits averaged)"))
        top = float(np.nanmax(table[["observed", "ci_high", "fitted"]].to_numpy(float)))
        ax.set_ylim(0.0, (min(top * 1.45, 1.05) if family == "binomial" else top * 1.45) or 1.0)
        ax.legend(handles=handles, loc="upper left", frameon=False, ncols=2 if len(handles) > 4 else 1)
        ax.set_title(_plain(title) or f"{outcome_scale_label(family, _plain(outcome)).capitalize()} over time")
        ax.set_xlabel(_plain(time_label))
        ax.set_ylabel(_plain(outcome_scale_label(family, outcome).capitalize()))
    return fig


def plot_binned_residuals(fit: Fit) -> Figure:
    """Binned residuals (Gelman & Hill): the mean residual y − μ̂ in bins of μ̂ against the bin's mean μ̂,
    inside a ±2 SE band (:func:`~longitudinal.inference.residuals.binned_residuals`); bins outside the band
    are drawn in red and counted in the title (about 5% expected when the model is right)."""
    fitted, residuals = _aligned(fit)
    title = "Binned residuals"
    if fitted.size == 0:
        return _message_figure(title, f"{fit.name!r} has no fitted values: {fit.message}")
    table = binned_residuals(fitted, residuals, fit.family)
    x = table["fitted"].to_numpy(float)
    band = 2.0 * table["se"].to_numpy(float)
    outside = table["outside"].to_numpy(bool)
    what = "probability" if fit.family == "binomial" else "count"
    with _style():
        fig = _new_figure(7.5, 4.6)
        ax = fig.add_subplot()
        ax.fill_between(x, -band, band, color="#d7dce1", alpha=0.8, linewidth=0, label="±2 SE under the model")
        ax.axhline(0.0, color="#333333", linewidth=0.9, linestyle="--")
        ax.scatter(x[~outside], table["residual"].to_numpy(float)[~outside], s=14, color=_HIGHLIGHT,
                   linewidths=0, label="mean residual in a bin")
        if outside.any():
            ax.scatter(x[outside], table["residual"].to_numpy(float)[outside], s=16, color=_SMOOTH, linewidths=0,
                       label="outside ±2 SE")
        values = np.concatenate([np.abs(table["residual"].to_numpy(float)), band])
        limit = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        ax.set_ylim(-1.15 * limit, 1.6 * limit)  # headroom above for the legend
        ax.legend(loc="upper right", frameon=False, ncols=3)
        ax.set_title(f"Binned residuals of {_plain(_shorten(fit.name, 40))}: {int(outside.sum())} of {len(table)} "
                     f"bins outside ±2 SE ({int(table['n'].median()) if len(table) else 0} rows per bin)")
        ax.set_xlabel(f"Mean fitted {what} μ̂ in the bin")
        ax.set_ylabel("Mean residual y − μ̂ in the bin")
    return fig


def plot_quantile_residuals(fit: Fit, seed: int = 0) -> Figure:
    """Randomized quantile residuals (Dunn & Smyth; conditional on the predicted random effects, seeded:
    :func:`~longitudinal.inference.residuals.randomized_quantile_residuals`): a QQ plot against N(0, 1) with
    the identity line, and the residuals against the fitted μ̂ with their mean per bin.

    The QQ line is y = x, not a line through the quartiles: these residuals should be N(0, 1) exactly, scale
    included. With many rows, at most :data:`QQ_POINTS` evenly spaced order statistics are drawn.
    """
    fitted, _ = _aligned(fit)
    title = "Randomized quantile residuals"
    if fitted.size == 0:
        return _message_figure(title, f"{fit.name!r} has no fitted values: {fit.message}")
    residuals = randomized_quantile_residuals(observed_response(fit), fitted, fit.family, seed=seed)
    finite = residuals[np.isfinite(residuals)]
    if finite.size < 2:
        return _message_figure(title, f"{fit.name!r} has too few residuals to draw.")
    ordered = np.sort(finite)
    n = ordered.size
    index = np.unique(np.linspace(0, n - 1, min(n, QQ_POINTS)).round().astype(int))
    theoretical = ndtri((index + 0.5) / n)
    what = "probability" if fit.family == "binomial" else "count"
    with _style():
        fig = _new_figure(10.0, 4.6)
        qq, spread = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.3]})
        qq.scatter(theoretical, ordered[index], s=9, color=_HIGHLIGHT, alpha=0.6, linewidths=0)
        edge = float(max(np.abs(theoretical).max(), np.abs(ordered[index]).max(), 1.0))
        qq.plot([-edge, edge], [-edge, edge], color=_SMOOTH, linewidth=1.2, label="y = x: N(0, 1)")
        qq.legend(loc="upper left", frameon=False)
        qq.set_title("Normal QQ plot")
        qq.set_xlabel("Theoretical N(0, 1) quantile")
        qq.set_ylabel("Randomized quantile residual")
        _density_scatter(fig, spread, fitted, residuals)
        for level in (-1.96, 0.0, 1.96):
            spread.axhline(level, color="#333333", linewidth=0.9, linestyle="--" if level == 0 else ":")
        _draw_smooth(spread, fitted, residuals, "mean per bin of μ̂")
        spread.set_title("Against the fitted value (dotted: ±1.96)")
        spread.set_xlabel(f"Fitted {what} μ̂ (conditional on the random effects)")
        spread.set_ylabel("Randomized quantile residual")
        fig.suptitle(f"Randomized quantile residuals of {_plain(_shorten(fit.name, 40))} "
                     f"({'binomial' if fit.family == 'binomial' else 'Poisson'}, seed {seed})")
    return fig


# ------------------------------------------------------------------------- residual correlation


def residual_correlation_kind(times: np.ndarray, covariance: ResidualCovariance | None) -> CorrelationKind:
    """"lag" (correlation by lag in visits) for a visit structure or a time column of at most
    :data:`DISCRETE_TIMES` distinct values; "variogram" (semivariogram by distance) for continuous times."""
    if covariance is not None and not covariance.spatial:
        return "lag"
    t = np.asarray(times, dtype=float)
    return "lag" if np.unique(t[np.isfinite(t)]).size <= DISCRETE_TIMES else "variogram"


def serial_diagnostic_fits(selected: Fit, fits: Sequence[Fit], criterion: str) -> list[tuple[str, Fit]]:
    """The fits the residual correlation diagnostic compares, each with its role: the selected model (its
    REML refit, or its ML fit when the refit has no residuals), then the best usable candidate without
    serial correlation by ``criterion`` ("aic" or "bic"; fewer parameters on a tie) when that is another
    candidate. "Without serial correlation": no covariance structure, or one outside
    :data:`~longitudinal.records.SERIAL_STRUCTURES` (cs, csh)."""
    chosen = selected if selected.residuals.size else next(
        (f for f in fits if f.name == selected.name and f.residuals.size), None)
    out = [("selected", chosen)] if chosen is not None else []
    plain = [f for f in fits if f.usable and f.residuals.size and (f.covariance is None or not f.covariance.serial)]
    if plain:
        best = min(plain, key=lambda f: (f.aic if criterion == "aic" else f.bic, f.n_params))
        if best.name != selected.name:
            out.append(("best without serial correlation", best))
    return out


def plot_residual_correlation(
    fits: Sequence[tuple[str, Fit]], visits: pd.DataFrame, subject: str, time: str, *, kind: CorrelationKind = "lag",
    time_label: str | None = None, max_pairs: int = MAX_PAIRS, seed: int = 0,
) -> Figure:
    """Serial correlation left in the normalized residuals (:func:`normalized_residuals`), one line per fit.

    ``fits`` are (role, fit) pairs (see :func:`serial_diagnostic_fits`), residuals aligned with the rows of
    ``visits``. ``kind`` "lag": the correlation by lag in visits (:func:`lag_correlation`) with a zero line
    and a ±2/√pairs band, the spread of a correlation that is zero; "variogram": the semivariogram by time
    distance (:func:`semivariogram`) with its no-serial-correlation level γ = 1.
    """
    title = ("Within-subject correlation of normalized residuals by lag" if kind == "lag"
             else "Semivariogram of normalized residuals within subjects")
    times = visits[time].to_numpy(float)
    curves = []
    for role, fit in fits:
        e = normalized_residuals(fit)
        if e.size == 0:
            continue
        if e.size != len(visits):
            raise ValueError(f"fit {fit.name!r} has {e.size} residuals but the visits have {len(visits)} rows; "
                             "pass the rows the candidate was fitted on, in the same order")
        if kind == "lag":
            table = lag_correlation(e, visits[subject], visit_positions(times), max_pairs=max_pairs, seed=seed)
        else:
            table = semivariogram(e, visits[subject], times, max_pairs=max_pairs, seed=seed)
        if len(table):
            curves.append((f"{_plain(_shorten(fit.name, 32))} ({role}, {fit.method})", table))
    if not curves:
        return _message_figure(title, "No within-subject pairs of residuals to compare.")
    with _style():
        fig = _new_figure(7.5, 4.6)
        ax = fig.add_subplot()
        if kind == "lag":
            _draw_lag_correlation(ax, curves)
        else:
            _draw_semivariogram(ax, curves, _plain(time_label or time))
        ax.set_title(title)
    return fig


def _draw_lag_correlation(ax: Axes, curves: Sequence[tuple[str, pd.DataFrame]]) -> None:
    reference = curves[0][1]
    lags = reference["lag"].to_numpy(float)
    band = 2.0 / np.sqrt(reference["pairs"].to_numpy(float))
    bars = ax.bar(lags, 2 * band, bottom=-band, width=0.5, color="#d7dce1", alpha=0.8, linewidth=0,
                  label="±2/√pairs: zero correlation")
    ax.axhline(0.0, color="#333333", linewidth=0.9, linestyle="--")
    width = 0.08
    lines: list[Line2D] = []
    for index, (label, table) in enumerate(curves):
        shift = (index - (len(curves) - 1) / 2) * width
        lines += ax.plot(table["lag"].to_numpy(float) + shift, table["correlation"], marker="o", markersize=4.5,
                         linewidth=1.4, color=PALETTE[index % len(PALETTE)], label=label)
    values = np.concatenate([t["correlation"].to_numpy(float) for _, t in curves] + [band])
    top = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    limit = min(1.05, max(0.25, 1.25 * top))
    ax.set_ylim(-limit, limit * 1.35)  # headroom above for the legend
    if lags.size <= 12:
        ax.set_xticks(lags, [f"{int(k)}\n{int(n):,}" for k, n in zip(lags, reference["pairs"], strict=True)])
        ax.set_xlabel("Lag: visits apart (under each lag, its number of pairs)")
    else:
        ax.set_xlabel("Lag: visits apart")
    ax.set_xlim(lags.min() - 0.5, lags.max() + 0.5)
    ax.set_ylabel("Correlation of normalized residuals")
    ax.legend(handles=[*lines, bars], loc="upper right", frameon=False)


def _draw_semivariogram(ax: Axes, curves: Sequence[tuple[str, pd.DataFrame]], time_label: str) -> None:
    ax.axhline(1.0, color="#333333", linewidth=0.9, linestyle="--", label="γ = 1: no serial correlation")
    top = 1.0
    for index, (label, table) in enumerate(curves):
        ax.plot(table["distance"], table["semivariance"], marker="o", markersize=4, linewidth=1.4,
                color=PALETTE[index % len(PALETTE)], label=label)
        top = max(top, float(np.nanmax(table["semivariance"])))
    ax.set_ylim(0.0, top * 1.35)
    ax.set_xlim(left=0.0)
    ax.set_xlabel(f"Time between two visits of a subject ({time_label})")
    ax.set_ylabel("Semivariance γ of normalized residuals")
    ax.legend(loc="upper right", frameon=False)


# ------------------------------------------------------------------------------------ marginal means


def plot_marginal_means(
    estimates: MarginalEstimates, visits: pd.DataFrame, outcome: str, *, time: str,
    subject: str | Sequence[str] | None = None, family: str = "gaussian", time_label: str = "Time",
) -> Figure:
    """The model's estimated marginal means per ``by`` group with their 95% bands, over the first ``at`` column
    (the time, usually), on the observed group means at each visit (open points).

    With a second ``at`` column each of its values gets its own line style (the groups keep their colours).
    Without an ``at`` column the means are drawn per group as points with their intervals. Observed means are
    shown when the x axis is the time and ``subject`` is given: ``summarize_visits``' mean per visit and group
    (a binomial outcome's proportion of 1s, a Poisson outcome's mean count), which differ from the model's
    means where subjects drop out or the design is unbalanced, which is what a reader checks.
    """
    means = estimates.means
    title = "Estimated marginal means" + (f" by {_plain(estimates.by)}" if estimates.by else "")
    if means.empty or not np.isfinite(means["estimate"].to_numpy(float)).any():
        return _message_figure(title, "No marginal means to draw.")
    by = estimates.by
    levels = list(dict.fromkeys(means[by].astype(str))) if by else [None]
    x_column = estimates.at[0] if estimates.at else None
    others = list(estimates.at[1:])
    scale = estimates.scale if estimates.scale != "outcome" else _plain(outcome)
    observed = (_observed_means(visits, subject, time, outcome, by)
                if x_column == time and subject is not None else None)
    styles = ("-", "--", ":", "-.")
    with _style():
        fig = _new_figure(8.0, 4.8)
        ax = fig.add_subplot()
        for index, level in enumerate(levels):
            colour = PALETTE[index % len(PALETTE)] if by else "#111111"
            part = means if level is None else means[means[by].astype(str) == level]
            label = "all" if level is None else f"{_plain(by)} = {_plain(_shorten(level, 20))}"
            if x_column is None:
                y = part["estimate"].to_numpy(float)
                ax.errorbar([index], y, yerr=[y - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - y],
                            fmt="o", color=colour, capsize=3, label=label)
                continue
            combinations = part.groupby(others, sort=False) if others else [((), part)]
            for number, (values, line) in enumerate(combinations):
                values = values if isinstance(values, tuple) else (values,)
                where = ", ".join(f"{_plain(c)} = {v:g}" for c, v in zip(others, values, strict=True))
                order = np.argsort(line[x_column].to_numpy(float), kind="stable")
                x = line[x_column].to_numpy(float)[order]
                ax.fill_between(x, line["ci_low"].to_numpy(float)[order], line["ci_high"].to_numpy(float)[order],
                                color=colour, alpha=0.15 / (1 + number), linewidth=0)
                ax.plot(x, line["estimate"].to_numpy(float)[order], color=colour, linewidth=2.0, marker="s",
                        markersize=4, linestyle=styles[number % len(styles)],
                        label=f"{label}{', ' + where if where else ''}: model mean, 95% band")
            if observed is not None:
                mine = observed[observed["group"] == (level if level is not None else ALL_SUBJECTS)]
                ax.plot(mine["time"], mine["mean"], "o", color=colour, markerfacecolor="white", markersize=5,
                        label=f"{label}: observed mean")
        if x_column is None:
            ax.set_xticks(range(len(levels)), [_plain(_shorten(str(level), 20)) for level in levels])
            ax.set_xlabel(_plain(by or ""))
        else:
            ax.set_xlabel(_plain(time_label) if x_column == time else _plain(x_column))
        ax.set_ylabel(scale.capitalize() if estimates.scale != "outcome" else f"Mean {scale}")
        ax.legend(loc="best", frameon=False, fontsize=8, ncols=2 if len(levels) > 2 or others else 1)
        ax.set_title(title)
    return fig


def _observed_means(
    visits: pd.DataFrame, subject: str | Sequence[str], time: str, outcome: str, by: str | None,
) -> pd.DataFrame:
    """Columns ``group``, ``time`` (the visit's middle time), ``mean``: the observed mean per visit and group."""
    summary = summarize_visits(visits, subject, time, outcome, by)
    middle = summary.visits.set_index("visit")[["time_low", "time_high"]].mean(axis=1)
    table = summary.per_visit.assign(time=summary.per_visit["visit"].map(middle))
    return table.loc[table["rows"] > 0, ["group", "time", "mean"]]


# ----------------------------------------------------------------------------------------- all


def figure_builders(
    visits: pd.DataFrame, config: StudyConfig, selection: Selection, selected: Fit, *,
    fits: Sequence[Fit] = (), max_subjects: int = 200, n_panels: int = 12, seed: int = 0,
    estimates: MarginalEstimates | None = None,
) -> dict[str, Callable[[], Figure]]:
    """Every report figure as a builder to call, keyed by its file stem, in report order
    (:func:`build_figures` calls them): those of :data:`FIGURE_KEYS`, and those of
    :data:`STRUCTURE_FIGURE_KEYS` when candidates have a covariance structure: the residual covariance
    when the selected model has one, the residual correlation diagnostic when any of ``fits`` (the ML fits
    of every candidate) or the selected model has one, and ``marginal_means`` (after ``coefficients``) when
    the study asks for ``estimates``.

    ``selected`` is the REML refit of the chosen candidate; its ``fitted`` and ``residuals`` align with
    the rows of ``visits``, as those of ``fits`` do. Trajectories are coloured by the first text column with
    2–6 levels among the selected formula's fixed-effect columns (e.g. a treatment arm), if any.

    A binomial or Poisson ``selected`` (its ML fit: a GLMM has no REML) gets the figures of
    :data:`GLMM_FIGURE_KEYS` instead (see :func:`glmm_figure_builders`).
    """
    roles = config.data
    roles_used = (*roles.subject_columns, roles.subject_key, roles.time, roles.outcome)
    group = choose_group_column(visits, selected.formula, exclude=roles_used)
    time_label = time_axis_label(roles)
    if selected.family != "gaussian":
        return glmm_figure_builders(visits, config, selection, selected, group=group, n_panels=n_panels, seed=seed,
                                    estimates=estimates)
    time_values = visits[roles.time].to_numpy(float) if len(selected.residuals) else np.empty(0)
    builders: dict[str, Callable[[], Figure]] = {
        "trajectories": lambda: plot_trajectories(visits, roles.subject_key, roles.time, roles.outcome, group=group,
                                                  max_subjects=max_subjects, seed=seed, time_label=time_label),
        "model_comparison": lambda: plot_model_comparison(selection),
        "coefficients": lambda: plot_coefficients(selected, roles),
    }
    if estimates is not None:
        builders["marginal_means"] = _marginal_means_builder(estimates, visits, config, selected.family)
    if selected.covariance is not None:
        builders["residual_covariance"] = lambda: plot_residual_covariance(selected, time_label=time_label)
    builders |= {
        "random_effects": lambda: plot_random_effects(selected),
        "caterpillar": lambda: plot_caterpillar(selected),
        "residuals_vs_fitted": lambda: plot_residuals_vs_fitted(selected),
        "qq": lambda: plot_qq(selected),
        "residuals_over_time": lambda: plot_residuals_over_time(selected, time_values, time_label=time_label),
    }
    if selected.covariance is not None or any(f.covariance is not None for f in fits):
        compared = serial_diagnostic_fits(selected, fits, selection.criterion)
        kind = residual_correlation_kind(visits[roles.time].to_numpy(float), selected.covariance)
        builders["residual_correlation"] = lambda: plot_residual_correlation(
            compared, visits, roles.subject_key, roles.time, kind=kind, time_label=time_label, seed=seed)
    builders["observed_vs_fitted"] = lambda: plot_observed_vs_fitted(
        visits, selected, roles.subject_key, roles.time, roles.outcome, n_subjects=n_panels, seed=seed,
        time_label=time_label)
    return builders


def _marginal_means_builder(
    estimates: MarginalEstimates, visits: pd.DataFrame, config: StudyConfig, family: str,
) -> Callable[[], Figure]:
    roles = config.data
    return lambda: plot_marginal_means(estimates, visits, roles.outcome, time=roles.time,
                                       subject=roles.subject_columns, family=family, time_label=time_axis_label(roles))


def glmm_figure_builders(
    visits: pd.DataFrame, config: StudyConfig, selection: Selection, selected: Fit, *, group: str | None,
    n_panels: int = 12, seed: int = 0, estimates: MarginalEstimates | None = None,
) -> dict[str, Callable[[], Figure]]:
    """The figures of a binomial or Poisson study, keyed as :data:`GLMM_FIGURE_KEYS`: the observed proportion
    of 1s (or mean count) over time per ``group`` level for the trajectories, the fixed effects as odds or
    rate ratios, binned and randomized quantile residuals, and the observed against the mean fitted
    proportion (or count) over time beside the sampled subjects' fitted curves.

    The outcome is read from ``selected`` (μ̂ + residual, :func:`observed_response`: the 0/1 coding the fit
    used) when its rows align with ``visits``; from the outcome column otherwise.
    """
    roles = config.data
    time_label = time_axis_label(roles)
    times = visits[roles.time].to_numpy(float)
    aligned = len(selected.residuals) == len(visits) and len(selected.fitted) == len(visits)
    observed = observed_response(selected) if aligned else pd.to_numeric(visits[roles.outcome],
                                                                         errors="coerce").to_numpy(float)
    groups = visits[group].tolist() if group is not None else None
    family, outcome = selected.family, roles.outcome
    shown = outcome_scale_label(family, outcome)

    def trajectories() -> Figure:
        table = outcome_over_time(times, observed, family, groups=groups)
        return plot_outcome_over_time(table, family, outcome, group=group, time_label=time_label,
                                      title=f"Observed {shown} over time, all subjects")

    def over_time() -> Figure:
        if not aligned:
            return _message_figure("Observed and fitted over time",
                                   f"{selected.name!r} has no fitted values: {selected.message}")
        table = outcome_over_time(times, observed, family, groups=groups, fitted=selected.fitted)
        return plot_outcome_over_time(table, family, outcome, group=group, time_label=time_label,
                                      title=f"Observed and fitted {shown} over time ({_shorten(selected.name, 30)})")

    builders: dict[str, Callable[[], Figure]] = {
        "trajectories": trajectories,
        "model_comparison": lambda: plot_model_comparison(selection),
        "coefficients": lambda: plot_coefficients(selected, roles),
    }
    if estimates is not None:
        observed_visits = visits.assign(**{roles.outcome: observed})
        builders["marginal_means"] = _marginal_means_builder(estimates, observed_visits, config, family)
    return builders | {
        "random_effects": lambda: plot_random_effects(selected),
        "caterpillar": lambda: plot_caterpillar(selected),
        "binned_residuals": lambda: plot_binned_residuals(selected),
        "quantile_residuals": lambda: plot_quantile_residuals(selected, seed=seed),
        "observed_vs_fitted_over_time": over_time,
        "observed_vs_fitted": lambda: plot_observed_vs_fitted(
            visits, selected, roles.subject_key, roles.time, roles.outcome, n_subjects=n_panels, seed=seed,
            time_label=time_label, observed=observed if aligned else None),
    }


def build_figures(
    visits: pd.DataFrame, config: StudyConfig, selection: Selection, selected: Fit, *,
    fits: Sequence[Fit] = (), max_subjects: int = 200, n_panels: int = 12, seed: int = 0,
    estimates: MarginalEstimates | None = None,
) -> dict[str, Figure]:
    """Every report figure, built, keyed by its file stem in report order (see :func:`figure_builders`)."""
    builders = figure_builders(visits, config, selection, selected, fits=fits, max_subjects=max_subjects,
                               n_panels=n_panels, seed=seed, estimates=estimates)
    return {stem: build() for stem, build in builders.items()}
