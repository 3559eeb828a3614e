"""The two response families of a GLMM, each with its canonical link: binomial (0/1, logit) and Poisson (log).

Everything the engine needs per row comes from one pass over the linear predictor η (``Family.evaluate``):
μ, the working weight w and the full log-density log p(y | μ). With the canonical link the working weight
(dμ/dη)² / V(μ) equals V(μ) = dμ/dη, and the score of η is y − μ, so the Fisher and the observed information
agree: Newton's method and Fisher scoring (PIRLS) are the same iteration, and the Laplace approximation's
curvature is exactly ΛᵀZᵀWZΛ + I.

log p is the full density, as glmer's Laplace logLik (``family$aic``): binomial y log μ + (1 − y) log(1 − μ)
for 0/1 y, Poisson y log μ − μ − log y!. Both are computed from η (not μ), so that they stay exact where μ
rounds to 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from longitudinal.fit.failure import FitFailure

#: The largest |η| a Poisson row may take (exp(700) ≈ 1e304): beyond it μ and its sums overflow.
_MAX_LOG_RATE = 700.0


@dataclass(frozen=True, eq=False)
class RowValues:
    """μ, the working weight w = dμ/dη and log p(y | μ) per row, at one linear predictor; ``scratch`` is
    room for the family's intermediate values.

    PIRLS evaluates these once per row per step: ``Family.evaluate`` writes into a ``RowValues`` made once
    per fit (``RowValues.empty``) instead of allocating arrays the size of the data at every step, whose
    page faults cost more than the arithmetic.
    """

    mu: np.ndarray
    weight: np.ndarray
    log_density: np.ndarray
    scratch: np.ndarray

    @classmethod
    def empty(cls, n: int) -> RowValues:
        return cls(mu=np.empty(n), weight=np.empty(n), log_density=np.empty(n), scratch=np.empty(n))


class Family:
    """A response family with its canonical link (``binomial`` or ``poisson``)."""

    name: str
    link: str

    def check(self, y: np.ndarray) -> None:
        """Raise ``FitFailure`` when ``y`` is not an outcome of this family."""
        raise NotImplementedError

    def constant(self, y: np.ndarray) -> np.ndarray:
        """The part of log p(y | μ) that does not depend on μ, per row (0 for binomial, −log y! for Poisson)."""
        raise NotImplementedError

    def evaluate(self, eta: np.ndarray, y: np.ndarray, constant: np.ndarray, out: RowValues | None = None) -> RowValues:
        """μ, w and log p(y | μ) at the linear predictor ``eta`` (``constant`` from ``self.constant(y)``),
        written into ``out`` when given."""
        raise NotImplementedError

    def mean(self, eta: np.ndarray) -> np.ndarray:
        """μ = g⁻¹(η)."""
        raise NotImplementedError

    def start(self, y: np.ndarray) -> np.ndarray:
        """A linear predictor to start from (R's ``family$initialize``: μ = (y + ½) / 2, or y + 0.1)."""
        raise NotImplementedError


class Binomial(Family):
    """Bernoulli outcomes (0/1), logit link: μ = 1 / (1 + e^−η), log p = y η − log(1 + e^η)."""

    name = "binomial"
    link = "logit"

    def check(self, y: np.ndarray) -> None:
        bad = ~((y == 0.0) | (y == 1.0))
        if bad.any():
            raise FitFailure(f"a binomial outcome must be 0 or 1; row {int(np.argmax(bad))} has {float(y[bad][0]):g}")

    def constant(self, y: np.ndarray) -> np.ndarray:
        return np.zeros_like(y)

    def evaluate(self, eta: np.ndarray, y: np.ndarray, constant: np.ndarray, out: RowValues | None = None) -> RowValues:
        # e = exp(−|η|) gives w = e / (1 + e)², μ = ½ + sign(η)(½ − e / (1 + e)) and log(1 + e^η) =
        # max(η, 0) + log1p(e), with no overflow and no branch.
        out = out if out is not None else RowValues.empty(eta.shape[0])
        e, inverse, mu, log_density = out.scratch, out.weight, out.mu, out.log_density
        np.abs(eta, out=e)
        np.negative(e, out=e)
        np.exp(e, out=e)
        np.log1p(e, out=log_density)
        np.maximum(eta, 0.0, out=mu)
        log_density += mu
        np.multiply(y, eta, out=mu)
        np.subtract(mu, log_density, out=log_density)
        np.add(e, 1.0, out=inverse)
        np.divide(1.0, inverse, out=inverse)
        np.multiply(e, inverse, out=mu)  # min(μ, 1 − μ)
        np.sign(eta, out=e)
        inverse *= mu  # w = μ (1 − μ)
        np.subtract(0.5, mu, out=mu)
        mu *= e
        mu += 0.5
        return out

    def mean(self, eta: np.ndarray) -> np.ndarray:
        e = np.exp(-np.abs(eta))
        out: np.ndarray = np.where(eta >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        return out

    def start(self, y: np.ndarray) -> np.ndarray:
        mu = (y + 0.5) / 2.0
        out: np.ndarray = np.log(mu / (1.0 - mu))
        return out


class Poisson(Family):
    """Counts, log link: μ = e^η, log p = y η − e^η − log y!."""

    name = "poisson"
    link = "log"

    def check(self, y: np.ndarray) -> None:
        bad = ~((y >= 0.0) & (y == np.floor(y)) & np.isfinite(y))
        if bad.any():
            raise FitFailure(f"a Poisson outcome must be a non-negative integer; row {int(np.argmax(bad))} has "
                             f"{float(y[bad][0]):g}")

    def constant(self, y: np.ndarray) -> np.ndarray:
        out: np.ndarray = -gammaln(y + 1.0)
        return out

    def evaluate(self, eta: np.ndarray, y: np.ndarray, constant: np.ndarray, out: RowValues | None = None) -> RowValues:
        out = out if out is not None else RowValues.empty(eta.shape[0])
        clipped = np.minimum(eta, _MAX_LOG_RATE, out=out.scratch)
        np.exp(clipped, out=out.mu)
        np.copyto(out.weight, out.mu)
        log_density = np.multiply(y, clipped, out=out.log_density)
        log_density -= out.mu
        log_density += constant
        return out

    def mean(self, eta: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.exp(np.minimum(eta, _MAX_LOG_RATE))
        return out

    def start(self, y: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.log(y + 0.1)
        return out


FAMILIES: dict[str, Family] = {"binomial": Binomial(), "poisson": Poisson()}


def family_named(name: str) -> Family:
    """The family called ``name`` ("binomial" or "poisson"); ``ValueError`` for any other."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown GLMM family {name!r}; use one of {', '.join(FAMILIES)}") from None
