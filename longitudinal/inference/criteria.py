"""Choose among candidate models by AIC or BIC.

AIC = −2 logLik + 2k and BIC = −2 logLik + k·ln(n), with lme4's conventions: the log-likelihood is
the maximized *ML* log-likelihood, k = fixed effects + random-effect (co)variance parameters + 1
(residual variance) and n = rows analysed. Every usable fit (``Fit.usable``: a completed fit with a
finite likelihood), fitted by ML on identical rows, competes — as lme4 keeps a fit with a convergence
warning, so does the selection, and the table's ``converged`` column says which passed lme4's checks
(``Fit.converged``); only a failed fit is left out. Δ is measured from the best competitor and the
Akaike/Schwarz weights are exp(−Δ/2) normalized over the competitors. A tie — a score within 1e-6 of the
lowest — goes to the candidate with fewer parameters, then to the one listed first.

The selection also carries what the report shows beside the table, computed here rather than while
rendering: each candidate's AICc and the likelihood-ratio tests between nested candidates
(:mod:`longitudinal.inference.nested`).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from longitudinal.errors import FitError
from longitudinal.inference.nested import compare_nested, compute_aicc
from longitudinal.records import MODEL_COMPARISON_COLUMNS, Fit, Selection

#: The columns of ``model_comparison.csv`` (defined with the :class:`Selection` record).
COLUMNS = MODEL_COMPARISON_COLUMNS
_TIE = 1e-6


def select_model(fits: Sequence[Fit], criterion: Literal["aic", "bic"]) -> Selection:
    """Compare ML fits of the candidates and pick the lowest ``criterion``; add each candidate's AICc and
    the likelihood-ratio tests between nested candidates (:func:`~longitudinal.inference.nested.compare_nested`).

    Raises :class:`FitError` when no candidate is usable (the message gives each candidate's reason),
    and refuses comparisons that are statistically meaningless: REML fits, or fits on different rows
    (the same comparisons the likelihood-ratio tests refuse, so the tests are never refused here).
    """
    if criterion not in ("aic", "bic"):
        raise ValueError(f"criterion must be 'aic' or 'bic', got {criterion!r}")
    reml = [f.name for f in fits if f.method != "ML"]
    if reml:
        raise FitError(
            f"candidates {', '.join(reml)} were fitted by REML; AIC/BIC compare ML fits only "
            "(REML likelihoods of different fixed effects are not comparable)"
        )
    usable = [f for f in fits if f.usable]
    if not usable:
        reasons = "; ".join(f"{f.name}: {f.message or 'did not converge'}" for f in fits)
        raise FitError(f"no candidate model could be fitted ({reasons})")
    sizes = {f.n_obs for f in usable}
    if len(sizes) > 1:
        detail = ", ".join(f"{f.name} n={f.n_obs}" for f in usable)
        raise FitError(f"candidates were fitted on different rows ({detail}); AIC/BIC need identical rows")

    aic = np.array([f.aic if f.usable else math.nan for f in fits])
    bic = np.array([f.bic if f.usable else math.nan for f in fits])
    delta_aic, aic_weight = _deltas_and_weights(aic)
    delta_bic, bic_weight = _deltas_and_weights(bic)
    score = aic if criterion == "aic" else bic
    lowest = float(np.nanmin(score))
    tied = [i for i, f in enumerate(fits) if f.usable and float(score[i]) <= lowest + _TIE]
    best = min(tied, key=lambda i: (fits[i].n_params, i))
    table = pd.DataFrame({
        "model": [f.name for f in fits],
        "formula": [f.formula for f in fits],
        "converged": [f.converged and f.usable for f in fits],  # lme4's verdict; no optimum, no pass
        "singular": [f.singular for f in fits],
        "n_obs": [f.n_obs for f in fits],
        "n_subjects": [f.n_subjects for f in fits],
        "n_params": [f.n_params for f in fits],
        "loglik": [f.loglik for f in fits],
        "aic": aic,
        "bic": bic,
        "delta_aic": delta_aic,
        "delta_bic": delta_bic,
        "aic_weight": aic_weight,
        "bic_weight": bic_weight,
        "selected": [i == best for i in range(len(fits))],
    }, columns=list(COLUMNS))
    return Selection(
        criterion=criterion, table=table, selected=fits[best].name,
        aicc={f.name: compute_aicc(f) for f in fits}, tests=compare_nested(fits),
    )


def _deltas_and_weights(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(values)
    delta = np.full(values.shape, math.nan)
    weight = np.full(values.shape, math.nan)
    if finite.any():
        delta[finite] = values[finite] - values[finite].min()
        relative = np.exp(-0.5 * delta[finite])
        weight[finite] = relative / relative.sum()
    return delta, weight
