"""Time the pipeline's fit stage in process, without Prefect, piece by piece (issue 17).

Simulates an unbalanced study with the pipeline's columns (``patient_id, week, arm, age, score``): subjects
with 3-12 visits each at irregular times (nominal week + uniform jitter of ±0.4), so every subject is its
own visit pattern and the per-pattern shortcut never applies. 200,000 rows is 27,000 subjects (issue 17's
study); ``--sizes`` scales the subjects with the rows. The data go through the library's own ingest and
validation (``curate``, ``validate_visits``), so the fits see the frame the flow passes its ``fit`` tasks.

What the flow's fit stage runs, each timed (least of ``--repeats``): ``fingerprint(visits)`` (the fit
cache's key), then the three ML candidates and the REML refit of the selected one by ``fit_candidate``,
each broken into its pieces (design, standardization, cross-products, optimizer with lme4's checks,
estimates at the optimum; the rest of ``fit_candidate``: the record). ``--lme4`` times lmer on the same rows (``lme4_fits.R``), once.
``--profile`` prints the top functions of one whole stage under cProfile. ``--cpu`` times this process's
CPU time instead of wall time (steadier when other jobs share the cores; it counts BLAS threads too).
OpenBLAS gets one thread, as in the pipeline (``tasks/fitting.py``); ``--blas-threads N`` sets another count.
``--prefect`` also times the stage as the flow runs it: ``fingerprint`` and the pipeline's ``fit`` task four
times (three ML, the REML refit) in a flow under ``prefect_test_harness``, each repeat with a fresh cache key,
then once more with the same key (every fit cached); results go to a temporary folder, not ~/.prefect.

Not a test: ``.venv/bin/python benchmarks/bench_fit_stage.py [--sizes 200k,2M] [--repeats 3] [--lme4]
[--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from longitudinal.config import load_config
from longitudinal.data.curation import curate, fingerprint
from longitudinal.data.validation import validate_visits
from longitudinal.fit.blas import limit_blas_threads
from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.lmm import fit_lmm
from longitudinal.fit.lmm.crossproducts import compute_crossproducts
from longitudinal.fit.scaling import standardize
from longitudinal.model.design import build_design
from longitudinal.model.formula import check_candidates, parse_candidates, parse_formula

from timing import best_of, least_time

CANDIDATES = {
    "ri": "score ~ week * arm + age + (1 | patient_id)",
    "ris": "score ~ week * arm + age + (week | patient_id)",
    "ris_uncorrelated": "score ~ week * arm + age + (week || patient_id)",
}
ROWS_PER_SUBJECT = 200_000 / 27_000
SEED = 17


def simulate_unbalanced(rows: int, seed: int = SEED) -> pd.DataFrame:
    """About ``rows`` rows: subjects with 3-12 visits at nominal weeks 0, 1, ... plus jitter U(-0.4, 0.4);
    score = 40 - week + 0.5 treated - week·treated + 0.2 age + u0 + u1 week + e (SDs 7, 0.8, 4; ρ = -0.45)."""
    rng = np.random.default_rng(seed)
    n = int(round(rows / ROWS_PER_SUBJECT))
    visits = rng.integers(3, 13, size=n)
    subject = np.repeat(np.arange(n), visits)
    position = np.arange(len(subject)) - np.repeat(np.cumsum(visits) - visits, visits)
    week = np.round(position + rng.uniform(-0.4, 0.4, size=len(subject)), 4)
    week[position == 0] = 0.0
    treated = rng.permutation(np.arange(n) % 2 == 1)
    age = np.clip(np.round(rng.normal(45.0, 12.0, size=n)), 18, 80).astype(np.int64)
    z = rng.standard_normal((n, 2))
    u0 = 7.0 * z[:, 0]
    u1 = 0.8 * (-0.45 * z[:, 0] + np.sqrt(1 - 0.45 ** 2) * z[:, 1])
    score = (40.0 + 0.5 * treated + 0.2 * age + u0)[subject] + (-1.0 - 1.0 * treated + u1)[subject] * week
    score = np.round(score + rng.normal(0.0, 4.0, size=len(subject)), 2)
    width = len(str(n))
    ids = np.array([f"P{i + 1:0{width}d}" for i in range(n)], dtype=object)
    return pd.DataFrame({
        "patient_id": ids[subject], "week": week, "arm": np.where(treated, "treatment", "control")[subject],
        "age": age[subject], "score": score,
    })


def validated_visits(frame: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """``frame`` through the library's ingest and validation: the visits the flow's fit tasks receive."""
    data = folder / "data.csv"
    frame.to_csv(data, index=False)
    lines = [
        "study: bench_fit_stage", "data:", f"  source: {json.dumps(str(data))}", "  subject: patient_id",
        "  time: week", "  outcome: score", "validation:", "  min_observations_per_subject: 2", "models:",
        "  criterion: bic", "  candidates:", *(f"    {k}: {json.dumps(v)}" for k, v in CANDIDATES.items()),
        "output:", f"  directory: {json.dumps(str(folder / 'reports'))}",
    ]
    (folder / "study.yaml").write_text("\n".join(lines) + "\n")
    config = load_config(folder / "study.yaml")
    ingested = curate(config).ingested
    formulas = parse_candidates(config.models.candidates)
    covariates = check_candidates(formulas, config.data.roles, list(ingested.raw.columns))
    return validate_visits(ingested, config, covariates).visits


def pieces(visits: pd.DataFrame, formula: str, method: str) -> dict[str, float]:
    """One ``fit_candidate`` cut at its seams, each piece timed once (seconds)."""
    reml = method == "REML"
    out: dict[str, float] = {}

    def lap(name: str, call: Callable[[], object]) -> object:
        began = time.perf_counter()
        result = call()
        out[name] = time.perf_counter() - began
        return result

    parsed = parse_formula(formula)
    design = lap("design", lambda: build_design(visits, parsed))
    standardized, standardization = lap("standardize", lambda: standardize(design))  # type: ignore[misc]
    products = lap("crossproducts", lambda: compute_crossproducts(standardized))
    del products
    lap("engine (all)", lambda: fit_lmm(design, reml=reml))
    out["engine: optimizer, estimates"] = out["engine (all)"] - out["standardize"] - out["crossproducts"]
    lap("fit_candidate", lambda: fit_candidate(visits, "x", formula, method=method))  # type: ignore[arg-type]
    out["record etc."] = out["fit_candidate"] - out["design"] - out["engine (all)"]
    return out


def time_in_flow(visits: pd.DataFrame, chosen: str, repeats: int) -> None:
    """The fit stage as ``flows/study_pipeline.py`` runs it (tasks in turn in the flow's thread), wall time."""
    import os

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tasks.fitting import fit

    @flow(name="bench-fit-stage")
    def stage(tag: str) -> tuple[float, float]:
        began = time.perf_counter()
        data_hash = tag + fingerprint(visits)  # a fresh cache key per tag (the key reads its first 32 characters)
        fits = [fit(visits, n, f, "ML", "lme4-style", data_hash, "gaussian", 1) for n, f in CANDIDATES.items()]
        refit = fit.with_options(task_run_name=f"refit-{chosen}-REML")
        fits.append(refit(visits, chosen, CANDIDATES[chosen], "REML", "lme4-style", data_hash, "gaussian", 1))
        return time.perf_counter() - began, sum(f.seconds for f in fits)

    with tempfile.TemporaryDirectory() as storage:
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = storage
        with prefect_test_harness():
            stage("warm-up-")
            for repeat in range(repeats):
                tag = f"{time.time():.4f}"[-10:]
                total, own = stage(tag)
                cached, _ = stage(tag)
                print(f"  in a flow: stage {total:.3f} s (the fits' own {own:.3f} s), cached re-run {cached:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="200k,2M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lme4", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--prefect", action="store_true")
    args = parser.parse_args()
    limit_blas_threads(args.blas_threads)
    if args.cpu:
        time.perf_counter = time.process_time  # type: ignore[assignment]  # the clock of timing.best_of and of the laps here
    sizes = [int(float(s[:-1]) * (1e3 if s[-1] == "k" else 1e6)) if s[-1] in "kM" else int(s)
             for s in args.sizes.split(",")]
    stage_by_size = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            visits = validated_visits(simulate_unbalanced(rows), Path(tmp))
            print(f"\n== {len(visits):,} rows, {visits['patient_id'].nunique():,} subjects (best of {args.repeats})")
            hashing = least_time(args.repeats, lambda: fingerprint(visits))
            print(f"  fingerprint                {hashing:8.4f} s")
            fits = {}
            total = hashing
            for name, formula in CANDIDATES.items():
                seconds, fit = best_of(args.repeats, lambda: fit_candidate(visits, name, formula, method="ML"))
                fits[name] = fit
                total += seconds
                print(f"  {name + ' ML':26} {seconds:8.4f} s  logLik {fit.loglik:.6f}  evals {fit.iterations}"
                      f"  BIC {fit.bic:.3f}")
            chosen = min(fits, key=lambda k: fits[k].bic)
            seconds, refit = best_of(args.repeats, lambda: fit_candidate(visits, chosen, CANDIDATES[chosen],
                                                                         method="REML"))
            total += seconds
            print(f"  {chosen + ' REML':26} {seconds:8.4f} s  REML criterion {refit.reml_criterion:.6f}")
            print(f"  fit stage (sum)            {total:8.4f} s")
            stage_by_size[rows] = total
            for name, formula in CANDIDATES.items():
                best: dict[str, float] = {}
                for _ in range(args.repeats):
                    for key, value in pieces(visits, formula, "ML").items():
                        best[key] = min(best.get(key, np.inf), value)
                print(f"  {name:18} " + "  ".join(f"{k} {v:.4f}" for k, v in best.items()))
            if args.prefect:
                time_in_flow(visits, chosen, args.repeats)
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                fingerprint(visits)
                for name, formula in CANDIDATES.items():
                    fit_candidate(visits, name, formula, method="ML")
                fit_candidate(visits, chosen, CANDIDATES[chosen], method="REML")
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            if args.lme4:
                csv = Path(tmp) / "lme4.csv"
                visits[["patient_id", "week", "arm", "age", "score"]].to_csv(csv, index=False)
                found = subprocess.run(["Rscript", str(Path(__file__).parent / "lme4_fits.R"), str(csv), "bic"],
                                       capture_output=True, text=True, check=True)
                lme4 = json.loads(found.stdout)
                for name, f in lme4["fits"].items():
                    print(f"  lme4 {name + ' ML':21} {f['seconds']:8.3f} s  logLik {f['loglik']:.6f}"
                          f"  (ours - lme4 {fits[name].loglik - f['loglik']:+.2e})")
                print(f"  lme4 {lme4['selected'] + ' REML':21} {lme4['refit']['seconds']:8.3f} s  "
                      f"logLik {lme4['refit']['loglik']:.6f}  (ours - lme4 {refit.loglik - lme4['refit']['loglik']:+.2e})")
                print(f"  lme4 total {lme4['fit_seconds_total']:.3f} s; ours / lme4 = 1/{lme4['fit_seconds_total'] / total:.1f}")
    if len(sizes) > 1:
        print("\nfit stage ratios: " + ", ".join(
            f"{b:,}/{a:,} = {stage_by_size[b] / stage_by_size[a]:.2f}" for a, b in zip(sizes, sizes[1:])))


if __name__ == "__main__":
    main()
