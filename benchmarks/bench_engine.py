"""Time the lme4-style engine at 200,000 rows (20,000 subjects × 10 visits), ML.

Prints, for a random intercept ``(1 | patient_id)`` and a random intercept and slope
``(week | patient_id)``: building the design, the one-pass cross-products, one deviance evaluation at
lme4's start θ (median of repeats), and one whole fit (median of a few), with the deviance evaluations
the optimizer used. Not a test: run ``.venv/bin/python benchmarks/bench_engine.py``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from longitudinal.design import build_design
from longitudinal.engine import compute_crossproducts, fit_lmm, layout_theta, profiled_deviance
from longitudinal.formula import parse_formula
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
        fit_seconds = time_call(lambda: fit_lmm(design, reml=False), 3)
        result = fit_lmm(design, reml=False)
        print(
            f"{label}: design {design_seconds * 1e3:.0f} ms, cross-products {products_seconds * 1e3:.1f} ms, "
            f"one deviance {deviance_seconds * 1e3:.2f} ms, whole fit {fit_seconds * 1e3:.0f} ms "
            f"({result.evaluations} optimizer evaluations; logLik {result.loglik:.4f}, "
            f"converged {result.converged})"
        )


if __name__ == "__main__":
    main()
