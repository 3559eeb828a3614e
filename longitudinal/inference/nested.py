"""Likelihood-ratio tests between nested candidates, and AICc.

Two candidates are *nested* when the smaller is a special case of the larger: same response, fitted on
the same rows, every fixed-effect column of the smaller among the larger's, and every random-effects
block of the smaller contained in one block of the larger on the same grouping factor, so that the
smaller's covariance matrices are the larger's with some variances and covariances set to zero:
``(1 | g)`` ⊂ ``(x || g)`` ⊂ ``(x | g)``, and ``(1 | g)`` ⊂ ``(1 | g) + (1 | g:h)``.

For each nested pair the LR statistic is 2(ℓ₁ − ℓ₀) from the *ML* fits (REML likelihoods of different
fixed effects are not comparable; with equal fixed effects ML is still valid, so ML is used throughout)
and df = Δk, the difference in lme4's parameter counts (nlme's and mmrm's for covariance structures). The reference distribution is χ²(df), except
when the larger model adds exactly one random-effect term: the null then puts that variance on the
boundary of its space (zero), and the statistic follows the 50:50 mixture of χ²(df − 1) and χ²(df)
(Self & Liang 1987; Stram & Lee 1994), χ²(0) being a point mass at zero. Adding two or more random-effect
terms gives a mixture with more components; there the plain χ²(df) p-value is reported as what it is, an
upper bound (conservative).

Candidates with a residual covariance structure (``us(visit | id)``, ``(1 | id) + ar1(t | id)``; see
:mod:`longitudinal.model.formula`) nest by these rules, besides the fixed effects'. Each reaches the smaller
model at an interior point of the larger's parameters, so what a structure adds is tested by χ² (sp_exp
against independence excepted, below); random-effect terms the larger adds keep the boundary rules above.

- Two structures compare only on the same visit and subject columns. The smaller's structure must be a
  special case of the larger's: the same, or below it in the order cs ⊂ csh, cs ⊂ toep, ar1 ⊂ ar1h,
  ar1 ⊂ toep, ar1 ⊂ ad, csh ⊂ toeph, ar1h ⊂ toeph, toep ⊂ toeph, ad ⊂ adh, ar1h ⊂ adh, toeph ⊂ us,
  adh ⊂ us (and what follows from these: cs ⊂ us, ...), with the random-effects blocks nesting as above.
- Independent residuals (no structure) are a special case of every structure (zero correlations, equal
  variances), so ``(1 | id)`` ⊂ ``(1 | id) + ar1(t | id)``; sp_exp, whose correlations are functions of the
  actual times, is otherwise comparable only with itself and with us. Independence is sp_exp's limit as its
  range goes to zero, on the boundary of its space: that test's χ² p-value is reported as conservative.
- A structure without random effects can contain a smaller model's random effects. Compound symmetry is a
  random intercept: ``(1 | id)`` alone ⊂ csh, toep, toeph, us over the same subject (``(1 | id)`` and
  ``cs(t | id)`` are the same model, with the same k: no test); a random intercept with AR(1) residuals is
  Toeplitz, so ``(1 | id) + ar1(t | id)`` ⊂ toep, toeph, us. And us is every covariance of a subject's
  visits: it contains any model whose random effects are grouped by its subject and read only its visit
  column (``(t | id)``, ``(poly(t, 2) | id)``), whatever that model's structure over the same columns.

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
from longitudinal.model.formula import (
    CovarianceTerm,
    ModelFormula,
    deparse,
    expand_terms,
    expression_columns,
    parse_expression,
    parse_formula,
)
from longitudinal.records import Fit, LikelihoodRatioTest, Reference

#: A model term as the set of the factors it multiplies (the empty set is the intercept).
TermKey = frozenset[str]

#: A larger model whose ML log-likelihood falls below the smaller's by more than this stopped short of
#: its optimum (lme4-style fits agree with lme4 to about 1e-5 log-likelihood units).
LOGLIK_SLACK = 1e-3

#: Each covariance structure's immediate special cases (mmrm's structures), reached at an interior point of the
#: larger's parameters: cs is csh with equal variances, ar1 is toep with lag correlations ρ, ρ², ...
_SPECIAL_CASES = {
    "csh": ("cs",), "toep": ("cs", "ar1"), "ar1h": ("ar1",), "ad": ("ar1",),
    "toeph": ("csh", "ar1h", "toep"), "adh": ("ad", "ar1h"), "us": ("toeph", "adh"),
}
#: Structures that contain a random intercept next to the residuals of the key (None: independent ones):
#: τ²J + σ²I is compound symmetry, τ²J + σ²·AR(1) is Toeplitz.
_WITH_RANDOM_INTERCEPT = {None: "cs", "ar1": "toep"}
#: Structures with a variance per visit: independent residuals are their special case with equal variances.
_HETEROGENEOUS = ("csh", "ar1h", "toeph", "adh", "us")


def _larger_structures(name: str) -> frozenset[str]:
    """``name`` and every structure that has it as a special case (the transitive closure of the order)."""
    found, frontier = {name}, [name]
    while frontier:
        smaller = frontier.pop()
        for larger, cases in _SPECIAL_CASES.items():
            if smaller in cases and larger not in found:
                found.add(larger)
                frontier.append(larger)
    return frozenset(found)


@dataclass(frozen=True)
class ModelStructure:
    """What nesting compares: the response, the fixed-effect columns and the random-effects blocks.

    ``fixed`` holds lme4 column names (``"week:armtreatment"``) when taken from a fit, or term keys
    rendered as text (``"arm:week"``) when taken from the formula alone; compare like with like.
    ``random`` holds one ``(group, terms)`` pair per block, in formula order; ``covariance`` the residual
    covariance structure (None: independent residuals).
    """

    response: str
    fixed: frozenset[str]
    random: tuple[tuple[str, frozenset[TermKey]], ...]
    covariance: CovarianceTerm | None = None

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
    return ModelStructure(response=formula.response, fixed=fixed, random=random, covariance=formula.covariance)


def is_nested(smaller: ModelStructure, larger: ModelStructure) -> bool:
    """True when ``smaller`` is a special case of ``larger`` (or the same model).

    Fixed effects: a subset. Random effects: each block of ``smaller`` lies inside one block of ``larger``
    on the same grouping factor, so zeroing variances and covariances of ``larger`` gives ``smaller``; and
    ``smaller``'s covariance structure is a special case of ``larger``'s. Or ``larger`` has no random
    effects and its structure contains ``smaller``'s random effects and residuals (the module's rules).
    """
    if smaller.response != larger.response or not smaller.fixed <= larger.fixed:
        return False
    return _covariance_nesting(smaller, larger) is not None


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
    # Independent residuals are sp_exp's limit as its range goes to zero: a boundary, and not a regular one.
    range_at_zero = small.covariance is None and big.covariance is not None and big.covariance.structure == "sp_exp"
    reference: Reference = ("chi2" if not boundary and not range_at_zero
                            else "mixture" if len(boundary) == 1 and not range_at_zero else "chi2-conservative")
    notes: list[str] = []
    if reference == "mixture":
        notes.append(f"the variance of {boundary[0]} is zero under the smaller model, on the boundary of its "
                     "range: p from the 50:50 mixture of χ² distributions (Self & Liang 1987; Stram & Lee 1994)")
    elif range_at_zero:
        assert big.covariance is not None
        variances = f" and the variance{'s' if len(boundary) > 1 else ''} of {', '.join(boundary)}" if boundary else ""
        notes.append(f"the range of {big.covariance.text}{variances} {'are' if boundary else 'is'} zero under the "
                     "smaller model (independent residuals are sp_exp's limit as its range goes to zero), on the "
                     f"boundary of its space, where χ² theory does not hold: the χ²({df}) p-value is reported as "
                     "conservative, as for variances on their boundary (Pinheiro & Bates 2000, §2.4.1)")
    elif boundary:
        notes.append(f"{len(boundary)} variances ({', '.join(boundary)}) are zero under the smaller model: the "
                     f"null distribution is a mixture with more components; the χ²({df}) p-value is an upper "
                     "bound")
    residuals = _residual_note(smaller.name, larger.name, small, big)
    if residuals:
        notes.append(residuals)
    if added_fixed:
        notes.append("the fixed effects differ: the test uses the ML fits, as it must (REML likelihoods of "
                     "different fixed effects are not comparable)")
    return LikelihoodRatioTest(
        smaller=smaller.name, larger=larger.name, df=df, statistic=math.nan, p_value=math.nan,
        reference=reference, added_fixed=added_fixed, boundary_terms=boundary,
        added_covariances=max(0, big.n_covariances - small.n_covariances), notes=tuple(notes),
        residual_change=_residual_change(small, big),
    )


def _residual_change(small: ModelStructure, big: ModelStructure) -> str:
    """"ar1h → us", "independent → ar1": the residual structures of a pair when they differ, else ""."""
    def name(structure: ModelStructure) -> str:
        return structure.covariance.structure if structure.covariance is not None else "independent"

    return "" if name(small) == name(big) else f"{name(small)} → {name(big)}"


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


def _covariance_nesting(smaller: ModelStructure, larger: ModelStructure) -> str | None:
    """How ``smaller``'s random effects and residuals are a special case of ``larger``'s, None when they are not.

    ``"blocks"``: its blocks lie in ``larger``'s and its structure is a special case of ``larger``'s (no
    structure being one of every structure's). ``"absorbed"``: ``larger`` has no random effects and its
    structure contains ``smaller``'s random effects and residuals (a random intercept is compound symmetry;
    us contains every covariance of the visits, sp_exp's too).
    """
    small, big = smaller.covariance, larger.covariance
    if small is not None and big is not None and (small.visit, small.subject) != (big.visit, big.subject):
        return None
    blocks_nest = all(
        any(group == big_group and terms <= big_terms for big_group, big_terms in larger.random)
        for group, terms in smaller.random
    )
    if blocks_nest and (small is None or (big is not None and big.structure in _larger_structures(small.structure))):
        return "blocks"
    if big is None or larger.random:
        return None
    intercept = _WITH_RANDOM_INTERCEPT.get(small.structure if small is not None else None)
    if intercept is not None and smaller.random == ((big.subject, frozenset({frozenset()})),) \
            and big.structure in _larger_structures(intercept):
        return "absorbed"
    if big.structure == "us" and all(
        group == big.subject and all(_reads_only(key, big.visit) for key in terms) for group, terms in smaller.random
    ):
        return "absorbed"
    return None


def _reads_only(key: TermKey, column: str) -> bool:
    """Whether the random-effect term ``key`` (its variables as R deparses them) reads no column but ``column``."""
    return all(expression_columns(parse_expression(variable)) <= {column} for variable in key)


def _residual_note(smaller: str, larger: str, small: ModelStructure, big: ModelStructure) -> str:
    """What a test says about the residual covariance when the two candidates' structures differ ("" if not)."""
    if small.covariance == big.covariance or big.covariance is None:
        return ""
    term = big.covariance.text
    if _covariance_nesting(small, big) == "absorbed":
        what = ("random effects and residuals" if small.random or small.covariance is None
                else f"residual covariance {small.covariance.text}")
        return (f"{larger!r} has no random effects, but {term} contains the covariance that {smaller!r}'s {what} "
                "give a subject's visits, at an interior point of its parameters (χ²)")
    if small.covariance is None:
        if big.covariance.structure == "sp_exp":
            return ""
        equal = " and equal variances" if big.covariance.structure in _HETEROGENEOUS else ""
        return (f"{larger!r} adds the residual covariance {term}; independent residuals are its special case with "
                f"zero correlations{equal}, an interior point of its parameters (χ²)")
    return (f"the residual covariance {small.covariance.text} of {smaller!r} is a special case of {term} in "
            f"{larger!r}, at an interior point of its parameters (χ²)")


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
