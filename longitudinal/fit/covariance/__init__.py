"""Structured residual covariance models (MMRM, as mmrm / SAS PROC MIXED / nlme ``gls``), alone or next to
the random effects of one bar (nlme's ``lme(random = ~ z | id, correlation = ...)``): the numeric core.

``structures`` maps an unconstrained θ to a subject's Σ for each of mmrm's structures (us, cs, csh, ar1,
ar1h, toep, toeph, ad, adh over m visits; sp_exp over times) and reads θ aloud; ``grouping`` arranges the
rows by subject (shared visit patterns, batches of subjects with their own V_i); ``likelihood`` evaluates
the ML or REML log-likelihood with β profiled out and its analytic gradient; ``units`` standardizes the
columns a fit runs on; ``prediction`` gives the conditional modes, fitted values and normalized residuals;
``fitting`` maximizes ℓ by BFGS and returns a ``CovarianceFit``.
"""

from __future__ import annotations

from longitudinal.fit.covariance.fitting import CovarianceFit, fit_covariance
from longitudinal.fit.covariance.grouping import PatternGroups, group_by_pattern
from longitudinal.fit.covariance.likelihood import log_likelihood
from longitudinal.fit.covariance.structures import (
    STRUCTURES, CovarianceStructure, describe, named_parameters, parameter_count,
)

__all__ = [
    "STRUCTURES", "CovarianceFit", "CovarianceStructure", "PatternGroups", "describe", "fit_covariance",
    "group_by_pattern", "log_likelihood", "named_parameters", "parameter_count",
]
