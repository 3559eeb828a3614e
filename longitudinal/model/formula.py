"""Model formulas in lme4 notation, parsed by the project's own grammar into a typed record.

``score ~ week * arm + age + (week | patient_id)`` splits into the response, the fixed-effects part
(R's formula language: ``a * b``, ``a:b``, ``a / b``, ``a %in% b``, ``(a + b)^2``, ``0 +`` / ``- 1``) and the
random-effects bars. Each bar is one block with its own unstructured covariance matrix, as in lme4;
``(x || g)`` expands, as lme4 does, to ``(1 | g) + (0 + x | g)``: one block per term, hence uncorrelated.

Nested and crossed random effects follow lme4 too. A grouping factor may be an interaction ``a:b`` (one
level per combination of a level of ``a`` and a level of ``b``, as when side labels repeat across dogs), and
``(t | a/b)`` expands, as lme4's ``findbars`` does, to ``(t | a) + (t | a:b)`` (``a/b/c`` to ``a``, ``a:b``,
``a:b:c``). Bars on different factors are crossed (``(t | patient) + (1 | rater)``). ``||`` expands first,
then ``/``: ``(t || a/b)`` gives ``(1 | a) + (1 | a:b) + (0 + t | a) + (0 + t | a:b)``.

The grammar is small and never evaluated as code: column names, numbers, ``+ - * / ^ :`` and ``%in%``,
unary minus, parentheses, and calls of the functions in ``TERM_FUNCTIONS`` and ``FUNCTIONS`` (``pi`` is the
constant). Inside a function call the operators are arithmetic (``I(x^2)``, ``I((t - 5)/7)``); at the
top level they are R's formula operators. Parsing is linear in the formula's length; formulas longer than
``MAX_LENGTH`` characters or nested deeper than ``MAX_DEPTH`` are refused. Terms and variables are named
as R deparses them (``poly(age, 2)``, ``I(2 * pi * t)``), which is how lme4 names coefficients.

A candidate may also name one residual covariance structure, written as the R package mmrm writes it:
``y ~ visit * arm + us(visit | id)`` (an MMRM: no random effects, an unstructured covariance of each
subject's visits) or, next to random effects, ``y ~ t * arm + (1 | id) + ar1(t | id)`` (nlme's
``lme(random = ~ 1 | id, correlation = corAR1())``). The structures are ``COVARIANCE_STRUCTURES``; inside
the call come the visit (or time) column and the subject column. Next to random effects the bars must be
grouped by the structure's subject, and only the structures without compound symmetry in them
(``STRUCTURES_WITH_RANDOM_EFFECTS``) are allowed: compound symmetry is a random intercept, and ``us``
contains any random-effects covariance, so those with bars are not identified. A candidate needs random
effects, a covariance structure, or both. That the structure's columns are the study's time and subject
columns is checked against the config by ``check_covariance_terms``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Collection, Iterator, Mapping, Sequence

from longitudinal.errors import ConfigError, FormulaError
from longitudinal.records import SOURCE_COLUMNS

#: Elementwise functions a term may call, with the numpy function each stands for.
FUNCTIONS = {
    "log": "log", "exp": "exp", "sqrt": "sqrt", "abs": "abs", "log10": "log10", "log2": "log2",
    "sin": "sin", "cos": "cos",
}
#: Functions that make a variable of their own: ``I(expr)``, ``factor(x)``, ``poly(x, d)``, ``ns(x, df)``,
#: ``bs(x, df)``, ``scale(x)`` (the last four with data-dependent parameters, see
#: ``longitudinal.model.transforms``).
TERM_FUNCTIONS = ("I", "factor", "poly", "ns", "bs", "scale")
#: Names that are constants, never columns.
CONSTANTS = {"pi": math.pi}
#: Residual covariance structures, named as mmrm names them: unstructured, compound symmetry, AR(1), Toeplitz,
#: ante-dependence (each also heterogeneous: a variance per visit) and the continuous-time exponential.
COVARIANCE_STRUCTURES = ("us", "cs", "csh", "ar1", "ar1h", "toep", "toeph", "ad", "adh", "sp_exp")
#: The structures that are identified next to random effects: none contains compound symmetry.
STRUCTURES_WITH_RANDOM_EFFECTS = ("ar1", "ar1h", "ad", "adh", "sp_exp")
#: Why each other structure is not identified next to random effects.
_NOT_IDENTIFIED = {
    "us": "the unstructured covariance already contains any random-effects covariance of a subject's visits",
    "cs": "compound symmetry already is a random intercept",
    "csh": "compound symmetry with a variance per visit already holds a random intercept (its common correlation)",
    "toep": "a Toeplitz covariance contains compound symmetry, which already is a random intercept",
    "toeph": "a Toeplitz covariance contains compound symmetry, which already is a random intercept",
}
MAX_LENGTH = 10_000
MAX_DEPTH = 100
_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class RandomBlock:
    """One random-effects bar: its terms (``"1"`` is the intercept) and its grouping factor.

    ``group`` is a column name or an interaction of columns written as lme4 writes it (``"dog:side"``).
    """

    terms: tuple[str, ...]
    group: str

    @property
    def intercept(self) -> bool:
        return "1" in self.terms

    @property
    def factors(self) -> tuple[str, ...]:
        """The data columns whose combination is the grouping factor (``("dog", "side")`` for ``dog:side``)."""
        return tuple(self.group.split(":"))

    @property
    def spec(self) -> str:
        """The bar's left-hand side as a right-hand side of its own (``"0 + t"``), for ``expand_terms``."""
        return " + ".join(("1" if self.intercept else "0",) + tuple(t for t in self.terms if t != "1"))


@dataclass(frozen=True)
class CovarianceTerm:
    """A residual covariance structure over each subject's visits: ``us(visit | id)``.

    ``structure`` is one of ``COVARIANCE_STRUCTURES``; ``visit`` the column whose distinct values, sorted,
    are the visits (``sp_exp`` reads them as times); ``subject`` the subject column, or columns joined by
    ``:`` as lme4 writes an interaction (``dog:side``) for a subject identified by several.
    """

    structure: str
    visit: str
    subject: str

    @property
    def text(self) -> str:
        """The term as the report and errors show it: ``"us(visit | id)"``."""
        return f"{self.structure}({self.visit} | {self.subject})"

    @property
    def columns(self) -> frozenset[str]:
        return frozenset((self.visit, *self.subject.split(":")))


@dataclass(frozen=True)
class ModelFormula:
    """A parsed candidate formula.

    ``fixed`` is the right-hand side of the fixed effects in R's formula language (e.g. ``"week * arm"``,
    ``"1"`` when there are none); ``blocks`` the random-effect bars after ``||`` expansion (none in an
    MMRM); ``covariance`` the residual covariance structure, None for independent residuals; ``columns``
    every data column the formula reads (response, covariates, grouping factors and the structure's columns).
    """

    text: str
    response: str
    fixed: str
    blocks: tuple[RandomBlock, ...]
    columns: frozenset[str]
    covariance: CovarianceTerm | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(block.group for block in self.blocks))

    @property
    def fixed_terms(self) -> Terms:
        """R's terms of the fixed part (intercept, terms by degree), as ``model.matrix`` reads them."""
        return expand_terms(self.fixed, where=_where(self.text, "formula"))


def parse_formula(text: str, *, name: str = "formula") -> ModelFormula:
    """Parse ``text`` (lme4 notation); errors name the candidate ``name`` and what is wrong."""
    where = _where(text, name)
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"{where}: the formula is {len(text):,} characters long; the limit is {MAX_LENGTH:,}")
    tokens = _tokenize(text, where)
    _check_parentheses(tokens, where)
    tildes = [i for i, token in enumerate(tokens) if token.text == "~"]
    if len(tildes) != 1:
        raise FormulaError(f"{where}: a model formula has one '~' between the outcome and the terms")
    left, right = tokens[:tildes[0]], tokens[tildes[0] + 1:]
    if len(left) != 1 or left[0].kind != "name":
        raise FormulaError(f"{where}: the left of '~' must be the outcome column, got {_source(text, left)!r}")
    response = left[0].text
    _check_name(response, where)
    fixed_terms: list[str] = []
    bars: list[tuple[str, list[RandomBlock]]] = []
    covariance: CovarianceTerm | None = None
    columns = {response}
    for sign, term in _summands(right, where):
        shown = _source(text, term)
        bar = _bar_split(term)
        if bar is not None:
            if sign == "-":
                raise FormulaError(f"{where}: a random-effects term cannot be subtracted: {shown!r}")
            found, used = _parse_bar(text, term, bar, where)
            bars.append((shown, found))
            columns |= used
            continue
        if _is_covariance_call(term):
            if sign == "-":
                raise FormulaError(f"{where}: a covariance structure cannot be subtracted: '- {shown}'; "
                                   f"write '+ {shown}', or leave it out for independent residuals")
            structure = _parse_covariance(text, term, where)
            if covariance is not None:
                raise FormulaError(f"{where}: two covariance structures, {covariance.text!r} and "
                                   f"{structure.text!r}; a candidate has at most one (make each its own "
                                   "candidate to compare them)")
            covariance = structure
            columns |= structure.columns
            continue
        expr = _Parser(term, text, where).parse()
        fixed_terms.append(shown if sign == "+" else f"- {shown}")
        columns |= expression_columns(expr)
    if not bars and covariance is None:
        raise FormulaError(
            f"{where}: no random-effects term; a mixed model needs one such as '(1 | subject)' or a covariance "
            "structure such as 'us(visit | subject)'"
        )
    if covariance is not None and bars:
        _check_random_effects_next_to(covariance, bars, where)
    fixed = " + ".join(fixed_terms).replace("+ -", "-") if fixed_terms else "1"
    expand_terms(fixed, where=where)  # refuses what R's terms() would, naming the candidate
    return ModelFormula(text=text, response=response, fixed=fixed,
                        blocks=tuple(block for _, found in bars for block in found),
                        columns=frozenset(columns), covariance=covariance)


def _where(text: str, name: str) -> str:
    shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text):,} characters)"
    return f"candidate {name!r} ({shown!r})"


def _source(text: str, tokens: Sequence[_Token]) -> str:
    return text[tokens[0].start:tokens[-1].end] if tokens else ""


def _summands(tokens: Sequence[_Token], where: str) -> Iterator[tuple[str, list[_Token]]]:
    """Split at top-level binary ``+``/``-`` (not inside parentheses), each summand with its sign.

    A sign is binary after a name, a number or ``)``; otherwise it is the sign of the next summand (or,
    after ``^``, ``*`` ..., part of the term, as in ``x^-1``).
    """
    depth, sign = 0, "+"
    current: list[_Token] = []
    previous: _Token | None = None
    for token in tokens:
        if depth == 0 and token.kind == "op" and token.text in "+-" and token.text:
            binary = previous is not None and (previous.kind in ("name", "number", ")"))
            if binary or not current:
                if current:
                    yield sign, current
                    current, sign = [], "+"
                if token.text == "-":
                    sign = "-" if sign == "+" else "+"
                previous = token
                continue
        depth += token.kind == "("
        depth -= token.kind == ")"
        current.append(token)
        previous = token
    if current:
        yield sign, current
    elif tokens:
        raise FormulaError(f"{where}: the formula ends with an operator")
    else:
        raise FormulaError(f"{where}: no terms after '~'")


def _bar_split(term: Sequence[_Token]) -> tuple[int, str] | None:
    """Position and kind (``|`` or ``||``) of the bar when ``term`` is one parenthesized ``(lhs | group)``."""
    if len(term) < 2 or term[0].kind != "(" or term[-1].kind != ")":
        return None
    depth, bar = 0, None
    for i, token in enumerate(term):
        depth += token.kind == "("
        depth -= token.kind == ")"
        if depth == 0 and i < len(term) - 1:
            return None
        if depth == 1 and token.kind == "op" and token.text in ("|", "||") and bar is None:
            bar = (i, token.text)
    return bar


def _parse_bar(text: str, term: Sequence[_Token], bar: tuple[int, str], where: str) -> tuple[list[RandomBlock], set[str]]:
    position, kind = bar
    lhs, group_tokens = term[1:position], term[position + 1:-1]
    group = _source(text, group_tokens)
    groups = _nested_groups(group, where)
    intercept = True
    terms: list[str] = []
    columns: set[str] = set()
    for sign, summand in (_summands(lhs, where) if lhs else iter(())):
        shown = _source(text, summand)
        if shown in ("0", "1"):
            intercept = shown == "1" and sign == "+"
            continue
        if sign == "-":
            raise FormulaError(f"{where}: only the intercept can be removed in a random-effects term, got '- {shown}'")
        columns |= expression_columns(_Parser(summand, text, where).parse())
        if shown not in terms:
            terms.append(shown)
    inner = _source(text, term[1:-1])
    ordered = (("1",) if intercept else ()) + tuple(terms)
    if not ordered or not lhs:
        raise FormulaError(f"{where}: the random-effects term '({inner})' has no terms")
    expand_terms(RandomBlock(ordered, "g").spec, where=where)
    columns |= {column for name in groups for column in name.split(":")}
    if kind == "||":
        return [RandomBlock(terms=(term,), group=group) for term in ordered for group in groups], columns
    return [RandomBlock(terms=ordered, group=group) for group in groups], columns


def _is_covariance_call(term: Sequence[_Token]) -> bool:
    """Whether ``term`` is one call ``name(...)`` that is meant as a covariance structure: ``name`` is a
    structure, or the call holds a ``|`` at its top level (``ar2(t | id)``, a misspelt structure)."""
    if len(term) < 3 or term[0].kind != "name" or term[1].kind != "(" or term[-1].kind != ")":
        return False
    depth, bar = 0, False
    for i in range(1, len(term)):
        token = term[i]
        depth += token.kind == "("
        depth -= token.kind == ")"
        if depth == 0 and i < len(term) - 1:
            return False  # the call ends before the term does: 'f(x) * z'
        bar = bar or (depth == 1 and token.kind == "op" and token.text in ("|", "||"))
    return bar or term[0].text in COVARIANCE_STRUCTURES


def _parse_covariance(text: str, term: Sequence[_Token], where: str) -> CovarianceTerm:
    """``name(<visit column> | <subject column>)``, the subject possibly columns joined by ``:``."""
    name, shown = term[0].text, _source(text, term)
    if name not in COVARIANCE_STRUCTURES:
        raise FormulaError(f"{where}: {shown!r} is not a covariance structure; the structures are "
                           f"{', '.join(COVARIANCE_STRUCTURES)}, written as in 'ar1(visit | subject)'")
    usage = f"write it as {name}(<visit column> | <subject column>), as in '{name}(visit | subject)'"
    inner = term[2:-1]
    bars = [i for i, token in enumerate(inner) if token.kind == "op" and token.text in ("|", "||")]
    if len(bars) != 1 or inner[bars[0]].text != "|":
        problem = ("no '|' between the visits and the subject" if not bars else
                   "'||' has no meaning here, a structure has one '|'" if len(bars) == 1 else "more than one '|'")
        raise FormulaError(f"{where}: in {shown!r}, {problem}; {usage}")
    lhs, rhs = inner[:bars[0]], inner[bars[0] + 1:]
    if len(lhs) != 1 or lhs[0].kind != "name":
        got = _source(text, lhs)
        hint = ""
        if len(lhs) > 2 and lhs[0].kind == "name" and lhs[1].kind == "(" and lhs[-1].kind == ")":
            hint = (f" (the structure reads the column's distinct values, sorted, as the visits: no "
                    f"{lhs[0].text}() is needed)")
        raise FormulaError(f"{where}: in {shown!r}, the left of '|' must be one column, the visits or times, "
                           f"got {got!r}{hint}; {usage}")
    subject_parts = [token.text for token in rhs[::2]]
    if not rhs or len(rhs) % 2 == 0 or any(token.kind != "name" for token in rhs[::2]) \
            or any(token.kind != "op" or token.text != ":" for token in rhs[1::2]):
        got = _source(text, rhs)
        hint = " (nesting has no meaning here: the structure is within one subject)" if "/" in got else ""
        raise FormulaError(f"{where}: in {shown!r}, the right of '|' must be the subject column (or its columns "
                           f"joined by ':'), got {got!r}{hint}; {usage}")
    visit = lhs[0].text
    for column in (visit, *subject_parts):
        _check_name(column, where)
        if column in CONSTANTS:
            raise FormulaError(f"{where}: in {shown!r}, {column!r} is a constant, not a column; {usage}")
    if len(set(subject_parts)) < len(subject_parts) or visit in subject_parts:
        raise FormulaError(f"{where}: in {shown!r}, a column appears twice; the visits and the subject are "
                           f"different columns; {usage}")
    return CovarianceTerm(structure=name, visit=visit, subject=":".join(subject_parts))


def _check_random_effects_next_to(covariance: CovarianceTerm, bars: Sequence[tuple[str, Sequence[RandomBlock]]],
                                  where: str) -> None:
    """Random effects next to a structure: grouped by its subject, and only where the two are identified."""
    for shown, blocks in bars:
        other = next((block.group for block in blocks if block.group != covariance.subject), None)
        if other is not None:
            raise FormulaError(
                f"{where}: random effects next to a covariance structure must be grouped by its subject, "
                f"{covariance.subject!r}; {shown!r} is grouped by {other!r} (the structure {covariance.text} "
                "is the residual covariance within a subject)"
            )
    if covariance.structure not in STRUCTURES_WITH_RANDOM_EFFECTS:
        random = " + ".join(shown for shown, _ in bars)
        raise FormulaError(
            f"{where}: {covariance.text} with {random} is not identified: {_NOT_IDENTIFIED[covariance.structure]}; "
            "drop the random effects (an MMRM), or next to them use one of "
            f"{', '.join(STRUCTURES_WITH_RANDOM_EFFECTS)}"
        )
    if sum(len(blocks) for _, blocks in bars) > 1:
        random = " + ".join(shown for shown, _ in bars)
        raise FormulaError(
            f"{where}: next to {covariance.text} the random effects must be one bar with one covariance matrix, "
            f"such as '(1 + t | {covariance.subject})'; {random} makes several (uncorrelated '||' terms or "
            "several bars), which the structured-covariance engine does not fit"
        )


def parse_candidates(candidates: Mapping[str, str]) -> dict[str, ModelFormula]:
    """Parse every candidate of a study config, in order."""
    return {name: parse_formula(text, name=name) for name, text in candidates.items()}


def check_columns(
    formulas: Mapping[str, ModelFormula], columns: Collection[str], *, reported_elsewhere: Collection[str] = (),
) -> None:
    """Refuse a candidate that reads a column the data lack, naming candidate, column and the columns there are.

    Columns in ``reported_elsewhere`` are not checked (validation reports missing role columns itself). A
    dotted name the data lack whose first part is a column (``week.values``) is refused as a formula error:
    formulas have no attribute access.
    """
    available = list(columns)
    for name, formula in formulas.items():
        missing = sorted(formula.columns - set(available) - set(reported_elsewhere))
        if missing:
            from longitudinal.data.ingest import did_you_mean

            dotted = next((m for m in missing if "." in m and m.split(".")[0] in available), None)
            if dotted is not None:
                raise FormulaError(
                    f"candidate {name!r} uses {dotted!r}, which is not a column of the data; formulas have no "
                    f"attribute access (write {dotted.split('.')[0]!r} for the column)"
                )
            raise ConfigError(
                f"candidate {name!r} uses column {missing[0]!r}, which the data lack; "
                f"columns are: {', '.join(map(str, available))}{did_you_mean(missing[0], available)}"
            )


def check_same_response(formulas: Mapping[str, ModelFormula], outcome: str) -> None:
    """Every candidate models the configured outcome: likelihoods of different responses do not compare."""
    for name, formula in formulas.items():
        if formula.response != outcome:
            raise ConfigError(
                f"candidate {name!r} models {formula.response!r}, but data.outcome is {outcome!r}; "
                "candidates compared by AIC/BIC must share the outcome"
            )


def check_family(formulas: Mapping[str, ModelFormula], *, family: str, nagq: int) -> None:
    """glmer's rules for a binomial or Poisson study (``models.family``, ``models.nagq``), candidate by candidate.

    Such a model takes random effects only: a covariance structure (``us(visit | id)``) is a Gaussian
    residual covariance, which a GLMM has no place for. Adaptive Gauss–Hermite quadrature (``nagq`` > 1)
    integrates over one random effect at a time, so glmer allows it only when the model has a single scalar
    random effect: one bar with one term, such as ``(1 | id)`` or ``(0 + week | id)``.
    """
    if family == "gaussian":
        return
    for name, formula in formulas.items():
        if formula.covariance is not None:
            raise ConfigError(
                f"candidate {name!r} uses the covariance structure {formula.covariance.text}, which is for Gaussian "
                f"outcomes, but models.family is {family!r}: a {family} model takes random effects only; remove "
                "the structure (a random intercept such as "
                f"'(1 | {formula.covariance.subject})' models the correlation within a subject)"
            )
        effects = sum(len(block.terms) for block in formula.blocks)
        if nagq > 1 and effects != 1:
            random = " + ".join(f"({block.spec} | {block.group})" for block in formula.blocks)
            raise ConfigError(
                f"models.nagq: {nagq} (adaptive Gauss–Hermite quadrature) needs a single scalar random effect in "
                f"every candidate, as glmer does, but candidate {name!r} has {effects} ({random}); set nagq: 1 "
                f"(the Laplace approximation), or keep only candidates with one random effect such as "
                f"'(1 | {formula.blocks[0].group})'"
            )


def _nested_groups(text: str, where: str) -> list[str]:
    """``a/b/c`` → ``["a", "a:b", "a:b:c"]`` (lme4's expansion of nesting); ``a:b`` → ``["a:b"]``."""
    levels = [part.strip() for part in text.split("/")]
    groups: list[str] = []
    columns: list[str] = []
    for level in levels:
        parts = [part.strip() for part in level.split(":")]
        for part in parts:
            if not _NAME.match(part) or "__" in part:
                raise FormulaError(
                    f"{where}: the grouping factor after '|' must be a column name, columns joined by ':' "
                    f"(interaction) or '/' (nesting), got {text!r}"
                )
            if part in columns:
                raise FormulaError(f"{where}: column {part!r} appears twice in the grouping factor {text!r}")
            columns.append(part)
        groups.append(":".join(columns))
    return groups


def candidate_covariates(formulas: Mapping[str, ModelFormula], roles: Collection[str]) -> list[str]:
    """Columns other than the roles (subject, time, outcome) that any candidate reads, sorted.

    Validation excludes rows with a missing value in any of them, so every candidate is fitted on the
    same rows and their likelihoods compare.
    """
    used: set[str] = set()
    for formula in formulas.values():
        used |= formula.columns
    return sorted(used - set(roles))


def check_covariance_terms(formulas: Mapping[str, ModelFormula], *, subject: str, time: str) -> None:
    """Refuse a covariance structure over other columns than the study's time and subject.

    The visits a structure relates are the study's visits within its subjects, so the term must read
    ``data.time`` and the subject (``data.subject``; several subject columns joined by ``:``, as
    ``DataConfig.subject_key`` joins them). The error names the candidate, the term and the term to write.
    """
    for name, formula in formulas.items():
        term = formula.covariance
        if term is None or (term.visit, term.subject) == (time, subject):
            continue
        wanted = CovarianceTerm(term.structure, time, subject).text
        role, column = ("time column", time) if term.visit != time else ("subject", subject)
        raise ConfigError(f"candidate {name!r} uses {term.text}, but the study's {role} is {column!r}: "
                          f"write {wanted}")


def check_candidates(formulas: Mapping[str, ModelFormula], roles: Sequence[str], columns: Sequence[str]) -> list[str]:
    """Check every candidate against the study's roles and the data's columns (in file order) and return the
    covariates they use.

    ``roles`` are ordered as ``DataConfig.roles`` orders them: the subject column(s), the time, the outcome;
    a covariance structure must be over the time and the subject (``check_covariance_terms``). Role columns
    count as present here even when the data lack them, so that a missing role is reported by validation,
    with the file and a suggestion, rather than as a formula error.
    """
    *subject, time, _outcome = roles
    check_covariance_terms(formulas, subject=":".join(subject), time=time)
    check_columns(formulas, [c for c in columns if c not in SOURCE_COLUMNS], reported_elsewhere=roles)
    return candidate_covariates(formulas, roles)


# ------------------------------------------------------------------------------------------ the grammar


@dataclass(frozen=True)
class Name:
    id: str


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Paren:
    inner: Expr


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Expr


@dataclass(frozen=True)
class Binary:
    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Expr, ...]
    keywords: tuple[tuple[str, Expr], ...] = ()


Expr = Name | Number | Paren | Unary | Binary | Call


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "number", "op", "(", ")", ",", "="
    text: str
    start: int
    end: int


_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z_.][A-Za-z0-9_.]*)"
    r"|(?P<op>\|\||%in%|[-+*/^:~|])"
    r"|(?P<punct>[(),=])"
)
#: Binding powers of R's binary operators (R's ?Syntax order); ``^`` is right-associative.
_BINARY = {"|": 2, "||": 2, "+": 10, "-": 10, "*": 20, "/": 20, "%in%": 30, ":": 40, "^": 60}
_UNARY = 50


def _tokenize(text: str, where: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise FormulaError(
                f"{where}: unexpected {text[position]!r} at position {position + 1}; a formula holds column names, "
                "numbers, + - * / ^ : %in% ( ) and the functions "
                f"{', '.join(f'{f}()' for f in (*TERM_FUNCTIONS, *FUNCTIONS))}"
            )
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token("op" if kind == "op" else kind if kind != "punct" else match.group(), match.group(),
                                 match.start(), match.end()))
        position = match.end()
    return tokens


class _Parser:
    """Pratt parser over one run of tokens; recursion is bounded by ``MAX_DEPTH``."""

    def __init__(self, tokens: Sequence[_Token], text: str, where: str) -> None:
        self.tokens, self.text, self.where = tokens, text, where
        self.position = 0
        self.depth = 0

    def parse(self) -> Expr:
        if not self.tokens:
            raise FormulaError(f"{self.where}: an empty term")
        expr = self.expression(0)
        if self.position < len(self.tokens):
            self.fail(self.tokens[self.position], "unexpected")
        return expr

    def fail(self, token: _Token | None, what: str) -> None:
        shown = f"{token.text!r} at position {token.start + 1}" if token else "the end of the formula"
        raise FormulaError(f"{self.where}: {what} {shown}")

    def peek(self) -> _Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, kind: str) -> _Token:
        token = self.peek()
        if token is None or token.kind != kind:
            self.fail(token, f"expected {kind!r}, found")
        self.position += 1
        return token  # type: ignore[return-value]  # fail() raised otherwise

    def expression(self, floor: int) -> Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormulaError(f"{self.where}: the formula is nested more than {MAX_DEPTH} levels deep")
        left = self.prefix()
        while (token := self.peek()) is not None and token.kind == "op" and token.text in _BINARY:
            power = _BINARY[token.text]
            if power <= floor and not (token.text == "^" and power == floor):
                break
            if token.text in ("|", "||"):
                self.fail(token, "a '|' belongs inside a random-effects term such as '(1 | subject)' or a "
                          "covariance structure such as 'us(visit | subject)', found")
            self.position += 1
            left = Binary(token.text, left, self.expression(power))
        self.depth -= 1
        return left

    def prefix(self) -> Expr:
        token = self.peek()
        if token is None:
            self.fail(None, "expected a term, found")
        assert token is not None
        self.position += 1
        if token.kind == "number":
            return Number(float(token.text))
        if token.kind == "name":
            if (following := self.peek()) is not None and following.kind == "(":
                return self.call(token)
            return Name(token.text)
        if token.kind == "(":
            inner = self.expression(0)
            self.take(")")
            return Paren(inner)
        if token.kind == "op" and token.text in "+-":
            return Unary(token.text, self.expression(_UNARY))
        self.fail(token, "unexpected")
        raise AssertionError  # unreachable

    def call(self, function: _Token) -> Call:
        self.take("(")
        args: list[Expr] = []
        keywords: list[tuple[str, Expr]] = []
        while (token := self.peek()) is not None and token.kind != ")":
            if args or keywords:
                self.take(",")
            following = self.tokens[self.position + 1] if self.position + 1 < len(self.tokens) else None
            if (token := self.peek()) is not None and token.kind == "name" and following is not None \
                    and following.kind == "=":
                self.position += 2
                keywords.append((token.text, self.expression(0)))
            elif keywords:
                self.fail(self.peek(), "a positional argument after a named one:")
            else:
                args.append(self.expression(0))
        self.take(")")
        return Call(function.text, tuple(args), tuple(keywords))


def parse_expression(text: str, *, where: str = "formula") -> Expr:
    """Parse one right-hand side (or one term) with R's operator precedence; never evaluates anything."""
    tokens = _tokenize(text, where)
    _check_parentheses(tokens, where)
    return _Parser(tokens, text, where).parse()


def _check_parentheses(tokens: Sequence[_Token], where: str) -> None:
    depth = 0
    for token in tokens:
        depth += token.kind == "("
        depth -= token.kind == ")"
        if depth < 0:
            break
        if depth > MAX_DEPTH:
            raise FormulaError(f"{where}: parentheses are nested more than {MAX_DEPTH} deep")
    if depth != 0:
        raise FormulaError(f"{where}: unbalanced parentheses")


# ------------------------------------------------------------------------------------- R's deparse


def deparse(expr: Expr) -> str:
    """The expression as R's ``deparse`` writes it: lme4 names coefficients with this text.

    R puts spaces around ``+ - *`` and ``%in%`` but not around ``/ ^ :``; numbers are written with up to
    15 significant digits, in scientific notation when that is shorter (``1e+05``, ``1e-04``).
    """
    if isinstance(expr, Name):
        return expr.id
    if isinstance(expr, Number):
        return format_number(expr.value)
    if isinstance(expr, Paren):
        return f"({deparse(expr.inner)})"
    if isinstance(expr, Unary):
        return f"{expr.op}{deparse(expr.operand)}"
    if isinstance(expr, Binary):
        base, chain = left_spine(expr)
        return deparse(base) + "".join(
            (f" {op} " if op in ("+", "-", "*", "%in%") else op) + deparse(right) for op, right in chain
        )
    arguments = [deparse(arg) for arg in expr.args] + [f"{key} = {deparse(value)}" for key, value in expr.keywords]
    return f"{expr.function}({', '.join(arguments)})"


def left_spine(expr: Binary) -> tuple[Expr, list[tuple[str, Expr]]]:
    """``a + b - c`` as ``a`` and ``[("+", b), ("-", c)]``: long left-associative chains without recursion.

    ``^`` (right-associative, its depth bounded by the parser) is its own one-link chain.
    """
    if expr.op == "^":
        return expr.left, [("^", expr.right)]
    chain: list[tuple[str, Expr]] = []
    node: Expr = expr
    while isinstance(node, Binary) and node.op != "^":
        chain.append((node.op, node.right))
        node = node.left
    chain.reverse()
    return node, chain


def format_number(value: float) -> str:
    """``value`` as R prints a double with 15 significant digits (deparse, ``as.character``, factor labels).

    Fixed notation unless scientific is strictly narrower, as R's formatReal with ``scipen = 0``.
    """
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    target = float(f"{value:.14e}")
    digits = next(d for d in range(1, 16) if float(f"{value:.{d - 1}e}") == target)
    scientific = f"{value:.{digits - 1}e}"
    exponent = int(scientific.split("e")[1])
    fixed = f"{value:.{max(0, digits - 1 - exponent)}f}"
    return fixed if len(fixed) <= len(scientific) else scientific


# ------------------------------------------------------------------------------------- R's terms


@dataclass(frozen=True)
class Term:
    """One term of a model: its variables, in the order R lists them (first appearance in the formula)."""

    variables: tuple[Expr, ...]

    @property
    def label(self) -> str:
        return ":".join(deparse(variable) for variable in self.variables)


@dataclass(frozen=True)
class Terms:
    """A right-hand side as R's ``terms()`` sees it: the intercept and the terms, ordered by degree."""

    intercept: bool
    terms: tuple[Term, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(term.label for term in self.terms)


def expand_terms(text: str, *, where: str | None = None) -> Terms:
    """R's ``terms()`` of a right-hand side such as ``"t * arm - 1"``: crossing, nesting and removal expanded.

    ``a * b`` = ``a + b + a:b``; ``a / b`` = ``a + a:b``; ``a %in% b`` = ``a:b``; ``(a + b)^2`` = all terms up
    to two-way; ``- x`` removes ``x``; ``0 +`` and ``- 1`` remove the intercept. Terms are ordered by degree,
    formula order within a degree, as R orders them; a term's variables follow their first appearance.
    """
    place = where or f"formula {text!r}"
    return _Expander(place).expand(parse_expression(text, where=place))


class _Expander:
    def __init__(self, where: str) -> None:
        self.where = where
        self.intercept = True
        self.order: dict[str, int] = {}
        self.variables: dict[str, Expr] = {}

    def expand(self, expr: Expr) -> Terms:
        found = self.terms(expr)
        ranked = sorted(dict.fromkeys(found), key=len)  # stable: formula order within a degree
        return Terms(
            intercept=self.intercept,
            terms=tuple(
                Term(tuple(self.variables[key] for key in sorted(term, key=self.order.__getitem__)))
                for term in ranked
            ),
        )

    def terms(self, expr: Expr) -> list[frozenset[str]]:
        if isinstance(expr, Paren):
            return self.terms(expr.inner)
        if isinstance(expr, Number):
            if expr.value in (0.0, 1.0):
                self.intercept = expr.value == 1.0
                return []
            raise FormulaError(f"{self.where}: the number {format_number(expr.value)} is not a term; "
                               "only 1 (intercept) and 0 (no intercept) are")
        if isinstance(expr, Unary):
            if isinstance(expr.operand, Number) and expr.operand.value in (0.0, 1.0):
                if expr.op == "-":
                    self.intercept = expr.operand.value == 0.0
                    return []
            if expr.op == "+":
                return self.terms(expr.operand)
            raise FormulaError(f"{self.where}: '-{deparse(expr.operand)}' removes a term from nothing; "
                               "write it after the terms it removes from")
        if isinstance(expr, Binary) and expr.op == "^":
            return self.power(expr)
        if isinstance(expr, Binary):
            base, chain = left_spine(expr)
            found = self.terms(base)
            for op, right in chain:
                found = self.combine(found, op, right)
            return found
        return [frozenset((self.variable(expr),))]

    def power(self, expr: Binary) -> list[frozenset[str]]:
        left = self.terms(expr.left)
        if not (isinstance(expr.right, Number) and expr.right.value == int(expr.right.value) >= 1):
            raise FormulaError(f"{self.where}: in {deparse(expr)!r}, '^' outside a function crosses terms "
                               "and needs a positive whole number; for a power write I(x^2)")
        crossed = left
        for _ in range(int(expr.right.value) - 1):
            crossed = crossed + left + _interact(crossed, left)
        return crossed

    def combine(self, left: list[frozenset[str]], op: str, operand: Expr) -> list[frozenset[str]]:
        if op == "-":
            if isinstance(operand, Number) and operand.value in (0.0, 1.0):
                self.intercept = operand.value == 0.0
                return left
            removed = set(self.terms(operand))
            return [term for term in left if term not in removed]
        right = self.terms(operand)
        if op == "+":
            return left + right
        if op == "*":
            return left + right + _interact(left, right)
        if op in (":", "%in%"):
            return _interact(left, right)
        # "/": a / b = a + (all of a's variables):b
        outer = frozenset().union(*left) if left else frozenset()
        return left + [outer | term for term in right]

    def variable(self, expr: Expr) -> str:
        _check_variable(expr, self.where)
        key = deparse(expr)
        if key not in self.order:
            self.order[key] = len(self.order)
            self.variables[key] = expr
        return key


def _interact(left: list[frozenset[str]], right: list[frozenset[str]]) -> list[frozenset[str]]:
    return [a | b for a in left for b in right]


def _check_variable(expr: Expr, where: str) -> None:
    """A variable of a term: a column, or one of the term functions applied to arithmetic on columns."""
    shown = deparse(expr)
    if isinstance(expr, Name):
        _check_name(expr.id, where)
        if expr.id in CONSTANTS:
            raise FormulaError(f"{where}: {expr.id!r} is a constant, not a term; use it inside a function, as in "
                               "sin(2 * pi * t)")
        return
    if not isinstance(expr, Call):
        raise FormulaError(f"{where}: arithmetic in the term {shown!r} must be wrapped in I(), as in R: I({shown})")
    function, args, keywords = expr.function, expr.args, dict(expr.keywords)
    if function not in TERM_FUNCTIONS and function not in FUNCTIONS:
        raise FormulaError(
            f"{where}: unknown function in {shown!r}; allowed: "
            f"{', '.join(f'{f}()' for f in (*TERM_FUNCTIONS, *FUNCTIONS))}"
        )
    allowed = {"poly": ("degree",), "ns": ("df",), "bs": ("df", "degree")}.get(function, ())
    unknown = [key for key in keywords if key not in allowed]
    if unknown:
        raise FormulaError(f"{where}: {function}() takes no argument {unknown[0]!r} (in {shown!r})"
                           + (f"; it takes {', '.join(allowed)}" if allowed else ""))
    if function == "factor":
        if len(args) != 1 or not isinstance(args[0], Name):
            raise FormulaError(f"{where}: factor() takes one column name, got {shown!r}")
        _check_name(args[0].id, where)
        return
    if function in ("poly", "ns", "bs"):
        if not args:
            raise FormulaError(f"{where}: {function}() needs a variable, got {shown!r}")
        _check_arithmetic(args[0], where, shown)
        wanted = {"poly": "degree", "ns": "df", "bs": "df"}[function]
        given = list(args[1:]) + ([keywords[wanted]] if wanted in keywords else [])
        if len(given) != 1 or not _whole(given[0]):
            raise FormulaError(f"{where}: {function}() needs its {wanted} as one whole number, as in "
                               f"{function}(x, 3); got {shown!r}")
        if "degree" in keywords and function == "bs" and not _whole(keywords["degree"]):
            raise FormulaError(f"{where}: bs() needs its degree as a whole number; got {shown!r}")
        return
    if len(args) != 1:
        raise FormulaError(f"{where}: {function}() takes one argument, got {shown!r}")
    _check_arithmetic(args[0], where, shown)


def _whole(expr: Expr) -> bool:
    return isinstance(expr, Number) and expr.value == int(expr.value) and expr.value >= 1


def _check_arithmetic(expr: Expr, where: str, shown: str) -> None:
    """Arithmetic inside a function: names, numbers, + - * / ^, unary signs, parentheses, FUNCTIONS and I()."""
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, Name):
            _check_name(node.id, where)
        elif isinstance(node, Paren):
            stack.append(node.inner)
        elif isinstance(node, Unary):
            stack.append(node.operand)
        elif isinstance(node, Binary):
            if node.op not in ("+", "-", "*", "/", "^"):
                raise FormulaError(f"{where}: {node.op!r} is not arithmetic, in {shown!r}; inside a function use "
                                   "+ - * / ^")
            stack.extend((node.left, node.right))
        elif isinstance(node, Call):
            if node.function not in FUNCTIONS and node.function != "I":
                raise FormulaError(
                    f"{where}: unknown function in {shown!r}; inside a function only "
                    f"{', '.join(f'{f}()' for f in ('I', *FUNCTIONS))} apply"
                )
            if len(node.args) != 1 or node.keywords:
                raise FormulaError(f"{where}: {node.function}() takes one argument, got {deparse(node)!r}")
            stack.append(node.args[0])


def _check_name(name: str, where: str) -> None:
    if name == "." or "__" in name:
        raise FormulaError(f"{where}: {name!r} is not a column name a formula can use")


def expression_columns(expr: Expr) -> set[str]:
    """The data columns an expression reads (function names and constants excluded)."""
    names: set[str] = set()
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, Name):
            if node.id not in CONSTANTS:
                names.add(node.id)
        elif isinstance(node, Paren):
            stack.append(node.inner)
        elif isinstance(node, Unary):
            stack.append(node.operand)
        elif isinstance(node, Binary):
            stack.extend((node.left, node.right))
        elif isinstance(node, Call):
            stack.extend(node.args)
            stack.extend(value for _, value in node.keywords)
    return names
