"""Typed records that the stages exchange.

Every stage returns one of these, never a third-party results object, so that the engine behind a fit,
the validator behind the checks or the plotting library can change without touching the others.
Records are frozen; the ones holding arrays or frames compare by identity (``eq=False``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from longitudinal.config import StudyConfig

Method = Literal["ML", "REML"]

#: Columns ingestion adds to every row: where it was read from.
SOURCE_COLUMNS = ("source_file", "source_line")

# ---------------------------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class SourceFile:
    """One input file as read: its path, content hash (sha256) and number of data rows."""

    path: str
    sha256: str
    rows: int


@dataclass(frozen=True, eq=False)
class Ingested:
    """What ingestion read.

    ``raw`` holds every row exactly as read (all values as text for CSV, native for Parquet) plus the
    columns ``source_file`` and ``source_line`` (1-based line in the file, header = line 1; for Parquet
    the 1-based row number). ``typed`` has the same index and columns with the configured roles coerced
    (subject and categoricals to text, time and outcome and numeric covariates to float); a value that
    could not be coerced is NaN there while ``raw`` keeps what was read, so validation can quarantine it.
    """

    raw: pd.DataFrame
    typed: pd.DataFrame
    files: tuple[SourceFile, ...]
    dates: TimeFromDates | None = None
    """How the time column was read when it holds dates (None for numeric time)."""
    findings: tuple[ExpectationOutcome, ...] = ()
    """Warning-level findings of ingestion itself (links and other entries skipped), for validation to list."""

    @property
    def rows_read(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class TimeFromDates:
    """A time column of dates turned into numbers: (date - origin) in ``unit`` (``data.time_unit``).

    ``origin`` is ``data.time_origin``: "subject" (each subject's earliest date), "study" (the earliest date
    in the data) or an ISO date; ``origin_date`` is the date used for "study" and for a given date, None
    for "subject". ``dates_read`` counts the values that are dates.
    """

    column: str
    unit: str
    origin: str
    origin_date: str | None
    dates_read: int

    @property
    def note(self) -> str:
        """What was done, in one sentence (``validation.json`` notes)."""
        if self.origin == "subject":
            since = "each subject's first visit"
        elif self.origin == "study":
            since = f"{self.origin_date}, the earliest date in the data"
        else:
            since = f"{self.origin_date} (data.time_origin)"
        return f"time {self.column!r} holds ISO dates: read as {self.unit} since {since}"


# ------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class ExpectationOutcome:
    """One check and what it found.

    ``level`` is "table" (failing fails the run), "row" (failing quarantines ``unexpected_count`` rows) or
    "warning" (a finding worth a person's look, in ``details``, that never fails the run and quarantines
    nothing: ``success`` is False when there is something to say, ``unexpected_count`` is always 0).
    ``reason`` is, for a row rule, its quarantine reason without the values ("outcome is not a number
    (column 'score')"); "" otherwise.
    """

    name: str
    level: Literal["table", "row", "warning"]
    column: str | None
    success: bool
    unexpected_count: int
    description: str
    details: str = ""
    reason: str = ""


@dataclass(frozen=True, eq=False)
class Validated:
    """The rows to analyse and the rows set aside, with the reason for each.

    ``visits``: typed rows that every candidate is fitted on (same index as in ``Ingested``), with
    ``source_file`` and ``source_line``; its text columns are pandas categoricals of the values analysed (16 MB
    instead of 107 at 2,000,000 rows; ``data.parquet`` is written with text columns). ``quarantine``: every
    quarantined row as read plus ``source_file``, ``source_line`` and ``reason``.
    ``rows_read == rows_analysed + rows_quarantined``.
    """

    visits: pd.DataFrame
    quarantine: pd.DataFrame
    expectations: tuple[ExpectationOutcome, ...]
    rows_read: int

    @property
    def rows_analysed(self) -> int:
        return len(self.visits)

    @property
    def rows_quarantined(self) -> int:
        return len(self.quarantine)

    @property
    def success(self) -> bool:
        """Every table-level check passed (warnings and quarantined rows never fail a run)."""
        return all(e.success for e in self.expectations if e.level == "table")

    @property
    def notes(self) -> tuple[str, ...]:
        """How the data were read where that changes the numbers (a time column of dates, say)."""
        return tuple(e.description for e in self.expectations if e.name == "time_read_as_dates")

    @property
    def warnings(self) -> tuple[str, ...]:
        """The findings of the warning-level checks that found something, one sentence each."""
        return tuple(e.details for e in self.expectations if e.level == "warning" and not e.success)


# ------------------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class FixedEffect:
    """A fixed-effect estimate with its standard error, 95% interval and two-sided p-value.

    ``df`` is the reference distribution's degrees of freedom: the t distribution with ``df`` (Satterthwaite,
    Kenward–Roger or residual df, ``longitudinal.inference.ddf``), or ``inf`` for the normal distribution
    (Wald z: the candidates' own fits, and every binomial or Poisson model).
    """

    term: str
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float
    p_value: float
    df: float = math.inf

    @property
    def z(self) -> float:
        """The Wald statistic estimate / SE (NaN without a finite, non-zero SE)."""
        return self.estimate / self.std_error if self.std_error and math.isfinite(self.std_error) else math.nan


@dataclass(frozen=True)
class VarianceComponent:
    """The standard deviation of one random-effect term (``term`` "(Intercept)" for the intercept), with its
    profile-likelihood 95% interval where one was computed (the reported model's; NaN otherwise)."""

    group: str
    term: str
    sd: float
    ci_low: float = math.nan
    ci_high: float = math.nan


@dataclass(frozen=True)
class Correlation:
    """The correlation of two random-effect terms of one bar, with its profile-likelihood 95% interval where
    one was computed (NaN otherwise)."""

    group: str
    term1: str
    term2: str
    corr: float
    ci_low: float = math.nan
    ci_high: float = math.nan


@dataclass(frozen=True)
class OptimizerAttempt:
    """One optimizer run: what it reached (log-likelihood, or REML log-criterion) and whether it converged."""

    optimizer: str
    loglik: float
    converged: bool
    iterations: int
    seconds: float
    message: str = ""


#: Structures whose correlation decays with the distance between visits (serial correlation).
SERIAL_STRUCTURES = ("us", "ar1", "ar1h", "toep", "toeph", "ad", "adh", "sp_exp")


@dataclass(frozen=True, eq=False)
class ResidualCovariance:
    """The fitted structured covariance of a subject's residuals (a candidate with a covariance-structure term).

    ``structure`` is mmrm's name ("us", "ar1", ...), ``term`` the term as written in the formula
    ("us(visit | id)"), ``description`` the structure in words ("AR(1), heterogeneous variances").
    ``matrix`` is the covariance of the residual structure over ``labels`` (σ²R, without the random-effects
    part Z G Zᵀ): the visits of column ``visit`` in order or, for a ``spatial`` structure (sp_exp), the
    distinct times. ``n_params`` is the structure's parameter count (its variances included);
    ``parameters`` are named estimates on their natural scale (("sigma", 3.1), ("rho", 0.6),
    ("sd[visit 2]", 4.4), ("range", 2.5)). ``heterogeneous``: a variance per visit.
    """

    structure: str
    term: str
    description: str
    visit: str
    labels: tuple[str, ...]
    matrix: np.ndarray
    n_params: int
    parameters: tuple[tuple[str, float], ...]
    heterogeneous: bool
    spatial: bool

    @property
    def sd(self) -> np.ndarray:
        """The standard deviation at each of ``labels``: √diag(matrix)."""
        return np.sqrt(np.diag(np.asarray(self.matrix, dtype=float)))

    @property
    def correlation(self) -> np.ndarray:
        """``matrix`` scaled to a correlation matrix (unit diagonal)."""
        sd = self.sd
        return np.asarray(self.matrix, dtype=float) / np.outer(sd, sd)

    @property
    def serial(self) -> bool:
        """Whether the structure models serial correlation (see :data:`SERIAL_STRUCTURES`)."""
        return self.structure in SERIAL_STRUCTURES


@dataclass(frozen=True, eq=False)
class Fit:
    """One candidate fitted by one method (ML for comparison, REML for the reported estimates).

    ``loglik`` is the maximized log-likelihood for ML and the maximized REML log-likelihood for REML
    (``reml_criterion`` = -2 × that, lme4's "REML criterion at convergence"). ``n_params`` follows lme4:
    fixed effects + random-effect (co)variance parameters + 1 residual variance.

    ``ranef`` is long: columns ``group, level, term, estimate, cond_sd`` (conditional modes of the random
    effects and their conditional standard deviations). ``fitted`` and ``residuals`` align with the rows
    of the data the candidate was fitted on.

    ``converged`` means the optimum passed lme4's convergence checks (a singular fit passes: lme4 does not
    test the gradient on the boundary, and says "boundary (singular) fit" instead, here with ``singular``).
    ``message`` holds the fit's notes in lme4's order, separated by "; ": dropped collinear columns, the
    scale warning, the singular-fit message naming the term, convergence warnings; for a failed fit, why it
    failed. ``dropped_terms`` are the fixed-effect columns dropped as linear combinations of the others
    (lme4's "fixed-effect model matrix is rank deficient"); ``n_params`` counts the kept ones, as lme4.
    A failed fit has ``converged=False``, ``loglik=nan`` and ``message`` saying why.

    A candidate with a covariance-structure term carries it in ``covariance``; then ``n_params`` counts
    fixed effects + random-effect (co)variance parameters + the structure's parameters (nlme's and mmrm's
    logLik df: σ² is among the structure's parameters, not added again), and ``residual_sd`` is σ of a
    homogeneous structure (NaN when the variances are per visit). ``normalized_residuals`` are nlme's
    normalized residuals (the residuals whitened by the fitted residual covariance, rows as ``residuals``);
    empty for lme4-style fits, whose residuals / ``residual_sd`` serve instead.

    A generalized linear mixed model (``family`` "binomial" or "poisson", glmer's) has its fixed effects on
    the link scale (logit, log), ``loglik`` glmer's (Laplace, or adaptive Gauss–Hermite quadrature with
    ``nagq`` > 1 points), ``n_params`` = fixed effects + θ (no residual variance), ``residual_sd`` NaN,
    ``fitted`` the conditional mean μ̂ on the response scale and ``residuals`` y − μ̂.
    """

    name: str
    formula: str
    method: Method
    engine: str
    converged: bool
    singular: bool
    message: str
    n_obs: int
    n_subjects: int
    n_params: int
    loglik: float
    reml_criterion: float | None = None
    fixed_effects: tuple[FixedEffect, ...] = ()
    random_effects: tuple[VarianceComponent, ...] = ()
    correlations: tuple[Correlation, ...] = ()
    residual_sd: float = math.nan
    ranef: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["group", "level", "term", "estimate", "cond_sd"]))
    fitted: np.ndarray = field(default_factory=lambda: np.empty(0))
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    optimizer: str = ""
    attempts: tuple[OptimizerAttempt, ...] = ()
    gradient_max: float = math.nan
    iterations: int = 0
    seconds: float = 0.0
    dropped_terms: tuple[str, ...] = ()
    covariance: ResidualCovariance | None = None
    normalized_residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    family: str = "gaussian"
    nagq: int = 1
    vcov: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    """The covariance of the fixed-effect estimates (Wald, as lme4's ``vcov``), rows and columns in the order of
    ``fixed_effects``; empty for a failed fit."""
    residual_sd_ci: tuple[float, float] | None = None
    """The profile-likelihood 95% interval of ``residual_sd`` (the reported model's; None otherwise)."""
    theta: np.ndarray = field(default_factory=lambda: np.empty(0))
    """lme4's θ at the optimum, in the data's units (lme4-style LMM and GLMM fits; empty otherwise): with the
    design, what small-sample inference and likelihood profiles start from."""

    @property
    def usable(self) -> bool:
        """A completed fit with a finite likelihood: it competes in the selection and the likelihood-ratio
        tests, as lme4 keeps a fit with a convergence warning (``converged`` False, warning in ``message``).
        Only a fit that failed, or whose optimum is not a valid likelihood, is left out."""
        return math.isfinite(self.loglik)

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.n_params

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + self.n_params * math.log(self.n_obs) if self.n_obs > 0 else math.nan


def failed_fit(
    name: str, formula: str, method: Method, engine: str, reason: str, *, n_obs: int, n_subjects: int,
    n_params: int, attempts: tuple[OptimizerAttempt, ...] = (), seconds: float = 0.0,
    dropped_terms: tuple[str, ...] = (),
) -> Fit:
    """The record of a candidate that could not be fitted, with the reason in ``message``."""
    return Fit(
        name=name, formula=formula, method=method, engine=engine, converged=False, singular=False,
        message=reason, n_obs=n_obs, n_subjects=n_subjects, n_params=n_params, loglik=math.nan,
        attempts=attempts, seconds=seconds, dropped_terms=dropped_terms,
    )


# ------------------------------------------------------------------------------------------- selection


#: The columns of ``model_comparison.csv``, in order: :attr:`Selection.table` has exactly these.
MODEL_COMPARISON_COLUMNS = (
    "model", "formula", "converged", "singular", "n_obs", "n_subjects", "n_params", "loglik",
    "aic", "bic", "delta_aic", "delta_bic", "aic_weight", "bic_weight", "selected",
)

#: The reference distribution of a likelihood-ratio test (see :class:`LikelihoodRatioTest`).
Reference = Literal["chi2", "mixture", "chi2-conservative"]


@dataclass(frozen=True)
class LikelihoodRatioTest:
    """One test of a smaller candidate against a larger one that contains it (both ML fits).

    ``statistic`` = 2(ℓ_larger − ℓ_smaller); ``df`` = difference in parameter counts. ``reference`` is
    ``"chi2"`` (χ²(df)), ``"mixture"`` (50:50 χ²(df − 1) and χ²(df), one variance tested on its boundary)
    or ``"chi2-conservative"`` (several variances on the boundary: χ²(df), an upper bound on p).
    What the larger model adds: ``added_fixed`` (fixed-effect columns, or terms when compared by formula),
    ``boundary_terms`` (random-effect terms, ``"week | patient_id"``, whose variance is zero under the
    smaller model) and ``added_covariances`` (random-effect covariance parameters).
    ``p_value`` is NaN when the larger fit stopped short of the smaller's likelihood (see ``notes``);
    ``statistic`` and ``p_value`` are both NaN when one of the fits is missing (``tested`` is False, and
    ``notes`` starts with "no test: " and the reason).
    """

    smaller: str
    larger: str
    df: int
    statistic: float
    p_value: float
    reference: Reference
    added_fixed: tuple[str, ...]
    boundary_terms: tuple[str, ...]
    added_covariances: int
    notes: tuple[str, ...] = ()
    #: The residual covariance of each model when they differ ("independent → ar1", "ar1h → us"), else "".
    residual_change: str = ""

    @property
    def fixed_differ(self) -> bool:
        return bool(self.added_fixed)

    @property
    def tested(self) -> bool:
        """False for a nested pair listed without a test because one of its fits is missing."""
        return not math.isnan(self.statistic)

    @property
    def test(self) -> str:
        """The reference distribution as text: ``"χ²(1)"``, ``"50:50 mixture of χ²(1) and χ²(2)"``, ..."""
        if self.reference == "mixture":
            return f"50:50 mixture of χ²({self.df - 1}) and χ²({self.df})"
        if self.reference == "chi2-conservative":
            return f"χ²({self.df}), conservative"
        return f"χ²({self.df})"


@dataclass(frozen=True, eq=False)
class Selection:
    """The model comparison, with every statistic the report shows about it.

    ``table`` has exactly the columns of ``model_comparison.csv`` (:data:`MODEL_COMPARISON_COLUMNS`).
    ``aicc`` maps each candidate to its AICc (NaN where undefined), shown for reference and not used to
    select. ``tests`` holds the likelihood-ratio test of every nested pair of candidates, smaller first;
    ``tests_refused`` says why there are none when the candidates cannot be compared by likelihood
    (REML fits, different rows), "" otherwise. A selection assembled without them (the defaults) shows
    no AICc and no test.
    """

    criterion: Literal["aic", "bic"]
    table: pd.DataFrame
    selected: str
    aicc: Mapping[str, float] = field(default_factory=dict)
    tests: tuple[LikelihoodRatioTest, ...] = ()
    tests_refused: str = ""


# --------------------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class RunResult:
    """Where a finished run lives and what it chose."""

    run_dir: Path
    selected: str | None
    rows_read: int
    rows_analysed: int
    rows_quarantined: int


# ---------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True, eq=False)
class FactorRanef:
    """The conditional modes of one grouping factor's random effects: ``modes`` and ``cond_sd`` are
    (levels × terms), rows in the order of ``levels``, columns the terms of all bars on that factor."""

    group: str
    levels: np.ndarray
    terms: tuple[str, ...]
    modes: np.ndarray
    cond_sd: np.ndarray


@dataclass(frozen=True, eq=False)
class EngineResult:
    """What ``fit_lmm`` estimated, in the order of the design's columns and bars.

    ``deviance`` is the ML deviance (−2 log-likelihood) or the REML criterion. ``covariances[k]`` is the
    covariance matrix of bar k's random effects (σ² Λ_k Λ_k'). ``modes`` (G × q) are the conditional modes
    of the random effects, ``cond_sd`` their conditional standard deviations; columns follow
    ``Design.Z`` (with several grouping factors: those of the primary factor ``Design.group`` only, columns
    the terms of its bars). ``ranef`` holds the modes of every grouping factor, in formula order of first
    appearance. ``evaluations`` counts deviance evaluations of all optimizer runs.
    """

    reml: bool
    theta: np.ndarray
    deviance: float
    beta: np.ndarray
    vcov: np.ndarray
    sigma: float
    covariances: tuple[np.ndarray, ...]
    modes: np.ndarray
    cond_sd: np.ndarray
    fitted: np.ndarray
    residuals: np.ndarray
    converged: bool
    singular: bool
    messages: tuple[str, ...]
    gradient_max: float
    evaluations: int
    attempts: tuple[OptimizerAttempt, ...]
    ranef: tuple[FactorRanef, ...] = ()

    @property
    def loglik(self) -> float:
        """The maximized log-likelihood (ML) or REML log-likelihood (REML): −deviance / 2."""
        return -0.5 * self.deviance


# --------------------------------------------------------------------------------------------- curation


@dataclass(frozen=True)
class Duplicate:
    path: str
    sha256: str
    same_as: str
    seen_at: str


@dataclass(frozen=True)
class Curated:
    """What a run analyses (all data so far), what this run added, and what it passed over."""

    ingested: Ingested
    new_files: tuple[str, ...]
    duplicates: tuple[Duplicate, ...]
    skipped: tuple[str, ...] = ()
    """Entries of the landing folder or the glob not read (links, FIFOs, ...), one sentence each."""


# ---------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ExplainedVariance:
    """The variance components behind the ICC and R² of one fit, and those ratios (computed by
    ``longitudinal.inference.variance.explained_variance``, which documents each one)."""

    fixed: float
    random: float
    residual: float

    @property
    def icc(self) -> float:
        """Adjusted ICC: the share of the variance left after the fixed effects that lies between groups."""
        return self.random / (self.random + self.residual)

    @property
    def r2_marginal(self) -> float:
        """Share of the total variance explained by the fixed effects alone."""
        return self.fixed / (self.fixed + self.random + self.residual)

    @property
    def r2_conditional(self) -> float:
        """Share of the total variance explained by the fixed and random effects together."""
        return (self.fixed + self.random) / (self.fixed + self.random + self.residual)


@dataclass(frozen=True, eq=False)
class MarginalEstimates:
    """Estimated marginal means of the reported model and each group against the reference group (emmeans').

    ``by`` and ``at`` name the columns of the grid (``estimates.by``, the ``at`` columns in order). ``means``
    is ``marginal_means.csv`` (columns: the ``by`` column, the ``at`` columns, ``estimate, se, df, ci_low,
    ci_high``) and ``contrasts`` is ``contrasts.csv`` (``contrast`` as "<level> - <reference level>", or
    "<level> / <reference level>" for a ratio; levels that are all numbers are prefixed with the column's
    name, "Diet2 - Diet1", as emmeans labels them; the ``at`` columns, ``estimate, se, df, ci_low, ci_high,
    p_value, adjustment``). Rows run through the ``at`` combinations (the first ``at`` column slowest), levels
    fastest. ``scale`` says what the means are ("outcome"; "probability" or "rate" for a GLMM, on the
    response scale), ``ratio`` what a GLMM's contrasts are ("odds ratio", "rate ratio"; None for
    differences), ``notes`` sentences for the report: where the grid is, what was held at its mean or
    averaged, how the contrasts were adjusted, or why there are none.
    """

    by: str | None
    at: tuple[str, ...]
    means: pd.DataFrame
    contrasts: pd.DataFrame
    scale: str
    ratio: str | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class ReportedModel:
    """The selected model as the report states it (``longitudinal.inference.reported.report_inference``):
    ``fit`` with its fixed effects tested on the study's df method and its variance components' profile
    intervals, the marginal ``estimates`` the study asks for, and its ICC and R² (``explained``)."""

    fit: Fit
    estimates: MarginalEstimates | None = None
    explained: ExplainedVariance | None = None
    df_method: str | None = None
    """The df method the fixed effects were tested with: the study's ``models.df``, or "normal" where that
    method could not be computed for this fit (its message says why); None for a failed fit."""


@dataclass(frozen=True, eq=False)
class ReportInputs:
    """Everything the report shows, as records: the run, its data accounting, its fits and its timings.

    ``fits`` are the ML fits of every candidate (failed ones included); ``selection`` their comparison,
    with the AICc and likelihood-ratio tests shown beside it; ``selected`` is the REML refit of the
    chosen candidate. ``timings`` follows the manifest: ``{"stages": {stage: s}, "fits": {name: s}}``
    (other keys are shown as they are); ``versions`` maps package names to version strings.
    """

    study: str
    run_id: str
    created: str
    config: StudyConfig
    files: tuple[SourceFile, ...]
    validated: Validated
    selection: Selection
    fits: tuple[Fit, ...]
    selected: Fit
    timings: Mapping[str, Any] = field(default_factory=dict)
    estimates: MarginalEstimates | None = None
    """The selected model's marginal means and contrasts (the study's ``estimates``); None without that section."""
    explained: ExplainedVariance | None = None
    """The selected model's ICC and R² (None where they are not defined: an MMRM, a failed fit)."""
    df_method: str | None = None
    """The df method the selected model's fixed effects were tested with (``ReportedModel.df_method``); None:
    the study's ``models.df``."""

    @property
    def df_used(self) -> str:
        """The df method of the reported fixed effects: ``df_method``, else the study's ``models.df``."""
        return self.df_method if self.df_method is not None else self.config.models.df
    versions: Mapping[str, str | None] = field(default_factory=dict)
