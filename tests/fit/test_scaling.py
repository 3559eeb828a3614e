"""Standardization of a design whose bars are views of its X (``BlockDesign.fixed_columns``): the same bits as
standardizing each bar on its own array, and a view of the standardized X where the two agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from longitudinal.fit.scaling import standardize
from longitudinal.model.design import build_design
from longitudinal.model.formula import parse_formula


@pytest.fixture
def visits() -> pd.DataFrame:
    rng = np.random.default_rng(12)
    n = 60
    return pd.DataFrame({
        "g": np.repeat([f"s{i}" for i in range(12)], 5),
        "t": np.tile([0.0, 1.0, 2.0, 3.0, 4.0], 12) * 86400.0 + 1.7e9,
        "arm": np.repeat(["a", "b", "b", "a"], 15),
        "age": rng.normal(45.0, 12.0, size=n),
        "y": rng.normal(size=n),
    })


@pytest.mark.parametrize("formula, shared", [
    ("y ~ t * arm + age + (t | g)", [True]),  # intercept and slope: centred in both
    ("y ~ t + arm + (1 | g) + (0 + t | g)", [True, False]),  # (t || g)'s slope alone: scaled only, X centred
    ("y ~ arm + t + (arm | g)", [True]),  # 0/1 columns: left as they are
    ("y ~ 0 + t + age + (0 + t + age | g)", [True]),  # no intercept anywhere: scaled only in both
])
def test_a_bar_viewing_x_is_standardized_as_on_its_own(visits: pd.DataFrame, formula: str, shared: list[bool]) -> None:
    design = build_design(visits, parse_formula(formula))
    assert all(block.fixed_columns is not None for block in design.blocks)
    own = dataclasses.replace(design, blocks=tuple(
        dataclasses.replace(block, Z=block.Z.copy(), fixed_columns=None) for block in design.blocks))
    before = design.X.copy()
    viewed, maps = standardize(design)
    alone, alone_maps = standardize(own)
    for block, single, B, B_alone, is_shared in zip(viewed.blocks, alone.blocks, maps.ranef_maps,
                                                    alone_maps.ranef_maps, shared):
        assert block.Z.tobytes() == single.Z.tobytes() and B.tobytes() == B_alone.tobytes()
        assert np.shares_memory(block.Z, viewed.X) == is_shared
        assert block.fixed_columns == (design.blocks[viewed.blocks.index(block)].fixed_columns if is_shared else None)
    assert viewed.X.tobytes() == alone.X.tobytes() and maps.fixed_map.tobytes() == alone_maps.fixed_map.tobytes()
    assert design.X.tobytes() == before.tobytes()  # the design given is left as it was
