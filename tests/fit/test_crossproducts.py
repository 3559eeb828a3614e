"""Per-group cross-products of a design whose bars view its X: the same bits as with bars of their own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.lmm.crossproducts import compute_crossproducts
from longitudinal.fit.scaling import standardize
from longitudinal.model.design import build_design, fixed_view
from longitudinal.model.formula import parse_formula


@pytest.fixture
def visits() -> pd.DataFrame:
    rng = np.random.default_rng(21)
    return pd.DataFrame({
        "g": np.repeat([f"s{i:02d}" for i in range(15)], 4),
        "t": rng.uniform(0.0, 5.0, size=60),
        "arm": np.repeat(["a", "b", "b"], 20),
        "y": rng.normal(size=60),
    })


@pytest.mark.parametrize("formula", ["y ~ t * arm + (t | g)", "y ~ t + (1 | g) + (0 + t | g)", "y ~ arm + t + (arm | g)"])
def test_bars_viewing_x_give_the_cross_products_of_bars_of_their_own(visits: pd.DataFrame, formula: str) -> None:
    design, _ = standardize(build_design(visits, parse_formula(formula)))
    assert any(fixed_view(design, block) is not None for block in design.blocks)
    own = dataclasses.replace(design, blocks=tuple(
        dataclasses.replace(block, Z=block.Z.copy(), fixed_columns=None) for block in design.blocks))
    viewed, alone = compute_crossproducts(design), compute_crossproducts(own)
    for a, b in ((viewed.ZtZ, alone.ZtZ), (viewed.ZtXy, alone.ZtXy), (viewed.XytXy, alone.XytXy)):
        assert a.tobytes() == b.tobytes()


def test_a_replaced_x_ends_the_view(visits: pd.DataFrame) -> None:
    # The bars keep their Z (still a view of the old X) and fixed_columns; neither the standardization nor
    # the cross-products may take the new X's columns for them.
    design = build_design(visits, parse_formula("y ~ t + (t | g)"))
    moved = dataclasses.replace(design, X=np.ascontiguousarray(design.X * 2.0))
    assert fixed_view(design, design.blocks[0]) == slice(0, 2) and fixed_view(moved, moved.blocks[0]) is None
    standardized, _ = standardize(moved)
    assert not np.shares_memory(standardized.blocks[0].Z, standardized.X)
    np.testing.assert_array_equal(standardized.blocks[0].Z, standardize(design)[0].blocks[0].Z)
    products = compute_crossproducts(moved)
    np.testing.assert_array_equal(products.ZtZ[0, 0], np.bincount(design.codes, minlength=15))
    np.testing.assert_allclose(products.ZtZ[1, 1], np.bincount(design.codes, weights=visits["t"] ** 2), rtol=1e-13)
