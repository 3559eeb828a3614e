"""Likelihood-ratio tests between nested candidates, and AICc.

Two candidates are *nested* when the smaller is a special case of the larger: same response, fitted on
the same rows, every fixed-effect column of the smaller among the larger's, and every random-effects
block of the smaller contained in one block of the larger on the same grouping factor, so that the
smaller's covariance matrices are the larger's with some variances and covariances set to zero:
``(1 | g)`` ⊂ ``(x || g)`` ⊂ ``(x | g)``, and ``(1 | g)`` ⊂ ``(1 | g) + (1 | g:h)``.

For each nested pair the LR statistic is 2(ℓ₁ − ℓ₀) from the *ML* fits (REML likelihoods of different
fixed effects are not comparable; with equal fixed effects ML is still valid, so ML is used throughout)
and df = Δk, the difference in lme4's parameter counts. The reference distribution is χ²(df), except
when the larger model adds exactly one random-effect term: the null then puts that variance on the
boundary of its space (zero), and the statistic follows the 50:50 mixture of χ²(df − 1) and χ²(df)
(Self & Liang 1987; Stram & Lee 1994), χ²(0) being a point mass at zero. Adding two or more random-effect
terms gives a mixture with more components; there the plain χ²(df) p-value is reported as what it is, an
upper bound (conservative).

The select stage computes the tests and AICc (:func:`longitudinal.inference.criteria.select_model`) into the
:class:`~longitudinal.records.Selection` record, which the report reads; the test record,
:class:`~longitudinal.records.LikelihoodRatioTest`, lives with the other stage contracts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from scipy.stats import chi2

from longitudinal.errors import FitError
from longitudinal.model.formula import ModelFormula, deparse, expand_terms, parse_formula
from longitudinal.records import Fit, LikelihoodRatioTest, Reference

#: A model term as the set of the factors it multiplies (the empty set is the intercept).
TermKey = frozenset[str]

#: A larger model whose ML log-likelihood falls below the smaller's by more than this stopped short of
#: its optimum (lme4-style fits agree with lme4 to about 1e-5 log-likelihood units).
LOGLIK_SLACK = 1e-3


@dataclass(frozen=True)
class ModelStructure:
    """What nesting compares: the response, the fixed-effect columns and the random-effects blocks.

    ``fixed`` holds lme4 column names (``"week:armtreatment"``) when taken from a fit, or term keys
    rendered as text (``"arm:week"``) when taken from the formula alone; compare like with like.
    ``random`` holds one ``(group, terms)`` pair per block, in formula order.
    """

    response: str
    fixed: frozenset[str]
    random: tuple[tuple[str, frozenset[TermKey]], ...]

    @property
    def random_terms(self) -> frozenset[tuple[str, TermKey]]:
        """Every (grouping factor, term) with a variance of its own."""
        return frozenset((group, term) for group, terms in self.random for term in terms)

    @property
    def n_covariances(self) -> int:
        """Random-effect covariance parameters: q(q − 1)/2 per block of q terms."""
        return sum(len(terms) * (len(terms) - 1) // 2 for _, terms in self.random)


# ------------------------------------------------------------------------------------------ structure


def describe_structure(formula: ModelFormula, fixed_columns: Iterable[str] | None = None) -> ModelStructure:
    """The structure of ``formula``; fixed effects from ``fixed_columns`` (lme4 names) when given.

    Without ``fixed_columns`` the fixed part is expanded into R's terms (``week * arm`` into the
    intercept, ``week``, ``arm`` and ``arm:week``), which is exact for nesting: the column space of a set
    of terms contains that of any subset. Random-effect terms are compared the same way, so
    ``(1 + week | g)`` and ``(week | g)`` are the same block.
    """
    fixed = (frozenset(fixed_columns) if fixed_columns is not None
             else frozenset(_term_label(key) for key in _expand_terms(formula.fixed)))
    random = tuple(
        (block.group, frozenset(key for term in block.terms for key in _block_term_keys(term)))
        for block in formula.blocks
    )
    return ModelStructure(response=formula.response, fixed=fixed, random=random)


def is_nested(smaller: ModelStructure, larger: ModelStructure) -> bool:
    """True when ``smaller`` is a special case of ``larger`` (or the same model).

    Fixed effects: a subset. Random effects: each block of ``smaller`` lies inside one block of ``larger``
    on the same grouping factor, so zeroing variances and covariances of ``larger`` gives ``smaller``.
    """
    if smaller.response != larger.response or not smaller.fixed <= larger.fixed:
        return False
    return all(
        any(group == big_group and terms <= big_terms for big_group, big_terms in larger.random)
        for group, terms in smaller.random
    )


def added_random_terms(smaller: ModelStructure, larger: ModelStructure) -> tuple[str, ...]:
    """The random-effect terms whose variance ``larger`` adds to ``smaller``, sorted by group then term.

    Each is written ``"term | group"`` as in lme4's bars: ``"week | patient_id"``, ``"(Intercept) | dog:side"``.
    """
    added = sorted((group, _term_label(term)) for group, term in larger.random_terms - smaller.random_terms)
    return tuple(f"{term} | {group}" for group, term in added)


# ----------------------------------------------------------------------------------------------- tests


def lrt_p_value(statistic: float, df: int, reference: Reference = "chi2") -> float:
    """P(T ≥ statistic) under χ²(df), or the 50:50 mixture of χ²(df − 1) and χ²(df) for ``"mixture"``.

    χ²(0) is a point mass at zero. A statistic at or below zero (the larger model gains nothing) gives
    p = 1: every draw of T is ≥ 0. NaN in, NaN out.
    """
    if df < 1:
        raise ValueError(f"a likelihood-ratio test needs df ≥ 1, got df = {df}")
    if math.isnan(statistic):
        return math.nan
    if statistic <= 0:
        return 1.0
    upper = float(chi2.sf(statistic, df))
    if reference != "mixture":
        return upper
    lower = float(chi2.sf(statistic, df - 1)) if df > 1 else 0.0
    return 0.5 * lower + 0.5 * upper


def compare_pair(smaller: Fit, larger: Fit) -> LikelihoodRatioTest:
    """The likelihood-ratio test of ``smaller`` against ``larger``, two usable ML fits on the same rows.

    A fit that did not pass lme4's convergence checks is still tested (its likelihood is a valid one, as
    lme4 keeps such a fit) and the test's notes say so. Raises :class:`FitError` when ``smaller`` is not
    nested in ``larger`` or adds no parameter.
    """
    test = _pair(smaller, larger)
    statistic = 2.0 * (larger.loglik - smaller.loglik)
    notes = list(test.notes)
    for fit in (smaller, larger):
        if not fit.converged:
            warning = fit.message.split("; ")[0] if fit.message else "no detail"
            notes.append(f"{fit.name!r} did not pass lme4's convergence checks ({warning}): its log-likelihood "
                         "may be short of its optimum")
    p_value = lrt_p_value(max(statistic, 0.0), test.df, test.reference)
    if statistic < -2.0 * LOGLIK_SLACK:
        p_value = math.nan
        notes.append(f"the larger model's log-likelihood is {-statistic / 2:.3g} below the smaller's, which "
                     "cannot happen at its optimum: its fit stopped short, so no p-value is given")
    return dataclasses.replace(test, statistic=statistic, p_value=p_value, notes=tuple(notes))


def compare_nested(fits: Sequence[Fit]) -> tuple[LikelihoodRatioTest, ...]:
    """A likelihood-ratio test for every structurally nested pair of candidates, in candidate order, smaller
    first.

    Nesting is read from the formulas (``Fit.formula``; fixed-effect columns are the fits' lme4 names when
    both fits have them, else the formulas' terms), not from which fits succeeded: a pair where one side
    has no usable fit is still listed, with NaN statistic and p-value and a note saying why no test was
    computed (``LikelihoodRatioTest.tested`` is False). Pairs with the same number of parameters (the same
    model under two names) are skipped. Raises :class:`FitError` for REML fits or usable fits on different
    rows, which no likelihood-ratio test can compare.
    """
    reml = [f.name for f in fits if f.method != "ML"]
    if reml:
        raise FitError(f"candidates {', '.join(reml)} were fitted by REML; likelihood-ratio tests between "
                       "candidates use ML fits (refit with method ML)")
    usable = [f for f in fits if f.usable]
    if len({f.n_obs for f in usable}) > 1:
        detail = ", ".join(f"{f.name} n={f.n_obs}" for f in usable)
        raise FitError(f"candidates were fitted on different rows ({detail}); likelihood-ratio tests need "
                       "identical rows")
    tests = []
    for small in fits:
        for big in fits:
            if big.n_params <= small.n_params or not is_nested(*_structures(small, big)):
                continue
            tests.append(compare_pair(small, big) if small.usable and big.usable else _untested(small, big))
    return tuple(tests)


def _pair(smaller: Fit, larger: Fit) -> LikelihoodRatioTest:
    """What a test of ``smaller`` against ``larger`` compares, from their structures alone: df, reference
    distribution, what the larger adds and the notes on it; statistic and p-value NaN."""
    small, big = _structures(smaller, larger)
    if not is_nested(small, big) or larger.n_params <= smaller.n_params:
        raise FitError(
            f"candidate {smaller.name!r} ({smaller.formula}) is not nested in {larger.name!r} ({larger.formula}); "
            "a likelihood-ratio test compares a model with a larger one that contains it"
        )
    df = larger.n_params - smaller.n_params
    boundary = added_random_terms(small, big)
    added_fixed = tuple(sorted(big.fixed - small.fixed))
    reference: Reference = "chi2" if not boundary else ("mixture" if len(boundary) == 1 else "chi2-conservative")
    notes: list[str] = []
    if len(boundary) == 1:
        notes.append(f"the variance of {boundary[0]} is zero under the smaller model, on the boundary of its "
                     "range: p from the 50:50 mixture of χ² distributions (Self & Liang 1987; Stram & Lee 1994)")
    elif boundary:
        notes.append(f"{len(boundary)} variances ({', '.join(boundary)}) are zero under the smaller model: the "
                     f"null distribution is a mixture with more components; the χ²({df}) p-value is an upper "
                     "bound")
    if added_fixed:
        notes.append("the fixed effects differ: the test uses the ML fits, as it must (REML likelihoods of "
                     "different fixed effects are not comparable)")
    return LikelihoodRatioTest(
        smaller=smaller.name, larger=larger.name, df=df, statistic=math.nan, p_value=math.nan,
        reference=reference, added_fixed=added_fixed, boundary_terms=boundary,
        added_covariances=big.n_covariances - small.n_covariances, notes=tuple(notes),
    )


def _untested(smaller: Fit, larger: Fit) -> LikelihoodRatioTest:
    """The row of a nested pair one of whose fits is missing: no statistic, and the reason first in notes."""
    test = _pair(smaller, larger)
    missing = [f for f in (smaller, larger) if not f.usable]
    reasons = []
    for fit in missing:
        reason = fit.message.removeprefix(f"candidate {fit.name!r}: ") or "no finite log-likelihood"
        reasons.append(f"the fit of {fit.name!r} failed ({reason})")
    return dataclasses.replace(test, notes=(f"no test: {'; '.join(reasons)}", *test.notes))


def compute_aicc(fit: Fit) -> float:
    """AICc = AIC + 2k(k + 1)/(n − k − 1) (Hurvich & Tsai 1989) from the ML log-likelihood.

    k is lme4's parameter count (fixed effects + (co)variance parameters + 1) and n the rows analysed,
    the convention of BIC here (and of MuMIn's AICc for lmer fits). NaN when the fit is not usable or
    n ≤ k + 1, where the correction is undefined.
    """
    k, n = fit.n_params, fit.n_obs
    if not fit.usable or n - k - 1 <= 0:
        return math.nan
    return fit.aic + 2.0 * k * (k + 1) / (n - k - 1)


# ------------------------------------------------------------------------------------------ internals


def _structures(small: Fit, big: Fit) -> tuple[ModelStructure, ModelStructure]:
    """Both fits' structures, fixed effects compared by lme4 names when both fits have them, else by terms."""
    small_formula = parse_formula(small.formula, name=small.name)
    big_formula = parse_formula(big.formula, name=big.name)
    if small.fixed_effects and big.fixed_effects:
        return (describe_structure(small_formula, [fe.term for fe in small.fixed_effects]),
                describe_structure(big_formula, [fe.term for fe in big.fixed_effects]))
    return describe_structure(small_formula), describe_structure(big_formula)


def _expand_terms(expression: str) -> list[TermKey]:
    """R's terms of a right-hand side, each as its set of variables written as R deparses them (the
    intercept is the empty set), by the project's own formula grammar."""
    terms = expand_terms(expression)
    keys = [frozenset(deparse(variable) for variable in term.variables) for term in terms.terms]
    return ([frozenset()] if terms.intercept else []) + keys


def _block_term_keys(term: str) -> Collection[TermKey]:
    if term.strip() == "1":
        return (frozenset(),)
    return [key for key in _expand_terms(f"0 + {term}") if key]


def _term_label(key: TermKey) -> str:
    if not key:
        return "(Intercept)"
    return ":".join(sorted(key))
