"""What a fitted structured-covariance model says about each subject and row, at θ̂ and β̂.

- conditional modes b̂_i = G Z_iᵀ V_i⁻¹ r_i, r_i = y_i − X_i β̂ (the BLUPs, nlme's ``ranef``), and their
  conditional covariance G − G Z_iᵀ V_i⁻¹ Z_i G (lme4's ``condVar``: given y, at θ̂, β̂ taken as known);
- fitted values X_i β̂ + Z_i b̂_i (nlme's ``fitted`` at the subject level; X_i β̂ without random effects) and
  the residuals y − fitted;
- normalized residuals L_i⁻¹ (y_i − fitted_i), L_i L_iᵀ = Σ_i the residual structure alone (σ² R_i, or
  Σ_i(θ) for the heterogeneous ones; no Z G Zᵀ): nlme's ``residuals(fit, type = "normalized")``, which
  divides the conditional residuals by their SD and premultiplies by the inverse Cholesky factor of the
  correlation matrix, i.e. the same L_i⁻¹. Independent N(0, 1) under the model: what a variogram reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longitudinal.fit.covariance.grouping import PatternGroups, VisitPattern
from longitudinal.fit.covariance.likelihood import CovarianceModel
from longitudinal.fit.covariance.structures import CovarianceStructure


@dataclass(frozen=True, eq=False)
class Predictions:
    """Per row, in the input's row order: ``fitted``, ``residuals``, ``normalized``; per subject, in the
    order of ``PatternGroups.subjects``: ``modes`` (n_subjects, q) and ``cond_covariance`` (n_subjects, q, q)."""

    fitted: np.ndarray
    residuals: np.ndarray
    normalized: np.ndarray
    modes: np.ndarray
    cond_covariance: np.ndarray


def predict(structure: CovarianceStructure, groups: PatternGroups, theta: np.ndarray, beta: np.ndarray) -> Predictions:
    """The module's quantities at the full θ (structure θ, then Λ's entries: ``likelihood``'s layout) and β."""
    q = groups.n_random
    model = CovarianceModel.at(structure, theta, q)
    G = model.scale * model.G
    modes = np.zeros((groups.n_subjects, q))
    cond = np.zeros((groups.n_subjects, q, q))
    fitted, normalized = [], []
    for block in groups.blocks():
        residual_part = model.scale * model.residual(block)
        Z = block.Z
        ZG = Z @ G
        V = residual_part + ZG @ np.swapaxes(Z, -1, -2)
        r = block.y - block.X @ beta  # (g, s)
        if isinstance(block, VisitPattern):  # one V: its inverse once, then (g, s) products
            W = np.linalg.inv(V)
            b = (r @ W) @ ZG  # b_i = G Zᵀ V⁻¹ r_i, as rows
            cond[block.subjects] = G - ZG.T @ W @ ZG
            mean = block.X @ beta + b @ Z.T
            whiten = np.linalg.inv(np.linalg.cholesky(residual_part))
            normalized.append((block.y - mean) @ whiten.T)
        else:
            b = np.einsum("gs,gsq->gq", np.linalg.solve(V, r[..., None])[..., 0], ZG)
            cond[block.subjects] = G - np.swapaxes(ZG, 1, 2) @ np.linalg.solve(V, ZG)
            mean = block.X @ beta + np.einsum("gsq,gq->gs", Z, b)
            whiten = np.linalg.inv(np.linalg.cholesky(residual_part))
            normalized.append(np.einsum("gst,gt->gs", whiten, block.y - mean))
        modes[block.subjects] = b
        fitted.append(mean)
    fitted_rows = groups.scatter(fitted)
    observed = groups.scatter([block.y for block in groups.blocks()])
    return Predictions(
        fitted=fitted_rows, residuals=observed - fitted_rows, normalized=groups.scatter(normalized), modes=modes,
        cond_covariance=cond,
    )
