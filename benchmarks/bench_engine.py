"""Time the lme4-style engine at 200,000 rows (20,000 subjects × 10 visits), ML.

Prints, for a random intercept ``(1 | patient_id)`` and a random intercept and slope
``(week | patient_id)``: building the design, the one-pass cross-products, one deviance evaluation at
lme4's start θ (median of repeats) per subject and per visit pattern (what the optimizer uses when subjects
share their visit times), and one whole fit (median of a few), with the deviance evaluations
the optimizer used. Then the nested/crossed path (``longitudinal.sparse_engine``) on 200,000 rows:
20,000 patients × 10 visits, each visit scored by one of 10 raters, ``(t | patient) + (1 | rater)``, and
20,000 pupils in 500 schools, ``(year | school) + (1 | school:pupil)``.
Not a test: run ``.venv/bin/python benchmarks/bench_engine.py``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import pandas as pd

from longitudinal.design import build_design
from longitudinal.engine import compute_crossproducts, fit_lmm, group_patterns, layout_theta, profiled_deviance
from longitudinal.formula import parse_formula
from longitudinal.simulate import SimulationSpec, simulate_trial
from longitudinal.sparse_engine import compute_multiproducts, multilevel_deviance

CANDIDATES = {
    "(1|g)": "score ~ week * arm + age + (1 | patient_id)",
    "(x|g)": "score ~ week * arm + age + (week | patient_id)",
}


def time_call(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    spec = SimulationSpec(n_subjects=20_000, min_visits=10, max_visits=10, dropout_probability=0.0, seed=7)
    visits = simulate_trial(spec)
    print(f"{len(visits):,} rows, {visits['patient_id'].nunique():,} subjects, ML")
    for label, formula in CANDIDATES.items():
        design_seconds = time_call(lambda: build_design(visits, parse_formula(formula)), 3)
        design = build_design(visits, parse_formula(formula))
        products_seconds = time_call(lambda: compute_crossproducts(design), 5)
        products = compute_crossproducts(design)
        theta = layout_theta(products.block_sizes).start()
        deviance_seconds = time_call(lambda: profiled_deviance(products, theta, False), 200)
        patterns = group_patterns(products)
        pattern_text = "no shared visit patterns"
        if patterns is not None:
            pattern_seconds = time_call(lambda: profiled_deviance(patterns, theta, False), 200)
            pattern_text = f"{patterns.n_patterns} visit pattern(s): one deviance {pattern_seconds * 1e3:.3f} ms"
        fit_seconds = time_call(lambda: fit_lmm(design, reml=False), 3)
        result = fit_lmm(design, reml=False)
        print(
            f"{label}: design {design_seconds * 1e3:.0f} ms, cross-products {products_seconds * 1e3:.1f} ms, "
            f"one deviance {deviance_seconds * 1e3:.2f} ms per subject, {pattern_text}; whole fit {fit_seconds * 1e3:.0f} ms "
            f"({result.evaluations} optimizer evaluations; logLik {result.loglik:.4f}, "
            f"converged {result.converged})"
        )



def simulate_multilevel(seed: int = 7) -> dict[str, tuple[pd.DataFrame, str]]:
    """Crossed patients × raters and nested pupils-in-schools, 200,000 rows each."""
    rng = np.random.default_rng(seed)
    patients, visits, raters = 20_000, 10, 10
    patient = np.repeat(np.arange(patients), visits)
    t = np.tile(np.arange(visits, dtype=float), patients)
    rater = rng.integers(0, raters, patient.size)
    y = (5 + 0.3 * t + rng.normal(0, 2, patients)[patient] + rng.normal(0, 0.3, patients)[patient] * t
         + rng.normal(0, 1, raters)[rater] + rng.normal(0, 1, patient.size))
    crossed = pd.DataFrame({"patient": patient.astype(str), "rater": rater.astype(str), "t": t, "y": y})
    schools, per_school, years = 500, 40, 10
    pupil = np.repeat(np.arange(schools * per_school), years)
    school = pupil // per_school
    year = np.tile(np.arange(years, dtype=float), schools * per_school)
    score = (50 + 2 * year + rng.normal(0, 4, schools)[school] + rng.normal(0, 0.5, schools)[school] * year
             + rng.normal(0, 3, pupil.max() + 1)[pupil] + rng.normal(0, 2, pupil.size))
    nested = pd.DataFrame({
        "school": school.astype(str), "pupil": (pupil % per_school).astype(str), "year": year, "score": score,
    })
    return {
        "crossed (t|patient)+(1|rater)": (crossed, "y ~ t + (t | patient) + (1 | rater)"),
        "nested (year|school)+(1|school:pupil)": (nested, "score ~ year + (year | school) + (1 | school:pupil)"),
    }


def main_multilevel() -> None:
    for label, (frame, formula) in simulate_multilevel().items():
        design = build_design(frame, parse_formula(formula))
        products_seconds = time_call(lambda: compute_multiproducts(design), 3)
        products = compute_multiproducts(design)
        theta = layout_theta(products.block_sizes).start()
        deviance_seconds = time_call(lambda: multilevel_deviance(products, theta, False), 20)
        began = time.perf_counter()
        result = fit_lmm(design, reml=False)
        fit_seconds = time.perf_counter() - began
        print(
            f"{label}: {len(frame):,} rows, {design.n_groups:,} primary levels, {products.n_rest} other random "
            f"effects; cross-products {products_seconds * 1e3:.0f} ms, one deviance {deviance_seconds * 1e3:.1f} ms, "
            f"whole fit {fit_seconds:.2f} s ({result.evaluations} evaluations; logLik {result.loglik:.4f}, "
            f"converged {result.converged})"
        )


if __name__ == "__main__":
    main()
    main_multilevel()
