from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from longitudinal.config import load_config, parse_config
from longitudinal.errors import ConfigError
from longitudinal.model.formula import check_candidates, parse_candidates

MINIMAL = {
    "study": "trial-1",
    "data": {"source": "incoming/", "subject": "patient_id", "time": "week", "outcome": "score"},
    "models": {"candidates": {"ri": "score ~ week + (1 | patient_id)"}},
}


def _with(**changes: object) -> dict:
    document = {key: (dict(value) if isinstance(value, dict) else value) for key, value in MINIMAL.items()}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = document
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return document


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    config = parse_config(MINIMAL, base_dir=tmp_path)
    assert config.validation.min_observations_per_subject == 1
    assert config.validation.outcome_range is None
    assert config.models.criterion == "bic"
    assert config.models.engine == "lme4-style"
    assert config.output.directory == "reports"
    assert config.data.categorical == ()
    assert (config.models.family, config.models.nagq, config.data.outcome_levels) == ("gaussian", 1, None)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "study").mkdir()
    path = tmp_path / "study" / "config.yaml"
    path.write_text(
        "study: s\n"
        "data: {source: incoming/, subject: id, time: t, outcome: y}\n"
        "models: {candidates: {ri: 'y ~ t + (1 | id)'}}\n"
        "output: {directory: out}\n"
    )
    config = load_config(path)
    assert config.source_path == tmp_path / "study" / "incoming"
    assert config.output_dir == tmp_path / "study" / "out" / "s"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    config = parse_config(_with(data__source=str(tmp_path / "x.csv")), base_dir=Path("/elsewhere"))
    assert config.source_path == tmp_path / "x.csv"


def test_unknown_key_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'models.critrion' \(did you mean 'criterion'\? allowed here: criterion, engine, candidates, family, nagq, df\)"):
        parse_config(_with(models__critrion="aic"))


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'outputs'"):
        parse_config(_with(outputs={"directory": "x"}))


def test_missing_required_key() -> None:
    document = _with()
    del document["data"]["outcome"]
    with pytest.raises(ConfigError, match=r"missing required key 'data.outcome'"):
        parse_config(document)


def test_empty_candidate_list() -> None:
    with pytest.raises(ConfigError, match=r"models.candidates: the candidate list is empty"):
        parse_config(_with(models__candidates={}))


def test_bad_criterion() -> None:
    with pytest.raises(ConfigError, match=r"models.criterion: Input should be 'aic' or 'bic'"):
        parse_config(_with(models__criterion="dic"))


def test_study_name_names_a_folder() -> None:
    with pytest.raises(ConfigError, match=r"study: 'my study' may use only letters, digits, - and _"):
        parse_config(_with(study="my study"))


@pytest.mark.parametrize("name", ["name\n", "name\r\n", "a/b", "", ".."])
def test_study_name_must_match_in_full(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^config: study: .* may use only letters, digits, - and _ \(it names a folder\)$"):
        parse_config(_with(study=name))


def test_a_candidate_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"candidate name 'ri\\n' may use only letters"):
        parse_config(_with(models__candidates={"ri\n": "score ~ week + (1 | id)"}))


def test_links_and_file_size_have_safe_defaults() -> None:
    config = parse_config(_with())
    assert config.data.follow_symlinks is False
    assert config.validation.max_file_bytes == 2_000_000_000
    with pytest.raises(ConfigError, match=r"validation.max_file_bytes: Input should be greater than or equal to 1"):
        parse_config(_with(validation={"max_file_bytes": 0}))


def test_internal_fields_are_not_config_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'config_file'"):
        parse_config({**_with(), "config_file": "x.yaml"})


def test_outcome_range_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match=r"low \(10.0\) is above high \(0.0\)"):
        parse_config(_with(validation={"outcome_range": [10, 0]}))


def test_roles_must_be_distinct() -> None:
    with pytest.raises(ConfigError, match=r"must be different columns"):
        parse_config(_with(data__time="score"))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(bad)


def test_criterion_override() -> None:
    config = parse_config(MINIMAL)
    assert config.with_criterion("aic").models.criterion == "aic"
    assert config.with_criterion(None) is config


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(Exception):
        config.study = "other"  # type: ignore[misc]


def test_bundled_example_config_loads() -> None:
    config = load_config(Path(__file__).parents[1] / "config" / "example.yaml")
    assert config.study == "example-trial"
    assert config.source_path.is_file()
    assert set(config.models.candidates) == {"ri", "ris", "ris_uncorrelated"}


def test_subject_may_be_a_list_of_columns_outermost_first() -> None:
    config = parse_config(_with(data__subject=["dog", "side"]))
    assert config.data.subject == ("dog", "side")
    assert config.data.subject_columns == ("dog", "side")
    assert config.data.subject_key == "dog:side"
    assert config.data.roles == ("dog", "side", "week", "score")
    assert config.model_dump(mode="json")["data"]["subject"] == ["dog", "side"]


def test_a_single_subject_keeps_working_as_before() -> None:
    for given in ("patient_id", ["patient_id"]):
        config = parse_config(_with(data__subject=given))
        assert config.data.subject == "patient_id"
        assert config.data.subject_columns == ("patient_id",)
        assert config.data.subject_key == "patient_id"


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ([], r"data.subject: the list is empty; name the subject column"),
        (["dog", "dog"], r"data.subject: a column appears twice in \['dog', 'dog'\]"),
        (["dog", "week"], r"must be different columns, got \{'subject': \['dog', 'week'\]"),
        (5, r"data.subject: expected a column name or a list of column names, got 5"),
    ],
)
def test_bad_subject_lists(subject: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_with(data__subject=subject))


def test_constant_columns_are_optional_and_must_be_covariates() -> None:
    assert parse_config(MINIMAL).data.constant == ()
    assert parse_config(_with(data__constant=["arm", "age"])).data.constant == ("arm", "age")
    with pytest.raises(ConfigError, match=r"data.constant: 'week' is data.time; list only covariates"):
        parse_config(_with(data__constant=["arm", "week"]))


def test_misspelt_key_suggests_the_close_one_and_names_the_missing_one() -> None:
    document = _with(data__outcom="score")
    del document["data"]["outcome"]
    with pytest.raises(ConfigError, match=(
        r"^config: missing required key 'data.outcome'; unknown key 'data.outcom' \(did you mean 'outcome'\? "
        r"allowed here: source, subject, time, outcome, time_unit, time_origin, categorical, constant, "
        r"follow_symlinks, outcome_levels\)$"
    )):
        parse_config(document)
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(allowed here: study, data"):
        parse_config(_with(zzz=1))


def test_schedule_and_execution_are_optional_with_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.schedule is None
    assert config.execution.task_runner == "threads" and config.execution.address is None


def test_schedule_takes_a_cron_expression_and_a_time_zone() -> None:
    config = parse_config({**MINIMAL, "schedule": {"cron": "0 6 * * *", "timezone": "Europe/Oslo"}})
    assert config.schedule is not None
    assert (config.schedule.cron, config.schedule.timezone) == ("0 6 * * *", "Europe/Oslo")
    with pytest.raises(ConfigError, match=r"schedule.cron: '0 6 \* \*' is not a cron expression of five fields"):
        parse_config({**MINIMAL, "schedule": {"cron": "0 6 * *"}})
    with pytest.raises(ConfigError, match=r"schedule.timezone: unknown time zone 'Mars/Base'"):
        parse_config({**MINIMAL, "schedule": {"cron": "0 6 * * *", "timezone": "Mars/Base"}})
    with pytest.raises(ConfigError, match=r"unknown key 'schedule.crn' \(did you mean 'cron'\?"):
        parse_config({**MINIMAL, "schedule": {"crn": "0 6 * * *"}})


def test_execution_names_a_task_runner() -> None:
    config = parse_config({**MINIMAL, "execution": {"task_runner": "dask", "address": "tcp://10.0.0.5:8786"}})
    assert config.execution.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ConfigError, match=r"execution.task_runner: Input should be 'threads', 'processes' or 'dask'"):
        parse_config({**MINIMAL, "execution": {"task_runner": "spark"}})
    with pytest.raises(ConfigError, match=r"address is the Dask scheduler's: set task_runner: dask"):
        parse_config({**MINIMAL, "execution": {"address": "tcp://10.0.0.5:8786"}})


def test_time_unit_and_origin_for_dates() -> None:
    data = parse_config(MINIMAL).data
    assert (data.time_unit, data.time_origin) == (None, None)  # numeric time; for dates the origin is "subject"
    for unit in ("days", "weeks", "months", "years"):
        assert parse_config(_with(data__time_unit=unit)).data.time_unit == unit
    assert parse_config(_with(data__time_origin="study")).data.time_origin == "study"
    assert parse_config(_with(data__time_origin="2024-01-15T08:30")).data.time_origin == "2024-01-15T08:30"
    unquoted = yaml.safe_load("time_origin: 2024-01-15")["time_origin"]  # YAML makes it a date
    assert parse_config(_with(data__time_origin=unquoted)).data.time_origin == "2024-01-15"
    with pytest.raises(ConfigError, match=r"data.time_unit: 'fortnights' is not a time unit; use one of days, weeks, months, years$"):
        parse_config(_with(data__time_unit="fortnights"))
    with pytest.raises(ConfigError, match=r"data.time_origin: 'baseline' is not an origin; use 'subject' .*or an ISO date"):
        parse_config(_with(data__time_origin="baseline"))


def test_a_covariance_structure_must_be_over_the_configured_time_and_subject() -> None:
    # check_candidates reads the time and the subject from the roles as DataConfig orders them.
    columns = ["dog", "side", "week", "visit", "score"]
    config = parse_config(_with(data__subject=["dog", "side"]))
    good = parse_candidates({"mmrm": "score ~ week + us(week | dog:side)"})
    assert check_candidates(good, config.data.roles, columns) == []
    off_time = parse_candidates({"mmrm": "score ~ visit + us(visit | dog:side)"})
    with pytest.raises(ConfigError, match=r"candidate 'mmrm' uses us\(visit \| dog:side\), but the study's time "
                                          r"column is 'week': write us\(week \| dog:side\)"):
        check_candidates(off_time, config.data.roles, columns)
    off_subject = parse_candidates({"ar": "score ~ week + (1 | dog) + ar1(week | dog)"})
    with pytest.raises(ConfigError, match=r"candidate 'ar' uses ar1\(week \| dog\), but the study's subject is "
                                          r"'dog:side': write ar1\(week \| dog:side\)"):
        check_candidates(off_subject, config.data.roles, columns)


# ------------------------------------------------------------------------ binomial and Poisson outcomes (issue 14)


def test_family_and_quadrature_points() -> None:
    for family in ("gaussian", "binomial", "poisson"):
        assert parse_config(_with(models__family=family)).models.family == family
    assert parse_config(_with(models__family="binomial", models__nagq=7)).models.nagq == 7
    with pytest.raises(ConfigError, match=r"^config: models.family: 'logistic' is not a family; use gaussian \(the "
                                          r"default\), binomial \(a 0/1 outcome, logit link\) or poisson"):
        parse_config(_with(models__family="logistic"))


@pytest.mark.parametrize("nagq", [0, -1, 101, 2.0, 1.5, True, "7"])
def test_nagq_is_a_whole_number_of_points_from_1_to_100(nagq: object) -> None:
    with pytest.raises(ConfigError, match=rf"^config: models.nagq: {re.escape(repr(nagq))} is not a number of "
                                          r"quadrature points; use 1 \(the Laplace approximation, the default\) or "
                                          r"a whole number from 2 to 100"):
        parse_config(_with(models__family="binomial", models__nagq=nagq))


def test_nagq_above_1_means_nothing_for_a_gaussian_outcome() -> None:
    with pytest.raises(ConfigError, match=r"^config: models.nagq: 5 has no meaning for family 'gaussian' .*; remove "
                                          r"nagq, or set family binomial or poisson$"):
        parse_config(_with(models__nagq=5))


def test_the_statsmodels_engine_refuses_other_families() -> None:
    assert parse_config(_with(models__engine="statsmodels")).models.engine == "statsmodels"
    with pytest.raises(ConfigError, match=r"^config: models.family: 'poisson' needs engine 'lme4-style' \(the "
                                          r"default: remove engine\); engine 'statsmodels' fits Gaussian models only$"):
        parse_config(_with(models__engine="statsmodels", models__family="poisson"))


def test_outcome_levels_are_two_texts_of_a_binomial_outcome() -> None:
    config = parse_config(_with(models__family="binomial", data__outcome_levels=["no", "yes"]))
    assert config.data.outcome_levels == ("no", "yes")
    assert parse_config(_with(models__family="binomial", data__outcome_levels=[1, 2.0])).data.outcome_levels == ("1", "2")
    with pytest.raises(ConfigError, match=r"data.outcome_levels \['no', 'yes'\] name the two values of a binomial "
                                          r"outcome, but models.family is 'gaussian'; set models.family: binomial"):
        parse_config(_with(data__outcome_levels=["no", "yes"]))


@pytest.mark.parametrize(("levels", "message"), [
    (["yes"], r"expected the outcome's two values, the one coded 0 first, as in \[no, yes\]; got \['yes'\]"),
    ("yes", r"expected the outcome's two values"),
    (["yes", "yes"], r"the two levels are the same \('yes'\)"),
    (["", "yes"], r"a level is empty"),
    ([False, True], r"\[False, True\] are booleans; TRUE/FALSE and true/false outcomes need no outcome_levels"),
])
def test_bad_outcome_levels(levels: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"data.outcome_levels: " + message):
        parse_config(_with(models__family="binomial", data__outcome_levels=levels))


def test_unquoted_no_and_yes_are_text_in_a_config_file(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML's default) would read them as booleans; the config reads YAML 1.2's true/false only.
    path = tmp_path / "study.yaml"
    path.write_text(
        "study: s\n"
        "data: {source: x.csv, subject: id, time: t, outcome: y, outcome_levels: [no, yes], follow_symlinks: yes}\n"
        "models: {family: binomial, candidates: {ri: 'y ~ t + (1 | id)'}}\n"
    )
    config = load_config(path)
    assert config.data.outcome_levels == ("no", "yes")
    assert config.data.follow_symlinks is True  # a boolean key still reads yes as true
    path.write_text(path.read_text().replace("[no, yes]", "[false, true]"))
    with pytest.raises(ConfigError, match=r"data.outcome_levels: \[False, True\] are booleans"):
        load_config(path)



def test_bundled_binary_example_config_loads() -> None:
    config = load_config(Path(__file__).parents[1] / "config" / "example-binary.yaml")
    assert (config.models.family, config.models.nagq, config.models.criterion) == ("binomial", 1, "bic")
    assert config.data.outcome_levels == ("no", "yes")
    assert config.source_path.is_file()
    assert config.models.candidates == {
        "ri": "improved ~ week * arm + (1 | patient_id)",
        "ris": "improved ~ week * arm + (week | patient_id)",
        "ris_uncorrelated": "improved ~ week * arm + (week || patient_id)",
    }
