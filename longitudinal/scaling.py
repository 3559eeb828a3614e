"""Fit on centred and scaled columns, report in the data's units: exact wherever the model is invariant.

A linear mixed model's likelihood does not care whether time is in days or in epoch seconds, but
floating-point arithmetic does: with Days × 1e8 or ``Days * 86400 + 1.7e9`` the cross-products lose every
significant digit of the slope's variation when subtracted (lme4 stops with "Downdated VtV is not positive
definite"), and an outcome such as ``Reaction + 1e6`` makes the penalized residual sum of squares a small
difference of large numbers. So the engine fits a *standardized* design and transforms the estimates back.
Each transformation is one the model is exactly invariant to:

- the outcome, y' = (y − a) / s: the shift only when the intercept is a column of X (it absorbs a), the
  scale always. β, σ, the random effects and their covariances scale by s (β's intercept gains a);
  logLik(y) = logLik(y') − n log s, so the ML deviance gains 2n log s and the REML criterion 2(n − p) log s.
- the fixed-effect columns, X' = X A with A invertible (a continuous column centred — only when X has the
  intercept — and scaled): β = A β', vcov(β) = A vcov(β') Aᵀ. The ML likelihood is unchanged; the REML
  criterion is not invariant to reparametrizing X: its log|RX'RX| term is smaller by 2 log|det A|.
- a random-effects bar, Z_b' = Z_b B_b: b = B_b b', Σ_b = B_b Σ_b' B_bᵀ, and Λ_b = B_b Λ_b' brought back to
  lme4's lower-triangular θ with a non-negative diagonal by an LQ step (Λ_b Λ_bᵀ is unchanged, so is
  log|M|). Centring a column is a change of the bar's intercept, so it needs the intercept in the same bar
  with an unstructured covariance (a correlated bar of two or more terms); any other bar — one term of
  ``(x || g)``, a bar without intercept — is scaled only, which keeps a diagonal Λ diagonal.

Columns whose values are all 0 or 1 (treatment contrasts, indicators) are left as they are, as lme4's
``checkScaleX`` leaves them. The standardized design costs one pass over the rows (O(n (p + q))), once per
fit; the back-transformation touches only the estimates (and the n fitted values and residuals once).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from longitudinal.design import BlockDesign, Design

#: lme4's ``checkScaleX`` tolerance: a continuous column's SD, or the ratio of two such SDs, beyond 1000.
SCALE_TOL = 1e3
SCALE_NOTE = (
    "Some predictor variables are on very different scales: consider rescaling (lme4's warning; "
    "this fit is computed on rescaled columns, so its estimates are exact)"
)


@dataclass(frozen=True, eq=False)
class Standardization:
    """How a design was standardized, and the maps that carry estimates back to the data's units.

    ``y_shift`` and ``y_scale``: y' = (y − y_shift) / y_scale. ``intercept``: the position of the intercept
    column in X (None without one). ``fixed_map`` is A (p × p) with X' = X A, so β = A β'. ``ranef_maps``
    holds B_b (q_b × q_b) per bar in formula order, Z_b' = Z_b B_b, so b = B_b b'.
    """

    y_shift: float
    y_scale: float
    intercept: int | None
    fixed_map: np.ndarray
    ranef_maps: tuple[np.ndarray, ...]

    @property
    def ranef_map(self) -> np.ndarray:
        """B over all bars (q × q, block-diagonal in formula order)."""
        q = sum(B.shape[0] for B in self.ranef_maps)
        out = np.zeros((q, q))
        at = 0
        for B in self.ranef_maps:
            out[at:at + B.shape[0], at:at + B.shape[0]] = B
            at += B.shape[0]
        return out

    def beta(self, beta: np.ndarray) -> np.ndarray:
        """β in the data's units from β' of the standardized fit."""
        unscaled = self.y_scale * np.asarray(beta, dtype=float)
        if self.intercept is not None:
            unscaled[self.intercept] += self.y_shift
        out: np.ndarray = self.fixed_map @ unscaled
        return out

    def vcov(self, vcov: np.ndarray) -> np.ndarray:
        """vcov(β) = s² A vcov(β') Aᵀ."""
        A = self.fixed_map
        out: np.ndarray = self.y_scale ** 2 * (A @ vcov @ A.T)
        return 0.5 * (out + out.T)

    def covariance(self, bar: int, cov: np.ndarray) -> np.ndarray:
        """Σ_b = s² B_b Σ_b' B_bᵀ for bar ``bar``."""
        B = self.ranef_maps[bar]
        out: np.ndarray = self.y_scale ** 2 * (B @ cov @ B.T)
        return 0.5 * (out + out.T)

    def relative_factor(self, bar: int, lam: np.ndarray) -> np.ndarray:
        """Λ_b in lme4's form (lower triangular, diagonal ≥ 0) with Λ_b Λ_bᵀ = B_b Λ_b' Λ_b'ᵀ B_bᵀ.

        B_b Λ_b' = L Q (an LQ step: the QR of its transpose) gives L; the signs of L's columns are flipped
        where its diagonal is negative (Q absorbs them). Valid for a singular Λ_b' too: L L' is still exact.
        """
        mapped = self.ranef_maps[bar] @ lam
        if mapped.shape[0] == 1:
            return np.abs(mapped)
        R = np.linalg.qr(mapped.T, mode="r")
        L: np.ndarray = np.tril(np.asarray(R).T)
        signs = np.where(np.diagonal(L) < 0.0, -1.0, 1.0)
        return L * signs[None, :]

    def deviance_offset(self, n_obs: int, reml: bool) -> float:
        """What the standardized fit's ML deviance or REML criterion lacks: 2n log s (ML), or
        2(n − p) log s − 2 log|det A| (REML, whose log|RX'RX| term depends on X's parametrization)."""
        log_scale = math.log(self.y_scale)
        if not reml:
            return 2.0 * n_obs * log_scale
        p = self.fixed_map.shape[0]
        _, log_det = np.linalg.slogdet(self.fixed_map)
        return 2.0 * (n_obs - p) * log_scale - 2.0 * float(log_det)


def standardize(design: Design) -> tuple[Design, Standardization]:
    """The design on standardized columns (same rows, names and factors) and how to map estimates back.

    The outcome is centred when X has an intercept (else only scaled) and scaled by its SD (else its root
    mean square); continuous fixed-effect columns likewise; random-effect columns as the bar allows (see
    the module's docstring). A column with no spread (or not finite) is left as it is.
    """
    X = design.X
    intercept = _intercept_column(X)
    shift, scale = _column_shifts_and_scales(X, centre=intercept is not None, keep=intercept)
    X_std = np.subtract(X, shift)
    X_std /= scale
    fixed_map = _column_map(shift, scale, intercept)

    y = design.y
    y_shift = float(np.mean(y)) if intercept is not None else 0.0
    y_centred = y - y_shift
    y_scale = math.sqrt(float(y_centred @ y_centred) / max(y.shape[0], 1))
    if not (math.isfinite(y_scale) and y_scale > 0.0):
        y_shift, y_scale, y_centred = 0.0, 1.0, y
    y_std = y_centred / y_scale

    blocks: list[BlockDesign] = []
    maps: list[np.ndarray] = []
    for block in design.blocks:
        Z = block.Z
        bar_intercept = _intercept_column(Z)
        centre = bar_intercept is not None and Z.shape[1] > 1
        z_shift, z_scale = _column_shifts_and_scales(Z, centre=centre, keep=bar_intercept)
        Z_std = np.subtract(Z, z_shift)
        Z_std /= z_scale
        blocks.append(dataclasses.replace(block, Z=Z_std))
        maps.append(_column_map(z_shift, z_scale, bar_intercept))
    standardized = dataclasses.replace(design, y=y_std, X=X_std, blocks=tuple(blocks))
    return standardized, Standardization(
        y_shift=y_shift, y_scale=y_scale, intercept=intercept, fixed_map=fixed_map, ranef_maps=tuple(maps),
    )


def scale_warning(X: np.ndarray) -> str | None:
    """lme4's ``checkScaleX`` on the fixed-effects matrix: ``SCALE_NOTE`` when a continuous column (values
    not all in {0, 1}) has an SD (n − 1 denominator) above 1000 or below 1/1000, or two such SDs differ by
    a factor above 1000; else None."""
    sds = [float(np.std(X[:, j], ddof=1)) if X.shape[0] > 1 else 0.0
           for j in range(X.shape[1]) if not _binary(X[:, j])]
    if not sds:
        return None
    with np.errstate(divide="ignore"):
        logs = np.log(np.asarray(sds))
    limit = math.log(SCALE_TOL)
    spread = float(np.max(logs) - np.min(logs)) if np.all(np.isfinite(logs)) else math.inf
    if np.any(~np.isfinite(logs)) or np.any(np.abs(logs) > limit) or spread > limit:
        return SCALE_NOTE
    return None


# ------------------------------------------------------------------------------------------ internals


def _intercept_column(M: np.ndarray) -> int | None:
    """The first column whose every value is 1, or None."""
    for j in range(M.shape[1]):
        column = M[:, j]
        if column.shape[0] and column[0] == 1.0 and column.min() == 1.0 and column.max() == 1.0:
            return j
    return None


def _binary(column: np.ndarray) -> bool:
    """All values in {0, 1} (lme4's ``all(z %in% c(0, 1))``)."""
    return bool(np.all((column == 0.0) | (column == 1.0)))


def _column_shifts_and_scales(M: np.ndarray, *, centre: bool, keep: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the shift (its mean when ``centre``, else 0) and scale (SD when centred, else root mean
    square); 0 and 1 for the column ``keep`` (the intercept), for 0/1 columns and for columns without spread."""
    k = M.shape[1]
    shift, scale = np.zeros(k), np.ones(k)
    for j in range(k):
        column = M[:, j]
        if j == keep or _binary(column):
            continue
        mean = float(np.mean(column)) if centre else 0.0
        spread = math.sqrt(float(np.mean(np.square(column - mean))))
        if math.isfinite(spread) and spread > 0.0:
            shift[j], scale[j] = mean, spread
    return shift, scale


def _column_map(shift: np.ndarray, scale: np.ndarray, intercept: int | None) -> np.ndarray:
    """The matrix T with M' = M T for M'_j = (M_j − shift_j) / scale_j (the shift taken from the intercept)."""
    T = np.diag(1.0 / scale)
    if intercept is not None:
        T[intercept] -= shift / scale
        T[intercept, intercept] = 1.0
    return T
