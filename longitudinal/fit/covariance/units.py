"""Fit on standardized columns, report in the data's units: exact, because the model is invariant to each change.

An outcome in micrometres or a covariate in epoch seconds leaves the model unchanged, but not the arithmetic:
the optimizer's tolerances are absolute, and cross-products of a time of 1.7e9 with its small variation lose
their digits. So ``fit_covariance`` works on

- y' = (y − a) / s, a the mean when X has an intercept column (else 0), s the root mean square of y − a:
  β, the random effects and every standard deviation scale by s (β's intercept gains a); ML
  ℓ(y) = ℓ(y') − n log s, REML ℓ(y) = ℓ(y') − (n − p) log s (see below for X);
- X' = X A: each continuous column (not all 0/1) centred when X has an intercept and scaled by its root
  mean square: β = A β', vcov(β) = A vcov(β') Aᵀ; the ML likelihood is unchanged, the REML one is not
  invariant to reparametrizing X: its −½ log|XᵀV⁻¹X| term gains log|det A|;
- Z' = Z B likewise (centred only when the bar has an intercept and another column; its G is unstructured,
  so the shift is a change of the intercept's meaning only): b = B b', G = B G' Bᵀ.

The visit coordinates (times for sp_exp) are left as they are: only their differences enter, and the range
φ is estimated on log scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from longitudinal.fit.covariance.grouping import PatternGroups, SubjectBatch, VisitPattern
from longitudinal.fit.scaling import FixedEffectsMap, lower_factor_of


@dataclass(frozen=True, eq=False)
class Units(FixedEffectsMap):
    """How a fit's data were standardized (module docstring): y' = (y − ``y_shift``) / ``y_scale``,
    X' = X ``fixed_map`` (the intercept at column ``intercept``, None without one), Z' = Z ``random_map``."""

    random_map: np.ndarray

    def loglik(self, loglik: float, n_obs: int, *, reml: bool) -> float:
        """ℓ in the data's units from the standardized fit's ℓ'."""
        if not reml:
            return loglik - n_obs * math.log(self.y_scale)
        p = self.fixed_map.shape[0]
        _, log_det = np.linalg.slogdet(self.fixed_map)
        return loglik - (n_obs - p) * math.log(self.y_scale) + float(log_det)

    def factor(self, factor: np.ndarray, *, relative: bool) -> np.ndarray:
        """Λ (lower triangular, diagonal ≥ 0) with ΛΛᵀ = c² B Λ'Λ'ᵀ Bᵀ, c = 1 for a Λ relative to σ (which
        scales by s itself), else s. B Λ' = L Q (an LQ step) gives L; its columns' signs are flipped where
        its diagonal is negative. Exact for a singular Λ' too."""
        return lower_factor_of((1.0 if relative else self.y_scale) * (self.random_map @ factor))

    def modes(self, modes: np.ndarray) -> np.ndarray:
        """b = s B b', subjects in rows: (n_subjects, q)."""
        out: np.ndarray = self.y_scale * (modes @ self.random_map.T)
        return out

    def random_covariances(self, covariances: np.ndarray) -> np.ndarray:
        """s² B C Bᵀ for each q × q matrix C of a stack (…, q, q)."""
        B = self.random_map
        out: np.ndarray = self.y_scale ** 2 * (B @ covariances @ B.T)
        return out


def standardize(groups: PatternGroups) -> tuple[PatternGroups, Units]:
    """``groups`` on standardized columns (module docstring; the same subjects, rows and blocks) and the
    ``Units`` that carry estimates back. Two passes over the rows."""
    blocks = groups.blocks()
    X = np.concatenate([block.X.reshape(-1, block.X.shape[-1]) for block in blocks])
    Z = np.concatenate([np.tile(block.Z, (block.n_subjects, 1)) if isinstance(block, VisitPattern) else
                        block.Z.reshape(block.rows.size, block.Z.shape[-1]) for block in blocks])
    y = np.concatenate([block.y.ravel() for block in blocks])
    fixed_map, intercept = column_map(X, centre=True)
    random_map, _ = column_map(Z, centre=groups.n_random > 1)
    y_shift = float(np.mean(y)) if intercept is not None else 0.0
    y_scale = math.sqrt(float(np.mean((y - y_shift) ** 2)))
    if not (math.isfinite(y_scale) and y_scale > 0.0):
        y_shift, y_scale = 0.0, 1.0
    units = Units(y_shift=y_shift, y_scale=y_scale, intercept=intercept, fixed_map=fixed_map, random_map=random_map)
    return dataclasses.replace(
        groups, patterns=tuple(_scaled(pt, units) for pt in groups.patterns),
        batches=tuple(_scaled(bt, units) for bt in groups.batches),
    ), units


Block = TypeVar("Block", VisitPattern, SubjectBatch)


def _scaled(block: Block, units: Units) -> Block:
    return dataclasses.replace(
        block, y=(block.y - units.y_shift) / units.y_scale, X=block.X @ units.fixed_map, Z=block.Z @ units.random_map,
    )


def column_map(M: np.ndarray, *, centre: bool) -> tuple[np.ndarray, int | None]:
    """T with M T standardized, and the intercept's column (all ones; None without one): each continuous
    column (values not all in {0, 1}, with spread) minus its mean (when ``centre`` and M has an intercept)
    over its root mean square; the intercept and 0/1 columns as they are."""
    n, k = M.shape
    if n == 0 or k == 0:
        return np.eye(k), None
    columns = np.array(M.T, order="C")  # numpy's reductions down a tall row-major matrix's columns are slow
    low, high = columns.min(axis=1), columns.max(axis=1)
    ones = (low == 1.0) & (high == 1.0)
    intercept = int(np.argmax(ones)) if ones.any() else None
    binary = np.isin(low, (0.0, 1.0)) & np.isin(high, (0.0, 1.0))
    for j in np.flatnonzero(binary & ~ones & (high > low)):  # only 0/1 columns need a look at every value
        binary[j] = bool(np.all((columns[j] == 0.0) | (columns[j] == 1.0)))
    continuous = np.flatnonzero(~binary)
    shift, scale = np.zeros(k), np.ones(k)
    if continuous.size:
        work = columns[continuous]
        mean = work.mean(axis=1) if centre and intercept is not None else np.zeros(continuous.size)
        work -= mean[:, None]
        spread = np.sqrt(np.einsum("ij,ij->i", work, work) / n)
        usable = np.isfinite(spread) & (spread > 0.0)
        shift[continuous] = np.where(usable, mean, 0.0)
        scale[continuous] = np.where(usable, spread, 1.0)
    T = np.diag(1.0 / scale)
    if intercept is not None:
        T[intercept] -= shift / scale
        T[intercept, intercept] = 1.0
    return T, intercept
