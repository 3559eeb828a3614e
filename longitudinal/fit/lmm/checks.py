"""lme4's checks that refuse a fit: too few groups or rows for the random effects (``lmerControl``), and
an outcome the model reproduces exactly (zero residual variance: an unbounded likelihood). Both engines
raise ``FitFailure`` from here."""

from __future__ import annotations

import math

import numpy as np

from longitudinal.fit.failure import FitFailure
from longitudinal.model.design import Design
from longitudinal.records import OptimizerAttempt


#: A residual RMS this small relative to the outcome's SD means the model reproduces the data exactly
#: (rounding noise, not variation: the likelihood would be unbounded).
EXACT_FIT_RATIO = 1e-6


def check_identifiable(design: Design) -> None:
    """lme4's ``lmerControl`` checks that stop a fit, per grouping factor and per bar: too few groups,
    rows or rows per random effect."""
    n, p = design.n_obs, design.X.shape[1]
    for group in design.groups:
        G = design.levels_of(group)
        if G < 2:
            raise FitFailure(f"grouping factor {group!r} has {G} level; random effects need at least 2 groups")
        if n <= G:
            raise FitFailure(
                f"number of observations ({n}) is not larger than the number of levels of {group!r} ({G}): "
                "its random effects and the residual variance are not identifiable; drop that random-effects term"
            )
    for block in design.blocks:
        effects = len(block.terms) * block.n_levels
        if n <= effects:
            bar = f"({' + '.join(block.terms)} | {block.group})"
            raise FitFailure(
                f"number of observations ({n}) is not larger than the number of random effects ({effects}) "
                f"for {bar}: its variance and the residual variance are not identifiable; "
                "use fewer random-effect terms"
            )
    if n <= p:
        raise FitFailure(f"number of observations ({n}) is not larger than the number of fixed effects ({p})")


def exact_fit_failure(r2_direct: float, y: np.ndarray, sigma: float, attempts: tuple[OptimizerAttempt, ...]) -> None:
    """Raise ``FitFailure`` when the model reproduces the outcome exactly (zero residual variance).

    The residuals are compared with the outcome's centred spread (its SD), not its root mean square: an
    outcome far from zero (``Reaction + 1e6``) has a large RMS without having more variation to explain.
    """
    n = y.shape[0]
    spread = float(np.std(y))
    reference = max(spread, 1e-8 * math.sqrt(float(y @ y) / n))
    if not math.isfinite(sigma) or r2_direct <= (EXACT_FIT_RATIO * reference) ** 2 * n:
        raise FitFailure(
            f"zero residual variance: the model reproduces the outcome exactly (residual SD "
            f"{math.sqrt(r2_direct / n) / reference:.3g} times the outcome's SD), so the likelihood is "
            "unbounded; the data are degenerate for this model",
            attempts,
        )
