from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from longitudinal import design as design_module
from longitudinal.design import build_design
from longitudinal.errors import FormulaError
from longitudinal.formula import parse_formula


@pytest.fixture
def visits() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        "g": np.repeat(["s3", "s1", "s2", "s4"], 4),
        "t": np.tile([0.0, 1.0, 2.0, 3.0], 4),
        "arm": np.repeat(["treatment", "control", "control", "treatment"], 4),
        "site": np.repeat(["2", "1", "3", "1"], 4),
        "y": rng.normal(size=16),
    })


def test_names_follow_lme4(visits: pd.DataFrame) -> None:
    design = build_design(visits, parse_formula("y ~ t * arm + site + I(t^2) + (t | g)"))
    assert set(design.fixed_names) == {
        "(Intercept)", "t", "armtreatment", "site2", "site3", "I(t^2)", "t:armtreatment",
    }
    assert design.blocks[0].terms == ("(Intercept)", "t")


def test_treatment_coding_uses_the_first_sorted_level_as_reference(visits: pd.DataFrame) -> None:
    design = build_design(visits, parse_formula("y ~ arm + (1 | g)"))
    column = design.X[:, design.fixed_names.index("armtreatment")]
    np.testing.assert_array_equal(column, (visits["arm"] == "treatment").to_numpy(dtype=float))


def test_values_of_derived_terms(visits: pd.DataFrame) -> None:
    design = build_design(visits, parse_formula("y ~ I(t^2) + log(t + 1) + (0 + t | g)"))
    np.testing.assert_allclose(design.X[:, design.fixed_names.index("I(t^2)")], visits["t"] ** 2)
    np.testing.assert_allclose(design.X[:, design.fixed_names.index("log(t + 1)")], np.log(visits["t"] + 1))
    assert design.blocks[0].terms == ("t",)
    np.testing.assert_allclose(design.blocks[0].Z[:, 0], visits["t"])


def test_groups_are_coded_in_sorted_order(visits: pd.DataFrame) -> None:
    design = build_design(visits, parse_formula("y ~ t + (1 | g)"))
    assert list(design.levels) == ["s1", "s2", "s3", "s4"]
    assert list(design.levels[design.codes[:4]]) == ["s3"] * 4
    assert design.n_obs == 16 and design.n_groups == 4


def test_uncorrelated_slope_gives_two_blocks(visits: pd.DataFrame) -> None:
    design = build_design(visits, parse_formula("y ~ t + (t || g)"))
    assert [b.terms for b in design.blocks] == [("(Intercept)",), ("t",)]
    assert design.Z.shape == (16, 2)


def test_rank_deficient_columns_are_dropped_and_listed(visits: pd.DataFrame) -> None:
    data = visits.assign(t2=visits["t"] * 2)
    design = build_design(data, parse_formula("y ~ t + t2 + (1 | g)"))
    assert design.fixed_names == ("(Intercept)", "t")
    assert design.dropped == ("t2",)
    assert design.X.shape == (16, 2)


def test_the_rank_check_by_blocks_of_rows_agrees_with_one_qr(
    visits: pd.DataFrame, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(design_module, "_QR_BLOCK_ROWS", 3)  # 16 rows: six blocks, the last of one row
    data = visits.assign(t2=visits["t"] * 2 - 1)  # = 2 t - intercept: a combination of earlier columns
    design = build_design(data, parse_formula("y ~ t + arm + t2 + (1 | g)"))
    assert design.fixed_names == ("(Intercept)", "t", "armtreatment")  # R's order: formula order within a degree
    assert design.dropped == ("t2",)
    X = np.column_stack([design.X, data["t2"].to_numpy()])
    np.testing.assert_allclose(
        np.abs(np.diag(design_module._r_factor(X))), np.abs(np.diag(np.linalg.qr(X, mode="r"))), atol=1e-12,
    )


def test_missing_values_must_not_reach_the_design(visits: pd.DataFrame) -> None:
    data = visits.assign(t=visits["t"].where(visits.index != 3))
    with pytest.raises(FormulaError, match=r"column 't' has missing values"):
        build_design(data, parse_formula("y ~ t + (1 | g)"))


def test_input_frame_is_not_modified(visits: pd.DataFrame) -> None:
    before = visits.copy()
    build_design(visits, parse_formula("y ~ t * arm + (t | g)"))
    pd.testing.assert_frame_equal(visits, before)


@pytest.fixture
def dogs() -> pd.DataFrame:
    """Two sides per dog, labels repeating across dogs (so ``side`` alone is not a grouping factor)."""
    rng = np.random.default_rng(4)
    return pd.DataFrame({
        "dog": np.repeat(["d2", "d1", "d3"], 4),
        "side": np.tile(["R", "R", "L", "L"], 3),
        "t": np.tile([0.0, 1.0], 6),
        "y": rng.normal(size=12),
    })


def test_an_interaction_factor_has_one_level_per_combination_labelled_as_lme4(dogs: pd.DataFrame) -> None:
    design = build_design(dogs, parse_formula("y ~ t + (t | dog) + (1 | dog:side)"))
    dog, side = design.blocks
    assert (dog.group, side.group) == ("dog", "dog:side")
    assert list(dog.levels) == ["d1", "d2", "d3"]
    # R: levels(droplevels(dog:side)) -- the first factor varies slowest
    assert list(side.levels) == ["d1:L", "d1:R", "d2:L", "d2:R", "d3:L", "d3:R"]
    assert list(side.levels[side.codes]) == [f"{d}:{s}" for d, s in zip(dogs["dog"], dogs["side"])]
    assert list(dog.levels[dog.codes]) == list(dogs["dog"])


def test_the_primary_factor_is_the_one_with_most_levels(dogs: pd.DataFrame) -> None:
    design = build_design(dogs, parse_formula("y ~ t + (1 | dog/side)"))
    assert design.groups == ("dog", "dog:side")
    assert not design.single_factor
    assert design.group == "dog:side" and design.n_groups == 6
    assert design.levels_of("dog") == 3
    np.testing.assert_array_equal(design.codes, design.blocks[1].codes)


def test_one_factor_designs_keep_their_single_group(dogs: pd.DataFrame) -> None:
    design = build_design(dogs, parse_formula("y ~ t + (t || dog)"))
    assert design.single_factor and design.groups == ("dog",)
    assert design.group == "dog" and list(design.levels) == ["d1", "d2", "d3"]
    assert all(block.codes is design.codes for block in design.blocks)
