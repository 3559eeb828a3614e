"""How much of the outcome's variance a fitted mixed model explains: the adjusted ICC and R² marginal and
conditional of Nakagawa, Johnson & Schielzeth (2017), as the R package performance (0.10) computes them with
``icc()`` and ``r2_nakagawa()`` (through insight 0.19's ``get_variance``).

Three variances, all of the fit given (the REML refit of the selected model for a Gaussian fit; the ML fit of
a GLMM, which has no REML), on the linear-predictor scale (the link scale of a GLMM):

- σ²_f, the fixed part: the sample variance (denominator n − 1, R's ``var``) of the linear predictor Xβ̂ over
  the rows the model was fitted on;
- σ²_r, the random part: per bar, the mean over rows of z_iᵀ Σ z_i (Johnson 2014), which is τ² for a random
  intercept; summed over bars;
- σ²_ε, the residual variance: σ̂² for a Gaussian fit. For a GLMM, the distribution-specific variance plus
  the variance of any observation-level random effect (a grouping factor with as many levels as rows, as
  ``(1 | obs)`` for overdispersion: insight counts it here, not in σ²_r). The distribution-specific variance
  is π²/3 for the logit link and, for the Poisson log link, the lognormal approximation log(1 + 1/λ) with
  λ = exp(β̂₀) of the null model: the same random effects and an intercept only, refitted by ML as glmer
  (Laplace, or the fit's quadrature points), as ``insight::null_model`` does.

R²_marginal = σ²_f / (σ²_f + σ²_r + σ²_ε), R²_conditional = (σ²_f + σ²_r) / (σ²_f + σ²_r + σ²_ε) and the
adjusted ICC = σ²_r / (σ²_r + σ²_ε). With random slopes σ²_r, hence the ICC, depends on where the covariates
lie (it is their average over the rows); performance reports it all the same, and so does this.

Not defined here (``explained_variance`` returns None): a failed fit, a model with a residual covariance
structure (an MMRM: no random-effect / residual split) and a Poisson GLMM whose null model fails to fit.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from longitudinal.fit.candidate import fit_candidate
from longitudinal.model.design import BlockDesign, build_design
from longitudinal.model.formula import ModelFormula, parse_formula
from longitudinal.records import ExplainedVariance, Fit

# Variance of the standard logistic distribution: the latent-scale residual variance of a logit model.
LOGIT_VARIANCE = math.pi ** 2 / 3


def explained_variance(fit: Fit, visits: pd.DataFrame) -> ExplainedVariance | None:
    """The ICC and R² of ``fit`` (performance's ``icc`` and ``r2_nakagawa``), ``visits`` being the rows it was
    fitted on (validated: no missing values), from which X and Z are rebuilt with the fit's dropped columns.

    Uses the estimates of the fit as given: for the report, the REML refit of a Gaussian model and the ML fit
    of a GLMM. A Poisson GLMM costs one more fit, its null model (see the module). None where they are not
    defined (see the module): a failed fit, a covariance-structure model, a Poisson null model that fails.
    """
    if not math.isfinite(fit.loglik) or fit.covariance is not None or not fit.fixed_effects:
        return None
    formula = parse_formula(fit.formula, name=fit.name)
    design = build_design(visits, formula, dropped=fit.dropped_terms)
    beta = np.array([fe.estimate for fe in fit.fixed_effects])
    linear_predictor = design.X @ beta
    fixed = float(np.var(linear_predictor, ddof=1)) if design.n_obs > 1 else 0.0
    covariances = block_covariances(design.blocks, fit)
    if covariances is None:
        return None
    per_block = [float(np.mean(np.einsum("ij,jk,ik->i", block.Z, cov, block.Z)))
                 for block, cov in zip(design.blocks, covariances, strict=True)]
    if fit.family == "gaussian":
        return ExplainedVariance(fixed=fixed, random=sum(per_block), residual=fit.residual_sd ** 2)
    distribution = distribution_variance(fit, visits, formula)
    if distribution is None:
        return None
    observation_level = [block.n_levels == design.n_obs for block in design.blocks]
    random = sum(v for v, per_row in zip(per_block, observation_level, strict=True) if not per_row)
    dispersion = sum(v for v, per_row in zip(per_block, observation_level, strict=True) if per_row)
    return ExplainedVariance(fixed=fixed, random=random, residual=distribution + dispersion)


def distribution_variance(fit: Fit, visits: pd.DataFrame, formula: ModelFormula) -> float | None:
    """The distribution-specific variance of a GLMM on its link scale (insight's): π²/3 for the logit link;
    log(1 + 1/λ) for the Poisson log link, λ = exp(intercept) of the null model refitted on ``visits`` (None
    when that fit fails)."""
    if fit.family == "binomial":
        return LOGIT_VARIANCE
    if fit.family != "poisson":
        raise ValueError(f"fit {fit.name!r}: no distribution-specific variance for family {fit.family!r}")
    bars = " + ".join(f"({block.spec} | {block.group})" for block in formula.blocks)
    null = fit_candidate(visits, f"{fit.name} (null model)", f"{formula.response} ~ 1 + {bars}",
                         family="poisson", nagq=fit.nagq)
    if not math.isfinite(null.loglik) or not null.fixed_effects:
        return None
    return math.log1p(math.exp(-null.fixed_effects[0].estimate))


def block_covariances(blocks: tuple[BlockDesign, ...], fit: Fit) -> list[np.ndarray] | None:
    """Σ of each bar, from the fit's SDs and correlations found by group and term (a correlation that is NaN
    because a variance is zero, or absent, counts as 0); None when the fit lacks the SD of a bar's term."""
    sds = {(vc.group, vc.term): vc.sd for vc in fit.random_effects}
    correlations = {(c.group, c.term1, c.term2): c.corr for c in fit.correlations}
    out = []
    for block in blocks:
        if any((block.group, term) not in sds for term in block.terms):
            return None
        sd = np.array([sds[block.group, term] for term in block.terms])
        corr = np.eye(len(block.terms))
        for j, first in enumerate(block.terms):
            for i in range(j + 1, len(block.terms)):
                value = correlations.get((block.group, first, block.terms[i]), math.nan)
                corr[i, j] = corr[j, i] = value if math.isfinite(value) else 0.0
        out.append(corr * np.outer(sd, sd))
    return out
