"""The study config: one YAML file per study, parsed once at the edge into frozen, typed records.

Relative paths (``data.source``, ``output.directory``) resolve against the folder of the config file,
so a scheduled run started from another working directory behaves the same.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longitudinal.errors import ConfigError

_STUDY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Frozen):
    source: str
    subject: str
    time: str
    outcome: str
    categorical: tuple[str, ...] = ()

    @field_validator("subject", "time", "outcome")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a column")
        return value


class ValidationConfig(_Frozen):
    min_observations_per_subject: int = Field(default=1, ge=1)
    outcome_range: tuple[float, float] | None = None

    @field_validator("outcome_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"low ({value[0]}) is above high ({value[1]}); write [low, high]")
        return value


class ModelsConfig(_Frozen):
    criterion: Literal["aic", "bic"] = "bic"
    engine: Literal["lme4-style", "statsmodels"] = "lme4-style"
    candidates: dict[str, str]

    @field_validator("candidates")
    @classmethod
    def _some(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("the candidate list is empty; name at least one model formula")
        for name in value:
            if not _STUDY_NAME.match(str(name)):
                raise ValueError(f"candidate name {name!r} may use only letters, digits, - and _")
        return value


class OutputConfig(_Frozen):
    directory: str = "reports"


class StudyConfig(_Frozen):
    study: str
    data: DataConfig
    validation: ValidationConfig = ValidationConfig()
    models: ModelsConfig
    output: OutputConfig = OutputConfig()
    base_dir: Path = Path(".")
    """Folder of the config file; relative paths resolve against it (set by :func:`load_config`)."""

    @field_validator("study")
    @classmethod
    def _study_name(cls, value: str) -> str:
        if not _STUDY_NAME.match(value):
            raise ValueError(f"{value!r} may use only letters, digits, - and _ (it names a folder)")
        return value

    @model_validator(mode="after")
    def _roles_distinct(self) -> StudyConfig:
        roles = {"subject": self.data.subject, "time": self.data.time, "outcome": self.data.outcome}
        if len(set(roles.values())) < 3:
            raise ValueError(f"data.subject, data.time and data.outcome must be three different columns, got {roles}")
        return self

    @property
    def source_path(self) -> Path:
        return _resolve(self.base_dir, self.data.source)

    @property
    def output_dir(self) -> Path:
        return _resolve(self.base_dir, self.output.directory) / self.study

    def with_criterion(self, criterion: str | None) -> StudyConfig:
        """A copy whose selection criterion is ``criterion`` (the command line's ``--criterion``)."""
        if criterion is None:
            return self
        models = ModelsConfig(**{**self.models.model_dump(), "criterion": criterion})
        return self.model_copy(update={"models": models})


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def load_config(path: str | Path) -> StudyConfig:
    """Read and check a study config; every problem is a :class:`ConfigError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(str(exc))})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return parse_config(document, source=str(path), base_dir=path.resolve().parent)


def parse_config(document: Any, *, source: str = "config", base_dir: Path = Path(".")) -> StudyConfig:
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping with keys study, data, models, got {type(document).__name__}")
    if "base_dir" in document:
        raise ConfigError(f"{source}: unknown key 'base_dir'")
    try:
        return StudyConfig(**document, base_dir=base_dir)
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
            messages.append(f"unknown key {key!r} (allowed here: {', '.join(allowed)})")
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
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return [name for name in model.model_fields if name != "base_dir"]


def _one_line(text: str) -> str:
    return " ".join(text.split())
