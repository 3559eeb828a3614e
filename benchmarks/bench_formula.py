"""How long the formula grammar takes as formulas grow: linear, not quadratic (issue 10).

Run: .venv/bin/python benchmarks/bench_formula.py
Prints, for fixed-effect parts of 1,250 to 10,000 characters (the limit), the best of 5 parse times and the
ratio to the smallest: a linear parser doubles its time when the formula doubles (a quadratic one
quadruples it). Ratios, measured in one run, are what to compare on a shared machine.
"""

from __future__ import annotations

import time

from longitudinal.model.formula import parse_formula


def _formula(characters: int) -> str:
    terms = []
    length = 0
    i = 0
    while length < characters:
        term = f"I((x{i} - 5)/7)"
        terms.append(term)
        length += len(term) + 3
        i += 1
    return "y ~ " + " + ".join(terms) + " + (1 | g)"


def main() -> None:
    sizes = (1_250, 2_500, 5_000, 9_800)
    times = []
    for size in sizes:
        text = _formula(size)
        best = min(_timed(text) for _ in range(5))
        times.append(best)
        print(f"{len(text):>6,} characters: {best * 1000:8.2f} ms  ({best / times[0]:.2f}× the smallest, "
              f"{len(text) / len(_formula(sizes[0])):.2f}× the length)")


def _timed(text: str) -> float:
    began = time.perf_counter()
    parse_formula(text)
    return time.perf_counter() - began


if __name__ == "__main__":
    main()
