"""Term functions whose values depend on the analysed data: ``factor``, ``poly``, ``ns``, ``bs``, ``scale``.

Each is computed in two steps, as R does: its parameters are fitted once on the analysed data (factor
levels; poly's ``alpha`` and ``norm2``; the splines' interior and boundary knots; scale's mean and SD), then the
basis is
evaluated from those parameters. The parameters are recorded in the design so that new data (a later
prediction) are evaluated with the same basis, as R's ``predict`` does through ``makepredictcall``.

The numbers are R's: ``poly(x, degree = d)`` (orthogonal polynomials; R's QR of the centred Vandermonde
matrix on the fitted data, the three-term recurrence on new data), ``splines::ns(x, df = k)`` and
``splines::bs(x, df = k, degree = 3)`` with ``intercept = FALSE``, interior knots at the type-7 quantiles of
``x`` and boundary knots at its range (``ns`` is linear beyond the boundary knots, ``bs`` continues its
boundary polynomial, both as in R).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from longitudinal.errors import FormulaError


@dataclass(frozen=True)
class FactorLevels:
    """The levels of a categorical variable (text columns, ``factor(x)``), in R's order; the first is the reference."""

    levels: tuple[str, ...]


@dataclass(frozen=True)
class PolyBasis:
    """R's ``attr(poly(x, degree), "coefs")``: the recurrence's centres ``alpha`` (degree of them) and ``norm2``
    (degree + 2 squared norms, the first two 1 and n)."""

    degree: int
    alpha: tuple[float, ...]
    norm2: tuple[float, ...]


@dataclass(frozen=True)
class SplineBasis:
    """A spline basis without intercept: ``kind`` ``"ns"`` (natural cubic) or ``"bs"`` (B-spline of ``degree``),
    its interior ``knots`` and ``boundary`` knots (R's ``attr(, "knots")`` and ``attr(, "Boundary.knots")``)."""

    kind: Literal["ns", "bs"]
    degree: int
    knots: tuple[float, ...]
    boundary: tuple[float, float]

    @property
    def df(self) -> int:
        return len(self.knots) + (1 if self.kind == "ns" else self.degree)


@dataclass(frozen=True)
class ScaleParameters:
    """R's ``scale(x)``: ``(x − center) / scale`` with the mean and the SD (denominator n − 1) of the fitted data
    (``attr(, "scaled:center")`` and ``attr(, "scaled:scale")``)."""

    center: float
    scale: float


Transform = FactorLevels | PolyBasis | SplineBasis | ScaleParameters


def fit_scale(x: np.ndarray, *, shown: str) -> ScaleParameters:
    """The parameters of ``scale(x)`` on the fitted data; ``FormulaError`` when ``x`` is constant (R would divide
    by zero and give NaN)."""
    center = float(np.mean(x))
    scale = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    if not (scale > 0.0 and np.isfinite(scale)):
        raise FormulaError(f"{shown}: the variable is constant on the analysed rows, so scale() would divide by zero")
    return ScaleParameters(center=center, scale=scale)


# ---------------------------------------------------------------------------------------------- poly


def fit_poly(x: np.ndarray, degree: int, *, shown: str) -> tuple[np.ndarray, PolyBasis]:
    """R's ``poly(x, degree)`` on the analysed data: the basis (n × degree) and its recorded coefficients.

    As R: the centred Vandermonde matrix's Householder QR; ``Z = Q diag(R)`` are the residuals of each power
    on the lower ones; ``norm2`` their squared norms and ``alpha`` their weighted means of ``x``.
    """
    if degree >= np.unique(x).shape[0]:
        raise FormulaError(f"{shown}: the degree must be less than the number of distinct values of the variable")
    mean = float(np.mean(x))
    centred = x - mean
    vandermonde = centred[:, None] ** np.arange(degree + 1)
    Q, R = np.linalg.qr(vandermonde)
    Z = Q * np.diag(R)
    norm2 = np.einsum("ij,ij->j", Z, Z)
    alpha = np.einsum("i,ij->j", centred, Z * Z) / norm2 + mean
    basis = PolyBasis(degree=degree, alpha=tuple(alpha[:degree].tolist()), norm2=(1.0, *norm2.tolist()))
    return np.ascontiguousarray(Z[:, 1:] / np.sqrt(norm2[1:])), basis


def poly_basis(x: np.ndarray, basis: PolyBasis) -> np.ndarray:
    """The recorded ``poly`` basis at ``x`` (new data): R's three-term recurrence in ``predict.poly``."""
    alpha, norm2 = basis.alpha, basis.norm2
    Z = np.empty((x.shape[0], basis.degree + 1))
    Z[:, 0] = 1.0
    Z[:, 1] = x - alpha[0]
    for i in range(1, basis.degree):
        Z[:, i + 1] = (x - alpha[i]) * Z[:, i] - (norm2[i + 1] / norm2[i]) * Z[:, i - 1]
    return np.ascontiguousarray(Z[:, 1:] / np.sqrt(np.asarray(norm2[2:])))


# ------------------------------------------------------------------------------------------- splines


def fit_spline(x: np.ndarray, kind: Literal["ns", "bs"], df: int, degree: int, *, shown: str) -> SplineBasis:
    """Knots of ``ns(x, df)`` / ``bs(x, df, degree)`` (intercept FALSE): ``df - 1`` (ns) or ``df - degree``
    (bs) interior knots at equally spaced type-7 quantiles of ``x``, boundary knots at its range."""
    interior = df - 1 if kind == "ns" else df - degree
    if interior < 0:
        least = 1 if kind == "ns" else degree
        raise FormulaError(f"{shown}: df must be at least {least}")
    boundary = (float(np.min(x)), float(np.max(x)))
    if boundary[0] == boundary[1]:
        raise FormulaError(f"{shown}: the variable takes a single value; a spline needs a range")
    probabilities = np.linspace(0.0, 1.0, interior + 2)[1:-1]
    return SplineBasis(kind=kind, degree=degree, knots=tuple(quantile7(x, probabilities).tolist()), boundary=boundary)


def spline_basis(x: np.ndarray, spline: SplineBasis) -> np.ndarray:
    """The spline basis (n × df) at ``x``: R's ``ns``/``bs`` with the recorded knots (``predict`` on new data)."""
    order = spline.degree + 1
    lower, upper = spline.boundary
    knots = np.sort(np.concatenate([np.repeat(spline.boundary, order), spline.knots]))
    below, above = x < lower, x > upper
    inside = ~(below | above)
    basis = np.zeros((x.shape[0], knots.shape[0] - order))
    basis[inside] = bspline_design(knots, x[inside], order)
    if spline.kind == "ns":
        for side, pivot in ((below, lower), (above, upper)):
            if side.any():  # linear beyond the boundary: value and slope at the boundary knot
                at = np.array([pivot])
                basis[side] = (bspline_design(knots, at, order)
                               + (x[side] - pivot)[:, None] * bspline_design(knots, at, order, derivative=1))
        const = np.vstack([bspline_design(knots, np.array([b]), order, derivative=2) for b in spline.boundary])
        # R: the basis projected on the null space of the second derivatives at the boundary, via qr(t(const))
        Q, _ = np.linalg.qr(const[:, 1:].T, mode="complete")
        return np.ascontiguousarray(basis[:, 1:] @ Q[:, 2:])
    for side, pivot in ((below, 0.75 * lower + 0.25 * knots[order]), (above, 0.75 * upper + 0.25 * knots[-order - 1])):
        if side.any():  # R's Taylor expansion at a pivot a quarter of the way to the next knot
            powers = np.arange(order)
            factorials = np.cumprod(np.concatenate([[1.0], np.arange(1.0, order)]))
            derivatives = np.vstack([bspline_design(knots, np.array([pivot]), order, derivative=int(d)) for d in powers])
            basis[side] = ((x[side] - pivot)[:, None] ** powers / factorials) @ derivatives
    return np.ascontiguousarray(basis[:, 1:])


def bspline_design(knots: np.ndarray, x: np.ndarray, order: int, derivative: int = 0) -> np.ndarray:
    """``splines::splineDesign(knots, x, order, derivs)`` for ``x`` within the boundary knots (n × basis).

    Cox-de Boor recursion over all basis functions; a point on the right boundary belongs to the last
    non-empty interval, as in R. Derivatives by the B-spline derivative formula on lower orders.
    """
    count = knots.shape[0] - order
    if derivative >= order:
        return np.zeros((x.shape[0], count))
    low = order - derivative
    last = int(np.searchsorted(knots, knots[-1], side="left")) - 1  # the last interval of positive width
    cell = np.minimum(np.searchsorted(knots, x, side="right") - 1, last)
    B = np.zeros((x.shape[0], knots.shape[0] - 1))
    B[np.arange(x.shape[0]), cell] = 1.0
    for k in range(2, low + 1):  # order k from order k - 1
        nxt = np.zeros((x.shape[0], knots.shape[0] - k))
        for i in range(knots.shape[0] - k):
            left_width, right_width = knots[i + k - 1] - knots[i], knots[i + k] - knots[i + 1]
            if left_width > 0:
                nxt[:, i] += (x - knots[i]) / left_width * B[:, i]
            if right_width > 0:
                nxt[:, i] += (knots[i + k] - x) / right_width * B[:, i + 1]
        B = nxt
    for k in range(low + 1, order + 1):  # each derivative raises the order by one
        nxt = np.zeros((x.shape[0], knots.shape[0] - k))
        for i in range(knots.shape[0] - k):
            left_width, right_width = knots[i + k - 1] - knots[i], knots[i + k] - knots[i + 1]
            if left_width > 0:
                nxt[:, i] += (k - 1) / left_width * B[:, i]
            if right_width > 0:
                nxt[:, i] -= (k - 1) / right_width * B[:, i + 1]
        B = nxt
    return B[:, :count]


def quantile7(x: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """R's ``quantile(x, p, type = 7)``, written as R computes it (so the knots agree to the last bit)."""
    n = x.shape[0]
    index = 1 + (n - 1) * probabilities
    lo, hi = np.floor(index).astype(np.int64), np.ceil(index).astype(np.int64)
    ordered = np.sort(x)
    low, high = ordered[lo - 1], ordered[hi - 1]
    h = index - lo
    return np.where((index > lo) & (high != low), (1 - h) * low + h * high, low)
