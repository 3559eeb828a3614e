"""Structured residual covariance models (MMRM, as mmrm / SAS PROC MIXED / nlme ``gls``): the numeric core.

``structures`` maps an unconstrained θ to a subject's Σ for each of mmrm's structures (us, cs, csh, ar1,
ar1h, toep, toeph, ad, adh over m visits; sp_exp over times); ``likelihood`` evaluates the ML or REML
log-likelihood with β profiled out, subjects grouped by visit pattern, and its analytic gradient;
``fitting`` maximizes it by BFGS and returns a ``CovarianceFit``. Not yet dispatched from
``fit.candidate``.
"""

from __future__ import annotations

from longitudinal.fit.covariance.fitting import CovarianceFit, fit_covariance
from longitudinal.fit.covariance.likelihood import PatternGroups, group_by_pattern, log_likelihood
from longitudinal.fit.covariance.structures import STRUCTURES, CovarianceStructure, parameter_count

__all__ = [
    "STRUCTURES", "CovarianceFit", "CovarianceStructure", "PatternGroups", "fit_covariance",
    "group_by_pattern", "log_likelihood", "parameter_count",
]
