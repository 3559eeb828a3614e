"""Likelihoods written from their definitions, for tests that check the engines against them."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import multivariate_normal


def gaussian_loglik(y: np.ndarray, X: np.ndarray, V: np.ndarray, *, reml: bool) -> float:
    """ℓ of y ~ N(Xβ, V) at the GLS β̂, from scipy's multivariate normal density of all rows at once; REML
    adds ½ p log 2π − ½ log|XᵀV⁻¹X| (lme4's and nlme's REML constants: no ½ log|XᵀX| term)."""
    A = X.T @ np.linalg.solve(V, X)
    beta = np.linalg.solve(A, X.T @ np.linalg.solve(V, y))
    value = float(multivariate_normal(X @ beta, V).logpdf(y))
    if reml:
        value += 0.5 * X.shape[1] * math.log(2 * math.pi) - 0.5 * np.linalg.slogdet(A)[1]
    return value
