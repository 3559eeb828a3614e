from __future__ import annotations

import pytest

from longitudinal.errors import ConfigError, FormulaError
from longitudinal.formula import (
    RandomBlock,
    candidate_covariates,
    check_columns,
    check_same_response,
    parse_candidates,
    parse_formula,
    to_patsy,
)


@pytest.mark.parametrize(
    ("text", "fixed", "blocks"),
    [
        ("y ~ t + (1 | g)", "t", [("1",)]),
        ("y ~ t + (t | g)", "t", [("1", "t")]),
        ("y ~ t + (1 + t | g)", "t", [("1", "t")]),
        ("y ~ t + (0 + t | g)", "t", [("t",)]),
        ("y ~ t + (-1 + t | g)", "t", [("t",)]),
        ("y ~ t + (t - 1 | g)", "t", [("t",)]),
        ("y ~ t + (t || g)", "t", [("1",), ("t",)]),
        ("y ~ t + (1 | g) + (0 + t | g)", "t", [("1",), ("t",)]),
        ("y ~ t * arm + (t | g)", "t * arm", [("1", "t")]),
        ("y ~ t + t:arm + (1 | g)", "t + t:arm", [("1",)]),
        ("y ~ t + I(t^2) + (t + I(t^2) | g)", "t + I(t^2)", [("1", "t", "I(t^2)")]),
        ("y ~ 1 + (1 | g)", "1", [("1",)]),
        ("y ~ 0 + t + (1|g)", "0 + t", [("1",)]),
    ],
)
def test_lme4_forms(text: str, fixed: str, blocks: list[tuple[str, ...]]) -> None:
    formula = parse_formula(text)
    assert formula.response == "y"
    assert formula.fixed == fixed
    assert formula.blocks == tuple(RandomBlock(terms=b, group="g") for b in blocks)
    assert formula.groups == ("g",)


@pytest.mark.parametrize(
    ("text", "blocks"),
    [
        # lme4's findbars: a/b → a and a:b (lme4 writes the inner factor b:a; we keep the outer first)
        ("y ~ t + (1 | school/pupil)", [(("1",), "school"), (("1",), "school:pupil")]),
        ("y ~ t + (t | a/b/c)", [(("1", "t"), "a"), (("1", "t"), "a:b"), (("1", "t"), "a:b:c")]),
        ("y ~ t + (t | dog) + (1 | dog:side)", [(("1", "t"), "dog"), (("1",), "dog:side")]),
        ("y ~ t + (t | patient) + (1 | rater)", [(("1", "t"), "patient"), (("1",), "rater")]),
        # || expands first, then /
        ("y ~ t + (t || a/b)", [(("1",), "a"), (("1",), "a:b"), (("t",), "a"), (("t",), "a:b")]),
        ("y ~ t + (1 | a:b/c)", [(("1",), "a:b"), (("1",), "a:b:c")]),
    ],
)
def test_nested_and_crossed_forms(text: str, blocks: list[tuple[tuple[str, ...], str]]) -> None:
    formula = parse_formula(text)
    assert formula.blocks == tuple(RandomBlock(terms=terms, group=group) for terms, group in blocks)
    assert formula.groups == tuple(dict.fromkeys(group for _, group in blocks))


def test_an_interaction_factor_reads_each_of_its_columns() -> None:
    formula = parse_formula("y ~ t + (t | dog) + (1 | dog:side)")
    assert formula.columns == {"y", "t", "dog", "side"}
    assert formula.blocks[1].factors == ("dog", "side")
    assert parse_formula("y ~ 1 + (1 | a/b/c)").columns == {"y", "a", "b", "c"}


def test_a_grouping_column_the_data_lack_is_refused_by_name() -> None:
    formulas = parse_candidates({"nested": "y ~ t + (1 | school/pupil)"})
    with pytest.raises(ConfigError, match=r"candidate 'nested' uses column 'pupil', which the data lack"):
        check_columns(formulas, ["y", "t", "school"])


def test_columns_read_by_a_formula() -> None:
    formula = parse_formula("score ~ week * arm + I(week^2) + log(age) + (week | patient_id)")
    assert formula.columns == {"score", "week", "arm", "age", "patient_id"}


def test_power_inside_I_becomes_python_power() -> None:
    assert to_patsy("I(week^2) + week:arm") == "I(week**2) + week:arm"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("y ~ t + (1 | school/2pupil)", r"candidate 'c' .*: the grouping factor after '\|' must be a column name, "
         r"columns joined by ':' \(interaction\) or '/' \(nesting\), got 'school/2pupil'"),
        ("y ~ t + (1 | school/)", r"must be a column name.*got 'school/'"),
        ("y ~ t + (1 | g:g)", r"column 'g' appears twice in the grouping factor 'g:g'"),
        ("y ~ t + (1 | a/b:a)", r"column 'a' appears twice in the grouping factor 'a/b:a'"),
        ("y ~ t", r"no random-effects term; a mixed model needs one such as '\(1 \| subject\)'"),
        ("y ~ t + (1 | g", r"unbalanced parentheses"),
        ("y ~ t ~ (1 | g)", r"one '~'"),
        ("y + z ~ t + (1 | g)", r"the left of '~' must be the outcome column"),
        ("y ~ t + (1 | 2g)", r"grouping factor after '\|' must be a column name"),
        ("y ~ spline(t) + (1 | g)", r"unknown function in 'spline\(t\)'"),
        ("y ~ t + (0 | g)", r"has no terms"),
    ],
)
def test_refusals_name_the_candidate_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(FormulaError, match=message):
        parse_formula(text, name="c")


def test_formula_errors_are_config_errors() -> None:
    assert issubclass(FormulaError, ConfigError)


def test_check_columns_names_candidate_column_and_available() -> None:
    formulas = parse_candidates({"ri": "y ~ t + (1 | g)", "ris": "y ~ t + age2 + (t | g)"})
    with pytest.raises(ConfigError, match=r"candidate 'ris' uses column 'age2', which the data lack; columns are: y, t, g"):
        check_columns(formulas, ["y", "t", "g"])
    check_columns(formulas, ["y", "t", "g", "age2"])


def test_candidates_must_model_the_outcome() -> None:
    formulas = parse_candidates({"ri": "z ~ t + (1 | g)"})
    with pytest.raises(ConfigError, match=r"candidate 'ri' models 'z', but data.outcome is 'y'"):
        check_same_response(formulas, "y")


def test_candidate_covariates_exclude_roles() -> None:
    formulas = parse_candidates({"a": "y ~ t * arm + (1 | g)", "b": "y ~ t + age + (t | g)"})
    assert candidate_covariates(formulas, {"y", "t", "g"}) == ["age", "arm"]
