"""Gauss–Hermite rules for the standard normal density, as lme4's ``GHrule``.

``gauss_hermite(k)`` gives k nodes z and weights w with Σ w f(z) ≈ ∫ f(z) φ(z) dz, exact for polynomials
of degree below 2k (numpy's probabilists' Hermite rule, weights divided by √(2π) so they sum to 1). glmer's
adaptive quadrature (``glmerAGQ``) centres the rule at each subject's conditional mode û_g and scales it by
the Laplace approximation's conditional SD s_g = 1 / L_g:

    ∫ p(y_g | u) φ(u) du ≈ s_g Σ_k w_k p(y_g | û_g + s_g z_k) φ(û_g + s_g z_k) / φ(z_k)

which is exact when the integrand is a Gaussian times a polynomial of degree below 2k; k = 1 is the
Laplace approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: lme4's ``GHrule`` and ``glmer`` accept 1 to 25 points (``mkGlmerDevfun``: nAGQ <= 25).
MAX_POINTS = 25


@dataclass(frozen=True, eq=False)
class QuadratureRule:
    """Nodes and weights of a Gauss–Hermite rule for the standard normal density (weights sum to 1)."""

    nodes: np.ndarray
    weights: np.ndarray


def gauss_hermite(points: int) -> QuadratureRule:
    """The ``points``-point rule; nodes are symmetric around 0 (an odd rule has the node 0 exactly)."""
    if not 1 <= points <= MAX_POINTS:
        raise ValueError(f"adaptive Gauss-Hermite quadrature takes 1 to {MAX_POINTS} points; got {points}")
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    nodes = np.where(np.abs(nodes) < 1e-15, 0.0, nodes)
    return QuadratureRule(nodes=nodes, weights=weights / math.sqrt(2.0 * math.pi))
