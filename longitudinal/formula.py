"""Model formulas in lme4 notation, parsed into a typed record.

``score ~ week * arm + age + (week | patient_id)`` splits into the response, the fixed-effects part
(R's formula language: ``a * b``, ``a:b``, ``I(x^2)``, ``0 +`` / ``- 1``) and the random-effects bars.
Each bar is one block with its own unstructured covariance matrix, as in lme4; ``(x || g)`` expands,
as lme4 does, to ``(1 | g) + (0 + x | g)``: one block per term, hence uncorrelated.

Nested and crossed random effects follow lme4 too. A grouping factor may be an interaction ``a:b`` (one
level per combination of a level of ``a`` and a level of ``b``, as when side labels repeat across dogs), and
``(t | a/b)`` expands, as lme4's ``findbars`` does, to ``(t | a) + (t | a:b)`` (``a/b/c`` to ``a``, ``a:b``,
``a:b:c``). Bars on different factors are crossed (``(t | patient) + (1 | rater)``). ``||`` expands first,
then ``/``: ``(t || a/b)`` gives ``(1 | a) + (1 | a:b) + (0 + t | a) + (0 + t | a:b)``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from longitudinal.errors import ConfigError, FormulaError
from longitudinal.records import SOURCE_COLUMNS

#: Functions a formula may call inside terms, with the numpy function each stands for.
FUNCTIONS = {"log": "log", "exp": "exp", "sqrt": "sqrt", "abs": "abs", "log10": "log10", "log2": "log2"}
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


@dataclass(frozen=True)
class ModelFormula:
    """A parsed candidate formula.

    ``fixed`` is the right-hand side of the fixed effects in R's formula language (e.g. ``"week * arm"``,
    ``"1"`` when there are none); ``blocks`` the random-effect bars after ``||`` expansion; ``columns``
    every data column the formula reads (response, covariates and grouping factors).
    """

    text: str
    response: str
    fixed: str
    blocks: tuple[RandomBlock, ...]
    columns: frozenset[str]

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(block.group for block in self.blocks))


def parse_formula(text: str, *, name: str = "formula") -> ModelFormula:
    """Parse ``text`` (lme4 notation); errors name the candidate ``name`` and what is wrong."""
    where = f"candidate {name!r} ({text!r})"
    if text.count("~") != 1:
        raise FormulaError(f"{where}: a model formula has one '~' between the outcome and the terms")
    left, right = (part.strip() for part in text.split("~"))
    if not _NAME.match(left):
        raise FormulaError(f"{where}: the left of '~' must be the outcome column, got {left!r}")
    if _depth_errors(right):
        raise FormulaError(f"{where}: unbalanced parentheses")
    fixed_terms: list[str] = []
    blocks: list[RandomBlock] = []
    for sign, term in _split_top(right, "+-"):
        inner = _strip_parens(term)
        if inner is not None and _find_top(inner, "|") >= 0:
            if sign == "-":
                raise FormulaError(f"{where}: a random-effects term cannot be subtracted: {term!r}")
            blocks.extend(_parse_bar(inner, where))
        else:
            fixed_terms.append(term if sign == "+" else f"- {term}")
    if not blocks:
        raise FormulaError(
            f"{where}: no random-effects term; a mixed model needs one such as '(1 | subject)'"
        )
    fixed = " + ".join(fixed_terms).replace("+ -", "-") if fixed_terms else "1"
    columns = {left} | {column for block in blocks for column in block.factors}
    columns |= _term_columns(fixed, where)
    for block in blocks:
        for term in block.terms:
            if term != "1":
                columns |= _term_columns(term, where)
    return ModelFormula(text=text, response=left, fixed=fixed, blocks=tuple(blocks), columns=frozenset(columns))


def parse_candidates(candidates: Mapping[str, str]) -> dict[str, ModelFormula]:
    """Parse every candidate of a study config, in order."""
    return {name: parse_formula(text, name=name) for name, text in candidates.items()}


def check_columns(
    formulas: Mapping[str, ModelFormula], columns: Collection[str], *, reported_elsewhere: Collection[str] = (),
) -> None:
    """Refuse a candidate that reads a column the data lack, naming candidate, column and the columns there are.

    Columns in ``reported_elsewhere`` are not checked (validation reports missing role columns itself).
    """
    available = list(columns)
    for name, formula in formulas.items():
        missing = sorted(formula.columns - set(available) - set(reported_elsewhere))
        if missing:
            from longitudinal.ingest import did_you_mean

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


def to_patsy(expression: str) -> str:
    """R formula text to patsy's dialect: ``^`` inside ``I()`` is a power (in patsy it is Python's xor)."""
    return _replace_in_calls(expression)


# ----------------------------------------------------------------------------------------------- parsing


def _parse_bar(inner: str, where: str) -> list[RandomBlock]:
    double = _find_top(inner, "||")
    if double >= 0:
        lhs, group = inner[:double], inner[double + 2:]
    else:
        bar = _find_top(inner, "|")
        lhs, group = inner[:bar], inner[bar + 1:]
    groups = _nested_groups(group.strip(), where)
    intercept = True
    terms: list[str] = []
    for sign, term in _split_top(lhs.strip(), "+-"):
        if term in ("0", "1"):
            intercept = term == "1" and sign == "+"
            continue
        if sign == "-":
            raise FormulaError(f"{where}: only the intercept can be removed in a random-effects term, got '- {term}'")
        if term not in terms:
            terms.append(term)
    ordered = (("1",) if intercept else ()) + tuple(terms)
    if not ordered:
        raise FormulaError(f"{where}: the random-effects term '({inner})' has no terms")
    if double >= 0:
        return [RandomBlock(terms=(term,), group=group) for term in ordered for group in groups]
    return [RandomBlock(terms=ordered, group=group) for group in groups]


def _nested_groups(text: str, where: str) -> list[str]:
    """``a/b/c`` → ``["a", "a:b", "a:b:c"]`` (lme4's expansion of nesting); ``a:b`` → ``["a:b"]``."""
    levels = [part.strip() for part in text.split("/")]
    groups: list[str] = []
    columns: list[str] = []
    for level in levels:
        parts = [part.strip() for part in level.split(":")]
        for part in parts:
            if not _NAME.match(part):
                raise FormulaError(
                    f"{where}: the grouping factor after '|' must be a column name, columns joined by ':' "
                    f"(interaction) or '/' (nesting), got {text!r}"
                )
            if part in columns:
                raise FormulaError(f"{where}: column {part!r} appears twice in the grouping factor {text!r}")
            columns.append(part)
        groups.append(":".join(columns))
    return groups


def _term_columns(expression: str, where: str) -> set[str]:
    """The data columns an R term expression reads (function names and ``I`` excluded)."""
    python = _to_python(expression)
    try:
        tree = ast.parse(python, mode="eval")
    except SyntaxError:
        raise FormulaError(f"{where}: cannot read the term {expression!r}") from None
    names: set[str] = set()
    called: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or (node.func.id not in FUNCTIONS and node.func.id != "I"):
                raise FormulaError(
                    f"{where}: unknown function in {expression!r}; allowed: I(), {', '.join(f'{f}()' for f in FUNCTIONS)}"
                )
            called.add(id(node.func))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in called:
            names.add(node.id)
    return names


def _to_python(expression: str) -> str:
    # R's formula operators (* : / ^ -) become Python operators only so that ast can find the names.
    text = expression.replace(":", "*").replace("^", "**").replace("%in%", "*")
    return "0 + " + text if text.lstrip().startswith("-") else text


def _replace_in_calls(expression: str) -> str:
    """Within function calls (``I(x^2)``) R's ``^`` is arithmetic power: write it as ``**``."""
    out: list[str] = []
    depth = 0
    for ch in expression:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        out.append("**" if ch == "^" and depth > 0 else ch)
    return "".join(out)


def _depth_errors(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return True
    return depth != 0


def _split_top(text: str, operators: str) -> list[tuple[str, str]]:
    """Split at top-level ``+``/``-`` (not inside parentheses), keeping each term's sign."""
    parts: list[tuple[str, str]] = []
    depth, sign, start = 0, "+", 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch in operators and _is_binary(text, i):
            term = text[start:i].strip()
            if term:
                parts.append((sign, term))
            sign, start = ch, i + 1
    term = text[start:].strip()
    if term:
        parts.append((sign, term))
    return parts


def _is_binary(text: str, i: int) -> bool:
    # A '-' right after '^', '*' or '(' (as in 'x^-1') is not a term separator.
    before = text[:i].rstrip()
    return not before.endswith(("^", "*", "/", "("))


def _find_top(text: str, token: str) -> int:
    depth = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and text.startswith(token, i):
            return i
        i += 1
    return -1


def _strip_parens(term: str) -> str | None:
    """``(a | b)`` → ``a | b``; None when the term is not one parenthesized group."""
    if not (term.startswith("(") and term.endswith(")")):
        return None
    depth = 0
    for i, ch in enumerate(term):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(term) - 1:
            return None
    return term[1:-1]


def candidate_covariates(formulas: Mapping[str, ModelFormula], roles: Collection[str]) -> list[str]:
    """Columns other than the roles (subject, time, outcome) that any candidate reads, sorted.

    Validation excludes rows with a missing value in any of them, so every candidate is fitted on the
    same rows and their likelihoods compare.
    """
    used: set[str] = set()
    for formula in formulas.values():
        used |= formula.columns
    return sorted(used - set(roles))


def check_candidates(formulas: Mapping[str, ModelFormula], roles: Sequence[str], columns: Sequence[str]) -> list[str]:
    """Check every candidate against the data's columns (in file order) and return the covariates they use.

    Role columns (subject, time, outcome) count as present here even when the data lack them, so that a
    missing role is reported by validation, with the file and a suggestion, rather than as a formula error.
    """
    check_columns(formulas, [c for c in columns if c not in SOURCE_COLUMNS], reported_elsewhere=roles)
    return candidate_covariates(formulas, roles)
