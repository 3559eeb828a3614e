"""Validation: each row rule with its reason, the table-level failures, and the row accounting."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from longitudinal.config import StudyConfig, parse_config
from longitudinal.data.ingest import read_sources
from longitudinal.data.validation import ensure_valid, validate_visits, validation_summary
from longitudinal.errors import DataError
from longitudinal.records import Ingested, SourceFile, Validated

HEADER = "id,week,score,age,arm\n"
GOOD = "".join(f"{s},{w},{10 + s + w},{30 + s},{'AB'[s % 2]}\n" for s in (1, 2, 3) for w in (0, 1))


def make_config(base: Path, data: dict[str, Any] | None = None, **validation: Any) -> StudyConfig:
    return parse_config(
        {
            "study": "s",
            "data": {"source": "visits.csv", "subject": "id", "time": "week", "outcome": "score",
                     "categorical": ["arm"], **(data or {})},
            "validation": validation,
            "models": {"candidates": {"ri": "score ~ week + (1 | id)"}},
        },
        base_dir=base,
    )


def check(
    tmp_path: Path, text: str, covariates: Collection[str] = (), data: dict[str, Any] | None = None, **validation: Any,
) -> Validated:
    """Validate a CSV written from ``text``; every call also checks the row accounting."""
    (tmp_path / "visits.csv").write_text(text)
    config = make_config(tmp_path, data, **validation)
    validated = validate_visits(read_sources(config), config, covariates)
    assert_accounted(validated)
    return validated


def assert_accounted(validated: Validated) -> None:
    assert validated.rows_read == validated.rows_analysed + validated.rows_quarantined
    assert validated.quarantine["reason"].notna().all()
    assert (validated.quarantine["reason"].str.len() > 0).all()
    rows = sorted([*validated.visits.index, *validated.quarantine.index])
    assert rows == list(range(validated.rows_read))
    row_counts = sum(e.unexpected_count for e in validated.expectations if e.level == "row")
    assert row_counts == validated.rows_quarantined


def reasons(validated: Validated) -> dict[int, str]:
    """source_line -> reason."""
    quarantine = validated.quarantine
    return dict(zip(quarantine["source_line"].tolist(), quarantine["reason"].tolist(), strict=True))


def outcome(validated: Validated, name: str, column: str | None = None) -> Any:
    found = [e for e in validated.expectations if e.name == name and (column is None or e.column == column)]
    assert len(found) == 1, name
    return found[0]


# ----------------------------------------------------------------------------------------- clean data


def test_clean_data_pass_and_visits_keep_index_labels_sorted(tmp_path: Path) -> None:
    text = HEADER + "10,1,5,40,A\n2,1,5,40,B\n10,0,5,40,A\n2,0,5,40,B\n3,0,5,40,A\n"
    validated = check(tmp_path, text, covariates=["age", "arm"])
    assert validated.success
    assert validated.rows_quarantined == 0
    visits = validated.visits
    assert visits["id"].tolist() == ["2", "2", "3", "10", "10"]  # numeric ids sort as numbers
    assert visits["week"].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert visits.index.tolist() == [3, 1, 4, 2, 0]
    assert visits["source_line"].tolist() == [5, 3, 6, 4, 2]
    assert list(validated.quarantine.columns) == ["id", "week", "score", "age", "arm", "source_file", "source_line", "reason"]
    assert all(e.success for e in validated.expectations)
    ensure_valid(validated, make_config(tmp_path))


def test_text_columns_are_held_as_categories_of_the_values_analysed(tmp_path: Path) -> None:
    # arm 'C' and id 4 occur only on quarantined rows: they are not categories of the rows analysed
    text = HEADER + GOOD + "4,0,,40,C\n4,1,,40,C\n1,2,15,31,\n"
    validated = check(tmp_path, text, covariates=["age"])
    visits = validated.visits
    assert validated.rows_quarantined == 2
    for column in ("id", "arm", "source_file"):
        assert isinstance(visits[column].dtype, pd.CategoricalDtype), column
        assert visits[column].cat.categories.dtype == "str"
    assert visits["id"].cat.categories.tolist() == ["1", "2", "3"]
    assert visits["arm"].cat.categories.tolist() == ["A", "B"]  # sorted; the missing arm is missing, not a category
    assert visits["arm"].isna().tolist() == [False, False, True, False, False, False, False]  # subject 1 at week 2
    assert visits["source_file"].tolist() == ["visits.csv"] * 7
    assert visits["week"].dtype == np.float64 and visits["source_line"].dtype == np.int64
    assert validated.quarantine["arm"].dtype == "str"  # the quarantine keeps the rows as read


def test_categorical_visits_give_the_design_the_text_gives(tmp_path: Path) -> None:
    from longitudinal.model.design import build_design
    from longitudinal.model.formula import parse_formula

    # Levels sort by code point ('B10' < 'B2' < 'b' < 'ä'): the design's level order, which lme4's is
    rows = [(s, w, 10 + s + 2 * w + (s % 3), 30 + s, arm) for s, arm in
            ((12, "b"), (3, "B10"), (7, "B2"), (1, "ä"), (30, "B10")) for w in (0, 1, 2)]
    text = HEADER + "".join(f"{s},{w},{y},{a},{arm}\n" for s, w, y, a, arm in rows)
    visits = check(tmp_path, text, covariates=["age", "arm"]).visits
    # categories in UTF-8 byte order (code point order), as the design reads a categorical's own codes
    assert visits["arm"].cat.categories.tolist() == ["B10", "B2", "b", "ä"]
    as_text = visits.astype({c: "str" for c in ("id", "arm", "source_file")})
    formula = parse_formula("score ~ week * arm + age + (week | id)", name="ris")
    held, plain = build_design(visits, formula), build_design(as_text, formula)
    assert held.fixed_names == plain.fixed_names
    assert [n for n in held.fixed_names if n.startswith("arm")] == ["armB2", "armb", "armä"]  # reference 'B10'
    np.testing.assert_array_equal(held.X, plain.X)
    np.testing.assert_array_equal(held.codes, plain.codes)
    assert held.levels.tolist() == plain.levels.tolist() == ["1", "12", "3", "30", "7"]
    assert dict(held.transforms) == dict(plain.transforms)


# ------------------------------------------------------------------------------------------ row rules


BAD_ROWS = [  # (row, reason, rule); each row lands on line 8 + its position
    (",0,5,40,A", "subject missing (column 'id')", "subject_present"),
    ("NA,1,5,40,A", "subject missing (column 'id')", "subject_present"),
    ("4,,5,40,A", "time missing (column 'week')", "time_present"),
    ("4,n/a,5,40,A", "time missing (column 'week')", "time_present"),
    ("4,week two,5,40,A", "time is not a number: 'week two' (column 'week')", "time_is_number"),
    ("4,0,,40,A", "outcome missing (column 'score')", "outcome_present"),
    ("4,1,N/A,40,A", "outcome missing (column 'score')", "outcome_present"),
    ("4,2,abc,40,A", "outcome is not a number: 'abc' (column 'score')", "outcome_is_number"),
    ("4,3,120,40,A", "outcome 120 is outside outcome_range [0, 100] (column 'score')", "outcome_in_range"),
    ("4,4,-0.5,40,A", "outcome -0.5 is outside outcome_range [0, 100] (column 'score')", "outcome_in_range"),
]


def test_each_row_rule_quarantines_with_its_reason(tmp_path: Path) -> None:
    text = HEADER + GOOD + "".join(row + "\n" for row, _, _ in BAD_ROWS)
    validated = check(tmp_path, text, outcome_range=[0, 100])
    assert reasons(validated) == {8 + i: reason for i, (_, reason, _) in enumerate(BAD_ROWS)}
    for rule in {rule for _, _, rule in BAD_ROWS}:
        expected = sum(1 for _, _, r in BAD_ROWS if r == rule)
        assert outcome(validated, rule).unexpected_count == expected, rule
        assert not outcome(validated, rule).success
    assert validated.success  # row problems never fail the run
    assert validated.quarantine["score"].tolist() == [row.split(",")[2] for row, _, _ in BAD_ROWS]  # as read
    assert validated.visits["source_line"].tolist() == list(range(2, 8))


def test_outcome_range_bounds_are_inclusive(tmp_path: Path) -> None:
    validated = check(tmp_path, HEADER + GOOD + "4,0,0,40,A\n4,1,100,40,A\n", outcome_range=[0, 100])
    assert validated.rows_quarantined == 0


def test_a_row_gets_only_its_first_reason(tmp_path: Path) -> None:
    text = HEADER + GOOD + ",x,abc,,A\n4,0,abc,,A\n4,1,200,,A\n"
    validated = check(tmp_path, text, covariates=["age"], outcome_range=[0, 100])
    assert reasons(validated) == {
        8: "subject missing (column 'id')",
        9: "outcome is not a number: 'abc' (column 'score')",
        10: "outcome 200 is outside outcome_range [0, 100] (column 'score')",
    }


def test_exact_duplicates_keep_the_first_copy(tmp_path: Path) -> None:
    text = HEADER + GOOD + "1,0,11,31,B\n1,0,11.0,31,B\n"  # lines 8 and 9 repeat line 2 (11 == 11.0)
    validated = check(tmp_path, text)
    assert reasons(validated) == {8: "exact duplicate of visits.csv line 2", 9: "exact duplicate of visits.csv line 2"}
    assert outcome(validated, "no_exact_duplicates").unexpected_count == 2
    assert 2 in validated.visits["source_line"].tolist()


def test_conflicting_duplicates_quarantine_every_copy(tmp_path: Path) -> None:
    text = HEADER + GOOD + "1,0,99,31,B\n"
    validated = check(tmp_path, text)
    expected = "conflicting duplicate visit: subject 1 at time 0 appears 2 times with different values"
    assert reasons(validated) == {2: expected, 8: expected}
    assert outcome(validated, "no_conflicting_duplicates").unexpected_count == 2


def test_duplicates_of_a_quarantined_row_do_not_count(tmp_path: Path) -> None:
    text = HEADER + GOOD + "1,0,abc,31,B\n"  # same visit as line 2, but its outcome is not a number
    validated = check(tmp_path, text)
    assert reasons(validated) == {8: "outcome is not a number: 'abc' (column 'score')"}


def test_duplicates_across_files_name_the_first_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(HEADER + GOOD)
    (tmp_path / "in" / "b.csv").write_text(HEADER + "2,1,13,32,A\n")
    config = make_config(tmp_path).model_copy(update={"data": make_config(tmp_path).data.model_copy(update={"source": "in"})})
    validated = validate_visits(read_sources(config), config, ())
    assert_accounted(validated)
    assert validated.quarantine["reason"].tolist() == ["exact duplicate of in/a.csv line 5"]
    assert validated.quarantine["source_file"].tolist() == ["in/b.csv"]


def test_missing_covariate_used_by_a_candidate_quarantines_the_row(tmp_path: Path) -> None:
    text = HEADER + GOOD + "4,0,5,,A\n4,1,5,40,\n"
    used = check(tmp_path, text, covariates=["age", "arm"])
    assert reasons(used) == {
        8: "missing covariate 'age' (used by the candidate models)",
        9: "missing covariate 'arm' (used by the candidate models)",
    }
    assert outcome(used, "covariate_present", "age").unexpected_count == 1
    unused = check(tmp_path, text, covariates=[])
    assert unused.rows_quarantined == 0


def test_covariate_with_a_typo_is_analysed_as_a_number(tmp_path: Path) -> None:
    text = HEADER + GOOD + "4,0,5,unknown,A\n4,1,5,41,A\n"
    validated = check(tmp_path, text, covariates=["age"])
    assert reasons(validated) == {8: "covariate 'age' is not a number: 'unknown' (used by the candidate models)"}
    assert validated.visits["age"].dtype == np.float64
    assert outcome(validated, "covariate_is_number", "age").unexpected_count == 1


def test_subject_with_too_few_rows_left(tmp_path: Path) -> None:
    text = HEADER + GOOD + "4,0,5,40,A\n4,1,abc,40,A\n5,0,5,40,A\n5,1,5,40,A\n6,0,5,40,A\n6,1,5,40,A\n"
    validated = check(tmp_path, text, min_observations_per_subject=3)
    assert reasons(validated) == {
        line: f"subject {line // 2} has 2 rows, fewer than min_observations_per_subject = 3"
        for line in range(2, 8)
    } | {
        8: "subject 4 has 1 row, fewer than min_observations_per_subject = 3",
        9: "outcome is not a number: 'abc' (column 'score')",
        10: "subject 5 has 2 rows, fewer than min_observations_per_subject = 3",
        11: "subject 5 has 2 rows, fewer than min_observations_per_subject = 3",
        12: "subject 6 has 2 rows, fewer than min_observations_per_subject = 3",
        13: "subject 6 has 2 rows, fewer than min_observations_per_subject = 3",
    }
    assert outcome(validated, "min_observations_per_subject").unexpected_count == 11
    assert validated.rows_analysed == 0
    kept = check(tmp_path, text, min_observations_per_subject=2)
    assert reasons(kept) == {
        8: "subject 4 has 1 row, fewer than min_observations_per_subject = 2",
        9: "outcome is not a number: 'abc' (column 'score')",
    }


# ------------------------------------------------------------------------------------- table level


def test_missing_required_column_fails_with_the_columns_listed(tmp_path: Path) -> None:
    validated = check(tmp_path, "id,week,value\n1,0,1\n2,0,1\n3,0,1\n")
    assert not validated.success
    assert validated.rows_analysed == 0
    assert set(validated.quarantine["reason"]) == {"outcome missing (column 'score')"}
    with pytest.raises(DataError, match=r"^required column 'score' \(data.outcome\) is missing from visits.csv; columns are: id, week, value$"):
        ensure_valid(validated, make_config(tmp_path))


def test_missing_covariate_column_fails_the_run(tmp_path: Path) -> None:
    validated = check(tmp_path, "id,week,score\n" + "1,0,1\n2,0,1\n3,0,1\n", covariates=["age"])
    message = r"^required column 'age' \(used by the candidate models\) is missing from visits.csv; columns are: id, week, score$"
    with pytest.raises(DataError, match=message):
        ensure_valid(validated, make_config(tmp_path))


def test_no_rows_fails_the_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^no rows to analyse: visits.csv has a header line"):
        check(tmp_path, HEADER)  # ingestion refuses first; validation still says why on a table built by hand
    columns = {c: pd.Series([], dtype=object) for c in ("id", "week", "score", "source_file")}
    empty = pd.DataFrame(columns | {"source_line": pd.Series([], dtype=np.int64)})
    ingested = Ingested(raw=empty, typed=empty, files=(SourceFile("visits.csv", "0" * 64, 0),))
    validated = validate_visits(ingested, make_config(tmp_path), ())
    assert validated.rows_read == 0
    with pytest.raises(DataError, match=r"^no rows to analyse: visits.csv has a header line but no data rows; check the export"):
        ensure_valid(validated, make_config(tmp_path))


def test_too_few_subjects_left_fails_the_run(tmp_path: Path) -> None:
    text = HEADER + "1,0,1,30,A\n1,1,2,30,A\n2,0,1,30,A\n3,0,abc,30,A\n3,1,,30,A\n"
    validated = check(tmp_path, text)
    assert not validated.success
    assert not outcome(validated, "enough_subjects").success
    message = (
        r"^only 2 subjects left after the row checks \(3 needed\): 2 of 5 rows were quarantined, most by "
        r"\"outcome missing \(column 'score'\)\" \(1 row\); see quarantine.csv$"
    )
    with pytest.raises(DataError, match=message):
        ensure_valid(validated, make_config(tmp_path))
    with pytest.raises(DataError, match=r"; the checks and the quarantine are in /some/folder$"):
        ensure_valid(validated, make_config(tmp_path), Path("/some/folder"))


def test_too_few_subjects_names_the_rule_that_took_most_rows(tmp_path: Path) -> None:
    text = HEADER + "1,0,1,,A\n1,1,2,,A\n2,0,1,,A\n3,0,abc,30,A\n"
    validated = check(tmp_path, text, covariates=["age"])
    with pytest.raises(DataError, match=(
        r"^only 0 subjects left after the row checks \(3 needed\): 4 of 4 rows were quarantined, most by "
        r"\"missing covariate 'age' \(used by the candidate models\)\" \(3 rows\); see quarantine.csv$"
    )):
        ensure_valid(validated, make_config(tmp_path))


def test_no_row_left_reports_zero_subjects(tmp_path: Path) -> None:
    validated = check(tmp_path, HEADER + "1,0,x,30,A\n")
    with pytest.raises(DataError, match=r"^only 0 subjects left .*: 1 of 1 rows was quarantined, most by"):
        ensure_valid(validated, make_config(tmp_path))
    one = check(tmp_path, HEADER + "1,0,1,30,A\n1,1,1,30,A\n")
    with pytest.raises(DataError, match=r"^only 1 subject left after the row checks \(3 needed\): no row was quarantined \(2 rows read\)"):
        ensure_valid(one, make_config(tmp_path))


# ----------------------------------------------------------------------------------------- summary


def test_summary_is_json_ready_and_counts_reasons_by_rule(tmp_path: Path) -> None:
    text = HEADER + GOOD + "1,0,11,31,B\n4,0,abc,40,A\n4,1,5,,A\n"
    validated = check(tmp_path, text, covariates=["age"])
    summary = json.loads(json.dumps(validation_summary(validated)))
    assert summary["success"] is True
    assert (summary["rows_read"], summary["rows_analysed"], summary["rows_quarantined"]) == (9, 6, 3)
    counts = {k: v for k, v in summary["quarantine_reasons"].items() if v}
    assert counts == {"outcome_is_number": 1, "no_exact_duplicates": 1, "covariate_present:age": 1}
    names = [e["name"] for e in summary["expectations"]]
    # Ingestion's finding on the source files (a warning, passed here: no link skipped) comes first.
    assert names[:5] == ["source_files_are_regular"] + ["column_exists"] * 4 and "enough_subjects" in names
    assert summary["expectations"][0]["level"] == "warning" and summary["expectations"][0]["success"] is True
    assert {"name", "level", "column", "success", "unexpected_count", "description", "details"} <= set(summary["expectations"][0])


# ---------------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("seed", range(4))
def test_accounting_holds_on_messy_data(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    ids = rng.choice(["1", "2", "3", "4", "5", "", "NA"], size=n)
    weeks = rng.choice(["0", "1", "2", "x", "", "1.0"], size=n)
    scores = rng.choice(["1", "2.5", "50", "-3", "abc", "", "n/a", "200"], size=n)
    ages = rng.choice(["30", "31", "", "old"], size=n)
    lines = [f"{i},{w},{s},{a},A" for i, w, s, a in zip(ids, weeks, scores, ages, strict=True)]
    duplicate = lines[:10]  # exact copies
    text = HEADER + "\n".join(lines + duplicate) + "\n"
    validated = check(
        tmp_path, text, covariates=["age"], outcome_range=[0, 100],
        min_observations_per_subject=int(rng.integers(1, 4)),
    )
    visits = validated.visits
    assert visits[["id", "week", "score"]].notna().all().all()
    assert not visits.duplicated(["id", "week"]).any()
    assert visits["score"].between(0, 100).all()
    assert set(validated.quarantine.columns) >= {"source_file", "source_line", "reason"}


# -------------------------------------------------------------------------- subject of several columns


def make_nested(base: Path, text: str, **data: Any) -> tuple[StudyConfig, Validated]:
    (base / "visits.csv").write_text(text)
    config = parse_config(
        {
            "study": "s",
            "data": {"source": "visits.csv", "subject": ["dog", "side"], "time": "day", "outcome": "y"} | data,
            "validation": {"min_observations_per_subject": 2},
            "models": {"candidates": {"ri": "y ~ day + (1 | dog/side)"}},
        },
        base_dir=base,
    )
    validated = validate_visits(read_sources(config), config, ())
    assert_accounted(validated)
    return config, validated


NESTED = "dog,side,day,y\n" + "".join(f"{d},{s},{t},{d + t}\n" for d in (2, 1) for s in "LR" for t in (0, 1))


def test_the_combination_of_subject_columns_is_the_subject(tmp_path: Path) -> None:
    # side labels repeat across dogs, and both sides of a dog share days: none of that is a duplicate
    config, validated = make_nested(tmp_path, NESTED)
    assert validated.rows_quarantined == 0
    visits = validated.visits
    assert list(visits.columns[:3]) == ["dog", "side", "dog:side"]
    assert visits["dog:side"].tolist() == ["1:L", "1:L", "1:R", "1:R", "2:L", "2:L", "2:R", "2:R"]
    assert visits["dog:side"].cat.categories.tolist() == ["1:L", "1:R", "2:L", "2:R"]  # held as the other text
    assert outcome(validated, "enough_subjects").details == "4 subjects left"
    ensure_valid(validated, config)


def test_duplicates_and_visit_counts_use_the_combination(tmp_path: Path) -> None:
    text = NESTED + "1,L,0,9\n3,L,0,1\n3,R,0,1\n3,R,1,1\n,R,2,1\n"
    _, validated = make_nested(tmp_path, text)
    assert reasons(validated) == {
        6: "conflicting duplicate visit: subject 1:L at time 0 appears 2 times with different values",
        7: "subject 1:L has 1 row, fewer than min_observations_per_subject = 2",  # its other visit conflicted
        10: "conflicting duplicate visit: subject 1:L at time 0 appears 2 times with different values",
        11: "subject 3:L has 1 row, fewer than min_observations_per_subject = 2",
        14: "subject missing (column 'dog')",
    }
    assert validation_summary(validated)["quarantine_reasons"]["subject_present:dog"] == 1


def test_too_few_subjects_counts_combinations(tmp_path: Path) -> None:
    config, validated = make_nested(tmp_path, "dog,side,day,y\n" + "".join(f"1,{s},{t},1\n" for s in "LR" for t in (0, 1)))
    with pytest.raises(DataError, match=r"^only 2 subjects \(dog:side\) left after the row checks \(3 needed\)"):
        ensure_valid(validated, config)


def test_subject_parts_that_contain_the_separator_are_refused(tmp_path: Path) -> None:
    text = "dog,side,day,y\n" + "".join(f"{d},{s},{t},1\n" for d, s in (("a:b", "c"), ("a", "b:c"), ("x", "y")) for t in (0, 1))
    with pytest.raises(DataError, match=r"the subject columns \['dog', 'side'\] hold values containing ':'"):
        make_nested(tmp_path, text)
    with pytest.raises(DataError, match=r"the data have a column named 'dog:side'"):
        make_nested(tmp_path, NESTED.replace("y\n", "y,dog:side\n", 1).replace("\n", ",x\n").replace("y,dog:side,x", "y,dog:side"))


# ------------------------------------------------------------------------------------- data.constant


def test_a_constant_column_that_changes_quarantines_the_whole_subject(tmp_path: Path) -> None:
    text = "dog,side,day,y,arm,age\n" + "".join(
        f"{d},L,{t},1,{'A' if (d, t) != (2, 1) else 'B'},{30 + d if (d, t) != (3, 0) else 40.5}\n"
        for d in (1, 2, 3, 4) for t in (0, 1, 2)
    ) + "4,L,3,1,,\n5,L,0,x,A,30\n5,L,1,1,C,30\n5,L,2,1,C,30\n"
    _, validated = make_nested(tmp_path, text, constant=["arm", "age"])
    arm = "column 'arm' changes within subject {} ({}); data.constant says it does not"
    assert reasons(validated) == {
        5: arm.format("2:L", "'A', 'B'"), 6: arm.format("2:L", "'A', 'B'"), 7: arm.format("2:L", "'A', 'B'"),
        8: "column 'age' changes within subject 3:L ('33', '40.5'); data.constant says it does not",
        9: "column 'age' changes within subject 3:L ('33', '40.5'); data.constant says it does not",
        10: "column 'age' changes within subject 3:L ('33', '40.5'); data.constant says it does not",
        15: "outcome is not a number: 'x' (column 'y')",  # judged on every row: 'A' here, 'C' below
        16: arm.format("5:L", "'A', 'C'"), 17: arm.format("5:L", "'A', 'C'"),
    }  # a missing value (line 14) is not a change
    counts = validation_summary(validated)["quarantine_reasons"]
    assert counts["constant_within_subject:arm"] == 5 and counts["constant_within_subject:age"] == 3


def test_a_row_breaking_two_rules_of_one_kind_counts_once(tmp_path: Path) -> None:
    validated = check(tmp_path, HEADER + GOOD + "4,0,5,,\n", covariates=["age", "arm"])
    assert reasons(validated) == {8: "missing covariate 'age' (used by the candidate models)"}
    assert outcome(validated, "covariate_present", "arm").unexpected_count == 0


# ----------------------------------------------------------------------------- header, dates, summary


def test_a_repeated_header_line_is_quarantined_as_such(tmp_path: Path) -> None:
    validated = check(tmp_path, HEADER + GOOD + HEADER + "4,0,5,40,A\n")
    assert reasons(validated) == {8: "a repeated header line (its cells are the column names)"}


def test_iso_dates_are_noted_in_the_summary(tmp_path: Path) -> None:
    text = "id,week,score,age,arm\n" + "".join(f"{s},2024-03-0{w + 1},1,30,A\n" for s in (1, 2, 3) for w in (0, 1))
    validated = check(tmp_path, text + "3,week 3,1,30,A\n", data={"time_unit": "days", "time_origin": "study"})
    summary = validation_summary(validated)
    assert summary["notes"] == ["time 'week' holds ISO dates: read as days since 2024-03-01, the earliest date in the data"]
    assert reasons(validated) == {8: "time is not an ISO date (YYYY-MM-DD): 'week 3' (column 'week')"}
    assert validated.visits["week"].tolist() == [0.0, 1.0] * 3
    by_subject = validation_summary(check(tmp_path, text, data={"time_unit": "weeks"}))
    assert by_subject["notes"] == ["time 'week' holds ISO dates: read as weeks since each subject's first visit"]


# ------------------------------------------------------------------------------------ warnings, hints


def test_subject_ids_differing_only_by_leading_zeros_or_case_are_a_warning(tmp_path: Path) -> None:
    ids = ["068", "68", "007", "7", "A1", "a1", "B2"]
    text = HEADER + "".join(f"{i},{w},1,30,A\n" for i in ids for w in (0, 1)) + " b2 ,0,1,30,A\n"
    validated = check(tmp_path, text)
    assert validated.success and validated.rows_quarantined == 0  # a warning fails and quarantines nothing
    found = outcome(validated, "subject_ids_distinct")
    assert (found.level, found.success, found.unexpected_count) == ("warning", False, 0)
    assert validated.warnings == (
        "subject ids '007' and '7' differ only by leading zeros or letter case (4 such pairs, e.g. also "
        "'068' and '68'; 'A1' and 'a1'; 'B2' and 'b2'): they are analysed as different subjects; make the ids "
        "consistent if they are the same subject",
    )
    assert validation_summary(validated)["warnings"] == list(validated.warnings)
    assert validated.visits["id"].nunique() == 8  # still different subjects; ' b2 ' is read as 'b2'


def test_consistent_subject_ids_pass_the_warning_check(tmp_path: Path) -> None:
    validated = check(tmp_path, HEADER + GOOD + "40,0,1,30,A\n04,0,1,30,A\n100,0,1,30,A\n")
    assert outcome(validated, "subject_ids_distinct").success  # '04', '40' and '100' are not alike
    assert validated.warnings == ()


def test_a_decimal_comma_in_a_comma_separated_file_is_explained(tmp_path: Path) -> None:
    validated = check(tmp_path, HEADER + GOOD + '4,0,"10,3",30,A\n')
    assert reasons(validated) == {8: (
        "outcome is not a number: '10,3' (column 'score'); values like '10,3' look like decimal commas in a "
        "comma-separated file; export with a decimal point, or use ';' as the delimiter"
    )}
    every = check(tmp_path, HEADER + "".join(f'{s},{w},"1{s},5",30,A\n' for s in (1, 2, 3) for w in (0, 1)))
    with pytest.raises(DataError, match=(
        r"most by \"outcome is not a number \(column 'score'\)\" \(6 rows\); values like '11,5' look like "
        r"decimal commas in a comma-separated file; export with a decimal point, or use ';' as the delimiter; "
        r"see quarantine.csv$"
    )):
        ensure_valid(every, make_config(tmp_path))


def test_summary_counts_by_rule_not_by_reason_text(tmp_path: Path) -> None:
    text = HEADER + GOOD + "4,0,abc,40,A\n4,1,xyz,40,A\n5,0,1,40,A\n5,0,2,40,A\n"
    summary = validation_summary(check(tmp_path, text))
    counts = {k: v for k, v in summary["quarantine_reasons"].items() if v}
    assert counts == {"outcome_is_number": 2, "no_conflicting_duplicates": 2}  # four distinct reason texts
    rules = {r["rule"]: r for r in summary["quarantine_rules"]}
    assert rules["outcome_is_number"] == {
        "rule": "outcome_is_number", "column": "score", "description": "outcome ('score') is a number", "rows": 2,
    }
    assert summary["notes"] == []


def test_preloading_great_expectations_leaves_validation_unchanged(tmp_path: Path) -> None:
    from longitudinal.data.validation import preload_great_expectations

    before = check(tmp_path, HEADER + GOOD)
    preload_great_expectations().join(timeout=120)
    after = check(tmp_path, HEADER + GOOD)
    pd.testing.assert_frame_equal(before.visits, after.visits)
    assert before.expectations == after.expectations


# --------------------------------------------------------------------- binomial and Poisson outcomes (issue 14)


def check_family(
    tmp_path: Path, rows: list[tuple[int, int, str]], family: str, levels: list[str] | None = None, **validation: Any,
) -> tuple[Validated, StudyConfig]:
    """Validate visits ``(id, week, y)`` of a ``family`` study; every call also checks the row accounting."""
    (tmp_path / "visits.csv").write_text("id,week,y\n" + "".join(f"{s},{w},{y}\n" for s, w, y in rows))
    data: dict[str, Any] = {"source": "visits.csv", "subject": "id", "time": "week", "outcome": "y"}
    if levels is not None:
        data["outcome_levels"] = levels
    config = parse_config({"study": "s", "data": data, "validation": validation,
                           "models": {"family": family, "candidates": {"ri": "y ~ week + (1 | id)"}}}, base_dir=tmp_path)
    validated = validate_visits(read_sources(config), config, ())
    assert_accounted(validated)
    return validated, config


BINARY_WORDS = "a binomial outcome is 0 or 1, FALSE or TRUE (also false/true, False/True), or the two texts given as data.outcome_levels"


def test_a_binomial_outcome_is_0_1_or_true_false_analysed_as_0_1(tmp_path: Path) -> None:
    rows = [(1, 0, "0"), (1, 1, "1"), (1, 2, "1.0"), (2, 0, "TRUE"), (2, 1, "false"), (2, 2, "True"),
            (3, 0, "FALSE"), (3, 1, "true"), (3, 2, "maybe"), (3, 3, "2"), (3, 4, "0.5"), (3, 5, "yes"), (3, 6, "T"),
            (3, 7, "")]
    validated, config = check_family(tmp_path, rows, "binomial")
    assert validated.visits["y"].dtype == np.float64
    assert validated.visits["y"].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert reasons(validated) == {
        **{line: f"outcome is not binary: '{value}' (column 'y'); {BINARY_WORDS}"
           for line, value in [(10, "maybe"), (11, "2"), (12, "0.5"), (13, "yes"), (14, "T")]},
        15: "outcome missing (column 'y')",
    }
    assert validated.quarantine["y"].tolist()[:5] == ["maybe", "2", "0.5", "yes", "T"]  # as written
    rule = outcome(validated, "outcome_is_binary")
    assert (rule.level, rule.unexpected_count, rule.success) == ("row", 5, False)
    assert rule.description == "outcome ('y') is 0 or 1, FALSE or TRUE (binomial)"
    assert all(e.name != "outcome_is_number" for e in validated.expectations)  # the binary check replaces it
    varies = outcome(validated, "outcome_varies")
    assert (varies.level, varies.success, varies.details) == ("table", True, "8 rows analysed: 3 are 0 and 5 are 1")
    ensure_valid(validated, config)


def test_outcome_levels_are_exact_text_and_the_second_is_1(tmp_path: Path) -> None:
    rows = [(1, 0, "no"), (1, 1, "yes"), (2, 0, " yes "), (2, 1, "Yes"), (3, 0, "no"), (3, 1, "1"), (3, 2, "TRUE")]
    validated, _ = check_family(tmp_path, rows, "binomial", levels=["no", "yes"])
    assert validated.visits["y"].tolist() == [0.0, 1.0, 1.0, 0.0]  # surrounding spaces are stripped on reading
    allowed = "allowed: 'no' (0) or 'yes' (1), compared as text, case-sensitive"
    assert reasons(validated) == {
        line: f"outcome is neither of data.outcome_levels: '{value}' (column 'y'); {allowed}"
        for line, value in [(5, "Yes"), (7, "1"), (8, "TRUE")]
    }
    assert outcome(validated, "outcome_is_binary").description == "outcome ('y') is 'no' or 'yes' (data.outcome_levels)"
    assert outcome(validated, "outcome_varies").details == "4 rows analysed: 2 are 0 ('no') and 2 are 1 ('yes')"
    # numbers as levels: a 1/2 coding, 2.0 being 2
    coded, _ = check_family(tmp_path, [(1, 0, "1"), (1, 1, "2.0"), (2, 0, "2"), (3, 0, "0")], "binomial", levels=[1, 2])
    assert coded.visits["y"].tolist() == [0.0, 1.0, 1.0]
    assert list(reasons(coded)) == [5]


def test_a_poisson_outcome_is_a_whole_number_from_0(tmp_path: Path) -> None:
    rows = [(1, 0, "0"), (1, 1, "2.0"), (1, 2, "17"), (2, 0, "2.5"), (2, 1, "-1"), (2, 2, "3"), (3, 0, "1"),
            (3, 1, "x")]
    validated, config = check_family(tmp_path, rows, "poisson")
    assert validated.visits["y"].tolist() == [0.0, 2.0, 17.0, 3.0, 1.0]
    count_words = "(column 'y'); a poisson outcome is a whole number, 0 or more"
    assert reasons(validated) == {5: f"outcome is not a count: '2.5' {count_words}",
                                  6: f"outcome is not a count: '-1' {count_words}",
                                  9: "outcome is not a number: 'x' (column 'y')"}
    rule = outcome(validated, "outcome_is_count")
    assert (rule.unexpected_count, rule.description) == (2, "outcome ('y') is a count, a whole number ≥ 0 (poisson)")
    assert outcome(validated, "outcome_varies").details == "5 rows analysed: counts from 0 to 17, mean 4.6"
    ensure_valid(validated, config)


def test_outcome_range_still_applies_to_other_families(tmp_path: Path) -> None:
    validated, _ = check_family(tmp_path, [(1, 0, "0"), (1, 1, "40"), (2, 0, "1"), (3, 0, "2")], "poisson",
                                outcome_range=[0, 30])
    assert reasons(validated) == {3: "outcome 40 is outside outcome_range [0, 30] (column 'y')"}


def test_an_outcome_that_never_varies_fails_the_run_but_a_subject_whose_outcome_never_varies_is_kept(
        tmp_path: Path) -> None:
    rows = [(1, 0, "0"), (1, 1, "0"), (2, 0, "0"), (2, 1, "0"), (3, 0, "0"), (3, 1, "maybe")]
    validated, config = check_family(tmp_path, rows, "binomial")
    assert not validated.success
    with pytest.raises(DataError, match=(
        r"^every analysed outcome is 0: a binomial model has nothing to fit; 1 of 6 rows was quarantined, most by "
        r"\"outcome is not binary \(column 'y'\); .*\" \(1 row\); see quarantine.csv$"
    )):
        ensure_valid(validated, config)
    yes, config = check_family(tmp_path, [(s, w, "yes") for s in (1, 2, 3) for w in (0, 1)], "binomial",
                               levels=["no", "yes"])
    with pytest.raises(DataError, match=r"^every analysed outcome is 1 \('yes'\): a binomial model has nothing to fit; "
                                        r"no row was quarantined \(6 rows read\)"):
        ensure_valid(yes, config)
    zeros, config = check_family(tmp_path, [(s, w, "0") for s in (1, 2, 3) for w in (0, 1)], "poisson")
    with pytest.raises(DataError, match=r"^every analysed outcome is 0: a poisson model has nothing to fit"):
        ensure_valid(zeros, config)
    # subject 1 is always 0 and subject 2 always 1: kept, they are information about the random intercept
    kept, config = check_family(tmp_path, [(1, 0, "0"), (1, 1, "0"), (2, 0, "1"), (2, 1, "1"), (3, 0, "0"),
                                           (3, 1, "1")], "binomial")
    assert kept.rows_quarantined == 0 and kept.success
    ensure_valid(kept, config)


def test_a_gaussian_study_has_no_family_checks(tmp_path: Path) -> None:
    validated, config = check_family(tmp_path, [(s, w, "5") for s in (1, 2, 3) for w in (0, 1)], "gaussian")
    assert {"outcome_is_binary", "outcome_is_count", "outcome_varies"}.isdisjoint(e.name for e in validated.expectations)
    ensure_valid(validated, config)


def test_family_checks_are_reported_in_the_summary(tmp_path: Path) -> None:
    validated, _ = check_family(tmp_path, [(1, 0, "0"), (1, 1, "1"), (2, 0, "1"), (3, 0, "maybe")], "binomial")
    summary = json.loads(json.dumps(validation_summary(validated)))
    assert summary["quarantine_reasons"]["outcome_is_binary"] == 1
    names = {e["name"]: e for e in summary["expectations"]}
    assert names["outcome_is_binary"]["unexpected_count"] == 1
    assert names["outcome_varies"]["level"] == "table" and names["outcome_varies"]["success"] is True


def test_a_boolean_parquet_outcome_is_binary(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": ["1", "1", "2", "3"], "week": [0, 1, 0, 0], "y": [True, False, True, None]})
    frame.to_parquet(tmp_path / "visits.parquet")
    config = parse_config({"study": "s", "data": {"source": "visits.parquet", "subject": "id", "time": "week",
                                                  "outcome": "y"},
                           "models": {"family": "binomial", "candidates": {"ri": "y ~ week + (1 | id)"}}},
                          base_dir=tmp_path)
    validated = validate_visits(read_sources(config), config, ())
    assert validated.visits["y"].tolist() == [1.0, 0.0, 1.0]
    assert validated.quarantine["reason"].tolist() == ["outcome missing (column 'y')"]


def test_validation_leaves_nothing_in_great_expectations(example_config: Path) -> None:
    """great-expectations' execution engine outlives a validation (one context per process): it must not keep
    the last frame or the metrics computed on it (issue 17: at 2M rows they held some 140 MB after the run's
    validation, and in ``longitudinal serve`` every run's)."""
    from longitudinal.config import load_config
    from longitudinal.data import validation
    from longitudinal.data.ingest import read_sources

    config = load_config(example_config)
    validation.validate_visits(read_sources(config), config, ["age"])
    engine = validation._batch_definition().data_asset.datasource.get_execution_engine()
    assert engine.batch_manager.batch_data_cache == {}
    assert len(engine.batch_manager.batch_cache) == 0
    assert len(engine._metric_cache) == 0

