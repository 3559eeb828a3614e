from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from longitudinal.errors import FormulaError
from longitudinal.model import design as design_module
from longitudinal.model.design import build_design
from longitudinal.model.formula import expand_terms, parse_formula
from longitudinal.model.transforms import PolyBasis, SplineBasis


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


def test_an_mmrm_has_no_blocks_and_groups_by_the_structure_s_subject(visits: pd.DataFrame) -> None:
    design = build_design(visits, parse_formula("y ~ factor(t) * arm + us(t | g)"))
    assert design.blocks == () and design.groups == () and design.Z.shape == (16, 0)
    assert design.group == "g" and list(design.levels) == ["s1", "s2", "s3", "s4"]
    assert list(design.levels[design.codes]) == list(visits["g"])
    assert design.fixed_names[:4] == ("(Intercept)", "factor(t)1", "factor(t)2", "factor(t)3")
    assert design.X.shape == (16, 8)


def test_an_mmrm_on_a_subject_of_two_columns_groups_by_their_combination(dogs: pd.DataFrame) -> None:
    design = build_design(dogs, parse_formula("y ~ t + ar1(t | dog:side)"))
    assert design.group == "dog:side" and design.n_groups == 6
    assert list(design.levels[design.codes]) == [f"{d}:{s}" for d, s in zip(dogs["dog"], dogs["side"])]


def test_a_structure_next_to_bars_leaves_the_design_as_without_it(visits: pd.DataFrame) -> None:
    with_structure = build_design(visits, parse_formula("y ~ t + (t | g) + ar1(t | g)"))
    without = build_design(visits, parse_formula("y ~ t + (t | g)"))
    assert with_structure.group == without.group == "g"
    np.testing.assert_array_equal(with_structure.Z, without.Z)
    np.testing.assert_array_equal(with_structure.codes, without.codes)
    assert with_structure.fixed_names == without.fixed_names


def test_a_structure_column_the_data_lack_is_refused(visits: pd.DataFrame) -> None:
    with pytest.raises(FormulaError, match=r"formula 'y ~ t \+ us\(visit \| g\)' uses column 'visit', which the data lack"):
        build_design(visits, parse_formula("y ~ t + us(visit | g)"))


# ----------------------------------------------------------------------- term functions, checked against R
#
# R 4.2, splines:
#   x <- c(0.5, 1, 2, 3.5, 4, 6, 7.25, 9); new <- c(-1, 0.5, 5, 9, 12)
#   d <- data.frame(y = 1:8, t = x, arm = rep(c("b", "a"), 4), site = rep(c("s1", "s2", "s3", "s1"), 2),
#                   visit = c(1, 2, 3, 1, 2, 3, 1, 10))
#   sprintf("%.17g", m) for each matrix m below; predictions by predict(<basis>, new) (makepredictcall's path).

_X = [0.5, 1.0, 2.0, 3.5, 4.0, 6.0, 7.25, 9.0]
_NEW = [-1.0, 0.5, 5.0, 9.0, 12.0]

# poly(x, 3); its first two columns are poly(x, 2)
_POLY3 = [
    [-0.4539660228979727, -0.3918851992538056, -0.2677235519654711, -0.08148108103296943, -0.019400257388802217,
     0.22892303718786663, 0.38412509629828473, 0.60140797905287],
    [0.44365225873606223, 0.24403159199641625, -0.07764068286453073, -0.3662264486100867, -0.41070899811304157,
     -0.3300756673970424, -0.06959696860819009, 0.5665649148604128],
    [-0.3856378164324832, -0.003974199163112056, 0.3895914294731559, 0.3168557584697477, 0.18547341129276018,
     -0.4111728824306787, -0.487988602335122, 0.39685290112573246],
]
# attr(poly(x, 2), "coefs")
_POLY2_ALPHA = (4.15625, 5.0641221546429005)
_POLY2_NORM2 = (1.0, 8.0, 64.867187499999986, 373.943058984704237)
# predict(poly(x, 2), new)
_POLY2_NEW = [
    [-0.6402084938304745, -0.45396602289797283, 0.1047613898995322, 0.60140797905287, 0.9738929209178734],
    [1.1976523761916924, 0.4436522587360625, -0.42210503850060566, 0.5665649148604129, 2.394034200538016],
]
# ns(x, 3): knots 2.4999999999999996, 5.3333333333333321, Boundary.knots 0.5, 9
_NS3 = [
    [0.0, -0.05890506690975397, -0.12043006745857998, 0.09373897798378525, 0.2226827111392359, 0.5153147296275558,
     0.34511574525370514, -0.14984282221446035],
    [0.0, 0.16754583046072571, 0.4478096458308939, 0.5611203016795782, 0.5253437407823294, 0.347209592550767,
     0.3402255155114395, 0.4154732797764582],
    [0.0, -0.10711946537652951, -0.2863045276623747, -0.35340819525081835, -0.3178501373639118,
     0.004197191602014614, 0.2882035767502812, 0.7343695424380022],
]
# predict(ns(x, 3), new): linear beyond the boundary knots
_NS3_NEW = [
    [0.1837508423880972, 0.0, 0.45019688536770147, -0.14984282221446035, -1.0929095354523226],
    [-0.5094909720760875, 0.0, 0.41915472462292, 0.4154732797764582, 0.5757946210268949],
    [0.3257401296879903, 0.0, -0.18453338561864444, 0.7343695424380022, 1.5171149144254281],
]
# bs(x, 3): no interior knot
_BS3 = [
    [0.0, 0.15631996743334012, 0.3590474251984531, 0.443313657642988, 0.42743741095053933, 0.241807449623448,
     0.10098208833706493, 0.0],
    [0.0, 0.009769997964583757, 0.07693873397109709, 0.241807449623448, 0.29920618766537754, 0.443313657642988,
     0.389502340728679, 0.0],
    [0.0, 0.0002035416242621616, 0.005495623855078363, 0.043964990840626904, 0.06981477712192143,
     0.27091390189293707, 0.5007887237940158, 1.0],
]
# bs(x, 5): the knots of ns(x, 3)
_BS5 = [
    [0.0, 0.5096796967895363, 0.5329035374554101, 0.0930964538014967, 0.03581170875008736, 0.0, 0.0, 0.0],
    [0.0, 0.06692400503602158, 0.4103964118346508, 0.6054524617859582, 0.5340119766922592, 0.13327848621966265,
     0.026455162484574243, 0.0],
    [0.0, 0.0015212981744421915, 0.04107505070993917, 0.2930974470996316, 0.4019827886265709, 0.5163376319279239,
     0.2631112588563226, 0.0],
    [0.0, 0.0, 0.0, 0.008353637312913343, 0.028193525931082517, 0.34437336344520086, 0.5676015914314547, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0060105184072126484, 0.14283198722764853, 1.0],
]
# predict(bs(x, 5), new): R's Taylor continuation beyond the boundary knots
_BS5_NEW = [
    [-5.304455261593344, 0.0, 0.0005595579492201105, 0.0, 0.0],
    [0.9861553123032809, 0.0, 0.31462221767880283, 0.0, -0.13327848621966262],
    [-0.04107505070993918, 0.0, 0.5542926413577061, 0.0, 1.7493966338063411],
    [0.0, 0.0, 0.1305255830142709, 0.0, -6.626636554799298],
    [0.0, 0.0, 0.0, 1.0, 6.010518407212619],
]
# bs(x, df = 4, degree = 2)
_BS4_QUADRATIC = [
    [0.0, 0.4116379310344829, 0.7047413793103449, 0.24543610547667322, 0.12981744421906677, 0.0, 0.0, 0.0],
    [0.0, 0.025862068965517255, 0.2327586206896553, 0.70026525198939, 0.7480106100795756, 0.3776223776223775,
     0.12849650349650346, 0.0],
    [0.0, 0.0, 0.0, 0.05429864253393671, 0.12217194570135755, 0.5893197711379531, 0.5982596948506038, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.03305785123966952, 0.27324380165289275, 1.0],
]


@pytest.fixture
def small() -> pd.DataFrame:
    return pd.DataFrame({
        "y": np.arange(1.0, 9.0),
        "t": _X,
        "arm": ["b", "a"] * 4,
        "site": ["s1", "s2", "s3", "s1"] * 2,
        "visit": [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 10.0],
        "g": ["g1", "g1", "g2", "g2", "g3", "g3", "g4", "g4"],
    })


def _columns(design: design_module.Design, prefix: str) -> np.ndarray:
    return np.array([design.X[:, j] for j, name in enumerate(design.fixed_names) if name.startswith(prefix)])


@pytest.mark.parametrize(
    ("term", "names", "expected"),
    [
        ("poly(t,2)", ["poly(t, 2)1", "poly(t, 2)2"], _POLY3[:2]),
        ("poly(t, degree = 3)", ["poly(t, degree = 3)1", "poly(t, degree = 3)2", "poly(t, degree = 3)3"], _POLY3),
        ("ns(t, 3)", ["ns(t, 3)1", "ns(t, 3)2", "ns(t, 3)3"], _NS3),
        ("bs(t, 3)", ["bs(t, 3)1", "bs(t, 3)2", "bs(t, 3)3"], _BS3),
        ("bs(t, df = 5)", [f"bs(t, df = 5){i}" for i in range(1, 6)], _BS5),
        ("bs(t, df = 4, degree = 2)", [f"bs(t, df = 4, degree = 2){i}" for i in range(1, 5)], _BS4_QUADRATIC),
    ],
)
def test_bases_equal_r(small: pd.DataFrame, term: str, names: list[str], expected: list[list[float]]) -> None:
    design = build_design(small, parse_formula(f"y ~ {term} + (1 | g)"))
    assert design.fixed_names == ("(Intercept)", *names)
    np.testing.assert_allclose(design.X[:, 1:].T, expected, rtol=0, atol=1e-10)


def test_poly_and_spline_parameters_are_recorded_as_r_records_them(small: pd.DataFrame) -> None:
    design = build_design(small, parse_formula("y ~ poly(t, 2) + ns(t, 3) + (1 | g)"))
    poly = design.transforms["poly(t, 2)"]
    assert isinstance(poly, PolyBasis) and poly.degree == 2
    np.testing.assert_allclose(poly.alpha, _POLY2_ALPHA, rtol=1e-14)
    np.testing.assert_allclose(poly.norm2, _POLY2_NORM2, rtol=1e-14)
    ns = design.transforms["ns(t, 3)"]
    assert isinstance(ns, SplineBasis) and ns.boundary == (0.5, 9.0)
    np.testing.assert_allclose(ns.knots, (2.4999999999999996, 5.3333333333333321), rtol=0, atol=1e-15)
    with pytest.raises(TypeError):
        design.transforms["ns(t, 3)"] = ns  # type: ignore[index]  # the record is read-only


@pytest.mark.parametrize(
    ("term", "expected"), [("poly(t, 2)", _POLY2_NEW), ("ns(t, 3)", _NS3_NEW), ("bs(t, 5)", _BS5_NEW)],
)
def test_new_data_reuse_the_recorded_transforms(small: pd.DataFrame, term: str, expected: list[list[float]]) -> None:
    formula = parse_formula(f"y ~ {term} + arm + (1 | g)")
    fitted = build_design(small, formula)
    new = pd.DataFrame({"y": 0.0, "t": _NEW, "arm": ["a", "a", "b", "a", "a"], "g": "g9"})
    design = build_design(new, formula, transforms=fitted.transforms, dropped=fitted.dropped)
    assert design.fixed_names == fitted.fixed_names
    np.testing.assert_allclose(_columns(design, term[:2]), expected, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(design.X[:, design.fixed_names.index("armb")], [0, 0, 1, 0, 0])
    assert design.transforms == fitted.transforms


def test_a_level_unseen_when_fitting_is_refused_on_new_data(small: pd.DataFrame) -> None:
    formula = parse_formula("y ~ arm + factor(visit) + (1 | g)")
    fitted = build_design(small, formula)
    new = small.assign(visit=[1.0, 2.0, 4.0, 1.0, 2.0, 3.0, 1.0, 10.0])
    with pytest.raises(FormulaError, match=r"'factor\(visit\)' has the level '4', which the fitted data did not "
                                           r"have; levels were: 1, 2, 3, 10"):
        build_design(new, formula, transforms=fitted.transforms)
    with pytest.raises(FormulaError, match=r"'arm' has the level 'c'"):
        build_design(small.assign(arm="c"), formula, transforms=fitted.transforms)


# R: colnames(model.matrix(f, d)) and its values, for each formula
@pytest.mark.parametrize(
    ("rhs", "names"),
    [
        ("0 + arm", ["arma", "armb"]),
        ("arm + t:arm", ["(Intercept)", "armb", "arma:t", "armb:t"]),
        ("0 + t:arm", ["t:arma", "t:armb"]),
        ("t:arm + arm", ["(Intercept)", "armb", "t:arma", "t:armb"]),
        ("arm:t + t", ["(Intercept)", "t", "armb:t"]),
        ("arm:site", ["(Intercept)", "arma:sites1", "armb:sites1", "arma:sites2", "armb:sites2", "arma:sites3",
                      "armb:sites3"]),
        ("arm*site - arm", ["(Intercept)", "sites2", "sites3", "armb:sites1", "armb:sites2", "armb:sites3"]),
        ("0 + arm + site", ["arma", "armb", "sites2", "sites3"]),
        ("site:arm + arm", ["(Intercept)", "armb", "sites2:arma", "sites3:arma", "sites2:armb", "sites3:armb"]),
        ("(t + arm + site)^2", ["(Intercept)", "t", "armb", "sites2", "sites3", "t:armb", "t:sites2", "t:sites3",
                                "armb:sites2", "armb:sites3"]),
        ("arm/t", ["(Intercept)", "armb", "arma:t", "armb:t"]),
        ("t %in% arm", ["(Intercept)", "t:arma", "t:armb"]),
        ("poly(t, 2)*arm", ["(Intercept)", "poly(t, 2)1", "poly(t, 2)2", "armb", "poly(t, 2)1:armb",
                            "poly(t, 2)2:armb"]),
        ("ns(t, 3):arm", ["(Intercept)", "ns(t, 3)1:arma", "ns(t, 3)2:arma", "ns(t, 3)3:arma", "ns(t, 3)1:armb",
                          "ns(t, 3)2:armb", "ns(t, 3)3:armb"]),
        ("factor(visit)", ["(Intercept)", "factor(visit)2", "factor(visit)3", "factor(visit)10"]),
        ("sin(2*pi*t) + I((t-5)/7) + I(t^2)", ["(Intercept)", "sin(2 * pi * t)", "I((t - 5)/7)", "I(t^2)"]),
    ],
)
def test_columns_follow_r_model_matrix(small: pd.DataFrame, rhs: str, names: list[str]) -> None:
    X, built = design_module._Evaluator(small, rhs, None).model_matrix(expand_terms(rhs))
    assert built == names


def test_column_values_follow_r_model_matrix(small: pd.DataFrame) -> None:
    X, _ = design_module._Evaluator(small, "", None).model_matrix(expand_terms("arm*site - arm"))
    # R: model.matrix(y ~ arm*site - arm, d)
    np.testing.assert_array_equal(X.T, [
        [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0, 1, 0],
        [1, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 1, 0],
    ])
    X, _ = design_module._Evaluator(small, "", None).model_matrix(expand_terms("sin(2*pi*t) + I((t-5)/7) + I(t^2)"))
    t = np.asarray(_X)
    np.testing.assert_allclose(X[:, 1:].T, [np.sin(2 * np.pi * t), (t - 5) / 7, t**2], rtol=0, atol=1e-12)
    X, _ = design_module._Evaluator(small, "", None).model_matrix(expand_terms("factor(visit)"))
    np.testing.assert_array_equal(X[:, 3], [0, 0, 0, 0, 0, 0, 0, 1])  # factor(visit)10: sorted as numbers


def test_random_effects_bars_use_the_same_terms(small: pd.DataFrame) -> None:
    design = build_design(small, parse_formula("y ~ t + (poly(t, 2) | g) + (0 + arm | site)"))
    assert design.blocks[0].terms == ("(Intercept)", "poly(t, 2)1", "poly(t, 2)2")
    np.testing.assert_allclose(design.blocks[0].Z[:, 1:].T, _POLY3[:2], rtol=0, atol=1e-10)
    assert design.blocks[1].terms == ("arma", "armb")  # lme4: no intercept, so one indicator per level


def test_values_outside_a_function_domain_are_refused(small: pd.DataFrame) -> None:
    with pytest.raises(FormulaError, match=r"the column 'log\(t - 1\)' has values that are not finite"):
        build_design(small, parse_formula("y ~ log(t - 1) + (1 | g)"))


def test_arithmetic_on_a_text_column_is_refused(small: pd.DataFrame) -> None:
    with pytest.raises(FormulaError, match=r"column 'arm' holds text; arithmetic needs numbers"):
        build_design(small, parse_formula("y ~ I(arm^2) + (1 | g)"))


# ------------------------------------------------------------------------- the rank check, as R's qr(X, tol = 1e-7)


def test_rescaling_a_column_drops_nothing() -> None:
    rng = np.random.default_rng(5)
    t = rng.uniform(0, 10, size=50)
    X = np.column_stack([np.ones(50), t * 1e8, rng.normal(size=50)])
    kept_X, kept = design_module._drop_rank_deficient(X)
    assert kept == [0, 1, 2] and kept_X is X


def test_of_a_collinear_pair_the_later_column_is_dropped() -> None:
    rng = np.random.default_rng(6)
    x1 = rng.normal(size=40)
    X = np.column_stack([np.ones(40), x1, 2 * x1 + 3, rng.normal(size=40)])
    _, kept = design_module._drop_rank_deficient(X)
    assert kept == [0, 1, 3]


def test_an_all_zero_column_is_dropped(visits: pd.DataFrame) -> None:
    design = build_design(visits.assign(z=0.0), parse_formula("y ~ z + t + (1 | g)"))
    assert design.fixed_names == ("(Intercept)", "t") and design.dropped == ("z",)


def test_a_large_time_scale_keeps_the_intercept(visits: pd.DataFrame) -> None:
    design = build_design(visits.assign(t=visits["t"] * 1e8 + 1.7e9), parse_formula("y ~ t + (1 | g)"))
    assert design.fixed_names == ("(Intercept)", "t") and design.dropped == ()


@pytest.mark.parametrize("dtype", ["str", object, "string[python]", "category"])
@pytest.mark.parametrize("values", [
    ["a", "a", "b", "é", "é", "z"],  # sorted rows (validated visits): coded by runs when Arrow stores them
    ["s1", "s1", "s10", "s2", "s2"], ["b", "a", "a", "c"], ["2", "10", "10"], ["x"], ["B", "a", "b"],
])
def test_a_grouping_factor_is_coded_in_sorted_text_order_whatever_the_storage(values: list[str], dtype: object) -> None:
    from longitudinal.model.design import code_factor

    frame = pd.DataFrame({"id": pd.Series(values, dtype=dtype)})  # type: ignore[call-overload]
    codes, levels = code_factor(frame, ["id"])
    assert list(levels) == sorted(set(values)) and all(type(level) is str for level in levels)
    assert [levels[c] for c in codes] == values and codes.dtype == np.int64


# ------------------------------------------------- the rank check's screen: X'X decides only where it is certain


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (45.0, 12.0), (1.7e9, 1e6), (1.0, 1e-9)])
def test_the_screen_keeps_every_column_only_where_the_qr_does(
    offset: float, spread: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An intercept beside a covariate at `offset` ± `spread` (age; epoch seconds; a covariate equal to the
    # intercept up to 1e-9, which R's qr drops), and a covariate equal to the first up to noise of 1e-9.
    rng = np.random.default_rng(8)
    x = offset + spread * rng.normal(size=200)
    X = np.column_stack([np.ones(200), x, rng.normal(size=200), x + 1e-9 * rng.normal(size=200)])
    # The screen itself: sure of a well-conditioned X, never of a near-collinear one.
    assert design_module._clearly_full_rank(X[:, :3]) == (offset / spread < 100)
    assert not design_module._clearly_full_rank(X)
    screened = design_module._drop_rank_deficient(X[:, :3])[1], design_module._drop_rank_deficient(X)[1]
    assert screened[1] == ([0, 1, 2] if spread > 1e-9 else [0, 2])
    monkeypatch.setattr(design_module, "_SCREEN_EIGENVALUE", np.inf)  # the QR alone, as before the screen
    assert screened == (design_module._drop_rank_deficient(X[:, :3])[1], design_module._drop_rank_deficient(X)[1])


def test_the_screen_leaves_zero_and_non_finite_columns_to_the_qr() -> None:
    X = np.column_stack([np.ones(5), np.arange(5.0), np.zeros(5)])
    assert not design_module._clearly_full_rank(X)
    assert not design_module._clearly_full_rank(np.column_stack([np.ones(3), [1.0, 2.0, 1e200]]))


# ------------------------------------------------------- a bar whose columns are fixed-effect columns: a view of X


def test_a_bar_of_fixed_effect_columns_is_a_view_of_x_with_the_same_values(visits: pd.DataFrame) -> None:
    design = build_design(visits, parse_formula("y ~ t * arm + (t | g) + (1 | site)"))
    slope, site = design.blocks
    assert slope.fixed_columns == slice(0, 2) and site.fixed_columns == slice(0, 1)
    assert np.shares_memory(slope.Z, design.X) and np.shares_memory(site.Z, design.X)
    np.testing.assert_array_equal(slope.Z, np.column_stack([np.ones(16), visits["t"]]))
    np.testing.assert_array_equal(site.Z, np.ones((16, 1)))


@pytest.mark.parametrize("formula", [
    "y ~ t + (0 + arm | g)",  # full indicator coding: armcontrol is not a column of X
    "y ~ t + arm + (arm + t | g)",  # the same columns, not side by side in X
    "y ~ 0 + t + (1 | g)",  # no intercept in X
    "y ~ t + (I(t^2) | g)",
])
def test_a_bar_not_found_side_by_side_in_x_has_its_own_array(visits: pd.DataFrame, formula: str) -> None:
    design = build_design(visits, parse_formula(formula))
    bar = design.blocks[0]
    assert bar.fixed_columns is None and not np.shares_memory(bar.Z, design.X)
    evaluator = design_module._Evaluator(visits, formula, None)
    Z, names = evaluator.model_matrix(expand_terms(parse_formula(formula).blocks[0].spec))
    np.testing.assert_array_equal(bar.Z, Z)
    assert bar.terms == tuple(names)


def test_a_dropped_column_moves_the_view_onto_the_kept_columns(visits: pd.DataFrame) -> None:
    data = visits.assign(t2=visits["t"] * 2)
    design = build_design(data, parse_formula("y ~ t2 + t + (t | g)"))  # t2 kept first, t dropped
    assert design.fixed_names == ("(Intercept)", "t2") and design.dropped == ("t",)
    assert design.blocks[0].fixed_columns is None
    np.testing.assert_array_equal(design.blocks[0].Z, np.column_stack([np.ones(16), visits["t"]]))


@pytest.mark.parametrize("categories", [
    ["a", "b", "c", "é"],  # sorted, "c" unused: dropped, as R's droplevels
    ["é", "c", "b", "a"],  # not in text order: read as text
    ["a", "b", "é", "é2"],
])
def test_a_categorical_grouping_factor_is_coded_as_its_text(categories: list[str]) -> None:
    from longitudinal.model.design import code_factor

    values = ["b", "a", "é", "b", "a"] if "é2" not in categories else ["b", "a", "é", "é2"]
    frame = pd.DataFrame({"id": pd.Categorical(values, categories=categories)})
    codes, levels = code_factor(frame, ["id"])
    assert list(levels) == sorted(set(values)) and all(type(level) is str for level in levels)
    assert [levels[c] for c in codes] == values and codes.dtype == np.int64


def test_numbers_as_categories_are_sorted_as_text() -> None:
    from longitudinal.model.design import code_factor

    frame = pd.DataFrame({"visit": pd.Categorical([10, 2, 2, 1])})
    codes, levels = code_factor(frame, ["visit"])
    assert list(levels) == ["1", "10", "2"] and list(codes) == [1, 2, 2, 0]
