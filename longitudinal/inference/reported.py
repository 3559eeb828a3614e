"""What the report says about the selected model beyond its fit: the inference a statistician signs.

``report_inference`` takes the reported fit (the REML refit of a Gaussian model, the ML fit of a GLMM) and
the rows it was fitted on, and returns it with

- its fixed effects tested on the study's df method (``models.df``: Satterthwaite by default, as lmerTest;
  Kenward–Roger with pbkrtest's adjusted covariance; the residual df; or the normal distribution, the only
  one for a GLMM), see ``longitudinal.inference.ddf``;
- profile-likelihood 95% intervals of its random-effect SDs and correlations and of the residual SD
  (``longitudinal.inference.profile``), where they are defined, profiling the criterion of the fit: the
  REML criterion for a REML fit, as MixedModels.jl does and issue 15 asks. lme4's ``confint(method =
  "profile")`` refits a REML fit by ML first (its ``devfun2``; lme4 issue #325), so for a REML fit its
  intervals are those of the ML fit, centred on the ML estimates; for an ML fit (and a GLMM) they are
  lme4's;

and the estimated marginal means and contrasts the study's ``estimates`` section asks for
(``longitudinal.inference.marginal``), computed with the same df method, and the ICC and R²
(``longitudinal.inference.variance``).

A step that cannot be carried out for this model (Kenward–Roger on a crossed design too large for its
n × n covariance, say) does not fail the run: the fit keeps what could be computed and says what was not,
and why, in its ``message`` (shown in the report's notes on the fit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pandas as pd

from longitudinal.config import StudyConfig
from longitudinal.errors import ConfigError, LongitudinalError
from longitudinal.inference.ddf import DF_METHOD_NAMES, FixedEffectInference, fixed_effect_inference
from longitudinal.inference.variance import explained_variance
from longitudinal.model.formula import ModelFormula
from longitudinal.records import Fit, ReportedModel

def report_inference(fit: Fit, visits: pd.DataFrame, config: StudyConfig) -> ReportedModel:
    """``fit`` with df-corrected fixed effects and profile intervals, its marginal estimates (None when the
    study has no ``estimates`` section) and its ICC and R². ``visits`` are the rows the fit was made on."""
    if not fit.usable or not fit.fixed_effects:
        if config.estimates is None:
            return ReportedModel(fit)
        return ReportedModel(_with_notes(fit, ["the marginal means and contrasts the study asks for (estimates) "
                                               "were not computed: the selected model's fit failed"]))
    notes: list[str] = []
    inference = _fixed_effect_inference(fit, visits, config.models.df, notes)
    reported = dataclasses.replace(fit, fixed_effects=inference.fixed_effects(), vcov=inference.vcov)
    reported = _with_profile(reported, visits, notes)
    estimates = None
    if config.estimates is not None:
        from longitudinal.inference.marginal import estimate_means

        try:
            estimates = estimate_means(reported, visits, config.estimates, inference)
        except (LongitudinalError, ArithmeticError, ValueError) as exc:  # checked before the fits; never fail here
            notes.append(f"the marginal means and contrasts (estimates) could not be computed: {exc}")
    return ReportedModel(_with_notes(reported, notes), estimates, explained_variance(reported, visits),
                         df_method=inference.method)


def _with_notes(fit: Fit, notes: list[str]) -> Fit:
    """``fit`` with ``notes`` after its own message (the report lists them under "Notes on this fit")."""
    if not notes:
        return fit
    return dataclasses.replace(fit, message="; ".join(m for m in (fit.message, *notes) if m))


def check_estimates(config: StudyConfig, visits: pd.DataFrame, formulas: Mapping[str, ModelFormula]) -> None:
    """Refuse, before any fit, an ``estimates`` section the analysed rows cannot answer: a ``by`` column that is
    missing or not categorical (text, or listed in ``data.categorical``), an ``at`` column that is missing or
    not numeric, and, for every candidate (``formulas``, parsed), what its reference grid would refuse after
    the fits (``marginal.check_reference_grid``: an ``at`` value that is not a level of ``factor(week)``, a
    ``by`` column the candidate reads as a number). Raises ``ConfigError`` naming the column and the fix."""
    estimates = config.estimates
    if estimates is None:
        return
    columns = ", ".join(map(str, visits.columns))
    by = estimates.by
    if by is not None:
        if by not in visits.columns:
            raise ConfigError(f"estimates.by: the data have no column {by!r}; columns are: {columns}")
        if pd.api.types.is_numeric_dtype(visits[by]) and by not in config.data.categorical:
            raise ConfigError(f"estimates.by: {by!r} holds numbers; means per level need a categorical column: "
                              "list it in data.categorical, or name a text column")
    for column in estimates.at:
        if column not in visits.columns:
            raise ConfigError(f"estimates.at: the data have no column {column!r}; columns are: {columns}")
        if not pd.api.types.is_numeric_dtype(visits[column]) or column in config.data.categorical:
            raise ConfigError(f"estimates.at: {column!r} is categorical; give values of a numeric column (the "
                              "time, a numeric covariate), or name it in estimates.by")
    from longitudinal.inference.marginal import check_reference_grid

    check_reference_grid(estimates, formulas, visits)


def _fixed_effect_inference(fit: Fit, visits: pd.DataFrame, method: str, notes: list[str]) -> FixedEffectInference:
    """The study's df method, or the normal distribution with a note saying why that method could not be used."""
    try:
        return fixed_effect_inference(fit, visits, method)
    except (LongitudinalError, NotImplementedError, ArithmeticError, ValueError) as exc:
        notes.append(f"the df by {DF_METHOD_NAMES.get(method, method)} could not be computed ({exc}); the "
                     "fixed-effect tests, intervals and estimates use the normal distribution instead")
        return fixed_effect_inference(fit, visits, "normal")


def _with_profile(fit: Fit, visits: pd.DataFrame, notes: list[str]) -> Fit:
    """``fit`` with the profile intervals of its variance components where they are defined."""
    from longitudinal.inference.profile import profile_intervals

    try:
        profile = profile_intervals(fit, visits, reml=fit.method == "REML")
    except (LongitudinalError, ArithmeticError, ValueError) as exc:
        notes.append(f"the profile-likelihood intervals of the variance components could not be computed ({exc})")
        return fit
    if profile is None:
        if fit.covariance is not None:
            notes.append("no profile-likelihood intervals for a model with a residual covariance structure (its "
                         "covariance parameters and any random effects beside it are shown without intervals)")
        return fit
    notes.extend(profile.notes)
    nan = (math.nan, math.nan)
    return dataclasses.replace(
        fit,
        random_effects=tuple(
            dataclasses.replace(vc, ci_low=bounds[0], ci_high=bounds[1])
            for vc in fit.random_effects
            for bounds in [profile.sds.get((vc.group, vc.term), nan)]
        ),
        correlations=tuple(
            dataclasses.replace(c, ci_low=bounds[0], ci_high=bounds[1])
            for c in fit.correlations
            for bounds in [profile.correlations.get((c.group, c.term1, c.term2), nan)]
        ),
        residual_sd_ci=profile.residual_sd,
    )
