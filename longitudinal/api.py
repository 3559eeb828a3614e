"""Fit, summarize, compare and predict from Python: the library's API for notebooks and scripts.

``fit(formula, data)`` fits one mixed model written in lme4's notation to a pandas DataFrame, by REML
(Gaussian, as ``lmer``) or by maximum likelihood (``reml=False``; always for a binomial or Poisson model, as
``glmer``), through the pipeline's own path: ``longitudinal.fit.candidate.fit_candidate``. The result, a
``MixedModel``, wraps the pipeline's ``Fit`` record with what inference and prediction need (the rows fitted
on, the parsed formula, the data-dependent transforms: factor levels, ``poly``'s coefficients, spline knots).
``compare(models)`` is lme4's ``anova(m1, m2, ...)`` with the pipeline's AIC/BIC table and likelihood-ratio
tests.

Data as users have them: text, categorical and object columns are factors (text, as the pipeline's ingestion
reads them); numbers, integers and booleans included, are floats; the grouping factors after ``|`` are always
text (an integer subject 308 is the level "308"). Missing values: as lme4's ``na.action = na.omit``, a row with a
missing value in a column the formula reads is left out; ``MixedModel.n_dropped`` counts those rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, overload

import numpy as np
import pandas as pd

from longitudinal.config import DF_METHODS, FAMILIES, LINKS
from longitudinal.data.ingest import to_text
from longitudinal.errors import ConfigError, DataError, FitError, FormulaError
from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.glmm.families import family_named
from longitudinal.inference.ddf import DF_METHOD_NAMES, fixed_effect_inference
from longitudinal.model.design import build_design, fixed_effects_matrix, random_effects_matrices
from longitudinal.model.formula import ModelFormula, check_columns, expand_terms, expression_columns, parse_formula
from longitudinal.model.transforms import Transform
from longitudinal.records import Fit

ColumnKind = Literal["text", "number"]

class ConvergenceWarning(UserWarning):
    """The fit did not pass lme4's convergence checks; its notes (``MixedModel.messages``) say which."""


class SingularFitWarning(UserWarning):
    """The optimum is on the boundary (a variance 0 or a correlation ±1): lme4's "boundary (singular) fit"."""


# ------------------------------------------------------------------------------------------------ fit


def fit_model(
    formula: str, data: pd.DataFrame, *, reml: bool | None = None, family: str = "gaussian", nagq: int = 1,
    df: str | None = None, name: str = "model", engine: str = "lme4-style",
) -> MixedModel:
    """Fit ``formula`` (lme4's notation) to ``data`` and return the fitted ``MixedModel``; this is ``longitudinal.fit``.

    ``reml``: None (the default) fits a Gaussian model by REML, as ``lmer``, and a binomial or Poisson one by
    maximum likelihood, as ``glmer`` (which has no REML); False fits by ML. ``family``: "gaussian",
    "binomial" (0/1 outcome, logit link) or "poisson" (counts, log link); ``nagq`` > 1 uses adaptive
    Gauss-Hermite quadrature for a single scalar random effect (glmer's ``nAGQ``). ``df``: the reference
    distribution of the fixed-effect tests: "satterthwaite" (default for Gaussian models, as lmerTest's
    summary), "kenward-roger" (REML only), "residual" or "normal" (the only one for a GLMM, its default).
    ``name`` names the model in ``compare`` and in messages.

    Rows with a missing value in a column the formula reads are left out (lme4's ``na.omit``; counted in
    ``n_dropped``). Raises ``FormulaError`` for a formula that does not parse, ``ConfigError`` for a column
    the data lack (the pipeline's messages), ``DataError`` for data that cannot be modelled (no complete
    row, text in the response), ``FitError`` when the fit fails; warns ``ConvergenceWarning`` when the
    optimum does not pass lme4's convergence checks, ``SingularFitWarning`` for a fit on the boundary (as lme4
    says "boundary (singular) fit").
    """
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    method: Literal["ML", "REML"] = "REML" if (family == "gaussian" if reml is None else reml) else "ML"
    df_method = _df_method(df, family=family, method=method, name=name)
    parsed = parse_formula(formula, name=name)
    check_columns({name: parsed}, [str(c) for c in data.columns])
    rows, kinds, n_dropped = prepare_rows(data, parsed)
    record = fit_candidate(rows, name, formula, method=method, engine=engine, family=family, nagq=nagq)
    if not record.usable:
        raise FitError(record.message or f"model {name!r} could not be fitted")
    # stacklevel 3: the warning points at the caller of ``longitudinal.fit`` (PackageFunction.__call__ between).
    if not record.converged:
        warnings.warn(f"model {name!r}: {record.message}", ConvergenceWarning, stacklevel=3)
    elif record.singular:
        singular = next((m for m in record.message.split("; ") if "singular" in m), "boundary (singular) fit")
        warnings.warn(f"model {name!r}: {singular}", SingularFitWarning, stacklevel=3)
    # The design again, for its data-dependent parameters: ``predict`` evaluates new rows with them.
    transforms = build_design(rows, parsed, dropped=record.dropped_terms).transforms
    return MixedModel(record=record, parsed=parsed, data=rows, transforms=transforms, column_kinds=kinds,
                      n_dropped=n_dropped, df_method=df_method, fingerprint=_fingerprint(rows, parsed.response))


def _df_method(df: str | None, *, family: str, method: str, name: str) -> str:
    """The df method asked for, checked before any fit (the messages of ``inference.ddf``)."""
    chosen = df if df is not None else ("satterthwaite" if family == "gaussian" else "normal")
    if chosen not in DF_METHODS:
        raise ConfigError(f"{chosen!r} is not a df method; use one of {', '.join(DF_METHODS)}")
    if family != "gaussian" and chosen != "normal":
        raise ConfigError(f"model {name!r} is a {family} model: its fixed effects are tested with Wald z tests "
                          f"(df 'normal', as glmer), not {chosen!r}")
    if chosen == "kenward-roger" and method != "REML":
        raise ConfigError(f"model {name!r}: Kenward–Roger df need a REML fit (as pbkrtest); fit by REML or use "
                          "df='satterthwaite'")
    return chosen


def prepare_rows(data: pd.DataFrame, parsed: ModelFormula) -> tuple[pd.DataFrame, dict[str, ColumnKind], int]:
    """The columns ``parsed`` reads, typed as the pipeline types them, without the rows missing any of them.

    Returns the rows (the original index kept), each column's kind and the number of rows dropped. Grouping
    factors and every non-numeric column become text (``longitudinal.data.ingest.to_text``: stripped,
    7.0 written "7"); numeric and boolean columns become floats; the response must be numeric.
    """
    kinds = column_kinds(data, parsed)
    typed = type_columns(data, kinds, where="data")
    complete = typed.notna().all(axis=1).to_numpy()
    if not complete.any():
        raise DataError(f"no row of the data has a value in every column the formula {parsed.text!r} reads "
                        f"({', '.join(sorted(parsed.columns))})")
    return typed[complete], kinds, int((~complete).sum())


def column_kinds(data: pd.DataFrame, parsed: ModelFormula) -> dict[str, ColumnKind]:
    """Text or number for each column ``parsed`` reads, in the data's column order."""
    grouping = {c for block in parsed.blocks for c in block.factors}
    if parsed.covariance is not None:
        grouping |= set(parsed.covariance.subject.split(":"))
    kinds: dict[str, ColumnKind] = {}
    for column in (str(c) for c in data.columns):
        if column not in parsed.columns:
            continue
        numeric = pd.api.types.is_numeric_dtype(data[column]) or pd.api.types.is_bool_dtype(data[column])
        if column == parsed.response and not numeric:
            raise DataError(f"the response {column!r} holds text ({data[column].dtype}); it must be numbers "
                            "(0/1 for a binomial model, counts for a Poisson one)")
        kinds[column] = "text" if column in grouping or not numeric else "number"
    return kinds


def type_columns(data: pd.DataFrame, kinds: Mapping[str, ColumnKind], *, where: str) -> pd.DataFrame:
    """``data``'s columns ``kinds`` as text (``to_text``) or float64 (NaN where missing); a new frame."""
    out: dict[str, pd.Series] = {}
    for column, kind in kinds.items():
        values = data[column]
        if kind == "text":
            out[column] = to_text(values)
            continue
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
            raise DataError(f"column {column!r} of {where} holds text ({values.dtype}), but the model was fitted "
                            "with numbers there")
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isinf(numbers).any():
            raise DataError(f"column {column!r} of {where} has infinite values (row "
                            f"{data.index[np.isinf(numbers)][0]!r}); lme4 refuses them too")
        out[column] = pd.Series(numbers, index=data.index)
    return pd.DataFrame(out, index=data.index)


def _fingerprint(rows: pd.DataFrame, response: str) -> str:
    """What ``compare`` checks to know two models saw the same rows: the rows' labels and response values."""
    hashed = pd.util.hash_pandas_object(rows[[response]], index=True).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


# -------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True, eq=False)
class MixedModel:
    """A fitted mixed model: the pipeline's ``Fit`` record and what inference and prediction need.

    ``record`` is the pipeline's ``Fit`` (estimates, variance components, conditional modes, fitted values,
    convergence evidence); ``parsed`` the formula; ``data`` the rows fitted on (typed, the formula's columns,
    the caller's index); ``transforms`` the data-dependent parameters ``predict`` evaluates new rows with;
    ``column_kinds`` how each column was read (text or number); ``n_dropped`` the rows left out for missing
    values; ``df_method`` the df of the fixed-effect tests; ``fingerprint`` identifies the rows and response.
    """

    record: Fit
    parsed: ModelFormula
    data: pd.DataFrame
    transforms: Mapping[str, Transform]
    column_kinds: Mapping[str, ColumnKind]
    n_dropped: int
    df_method: str
    fingerprint: str

    # ------------------------------------------------------------------------------- what lme4 reports

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def formula(self) -> str:
        return self.record.formula

    @property
    def family(self) -> str:
        return self.record.family

    @property
    def method(self) -> str:
        """"REML" or "ML"."""
        return self.record.method

    @property
    def loglik(self) -> float:
        """The maximized log-likelihood; for a REML fit the REML log-likelihood, as lme4's ``logLik``."""
        return self.record.loglik

    @property
    def aic(self) -> float:
        """−2 loglik + 2k, k = fixed effects + covariance parameters (+1 for σ), as lme4's ``AIC``."""
        return self.record.aic

    @property
    def bic(self) -> float:
        return self.record.bic

    @property
    def deviance(self) -> float:
        """−2 loglik (lme4's ``deviance`` of an ML fit; for a REML fit this is the REML criterion)."""
        return -2.0 * self.record.loglik

    @property
    def reml_criterion(self) -> float | None:
        """lme4's "REML criterion at convergence" (−2 REML log-likelihood); None for an ML fit."""
        return self.record.reml_criterion

    @property
    def sigma(self) -> float:
        """The residual SD (NaN for a binomial or Poisson model, and for a structure with a variance per visit)."""
        return self.record.residual_sd

    @property
    def n_obs(self) -> int:
        return self.record.n_obs

    @property
    def n_groups(self) -> dict[str, int]:
        """Levels of each grouping factor, as lme4's ``ngrps`` (the subject of a covariance structure included)."""
        ranef = self.record.ranef
        out = {str(g): int(ranef.loc[ranef["group"] == g, "level"].nunique()) for g in self.parsed.groups}
        if self.parsed.covariance is not None and self.parsed.covariance.subject not in out:
            out[self.parsed.covariance.subject] = self.record.n_subjects
        return out

    @property
    def converged(self) -> bool:
        return self.record.converged

    @property
    def singular(self) -> bool:
        return self.record.singular

    @property
    def messages(self) -> tuple[str, ...]:
        """The fit's notes in lme4's order: dropped collinear columns, scale warning, singular fit, convergence."""
        return tuple(m for m in self.record.message.split("; ") if m)

    @cached_property
    def fixed_effects(self) -> pd.DataFrame:
        """One row per coefficient (index: lme4's column names): estimate, std_error, df, statistic (t, or z
        where df is infinite), ci_low, ci_high (95%) and the two-sided p_value, with ``df_method``'s df
        (Satterthwaite's by default for a Gaussian model, as lmerTest's summary). Computed on first use."""
        inference = fixed_effect_inference(self.record, self.data, self.df_method)
        rows = inference.fixed_effects()
        return pd.DataFrame({
            "estimate": [r.estimate for r in rows],
            "std_error": [r.std_error for r in rows],
            "df": [r.df for r in rows],
            "statistic": [r.z for r in rows],
            "ci_low": [r.ci_low for r in rows],
            "ci_high": [r.ci_high for r in rows],
            "p_value": [r.p_value for r in rows],
        }, index=pd.Index([r.term for r in rows], name="term"))

    @property
    def coefficients(self) -> pd.Series:
        """β̂ by term (lme4's ``fixef``)."""
        return pd.Series({fe.term: fe.estimate for fe in self.record.fixed_effects}, name="estimate")

    @property
    def vcov(self) -> pd.DataFrame:
        """The Wald covariance of β̂ (lme4's ``vcov``)."""
        terms = [fe.term for fe in self.record.fixed_effects]
        return pd.DataFrame(self.record.vcov, index=terms, columns=terms)

    @property
    def random_effects(self) -> pd.DataFrame:
        """The variance components as lme4's ``as.data.frame(VarCorr(m))``: a row per random-effect term (``term2``
        None: ``variance`` and ``sd``), a row per correlation within a bar (``term``, ``term2``: the covariance in
        ``variance``, the correlation in ``corr``), and the residual (group "Residual") for a Gaussian model."""
        rows: list[dict[str, Any]] = [
            {"group": v.group, "term": v.term, "term2": None, "variance": v.sd ** 2, "sd": v.sd, "corr": math.nan}
            for v in self.record.random_effects
        ]
        sds = {(v.group, v.term): v.sd for v in self.record.random_effects}
        rows += [
            {"group": c.group, "term": c.term1, "term2": c.term2, "corr": c.corr, "sd": math.nan,
             "variance": c.corr * sds[(c.group, c.term1)] * sds[(c.group, c.term2)]}
            for c in self.record.correlations
        ]
        if self.family == "gaussian" and math.isfinite(self.sigma):
            rows.append({"group": "Residual", "term": None, "term2": None, "variance": self.sigma ** 2,
                         "sd": self.sigma, "corr": math.nan})
        return pd.DataFrame(rows, columns=["group", "term", "term2", "variance", "sd", "corr"])

    @overload
    def ranef(self, *, wide: Literal[False] = False) -> pd.DataFrame: ...

    @overload
    def ranef(self, *, wide: Literal[True]) -> dict[str, pd.DataFrame]: ...

    def ranef(self, *, wide: bool = False) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """The conditional modes of the random effects and their conditional SDs (lme4's ``ranef(m, condVar = TRUE)``).

        Long form by default: columns group, level, term, estimate, cond_sd (a level of ``a:b`` labelled
        "a1:b1", as lme4). ``wide=True``: one frame per grouping factor, levels by terms (lme4's layout).
        """
        long = self.record.ranef.astype({"group": str, "level": str, "term": str}).reset_index(drop=True)
        if not wide:
            return long
        return {
            group: part.pivot(index="level", columns="term", values="estimate")
            .reindex(columns=list(dict.fromkeys(part["term"])))
            for group, part in long.groupby("group", sort=False)
        }

    @property
    def fitted(self) -> pd.Series:
        """Fitted values on the rows fitted on (conditional; a GLMM's on the response scale), by row label."""
        return pd.Series(self.record.fitted, index=self.data.index, name="fitted")

    @property
    def residuals(self) -> pd.Series:
        """Response minus fitted, by row label."""
        return pd.Series(self.record.residuals, index=self.data.index, name="residual")

    # ---------------------------------------------------------------------------------------- predict

    def predict(
        self, newdata: pd.DataFrame | None = None, *, random_effects: bool = True,
        type: Literal["link", "response"] = "link",
    ) -> pd.Series:
        """Predictions for ``newdata`` (the rows fitted on when None), as lme4's ``predict``, by row label.

        ``random_effects=True``: conditional on each row's levels (fixed part plus the conditional modes of
        its levels); a level the model has not seen contributes 0, the population prediction, as lme4's
        ``allow.new.levels = TRUE``. ``random_effects=False``: the population level (lme4's ``re.form = NA``).
        For a binomial or Poisson model ``type="link"`` (the default, as lme4) gives the linear predictor and
        ``type="response"`` the mean (probability, rate). Factor levels, ``poly`` and spline bases are the
        training data's; a level of a fixed-effect factor the model has not seen is an error. A row with a
        missing value in a column the prediction reads gets NaN (lme4's ``na.pass``).

        A model with a residual covariance structure (MMRM) predicts at the population level only: its
        conditional predictions also need the subject's other residuals, which is not implemented.
        """
        if type not in ("link", "response"):
            raise ConfigError(f"type must be 'link' or 'response', not {type!r}")
        frame = self.data if newdata is None else newdata
        if not isinstance(frame, pd.DataFrame):
            raise DataError(f"newdata must be a pandas DataFrame, not {frame.__class__.__name__}")
        if random_effects and self.record.covariance is not None:
            raise FitError(
                f"model {self.name!r} has the residual covariance structure {self.record.covariance.term}: its "
                "conditional predictions need each subject's other residuals, which is not implemented; use "
                "predict(newdata, random_effects=False) for the population level"
            )
        needed = self._columns_read(random_effects)
        lacking = [c for c in needed if c not in frame.columns]
        if lacking:
            what = "the grouping factors" if lacking[0] in self._grouping_columns() else "the fixed effects"
            raise ConfigError(f"newdata lacks column {lacking[0]!r}, which {what} of model {self.name!r} read; "
                              f"columns are: {', '.join(map(str, frame.columns))}")
        typed = type_columns(frame, {c: self.column_kinds[c] for c in needed}, where="newdata")
        complete = typed.notna().all(axis=1).to_numpy()
        rows = typed[complete]
        try:
            X, names = fixed_effects_matrix(rows, self.parsed, transforms=self.transforms,
                                            dropped=self.record.dropped_terms)
        except FormulaError as exc:  # a level the fit never saw: a problem of the new data, not of the formula
            raise DataError(f"newdata: {exc}") from None
        eta = X @ self.coefficients.reindex(list(names)).to_numpy()
        if random_effects:
            eta = eta + self._random_part(rows)
        out = np.full(len(frame), math.nan)
        out[complete] = family_named(self.family).mean(eta) if type == "response" and self.family != "gaussian" else eta
        return pd.Series(out, index=frame.index, name="predicted")

    def _grouping_columns(self) -> set[str]:
        return {c for block in self.parsed.blocks for c in block.factors}

    def _columns_read(self, random_effects: bool) -> list[str]:
        """The data columns the prediction reads, in ``data``'s order: the fixed terms' (and the bars')."""
        where = f"formula {self.parsed.text!r}"
        read = {c for term in self.parsed.fixed_terms.terms for v in term.variables for c in expression_columns(v)}
        if random_effects:
            for block in self.parsed.blocks:
                terms = expand_terms(block.spec, where=where).terms
                read |= {c for term in terms for v in term.variables for c in expression_columns(v)}
                read |= set(block.factors)
        return [c for c in self.column_kinds if c in read]

    def _random_part(self, rows: pd.DataFrame) -> np.ndarray:
        """Σ over bars of Z (new rows) times the conditional modes of each row's level; 0 for a new level."""
        total = np.zeros(len(rows))
        modes = self._modes
        for block in random_effects_matrices(rows, self.parsed, transforms=self.transforms):
            table = modes[block.group]
            position = pd.Index(table.index).get_indexer(block.levels)[block.codes]
            values = table.reindex(columns=list(block.terms)).to_numpy()
            b = np.where((position >= 0)[:, None], values[np.maximum(position, 0)], 0.0)
            total += np.einsum("ij,ij->i", block.Z, b)
        return total

    @cached_property
    def _modes(self) -> dict[str, pd.DataFrame]:
        """The conditional modes by grouping factor, levels by terms: built on the first prediction."""
        return self.ranef(wide=True)

    # ----------------------------------------------------------------------------- intervals, summary

    def confint(self, level: float = 0.95, *, reml: bool | None = None) -> pd.DataFrame:
        """Profile-likelihood intervals of the random-effect SDs, correlations and σ, with the fixed effects'
        intervals (``fixed_effects``' df method) below them; columns group, term, term2, parameter,
        estimate, ci_low, ci_high.

        ``reml``: which criterion is profiled; None (default) profiles the criterion the model was fitted by,
        as the pipeline's report does; ``reml=False`` profiles the ML deviance, which is what lme4's
        ``confint(m)`` does for a REML fit too (it refits by ML first), centred on the ML estimates.
        Profiling refits the model many times: seconds on a large data set. Not for an MMRM.
        """
        from longitudinal.inference.ddf import t_interval
        from longitudinal.inference.profile import profile_intervals  # the profile machinery only when asked

        use_reml = self.method == "REML" if reml is None else reml
        profile = profile_intervals(self.record, self.data, level, reml=use_reml)
        rows: list[dict[str, Any]] = []
        for v in self.record.random_effects:
            low, high = profile.sds.get((v.group, v.term), (math.nan, math.nan)) if profile else (math.nan,) * 2
            rows.append({"group": v.group, "term": v.term, "term2": None, "parameter": "sd", "estimate": v.sd,
                         "ci_low": low, "ci_high": high})
        for c in self.record.correlations:
            key = (c.group, c.term1, c.term2)
            low, high = profile.correlations.get(key, (math.nan, math.nan)) if profile else (math.nan,) * 2
            rows.append({"group": c.group, "term": c.term1, "term2": c.term2, "parameter": "corr",
                         "estimate": c.corr, "ci_low": low, "ci_high": high})
        if profile is not None and profile.residual_sd is not None:
            rows.append({"group": "Residual", "term": None, "term2": None, "parameter": "sigma",
                         "estimate": self.sigma, "ci_low": profile.residual_sd[0], "ci_high": profile.residual_sd[1]})
        fixed = self.fixed_effects
        beta_low, beta_high, _ = t_interval(fixed["estimate"].to_numpy(), fixed["std_error"].to_numpy(),
                                            fixed["df"].to_numpy(), level)
        rows += [{"group": None, "term": term, "term2": None, "parameter": "beta", "estimate": estimate,
                  "ci_low": float(lo), "ci_high": float(hi)}
                 for term, estimate, lo, hi in zip(fixed.index, fixed["estimate"], beta_low, beta_high)]
        out = pd.DataFrame(rows, columns=["group", "term", "term2", "parameter", "estimate", "ci_low", "ci_high"])
        out.attrs["notes"] = profile.notes if profile else ()
        return out

    def summary(self) -> str:
        """The model as text, in the spirit of lme4's ``print(summary(m))`` with lmerTest's df and p-values."""
        return "\n".join(_summary_lines(self))

    def __repr__(self) -> str:
        fitted_by = "REML" if self.method == "REML" else "ML"
        return (f"<MixedModel {self.name!r}: {self.formula}, {self.family}, {fitted_by}, n={self.n_obs}, "
                f"logLik={self.loglik:.4f}>")

    def _repr_html_(self) -> str:
        return _summary_html(self)


# ----------------------------------------------------------------------------------------- the summary


def _header(model: MixedModel) -> list[str]:
    if model.family == "gaussian":
        by = "REML" if model.method == "REML" else "maximum likelihood"
        title = f"Linear mixed model fit by {by} (longitudinal, lme4's formulation)"
        if model.record.covariance is not None:
            title += f"; residual covariance {model.record.covariance.description}"
        lines = [title]
    else:
        nagq = model.record.nagq
        how = "Laplace approximation" if nagq == 1 else f"adaptive Gauss-Hermite quadrature, nAGQ = {nagq}"
        lines = [f"Generalized linear mixed model fit by maximum likelihood ({how})",
                 f" Family: {model.family} ( {LINKS[model.family]} )"]
    dropped = f" ({model.n_dropped} rows with missing values left out)" if model.n_dropped else ""
    lines += [f"Formula: {model.formula}", f"Data: {model.n_obs} rows{dropped}", ""]
    return lines


def _criteria(model: MixedModel) -> pd.DataFrame:
    """AIC, BIC, logLik, deviance (−2 logLik; the REML criterion of a REML fit) and residual df, as one row."""
    return pd.DataFrame({"AIC": [model.aic], "BIC": [model.bic], "logLik": [model.loglik],
                         "deviance": [model.deviance], "df.resid": [model.n_obs - model.record.n_params]})


def _criteria_lines(model: MixedModel) -> list[str]:
    lines = [f"REML criterion at convergence: {model.reml_criterion:.4f}"] if model.method == "REML" else []
    return lines + [_criteria(model).to_string(index=False, float_format=lambda v: f"{v:.4f}"), ""]


def _scaled_residuals(model: MixedModel) -> np.ndarray:
    """lme4's "Scaled residuals": Pearson residuals, divided by σ for a Gaussian model."""
    r = model.record.residuals
    if model.family == "gaussian":
        return np.asarray(r / model.sigma if math.isfinite(model.sigma) else model.record.normalized_residuals)
    mu = model.record.fitted
    variance = mu * (1.0 - mu) if model.family == "binomial" else mu
    return np.asarray(r / np.sqrt(variance))


def _residual_lines(model: MixedModel) -> list[str]:
    scaled = _scaled_residuals(model)
    if scaled.size == 0:
        return []
    quantiles = np.quantile(scaled, [0.0, 0.25, 0.5, 0.75, 1.0])  # R's default type 7
    frame = pd.DataFrame([quantiles], columns=["Min", "1Q", "Median", "3Q", "Max"])
    return ["Scaled residuals:", frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"), ""]


def random_effects_table(model: MixedModel) -> pd.DataFrame:
    """lme4's printed ``VarCorr``: Groups, Name, Variance, Std.Dev. and the correlations with the bar's
    earlier terms (Corr), one row per term, the residual last."""
    corr = {(c.group, c.term1, c.term2): c.corr for c in model.record.correlations}
    rows = []
    for v in model.record.random_effects:
        earlier = [t for g, t in ((x.group, x.term) for x in model.record.random_effects) if g == v.group]
        earlier = earlier[: earlier.index(v.term)]
        cells = " ".join(f"{corr[(v.group, t, v.term)]:.2f}" for t in earlier if (v.group, t, v.term) in corr)
        rows.append({"Groups": v.group, "Name": v.term, "Variance": v.sd ** 2, "Std.Dev.": v.sd, "Corr": cells})
    if model.family == "gaussian" and math.isfinite(model.sigma):
        rows.append({"Groups": "Residual", "Name": "", "Variance": model.sigma ** 2, "Std.Dev.": model.sigma,
                     "Corr": ""})
    return pd.DataFrame(rows, columns=["Groups", "Name", "Variance", "Std.Dev.", "Corr"])


def fixed_effects_table(model: MixedModel) -> pd.DataFrame:
    """lme4/lmerTest's coefficient table: Estimate, Std. Error, df, t value (z value), Pr(>|t|)."""
    fixed = model.fixed_effects
    normal = bool(np.isinf(fixed["df"]).all())
    stat, p = ("z value", "Pr(>|z|)") if normal else ("t value", "Pr(>|t|)")
    table = pd.DataFrame({"Estimate": fixed["estimate"], "Std. Error": fixed["std_error"]})
    if not normal:
        table["df"] = fixed["df"]
    table[stat] = fixed["statistic"]
    table[p] = fixed["p_value"]
    return table


def _aligned(random: pd.DataFrame) -> list[str]:
    """The random-effects table as lme4 prints it: names left-aligned, a group named once, numbers right-aligned."""
    groups = random["Groups"].where(random["Groups"] != random["Groups"].shift(), "")
    cells = [list(random.columns)] + [
        [group, name, f"{variance:.6g}", f"{sd:.6g}", corr]
        for group, name, variance, sd, corr in zip(groups, random["Name"], random["Variance"], random["Std.Dev."],
                                                   random["Corr"])
    ]
    widths = [max(len(str(row[j])) for row in cells) for j in range(5)]
    return [" " + " ".join(str(cell).ljust(w) if j in (0, 1, 4) else str(cell).rjust(w)
                           for j, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in cells]


def _format_p(value: float) -> str:
    return "NaN" if not math.isfinite(value) else ("< 2e-16" if value < 2e-16 else f"{value:.3g}")


def _summary_lines(model: MixedModel) -> list[str]:
    lines = _header(model) + _criteria_lines(model) + _residual_lines(model)
    random = random_effects_table(model)
    if len(random):
        lines += ["Random effects:", *_aligned(random)]
    groups = ", ".join(f"{g}, {n}" for g, n in model.n_groups.items())
    lines += [f"Number of obs: {model.n_obs}, groups:  {groups}", ""]
    if model.record.covariance is not None:
        parameters = ", ".join(f"{k} = {v:.4g}" for k, v in model.record.covariance.parameters)
        lines += [f"Residual covariance {model.record.covariance.term}: {parameters}", ""]
    fixed = fixed_effects_table(model).rename_axis(None)
    formatters: dict[str | int, Callable[[Any], str]] = {c: (lambda v: f"{v:.6g}") for c in fixed.columns[:2]}
    formatters.update({c: (lambda v: f"{v:.3f}") for c in fixed.columns[2:-1]})
    formatters[fixed.columns[-1]] = _format_p
    lines += [f"Fixed effects, df by {DF_METHOD_NAMES[model.df_method]}:", fixed.to_string(formatters=formatters)]
    lines += _correlation_lines(model)
    if model.messages:
        lines += [""] + [f"Note: {m}" for m in model.messages]
    return lines


def _correlation_lines(model: MixedModel) -> list[str]:
    """lme4's "Correlation of Fixed Effects" (lower triangle), for 2 to 12 coefficients as lme4 prints it."""
    vcov = model.vcov
    if not 2 <= len(vcov) <= 12:
        return []
    sd = np.sqrt(np.diag(vcov.to_numpy()))
    corr = vcov.to_numpy() / np.outer(sd, sd)
    names = list(vcov.index)
    cells = pd.DataFrame(
        [[f"{corr[i, j]:.3f}" if j < i else "" for j in range(len(names) - 1)] for i in range(1, len(names))],
        index=names[1:], columns=names[:-1],
    )
    return ["", "Correlation of Fixed Effects:", cells.to_string()]


def _summary_html(model: MixedModel) -> str:
    head = "<br>".join(html.escape(line) for line in _header(model) if line)
    if model.method == "REML":
        head += f"<br>REML criterion at convergence: {model.reml_criterion:.4f}"
    fixed = fixed_effects_table(model)
    parts = [f"<div><p>{head}</p>", _criteria(model).to_html(index=False, float_format=lambda v: f"{v:.4f}")]
    random = random_effects_table(model)
    if len(random):
        parts += ["<p><b>Random effects</b></p>", random.to_html(index=False, float_format=lambda v: f"{v:.4g}")]
    groups = ", ".join(f"{html.escape(g)}: {n}" for g, n in model.n_groups.items())
    parts += [f"<p>Number of obs: {model.n_obs}; groups: {groups}</p>",
              f"<p><b>Fixed effects</b>, df by {html.escape(DF_METHOD_NAMES[model.df_method])}</p>",
              fixed.to_html(float_format=lambda v: f"{v:.4g}")]
    parts += [f"<p>Note: {html.escape(m)}</p>" for m in model.messages]
    return "".join(parts) + "</div>"


# ------------------------------------------------------------------------------------------- compare


def compare(models: Sequence[MixedModel]) -> pd.DataFrame:
    """Compare models fitted to the same rows, as lme4's ``anova(m1, m2, ...)``: one row per model (index: its
    name), ordered by the number of parameters, with formula, n_params, loglik, deviance, aic, bic, their
    differences from the best (delta_aic, delta_bic), Akaike and Schwarz weights, converged, singular, and the
    likelihood-ratio test of each model against the one above it when it nests it (chisq, chi_df, p_value,
    reference). ``.attrs["tests"]`` holds the tests between every nested pair and ``.attrs["notes"]`` what was
    done on the way.

    As lme4's ``anova``, REML fits are refitted by ML first (REML likelihoods of different fixed effects do not
    compare), and the notes say so. The pipeline's comparison does the rest (``inference.criteria.select_model``,
    ``inference.nested.compare_nested``): k counts as lme4 counts it; when the larger model adds one random-effect
    term, the p-value is from the 50:50 mixture of χ²(df − 1) and χ²(df) (the variance is tested on its boundary;
    lme4's anova reports the plain χ²(df) p-value, which is larger: conservative); ``reference`` says which.
    Models with the same name are shown as m1, m2, ... in the order given.
    Raises ``FitError`` for models fitted to different rows or responses, or of different families.
    """
    # scipy.stats (the χ² mixtures) costs a second to import: only when a comparison is asked for.
    from longitudinal.inference.criteria import select_model

    models = list(models)
    if not models:
        raise ConfigError("compare needs at least one model")
    names = [m.name for m in models]
    notes = []
    if len(set(names)) < len(names):
        names = [f"m{i + 1}" for i in range(len(models))]
        notes.append(f"models renamed {', '.join(names)} in the order given (their names were not distinct)")
    _check_comparable(models, names)
    refit = [n for n, m in zip(names, models) if m.method == "REML"]
    if refit:
        notes.append(f"refitting model(s) {', '.join(refit)} with ML (instead of REML), as lme4's anova")
    fits = [_ml_record(m, n) for m, n in zip(models, names)]
    selection = select_model(fits, "aic")
    table = selection.table.set_index("model")
    table = table.assign(deviance=-2.0 * table["loglik"]).drop(columns=["selected", "n_obs", "n_subjects"])
    order = sorted(range(len(fits)), key=lambda i: (fits[i].n_params, i))
    table = table.iloc[order]
    tests = {(t.smaller, t.larger): t for t in selection.tests}
    sequential: list[dict[str, Any]] = [{}]
    for above, below in zip(table.index[:-1], table.index[1:]):
        test = tests.get((above, below))
        sequential.append({} if test is None else {
            "chisq": test.statistic, "chi_df": test.df, "p_value": test.p_value, "reference": test.reference,
        })
    extra = pd.DataFrame(sequential, index=table.index, columns=["chisq", "chi_df", "p_value", "reference"])
    out = pd.concat([table[["formula", "n_params", "loglik", "deviance", "aic", "bic", "delta_aic", "delta_bic",
                            "aic_weight", "bic_weight", "converged", "singular"]], extra], axis=1)
    out.attrs["tests"] = pd.DataFrame(
        [{"smaller": t.smaller, "larger": t.larger, "chisq": t.statistic, "chi_df": t.df, "p_value": t.p_value,
          "reference": t.reference, "notes": "; ".join(t.notes)} for t in selection.tests],
        columns=["smaller", "larger", "chisq", "chi_df", "p_value", "reference", "notes"],
    )
    out.attrs["notes"] = tuple(notes)
    return out


def _check_comparable(models: Sequence[MixedModel], names: Sequence[str]) -> None:
    """Refuse what no likelihood comparison means: other responses, other families, other rows."""
    first = models[0]
    for name, model in zip(names, models):
        if model.parsed.response != first.parsed.response:
            raise FitError(f"model {name!r} models {model.parsed.response!r} and model {names[0]!r} "
                           f"{first.parsed.response!r}: likelihoods of different responses do not compare")
        if model.family != first.family:
            raise FitError(f"model {name!r} is {model.family} and model {names[0]!r} {first.family}: "
                           "likelihoods of different families do not compare")
    if len({(m.n_obs, m.fingerprint) for m in models}) > 1:
        detail = ", ".join(f"{n!r} on {m.n_obs} rows ({m.n_dropped} left out for missing values)"
                           for n, m in zip(names, models))
        raise FitError(f"the models were fitted to different rows ({detail}); fit them to the same rows, e.g. "
                       "drop the rows with a missing value in any column one of them reads before fitting")


def _ml_record(model: MixedModel, name: str) -> Fit:
    """The model's ML fit under ``name``: its own record, or its ML refit through the same path as ``fit``."""
    record = model.record
    if record.method == "REML":
        record = fit_candidate(model.data, name, model.formula, method="ML", engine=record.engine,
                               family=model.family, nagq=record.nagq)
    return record if record.name == name else _renamed(record, name)


def _renamed(record: Fit, name: str) -> Fit:
    return dataclasses.replace(record, name=name)
