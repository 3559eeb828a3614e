"""What the estimation (``fit.glmm.fitting``) asks of an engine's deviance, and what it reads at the optimum.

An engine (``OneFactorLaplace``, ``SparseLaplace``) holds the data and its PIRLS warm start and offers glmer's
two objectives: ``joint_deviance(θ)`` (stage 1, nAGQ = 0: β and u jointly by PIRLS; ``joint_beta`` is that
β) and ``deviance(θ, β)`` (stage 2: the Laplace or AGQ deviance, u by PIRLS). ``fixed_start`` pins PIRLS's
start for a block of evaluations (the finite differences), ``unscaled_vcov`` gives lme4's RX-based vcov(β)
(σ = 1) and ``random_part`` the modes, their conditional SDs and η at the optimum.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from longitudinal.records import FactorRanef


@dataclass(frozen=True, eq=False)
class RandomPart:
    """What an engine reads off its modes at the optimum: per grouping factor the modes and conditional SDs
    (``ranef``; ``modes``/``cond_sd`` those of the primary factor), η per row of the design, and lme4's
    RX-based unscaled vcov(β) (None where not positive definite)."""

    ranef: tuple[FactorRanef, ...]
    modes: np.ndarray
    cond_sd: np.ndarray
    eta: np.ndarray
    unscaled_vcov: np.ndarray | None


class LaplaceProblem(Protocol):
    """An engine's deviance: stage 1 over θ, stage 2 over (θ, β), with warm-started PIRLS inside."""

    n_theta: int
    n_fixed: int

    def joint_deviance(self, theta: np.ndarray) -> float: ...

    @property
    def joint_beta(self) -> np.ndarray: ...

    def deviance(self, params: np.ndarray) -> float: ...

    def fixed_start(self, params: np.ndarray) -> contextlib.AbstractContextManager[None]: ...

    def unscaled_vcov(self, params: np.ndarray) -> np.ndarray | None: ...

    def random_part(self, params: np.ndarray, ranef_map: np.ndarray) -> RandomPart: ...
