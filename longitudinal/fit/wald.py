"""Wald inference for the fixed effects: standard errors from vcov(β), 95% intervals and normal p-values.

Computed while a ``Fit`` record is assembled (by ``fit.candidate`` and ``fit.statsmodels_backend``), so it
lives in ``fit/``, not ``inference/``: the fit package must not import a later one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from longitudinal.records import FixedEffect


_Z_95 = 1.959963984540054


def wald_fixed_effects(names: Sequence[str], beta: np.ndarray, vcov: np.ndarray) -> tuple[FixedEffect, ...]:
    """Estimates with Wald standard errors, 95% intervals (± 1.959964 SE) and two-sided normal p-values.

    The p-value 2 Φ(−|z|) is erfc(|z| / √2), accurate far into the tail (no scipy.stats import, which
    costs seconds in a fresh process). A variance that is not positive gives NaN, not an error.
    """
    effects = []
    for term, estimate, variance in zip(names, beta, np.diag(vcov)):
        se = math.sqrt(variance) if variance > 0 else math.nan
        z = float(estimate) / se if se > 0 else math.nan
        effects.append(FixedEffect(
            term=term, estimate=float(estimate), std_error=se, ci_low=float(estimate) - _Z_95 * se,
            ci_high=float(estimate) + _Z_95 * se, p_value=math.erfc(abs(z) / math.sqrt(2.0)),
        ))
    return tuple(effects)
