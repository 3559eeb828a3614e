"""The study config: one YAML file per study, parsed once at the edge into frozen, typed records.

Relative paths (``data.source``, ``output.directory``) resolve against the folder of the config file,
so a scheduled run started from another working directory behaves the same.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from longitudinal.errors import ConfigError

#: The outcome's distribution given the random effects, with its canonical link: identity, logit, log.
Family = Literal["gaussian", "binomial", "poisson"]
FAMILIES: tuple[str, ...] = ("gaussian", "binomial", "poisson")
#: Each family's canonical link, the only one fitted.
LINKS: dict[str, str] = {"gaussian": "identity", "binomial": "logit", "poisson": "log"}

_STUDY_NAME = re.compile(r"[A-Za-z0-9_-]+")  # used with fullmatch: "$" would accept a trailing newline

TimeUnit = Literal["days", "weeks", "months", "years"]
#: Length of each ``data.time_unit`` in days (Julian months and years: 30.4375 and 365.25 days).
TIME_UNIT_DAYS: dict[str, float] = {"days": 1.0, "weeks": 7.0, "months": 30.4375, "years": 365.25}
#: The most quadrature points ``models.nagq`` takes (glmer's limit for nAGQ).
MAX_NAGQ = 100

#: ``models.df``: the reference distribution of the fixed-effect tests and intervals. Satterthwaite's and
#: Kenward–Roger's denominator degrees of freedom as lmerTest and pbkrtest compute them, the residual df
#: n − rank(X), or the normal distribution (Wald z, the only one for a binomial or Poisson model).
DfMethod = Literal["satterthwaite", "kenward-roger", "residual", "normal"]
DF_METHODS: tuple[str, ...] = get_args(DfMethod)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Frozen):
    """Where the data are and which column plays which role.

    ``subject`` is one column, or a list of columns whose combination identifies the subject, outermost
    first (``[dog, side]``: each side of each dog is followed over time; side labels repeat across dogs).
    ``constant`` lists columns that must not change within a subject (``[arm, age]``); a subject whose
    value changes has all its rows quarantined.

    ``time_unit`` and ``time_origin`` are for a time column of dates, and only for one (ingestion refuses
    them on numeric time, and refuses dates without ``time_unit``): the analysed time is (date - origin)
    in ``time_unit``. ``time_unit`` is therefore None exactly when the time is analysed as given.
    """

    source: str
    subject: str | tuple[str, ...]
    time: str
    outcome: str
    time_unit: TimeUnit | None = None
    time_origin: str | None = None
    """"subject" (each subject's first visit, the default for dates), "study" (the earliest date) or an ISO date."""
    categorical: tuple[str, ...] = ()
    constant: tuple[str, ...] = ()
    follow_symlinks: bool = False
    """Whether symbolic links in the landing folder (or among a glob's matches) are read. Off by default: a
    link may point anywhere (another study's data, a system file), and is skipped with a warning naming it.
    On, each target is read once and directory-link loops are not walked twice."""
    outcome_levels: tuple[str, str] | None = None
    """For a binomial outcome written as text: its two values, the one coded 0 first (``[no, yes]``: "yes" is
    1). Compared with the data as text, case-sensitive (as R's factor levels); without it the outcome must
    be 0/1 or TRUE/FALSE. Numbers in the list are their text (``[1, 2]`` for a 1/2 coding)."""

    @field_validator("time_unit", mode="before")
    @classmethod
    def _known_unit(cls, value: Any) -> Any:
        if value is not None and value not in TIME_UNIT_DAYS:
            raise ValueError(f"{value!r} is not a time unit; use one of {', '.join(TIME_UNIT_DAYS)}")
        return value

    @field_validator("time_origin", mode="before")
    @classmethod
    def _origin(cls, value: Any) -> Any:
        if value is None or value in ("subject", "study"):
            return value
        if isinstance(value, (dt.date, dt.datetime)):  # YAML reads an unquoted 2024-01-15 as a date
            return value.isoformat()
        if isinstance(value, str):
            try:
                dt.datetime.fromisoformat(value.strip())
                return value.strip()
            except ValueError:
                pass
        raise ValueError(
            f"{value!r} is not an origin; use 'subject' (each subject's first visit), 'study' (the earliest "
            "date in the data) or an ISO date such as 2024-01-15"
        )

    @field_validator("outcome_levels", mode="before")
    @classmethod
    def _two_levels(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"expected the outcome's two values, the one coded 0 first, as in [no, yes]; got {value!r}")
        if any(isinstance(level, bool) for level in value):
            raise ValueError(
                f"{list(value)!r} are booleans; TRUE/FALSE and true/false outcomes need no outcome_levels (remove "
                "it), and other texts go in quotes, as in ['absent', 'present']"
            )
        levels = [_level_text(level) for level in value]
        if any(not level for level in levels):
            raise ValueError(f"a level is empty in {list(value)!r}; write the outcome's two values, as in [no, yes]")
        if levels[0] == levels[1]:
            raise ValueError(f"the two levels are the same ({levels[0]!r}); write the value coded 0, then the one "
                             "coded 1, as in [no, yes]")
        return tuple(levels)

    @field_validator("subject", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("the list is empty; name the subject column, or its columns outermost first")
            if not all(isinstance(part, str) for part in value):
                raise ValueError(f"expected column names, got {list(value)!r}")
            if len(set(value)) < len(value):
                raise ValueError(f"a column appears twice in {list(value)!r}")
            return value[0] if len(value) == 1 else tuple(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a column name or a list of column names, got {value!r}")
        return value

    @field_validator("subject", "time", "outcome")
    @classmethod
    def _non_empty(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for part in (value,) if isinstance(value, str) else value:
            if not part.strip():
                raise ValueError("must name a column")
        return value

    @property
    def subject_columns(self) -> tuple[str, ...]:
        """The column(s) identifying the subject, outermost first (one for a single ``subject``)."""
        return (self.subject,) if isinstance(self.subject, str) else self.subject

    @property
    def subject_key(self) -> str:
        """The column of ``Validated.visits`` that identifies the subject.

        The subject column itself when there is one; for several, ``"dog:side"`` (lme4's name for the
        interaction), a text column validation adds whose values join the parts with ":" ("D1:L").
        """
        return ":".join(self.subject_columns)

    @property
    def roles(self) -> tuple[str, ...]:
        """Every column with a role: the subject column(s), time and outcome."""
        return (*self.subject_columns, self.time, self.outcome)


class ValidationConfig(_Frozen):
    min_observations_per_subject: int = Field(default=1, ge=1)
    outcome_range: tuple[float, float] | None = None
    max_file_bytes: int = Field(default=2_000_000_000, ge=1)
    """A data file larger than this is refused before it is read (its size is checked first)."""

    @field_validator("outcome_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"low ({value[0]}) is above high ({value[1]}); write [low, high]")
        return value


class ModelsConfig(_Frozen):
    """The candidates and how they are fitted and compared.

    ``family`` is the outcome's distribution given the random effects, with its canonical link: gaussian
    (linear mixed models, the default), binomial (0/1, logit) or poisson (counts, log), fitted as lme4's
    ``lmer`` and ``glmer`` do; one family per study, so that the candidates' likelihoods compare. ``nagq``
    is glmer's ``nAGQ``: 1 is the Laplace approximation, more points adaptive Gauss–Hermite quadrature, which
    glmer allows only for one scalar random effect (checked against the candidates by
    ``longitudinal.model.formula.check_family``).

    ``df`` is the reference distribution of the selected model's fixed-effect tests, intervals, marginal
    means and contrasts (``DF_METHODS``): Satterthwaite (lmerTest's default) unless given for a Gaussian
    model; always "normal" for a binomial or Poisson one (glmer's z tests), which may not ask for another.
    """

    criterion: Literal["aic", "bic"] = "bic"
    engine: Literal["lme4-style", "statsmodels"] = "lme4-style"
    candidates: dict[str, str]
    family: Family = "gaussian"
    nagq: int = 1
    df: DfMethod = "satterthwaite"

    @model_validator(mode="before")
    @classmethod
    def _df_for_family(cls, value: Any) -> Any:
        if not isinstance(value, dict) or value.get("family", "gaussian") == "gaussian":
            return value
        if "df" not in value:
            return {**value, "df": "normal"}
        if value["df"] != "normal":
            raise ValueError(
                f"df {value['df']!r} is for linear mixed models; a {value['family']} model's tests use the normal "
                "distribution (glmer's z tests): remove df, or write df: normal"
            )
        return value

    @field_validator("df", mode="before")
    @classmethod
    def _known_df(cls, value: Any) -> Any:
        if value not in DF_METHODS:
            raise ValueError(f"{value!r} is not a df method; use satterthwaite (the default, as lmerTest), "
                             "kenward-roger (as pbkrtest), residual (n minus the fixed effects) or normal (z tests)")
        return value

    @field_validator("candidates")
    @classmethod
    def _some(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("the candidate list is empty; name at least one model formula")
        for name in value:
            if not _STUDY_NAME.fullmatch(str(name)):
                raise ValueError(f"candidate name {name!r} may use only letters, digits, - and _")
        return value

    @field_validator("family", mode="before")
    @classmethod
    def _known_family(cls, value: Any) -> Any:
        if value not in FAMILIES:
            raise ValueError(f"{value!r} is not a family; use gaussian (the default), binomial (a 0/1 outcome, logit "
                             "link) or poisson (counts, log link)")
        return value

    @field_validator("family")
    @classmethod
    def _engine_fits_family(cls, value: str, info: ValidationInfo) -> str:
        if value != "gaussian" and info.data.get("engine") == "statsmodels":
            raise ValueError(f"{value!r} needs engine 'lme4-style' (the default: remove engine); engine 'statsmodels' "
                             "fits Gaussian models only")
        return value

    @field_validator("nagq", mode="before")
    @classmethod
    def _quadrature_points(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NAGQ:
            raise ValueError(f"{value!r} is not a number of quadrature points; use 1 (the Laplace approximation, "
                             f"the default) or a whole number from 2 to {MAX_NAGQ} (adaptive Gauss–Hermite "
                             "quadrature, as glmer's nAGQ)")
        return value

    @field_validator("nagq")
    @classmethod
    def _quadrature_for_glmm(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and info.data.get("family") == "gaussian":  # absent: family itself was refused
            raise ValueError(f"{value} has no meaning for family 'gaussian' (its likelihood is exact, with no "
                             "integral to approximate); remove nagq, or set family binomial or poisson")
        return value


class EstimatesConfig(_Frozen):
    """What the report estimates from the selected model besides its coefficients (emmeans' reference grid).

    ``by`` is a categorical column: a marginal mean per level, and each level against the first (the
    reference level) as ``contrast(emm, "trt.vs.ctrl")``. ``at`` gives values of numeric columns (the time,
    a numeric covariate) where the means are computed; other numeric covariates are held at their mean and
    other factors averaged with equal weights, as emmeans does by default.
    """

    by: str | None = None
    at: dict[str, tuple[float, ...]] = Field(default_factory=dict)

    @field_validator("at", mode="before")
    @classmethod
    def _values(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a mapping of columns to values; write e.g. at: {{week: [0, 4, 8]}}")
        out = {}
        for column, values in value.items():
            listed = values if isinstance(values, (list, tuple)) else [values]
            if not listed or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in listed):
                raise ValueError(f"at {column!r}: {values!r} is not a list of numbers; write e.g. {column}: [0, 4, 8]")
            out[column] = tuple(float(v) for v in listed)
        return out

    @model_validator(mode="after")
    def _something(self) -> EstimatesConfig:
        if self.by is None and not self.at:
            raise ValueError("estimates needs by (a categorical column), at (values of numeric columns), or both")
        return self


class OutputConfig(_Frozen):
    directory: str = "reports"


class ScheduleConfig(_Frozen):
    """When ``longitudinal serve`` runs the study on its own (a cron expression in a time zone)."""

    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a cron expression of five fields, e.g. '0 6 * * *' (06:00 daily)")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as 'Europe/Oslo' or 'UTC'") from None
        return value


class ExecutionConfig(_Frozen):
    """Where the candidate fits run: threads of the flow's process (default), processes, or a Dask cluster."""

    task_runner: Literal["threads", "processes", "dask"] = "threads"
    address: str | None = None
    """With ``dask``: the scheduler of an existing cluster (``tcp://host:8786``); none starts a local one."""

    @model_validator(mode="after")
    def _address_for_dask(self) -> ExecutionConfig:
        if self.address is not None and self.task_runner != "dask":
            raise ValueError("address is the Dask scheduler's: set task_runner: dask, or remove address")
        return self


class StudyConfig(_Frozen):
    study: str
    data: DataConfig
    validation: ValidationConfig = ValidationConfig()
    models: ModelsConfig
    estimates: EstimatesConfig | None = None
    output: OutputConfig = OutputConfig()
    schedule: ScheduleConfig | None = None
    execution: ExecutionConfig = ExecutionConfig()
    base_dir: Path = Path(".")
    """Folder of the config file; relative paths resolve against it (set by :func:`load_config`)."""
    config_file: Path | None = None
    """The config file itself (set by :func:`load_config`), for messages that give a command to run."""

    @field_validator("study")
    @classmethod
    def _study_name(cls, value: str) -> str:
        if not _STUDY_NAME.fullmatch(value):
            raise ValueError(f"{value!r} may use only letters, digits, - and _ (it names a folder)")
        return value

    @model_validator(mode="after")
    def _roles_distinct(self) -> StudyConfig:
        data = self.data
        roles = {"subject": data.subject, "time": data.time, "outcome": data.outcome}
        if len(set(data.roles)) < len(data.roles):
            shown = {k: list(v) if isinstance(v, tuple) else v for k, v in roles.items()}
            raise ValueError(f"data.subject, data.time and data.outcome must be different columns, got {shown}")
        for column in data.constant:
            if column in data.roles:
                role = "data.subject" if column in data.subject_columns else "data.time" if column == data.time else "data.outcome"
                raise ValueError(
                    f"data.constant: {column!r} is {role}; list only covariates that must not change within a subject"
                )
        return self

    @model_validator(mode="after")
    def _levels_for_binomial(self) -> StudyConfig:
        if self.data.outcome_levels is not None and self.models.family != "binomial":
            raise ValueError(
                f"data.outcome_levels {list(self.data.outcome_levels)!r} name the two values of a binomial outcome, "
                f"but models.family is {self.models.family!r}; set models.family: binomial, or remove outcome_levels"
            )
        return self

    @model_validator(mode="after")
    def _estimates_columns(self) -> StudyConfig:
        if self.estimates is None:
            return self
        data = self.data
        roles = {column: "data.subject" for column in data.subject_columns} | {data.outcome: "data.outcome"}
        by = self.estimates.by
        if by is not None:
            if by in roles or by == data.time:
                what = roles.get(by, "data.time")
                raise ValueError(f"estimates.by: {by!r} is {what}; name a categorical covariate such as the arm")
        for column in self.estimates.at:
            if column in roles:
                raise ValueError(f"estimates.at: {column!r} is {roles[column]}; give values of the time or of a "
                                 "numeric covariate")
            if column in data.categorical:
                raise ValueError(f"estimates.at: {column!r} is categorical; its levels are averaged over, or name "
                                 "it in estimates.by")
            if column == by:
                raise ValueError(f"estimates: {column!r} is both by and at")
        return self

    @property
    def source_path(self) -> Path:
        return _resolve(self.base_dir, self.data.source)

    @property
    def output_dir(self) -> Path:
        return _resolve(self.base_dir, self.output.directory) / self.study

    @property
    def repair_command(self) -> str:
        """The command that rebuilds this study's curated registry (named in curation's error messages)."""
        shown = str(self.config_file) if self.config_file is not None else "<the study's config>"
        return f"longitudinal repair --config {shown}"

    def with_criterion(self, criterion: str | None) -> StudyConfig:
        """A copy whose selection criterion is ``criterion`` (the command line's ``--criterion``)."""
        if criterion is None:
            return self
        models = ModelsConfig(**{**self.models.model_dump(), "criterion": criterion})
        return self.model_copy(update={"models": models})


_INTERNAL_KEYS = ("base_dir", "config_file")


def _level_text(level: Any) -> str:
    """A level as the text it is compared with: stripped, a whole number without a decimal part (as ingestion
    writes values: ``2.0`` and ``2`` are "2")."""
    if isinstance(level, float) and level.is_integer():
        return str(int(level))
    return str(level).strip()


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (as true, True, TRUE, false, ...).

    YAML 1.1, PyYAML's default, also reads unquoted yes/no/on/off as booleans, which would turn
    ``outcome_levels: [no, yes]`` into ``[False, True]`` and a column named ``no`` into a boolean. Boolean
    keys lose nothing: pydantic reads "yes", "no", "on" and "off" as booleans.
    """


_BOOL = "tag:yaml.org,2002:bool"
_StudyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StudyLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> Any:
    """A YAML document as the study config reads it (YAML 1.2's booleans: see :class:`_StudyLoader`)."""
    return yaml.load(text, Loader=_StudyLoader)  # noqa: S506 (a SafeLoader subclass)


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def load_config(path: str | Path) -> StudyConfig:
    """Read and check a study config; every problem is a :class:`ConfigError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        document = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(str(exc))})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return parse_config(document, source=str(path), base_dir=path.resolve().parent, config_file=path)


def parse_config(
    document: Any, *, source: str = "config", base_dir: Path = Path("."), config_file: Path | None = None,
) -> StudyConfig:
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping with keys study, data, models, got {type(document).__name__}")
    for internal in _INTERNAL_KEYS:
        if internal in document:
            raise ConfigError(f"{source}: unknown key {internal!r}")
    try:
        return StudyConfig(**document, base_dir=base_dir, config_file=config_file)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """Pydantic's errors as one line per problem, each naming the dotted key."""
    messages = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            parent = error["loc"][:-1]
            allowed = _allowed_keys(parent)
            close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            messages.append(f"unknown key {key!r} ({hint}allowed here: {', '.join(allowed)})")
        elif kind == "missing":
            messages.append(f"missing required key {key!r}")
        else:
            msg = str(error["msg"]).removeprefix("Value error, ")
            messages.append(f"{key}: {msg}" if key else msg)
    return "; ".join(messages)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = StudyConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        nested = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return [name for name in model.model_fields if name not in _INTERNAL_KEYS]


def _one_line(text: str) -> str:
    return " ".join(text.split())
