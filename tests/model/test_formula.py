from __future__ import annotations

import pytest

from longitudinal.errors import ConfigError, FormulaError
from longitudinal.model.formula import (
    COVARIANCE_STRUCTURES,
    Binary,
    CovarianceTerm,
    Name,
    Number,
    RandomBlock,
    Unary,
    candidate_covariates,
    check_candidates,
    check_columns,
    check_covariance_terms,
    check_family,
    check_same_response,
    deparse,
    expand_terms,
    parse_candidates,
    parse_expression,
    parse_formula,
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("y ~ t + (1 | school/2pupil)", r"candidate 'c' .*: the grouping factor after '\|' must be a column name, "
         r"columns joined by ':' \(interaction\) or '/' \(nesting\), got 'school/2pupil'"),
        ("y ~ t + (1 | school/)", r"must be a column name.*got 'school/'"),
        ("y ~ t + (1 | g:g)", r"column 'g' appears twice in the grouping factor 'g:g'"),
        ("y ~ t + (1 | a/b:a)", r"column 'a' appears twice in the grouping factor 'a/b:a'"),
        ("y ~ t", r"candidate 'c' .*: no random-effects term; a mixed model needs one such as '\(1 \| subject\)' "
         r"or a covariance structure such as 'us\(visit \| subject\)'"),
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


# ------------------------------------------------------------------------------- the project's own grammar


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("y ~ x.__class__ + (1 | g)", r"candidate 'c' .*: 'x.__class__' is not a column name a formula can use"),
        ("y ~ t + (1 | g.__class__)", r"grouping factor after '\|' must be a column name"),
        ("y ~ I(t[1]) + (1 | g)", r"candidate 'c' .*: unexpected '\[' at position 8"),
        ("y ~ I('t') + (1 | g)", r"unexpected \"'\" at position 7"),
        ('y ~ factor("t") + (1 | g)', r"unexpected '\"'"),
        ("y ~ I(t > 1) + (1 | g)", r"unexpected '>'"),
        ("y ~ I(if (t) 1 else 2) + (1 | g)", r"candidate 'c' .*: expected ',', found '1' at position 14"),
        ("y ~ ifelse(t, 1, 2) + (1 | g)", r"unknown function in 'ifelse\(t, 1, 2\)'"),
        ("y ~ log(t, base = 2) + (1 | g)", r"log\(\) takes no argument 'base'"),
        ("y ~ poly(t, raw = TRUE) + (1 | g)", r"poly\(\) takes no argument 'raw' \(in 'poly\(t, raw = TRUE\)'\); it takes degree"),
        ("y ~ poly(t) + (1 | g)", r"poly\(\) needs its degree as one whole number"),
        ("y ~ ns(t, 2.5) + (1 | g)", r"ns\(\) needs its df as one whole number"),
        ("y ~ factor(t + 1) + (1 | g)", r"factor\(\) takes one column name"),
        ("y ~ I(a:b) + (1 | g)", r"':' is not arithmetic, in 'I\(a:b\)'"),
        ("y ~ I(poly(t, 2)) + (1 | g)", r"inside a function only I\(\), log\(\)"),
        ("y ~ t + 2 + (1 | g)", r"the number 2 is not a term"),
        ("y ~ t + pi + (1 | g)", r"'pi' is a constant, not a term"),
        ("y ~ (t + arm)^t + (1 | g)", r"'\^' outside a function crosses terms and needs a positive whole number"),
        ("y ~ t + * s + (1 | g)", r"unexpected '\*' at position 9"),
        ("y ~ t + (1 | g) +", r"the formula ends with an operator"),
        ("y ~ t | g", r"a '\|' belongs inside a random-effects term"),
        ("y ~ t + (1 | g) + (t", r"unbalanced parentheses"),
        ("y ~ t + (1 | g))", r"unbalanced parentheses"),
        ("y ~ . + (1 | g)", r"'\.' is not a column name"),
        ("y ~ t * 2 + (1 | g)", r"the number 2 is not a term"),
    ],
)
def test_the_grammar_refuses_what_is_not_a_formula(text: str, message: str) -> None:
    with pytest.raises(FormulaError, match=message):
        parse_formula(text, name="c")


def test_attribute_access_on_a_column_is_a_formula_error() -> None:
    # 'week.values' is a legal R name (R's data sets have dotted columns), so it parses as a column; when the
    # data have 'week' but no 'week.values' it is refused as what it is, attribute access.
    formulas = parse_candidates({"ris": "y ~ week.values + (1 | g)"})
    with pytest.raises(FormulaError, match=r"candidate 'ris' uses 'week.values', which is not a column of the data; "
                                           r"formulas have no attribute access \(write 'week' for the column\)"):
        check_columns(formulas, ["y", "week", "g"])
    check_columns(parse_candidates({"dotted": "y ~ body.weight + (1 | g)"}), ["y", "body.weight", "g"])


def test_long_and_deep_formulas_are_refused_without_recursion_errors() -> None:
    # How long parsing takes as formulas grow is measured in benchmarks/bench_formula.py (not asserted
    # here: wall-clock bounds fail on a loaded machine).
    with pytest.raises(FormulaError, match=r"candidate 'c' .*the formula is 20,001 characters long; the limit is 10,000"):
        parse_formula("y ~ " + "t + " * 4_998 + "(1|g)", name="c")
    with pytest.raises(FormulaError, match=r"the limit is 10,000"):
        parse_formula("y ~ " + "x" * 200_000 + " + (1 | g)", name="c")
    with pytest.raises(FormulaError, match=r"parentheses are nested more than 100 deep"):
        parse_formula("y ~ " + "(" * 1_000 + "t" + ")" * 1_000 + " + (1 | g)", name="c")
    with pytest.raises(FormulaError, match=r"nested more than 100 levels deep"):
        parse_formula("y ~ I(" + "-" * 1_000 + "t) + (1 | g)", name="c")
    with pytest.raises(FormulaError, match=r"nested more than 100 levels deep"):
        parse_formula("y ~ I(t" + "^2" * 1_000 + ") + (1 | g)", name="c")


def test_long_chains_within_the_limit_parse_without_recursion() -> None:
    many = " + ".join(f"x{i}" for i in range(1_200))  # a left-deep tree 1,200 levels down
    formula = parse_formula(f"y ~ {many} + (1 | g)")
    assert len(formula.fixed_terms.terms) == 1_200 and "x1199" in formula.columns
    assert parse_formula(f"y ~ I({many}) + (1 | g)").fixed_terms.labels == (f"I({many})",)
    assert parse_formula("y ~ " + "(" * 99 + "t" + ")" * 99 + " + (1 | g)").fixed_terms.labels == ("t",)


@pytest.mark.parametrize(
    ("rhs", "intercept", "labels"),
    [
        # R: attr(terms(y ~ <rhs>), "term.labels") and attr(, "intercept")
        ("t * arm", True, ("t", "arm", "t:arm")),
        ("t * arm - 1", False, ("t", "arm", "t:arm")),
        ("0 + t", False, ("t",)),
        ("-1 + t", False, ("t",)),
        ("t:arm + arm:t + t", True, ("t", "t:arm")),
        ("arm:t + t", True, ("t", "arm:t")),
        ("a*b - a", True, ("b", "a:b")),
        ("(a + b + c)^2", True, ("a", "b", "c", "a:b", "a:c", "b:c")),
        ("arm/t", True, ("arm", "arm:t")),
        ("(a + b)/c", True, ("a", "b", "a:b:c")),
        ("t %in% arm", True, ("t:arm",)),
        ("poly(age,2)*arm", True, ("poly(age, 2)", "arm", "poly(age, 2):arm")),
        ("log(t+1) + log(t + 1)", True, ("log(t + 1)",)),
    ],
)
def test_terms_expand_as_r_expands_them(rhs: str, intercept: bool, labels: tuple[str, ...]) -> None:
    terms = expand_terms(rhs)
    assert terms.intercept is intercept
    assert terms.labels == labels


@pytest.mark.parametrize(
    ("written", "deparsed"),
    [
        # R: deparse(quote(<written>))
        ("I(x^2)", "I(x^2)"),
        ("I(x+1)", "I(x + 1)"),
        ("I(2*pi*t)", "I(2 * pi * t)"),
        ("I((t-5)/7)", "I((t - 5)/7)"),
        ("x^-1", "x^-1"),
        ("-x + -2", "-x + -2"),
        ("a%in%b", "a %in% b"),
        ("poly(age,2)", "poly(age, 2)"),
        ("ns(age, df=3)", "ns(age, df = 3)"),
        ("f(1e5, 0.0001, 123456, .5, 1e-300, 100, 1000, 1e15, 1e16, 3.00, 2.50, 0.00012, 1234567.1)",
         "f(1e+05, 1e-04, 123456, 0.5, 1e-300, 100, 1000, 1e+15, 1e+16, 3, 2.5, 0.00012, 1234567.1)"),
        ("f(0.1234567890123456789)", "f(0.123456789012346)"),
    ],
)
def test_names_are_r_deparse(written: str, deparsed: str) -> None:
    assert deparse(parse_expression(written)) == deparsed


def test_power_binds_tighter_than_unary_minus_and_associates_right() -> None:
    assert parse_expression("-2^2") == Unary("-", Binary("^", Number(2.0), Number(2.0)))
    assert parse_expression("a^b^c") == Binary("^", Name("a"), Binary("^", Name("b"), Name("c")))
    assert parse_expression("a:b*c") == Binary("*", Binary(":", Name("a"), Name("b")), Name("c"))


def test_columns_of_term_functions_exclude_functions_and_constants() -> None:
    formula = parse_formula("y ~ poly(age, 2) + ns(bmi, 3) + factor(visit) + sin(2*pi*time) + (poly(t, 2) | g)")
    assert formula.columns == {"y", "age", "bmi", "visit", "time", "t", "g"}
    assert formula.blocks == (RandomBlock(terms=("1", "poly(t, 2)"), group="g"),)


# ------------------------------------------------------------------------- covariance structures (MMRM)


@pytest.mark.parametrize(
    ("text", "fixed", "blocks", "term"),
    [
        ("y ~ visit * arm + us(visit | id)", "visit * arm", (), CovarianceTerm("us", "visit", "id")),
        ("y ~ factor(visit) * arm + toeph(visit|id)", "factor(visit) * arm", (), CovarianceTerm("toeph", "visit", "id")),
        ("y ~ us(visit | id)", "1", (), CovarianceTerm("us", "visit", "id")),
        ("y ~ t * arm + (1 | id) + ar1(t | id)", "t * arm", (RandomBlock(("1",), "id"),),
         CovarianceTerm("ar1", "t", "id")),
        ("y ~ t + sp_exp(t | id) + (t | id)", "t", (RandomBlock(("1", "t"), "id"),),
         CovarianceTerm("sp_exp", "t", "id")),
        ("y ~ t + (0 + t | id) + adh(t | id)", "t", (RandomBlock(("t",), "id"),),
         CovarianceTerm("adh", "t", "id")),
        ("y ~ t + (1 | dog:side) + ar1h(t | dog:side)", "t", (RandomBlock(("1",), "dog:side"),),
         CovarianceTerm("ar1h", "t", "dog:side")),
    ],
)
def test_a_covariance_structure_is_read_alone_or_next_to_bars(
    text: str, fixed: str, blocks: tuple[RandomBlock, ...], term: CovarianceTerm,
) -> None:
    formula = parse_formula(text)
    assert (formula.fixed, formula.blocks, formula.covariance) == (fixed, blocks, term)
    assert term.columns <= formula.columns


def test_every_structure_parses_and_shows_as_mmrm_writes_it() -> None:
    for name in COVARIANCE_STRUCTURES:
        term = parse_formula(f"y ~ t + {name}( t|id )").covariance
        assert term == CovarianceTerm(name, "t", "id") and term.text == f"{name}(t | id)"
    assert parse_formula("y ~ t + (1 | id)").covariance is None


def test_the_structure_s_columns_are_read_by_the_formula() -> None:
    assert parse_formula("y ~ arm + us(visit | id)").columns == {"y", "arm", "visit", "id"}
    assert parse_formula("y ~ 1 + ar1(t | dog:side)").columns == {"y", "t", "dog", "side"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("y ~ t + us(t | id) + ar1(t | id)", r"candidate 'c' .*: two covariance structures, 'us\(t \| id\)' and "
         r"'ar1\(t \| id\)'; a candidate has at most one"),
        ("y ~ t + (1 | id) - ar1(t | id)", r"candidate 'c' .*: a covariance structure cannot be subtracted: "
         r"'- ar1\(t \| id\)'"),
        ("y ~ t + us(visit)", r"candidate 'c' .*: in 'us\(visit\)', no '\|' between the visits and the subject; "
         r"write it as us\(<visit column> \| <subject column>\)"),
        ("y ~ t + us(visit + arm | id)", r"candidate 'c' .*: in 'us\(visit \+ arm \| id\)', the left of '\|' must "
         r"be one column, the visits or times, got 'visit \+ arm'"),
        ("y ~ t + us(factor(visit) | id)", r"candidate 'c' .*: in 'us\(factor\(visit\) \| id\)', the left of '\|' "
         r"must be one column.*no factor\(\) is needed"),
        ("y ~ t + us(visit | id/site)", r"candidate 'c' .*: in 'us\(visit \| id/site\)', the right of '\|' must "
         r"be the subject column .*got 'id/site' \(nesting has no meaning here"),
        ("y ~ t + us(visit | )", r"in 'us\(visit \| \)', the right of '\|' must be the subject column"),
        ("y ~ t + cs(t || id)", r"in 'cs\(t \|\| id\)', '\|\|' has no meaning here"),
        ("y ~ t + cs(t | id | x)", r"in 'cs\(t \| id \| x\)', more than one '\|'"),
        ("y ~ t + cs(t | t)", r"in 'cs\(t \| t\)', a column appears twice"),
        ("y ~ t + cs(t | pi)", r"in 'cs\(t \| pi\)', 'pi' is a constant, not a column"),
        ("y ~ t + cs(t | id.__class__)", r"'id.__class__' is not a column name a formula can use"),
        ("y ~ t + ar2(t | id)", r"candidate 'c' .*: 'ar2\(t \| id\)' is not a covariance structure; the structures "
         r"are us, cs, csh, ar1, ar1h, toep, toeph, ad, adh, sp_exp"),
        ("y ~ t + (1 | site) + ar1(t | id)", r"candidate 'c' .*: random effects next to a covariance structure must "
         r"be grouped by its subject, 'id'; '\(1 \| site\)' is grouped by 'site'"),
        ("y ~ t + (1 | id/visit) + ar1(t | id)", r"must be grouped by its subject, 'id'; '\(1 \| id/visit\)' is "
         r"grouped by 'id:visit'"),
        ("y ~ t + (1 | id) + cs(t | id)", r"candidate 'c' .*: cs\(t \| id\) with \(1 \| id\) is not identified: "
         r"compound symmetry already is a random intercept; drop the random effects \(an MMRM\), or next to "
         r"them use one of ar1, ar1h, ad, adh, sp_exp"),
        ("y ~ t + (t | id) + us(t | id)", r"candidate 'c' .*: us\(t \| id\) with \(t \| id\) is not identified: "
         r"the unstructured covariance already contains any random-effects covariance"),
        ("y ~ t + (0 + t | id) + csh(t | id)", r"csh\(t \| id\) with \(0 \+ t \| id\) is not identified"),
        ("y ~ t + (1 | id) + (0 + t | id) + toep(t | id)",
         r"toep\(t \| id\) with \(1 \| id\) \+ \(0 \+ t \| id\) is not identified: a Toeplitz covariance "
         r"contains compound symmetry"),
        ("y ~ t + toeph(t | id) + (1 | id)", r"toeph\(t \| id\) with \(1 \| id\) is not identified"),
        ("y ~ t + (t || id) + ar1(t | id)", r"candidate 'c' .*: next to ar1\(t \| id\) the random effects must be "
         r"one bar with one covariance matrix, such as '\(1 \+ t \| id\)'; \(t \|\| id\) makes several"),
        ("y ~ t + (1 | id) + (0 + t | id) + sp_exp(t | id)", r"next to sp_exp\(t \| id\) the random effects must "
         r"be one bar"),
    ],
)
def test_a_covariance_structure_that_cannot_be_fitted_is_refused(text: str, message: str) -> None:
    with pytest.raises(FormulaError, match=message):
        parse_formula(text, name="c")


@pytest.mark.parametrize("name", ["ar1", "ar1h", "ad", "adh", "sp_exp"])
def test_structures_without_compound_symmetry_go_next_to_random_effects(name: str) -> None:
    formula = parse_formula(f"y ~ t + (t | id) + {name}(t | id)")
    assert formula.covariance is not None and formula.covariance.structure == name


def test_only_calls_meant_as_structures_are_read_as_structures() -> None:
    # A column named like a structure is a column; a call of a known function stays a fixed-effect term.
    assert parse_formula("y ~ us + log(ar1) + (1 | id)").fixed == "us + log(ar1)"
    with pytest.raises(FormulaError, match=r"'log\(t \| id\)' is not a covariance structure"):
        parse_formula("y ~ log(t | id) + (1 | id)", name="c")
    with pytest.raises(FormulaError, match=r"a '\|' belongs inside a random-effects term such as '\(1 \| subject\)' "
                                           r"or a covariance structure such as 'us\(visit \| subject\)'"):
        parse_formula("y ~ us(t | id):arm", name="c")


def test_a_long_formula_with_a_structure_parses_without_recursion() -> None:
    many = " + ".join(f"x{i}" for i in range(1_200))
    formula = parse_formula(f"y ~ {many} + us(visit | id)")
    assert len(formula.fixed_terms.terms) == 1_200 and formula.covariance == CovarianceTerm("us", "visit", "id")


# ------------------------------------------------------------------ covariance structures against the config


def test_a_structure_over_another_time_column_is_a_config_error() -> None:
    formulas = parse_candidates({"ri": "y ~ week + (1 | id)", "mmrm": "y ~ visit * arm + us(visit | id)"})
    with pytest.raises(ConfigError, match=r"candidate 'mmrm' uses us\(visit \| id\), but the study's time column is "
                                          r"'week': write us\(week \| id\)"):
        check_covariance_terms(formulas, subject="id", time="week")
    check_covariance_terms(formulas, subject="id", time="visit")


def test_a_structure_over_another_subject_is_a_config_error() -> None:
    formulas = parse_candidates({"ar": "y ~ t + (1 | site) + ar1(t | site)"})
    with pytest.raises(ConfigError, match=r"candidate 'ar' uses ar1\(t \| site\), but the study's subject is 'id': "
                                          r"write ar1\(t \| id\)"):
        check_covariance_terms(formulas, subject="id", time="t")
    check_covariance_terms(parse_candidates({"ar": "y ~ t + ar1(t | dog:side)"}), subject="dog:side", time="t")


def test_check_candidates_checks_structures_against_the_roles() -> None:
    # roles as DataConfig.roles orders them: subject column(s), time, outcome.
    formulas = parse_candidates({"mmrm": "y ~ arm + us(visit | dog:side)"})
    assert check_candidates(formulas, ("dog", "side", "visit", "y"), ["dog", "side", "visit", "y", "arm"]) == ["arm"]
    with pytest.raises(ConfigError, match=r"candidate 'mmrm' uses us\(visit \| dog:side\), but the study's time "
                                          r"column is 'week': write us\(week \| dog:side\)"):
        check_candidates(formulas, ("dog", "side", "week", "y"), ["dog", "side", "week", "visit", "y", "arm"])
    with pytest.raises(ConfigError, match=r"but the study's subject is 'dog': write us\(visit \| dog\)"):
        check_candidates(formulas, ("dog", "visit", "y"), ["dog", "side", "visit", "y", "arm"])


def test_the_candidates_must_suit_the_family() -> None:
    """glmer's rules: a GLMM takes random effects only, and nAGQ > 1 one scalar random effect."""
    scalar = parse_candidates({"ri": "y ~ t + (1 | id)", "rs": "y ~ t + (0 + t | id)"})
    check_family(scalar, family="binomial", nagq=9)
    slopes = parse_candidates({"ri": "y ~ t + (1 | id)", "ris": "y ~ t + (t | id)"})
    check_family(slopes, family="poisson", nagq=1)  # the Laplace approximation takes any random effects
    with pytest.raises(ConfigError, match=(
        r"^models.nagq: 9 \(adaptive Gauss–Hermite quadrature\) needs a single scalar random effect in every "
        r"candidate, as glmer does, but candidate 'ris' has 2 \(\(1 \+ t \| id\)\); set nagq: 1 \(the Laplace "
        r"approximation\), or keep only candidates with one random effect such as '\(1 \| id\)'$"
    )):
        check_family(slopes, family="binomial", nagq=9)
    for formula, shown in [("y ~ t + (t || id)", r"\(1 \| id\) \+ \(0 \+ t \| id\)"),
                           ("y ~ t + (1 | site/id)", r"\(1 \| site\) \+ \(1 \| site:id\)")]:
        with pytest.raises(ConfigError, match=rf"candidate 'c' has 2 \({shown}\)"):
            check_family(parse_candidates({"c": formula}), family="binomial", nagq=2)
    structured = parse_candidates({"mmrm": "y ~ t + us(t | id)"})
    check_family(structured, family="gaussian", nagq=1)
    with pytest.raises(ConfigError, match=r"^candidate 'mmrm' uses the covariance structure us\(t \| id\), which is "
                                          r"for Gaussian outcomes, but models.family is 'binomial': a binomial model "
                                          r"takes random effects only; remove the structure"):
        check_family(structured, family="binomial", nagq=1)
