"""Time the one-factor lme4-style engine on an unbalanced design: every subject its own visit times.

About 200,000 rows: 27,000 subjects with 3-12 visits each at irregular times (uniform jitter around
nominal weeks), so no two subjects share Z_g'Z_g for ``(t | id)`` and the per-pattern shortcut
(``fit.lmm.crossproducts.group_patterns``) does not apply: every deviance evaluation runs over all groups.
For ``y ~ t + (1 | id)`` and ``y ~ t + (t | id)`` prints the best of ``--repeats`` timings of one
``fit_candidate(..., method="ML")``, of one deviance evaluation at lme4's start θ on the standardized
design's precomputed ``CrossProducts`` as ``profiled_deviance`` computes it (every group's factor L_g and
R_g by ``fit.linalg.factor_groups``) and as the optimizer does when no visit patterns are shared (log|M|
and Σ_g R_g'R_g block by block of groups, ``fit.linalg.GroupGram``), the part of the first that forms
Σ_g R_g'R_g (the (p + 1)² · q · G product), the optimizer's evaluations in the fit (the convergence
check adds about 20 more), and with ``--profile`` the top functions of one fit under cProfile.
``--csv PATH`` writes the data (columns id, t, y) for timing lme4 on the same rows.
Not a test: run ``.venv/bin/python benchmarks/bench_unbalanced.py [--repeats 5] [--profile] [--csv PATH]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import numpy as np
import pandas as pd

from longitudinal.fit.blas import limit_blas_threads
from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.lmm import profiled_deviance
from longitudinal.fit.linalg import GroupGram
from longitudinal.fit.lmm.crossproducts import compute_crossproducts
from longitudinal.fit.lmm.onefactor import gram_deviance, solve_at
from longitudinal.fit.scaling import standardize
from longitudinal.fit.theta import layout_theta
from longitudinal.model.design import build_design
from longitudinal.model.formula import parse_formula

from timing import least_time

CANDIDATES = {
    "(1|id)": "y ~ t + (1 | id)",
    "(t|id)": "y ~ t + (t | id)",
}


def simulate_unbalanced(n_subjects: int = 27_000, seed: int = 17) -> pd.DataFrame:
    """Subjects with 3-12 visits at irregular times; y = 10 + 0.5 t + b0 + b1 t + e (SDs 2, 0.3, 1)."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(3, 13, size=n_subjects)
    ids = np.repeat(np.arange(n_subjects), visits)
    position = np.arange(len(ids)) - np.repeat(np.cumsum(visits) - visits, visits)
    t = position + rng.uniform(-0.4, 0.4, size=len(ids))
    b0 = rng.normal(0.0, 2.0, n_subjects)[ids]
    b1 = rng.normal(0.0, 0.3, n_subjects)[ids]
    y = 10.0 + 0.5 * t + b0 + b1 * t + rng.normal(0.0, 1.0, len(ids))
    return pd.DataFrame({"id": np.char.add("s", ids.astype(str)), "t": t, "y": y})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    limit_blas_threads(1)  # as the pipeline's fit task module does (longitudinal.fit.blas)
    visits = simulate_unbalanced()
    if args.csv:
        visits.to_csv(args.csv, index=False)
    print(f"{len(visits):,} rows, {visits['id'].nunique():,} subjects, ML, best of {args.repeats}")
    print(
        f"{'candidate':10} {'fit s':>8} {'evals':>6} {'eval ms':>8} {'blocked ms':>12} {'of which RtR ms':>16} "
        f"{'evals x blocked s':>19} {'deviance':>20}"
    )
    for label, formula in CANDIDATES.items():
        design, _ = standardize(build_design(visits, parse_formula(formula)))
        products = compute_crossproducts(design)
        layout = layout_theta(products.block_sizes)
        theta0 = layout.start()
        evaluation = least_time(20 * args.repeats, lambda: profiled_deviance(products, theta0, False))
        gram = GroupGram(products.ZtZ, products.ZtXy)
        lam0 = layout.lambda_matrix(theta0)
        buffered = least_time(20 * args.repeats, lambda: gram_deviance(products, gram, lam0, False))
        solution = solve_at(products, lam0, False)
        assert solution is not None
        flat = solution.R.reshape(-1, solution.R.shape[2])
        gram = least_time(20 * args.repeats, lambda: flat.T @ flat)
        fit = fit_candidate(visits, label, formula, method="ML")
        fit_seconds = least_time(args.repeats, lambda: fit_candidate(visits, label, formula, method="ML"))
        evals = fit.iterations
        print(
            f"{label:10} {fit_seconds:8.3f} {evals:6d} {1e3 * evaluation:8.3f} {1e3 * buffered:12.3f} "
            f"{1e3 * gram:16.3f} {evals * buffered:19.3f} {-2 * fit.loglik:20.10f}"
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            fit_candidate(visits, label, formula, method="ML")
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
