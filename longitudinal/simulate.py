"""Simulate longitudinal studies with known parameters: the example study, the tests, the benchmarks.

The model is a two-arm trial with a random intercept and a random slope per subject::

    score_ij = b0 + b_week * week_ij + b_arm * treated_i + b_int * week_ij * treated_i + b_age * age_i
               + site_effect[site_i] + u0_i + u1_i * week_ij + e_ij

    (u0_i, u1_i) ~ N(0, [[sd0², rho·sd0·sd1], [rho·sd0·sd1, sd1²]]),   e_ij ~ N(0, sd_e²)

which is exactly what ``score ~ week * arm + age + (week | patient_id)`` (plus ``site`` when its effects
are not zero) fits. Dropout is completely at random (MCAR): every subject attends ``min_visits`` visits,
then before each further scheduled visit drops out with ``dropout_probability``, so that maximum
likelihood stays unbiased and moment checks stay simple. Everything is vectorised over rows; the only
per-subject work is array arithmetic, so two million rows take a few seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from longitudinal.errors import ConfigError

# The kinds of deliberately bad rows, injected in this order (then round again) when n_bad_rows > 0.
BAD_ROW_KINDS: tuple[str, ...] = (
    "outcome_na",  # score "n/a"
    "outcome_text",  # score "not done"
    "missing_time",  # week left empty
    "exact_duplicate",  # a visit written twice, identically
    "conflicting_duplicate",  # a visit written twice with different scores
    "out_of_range",  # score -999, a missing-value code
)
OUT_OF_RANGE_SCORE = -999.0


@dataclass(frozen=True)
class SimulationSpec:
    """The design and the true parameters of a simulated two-arm trial.

    Time is in weeks: visit k (0-based) happens at week ``k * visit_spacing``. Fixed effects are on the
    scale of ``score ~ week * arm + age`` with "control" as the reference arm and ``age`` in years (not
    centred). ``site_effects[k-1]`` is added for subjects at site k; ``len(site_effects)`` is the number
    of sites. Subjects are randomised 1:1 (exactly balanced up to one subject) and spread evenly over sites.
    ``decimals`` rounds the score as a case report form would (None keeps full precision).
    """

    n_subjects: int = 300
    min_visits: int = 4
    max_visits: int = 8
    visit_spacing: float = 1.0
    dropout_probability: float = 0.15
    intercept: float = 40.0
    week_slope: float = -1.0
    arm_effect: float = 0.5
    week_arm_interaction: float = -1.0
    age_effect: float = 0.2
    age_mean: float = 45.0
    age_sd: float = 12.0
    age_range: tuple[float, float] = (18.0, 80.0)
    site_effects: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    random_intercept_sd: float = 7.0
    random_slope_sd: float = 0.8
    random_correlation: float = -0.45
    residual_sd: float = 4.0
    decimals: int | None = 2
    seed: int = 20240601
    n_bad_rows: int = 0

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.n_subjects >= 1, f"n_subjects must be at least 1, got {self.n_subjects}"),
            (self.min_visits >= 1, f"min_visits must be at least 1, got {self.min_visits}"),
            (
                self.max_visits >= self.min_visits,
                f"max_visits ({self.max_visits}) must be at least min_visits ({self.min_visits})",
            ),
            (self.visit_spacing > 0, f"visit_spacing must be positive, got {self.visit_spacing}"),
            (
                0.0 <= self.dropout_probability <= 1.0,
                f"dropout_probability must be in [0, 1], got {self.dropout_probability}",
            ),
            (len(self.site_effects) >= 1, "site_effects needs one value per site (at least one site)"),
            (self.age_range[0] < self.age_range[1], f"age_range must be (low, high), got {self.age_range}"),
            (self.age_sd >= 0, f"age_sd must be non-negative, got {self.age_sd}"),
            (
                self.random_intercept_sd >= 0,
                f"random_intercept_sd must be non-negative, got {self.random_intercept_sd}",
            ),
            (self.random_slope_sd >= 0, f"random_slope_sd must be non-negative, got {self.random_slope_sd}"),
            (
                -1.0 <= self.random_correlation <= 1.0,
                f"random_correlation must be in [-1, 1], got {self.random_correlation}",
            ),
            (self.residual_sd > 0, f"residual_sd must be positive, got {self.residual_sd}"),
            (self.n_bad_rows >= 0, f"n_bad_rows must be non-negative, got {self.n_bad_rows}"),
            (
                self.n_bad_rows <= self.n_subjects,
                f"n_bad_rows ({self.n_bad_rows}) can be at most n_subjects ({self.n_subjects}): "
                "each bad row goes to a different subject",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"simulation: {message}; change that setting")

    @property
    def n_sites(self) -> int:
        return len(self.site_effects)


def true_parameters(spec: SimulationSpec) -> dict[str, Any]:
    """The parameters the data were drawn from, named as lme4 names them.

    ``fixed_effects`` are the terms of ``score ~ week * arm + age``; site 1 is absorbed into the
    intercept, and ``site_effects`` holds the contrasts ``site2``, ... against site 1 (what a model
    with ``site`` as a factor estimates). ``random_effects`` are standard deviations per term.
    """
    return {
        "fixed_effects": {
            "(Intercept)": spec.intercept + spec.site_effects[0],
            "week": spec.week_slope,
            "armtreatment": spec.arm_effect,
            "age": spec.age_effect,
            "week:armtreatment": spec.week_arm_interaction,
        },
        "site_effects": {
            f"site{k + 1}": spec.site_effects[k] - spec.site_effects[0] for k in range(1, spec.n_sites)
        },
        "random_effects": {"(Intercept)": spec.random_intercept_sd, "week": spec.random_slope_sd},
        "correlation": spec.random_correlation,
        "residual_sd": spec.residual_sd,
    }


def simulate_trial(spec: SimulationSpec) -> pd.DataFrame:
    """Draw one trial: columns ``patient_id, week, arm, age, site, score``, one row per attended visit.

    Rows are sorted by subject then week. Without bad rows, ``week`` is integer when the spacing is a
    whole number (float otherwise), ``age`` and ``site`` are integers and ``score`` is float. With
    ``n_bad_rows > 0`` the frame is what a messy export looks like: ``score`` becomes an object column
    mixing floats and text ("n/a", "not done"), ``week`` a nullable column with a missing value, and
    duplicated visits are appended at the end (see ``inject_bad_rows``). The clean rows are the same
    draw with or without bad rows (the bad rows use their own random stream).
    """
    rng = np.random.default_rng(spec.seed)
    n = spec.n_subjects

    extra_possible = spec.max_visits - spec.min_visits
    if spec.dropout_probability > 0.0 and extra_possible > 0:
        # Visits kept after the guaranteed ones = failures before the first dropout, capped.
        extra = np.minimum(rng.geometric(spec.dropout_probability, size=n) - 1, extra_possible)
    else:
        extra = np.full(n, extra_possible)
    visits_per_subject = spec.min_visits + extra

    treated = rng.permutation(np.arange(n) % 2 == 1)
    site = rng.permutation(np.arange(n) % spec.n_sites) + 1
    age = np.clip(np.round(rng.normal(spec.age_mean, spec.age_sd, size=n)), *spec.age_range).astype(np.int64)

    sd0, sd1, rho = spec.random_intercept_sd, spec.random_slope_sd, spec.random_correlation
    z = rng.standard_normal((n, 2))
    u0 = sd0 * z[:, 0]
    u1 = sd1 * (rho * z[:, 0] + math.sqrt(max(0.0, 1.0 - rho * rho)) * z[:, 1])

    subject = np.repeat(np.arange(n), visits_per_subject)
    starts = np.concatenate(([0], np.cumsum(visits_per_subject)[:-1]))
    visit = np.arange(len(subject)) - np.repeat(starts, visits_per_subject)
    week = visit * spec.visit_spacing

    site_effects = np.asarray(spec.site_effects, dtype=float)
    subject_level = (
        spec.intercept
        + spec.arm_effect * treated
        + spec.age_effect * age
        + site_effects[site - 1]
        + u0
    )
    subject_slope = spec.week_slope + spec.week_arm_interaction * treated + u1
    score = (
        subject_level[subject]
        + subject_slope[subject] * week
        + rng.normal(0.0, spec.residual_sd, size=len(subject))
    )
    if spec.decimals is not None:
        score = np.round(score, spec.decimals)

    width = max(4, len(str(n)))
    ids = np.array([f"P{i + 1:0{width}d}" for i in range(n)], dtype=object)
    whole_weeks = float(spec.visit_spacing).is_integer()
    frame = pd.DataFrame(
        {
            "patient_id": ids[subject],
            "week": visit * int(spec.visit_spacing) if whole_weeks else week,
            "arm": np.where(treated, "treatment", "control")[subject],
            "age": age[subject],
            "site": site[subject],
            "score": score,
        }
    )
    if spec.n_bad_rows == 0:
        return frame
    return inject_bad_rows(frame, spec.n_bad_rows, seed=spec.seed)


def inject_bad_rows(frame: pd.DataFrame, n_bad_rows: int, *, seed: int) -> pd.DataFrame:
    """Return a copy of a clean trial with ``n_bad_rows`` deliberately bad rows, one per subject.

    The kinds cycle through ``BAD_ROW_KINDS``. Four kinds overwrite a visit in place (score "n/a",
    score "not done", an empty week, score -999); the two duplicate kinds append a copy of a visit at
    the end, identical or with the score changed by +5. So the result has ``len(frame)`` plus the number
    of duplicate kinds rows. Its ``score`` column is object (floats and text) and ``week`` is nullable.
    """
    rng = np.random.default_rng([seed, 1])
    subjects = frame["patient_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, subjects[1:] != subjects[:-1]])
    counts = np.diff(np.r_[starts, len(frame)])
    chosen = rng.choice(len(starts), size=n_bad_rows, replace=False)
    rows = starts[chosen] + rng.integers(0, counts[chosen])
    kinds = [BAD_ROW_KINDS[k % len(BAD_ROW_KINDS)] for k in range(n_bad_rows)]

    score = frame["score"].astype(object).to_numpy(copy=True)
    week = frame["week"].astype("Float64" if frame["week"].dtype.kind == "f" else "Int64").copy()
    appended: list[pd.DataFrame] = []
    for row, kind in zip(rows, kinds):
        if kind == "outcome_na":
            score[row] = "n/a"
        elif kind == "outcome_text":
            score[row] = "not done"
        elif kind == "missing_time":
            week.iloc[row] = pd.NA
        elif kind == "out_of_range":
            score[row] = OUT_OF_RANGE_SCORE
        elif kind == "exact_duplicate":
            appended.append(frame.iloc[[row]])
        elif kind == "conflicting_duplicate":
            appended.append(frame.iloc[[row]].assign(score=round(float(frame["score"].iloc[row]) + 5.0, 10)))
    bad = frame.assign(week=week, score=pd.Series(score, index=frame.index, dtype=object))
    if not appended:
        return bad
    extra = pd.concat(appended).astype({"score": object, "week": week.dtype})
    return pd.concat([bad, extra], ignore_index=True)


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a frame as CSV or Parquet, chosen by the suffix (.csv, .parquet); return the path.

    CSV has no index column and missing values as empty fields. Parquet goes through pyarrow; an object
    column mixing numbers and text (a score column with bad rows) is stored as text, because Parquet
    columns have one type. Missing parent folders are created.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in {".csv", ".parquet"}:
        raise ConfigError(f"cannot write '{target}': the file name must end in .csv or .parquet")
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.to_csv(target, index=False)
        return target
    mixed = {
        column: frame[column].map(lambda v: v if v is None or pd.isna(v) else str(v)).astype("string")
        for column in frame.columns
        if frame[column].dtype == object
    }
    frame.assign(**mixed).to_parquet(target, index=False, engine="pyarrow")
    return target


def truth_path(data_path: str | Path) -> Path:
    """Where :func:`write_truth` puts the true parameters of the data at ``data_path``: ``trial.csv`` →
    ``trial.truth.json``, next to the data (not a .csv/.parquet file, so a study never ingests it)."""
    return Path(data_path).with_suffix(".truth.json")


def write_truth(spec: SimulationSpec | BinarySpec, data_path: str | Path) -> Path:
    """Write the parameters the data at ``data_path`` were drawn from, so recovery can be checked.

    The JSON holds ``model`` (the lme4 formula whose parameters these are), ``parameters``
    (:func:`true_parameters` or :func:`true_binary_parameters`: fixed effects named as lme4 names them,
    random-effect SDs, their correlation, the residual SD of a Gaussian outcome) and ``spec`` (every setting
    of the simulation, the seed included).
    """
    target = truth_path(data_path)
    if isinstance(spec, BinarySpec):
        model, parameters = f"{BINARY_FORMULA}  (glmer, family = binomial)", true_binary_parameters(spec)
    else:
        model = "score ~ week * arm + age + (week | patient_id)" + ("  (plus site as a factor)" if any(spec.site_effects) else "")
        parameters = true_parameters(spec)
    document = {"data": Path(data_path).name, "model": model, "parameters": parameters, "spec": asdict(spec)}
    target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return target



# ----------------------------------------------------------------------------------- an MMRM trial


@dataclass(frozen=True)
class MmrmSpec:
    """A two-arm trial with scheduled visits, analysed as a mixed model for repeated measures (MMRM).

    Subjects are seen at ``weeks`` (unequally spaced, as trial schedules are); the score's mean per visit
    is ``control_means`` in the control arm, plus ``treatment_effects`` in the treatment arm. The
    covariance of a subject's scores has standard deviations ``sds`` per visit and correlations
    ``shared + (1 − shared) · rho^lag`` (lag in visit positions): a subject-level part plus AR(1) decay,
    i.e. exactly ``(1 | id) + ar1h(visit | id)``, which no simpler structure reproduces and which ``us``
    contains. After the first visit each subject leaves before a visit with ``dropout_probability``
    (completely at random) and misses a single visit with ``missed_probability``.
    """

    n_subjects: int = 240
    weeks: tuple[int, ...] = (0, 2, 4, 8, 12, 16)
    control_means: tuple[float, ...] = (50.0, 48.5, 47.6, 46.9, 46.4, 46.0)
    treatment_effects: tuple[float, ...] = (0.0, -0.6, -1.4, -2.2, -2.9, -3.4)
    sds: tuple[float, ...] = (4.0, 4.3, 4.7, 5.2, 5.6, 6.0)
    shared: float = 0.35
    rho: float = 0.6
    dropout_probability: float = 0.06
    missed_probability: float = 0.04
    decimals: int = 2
    seed: int = 20261130

    def __post_init__(self) -> None:
        m = len(self.weeks)
        if not (len(self.control_means) == len(self.treatment_effects) == len(self.sds) == m >= 2):
            raise ConfigError("simulation: weeks, control_means, treatment_effects and sds need one value per "
                              "visit (at least two visits)")
        if not (0.0 <= self.shared < 1.0 and -1.0 < self.rho < 1.0 and min(self.sds) > 0):
            raise ConfigError("simulation: shared must be in [0, 1), rho in (-1, 1) and every sd positive")

    @property
    def covariance(self) -> np.ndarray:
        """The true covariance of one subject's scores over the visits."""
        m = len(self.weeks)
        lag = np.abs(np.subtract.outer(np.arange(m), np.arange(m)))
        correlation = self.shared + (1.0 - self.shared) * self.rho ** lag
        sds = np.asarray(self.sds)
        return correlation * np.outer(sds, sds)


def simulate_mmrm_trial(spec: MmrmSpec) -> pd.DataFrame:
    """Draw one MMRM trial: columns ``patient_id, week, arm, score``, one row per attended visit, sorted."""
    rng = np.random.default_rng(spec.seed)
    n, m = spec.n_subjects, len(spec.weeks)
    treated = rng.permutation(np.arange(n) % 2 == 1)
    means = np.asarray(spec.control_means) + np.outer(treated, spec.treatment_effects)
    scores = means + rng.standard_normal((n, m)) @ np.linalg.cholesky(spec.covariance).T
    stays = np.cumprod(rng.random((n, m)) >= np.r_[0.0, np.full(m - 1, spec.dropout_probability)], axis=1) > 0
    missed = (rng.random((n, m)) < spec.missed_probability) & (np.arange(m) > 0)
    seen = stays & ~missed
    subject, visit = np.nonzero(seen)
    width = max(4, len(str(n)))
    return pd.DataFrame({
        "patient_id": np.array([f"M{i + 1:0{width}d}" for i in range(n)], dtype=object)[subject],
        "week": np.asarray(spec.weeks)[visit],
        "arm": np.where(treated, "treatment", "control")[subject],
        "score": np.round(scores[subject, visit], spec.decimals),
    })


# ---------------------------------------------------------------------------------- a binary trial

#: The model a binary trial is drawn from, in lme4 notation (fitted by glmer with family binomial).
BINARY_FORMULA = "improved ~ week * arm + (week | patient_id)"
#: What ``BinarySpec.n_bad_rows`` writes over outcomes, in turn: an answer that is neither level, and a level
#: in the wrong case (levels are case-sensitive).
BINARY_BAD_OUTCOMES: tuple[str, ...] = ("maybe", "Yes")


@dataclass(frozen=True)
class BinarySpec:
    """A two-arm trial whose outcome is binary: at each weekly visit a symptom has improved or not.

    Every subject is seen at weeks 0, 1, ..., ``n_visits`` − 1; subjects are randomised 1:1. Given the
    subject's random intercept and slope the outcome is Bernoulli with the logistic model::

        logit P(improved_ij) = intercept + week_slope · week_j + arm_effect · treated_i
                               + week_arm_interaction · week_j · treated_i + u0_i + u1_i · week_j

        (u0_i, u1_i) ~ N(0, [[sd0², rho·sd0·sd1], [rho·sd0·sd1, sd1²]])

    exactly what ``glmer(improved ~ week * arm + (week | patient_id), family = binomial)`` fits. The outcome
    is written as ``levels`` ("no" is 0, "yes" is 1). ``n_bad_rows`` visits of different subjects get an
    outcome from :data:`BINARY_BAD_OUTCOMES` instead, drawn from a random stream of their own.
    """

    n_subjects: int = 300
    n_visits: int = 6
    intercept: float = -1.2
    week_slope: float = 0.15
    arm_effect: float = 0.0
    week_arm_interaction: float = 0.3
    random_intercept_sd: float = 1.3
    random_slope_sd: float = 0.4
    random_correlation: float = -0.3
    levels: tuple[str, str] = ("no", "yes")
    seed: int = 20261214
    n_bad_rows: int = 0

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.n_subjects >= 2, f"n_subjects must be at least 2 (one per arm), got {self.n_subjects}"),
            (self.n_visits >= 2, f"n_visits must be at least 2, got {self.n_visits}"),
            (min(self.random_intercept_sd, self.random_slope_sd) >= 0, "random-effect SDs must be non-negative"),
            (-1.0 <= self.random_correlation <= 1.0,
             f"random_correlation must be in [-1, 1], got {self.random_correlation}"),
            (len(set(self.levels)) == 2, f"levels must be two different texts, got {self.levels}"),
            (0 <= self.n_bad_rows <= self.n_subjects,
             f"n_bad_rows ({self.n_bad_rows}) must be from 0 to n_subjects ({self.n_subjects}): each bad row goes "
             "to a different subject"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"simulation: {message}; change that setting")


def true_binary_parameters(spec: BinarySpec) -> dict[str, Any]:
    """The parameters a binary trial was drawn from, named as lme4 names them (log-odds scale)."""
    return {
        "fixed_effects": {
            "(Intercept)": spec.intercept,
            "week": spec.week_slope,
            "armtreatment": spec.arm_effect,
            "week:armtreatment": spec.week_arm_interaction,
        },
        "random_effects": {"(Intercept)": spec.random_intercept_sd, "week": spec.random_slope_sd},
        "correlation": spec.random_correlation,
        "levels": {"0": spec.levels[0], "1": spec.levels[1]},
    }


def simulate_binary_trial(spec: BinarySpec) -> pd.DataFrame:
    """Draw one binary trial: columns ``patient_id, week, arm, improved`` (the outcome as ``spec.levels``),
    one row per visit, sorted by subject then week."""
    rng = np.random.default_rng(spec.seed)
    n, m = spec.n_subjects, spec.n_visits
    treated = rng.permutation(np.arange(n) % 2 == 1)
    sd0, sd1, rho = spec.random_intercept_sd, spec.random_slope_sd, spec.random_correlation
    z = rng.standard_normal((n, 2))
    u0 = sd0 * z[:, 0]
    u1 = sd1 * (rho * z[:, 0] + math.sqrt(max(0.0, 1.0 - rho * rho)) * z[:, 1])
    week = np.arange(m, dtype=np.float64)
    level = spec.intercept + spec.arm_effect * treated + u0
    slope = spec.week_slope + spec.week_arm_interaction * treated + u1
    eta = level[:, None] + slope[:, None] * week
    improved = rng.random((n, m)) < 1.0 / (1.0 + np.exp(-eta))
    width = max(4, len(str(n)))
    outcome = np.where(improved, spec.levels[1], spec.levels[0]).astype(object).reshape(-1)
    if spec.n_bad_rows:
        bad = np.random.default_rng([spec.seed, 1])
        rows = bad.choice(n, size=spec.n_bad_rows, replace=False) * m + bad.integers(0, m, size=spec.n_bad_rows)
        for k, row in enumerate(rows):
            outcome[row] = BINARY_BAD_OUTCOMES[k % len(BINARY_BAD_OUTCOMES)]
    return pd.DataFrame({
        "patient_id": np.repeat(np.array([f"B{i + 1:0{width}d}" for i in range(n)], dtype=object), m),
        "week": np.tile(np.arange(m), n),
        "arm": np.repeat(np.where(treated, "treatment", "control"), m),
        "improved": outcome,
    })

