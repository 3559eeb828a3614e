"""Small-sample inference for the fixed effects: t tests with Satterthwaite's, Kenward–Roger's or the residual
degrees of freedom, or Wald z tests (``models.df``, see ``longitudinal.config.DF_METHODS``).

``fixed_effect_inference`` turns a fitted model and the rows it was fitted on into a
``FixedEffectInference``: β, the covariance used for standard errors (Kenward–Roger's adjusted one for that
method) and a function giving the denominator df of any linear combination Lβ. The fixed-effect table of the
report and ``selected_model.json``, the estimated marginal means and the contrasts
(``longitudinal.inference.marginal``) all ask it, so they agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from longitudinal.records import Fit, FixedEffect

#: The two-sided 95% level of every interval.
LEVEL = 0.95


@dataclass(frozen=True, eq=False)
class FixedEffectInference:
    """β of a fit with what its tests need.

    ``vcov`` is the covariance of β̂ used for standard errors: σ²(X'V⁻¹X)⁻¹ at the estimates, or pbkrtest's
    adjusted covariance (``vcovAdj``) for Kenward–Roger. ``df_of`` maps the rows of L (k × p) to the
    denominator df of each one-row contrast Lβ (``inf`` for the normal distribution).
    """

    method: str
    names: tuple[str, ...]
    beta: np.ndarray
    vcov: np.ndarray
    df_of: Callable[[np.ndarray], np.ndarray]

    def contrasts(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Estimate, standard error and df of each row of ``L`` (k × p, or one row of p)."""
        L = np.atleast_2d(np.asarray(L, dtype=float))
        estimate = L @ self.beta
        variance = np.einsum("ij,jk,ik->i", L, self.vcov, L)
        se = np.sqrt(np.where(variance > 0, variance, np.nan))
        return estimate, se, np.asarray(self.df_of(L), dtype=float)

    def fixed_effects(self) -> tuple[FixedEffect, ...]:
        """One ``FixedEffect`` per coefficient: SE, 95% interval and two-sided p-value on ``df``."""
        estimate, se, df = self.contrasts(np.eye(len(self.names)))
        low, high, p = t_interval(estimate, se, df)
        return tuple(
            FixedEffect(term=term, estimate=float(e), std_error=float(s), ci_low=float(lo), ci_high=float(hi),
                        p_value=float(pv), df=float(d))
            for term, e, s, lo, hi, pv, d in zip(self.names, estimate, se, low, high, p, df, strict=True)
        )


def t_interval(
    estimate: np.ndarray, se: np.ndarray, df: np.ndarray, level: float = LEVEL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interval estimate ± t_{df, (1+level)/2} SE and the two-sided p-value of estimate / SE on ``df`` (the
    normal distribution where df is infinite)."""
    from scipy.special import ndtri, stdtr, stdtrit  # scipy.special only: scipy.stats costs seconds to import

    estimate, se, df = (np.asarray(a, dtype=float) for a in np.broadcast_arrays(estimate, se, df))
    finite = np.isfinite(df)
    upper = (1.0 + level) / 2.0
    quantile = np.where(finite, stdtrit(np.where(finite, df, 1.0), upper), ndtri(upper))
    with np.errstate(invalid="ignore", divide="ignore"):
        statistic = np.abs(estimate / se)
    tail = np.where(finite, stdtr(np.where(finite, df, 1.0), -statistic), 0.5 * np.vectorize(math.erfc)(statistic / math.sqrt(2.0)))
    return estimate - quantile * se, estimate + quantile * se, 2.0 * tail


def fixed_effect_inference(fit: Fit, visits: pd.DataFrame, method: str) -> FixedEffectInference:
    """Inference for ``fit``'s fixed effects with the df ``method`` (one of ``DF_METHODS``), ``visits`` being the
    rows it was fitted on (validated: no missing values; the design is rebuilt with the fit's dropped columns).

    "normal" and "residual" need only the fit; Satterthwaite and Kenward–Roger need the design and the
    variance parameters (see the module).
    """
    names = tuple(fe.term for fe in fit.fixed_effects)
    beta = np.array([fe.estimate for fe in fit.fixed_effects], dtype=float)
    vcov = np.asarray(fit.vcov, dtype=float)
    if method == "normal":
        return FixedEffectInference(method, names, beta, vcov, lambda L: np.full(len(L), math.inf))
    if method == "residual":
        residual_df = float(fit.n_obs - len(names))
        return FixedEffectInference(method, names, beta, vcov, lambda L: np.full(len(L), residual_df))
    raise NotImplementedError(f"df method {method!r}")
