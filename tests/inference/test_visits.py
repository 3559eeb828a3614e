"""Per-visit counts and means, and the dropout pattern, on tiny hand-built frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from longitudinal.inference.visits import MAX_VISITS, N_VISIT_BINS, summarize_visits


def two_arms() -> pd.DataFrame:
    # a, b in arm x; c, d in arm y. b misses week 1 (an intermittent gap, not dropout); c leaves after week 1,
    # d after week 0.
    return pd.DataFrame({
        "id": ["a", "a", "a", "b", "b", "c", "c", "d"],
        "week": [0.0, 1, 2, 0, 2, 0, 1, 0],
        "y": [1.0, 2, 3, 4, 5, 6, 7, 8],
        "arm": ["x", "x", "x", "x", "x", "y", "y", "y"],
    })


def cell(table: pd.DataFrame, visit: int, group: str) -> pd.Series:
    return table.set_index(["visit", "group"]).loc[(visit, group)]


def test_subjects_and_mean_sd_per_visit_and_group() -> None:
    summary = summarize_visits(two_arms(), "id", "week", "y", "arm")
    assert summary.groups == ("x", "y") and not summary.binned and summary.n_times == 3
    assert summary.visits["time_low"].tolist() == [0.0, 1.0, 2.0]
    first = cell(summary.per_visit, 0, "x")
    assert first["subjects"] == 2 and first["mean"] == pytest.approx(2.5)
    assert first["sd"] == pytest.approx(np.std([1.0, 4.0], ddof=1))
    alone = cell(summary.per_visit, 1, "y")
    assert alone["subjects"] == 1 and alone["mean"] == 7.0 and np.isnan(alone["sd"])
    empty = cell(summary.per_visit, 2, "y")
    assert empty["subjects"] == 0 and np.isnan(empty["mean"])
    assert len(summary.per_visit) == 3 * 2


def test_last_seen_counts_a_gap_at_the_last_visit_and_the_share_still_observed_falls() -> None:
    dropout = summarize_visits(two_arms(), "id", "week", "y", "arm").dropout
    assert [cell(dropout, v, "x")["last_seen"] for v in range(3)] == [0, 0, 2]
    assert [cell(dropout, v, "y")["last_seen"] for v in range(3)] == [1, 1, 0]
    assert [cell(dropout, v, "y")["still_observed"] for v in range(3)] == [2, 1, 0]
    assert [cell(dropout, v, "y")["share_still_observed"] for v in range(3)] == [1.0, 0.5, 0.0]
    assert [cell(dropout, v, "x")["share_still_observed"] for v in range(3)] == [1.0, 1.0, 1.0]


def test_without_a_group_all_subjects_are_one_group() -> None:
    summary = summarize_visits(two_arms(), "id", "week", "y")
    assert summary.groups == ("all",)
    assert summary.per_visit["subjects"].tolist() == [4, 2, 2]
    assert summary.dropout["last_seen"].tolist() == [1, 1, 2]
    assert summary.dropout["share_still_observed"].tolist() == [1.0, 0.75, 0.5]


def test_a_compound_subject_is_the_combination_of_its_columns_and_a_missing_part_is_left_out() -> None:
    # Side labels repeat across dogs: D1/L and D2/L are two subjects; the row with no side counts nowhere.
    visits = pd.DataFrame({
        "dog": ["D1", "D1", "D2", "D2", "D2"],
        "side": ["L", "L", "L", "R", None],
        "week": [0.0, 1, 0, 0, 1],
        "y": [1.0, 2, 3, 4, 5],
    })
    summary = summarize_visits(visits, ["dog", "side"], "week", "y")
    assert summary.per_visit["subjects"].tolist() == [3, 1]
    assert summary.per_visit["mean"].tolist() == [pytest.approx(8 / 3), 2.0]
    assert summary.dropout["last_seen"].tolist() == [2, 1]


def test_many_distinct_times_are_cut_into_quantile_bins() -> None:
    n = MAX_VISITS + 10
    visits = pd.DataFrame({"id": np.repeat(["a", "b"], n), "t": np.tile(np.arange(n, dtype=float), 2),
                           "y": np.ones(2 * n)})
    summary = summarize_visits(visits, "id", "t", "y")
    assert summary.binned and summary.n_times == n
    assert len(summary.visits) == N_VISIT_BINS
    assert summary.visits["time_low"].iloc[0] == 0.0 and summary.visits["time_high"].iloc[-1] == n - 1
    assert (summary.visits["time_low"].iloc[1:].to_numpy() > summary.visits["time_high"].iloc[:-1].to_numpy()).all()
    assert summary.per_visit["subjects"].tolist() == [2] * N_VISIT_BINS
    assert summary.dropout["last_seen"].tolist() == [0] * (N_VISIT_BINS - 1) + [2]


def test_up_to_the_limit_each_distinct_time_is_a_visit() -> None:
    visits = pd.DataFrame({"id": "a", "t": np.arange(MAX_VISITS, dtype=float), "y": 1.0})
    summary = summarize_visits(visits, "id", "t", "y")
    assert not summary.binned and len(summary.visits) == MAX_VISITS


def test_a_boolean_outcome_is_averaged_as_the_proportion_of_ones() -> None:
    visits = pd.DataFrame({"id": ["a", "b", "c", "a"], "t": [0.0, 0, 0, 1], "y": [True, False, True, False]})
    summary = summarize_visits(visits, "id", "t", "y")
    assert summary.per_visit["mean"].tolist() == [pytest.approx(2 / 3), 0.0]


def test_rows_without_time_or_outcome_are_not_observations() -> None:
    visits = pd.DataFrame({"id": ["a", "a", "b"], "t": [0.0, np.nan, 1], "y": [1.0, 2, np.nan]})
    summary = summarize_visits(visits, "id", "t", "y")
    assert summary.visits["time_low"].tolist() == [0.0]
    assert summary.per_visit["subjects"].tolist() == [1]
