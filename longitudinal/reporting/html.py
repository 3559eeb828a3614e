"""The HTML report: one self-contained page (inline CSS, figures as base64 PNG, no external resource).

:func:`render_report` builds the page from the run's records and the PNG bytes of its figures and
returns it as a string; writing it is the caller's job. It formats and computes no statistic: AICc and
the likelihood-ratio tests come with the :class:`~longitudinal.records.Selection` from the select stage. Every user-provided string (study, file,
column, candidate, formula, level and message text) is HTML-escaped. A figure missing from the
mapping is replaced by a note, never an error.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from longitudinal.inference.residuals import (
    MAX_DISTINCT_X,
    OVERDISPERSION_RATIO,
    Dispersion,
    observed_response,
    pearson_dispersion,
    ratio_effects,
)
from longitudinal.inference.visits import N_VISIT_BINS, VisitSummary, summarize_visits
from longitudinal.model.formula import parse_formula
from longitudinal.config import LINKS
from longitudinal.inference.ddf import DF_METHOD_NAMES
from longitudinal.records import (
    ExplainedVariance,
    Fit,
    LikelihoodRatioTest,
    ReportInputs,
    ResidualCovariance,
    Selection,
    Validated,
)
from longitudinal.reporting.figures import (
    ANNOTATED_VISITS,
    CATERPILLAR_LEVELS,
    QQ_POINTS,
    approximation_description,
    baseline_name,
    choose_group_column,
    family_description,
    outcome_scale_label,
    ratio_name,
    residual_correlation_kind,
    serial_diagnostic_fits,
    time_axis_label,
    with_time_unit,
)

QUARANTINE_ROWS_SHOWN = 20
#: Above this many visits, the per-visit tables show the first and last :data:`VISIT_ROWS_SHOWN` // 2.
VISIT_ROWS_SHOWN = 20
#: A share of quarantined rows above this is called out at the top of the report, not only counted.
LARGE_QUARANTINE_SHARE = 0.20


SECTIONS: tuple[tuple[str, str], ...] = (
    ("data", "1. Data summary"),
    ("validation", "2. Validation summary"),
    ("trajectories", "3. Observed trajectories"),
    ("comparison", "4. Model comparison"),
    ("selected", "5. Selected model (REML estimates)"),
    ("random-effects", "6. Random effects"),
    ("diagnostics", "7. Residual diagnostics"),
    ("observed-fitted", "8. Observed against fitted"),
    ("reproducibility", "9. Reproducibility"),
)



def section_titles(fit: Fit) -> tuple[tuple[str, str], ...]:
    """:data:`SECTIONS` with the selected model's section named by how ``fit`` was estimated: "(REML
    estimates)" for the REML refit of a linear mixed model, "(ML estimates)" for a binomial or Poisson
    model, which has no REML."""
    return tuple((anchor, f"5. Selected model ({fit.method} estimates)" if anchor == "selected" else title)
                 for anchor, title in SECTIONS)


def dispersion_of(fit: Fit) -> Dispersion | None:
    """The Pearson dispersion of a Poisson fit (:func:`~longitudinal.inference.residuals.pearson_dispersion`,
    k = ``fit.n_params``); None for another family or a fit without fitted values."""
    if fit.family != "poisson" or not len(fit.fitted) or len(fit.fitted) != len(fit.residuals):
        return None
    return pearson_dispersion(observed_response(fit), np.asarray(fit.fitted, dtype=float), fit.n_params)


def overdispersion_advice(dispersion: Dispersion) -> str:
    """The note a large Pearson ratio gets (plain text)."""
    return (f"Counts vary more than a Poisson model allows (Pearson χ²/df = {dispersion.ratio:.2f}, above "
            f"{OVERDISPERSION_RATIO:g}): standard errors are too small and p-values too optimistic. Consider an "
            "observation-level random effect (1 | obs), obs a column with one level per row, or a negative "
            "binomial model.")


def _glmm_fitted_by(fit: Fit) -> str:
    """How a binomial or Poisson fit was estimated, in words (escaped HTML)."""
    return (f"a {esc(family_description(fit.family))}, fitted by maximum likelihood with the "
            f"{esc(approximation_description(fit.nagq))}, as glmer fits it")


def _with_selected(fits: Sequence[Fit], selected: Fit) -> list[Fit]:
    """``fits`` and the selected model's reported fit, unless that fit is one of them (a binomial or Poisson
    model reports its ML fit, which is already among the candidates)."""
    same = any(f is selected or (f.name == selected.name and f.method == selected.method) for f in fits)
    return list(fits) if same else [*fits, selected]


# --------------------------------------------------------------------------------------- formatting


def esc(value: object) -> str:
    """``value`` as HTML text, with ``&``, ``<``, ``>`` and both quotes escaped."""
    return html.escape(str(value), quote=True)


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def format_number(value: object, digits: int = 4) -> str:
    """A number to ``digits`` significant digits, in plain notation unless very large or small.

    Missing values are "—"; integers are printed whole with thousands separators.
    """
    if _is_missing(value):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if -3 <= magnitude < 6:
        decimals = max(0, digits - 1 - magnitude)
        return f"{x:,.{decimals}f}"
    return f"{x:.{digits - 1}e}"


def format_fixed(value: object, decimals: int = 2) -> str:
    """A number with fixed decimals (log-likelihoods, information criteria and their differences)."""
    if _is_missing(value):
        return "—"
    x = float(value)  # type: ignore[arg-type]
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:,.{decimals}f}"


def format_p(value: object) -> str:
    """A p-value: "<0.001" below 0.001, else three decimals."""
    if _is_missing(value):
        return "—"
    p = float(value)  # type: ignore[arg-type]
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_weight(value: object) -> str:
    """An Akaike/Schwarz weight: "<0.001" below 0.001, else three decimals."""
    if _is_missing(value):
        return "—"
    w = float(value)  # type: ignore[arg-type]
    return "<0.001" if 0 < w < 0.001 else f"{w:.3f}"


def format_seconds(value: object) -> str:
    if _is_missing(value):
        return "—"
    s = float(value)  # type: ignore[arg-type]
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:,.2f} s"


def _yes_no(value: object) -> str:
    if _is_missing(value):
        return "—"
    return "yes" if bool(value) else "no"


# ------------------------------------------------------------------------------------------ HTML bits


Cell = tuple[str, str]  # (html content, css class)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, row_classes: Sequence[str] = (),
           caption: str = "") -> str:
    """An HTML table; headers are plain text, cells are already-escaped HTML with a css class."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        css = row_classes[index] if index < len(row_classes) and row_classes[index] else ""
        attr = f' class="{css}"' if css else ""
        cells = "".join(f'<td class="{c}">{content}</td>' if c else f"<td>{content}</td>" for content, c in row)
        body.append(f"<tr{attr}>{cells}</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>')
    rows_html = "".join(body)
    return (f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{rows_html}</tbody></table></div>")


def _num(text: str) -> Cell:
    return (esc(text), "num")


def _txt(value: object) -> Cell:
    return (esc(value), "")


def _code(value: object) -> Cell:
    return (f"<code>{esc(value)}</code>", "")


def _figure(figures: Mapping[str, bytes], key: str, caption: str) -> str:
    """An embedded PNG with its caption, or a note saying the figure was not produced."""
    png = figures.get(key)
    if not png:
        return f'<p class="note">Figure <code>{esc(key)}</code> was not produced for this run.</p>'
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{esc(key)}"><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def _dl(items: Sequence[tuple[str, str]]) -> str:
    """A key/value list; values are already-escaped HTML."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


# ------------------------------------------------------------------------------------------ sections


def _candidate_count(fits: Sequence[Fit]) -> tuple[int, int]:
    return len(fits), sum(1 for f in fits if f.usable)


def _fit_notes(fit: Fit) -> tuple[str, ...]:
    """The notes of a completed fit (lme4's messages: dropped columns, scales, singular, convergence)."""
    return tuple(note for note in fit.message.split("; ") if note) if fit.usable else ()


def _accounting_sentence(validated: Validated) -> str:
    read, analysed, quarantined = validated.rows_read, validated.rows_analysed, validated.rows_quarantined
    holds = read == analysed + quarantined
    sentence = (f"Rows read = rows analysed + rows quarantined: {read:,} = {analysed:,} + {quarantined:,}.")
    if holds:
        return f'<p class="accounting">{esc(sentence)}</p>'
    return (f'<p class="accounting warning">{esc(sentence)} This does not add up '
            f"({read - analysed - quarantined:+,} rows unaccounted for): do not use these results.</p>")


def _large_quarantine_warning(validated: Validated) -> str:
    """A sentence (escaped HTML) when more than :data:`LARGE_QUARANTINE_SHARE` of the rows read were
    quarantined: the analysis then rests on a selected part of the data, which a reader must know first."""
    if not validated.rows_read or validated.rows_quarantined <= LARGE_QUARANTINE_SHARE * validated.rows_read:
        return ""
    share = validated.rows_quarantined / validated.rows_read
    reasons = validated.quarantine["reason"].astype(str) if "reason" in validated.quarantine else None
    top = ""
    if reasons is not None and len(reasons):
        counts = reasons.value_counts()
        top = f"; the most common reason ({counts.iloc[0]:,} rows): {esc(counts.index[0])}"
    return (f"{share:.0%} of the rows read were quarantined ({validated.rows_quarantined:,} of "
            f"{validated.rows_read:,}){top}. Results describe the remaining rows only: check the reasons in "
            "section 1 before relying on them.")


def _summary(inputs: ReportInputs, per_subject: np.ndarray) -> str:
    selection, selected, validated = inputs.selection, inputs.selected, inputs.validated
    n_total, n_usable = _candidate_count(inputs.fits)
    subjects = len(per_subject)
    criterion = selection.criterion.upper()
    warned = [f.name for f in inputs.fits if f.usable and not f.converged]
    verdict = f"{n_usable} gave a valid likelihood" if n_usable != n_total else (
        "all gave a valid likelihood" if n_total > 1 else "it gave a valid likelihood")
    if warned:
        verdict += (f" ({len(warned)} with a convergence warning, kept in the comparison as lme4 keeps it: "
                    f"{esc(', '.join(warned))})")
    parts = [
        f"Of {n_total} candidate model{'s' if n_total != 1 else ''} fitted by maximum likelihood, "
        f"{verdict}; <strong>{esc(selection.selected)}</strong> "
        f"(<code>{esc(selected.formula)}</code>) was selected as the one with the lowest {esc(criterion)}.",
        (f"It is {_glmm_fitted_by(selected)}; a generalized linear mixed model has no REML, so the estimates "
         "below are from that fit, its fixed effects on the "
         f"{'log-odds' if selected.family == 'binomial' else 'log'} scale and as "
         f"{esc(ratio_name(selected.family))}s." if selected.family != "gaussian" else
         "Its estimates below come from a REML refit of that formula.")
        + (f" Its residual covariance within subjects is {esc(selected.covariance.description)} "
           f"(<code>{esc(selected.covariance.term)}</code>)." if selected.covariance is not None else ""),
        f"The analysis used {validated.rows_analysed:,} rows from {subjects:,} subjects; "
        + (f"{validated.rows_quarantined:,} of the {validated.rows_read:,} rows read were quarantined "
           "and are listed with their reasons in section 1." if validated.rows_quarantined
           else f"none of the {validated.rows_read:,} rows read was quarantined."),
    ]
    large = _large_quarantine_warning(validated)
    if large:
        parts.append(f'<span class="warning-text">{large}</span>')
    if selected.singular:
        parts.append('<span class="warning-text">The selected fit is singular (a random-effect variance at '
                     "or near zero, or a correlation near ±1): see section 5.</span>")
    if selected.dropped_terms:
        parts.append(f'<span class="warning-text">Collinear fixed-effect column{"s" if len(selected.dropped_terms) > 1 else ""} '
                     f"dropped from the selected model: {esc(', '.join(selected.dropped_terms))} (see section 5).</span>")
    if validated.warnings:
        parts.append(f'<span class="warning-text">Validation found {len(validated.warnings)} thing'
                     f'{"s" if len(validated.warnings) > 1 else ""} to check (section 2): '
                     f"{esc(validated.warnings[0])}</span>")
    dispersion = dispersion_of(selected)
    if dispersion is not None and dispersion.overdispersed:
        parts.append(f'<span class="warning-text">{esc(overdispersion_advice(dispersion))} See section 5.</span>')
    if not selected.converged:
        which = "The REML refit" if selected.family == "gaussian" else "The selected fit"
        parts.append(f'<span class="warning-text">{which} did not converge: {esc(selected.message)}</span>')
    return f'<section id="summary"><h2>Summary</h2><p>{" ".join(parts)}</p></section>'


def visits_per_subject(visits: pd.DataFrame, subject: str) -> np.ndarray:
    """The number of rows of each subject (missing ids not counted), from one hash pass over the ids.

    Computed once per report: the summary and the data section both need it, and at millions of rows
    a grouping by a text column is the report's costliest table work.
    """
    if subject not in visits or not len(visits):
        return np.zeros(0, dtype=np.int64)
    codes, _ = pd.factorize(visits[subject], use_na_sentinel=True)
    counts = np.bincount(codes[codes >= 0])
    return counts[counts > 0]


def _data_section(inputs: ReportInputs, per_subject: np.ndarray) -> str:
    cfg, validated = inputs.config, inputs.validated
    visits = validated.visits
    roles = cfg.data
    time = pd.to_numeric(visits[roles.time], errors="coerce") if roles.time in visits else pd.Series(dtype=float)
    visits_text = (f"{int(per_subject.min()):,} / {float(np.median(per_subject)):g} / {int(per_subject.max()):,}"
                   if len(per_subject) else "—")
    facts = _dl([
        ("Subjects analysed", esc(f"{len(per_subject):,}")),
        ("Rows read", esc(f"{validated.rows_read:,}")),
        ("Rows analysed", esc(f"{validated.rows_analysed:,}")),
        ("Rows quarantined", esc(f"{validated.rows_quarantined:,}")),
        ("Visits per subject (min / median / max)", esc(visits_text)),
        (f"Time range ({time_axis_label(roles)})", esc(f"{time.min():.6g} to {time.max():.6g}")
         if time.notna().any() else "—"),
        ("Columns", esc(f"subject {' × '.join(roles.subject_columns)}, time {roles.time}, outcome {roles.outcome}")
         + (esc(f", categorical {', '.join(roles.categorical)}") if roles.categorical else "")),
    ])
    files = _table(
        ["File", "sha256 (first 12)", "Rows"],
        [[_code(f.path), _code(f.sha256[:12]), _num(f"{f.rows:,}")] for f in inputs.files],
    )
    quarantine = validated.quarantine
    if len(quarantine) and "reason" in quarantine:
        counts = quarantine["reason"].astype(str).value_counts()
        reasons = _table(["Reason", "Rows"], [[_txt(r), _num(f"{n:,}")] for r, n in counts.items()])
    else:
        reasons = '<p class="note">No row was quarantined.</p>'
    shown = _quarantine_preview(quarantine)
    large = _large_quarantine_warning(validated)
    notes = "".join(f'<p class="note">{esc(note[0].upper() + note[1:])}.</p>' for note in validated.notes)
    return "\n".join([
        _accounting_sentence(validated), *([f'<p class="warning">{large}</p>'] if large else []), facts, notes,
        _visit_tables(inputs),
        "<h3>Input files</h3>", files,
        "<h3>Quarantined rows by reason</h3>", reasons,
        shown,
    ])


def _visit_tables(inputs: ReportInputs) -> str:
    """The "Per visit" and "Dropout pattern" tables (:func:`~longitudinal.inference.visits.summarize_visits`),
    split by the group column the trajectories figure uses."""
    roles = inputs.config.data
    visits = inputs.validated.visits
    group = choose_group_column(visits, inputs.selected.formula,
                                exclude=(*roles.subject_columns, roles.subject_key, roles.time, roles.outcome))
    summary = summarize_visits(visits, roles.subject_columns, roles.time, roles.outcome, group)
    binomial = inputs.selected.family == "binomial" or inputs.config.models.family == "binomial"
    if summary.binned:
        visit_note = (f"Time has {summary.n_times:,} distinct values, so each row is one of {N_VISIT_BINS} quantile "
                      "bins of time (tied times share a bin), labelled by the range of times in it.")
    else:
        visit_note = "Each row is one distinct time."
    split = (f"per level of {esc(group)} (the grouping of the trajectories figure)" if group is not None
             else "over all subjects")
    mean_what = (f"the proportion of rows with {esc(roles.outcome)} = 1" if binomial
                 else f"the mean (SD) of {esc(roles.outcome)} over the rows")
    per_visit = (f"<h3>Per visit</h3><p>Subjects observed at each visit and {mean_what}, {split}. "
                 f"{esc(visit_note)}</p>" + _per_visit_table(summary, roles.time, binomial, time_axis_label(roles)))
    dropout = ("<h3>Dropout pattern</h3><p>Subjects last seen at each visit (a subject who missed visits in between "
               "counts at its last one), and the subjects still observed then or later, as a number and a share "
               f"of the group's subjects, {split}."
               + (" A share falling faster in one group than another means that group's later means describe "
                  "the subjects who stayed." if len(summary.groups) > 1 else "") + "</p>"
               + _dropout_table(summary, time_axis_label(roles)))
    return per_visit + dropout


def _visit_label(summary: VisitSummary) -> list[str]:
    """Each visit as text: its time, or the range of times of a bin."""
    labels = []
    for low, high in zip(summary.visits["time_low"], summary.visits["time_high"], strict=True):
        labels.append(f"{low:.6g}" if low == high else f"{low:.6g} to {high:.6g}")
    return labels


def _group_headers(groups: Sequence[str], columns: Sequence[str]) -> list[str]:
    """Column headers per group ("arm A: subjects", ...), or the columns alone for a single group."""
    if len(groups) == 1:
        return list(columns)
    return [f"{g}: {c}" for g in groups for c in columns]


def _shown_visits(rows: list[list[Cell]], headers: Sequence[str], caption: str) -> str:
    """A visit table, with the first and last :data:`VISIT_ROWS_SHOWN` // 2 rows when there are more."""
    if len(rows) <= VISIT_ROWS_SHOWN:
        return _table(headers, rows, caption=caption)
    half = VISIT_ROWS_SHOWN // 2
    gap: list[Cell] = [("…", "na"), *[("", "")] * (len(headers) - 1)]
    note = (f'<p class="note">{len(rows):,} visits: showing the first {half} and the last {half}.</p>')
    return note + _table(headers, [*rows[:half], gap, *rows[-half:]], caption=caption)


def _per_visit_table(summary: VisitSummary, time: str, binomial: bool, time_label: str) -> str:
    cells = summary.per_visit.set_index(["visit", "group"])
    mean_header = "proportion of 1s" if binomial else "mean (SD)"
    headers = [f"Visit ({time_label})", *_group_headers(summary.groups, ["subjects", mean_header])]
    rows: list[list[Cell]] = []
    for visit, label in zip(summary.visits["visit"], _visit_label(summary), strict=True):
        row: list[Cell] = [_num(label)]
        for g in summary.groups:
            cell = cells.loc[(visit, g)]
            if binomial or _is_missing(cell["mean"]):
                mean = format_fixed(cell["mean"], 3) if binomial else "—"
            else:
                mean = f"{format_number(cell['mean'])} ({format_number(cell['sd'])})"
            row += [_num(f"{int(cell['subjects']):,}"), _num(mean)]
        rows.append(row)
    return _shown_visits(rows, headers, f"Subjects and outcome per visit of {time}")


def _dropout_table(summary: VisitSummary, time_label: str) -> str:
    cells = summary.dropout.set_index(["visit", "group"])
    headers = [f"Visit ({time_label})", *_group_headers(summary.groups, ["last seen", "still observed"])]
    rows: list[list[Cell]] = []
    for visit, label in zip(summary.visits["visit"], _visit_label(summary), strict=True):
        row: list[Cell] = [_num(label)]
        for g in summary.groups:
            cell = cells.loc[(visit, g)]
            share = cell["share_still_observed"]
            still = f"{int(cell['still_observed']):,}" + ("" if _is_missing(share) else f" ({float(share):.0%})")
            row += [_num(f"{int(cell['last_seen']):,}"), _num(still)]
        rows.append(row)
    return _shown_visits(rows, headers, "Subjects last seen at each visit")


def _quarantine_preview(quarantine: pd.DataFrame) -> str:
    """The first rows of the quarantine table as read, source file, line and reason first."""
    if quarantine.empty:
        return ""
    first = [c for c in ("source_file", "source_line", "reason") if c in quarantine]
    columns = first + [c for c in quarantine.columns if c not in first]
    head = quarantine.head(QUARANTINE_ROWS_SHOWN)
    rows = []
    for _, record in head[columns].iterrows():
        cells: list[Cell] = []
        for column in columns:
            value = record[column]
            if _is_missing(value):
                cells.append(('<span class="na">NA</span>', ""))
            elif isinstance(value, str) and not value.strip():
                cells.append(('<span class="na">(empty)</span>', ""))
            elif column == "source_line":
                cells.append(_num(str(value)))
            else:
                cells.append(_txt(value))
        rows.append(cells)
    more = len(quarantine) - len(head)
    note = (f'<p class="note">Showing the first {len(head):,} of {len(quarantine):,} quarantined rows; '
            "all are in <code>quarantine.csv</code>.</p>") if more > 0 else \
        '<p class="note">All quarantined rows, as read; they are also in <code>quarantine.csv</code>.</p>'
    return "<h3>Quarantined rows</h3>" + note + _table([str(c) for c in columns], rows)


def _validation_section(inputs: ReportInputs) -> str:
    validated = inputs.validated
    rows, classes = [], []
    for outcome in validated.expectations:
        status = ('<span class="pass">pass</span>' if outcome.success else (
            '<span class="warning-text">warning</span>' if outcome.level == "warning" else '<span class="fail">fail</span>'), "")
        rows.append([
            _txt(outcome.name), _txt(outcome.level), _txt(outcome.column or "—"), status,
            _num(f"{outcome.unexpected_count:,}"), _txt(outcome.description), _txt(outcome.details),
        ])
        classes.append("" if outcome.success else "failed")
    n_fail = sum(1 for e in validated.expectations if not e.success)
    verdict = ("All table-level checks passed, so the run went on." if validated.success
               else "A table-level check failed.")
    intro = (f"<p>{len(validated.expectations)} checks, {n_fail} with findings. {verdict} A failing "
             "<em>table</em>-level check stops the run; a failing <em>row</em>-level check quarantines the rows "
             "it counts and the run goes on; a <em>warning</em> changes nothing but asks a person to look.</p>")
    intro += "".join(f'<p class="warning">{esc(w)}</p>' for w in validated.warnings)
    table = _table(["Expectation", "Level", "Column", "Result", "Rows", "Description", "Details"], rows,
                   row_classes=classes)
    return intro + table


def _comparison_section(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    selection = inputs.selection
    table = selection.table
    n_obs = inputs.validated.rows_analysed
    aicc = selection.aicc
    structured = any(_has_structure(f.formula, f.covariance) for f in inputs.fits)
    by_name = {f.name: f for f in inputs.fits}
    headers = ["Model", "Formula", *(["Covariance"] if structured else []), "Fit", "k", "logLik", "AIC", "AICc",
               "BIC", "ΔAIC", "ΔBIC", "AIC weight", "BIC weight"]
    rows, classes = [], []
    for _, row in table.iterrows():
        chosen = str(row.get("model")) == selection.selected
        fit = by_name.get(str(row.get("model")))
        covariance = _txt(describe_covariance(str(row.get("formula", "")), fit.covariance if fit else None))
        rows.append([
            (f'<strong>{esc(row.get("model"))}</strong><br><span class="chosen">✔ selected</span>' if chosen
             else esc(row.get("model")), ""),
            (f"<code>{esc(row.get('formula', ''))}</code>", "formula"),
            *([covariance] if structured else []),
            _fit_status(row.get("converged"), row.get("singular"), row.get("loglik")),
            _num(format_number(_as_int(row.get("n_params")))),
            _num(format_fixed(row.get("loglik"))),
            _num(format_fixed(row.get("aic"))),
            _num(format_fixed(aicc.get(str(row.get("model")), math.nan))),
            _num(format_fixed(row.get("bic"))),
            _num(format_fixed(row.get("delta_aic"))),
            _num(format_fixed(row.get("delta_bic"))),
            _num(format_weight(row.get("aic_weight"))),
            _num(format_weight(row.get("bic_weight"))),
        ])
        classes.append("selected" if chosen else ("failed" if _is_missing(row.get("loglik")) else ""))
    family = inputs.selected.family
    if family != "gaussian":
        fitted_as = (f"All candidates are {esc(family_description(family, plural=True))}, fitted by maximum likelihood with "
                     f"the {esc(approximation_description(inputs.selected.nagq))} as glmer fits them, on the same "
                     f"{n_obs:,} rows. AIC = −2 logLik + 2k and BIC = −2 logLik + k·ln(n), with glmer's logLik "
                     "and k counted as lme4 counts it for glmer: k = fixed effects + random-effect (co)variance "
                     f"parameters, with no residual variance (a {esc(family)} outcome's variance is set by its "
                     "mean)")
    else:
        fitted_as = (f"All candidates were fitted by maximum likelihood (ML) on the same {n_obs:,} rows; REML "
                     "likelihoods are not comparable across different fixed effects. AIC = −2 logLik + 2k and "
                     "BIC = −2 logLik + k·ln(n), counting as lme4 does: k = fixed effects + random-effect "
                     "(co)variance parameters + 1 residual variance")
    explain = (
        f"<p>{fitted_as}, and n = {n_obs:,} rows analysed (not subjects). "
        "Δ is the difference from the best candidate; weights are exp(−Δ/2) normalised over the "
        "candidates with a valid likelihood (a fit with a convergence warning competes, as lme4 keeps it; "
        f"only a failed fit is left out). The selection criterion was <strong>{esc(selection.criterion.upper())}</strong>"
        "; ties go to the candidate with fewer parameters. AICc = AIC + 2k(k + 1)/(n − k − 1), the "
        "small-sample correction (Hurvich &amp; Tsai 1989), is shown for reference and not used in the "
        "selection; it departs from AIC only when n is not much larger than k.</p>"
    )
    if structured:
        explain += (
            "<p>For a candidate with a residual covariance structure (<code>us(visit | id)</code>, "
            "<code>ar1(t | id)</code>, ...), k = fixed effects + random-effect (co)variance parameters + the "
            "structure's parameters, its variances included, as nlme's and mmrm's logLik df count; so its AIC "
            "and BIC compare with those of the other candidates on the same rows. The Covariance column says "
            "what correlates a subject's measurements in each candidate: random effects, a structured residual "
            "covariance, or both.</p>")
    failed = [f for f in inputs.fits if not f.usable]
    failed_html = ""
    if failed:
        items = "".join(f"<li><strong>{esc(f.name)}</strong> (<code>{esc(f.formula)}</code>): "
                        f"{esc(f.message or 'did not converge')}</li>" for f in failed)
        failed_html = f'<h3>Candidates that failed</h3><ul class="failed-list">{items}</ul>'
    noted = [f for f in inputs.fits if _fit_notes(f)]
    if noted:
        items = "".join(f"<li><strong>{esc(f.name)}</strong>: {esc('; '.join(_fit_notes(f)))}</li>" for f in noted)
        failed_html += f'<h3>Notes on the fits</h3><ul class="notes-list">{items}</ul>'
    chart = _figure(figures, "model_comparison",
                    "ΔAIC and ΔBIC of each candidate from the best one (ML fits); the selected model is "
                    "highlighted, failed candidates are marked.")
    return "\n".join([
        explain, _table(headers, rows, row_classes=classes), failed_html, chart,
        "<h3>Likelihood-ratio tests between nested candidates</h3>", _lrt_block(selection),
        "<h3>Fit diagnostics per candidate</h3>",
        _diagnostics_block(_with_selected(inputs.fits, inputs.selected), inputs.selected),
    ])


def _fit_status(converged: object, singular: object, loglik: object) -> Cell:
    """"failed" (no valid likelihood), "singular" (on the boundary), "convergence warning" (lme4's checks
    not met: kept in the comparison, as lme4 keeps it) or "converged", for the comparison table."""
    if _is_missing(loglik):
        return ("failed", "")
    if not _is_missing(singular) and bool(singular):
        return ('<span class="warning-text">singular</span>', "")
    if _is_missing(converged) or not bool(converged):
        return ('<span class="warning-text">convergence warning</span>', "")
    return ("converged", "")


def _lrt_block(selection: Selection) -> str:
    """The likelihood-ratio table with its interpretation, or a note saying why there is none."""
    if selection.tests_refused:
        return f'<p class="warning">No likelihood-ratio test: {esc(selection.tests_refused)}</p>'
    tests = selection.tests
    if not tests:
        return ('<p class="note">No candidate is a special case of another (same response and rows, fixed '
                "effects a subset, random effects contained), so no likelihood-ratio test applies; AIC and BIC "
                "above compare non-nested candidates.</p>")
    rows = [[
        _txt(t.smaller), _txt(t.larger), _txt(_additions(t)), _num(f"{t.df:,}"),
        _num(format_fixed(t.statistic)) if t.tested else _txt("—"),
        _num(format_p(t.p_value)) if t.tested else _txt("no test"), (esc(t.test), "nowrap"),
    ] for t in tests]
    classes = ["failed" if math.isnan(t.p_value) else "" for t in tests]
    intro = ("<p>Each row asks whether the larger candidate fits better than the smaller one it contains: "
             "a small p-value (below 0.05, say) means the data support the parameters the larger model adds, "
             "a large one that the smaller model is adequate. The tests complement the information criteria "
             "above, which made the selection; BIC can still prefer the smaller model when p is small, since "
             "it charges more for each parameter.</p>")
    table = _table(["Smaller", "Larger", "Larger model adds", "Δdf", "LR = 2ΔlogLik", "p", "Reference distribution"],
                   rows, row_classes=classes)
    notes = ["LR = 2 (logLik<sub>larger</sub> − logLik<sub>smaller</sub>) from the ML fits, as a test of "
             "different fixed effects requires; Δdf is the difference in k."]
    if any(t.reference == "mixture" for t in tests):
        notes.append("When the larger model adds one random-effect term, that term's variance is zero under the "
                     "smaller model, on the boundary of its range, and a plain χ²(Δdf) p-value would be too large: "
                     "p comes from the 50:50 mixture of χ²(Δdf − 1) and χ²(Δdf) (Self &amp; Liang 1987; "
                     "Stram &amp; Lee 1994).")
    if any(t.reference == "chi2-conservative" for t in tests):
        notes.append("When the larger model adds several random-effect terms, the null distribution is a mixture "
                     "with more components; the χ²(Δdf) p-value shown is an upper bound (conservative).")
    if not any(t.reference != "chi2" for t in tests):
        notes.append("No test puts a variance on its boundary, so every p-value is from χ²(Δdf).")
    if any(t.fixed_differ for t in tests):
        notes.append("Likelihood-ratio tests of fixed effects on ML fits are somewhat liberal when subjects are few.")
    short = [t for t in tests if t.tested and math.isnan(t.p_value)]
    warning = "".join(
        f'<p class="warning">{esc(t.smaller)} against {esc(t.larger)}: {esc(t.notes[-1])}.</p>' for t in short)
    warning += "".join(
        f'<p class="warning">{esc(t.smaller)} against {esc(t.larger)}: '
        f"{esc(next((n for n in t.notes if n.startswith('no test')), 'no test'))}.</p>"
        for t in tests if not t.tested)
    return intro + table + f'<p class="note">{" ".join(notes)}</p>' + warning


def _additions(test: LikelihoodRatioTest) -> str:
    """What the larger model of a test adds, in a few words."""
    parts = []
    if test.added_fixed:
        parts.append(f"fixed {', '.join(test.added_fixed)}")
    if test.boundary_terms:
        parts.append(("variance of " if len(test.boundary_terms) == 1 else "variances of ")
                     + " and ".join(test.boundary_terms))
    if test.added_covariances:
        parts.append(f"{test.added_covariances} random-effect covariance{'s' if test.added_covariances > 1 else ''}")
    if test.residual_change:
        parts.append(f"residual covariance {test.residual_change}")
    return "; ".join(parts) or "—"


def _diagnostics_block(fits: Sequence[Fit], selected: Fit) -> str:
    """One row per fit: engine, optimizer, evaluations, gradient and the convergence verdicts."""
    headers = ["Candidate", "Method", "Engine", "Optimizer", "Evaluations", "max |gradient|", "Converged",
               "Singular", "Message"]
    rows, classes = [], []
    for fit in fits:
        label = f"{fit.name} (refit)" if fit is selected and fit.method == "REML" else fit.name
        rows.append([
            _txt(label), _txt(fit.method), _txt(fit.engine or "—"), _txt(fit.optimizer or "—"),
            _num(format_number(fit.iterations) if fit.iterations else "—"),
            _num(format_number(fit.gradient_max, 3)),
            _txt(_yes_no(fit.converged)),
            ('<span class="warning-text">yes</span>' if fit.singular else "no", ""),
            _txt(fit.message or "—"),
        ])
        classes.append("failed" if not fit.usable else ("singular" if fit.singular or not fit.converged else ""))
    note = ('<p class="note">Evaluations: objective evaluations over all optimizer runs (the lme4-style engine '
            "optimizes the profiled deviance with derivative-free BOBYQA; for statsmodels, iterations). "
            "max |gradient| is lme4's convergence measure: the largest absolute gradient of the deviance with "
            "respect to the covariance parameters at the optimum (scaled by the Hessian where that is smaller; "
            "finite differences; parameters on the boundary left out); lme4 warns above 0.002. Singular: a "
            "random-effect variance at or near zero, or a correlation near ±1, the boundary of the parameter "
            "space; the fit is still valid and comparable, "
            "but the data do not support that part of the random-effects structure. Each optimizer attempt is "
            'listed under <a href="#reproducibility">Reproducibility</a>.</p>')
    if any(fit.covariance is not None for fit in fits):
        note += ('<p class="note">A candidate with a covariance structure is fitted by BFGS on the analytic '
                 "gradient of its log-likelihood (β, and σ² where the structure has one, profiled out); its max "
                 "|gradient| is over the structure's parameters on their optimization scale (log SDs, "
                 "correlations mapped to the real line, Cholesky factors) and passes below 0.001. Where the "
                 "likelihood can have two maxima (AR(1) next to random effects, sp_exp's range) a second start "
                 "runs; each run is an attempt under Reproducibility.</p>")
    if any(fit.family != "gaussian" for fit in fits):
        note += ('<p class="note">A binomial or Poisson candidate is fitted as glmer fits it: penalized '
                 "iteratively reweighted least squares (PIRLS) finds the conditional modes of the random effects "
                 "inside the Laplace (or adaptive Gauss–Hermite) deviance, which BOBYQA minimizes over the "
                 "covariance parameters and then over them and the fixed effects together. Such a model has no "
                 "REML: the selected model is reported from its ML fit, listed once above.</p>")
    return _table(headers, rows, row_classes=classes) + note


def _as_int(value: object) -> object:
    if _is_missing(value):
        return value
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return value


def _selected_section(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    fit = inputs.selected
    parts = []
    if not fit.converged:
        which = "The REML refit" if fit.family == "gaussian" else "The selected fit"
        parts.append(f'<p class="warning">{which} did not pass lme4\'s convergence checks: {esc(fit.message)}</p>')
    if fit.singular:
        which = next((n for n in fit.message.split("; ") if n.startswith("boundary (singular) fit")), "")
        parts.append('<p class="warning"><strong>Singular fit.</strong> '
                     + (esc(which[0].upper() + which[1:]) + ". " if which else
                        "A random-effect standard deviation is at or near zero, or a correlation is near ±1. ")
                     + "The data do not support this part of the random-effect structure: consider a simpler "
                     "one (drop that term, or its correlation with <code>||</code>).</p>")
    if fit.dropped_terms:
        parts.append(f'<p class="warning"><strong>Collinear fixed effects.</strong> The fixed-effect model matrix '
                     f"is rank deficient, so {len(fit.dropped_terms)} column{'s were' if len(fit.dropped_terms) > 1 else ' was'} "
                     f"dropped, as lme4 drops {'them' if len(fit.dropped_terms) > 1 else 'it'}: "
                     f"<code>{esc(', '.join(fit.dropped_terms))}</code> (a linear combination of the columns "
                     "before it). k counts the columns kept.</p>")
    other_notes = [n for n in fit.message.split("; ") if n and not n.startswith("boundary (singular) fit")
                   and "rank deficient" not in n] if fit.converged else []
    if other_notes:
        parts.append(f'<p class="note">Notes on this fit: {esc("; ".join(other_notes))}.</p>')
    if fit.family != "gaussian":
        parts.append(_glmm_selected_block(inputs, fit, figures))
        return "\n".join(parts)
    parts.append(_dl([
        ("Model", f"<strong>{esc(fit.name)}</strong>"),
        ("Formula", f"<code>{esc(fit.formula)}</code>"),
        ("Method", esc(f"{fit.method} (engine {fit.engine})")),
        ("Observations", esc(f"{fit.n_obs:,}")),
        ("Groups (subjects)", esc(f"{fit.n_subjects:,}")),
        ("Time", esc(time_axis_label(inputs.config.data))),
        ("REML criterion at convergence", esc(format_fixed(fit.reml_criterion))),
        *([("Residual covariance", f"{esc(fit.covariance.description)} (<code>{esc(fit.covariance.term)}</code>)")]
          if fit.covariance is not None else []),
        ("Residual SD", esc("per visit (see the residual covariance below)"
                            if fit.covariance is not None and fit.covariance.heterogeneous
                            else format_number(fit.residual_sd))),
        *_explained_variance_rows(inputs.explained),
    ]))
    parts.append("<h3>Fixed effects</h3>")
    parts.append(_fixed_effects_table(fit, inputs))
    parts.append(f'<p class="note">{esc(df_sentence(fit, inputs.df_used, inputs.config.models.df))}</p>')
    parts.append(_figure(figures, "coefficients", f"Fixed-effect estimates with {interval_name(fit)} 95% "
                         "confidence intervals; the dashed line marks zero."))
    parts.append(_estimates_block(inputs, figures))
    parts.append("<h3>Random effects</h3>")
    if fit.random_effects or fit.covariance is None:
        parts.append(_variance_components_table(fit, "SD"))
    else:
        parts.append('<p class="note">None: a subject\'s measurements are correlated through the residual '
                     "covariance alone (below).</p>")
    parts.append(_correlations_table(fit))
    if fit.covariance is not None:
        parts.append(_covariance_block(fit, fit.covariance, figures))
    return "\n".join(parts)


def profile_note(fit: Fit) -> str:
    """What the profile-likelihood intervals of the variance components are, for this fit's criterion."""
    bounds = ("A lower bound of 0 (or a correlation's bound at ±1) means the data cannot exclude that value.")
    if fit.method != "REML":
        return ("Intervals of the SDs and correlations are profile-likelihood 95% intervals, as lme4's "
                "confint(method = \"profile\"): the values at which the deviance rises by 3.84 above its minimum, "
                "the other parameters re-estimated at each value. " + bounds)
    return ("Intervals of the SDs and correlations are profile-likelihood 95% intervals: the values at which the "
            "REML criterion of the fit rises by 3.84 above its minimum, the other parameters re-estimated at each "
            "value, so each interval contains the estimate shown. lme4's confint(method = \"profile\") refits a "
            "REML fit by ML first, so its intervals for this model are those of the ML fit (slightly narrower "
            "for the SDs); MixedModels.jl profiles the REML criterion, as here. " + bounds)


def interval_name(fit: Fit) -> str:
    """How the fixed effects' intervals were computed, in a word or two ("t (Satterthwaite df)", "Wald")."""
    finite = [fe.df for fe in fit.fixed_effects if math.isfinite(fe.df)]
    return "t-based" if finite else "Wald"


def df_sentence(fit: Fit, method: str, asked: str | None = None) -> str:
    """What the fixed-effect table's tests are, naming the df ``method`` used and what it means for the reader
    (and, when the study ``asked`` for another that could not be computed, that it fell back)."""
    if asked is not None and asked != method:
        return (f"Wald inference: the df by {DF_METHOD_NAMES.get(asked, asked)} (models.df: {asked}) could not be "
                "computed for this model (the notes on this fit say why), so z = estimate / SE, 95% CI = estimate ± "
                "1.96 SE and two-sided p-values from the normal distribution. These are liberal when subjects "
                "are few.")
    if not any(math.isfinite(fe.df) for fe in fit.fixed_effects):
        if fit.family != "gaussian":
            return ("Wald inference, as glmer's summary: z = estimate / SE, 95% CI = estimate ± 1.96 SE and two-sided "
                    "p-values from the normal distribution (a generalized linear mixed model has no small-sample "
                    "df correction).")
        return ("Wald inference (models.df: normal): z = estimate / SE, 95% CI = estimate ± 1.96 SE and two-sided "
                "p-values from the normal distribution. Without a degrees-of-freedom correction these are liberal "
                "when subjects are few; models.df: satterthwaite or kenward-roger corrects them.")
    structured = fit.covariance is not None
    how = {
        "satterthwaite": ("Satterthwaite's denominator degrees of freedom, as mmrm computes them for a residual "
                          "covariance structure" if structured else
                          "Satterthwaite's denominator degrees of freedom, as lmerTest computes them"),
        "kenward-roger": ("Kenward–Roger's denominator degrees of freedom and adjusted standard errors, in the "
                          "linear form mmrm calls Kenward-Roger-Linear (SAS's KR(LINEARCOVARIANCE))" if structured else
                          "Kenward–Roger's denominator degrees of freedom and adjusted standard errors, as pbkrtest "
                          "computes them"),
        "residual": "the residual degrees of freedom (observations minus fixed effects)",
    }.get(method, method)
    return (f"t tests with {how}: t = estimate / SE, 95% CI = estimate ± t(df, 0.975) SE and two-sided p-values "
            "from the t distribution with the df shown (models.df). With few subjects the df are far below the "
            "number of observations, and the intervals are wider than Wald's.")


def _fixed_effects_table(fit: Fit, inputs: ReportInputs) -> str:
    """Estimate, SE, 95% CI, df (when t-based), t or z, p for each fixed effect of a Gaussian model."""
    t_based = any(math.isfinite(fe.df) for fe in fit.fixed_effects)
    rows = [[
        _code(with_time_unit(fe.term, inputs.config.data)), _num(format_number(fe.estimate)),
        _num(format_number(fe.std_error)), _num(_interval(fe.ci_low, fe.ci_high)),
        *([_num(format_fixed(fe.df, 1))] if t_based else []), _num(format_fixed(fe.z, 2)), _num(format_p(fe.p_value)),
    ] for fe in fit.fixed_effects]
    return _table(["Term", "Estimate", "SE", "95% CI", *(["df"] if t_based else []), "t" if t_based else "z", "p"],
                  rows)


def _ratio_meaning(scale: str, outcome: str) -> str:
    """What a GLMM contrast's ratio compares, in words."""
    if scale == "probability":
        return f"the odds that {outcome} = 1 in the level over those in the reference level"
    return f"the level's mean count of {outcome} over the reference level's"


def _grid_value(value: object) -> str:
    """A value of the reference grid as given in ``estimates.at``: whole numbers without decimals."""
    number = float(value)  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() else format_number(number)


def _interval(low: float, high: float) -> str:
    return f"{format_number(low)} to {format_number(high)}" if math.isfinite(low) and math.isfinite(high) else "–"


def _variance_components_table(fit: Fit, sd_header: str) -> str:
    """The random-effect SDs and variances (and a Gaussian model's residual, unless a covariance structure takes
    its place), with their profile intervals and the note on them when they were computed."""
    profiled = _has_profile(fit)
    entries = [(vc.group, vc.term, vc.sd, vc.ci_low, vc.ci_high) for vc in fit.random_effects]
    if fit.family == "gaussian" and fit.covariance is None:
        low, high = fit.residual_sd_ci if fit.residual_sd_ci is not None else (math.nan, math.nan)
        entries.append(("Residual", "", fit.residual_sd, low, high))
    rows = [[_txt(group), _code(term) if term else _txt(""), _num(format_number(sd)),
             *([_num(_interval(low, high))] if profiled else []), _num(format_number(sd ** 2))]
            for group, term, sd, low, high in entries]
    table = _table(["Group", "Term", sd_header, *(["95% CI (profile)"] if profiled else []), "Variance"], rows)
    return table + (f'\n<p class="note">{esc(profile_note(fit))}</p>' if profiled else "")


def _has_profile(fit: Fit) -> bool:
    return fit.residual_sd_ci is not None or any(math.isfinite(vc.ci_low) for vc in fit.random_effects)


def _correlations_table(fit: Fit) -> str:
    """The random-effect correlations, with their profile intervals when computed ("" without correlations)."""
    if not fit.correlations:
        return ""
    profiled = any(math.isfinite(c.ci_low) for c in fit.correlations)
    rows = [[_txt(c.group), _code(c.term1), _code(c.term2), _num(format_fixed(c.corr, 3)),
             *([_num(f"{format_fixed(c.ci_low, 3)} to {format_fixed(c.ci_high, 3)}"
                     if math.isfinite(c.ci_low) else "–")] if profiled else [])]
            for c in fit.correlations]
    return ("<h3>Random-effect correlations</h3>"
            + _table(["Group", "Term 1", "Term 2", "Correlation", *(["95% CI (profile)"] if profiled else [])], rows))


def _estimates_block(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    """The estimated marginal means per group and visit, and each group against the reference group, with the
    figure of the means over time on the observed means ("" when the study asks for no ``estimates``)."""
    estimates = inputs.estimates
    if estimates is None:
        return ""
    by, at = estimates.by, list(estimates.at)
    data = inputs.config.data
    what = {"outcome": f"mean {data.outcome}", "probability": f"probability that {data.outcome} = 1",
            "rate": f"mean count of {data.outcome}"}.get(estimates.scale, estimates.scale)
    means = estimates.means
    mean_rows = [[*([_txt(row[by])] if by else []), *(_num(_grid_value(row[c])) for c in at),
                  _num(format_number(row["estimate"])), _num(format_number(row["se"])),
                  _num(format_fixed(row["df"], 1) if math.isfinite(row["df"]) else "∞"),
                  _num(_interval(row["ci_low"], row["ci_high"]))] for _, row in means.iterrows()]
    at_headers = [time_axis_label(data) if c == data.time else c for c in at]
    parts = ["<h3>Estimated marginal means</h3>",
             f"<p>The model's {esc(what)}" + (f" for each level of <code>{esc(by)}</code>" if by else "")
             + (f" at the requested values of {esc(', '.join(at))}" if at else "")
             + ", with 95% confidence intervals (emmeans' reference grid: other numeric covariates at their mean, "
             "other factors averaged with equal weights"
             + ("; on the response scale, back-transformed from the link scale" if estimates.scale != "outcome" else "")
             + "). Written to <code>marginal_means.csv</code>.</p>",
             _table([*([by] if by else []), *at_headers, "Estimate", "SE", "df", "95% CI"], mean_rows)]
    if estimates.scale != "outcome":
        parts.append('<p class="note">As emmeans computes them, a generalized linear mixed model\'s means are those '
                     "of a subject whose random effects are 0 (conditional, subject-specific), back-transformed: "
                     "they lie farther from the middle of the scale than the observed "
                     + ("proportions" if estimates.scale == "probability" else "mean counts")
                     + ", which average over subjects (population-averaged), the more so the larger the random-effect "
                     "SD.</p>")
    parts.append(_figure(figures, "marginal_means", "Estimated marginal means (lines, squares) with their 95% "
                         "bands, over the observed means of each group at each visit (open circles): where they "
                         "part, dropout or imbalance moves the raw means, and the model's means are the ones to "
                         "report."))
    contrasts = estimates.contrasts
    if by and not contrasts.empty:
        ratio = estimates.ratio
        contrast_rows = [[_txt(row["contrast"]), *(_num(_grid_value(row[c])) for c in at),
                          _num(format_number(row["estimate"])), _num(format_number(row["se"])),
                          _num(format_fixed(row["df"], 1) if math.isfinite(row["df"]) else "∞"),
                          _num(_interval(row["ci_low"], row["ci_high"])), _num(format_p(row["p_value"])),
                          _txt(row["adjustment"])] for _, row in contrasts.iterrows()]
        parts += ["<h3>Treatment differences</h3>",
                  f"<p>Each level of <code>{esc(by)}</code> against the reference level"
                  + (f" at each value of {esc(', '.join(at))}" if at else "")
                  + (f", as {esc(ratio)}s ({esc(_ratio_meaning(estimates.scale, data.outcome))}; 1 is no difference)"
                     if ratio else " (difference of the estimated means)")
                  + ". Written to <code>contrasts.csv</code>.</p>",
                  _table(["Contrast", *at_headers, "Ratio" if ratio else "Estimate", "SE", "df", "95% CI", "p",
                          "Adjustment"], contrast_rows)]
    for note in estimates.notes:
        parts.append(f'<p class="note">{esc(note)}</p>')
    return "\n".join(parts)


def _explained_variance_rows(explained: ExplainedVariance | None, link_scale: str = "") -> list[tuple[str, str]]:
    """ICC and R² rows of the selected model's list (none where they are not defined: an MMRM); a GLMM's are on
    its ``link_scale``, with the family's distribution-specific variance as the residual variance."""
    if explained is None:
        return []
    if link_scale:
        return [
            ("ICC (adjusted)", esc(f"{format_fixed(explained.icc, 3)}: on the {link_scale} scale, the share of the "
                                   "latent variance not explained by the fixed effects that lies between subjects "
                                   "(the distribution-specific variance as residual, as R's performance)")),
            ("R² marginal / conditional", esc(f"{format_fixed(explained.r2_marginal, 3)} / "
                                              f"{format_fixed(explained.r2_conditional, 3)}: the share of the latent "
                                              "variance explained by the fixed effects alone / by fixed and random "
                                              "effects together (Nakagawa, Johnson & Schielzeth)")),
        ]
    return [
        ("ICC (adjusted)", esc(f"{format_fixed(explained.icc, 3)}: the share of the variance not explained by "
                               "the fixed effects that lies between subjects (the random-effect variance, averaged "
                               "over the rows when slopes are random, over it plus the residual variance)")),
        ("R² marginal / conditional", esc(f"{format_fixed(explained.r2_marginal, 3)} / "
                                          f"{format_fixed(explained.r2_conditional, 3)}: the share of the total "
                                          "variance explained by the fixed effects alone / by fixed and random "
                                          "effects together (Nakagawa & Schielzeth, as R's performance)")),
    ]


def _glmm_selected_block(inputs: ReportInputs, fit: Fit, figures: Mapping[str, bytes]) -> str:
    """The selected binomial or Poisson model: how it was fitted, its fixed effects on the link scale and as odds
    or rate ratios, its random-effect SDs on the link scale and, for Poisson, the Pearson dispersion."""
    family, outcome = fit.family, inputs.config.data.outcome
    scale = "log-odds" if family == "binomial" else "log rate"
    ratio, baseline = ratio_name(family), baseline_name(family)
    dispersion = dispersion_of(fit)
    parts = [_dl([
        ("Model", f"<strong>{esc(fit.name)}</strong>"),
        ("Formula", f"<code>{esc(fit.formula)}</code>"),
        ("Family", esc(f"{family_description(family)}: {outcome} given the random effects is "
                       + ("Bernoulli (0/1) with probability μ, logit μ linear in the terms" if family == "binomial"
                          else "Poisson with mean μ, log μ linear in the terms"))),
        ("Method", esc(f"maximum likelihood (no REML for a GLMM), {approximation_description(fit.nagq)} "
                       f"(engine {fit.engine})")),
        ("Observations", esc(f"{fit.n_obs:,}")),
        ("Groups (subjects)", esc(f"{fit.n_subjects:,}")),
        ("Time", esc(time_axis_label(inputs.config.data))),
        ("Log-likelihood", esc(format_fixed(fit.loglik))),
        ("AIC / BIC", esc(f"{format_fixed(fit.aic)} / {format_fixed(fit.bic)} (k = {fit.n_params})")),
        *([("Pearson χ²/df", esc(f"{dispersion.ratio:.3f} (χ² = {format_fixed(dispersion.pearson_chi2)} on "
                                  f"{dispersion.df:,} df, p = {format_p(dispersion.p_value)})"))]
          if dispersion is not None else []),
        *_explained_variance_rows(inputs.explained, link_scale=scale),
    ])]
    rows = []
    for fe, exp in zip(fit.fixed_effects, ratio_effects(fit), strict=True):
        named = f"{format_number(exp.estimate)} ({baseline})" if fe.term == "(Intercept)" else format_number(exp.estimate)
        rows.append([
            _code(with_time_unit(fe.term, inputs.config.data)), _num(format_number(fe.estimate)),
            _num(format_number(fe.std_error)), _num(f"{format_number(fe.ci_low)} to {format_number(fe.ci_high)}"),
            _num(format_fixed(fe.z, 2)), _num(format_p(fe.p_value)), _num(named),
            _num(f"{format_number(exp.ci_low)} to {format_number(exp.ci_high)}"),
        ])
    parts.append("<h3>Fixed effects</h3>")
    parts.append(_table(["Term", f"Estimate ({scale})", "SE", "95% CI", "z", "p", ratio.capitalize(),
                         f"95% CI ({ratio})"], rows))
    parts.append(
        f'<p class="note">Estimates are on the {LINKS[family]} scale ({scale}) with Wald inference, as glmer\'s '
        "summary: z = estimate / SE, 95% CI = estimate ± 1.96 SE, two-sided p from the normal distribution. "
        f"{ratio.capitalize()}s are exp(estimate), their intervals exp of the Wald interval. The intercept's exp "
        f"is the {baseline}: the {'odds of ' + esc(outcome) + ' = 1' if family == 'binomial' else 'mean count of ' + esc(outcome)} "
        "when every covariate is 0 (numeric terms at 0, factors at their reference level) for a subject whose "
        f"random effects are 0. The {ratio}s are conditional (subject-specific): they compare two visits of "
        "the same subject, or subjects with the same random effects; averaged over the population the "
        + ("odds ratios are closer to 1, the more so the larger the random-effect SD." if family == "binomial"
           else "rate ratios of terms without random effects are the same (log link), the baseline rate larger.")
        + "</p>")
    parts.append(_figure(figures, "coefficients", f"Fixed effects as {ratio}s with Wald 95% confidence intervals "
                         f"on a log axis; the dashed line marks 1, no effect. The intercept's panel shows the "
                         f"{baseline}."))
    parts.append(_estimates_block(inputs, figures))
    parts.append("<h3>Random effects</h3>")
    parts.append(_variance_components_table(fit, f"SD ({scale})"))
    parts.append(f'<p class="note">On the {scale} scale. There is no residual variance: a {family} outcome\'s '
                 "variance is set by its mean, " + ("μ(1 − μ)." if family == "binomial" else "μ.") + "</p>")
    parts.append(_correlations_table(fit))
    if dispersion is not None:
        parts.append(_dispersion_block(dispersion))
    return "\n".join(parts)


def _dispersion_block(dispersion: Dispersion) -> str:
    """The Pearson dispersion check of a Poisson fit, with the advice a large ratio gets."""
    text = (f"<h3>Overdispersion</h3><p>Pearson χ²/df = <strong>{dispersion.ratio:.3f}</strong>: χ² = Σ (y − μ̂)²/μ̂ "
            f"= {format_fixed(dispersion.pearson_chi2)} over n − k = {dispersion.df:,} residual degrees of freedom, "
            f"μ̂ the fitted means given the predicted random effects (p = {format_p(dispersion.p_value)} against "
            "χ²(n − k), as <code>performance::check_overdispersion</code> tests). Near 1 when the counts vary as "
            "much as a Poisson with those means; well above 1, they vary more.</p>")
    if dispersion.overdispersed:
        text += f'<p class="warning">{esc(overdispersion_advice(dispersion))}</p>'
    return text


def _has_structure(formula: str, covariance: ResidualCovariance | None) -> bool:
    return covariance is not None or parse_formula(formula).covariance is not None


def describe_covariance(formula: str, covariance: ResidualCovariance | None) -> str:
    """What correlates a subject's measurements in a candidate, in a few words (the formula beside it says
    which terms): "random effects; residuals AR(1) (2 parameters)", "residuals unstructured (21 parameters)",
    "random effects; independent residuals". From the fitted ``covariance`` when there is one, else from
    the formula (a failed fit records none: its structure term is named as written)."""
    parsed = parse_formula(formula)
    parts = ["random effects"] if parsed.blocks else []
    if covariance is not None:
        parts.append(f"residuals {covariance.description} ({covariance.n_params} "
                     f"parameter{'s' if covariance.n_params != 1 else ''})")
    elif parsed.covariance is not None:
        parts.append(f"residuals {parsed.covariance.text}")
    else:
        parts.append("independent residuals")
    return "; ".join(parts)


def _covariance_block(fit: Fit, covariance: ResidualCovariance, figures: Mapping[str, bytes]) -> str:
    """The selected model's residual covariance: what it is, its figure, its matrices (up to
    :data:`ANNOTATED_VISITS` visits), its parameters and, with a variance per visit, the SD at each visit."""
    m = len(covariance.labels)
    over = "times" if covariance.spatial else "visits"
    whole = ("With the random effects above, the covariance of a subject's measurements is Z G Zᵀ plus this "
             "matrix; shown here is the residual part, as nlme reports it." if fit.random_effects else
             "Without random effects this is the whole covariance of a subject's repeated measurements (the R "
             "matrix of SAS PROC MIXED, mmrm's covariance).")
    parts = [
        f"<h3>Residual covariance: {esc(covariance.description)} (<code>{esc(covariance.term)}</code>)</h3>",
        f"<p>The covariance of a subject's residuals at the {m:,} {over} of <code>{esc(covariance.visit)}</code>, "
        f"estimated by {esc(fit.method)} with {covariance.n_params:,} parameter"
        f"{'s' if covariance.n_params != 1 else ''}. {esc(whole)}</p>",
    ]
    if covariance.spatial:
        caption = ("Correlation of two residuals of a subject against the time between them, exp(−d / range) "
                   "(nlme's corExp): the dots are the pairs of the study's distinct times.")
    else:
        caption = ("Correlation of a subject's residuals between visits (red positive, blue negative, white 0)"
                   + (", with the residual SD at each visit beside it" if covariance.heterogeneous else "") + ".")
    parts.append(_figure(figures, "residual_covariance", caption))
    if m <= ANNOTATED_VISITS:
        parts.append(_matrix_table(covariance.labels, covariance.matrix, format_number,
                                   f"Covariance matrix ({over} of {covariance.visit})"))
        parts.append(_matrix_table(covariance.labels, covariance.correlation, lambda v: format_fixed(v, 3),
                                   f"Correlation matrix ({over} of {covariance.visit})"))
    else:
        parts.append(f'<p class="note">Over {m:,} {over} the matrices are too large to read as tables; the figure '
                     "shows the correlations, and <code>selected_model.json</code> holds both matrices "
                     "(<code>covariance.matrix</code>, <code>covariance.correlation</code>).</p>")
    parts.append(_table(["Parameter", "Estimate"],
                        [[_code(name), _num(format_number(value))] for name, value in covariance.parameters],
                        caption="Covariance parameters"))
    if covariance.heterogeneous:
        parts.append(_table(["Visit", "SD", "Variance"],
                            [[_txt(label), _num(format_number(sd)), _num(format_number(sd ** 2))]
                             for label, sd in zip(covariance.labels, covariance.sd, strict=True)],
                            caption="Residual SD and variance per visit"))
    return "\n".join(parts)


def _matrix_table(labels: Sequence[str], matrix: np.ndarray, fmt: Callable[[float], str], caption: str) -> str:
    """A square matrix with the visits as row and column headers."""
    rows = [[(f"<strong>{esc(label)}</strong>", ""), *(_num(fmt(float(v))) for v in values)]
            for label, values in zip(labels, np.asarray(matrix, dtype=float), strict=True)]
    return _table(["Visit", *labels], rows, caption=caption)


def _random_effects_section(fit: Fit, figures: Mapping[str, bytes]) -> str:
    """Histograms of the predicted random effects, then the caterpillar plot with a caption saying what it shows;
    for a model of residual covariance alone, a sentence saying so."""
    if fit.covariance is not None and not fit.random_effects:
        return (f"<p>The selected model has no random effects: a subject's measurements are correlated through "
                f"its residual covariance, {esc(fit.covariance.description)} (section 5).</p>")
    what = ("conditional modes, BLUPs" if fit.family == "gaussian" else
            f"conditional modes, on the {'log-odds' if fit.family == 'binomial' else 'log rate'} scale")
    intro = (f"<p>Predicted random effects ({what}) of the selected model, one panel per term. "
             "They are shrunk towards zero, so their spread is smaller than the estimated SD; heavy tails or "
             "several modes suggest a missing covariate or subgroup.</p>")
    histograms = _figure(figures, "random_effects", "Distribution of the predicted random effects per term over "
                         "all levels, with the model's normal distribution for reference.")
    ranef = fit.ranef
    counts = (ranef.groupby(["group", "term"], sort=False, observed=True).size()
              if ranef is not None and not ranef.empty else pd.Series(dtype=int))
    many = [f"{group}: {term} ({n:,} levels)" for (group, term), n in counts.items() if n > CATERPILLAR_LEVELS]
    low = CATERPILLAR_LEVELS // 2
    shown = (f"For {', '.join(many)}, only the {low} lowest and {CATERPILLAR_LEVELS - low} highest levels are "
             "shown, where outlying levels are; the row “… N more …” marks the levels left out, which the "
             "histograms include." if many else "Every level is shown.")
    caterpillar = _figure(figures, "caterpillar", "Conditional modes of the random effects, sorted, with 95% "
                          "conditional intervals (mode ± 1.96 conditional SD); intervals that exclude zero are "
                          f"darker. {shown}")
    return intro + histograms + caterpillar


def _diagnostics_section(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    """The residual plots of the selected model and, when candidates have a covariance structure, the residual
    correlation diagnostic (section 7). A binomial or Poisson model gets the checks of its family instead."""
    fit = inputs.selected
    if fit.family != "gaussian":
        return _glmm_diagnostics(fit, figures)
    if fit.covariance is not None and not fit.random_effects:
        which = "Residuals (observed − fitted fixed effects: the model has no random effects)"
    else:
        which = "Conditional residuals (observed − fitted, including each subject's predicted random effects)"
    whitened = fit.normalized_residuals.size > 0
    qq = ("Normal QQ plot of normalized residuals (the residuals whitened by the fitted residual covariance, "
          "nlme's type = \"normalized\"); " if whitened else
          "Normal QQ plot of standardized residuals (residual / residual SD); ")
    parts = [
        f"<p>{which} of the REML fit of {esc(fit.name)}.</p>",
        _figure(figures, "residuals_vs_fitted", "Residuals against fitted values, with the mean residual "
                "per bin of fitted values: curvature suggests a missing term, a funnel unequal variance."),
        _figure(figures, "qq", qq + "points on the line mean normal residuals, bent tails mean heavy or light tails."
                + (f" Of the {len(fit.residuals):,} residuals, {QQ_POINTS:,} evenly spaced order statistics "
                   "are drawn, the smallest and largest included." if len(fit.residuals) > QQ_POINTS else "")),
        _figure(figures, "residuals_over_time", "Residuals over time with the mean per time point: a "
                "pattern suggests a misspecified time trend."),
    ]
    if fit.covariance is not None or any(f.covariance is not None for f in inputs.fits):
        parts.append(_residual_correlation_block(inputs, figures))
    return "\n".join(parts)


def _glmm_diagnostics(fit: Fit, figures: Mapping[str, bytes]) -> str:
    """Binned residuals and randomized quantile residuals of a binomial or Poisson fit, with how to read them."""
    binomial = fit.family == "binomial"
    what = "probability" if binomial else "mean count"
    variance = "μ̂(1 − μ̂)" if binomial else "μ̂"
    intro = (f"<p>Residual checks for the {'0/1' if binomial else 'count'} outcome of the ML fit of "
             f"{esc(fit.name)}. The residuals y − μ̂ of a {'binary outcome fall on two curves' if binomial else 'count have a spread that grows with its mean'}"
             ", so the plots of a linear mixed model (residuals against fitted values, a normal QQ plot of "
             "residual / σ̂) do not apply; these two do. μ̂ is the fitted "
             f"{what}, conditional on each subject's predicted random effects.</p>")
    binned = _figure(figures, "binned_residuals",
                     f"Binned residuals (Gelman & Hill 2007, §5.6): the rows sorted by fitted {what} μ̂ and cut into "
                     "about √n bins of equal size (arm's binnedplot); each point is a bin's mean residual y − μ̂ "
                     f"against its mean μ̂. The grey band is ±2 SE of that mean if the model is right, SE = √(mean "
                     f"{variance} / n), so about 95% of the bins fall inside it. A run of bins on one side, or a "
                     f"curve, means the fitted {what} is off in that range of μ̂: a missing term, or a covariate "
                     "entered with the wrong shape. With few visits per subject, expect a tilt even from a correct "
                     "model: the predicted random effects are shrunk towards 0, so a subject with many "
                     f"{'1s' if binomial else 'events'} gets fitted values below its own rate and one with few "
                     "gets them above, which puts mean residuals below 0 at low μ̂ and above 0 at high μ̂, the "
                     "end bins sometimes outside the band. Misfit is a curve or a run of bins away from that "
                     "tilt; the observed against fitted values over time (section 8) check the time course "
                     "directly.")
    quantile = _figure(figures, "quantile_residuals",
                       "Randomized quantile residuals (Dunn & Smyth 1996): each observation's place in its fitted "
                       "distribution, u drawn uniformly between F(y − 1; μ̂) and F(y; μ̂), turned into Φ⁻¹(u). If the "
                       "model is right they are N(0, 1) whatever μ̂: points on the line y = x in the QQ plot, and a "
                       "band centred on 0 between about ±1.96 against μ̂. These are conditional on the predicted "
                       "random effects (F uses μ̂ given each subject's modes), computed exactly where DHARMa "
                       "simulates (conditional on the fitted random effects, its default since version 0.5.0); "
                       "they are not the unconditional residuals that draw new random effects for every subject "
                       "(DHARMa's simulateREs = \"unconditional\", lme4's simulate default). Since the random "
                       "effects were fitted to these data, they spread a little less than N(0, 1) and tilt upwards "
                       "a little against μ̂ (the shrinkage the binned residuals show; DHARMa plots against "
                       "predictions without random effects for this reason). The uniform draws are seeded (seed "
                       "0): the same fit draws the same points. "
                       + ("One binary outcome says little on its own: these show gross misfit, the binned residuals "
                          "show where." if binomial else
                          "A QQ plot steeper than the line, with both tails beyond it, means the counts vary more "
                          "than Poisson: see the Pearson χ²/df in section 5."))
    return intro + binned + quantile


def _residual_correlation_block(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    """The serial-correlation diagnostic: which fits it compares, and how to read it."""
    roles = inputs.config.data
    visits = inputs.validated.visits
    times = visits[roles.time].to_numpy(float) if roles.time in visits else np.empty(0)
    kind = residual_correlation_kind(times, inputs.selected.covariance)
    compared = serial_diagnostic_fits(inputs.selected, inputs.fits, inputs.selection.criterion)
    criterion = inputs.selection.criterion.upper()
    described = [f"{esc(fit.name)} ({'the selected model' if role == 'selected' else f'the best candidate without serial correlation by {esc(criterion)}'}, "
                 f"{esc(fit.method)} fit)" for role, fit in compared]
    shown = " and ".join(described) if described else "no fit with residuals"
    if kind == "lag":
        what = ("<p>Serial correlation left in the residuals: the correlation of two normalized residuals of a "
                "subject by how many visits apart they are (lag 1: consecutive visits; a missed visit makes its "
                f"neighbours lag 2), for {shown}.</p>")
        caption = ("Within-subject correlation of normalized residuals by lag, with the number of pairs under each "
                   "lag. Normalized residuals of a model that captures the serial correlation are uncorrelated at "
                   "every lag: points near 0, inside the shaded band ±2/√pairs where a zero correlation falls about "
                   "95% of the time. Points above the band at short lags mean correlation the model leaves out. "
                   "The conditional residuals of a random-effects model without a structure are deviations from "
                   "each subject's own fitted line, so a correlation slightly below 0 is expected for them.")
    else:
        what = ("<p>Serial correlation left in the residuals: the empirical semivariogram of the normalized "
                f"residuals within subjects (nlme's Variogram), for {shown}.</p>")
        caption = ("Semivariogram of normalized residuals: for every pair of a subject's visits, half the squared "
                   "difference of their normalized residuals, averaged per bin of the time between them. Normalized "
                   "residuals of a model that captures the serial correlation are uncorrelated at every distance: "
                   "points near the dashed line γ = 1. Points below 1 at short distances, rising towards 1, mean "
                   "that visits close in time are more alike than the model allows.")
    return "<h3>Residual correlation within subjects</h3>" + what + _figure(figures, "residual_correlation", caption)


def _group_phrase(inputs: ReportInputs) -> str:
    """", per arm" when the figures over time are split by a group column (the one the figures choose), else
    ", over all subjects"."""
    roles = inputs.config.data
    group = choose_group_column(inputs.validated.visits, inputs.selected.formula,
                                exclude=(*roles.subject_columns, roles.subject_key, roles.time, roles.outcome))
    return f", per level of {esc(group)}" if group is not None else ", over all subjects"


def _glmm_time_phrase(inputs: ReportInputs) -> str:
    """"each time" or "each time bin" (many distinct times are binned by quantiles, as the figures do)."""
    roles = inputs.config.data
    visits = inputs.validated.visits
    times = pd.to_numeric(visits[roles.time], errors="coerce") if roles.time in visits else pd.Series(dtype=float)
    return "each time bin (quantile bins of time)" if times.nunique() > MAX_DISTINCT_X else "each time"


def _glmm_trajectories(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    family, outcome = inputs.selected.family, inputs.config.data.outcome
    if family == "binomial":
        caption = (f"Observed proportion with {outcome} = 1 at {_glmm_time_phrase(inputs)}{_group_phrase(inputs)}, "
                   "with 95% Wilson intervals (all subjects seen then). A 0/1 outcome is not drawn subject by "
                   "subject: the lines would only jump between 0 and 1.")
    else:
        caption = (f"Observed mean {outcome} at {_glmm_time_phrase(inputs)}{_group_phrase(inputs)}, with ±1.96 SE "
                   "from the sample SD (all subjects seen then), so an interval is as wide as the counts' own spread.")
    return _figure(figures, "trajectories", caption)


def _glmm_observed_fitted(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    """The observed proportion (or mean count) over time against the mean fitted one, then sampled subjects."""
    fit = inputs.selected
    binomial = fit.family == "binomial"
    outcome = inputs.config.data.outcome
    shown = outcome_scale_label(fit.family, outcome)
    interval = "95% Wilson intervals" if binomial else "±1.96 SE from the sample SD"
    what = "probability" if binomial else "count"
    over_time = _figure(
        figures, "observed_vs_fitted_over_time",
        f"Observed {shown} at {_glmm_time_phrase(inputs)}{_group_phrase(inputs)} (points, with {interval}) "
        f"against the model's mean fitted {what} (lines): the average, over the rows at that time, of each "
        f"subject's fitted {what} μ̂ (fixed effects plus the subject's predicted random effects), so it describes "
        "the same rows as the points. Lines through the intervals mean the model follows the time course of each "
        "group; a line that misses them points to a time trend the model lacks. (The fitted "
        f"{what} at average random effects, exp or expit of the fixed part alone, would be "
        + ("further from ½ than these: averaging over subjects pulls probabilities towards the middle.)"
           if binomial else "lower than these: averaging exp over subjects raises the mean.)"))
    panels = _figure(figures, "observed_vs_fitted",
                     f"Observed {'0/1 outcomes' if binomial else 'counts'} (points) and each subject's fitted "
                     f"{what} (lines: fixed effects plus the subject's predicted random effects) for a random "
                     "sample of subjects.")
    return over_time + panels


def _reproducibility_section(inputs: ReportInputs) -> str:
    parts = [_dl([
        ("Study", esc(inputs.study)),
        ("Run id", f"<code>{esc(inputs.run_id)}</code>"),
        ("Created", esc(inputs.created)),
    ])]
    stages = inputs.timings.get("stages") if isinstance(inputs.timings.get("stages"), Mapping) else None
    fit_times = inputs.timings.get("fits") if isinstance(inputs.timings.get("fits"), Mapping) else None
    others = {k: v for k, v in inputs.timings.items() if k not in ("stages", "fits")}
    parts.append("<h3>Timings</h3>")
    if stages:
        parts.append(_table(["Stage", "Time"], [[_txt(k), _num(format_seconds(v))] for k, v in stages.items()],
                            caption="Per stage"))
    if fit_times:
        parts.append(_table(["Candidate", "Time"], [[_txt(k), _num(format_seconds(v))] for k, v in fit_times.items()],
                            caption="Per candidate fit"))
    if others:
        parts.append(_table(["Timing", "Value"], [[_txt(k), _num(format_seconds(v) if isinstance(v, (int, float))
                                                               else str(v))] for k, v in others.items()]))
    if not (stages or fit_times or others):
        parts.append('<p class="note">No timings were recorded.</p>')
    parts.append("<h3>Optimizer diagnostics</h3>")
    parts.append(f'<p class="note">{esc(_optimizer_note(_with_selected(inputs.fits, inputs.selected)))}</p>')
    parts.append(_optimizer_table(_with_selected(inputs.fits, inputs.selected)))
    parts.append("<h3>Package versions</h3>")
    parts.append(_table(["Package", "Version"], [[_txt(k), _code(v)] for k, v in sorted(inputs.versions.items())]))
    parts.append("<h3>Study config</h3>")
    config = json.dumps(inputs.config.model_dump(mode="json"), indent=2, ensure_ascii=False)
    parts.append(f"<pre>{esc(config)}</pre>")
    return "\n".join(parts)


def _optimizer_note(fits: Sequence[Fit]) -> str:
    """How the fits were optimized, saying "several" only when more than one attempt ran for some fit."""
    attempts = [len(fit.attempts) for fit in fits]
    optimizers = sorted({a.optimizer for fit in fits for a in fit.attempts} | {f.optimizer for f in fits if f.optimizer})
    if not any(n > 1 for n in attempts):
        used = ", ".join(optimizers) if optimizers else "the engine's optimizer"
        return f"Each fit ran one optimizer attempt ({used}); the table shows what it reached."
    several = sum(1 for n in attempts if n > 1)
    return (f"{several} of {len(fits)} fits ran more than one optimizer attempt ({', '.join(optimizers)}); the "
            "best finite log-likelihood among converged attempts wins, and ΔlogLik is how far each attempt "
            "stopped short of it.")


def _optimizer_table(fits: Sequence[Fit]) -> str:
    """One row per candidate fit (ML and the REML refit) and per optimizer attempt."""
    headers = ["Candidate", "Method", "Optimizer", "Iterations", "Converged", "logLik", "ΔlogLik",
               "max |gradient|", "Time", "Message"]
    rows, classes = [], []
    for fit in fits:
        rows.append([
            (f"<strong>{esc(fit.name)}</strong>", ""), _txt(fit.method), _txt(fit.optimizer or "—"),
            _num(format_number(fit.iterations)), _txt(_yes_no(fit.converged)), _num(format_fixed(fit.loglik, 3)),
            _num(""), _num(format_number(fit.gradient_max, 3)), _num(format_seconds(fit.seconds)),
            _txt(fit.message),
        ])
        classes.append("fit-row" + ("" if fit.converged else " failed"))
        finite = [a.loglik for a in fit.attempts if math.isfinite(a.loglik)]
        best = max(finite) if finite else math.nan
        for attempt in fit.attempts:
            gap = best - attempt.loglik if math.isfinite(attempt.loglik) and math.isfinite(best) else math.nan
            rows.append([
                _txt(""), _txt(""), ("↳ " + esc(attempt.optimizer), "attempt"),
                _num(format_number(attempt.iterations)),
                _txt(_yes_no(attempt.converged)), _num(format_fixed(attempt.loglik, 3)),
                _num(format_fixed(gap, 3)), _num(""), _num(format_seconds(attempt.seconds)), _txt(attempt.message),
            ])
            classes.append("attempt-row")
    return _table(headers, rows, row_classes=classes)


# ------------------------------------------------------------------------------------------ the page


_CSS = """
:root { --ink:#1d232a; --muted:#5b6670; --line:#d7dce1; --soft:#f4f6f8; --accent:#1f5fa8; --bad:#b03a2e;
        --good:#2e7d32; --warn-bg:#fff4e5; --warn-line:#e0a040; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.5;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 32px 64px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 18px; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
.meta { color: var(--muted); font-size: 0.92em; }
h2 { font-size: 1.3em; margin: 2.0em 0 0.6em; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.4em 0 0.5em; }
nav.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px; }
nav.toc ol { margin: 4px 0; padding-left: 0; list-style: none; columns: 2; }
nav.toc a { color: var(--accent); text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
code, pre { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.88em; }
code { background: var(--soft); padding: 0 3px; border-radius: 3px; word-break: break-word; }
pre { background: var(--soft); border: 1px solid var(--line); padding: 10px; overflow-x: auto; }
.table-wrap { overflow-x: auto; margin: 0.6em 0 1em; }
table { border-collapse: collapse; font-size: 0.88em; min-width: 40%; }
caption { text-align: left; font-weight: 600; padding: 4px 0; color: var(--muted); }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); border-bottom: 2px solid var(--line); white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.empty { color: var(--muted); font-style: italic; }
td.formula { min-width: 15em; }
td.nowrap { white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.selected { background: #e8f0fb !important; }
tr.failed td { color: var(--bad); }
tr.singular { background: var(--warn-bg) !important; }
tr.attempt-row td { color: var(--muted); font-size: 0.95em; }
tr.fit-row td { border-top: 1px solid #bcc4cc; }
.pass { color: var(--good); font-weight: 600; }
.fail { color: var(--bad); font-weight: 600; }
.chosen { color: var(--accent); font-weight: 700; white-space: nowrap; }
.na { color: var(--muted); font-style: italic; }
.note { color: var(--muted); font-size: 0.9em; }
.accounting { font-weight: 600; }
.warning { background: var(--warn-bg); border-left: 4px solid var(--warn-line); padding: 8px 12px; }
.warning-text { color: var(--bad); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 18px; margin: 0.6em 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
figure { margin: 1em 0 1.6em; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.9em; margin-top: 4px; }
footer { margin-top: 3em; color: var(--muted); font-size: 0.85em; border-top: 1px solid var(--line);
         padding-top: 8px; }
@media print {
  body { font-size: 11pt; }
  main { max-width: none; padding: 0; }
  nav.toc { display: none; }
  h2 { break-after: avoid; page-break-after: avoid; }
  figure, table, dl.facts { break-inside: avoid; page-break-inside: avoid; }
  .table-wrap { overflow: visible; }
  a { color: inherit; text-decoration: none; }
}
"""


def render_report(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    """The whole report as one self-contained HTML string.

    ``figures`` maps the stems of :data:`longitudinal.reporting.figures.FIGURE_KEYS` (for a binomial or Poisson
    study, :data:`~longitudinal.reporting.figures.GLMM_FIGURE_KEYS`) to PNG bytes; a missing key gives a note
    in place of that figure. Nothing is loaded from the network: styles are inline and images are ``data:``
    URIs.
    """
    fit = inputs.selected
    per_subject = visits_per_subject(inputs.validated.visits, inputs.config.data.subject_key)
    glmm = fit.family != "gaussian"
    builders: dict[str, Callable[[], str]] = {
        "data": lambda: _data_section(inputs, per_subject),
        "validation": lambda: _validation_section(inputs),
        "trajectories": lambda: _glmm_trajectories(inputs, figures) if glmm else _figure(
            figures, "trajectories",
            "Observed outcome over time: thin lines are a sample of subjects, bold lines the mean over all "
            "subjects at each time with a ±1.96 SE band."),
        "comparison": lambda: _comparison_section(inputs, figures),
        "selected": lambda: _selected_section(inputs, figures),
        "random-effects": lambda: _random_effects_section(fit, figures),
        "diagnostics": lambda: _diagnostics_section(inputs, figures),
        "observed-fitted": lambda: _glmm_observed_fitted(inputs, figures) if glmm else _figure(
            figures, "observed_vs_fitted",
            "Observed values (points) and fitted trajectories (lines, "
            + ("fixed effects alone: the model has no random effects"
               if fit.covariance is not None and not fit.random_effects
               else "fixed effects plus the subject's predicted random effects")
            + ") for a random sample of subjects."),
        "reproducibility": lambda: _reproducibility_section(inputs),
    }
    sections = section_titles(fit)
    toc = "".join(f'<li><a href="#{anchor}">{esc(title)}</a></li>' for anchor, title in sections)
    body = "\n".join(_section(anchor, title, builders[anchor]()) for anchor, title in sections)
    footer = ("Estimates are from the maximum-likelihood fit of the selected model (a generalized linear mixed "
              "model has no REML); the model comparison uses the ML fits on identical rows." if glmm else
              "Estimates are from the REML refit of the selected model; the model\ncomparison uses ML fits on "
              "identical rows.")
    title = f"{inputs.study}: longitudinal mixed-model report"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="longitudinal">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>{esc(inputs.study)}</h1>
<div class="meta">Longitudinal mixed-model report · run <code>{esc(inputs.run_id)}</code> · created
{esc(inputs.created)} · selection by {esc(inputs.selection.criterion.upper())}</div>
</header>
<nav class="toc" aria-label="Contents"><strong>Contents</strong>
<ol><li><a href="#summary">Summary</a></li>{toc}</ol></nav>
{_summary(inputs, per_subject)}
{body}
<footer>Generated by longitudinal. {footer}</footer>
</main>
</body>
</html>
"""
