"""Time the lme4-style engine at 200,000 rows (20,000 subjects × 10 visits), ML.

Prints, for a random intercept ``(1 | patient_id)`` and a random intercept and slope
``(week | patient_id)``: building the design, the one-pass cross-products, one deviance evaluation at
lme4's start θ (median of repeats) per subject and per visit pattern (what the optimizer uses when subjects
share their visit times), and one whole fit (median of a few), with the deviance evaluations
the optimizer used. Then the nested/crossed path (``longitudinal.fit.lmm.multifactor``) on 200,000 rows:
20,000 patients × 10 visits, each visit scored by one of 10 raters, ``(t | patient) + (1 | rater)``, and
20,000 pupils in 500 schools, ``(year | school) + (1 | school:pupil)``.

With ``--scaling``: the fit stage's four fits (three candidates by ML, the REML refit of the random slope)
at 200,000 and 2,000,000 rows, typed as the pipeline types them (identifiers as text, numbers as floats),
each step timed once as the pipeline pays it (fresh memory), the ratio of the two sizes (the goal: at most
12 for 10× the rows) and the size and time of pickling each ``Fit`` (what the fit cache persists).
OpenBLAS runs one thread, as in the pipeline. Not a test: run ``.venv/bin/python benchmarks/bench_engine.py
[--scaling]``.
"""

from __future__ import annotations

import pickle
import statistics
import sys
import time
from typing import Callable

import numpy as np
import pandas as pd

from longitudinal.fit.blas import limit_blas_threads
from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.lmm import fit_lmm, profiled_deviance
from longitudinal.fit.lmm.crossproducts import compute_crossproducts, group_patterns
from longitudinal.fit.lmm.multifactor import compute_multiproducts, multilevel_deviance
from longitudinal.fit.theta import layout_theta
from longitudinal.model.design import build_design
from longitudinal.model.formula import parse_formula
from longitudinal.simulate import SimulationSpec, simulate_trial

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


STAGE = (
    ("ri", "score ~ week * arm + age + (1 | patient_id)", "ML"),
    ("ris", "score ~ week * arm + age + (week | patient_id)", "ML"),
    ("uncorr", "score ~ week * arm + age + (week || patient_id)", "ML"),
    ("ris", "score ~ week * arm + age + (week | patient_id)", "REML"),
)


def typed_trial(n_subjects: int) -> pd.DataFrame:
    """A balanced trial (10 visits each) with the pipeline's types: text identifiers, float numbers."""
    spec = SimulationSpec(n_subjects=n_subjects, min_visits=10, max_visits=10, dropout_probability=0.0, seed=7)
    visits = simulate_trial(spec)
    text = pd.StringDtype("pyarrow", na_value=np.nan)
    return visits.astype({"patient_id": str, "arm": str, "site": str}).astype(
        {"patient_id": text, "arm": text, "site": text, "week": float, "age": float, "score": float}
    )


def time_once(call: Callable[[], object]) -> tuple[float, object]:
    began = time.perf_counter()
    value = call()
    return time.perf_counter() - began, value


def measure_stage(visits: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per fit of the stage: design, cross-products, visit patterns, engine fit, whole fit, pickle (s, MB)."""
    fit_candidate(visits.head(1_000), "warm-up", STAGE[0][1])  # imports and first-call costs
    rows: dict[str, dict[str, float]] = {}
    for name, formula, method in STAGE:
        parsed = parse_formula(formula)
        row: dict[str, float] = {}
        row["design"], design = time_once(lambda: build_design(visits, parsed))
        row["cross-products"], products = time_once(lambda: compute_crossproducts(design))  # type: ignore[arg-type]
        row["patterns"], _ = time_once(lambda: group_patterns(products))  # type: ignore[arg-type]
        row["engine fit"], _ = time_once(lambda: fit_lmm(design, reml=method == "REML"))  # type: ignore[arg-type]
        del design, products
        fit = fit_candidate(visits, name, formula, method=method)  # type: ignore[arg-type]
        row["Fit.seconds"] = fit.seconds
        row["pickle"], blob = time_once(lambda: pickle.dumps(fit, protocol=pickle.HIGHEST_PROTOCOL))
        row["pickle MB"] = len(blob) / 1e6  # type: ignore[arg-type]
        rows[f"{name} {method}"] = row
    return rows


def main_scaling() -> None:
    sizes = (20_000, 200_000)
    results = {}
    for n_subjects in sizes:
        visits = typed_trial(n_subjects)
        results[n_subjects] = measure_stage(visits)
        del visits
    small, large = (results[size] for size in sizes)
    steps = list(next(iter(small.values())))
    print("fit stage at 200,000 and 2,000,000 rows (seconds; ratio = 2M / 200k, goal ≤ 12)")
    for fit in small:
        print(f"  {fit}")
        for step in steps:
            ratio = large[fit][step] / small[fit][step] if small[fit][step] > 0 else float("nan")
            print(f"    {step:15s} {small[fit][step]:9.3f} {large[fit][step]:9.3f}   × {ratio:5.1f}")
    total_small = sum(row["Fit.seconds"] for row in small.values())
    total_large = sum(row["Fit.seconds"] for row in large.values())
    print(f"  sum of Fit.seconds: {total_small:.3f} s → {total_large:.3f} s (× {total_large / total_small:.1f})")


if __name__ == "__main__":
    limit_blas_threads(1)  # as the pipeline's fit task module does (longitudinal.fit.blas)
    if "--scaling" in sys.argv[1:]:
        main_scaling()
    else:
        main()
        main_multilevel()
