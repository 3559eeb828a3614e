"""The study simulator: shape, reproducibility, dropout, bad rows, writing, and parameter recovery by
moments (per-subject least squares, not the mixed-model engine)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from longitudinal.errors import ConfigError
from longitudinal.simulate import BAD_ROW_KINDS, SimulationSpec, simulate_trial, true_parameters, write_table

SMALL = SimulationSpec(n_subjects=40, min_visits=3, max_visits=7, dropout_probability=0.3, seed=7)
COLUMNS = ["patient_id", "week", "arm", "age", "site", "score"]


def test_columns_and_types() -> None:
    trial = simulate_trial(SMALL)

    assert list(trial.columns) == COLUMNS
    assert trial["patient_id"].nunique() == 40
    assert trial["patient_id"].iloc[0] == "P0001"
    assert trial["patient_id"].str.fullmatch(r"P\d{4}").all()
    assert set(trial["arm"]) == {"control", "treatment"}
    assert set(trial["site"]) == {1, 2, 3, 4}
    assert pd.api.types.is_integer_dtype(trial["week"])
    assert pd.api.types.is_float_dtype(trial["score"])
    assert not trial.isna().any().any()


def test_subject_level_columns_are_constant_within_subject() -> None:
    per_subject = simulate_trial(SMALL).groupby("patient_id")[["arm", "age", "site"]].nunique()

    assert (per_subject == 1).all().all()


def test_arms_are_balanced() -> None:
    arms = simulate_trial(SMALL).drop_duplicates("patient_id")["arm"].value_counts()

    assert arms["control"] == arms["treatment"] == 20


def test_same_seed_same_data_other_seed_other_data() -> None:
    first = simulate_trial(SMALL)

    pd.testing.assert_frame_equal(first, simulate_trial(SMALL))
    assert not first["score"].equals(simulate_trial(replace(SMALL, seed=8))["score"])


def test_visits_per_subject_within_range_and_consecutive() -> None:
    trial = simulate_trial(SMALL)
    counts = trial.groupby("patient_id").size()

    assert counts.between(3, 7).all()
    assert counts.nunique() > 1  # dropout happened
    # Dropout is monotone: a subject's weeks are 0, 1, ..., k-1 with no gaps.
    expected_weeks = trial.groupby("patient_id").cumcount()
    assert (trial["week"] == expected_weeks).all()


def test_no_dropout_gives_balanced_visits() -> None:
    trial = simulate_trial(replace(SMALL, min_visits=5, max_visits=5, dropout_probability=0.0))

    assert (trial.groupby("patient_id").size() == 5).all()


def test_visit_spacing_sets_the_weeks() -> None:
    spaced = simulate_trial(replace(SMALL, visit_spacing=2.5, dropout_probability=0.0))

    assert pd.api.types.is_float_dtype(spaced["week"])
    assert sorted(spaced["week"].unique()) == [0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0]


def test_no_bad_rows_unless_asked() -> None:
    trial = simulate_trial(SMALL)

    assert not trial.duplicated(["patient_id", "week"]).any()
    assert trial["score"].between(-100, 200).all()


def test_each_kind_of_bad_row_once() -> None:
    clean = simulate_trial(SMALL)
    bad = simulate_trial(replace(SMALL, n_bad_rows=len(BAD_ROW_KINDS)))
    score = bad["score"]

    assert score.dtype == object
    assert (score == "n/a").sum() == 1
    assert (score == "not done").sum() == 1
    assert (score.map(lambda value: not isinstance(value, str) and value == -999.0)).sum() == 1
    assert bad["week"].isna().sum() == 1
    # Two appended visits: one exact copy, one copy with another score.
    assert len(bad) == len(clean) + 2
    keyed = bad.dropna(subset=["week"])
    repeated = keyed[keyed.duplicated(["patient_id", "week"], keep=False)]
    assert len(repeated) == 4
    assert keyed.duplicated(keep=False).sum() == 2
    # Every bad row is in a different subject.
    overwritten = bad[score.map(lambda value: isinstance(value, str) or value == -999.0) | bad["week"].isna()]
    touched = pd.concat([overwritten, repeated])
    assert touched["patient_id"].nunique() == len(BAD_ROW_KINDS)


def test_bad_rows_leave_the_other_rows_untouched() -> None:
    clean = simulate_trial(SMALL)
    bad = simulate_trial(replace(SMALL, n_bad_rows=8)).iloc[: len(clean)]
    changed = (bad["score"].astype(str) != clean["score"].astype(str)) | bad["week"].isna().to_numpy()

    assert changed.sum() == 6  # 8 bad rows: 2 appended duplicates, 6 overwritten visits
    kept = ["patient_id", "week", "arm", "age", "site"]
    pd.testing.assert_frame_equal(bad.loc[~changed, kept], clean.loc[~changed, kept], check_dtype=False)
    assert (bad["score"] == "n/a").sum() == 2  # the kinds cycle


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_visits": 2}, r"max_visits \(2\) must be at least min_visits \(3\)"),
        ({"dropout_probability": 1.5}, r"dropout_probability must be in \[0, 1\], got 1.5"),
        ({"n_bad_rows": 41}, r"n_bad_rows \(41\) can be at most n_subjects \(40\)"),
        ({"residual_sd": 0.0}, r"residual_sd must be positive, got 0.0"),
        ({"random_correlation": -2.0}, r"random_correlation must be in \[-1, 1\], got -2.0"),
    ],
)
def test_invalid_spec_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        replace(SMALL, **changes)


def test_write_table_csv_and_parquet(tmp_path: Path) -> None:
    bad = simulate_trial(replace(SMALL, n_bad_rows=6))

    csv = pd.read_csv(write_table(bad, tmp_path / "trial.csv"), dtype=str, keep_default_na=False)
    assert list(csv.columns) == COLUMNS
    assert len(csv) == len(bad)
    assert {"n/a", "not done", "-999.0"} <= set(csv["score"])
    assert (csv["week"] == "").sum() == 1

    parquet = pd.read_parquet(write_table(bad, tmp_path / "sub" / "trial.parquet"))
    assert len(parquet) == len(bad)
    assert parquet["week"].isna().sum() == 1
    assert {"n/a", "not done"} <= set(parquet["score"].dropna())


def test_write_table_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trial.xlsx'.*must end in .csv or .parquet"):
        write_table(simulate_trial(SMALL), tmp_path / "trial.xlsx")


def test_true_parameters_use_lme4_names() -> None:
    spec = replace(SMALL, site_effects=(1.0, 3.0, -2.0))
    truth = true_parameters(spec)

    assert truth["fixed_effects"] == {
        "(Intercept)": spec.intercept + 1.0,
        "week": spec.week_slope,
        "armtreatment": spec.arm_effect,
        "age": spec.age_effect,
        "week:armtreatment": spec.week_arm_interaction,
    }
    assert truth["site_effects"] == {"site2": 2.0, "site3": -3.0}
    assert truth["random_effects"] == {"(Intercept)": spec.random_intercept_sd, "week": spec.random_slope_sd}
    assert truth["correlation"] == spec.random_correlation
    assert truth["residual_sd"] == spec.residual_sd


def test_parameters_recovered_by_moments() -> None:
    """Per-subject least-squares lines on a balanced design recover every parameter.

    With weeks 0..5 (mean 2.5, Sxx 17.5) each subject's fitted slope is b_i + e-noise with variance
    sigma²/Sxx, and its intercept-slope covariance picks up -sigma²·mean/Sxx from the shared noise.
    """
    spec = SimulationSpec(n_subjects=4000, min_visits=6, max_visits=6, dropout_probability=0.0, seed=11)
    trial = simulate_trial(spec)
    weeks = np.arange(6.0)
    mean_week, sxx = weeks.mean(), ((weeks - weeks.mean()) ** 2).sum()
    scores = trial["score"].to_numpy().reshape(spec.n_subjects, 6)
    slopes = (scores - scores.mean(axis=1, keepdims=True)) @ (weeks - mean_week) / sxx
    intercepts = scores.mean(axis=1) - slopes * mean_week
    residuals = scores - intercepts[:, None] - slopes[:, None] * weeks
    subjects = trial.drop_duplicates("patient_id")
    treated = (subjects["arm"] == "treatment").to_numpy()
    age = subjects["age"].to_numpy(dtype=float)
    sigma2 = spec.residual_sd**2

    sigma_hat = np.sqrt((residuals**2).sum() / (residuals.size - 2 * spec.n_subjects))
    assert sigma_hat == pytest.approx(spec.residual_sd, rel=0.03)

    slope_se = np.sqrt((spec.random_slope_sd**2 + sigma2 / sxx) / (spec.n_subjects / 2))
    assert abs(slopes[~treated].mean() - spec.week_slope) < 4 * slope_se
    assert abs(slopes[treated].mean() - (spec.week_slope + spec.week_arm_interaction)) < 4 * slope_se

    slope_residual = slopes - np.where(treated, slopes[treated].mean(), slopes[~treated].mean())
    slope_sd_hat = np.sqrt(slope_residual.var(ddof=2) - sigma2 / sxx)
    assert slope_sd_hat == pytest.approx(spec.random_slope_sd, rel=0.1)

    design = np.column_stack([np.ones(spec.n_subjects), treated, age])
    coef, *_ = np.linalg.lstsq(design, intercepts, rcond=None)
    assert coef[2] == pytest.approx(spec.age_effect, abs=0.05)
    assert coef[1] == pytest.approx(spec.arm_effect, abs=1.0)
    intercept_residual = intercepts - design @ coef
    expected_cov = (
        spec.random_correlation * spec.random_intercept_sd * spec.random_slope_sd - sigma2 * mean_week / sxx
    )
    assert np.mean(intercept_residual * slope_residual) == pytest.approx(expected_cov, abs=0.4)


def test_simulate_command_writes_the_true_parameters_next_to_the_data(tmp_path: Path) -> None:
    import json

    from flows.cli import main
    from longitudinal.simulate import truth_path

    out = tmp_path / "trial.csv"
    assert main(["simulate", "--out", str(out), "--subjects", "12", "--seed", "5"]) == 0
    truth = json.loads(truth_path(out).read_text(encoding="utf-8"))
    assert truth_path(out) == tmp_path / "trial.truth.json"
    assert truth["data"] == "trial.csv"
    assert truth["spec"]["seed"] == 5 and truth["spec"]["n_subjects"] == 12
    expected = true_parameters(SimulationSpec(n_subjects=12, seed=5))
    assert truth["parameters"]["fixed_effects"] == expected["fixed_effects"]
    assert truth["parameters"]["random_effects"] == expected["random_effects"]
    assert truth["parameters"]["residual_sd"] == expected["residual_sd"]
    assert truth["model"].startswith("score ~ week * arm + age + (week | patient_id)")


# ----------------------------------------------------------------------------------- the MMRM trial


def test_mmrm_trial_has_the_scheduled_visits_and_its_covariance() -> None:
    from longitudinal.simulate import MmrmSpec, simulate_mmrm_trial

    spec = MmrmSpec(n_subjects=20_000, dropout_probability=0.0, missed_probability=0.0, seed=3)
    trial = simulate_mmrm_trial(spec)
    assert list(trial.columns) == ["patient_id", "week", "arm", "score"]
    assert sorted(trial["week"].unique()) == list(spec.weeks)
    wide = trial.pivot(index="patient_id", columns="week", values="score")
    arm = trial.groupby("patient_id")["arm"].first().reindex(wide.index)
    centred = wide - wide.groupby(arm.to_numpy()).transform("mean")
    # the sample covariance of complete subjects recovers the truth (SE of a covariance ≈ 0.01 × its size here)
    np.testing.assert_allclose(np.cov(centred.to_numpy().T), spec.covariance, rtol=0.05, atol=0.3)
    effect = wide[arm == "treatment"].mean() - wide[arm == "control"].mean()
    np.testing.assert_allclose(effect.to_numpy(), spec.treatment_effects, atol=0.25)


def test_mmrm_trial_drops_out_and_misses_visits_but_keeps_every_baseline() -> None:
    from longitudinal.simulate import MmrmSpec, simulate_mmrm_trial

    trial = simulate_mmrm_trial(MmrmSpec(n_subjects=2_000, seed=4))
    per_visit = trial.groupby("week").size()
    assert per_visit.loc[0] == 2_000
    assert per_visit.is_monotonic_decreasing and per_visit.iloc[-1] < 0.8 * 2_000
    assert not trial.duplicated(["patient_id", "week"]).any()


def test_simulate_command_writes_an_mmrm_trial(tmp_path: Path) -> None:
    from flows.cli import main

    out = tmp_path / "mmrm.csv"
    assert main(["simulate", "--design", "mmrm", "--out", str(out), "--subjects", "30", "--seed", "9"]) == 0
    trial = pd.read_csv(out)
    assert trial["patient_id"].nunique() == 30
    assert set(trial["week"]) <= {0, 2, 4, 8, 12, 16}


# ----------------------------------------------------------------------------------- the binary trial


def _binary_moments(spec: Any, treated: bool, draws: int = 400_000) -> tuple[np.ndarray, np.ndarray]:
    """The truth by Monte Carlo over the random effects: P(improved at week j) and P(improved at j and at k)."""
    rng = np.random.default_rng(0)
    sd0, sd1, rho = spec.random_intercept_sd, spec.random_slope_sd, spec.random_correlation
    z = rng.standard_normal((draws, 2))
    u0, u1 = sd0 * z[:, 0], sd1 * (rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1])
    week = np.arange(spec.n_visits)
    eta = (spec.intercept + spec.arm_effect * treated + u0[:, None]
           + (spec.week_slope + spec.week_arm_interaction * treated + u1[:, None]) * week)
    p = 1 / (1 + np.exp(-eta))
    joint = p.T @ p / draws  # off the diagonal: given the random effects, visits are independent
    np.fill_diagonal(joint, p.mean(axis=0))
    return p.mean(axis=0), joint


def test_binary_trial_recovers_the_truth_by_marginal_and_joint_proportions() -> None:
    from longitudinal.simulate import BinarySpec, simulate_binary_trial

    spec = BinarySpec(n_subjects=20_000, seed=21)
    trial = simulate_binary_trial(spec)
    assert list(trial.columns) == ["patient_id", "week", "arm", "improved"]
    assert set(trial["improved"]) == {"no", "yes"}
    assert (trial.groupby("patient_id").size() == 6).all()
    assert (trial.groupby("arm")["patient_id"].nunique() == 10_000).all()
    for arm, treated in (("control", False), ("treatment", True)):
        y = (trial.loc[trial["arm"] == arm, "improved"] == "yes").to_numpy(dtype=float).reshape(-1, 6)
        marginal, joint = _binary_moments(spec, treated)
        # 10,000 subjects per arm: a proportion's SE is at most 0.005; 4 SE
        np.testing.assert_allclose(y.mean(axis=0), marginal, atol=0.02)
        np.testing.assert_allclose(y.T @ y / len(y), joint, atol=0.02)
        # the joint proportions carry the random effects: without them they would be off by more than the tolerance
        _, independent = _binary_moments(replace(spec, random_intercept_sd=0.0, random_slope_sd=0.0), treated)
        assert np.abs(y.T @ y / len(y) - independent).max() > 0.05


def test_binary_trial_bad_rows_and_truth(tmp_path: Path) -> None:
    import json

    from flows.cli import main
    from longitudinal.simulate import BINARY_FORMULA, BinarySpec, simulate_binary_trial, truth_path

    clean = simulate_binary_trial(BinarySpec(n_subjects=40, seed=2))
    messy = simulate_binary_trial(BinarySpec(n_subjects=40, seed=2, n_bad_rows=3))
    changed = messy["improved"] != clean["improved"]
    assert sorted(messy.loc[changed, "improved"]) == ["Yes", "maybe", "maybe"]
    assert messy.loc[changed, "patient_id"].nunique() == 3
    assert messy.loc[~changed].equals(clean.loc[~changed])  # the other rows are the same draw

    out = tmp_path / "binary.csv"
    assert main(["simulate", "--design", "binary", "--out", str(out), "--subjects", "30", "--seed", "9",
                 "--bad-rows", "1"]) == 0
    written = pd.read_csv(out, keep_default_na=False)
    assert written["patient_id"].nunique() == 30 and (written["improved"] == "maybe").sum() == 1
    truth = json.loads(truth_path(out).read_text(encoding="utf-8"))
    assert truth["model"].startswith(BINARY_FORMULA)
    assert truth["parameters"]["fixed_effects"] == {"(Intercept)": -1.2, "week": 0.15, "armtreatment": 0.0,
                                                    "week:armtreatment": 0.3}
    assert truth["parameters"]["random_effects"] == {"(Intercept)": 1.3, "week": 0.4}
    assert truth["spec"]["seed"] == 9 and "residual_sd" not in truth["parameters"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_subjects": 1}, "n_subjects must be at least 2"),
    ({"levels": ("yes", "yes")}, "levels must be two different texts"),
    ({"n_bad_rows": 500}, r"n_bad_rows \(500\) must be from 0 to n_subjects \(300\)"),
])
def test_invalid_binary_spec_is_refused(changes: dict[str, Any], message: str) -> None:
    from longitudinal.simulate import BinarySpec

    with pytest.raises(ConfigError, match=rf"^simulation: {message}"):
        BinarySpec(**changes)
