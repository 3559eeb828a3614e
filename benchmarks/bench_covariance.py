"""Structured-covariance fits (``longitudinal.fit.covariance``) timed against their references, in one run.

Run: .venv/bin/python benchmarks/bench_covariance.py [--case us|ri-ar1|sp-exp|all] [--seed 13]

- ``us`` (issue 13's first speed goal): a two-arm trial with ``--visits`` visits (8), ``--subjects`` subjects
  (2,000), an unstructured covariance and monotone dropout; ``y ~ visit * arm + us(visit | id)`` by ML with
  our engine (grouping and fit timed, best of 3) and with ``glmmTMB(y ~ visit * arm + us(visit + 0 | id),
  dispformula = ~0)`` in R on the same CSV (timed inside R). Goal: ours ≤ 1/20 of glmmTMB's time. Needs R
  with glmmTMB (Debian: r-cran-glmmtmb); without R it prints our time alone.
- ``ri-ar1`` (the second goal): 23,000 subjects × 10 visits with dropout (about 200,000 rows), a random
  intercept and AR(1) noise; ``fit_candidate(frame, "ri_ar1", "y ~ t + (1 | id) + ar1(t | id)")`` by ML (the
  candidate as the pipeline fits it: design, grouping, fit with its alternative starts, predictions) against
  ``fit_candidate(frame, "ri", "y ~ t + (1 | id)")`` of the lme4-style engine on the same frame, best of 3
  each, alternating. Goal: within 3× of the random-intercept fit.
- ``sp-exp``: 20,000 subjects with 4 to 10 visits at irregular times (every subject its own visit pattern,
  so every subject its own V_i: the per-subject batches), ``y ~ t * arm + sp_exp(t | id)`` and with
  ``(1 | id)``, by ML, best of 3. Goal: seconds, not minutes.

Not a test; the machine's other load shows in every number: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from longitudinal.fit.candidate import fit_candidate
from longitudinal.fit.covariance import CovarianceFit, CovarianceStructure, fit_covariance, group_by_pattern

from timing import best_of

R_SCRIPT = r"""
suppressPackageStartupMessages(library(glmmTMB))
d <- read.csv(commandArgs(TRUE)[1]); d$visit <- factor(d$visit); d$arm <- factor(d$arm); d$id <- factor(d$id)
t <- system.time(m <- glmmTMB(y ~ visit * arm + us(visit + 0 | id), data = d, dispformula = ~0, REML = FALSE))
cat(jsonlite::toJSON(list(seconds = unname(t["elapsed"]), logLik = as.numeric(logLik(m))), digits = NA), "\n")
"""


def describe(fit: CovarianceFit) -> str:
    return (f"logLik {fit.loglik:.4f}  converged {fit.converged}  singular {fit.singular}  "
            f"{fit.evaluations} evaluations")


# ------------------------------------------------------------------------------- us against glmmTMB


def simulate_trial(subjects: int, visits: int, seed: int) -> pd.DataFrame:
    """Two arms, an unstructured covariance (SDs rising, correlation decaying with the lag), dropout."""
    rng = np.random.default_rng(seed)
    sd = np.linspace(4.0, 7.0, visits)
    lag = np.abs(np.subtract.outer(np.arange(visits), np.arange(visits)))
    cov = np.outer(sd, sd) * 0.8 ** lag
    arm = rng.integers(0, 2, subjects)
    mean = 50 - 0.8 * np.arange(visits)[None, :] - 1.5 * arm[:, None] * np.arange(visits)[None, :]
    y = mean + rng.multivariate_normal(np.zeros(visits), cov, size=subjects)
    last = np.minimum(visits, 2 + rng.geometric(0.12, subjects))  # at least two visits, then dropout
    rows = [(i, v + 1, "AB"[arm[i]], y[i, v]) for i in range(subjects) for v in range(last[i])]
    return pd.DataFrame(rows, columns=["id", "visit", "arm", "y"])


def trial_design(data: pd.DataFrame, visits: int) -> np.ndarray:
    """visit * arm with treatment contrasts (visit 1 and arm A as references), as R's model.matrix."""
    visit = data["visit"].to_numpy()
    treated = (data["arm"].to_numpy() == "B").astype(float)
    dummies = np.stack([(visit == v).astype(float) for v in range(2, visits + 1)], axis=1)
    return np.column_stack([np.ones(len(data)), dummies, treated, dummies * treated[:, None]])


def bench_unstructured(subjects: int, visits: int, seed: int) -> None:
    data = simulate_trial(subjects, visits, seed)
    X = trial_design(data, visits)
    structure = CovarianceStructure("us", visits)
    ours, fit = best_of(3, lambda: fit_covariance(
        group_by_pattern(data["y"].to_numpy(), X, data["id"].to_numpy(), data["visit"].to_numpy() - 1),
        structure, reml=False))
    patterns = int(data.groupby("id")["visit"].apply(tuple).nunique())
    print(f"us: {len(data):,} rows, {subjects:,} subjects, {visits} visits, {patterns} visit patterns")
    print(f"  ours     : {ours:7.3f} s  {describe(fit)}")
    if shutil.which("Rscript") is None:
        print("  glmmTMB  : not measured (no Rscript)")
        return
    with tempfile.TemporaryDirectory() as folder:
        csv = Path(folder) / "trial.csv"
        data.to_csv(csv, index=False)
        script = Path(folder) / "fit.R"
        script.write_text(R_SCRIPT)
        done = subprocess.run(["Rscript", str(script), str(csv)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        error = done.stderr.strip()
        print(f"  glmmTMB  : failed: {error.splitlines()[-1] if error else done.returncode}")
        return
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    seconds, loglik = float(theirs["seconds"][0]), float(theirs["logLik"][0])
    print(f"  glmmTMB  : {seconds:7.3f} s  logLik {loglik:.4f}")
    print(f"  ours / glmmTMB = 1/{seconds / ours:.0f} (goal: at most 1/20); "
          f"ΔlogLik (ours − glmmTMB) = {fit.loglik - loglik:+.2e}")


# ------------------------------------------------------------- (1 | id) + ar1 against the random intercept


def simulate_serial(subjects: int, visits: int, seed: int) -> pd.DataFrame:
    """A random intercept (SD 1.5), AR(1) noise (SD 2, ρ 0.6) over visits t = 0..visits−1, a slope 0.3;
    30% of the subjects drop out after visit 2..visits−1. Identifiers as text, as the pipeline types them."""
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(subjects), visits)
    visit = np.tile(np.arange(visits), subjects)
    noise = np.empty((subjects, visits))
    noise[:, 0] = rng.normal(size=subjects)
    for j in range(1, visits):
        noise[:, j] = 0.6 * noise[:, j - 1] + 0.8 * rng.normal(size=subjects)
    y = 10.0 + 0.3 * visit + rng.normal(0.0, 1.5, subjects)[subject] + 2.0 * noise.ravel()
    last = np.where(rng.random(subjects) < 0.3, rng.integers(2, visits, subjects), visits)
    keep = visit < last[subject]
    frame = pd.DataFrame({"id": subject.astype(str), "t": visit.astype(float), "y": y})
    return frame[keep].reset_index(drop=True)


def bench_serial(seed: int) -> None:
    visits = 10
    subjects = 23_000  # about 200,000 rows
    frame = simulate_serial(subjects, visits, seed)
    ri_times, ar1_times = [], []
    for _ in range(3):  # alternating, so that the machine's load falls on both
        seconds, ri = best_of(1, lambda: fit_candidate(frame, "ri", "y ~ t + (1 | id)"))
        ri_times.append(seconds)
        seconds, ar1 = best_of(1, lambda: fit_candidate(frame, "ri_ar1", "y ~ t + (1 | id) + ar1(t | id)"))
        ar1_times.append(seconds)
    ri_seconds, ar1_seconds = min(ri_times), min(ar1_times)
    print(f"ri-ar1: {len(frame):,} rows, {subjects:,} subjects, {visits} visits with dropout, ML (both by fit_candidate)")
    print(f"  (1 | id), lme4-style engine    : {ri_seconds:7.3f} s  logLik {ri.loglik:.4f}  converged {ri.converged}")
    parameters = dict(ar1.covariance.parameters) if ar1.covariance is not None else {}
    print(f"  (1 | id) + ar1(t | id)         : {ar1_seconds:7.3f} s  logLik {ar1.loglik:.4f}  converged {ar1.converged}")
    print(f"  ratio {ar1_seconds / ri_seconds:.2f} (goal: within 3); "
          f"ΔlogLik (ar1 − ri) = {ar1.loglik - ri.loglik:+.2f}, "
          f"σ {parameters.get('sigma', math.nan):.3f}, ρ {parameters.get('rho', math.nan):.3f}, "
          f"random-intercept SD {ar1.random_effects[0].sd:.3f} (simulated: 2, 0.6, 1.5)")


# --------------------------------------------------------------------- sp_exp with irregular times


def simulate_irregular(subjects: int, seed: int) -> pd.DataFrame:
    """4 to 10 visits per subject at uniform times in (0, 12), two arms, a random intercept (SD 2) and a
    continuous-time exponential process (SD 2, range 2)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(4, 11, subjects)
    subject = np.repeat(np.arange(subjects), sizes)
    t = np.concatenate([np.sort(rng.uniform(0.0, 12.0, k)) for k in sizes])
    process = np.empty(t.size)
    start = 0
    for k in sizes:  # simulating, not fitting: a loop over subjects is fine here
        times = t[start:start + k]
        process[start:start + k] = np.linalg.cholesky(
            4.0 * np.exp(-np.abs(times[:, None] - times[None, :]) / 2.0)) @ rng.normal(size=k)
        start += k
    arm = rng.integers(0, 2, subjects)[subject]
    y = 50.0 + 1.2 * t - 0.5 * t * arm + rng.normal(0.0, 2.0, subjects)[subject] + process
    return pd.DataFrame({"id": subject.astype(str), "arm": arm, "t": t, "y": y})


def bench_irregular(seed: int) -> None:
    frame = simulate_irregular(20_000, seed)
    t, arm = frame["t"].to_numpy(), frame["arm"].to_numpy(float)
    X = np.column_stack([np.ones(len(frame)), t, arm, t * arm])
    structure = CovarianceStructure("sp_exp", 0)
    print(f"sp-exp: {len(frame):,} rows, 20,000 subjects with 4-10 visits at irregular times, ML")
    for label, Z in (("sp_exp(t | id)           ", None), ("(1 | id) + sp_exp(t | id)", np.ones((len(frame), 1)))):
        groups = group_by_pattern(frame["y"].to_numpy(), X, frame["id"].to_numpy(), t, Z)
        seconds, fit = best_of(3, lambda: fit_covariance(
            group_by_pattern(frame["y"].to_numpy(), X, frame["id"].to_numpy(), t, Z), structure, reml=False))
        print(f"  {label}: {seconds:7.3f} s  {describe(fit)}  ({groups.n_visit_patterns:,} visit patterns: "
              f"{len(groups.patterns)} shared, {len(groups.batches)} batches)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("us", "ri-ar1", "sp-exp", "all"), default="all")
    parser.add_argument("--subjects", type=int, default=2000, help="us: subjects")
    parser.add_argument("--visits", type=int, default=8, help="us: visits")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    if args.case in ("ri-ar1", "all"):
        bench_serial(args.seed)
    if args.case in ("sp-exp", "all"):
        bench_irregular(args.seed)
    if args.case in ("us", "all"):
        bench_unstructured(args.subjects, args.visits, args.seed)


if __name__ == "__main__":
    main()
