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

from longitudinal.model.design import BlockDesign, Design, fixed_view

#: lme4's ``checkScaleX`` tolerance: a continuous column's SD, or the ratio of two such SDs, beyond 1000.
SCALE_TOL = 1e3
SCALE_NOTE = (
    "Some predictor variables are on very different scales: consider rescaling (lme4's warning; "
    "this fit is computed on rescaled columns, so its estimates are exact)"
)


@dataclass(frozen=True, eq=False)
class FixedEffectsMap:
    """How the outcome and X were standardized, y' = (y − ``y_shift``) / ``y_scale`` and X' = X ``fixed_map``
    (A, p × p; the intercept at column ``intercept``, None without one), and the fixed effects carried back:
    shared by the lme4-style engine (``Standardization``) and the structured-covariance one."""

    y_shift: float
    y_scale: float
    intercept: int | None
    fixed_map: np.ndarray

    def beta(self, beta: np.ndarray) -> np.ndarray:
        """β = A (s β' + a e_intercept) in the data's units from β' of the standardized fit."""
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


def lower_factor_of(mapped: np.ndarray) -> np.ndarray:
    """L lower triangular with a diagonal ≥ 0 and L Lᵀ = M Mᵀ for M = ``mapped`` (q × q): M = L Q by an LQ
    step (the QR of Mᵀ), the signs of L's columns flipped where its diagonal is negative (Q absorbs them).
    Valid for a singular M too: L Lᵀ is still exact."""
    if mapped.shape[0] <= 1:
        return np.abs(mapped)
    L: np.ndarray = np.tril(np.asarray(np.linalg.qr(mapped.T, mode="r")).T)
    return L * np.where(np.diagonal(L) < 0.0, -1.0, 1.0)[None, :]


@dataclass(frozen=True, eq=False)
class Standardization(FixedEffectsMap):
    """How a design was standardized, and the maps that carry estimates back to the data's units.

    ``y_shift`` and ``y_scale``: y' = (y − y_shift) / y_scale. ``intercept``: the position of the intercept
    column in X (None without one). ``fixed_map`` is A (p × p) with X' = X A, so β = A β'. ``ranef_maps``
    holds B_b (q_b × q_b) per bar in formula order, Z_b' = Z_b B_b, so b = B_b b'. ``scale_note`` is
    ``SCALE_NOTE`` where lme4's ``checkScaleX`` would warn about X, else None. ``origin_notes`` name the
    random slopes without an intercept in their bar (``(x || g)``, ``(0 + x | g)``) whose variable lies far
    from zero: such a model depends on where x = 0 (see :func:`_origin_notes`).
    """

    ranef_maps: tuple[np.ndarray, ...]
    scale_note: str | None = None
    origin_notes: tuple[str, ...] = ()

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
        return lower_factor_of(self.ranef_maps[bar] @ lam)

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
    the module's docstring). A column with no spread (or not finite) is left as it is. A few contiguous
    passes over each matrix (no column-by-column strided reads: they cost more than the fit's own sums). A
    bar whose Z is a view of X (``BlockDesign.fixed_columns``) and is standardized as X is (its intercept
    beside its continuous columns, or no column to centre) gets the same view of the standardized X: no copy.
    """
    fixed = _standardize_columns(design.X, centre_with_intercept=True)
    y = design.y
    y_shift = float(np.mean(y)) if fixed.intercept is not None else 0.0
    y_centred = y - y_shift
    y_scale = math.sqrt(float(y_centred @ y_centred) / max(y.shape[0], 1))
    if not (math.isfinite(y_scale) and y_scale > 0.0):
        y_shift, y_scale, y_centred = 0.0, 1.0, y.copy()
    y_centred /= y_scale

    blocks: list[BlockDesign] = []
    maps: list[np.ndarray] = []
    for block in design.blocks:
        shared = _shared_columns(fixed, fixed_view(design, block))
        bar = shared or _standardize_columns(block.Z, centre_with_intercept=block.Z.shape[1] > 1)
        blocks.append(dataclasses.replace(block, Z=bar.values, fixed_columns=block.fixed_columns if shared else None))
        maps.append(bar.map)
    standardized = dataclasses.replace(design, y=y_centred, X=fixed.values, blocks=tuple(blocks))
    return standardized, Standardization(
        y_shift=y_shift, y_scale=y_scale, intercept=fixed.intercept, fixed_map=fixed.map,
        ranef_maps=tuple(maps), scale_note=_scale_note(fixed), origin_notes=_origin_notes(design),
    )


#: A slope variable whose mean is more than this many SDs from zero is "far from zero" (epoch times, years AD).
ORIGIN_TOL = 10.0


def _origin_notes(design: Design) -> tuple[str, ...]:
    """A note per random slope in a bar without an intercept whose variable lies far from zero.

    ``(x || g)`` is ``(1 | g) + (0 + x | g)``: unlike a correlated ``(x | g)``, it is not invariant to a
    shift of x, because its intercept variance is the variance at x = 0. With x in epoch seconds or calendar
    years, x = 0 is far outside the data, and the model (and its fit, and the selection) differs from the
    same model with x counted from the study's start. The fit is right for the model as written; the note
    says why it may not be the model meant.
    """
    notes = []
    for block in design.blocks:
        if "(Intercept)" in block.terms:
            continue
        for j, term in enumerate(block.terms):
            column = block.Z[:, j]
            mean, sd = float(np.mean(column)), float(np.std(column))
            if sd > 0.0 and abs(mean) > ORIGIN_TOL * sd:
                notes.append(
                    f"the random slope of {term!r} for {block.group} has no intercept in its bar, so the model "
                    f"depends on where {term} = 0, and {term} lies far from zero here (mean {mean:.6g}, SD "
                    f"{sd:.3g}): count {term} from the study's start, or use a correlated ({term} | "
                    f"{block.group}) term, which does not depend on the origin"
                )
    return tuple(notes)


# ------------------------------------------------------------------------------------------ internals


@dataclass(frozen=True, eq=False)
class _Columns:
    """A matrix M standardized: ``values`` = M T with T = ``map``; per column of M its ``binary`` flag
    (all values in {0, 1}), ``ones`` flag (all values 1), the ``shift`` and ``scale`` applied
    (values = (M − shift) / scale) and its SD with lme4's n − 1 denominator (NaN where not computed)."""

    values: np.ndarray
    map: np.ndarray
    intercept: int | None
    binary: np.ndarray
    ones: np.ndarray
    shift: np.ndarray
    scale: np.ndarray
    sd: np.ndarray


def _standardize_columns(M: np.ndarray, *, centre_with_intercept: bool) -> _Columns:
    """Centre (when M has an intercept column and ``centre_with_intercept``) and scale the continuous columns
    of M: by the mean and SD, else by the root mean square. The intercept, 0/1 columns and columns without
    spread are left as they are.

    The statistics are taken column by column on a contiguous copy of one column (numpy's reductions down the
    columns of a tall row-major matrix with few columns are several times slower); the result is one
    row-major copy of M (the engines' sparse products copy a column-major operand on every call), its
    continuous columns transformed in place, so that at most M, the result and one column are in memory at
    once (it was M and two full copies: 100 MB more at 2,000,000 rows).
    """
    n, k = M.shape
    low, high, binary = np.empty(k), np.empty(k), np.zeros(k, dtype=bool)
    means, raw_square, centred_square = np.zeros(k), np.zeros(k), np.zeros(k)
    column = np.empty(n)  # one contiguous copy of a column at a time, in one buffer (it is edited)
    for j in range(k):
        np.copyto(column, M[:, j])
        low[j], high[j] = column.min(), column.max()
        if low[j] in (0.0, 1.0) and high[j] in (0.0, 1.0):
            binary[j] = bool(np.all((column == 0.0) | (column == 1.0)))
        if not binary[j]:
            means[j] = float(column.mean())
            raw_square[j] = float(column @ column) / max(n, 1)
            column -= means[j]
            centred_square[j] = float(column @ column) / max(n, 1)
    ones = (low == 1.0) & (high == 1.0)
    intercept = int(np.argmax(ones)) if ones.any() else None
    centre = intercept is not None and centre_with_intercept
    shift, scale, mean_square = np.zeros(k), np.ones(k), np.full(k, np.nan)
    if binary.all():  # nothing to standardize (a random intercept's Z, indicator columns): no copy
        return _Columns(values=M, map=np.eye(k), intercept=intercept, binary=binary, ones=ones, shift=shift,
                        scale=scale, sd=np.full(k, np.nan))
    # 0/1 columns keep their values (shift 0, scale 1); so does a continuous column without spread.
    for c in np.flatnonzero(~binary):
        tried = means[c] if centre else 0.0
        mean_square[c] = centred_square[c] if centre else raw_square[c]
        spread = math.sqrt(mean_square[c])
        if math.isfinite(spread) and spread > 0.0:
            shift[c], scale[c] = tried, spread
    values = M.copy()
    for c in np.flatnonzero((shift != 0.0) | (scale != 1.0)):
        transformed = values[:, c]
        transformed -= shift[c]
        transformed /= scale[c]
    # SD (n − 1) for lme4's scale check: from the centred sums where the columns were centred.
    variance = mean_square * n / max(n - 1, 1) if centre else np.full(k, np.nan)
    return _Columns(values=values, map=_column_map(shift, scale, intercept), intercept=intercept, binary=binary,
                    ones=ones, shift=shift, scale=scale, sd=np.sqrt(variance))


def _shared_columns(fixed: _Columns, window: slice | None) -> _Columns | None:
    """The bar standardized as a view of the standardized X, when its Z is the view X[:, window]
    (``design.fixed_view``) that ``_standardize_columns`` would transform as it transformed X: its continuous
    columns centred in both (the bar has an intercept, X too) or in neither. None otherwise.

    The bar's map is built from X's shifts and scales as ``_standardize_columns`` builds it from the same
    statistics of the same columns (with shift 0 and scale 1 it is the identity, as for a bar of 0/1 columns):
    the same bits as standardizing the bar on its own."""
    if window is None:
        return None
    ones = fixed.ones[window]
    centred_bar = bool(ones.any()) and ones.shape[0] > 1
    if np.any(~fixed.binary[window]) and centred_bar != (fixed.intercept is not None):
        return None
    intercept = int(np.argmax(ones)) if ones.any() else None
    shift, scale = fixed.shift[window], fixed.scale[window]  # 0 and 1 where a column is left as it is
    return _Columns(
        values=fixed.values[:, window], map=_column_map(shift, scale, intercept), intercept=intercept,
        binary=fixed.binary[window], ones=ones, shift=shift, scale=scale, sd=fixed.sd[window],
    )


def _scale_note(X: _Columns) -> str | None:
    """lme4's ``checkScaleX`` on the fixed-effects matrix: ``SCALE_NOTE`` when a continuous column (values
    not all in {0, 1}) has an SD (n − 1 denominator) above 1000 or below 1/1000, or two such SDs differ by
    a factor above 1000; else None."""
    continuous = ~X.binary
    if not continuous.any():
        return None
    sds = X.sd[continuous]
    if np.any(np.isnan(sds)):  # not centred (no intercept): the SDs from the standardized columns
        scale = 1.0 / np.abs(np.diagonal(X.map))[continuous]
        centred = X.values[:, continuous] - X.values[:, continuous].mean(axis=0)
        sds = scale * np.sqrt(np.einsum("ij,ij->j", centred, centred) / max(X.values.shape[0] - 1, 1))
    with np.errstate(divide="ignore"):
        logs = np.log(sds)
    limit = math.log(SCALE_TOL)
    if not np.all(np.isfinite(logs)):
        return SCALE_NOTE
    return SCALE_NOTE if np.any(np.abs(logs) > limit) or float(np.ptp(logs)) > limit else None


def _column_map(shift: np.ndarray, scale: np.ndarray, intercept: int | None) -> np.ndarray:
    """The matrix T with M' = M T for M'_j = (M_j − shift_j) / scale_j (the shift taken from the intercept)."""
    T = np.diag(1.0 / scale)
    if intercept is not None:
        T[intercept] -= shift / scale
        T[intercept, intercept] = 1.0
    return T
