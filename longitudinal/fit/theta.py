"""θ, the covariance parameters of the random effects, in lme4's layout, and what is read off them.

Λθ is block-diagonal over the random-effects bars of the formula, one lower-triangular block per bar; θ
lists, bar by bar, the lower triangle column by column (lme4's ``getME(m, "theta")``); diagonal elements
are bounded below by 0, the others are free. Here: the layout (``ThetaLayout``, ``layout_theta``), Λ from θ,
lme4's parameter count, the per-bar covariances σ² Λ_k Λ_k' and lme4's singularity test and message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from longitudinal.model.design import Design


#: lme4's isSingular tolerance, and the correlation beyond which a bar is singular to within rounding.
SINGULAR_TOL = 1e-4
CORRELATION_LIMIT = 0.999


@dataclass(frozen=True)
class ThetaLayout:
    """Where each θ sits in the q × q matrix Λ, and its lower bound (lme4's order and bounds)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    lower: tuple[float, ...]
    block_sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def bars(self) -> np.ndarray:
        """The bar (0-based, formula order) of each θ."""
        return np.repeat(np.arange(len(self.block_sizes)), [k * (k + 1) // 2 for k in self.block_sizes])

    @property
    def diagonal(self) -> np.ndarray:
        """Mask of the θ that are diagonal elements of Λ (variance parameters bounded at 0)."""
        mask: np.ndarray = np.asarray(self.rows) == np.asarray(self.cols)
        return mask

    def start(self) -> np.ndarray:
        """lme4's default start: 1 on the diagonal, 0 off it."""
        return self.diagonal.astype(float)

    def lambda_matrix(self, theta: np.ndarray) -> np.ndarray:
        """Λθ (q × q, block lower-triangular)."""
        q = sum(self.block_sizes)
        lam = np.zeros((q, q))
        lam[list(self.rows), list(self.cols)] = theta
        return lam


def layout_theta(block_sizes: tuple[int, ...]) -> ThetaLayout:
    """θ's positions in Λ: per bar, the lower triangle column by column (lme4's ``getME(m, "theta")``)."""
    rows: list[int] = []
    cols: list[int] = []
    lower: list[float] = []
    offset = 0
    for size in block_sizes:
        for j in range(size):
            for i in range(j, size):
                rows.append(offset + i)
                cols.append(offset + j)
                lower.append(0.0 if i == j else -math.inf)
        offset += size
    return ThetaLayout(rows=tuple(rows), cols=tuple(cols), lower=tuple(lower), block_sizes=block_sizes)


def lambda_at(block_sizes: tuple[int, ...], theta: np.ndarray) -> np.ndarray:
    """Λθ for a θ given from outside the optimizer, its length checked against the model's."""
    layout = layout_theta(block_sizes)
    theta = np.asarray(theta, dtype=float)
    if theta.shape != (layout.size,):
        raise ValueError(f"theta has shape {theta.shape}; this model has {layout.size} covariance parameters")
    return layout.lambda_matrix(theta)


def singular_bars(layout: ThetaLayout, theta: np.ndarray) -> tuple[int, ...]:
    """The bars whose covariance is on the boundary (lme4's ``isSingular``, tol 1e-4: a diagonal θ below
    1e-4; here also a correlation beyond ±0.999, whose Cholesky factor is singular to within rounding)."""
    lam = layout.lambda_matrix(theta)
    out = []
    at = 0
    for k, size in enumerate(layout.block_sizes):
        block = lam[at:at + size, at:at + size]
        at += size
        if np.any(np.diagonal(block) < SINGULAR_TOL):
            out.append(k)
            continue
        if size > 1:
            cov = block @ block.T
            sd = np.sqrt(np.diagonal(cov))
            corr = cov / np.outer(sd, sd)
            if np.any(np.abs(corr[~np.eye(size, dtype=bool)]) > CORRELATION_LIMIT):
                out.append(k)
    return tuple(out)


def block_covariances(layout: ThetaLayout, theta: np.ndarray, sigma2: float) -> tuple[list[np.ndarray], bool]:
    """Each bar's random-effect covariance σ² Λ_k Λ_k', and whether the fit is singular (``singular_bars``)."""
    lam = layout.lambda_matrix(theta)
    covariances: list[np.ndarray] = []
    at = 0
    for size in layout.block_sizes:
        block = lam[at:at + size, at:at + size]
        covariances.append(sigma2 * block @ block.T)
        at += size
    return covariances, bool(singular_bars(layout, theta))


def singular_message(
    design: Design, layout: ThetaLayout, theta: np.ndarray, covariances: tuple[np.ndarray, ...], sigma: float,
    term_scales: tuple[np.ndarray, ...],
) -> str:
    """lme4's singular-fit message naming what is on the boundary, in the units of ``design``.

    ``theta`` says which bars are singular (judged where the fit was computed); ``covariances`` (the
    design's units) say how: a term whose variance is zero (its SD below 1e-4 residual SDs once its column
    is divided by ``term_scales``, the spread the standardization used), else a pair of terms whose
    correlation is ±1 (beyond ±0.999), else the bar's covariance matrix as a whole.
    """
    parts = []
    for k in singular_bars(layout, theta):
        block, cov = design.blocks[k], covariances[k]
        sd = np.sqrt(np.clip(np.diagonal(cov), 0.0, None))
        zero = [i for i in range(len(block.terms)) if sd[i] * term_scales[k][i] < SINGULAR_TOL * sigma]
        found = [f"the variance of {block.terms[i]!r} for {block.group} is zero" for i in zero]
        rest = [i for i in range(len(block.terms)) if i not in zero]
        for a, j in enumerate(rest):
            for i in rest[a + 1:]:
                corr = cov[i, j] / (sd[i] * sd[j])
                if abs(corr) > CORRELATION_LIMIT:
                    found.append(f"the correlation of {block.terms[j]!r} and {block.terms[i]!r} for {block.group} "
                                 f"is {'-1' if corr < 0 else '1'}")
        if not found:
            found.append(f"the covariance matrix of {', '.join(map(repr, block.terms))} for {block.group} is singular")
        parts.extend(found)
    return "boundary (singular) fit: " + " and ".join(parts)


def count_parameters(design: Design) -> int:
    """lme4's parameter count: fixed effects + covariance parameters θ + 1 residual variance."""
    theta = layout_theta(tuple(len(block.terms) for block in design.blocks))
    return int(design.X.shape[1]) + theta.size + 1
