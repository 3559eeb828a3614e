"""One unstructured MMRM fit, ours against glmmTMB on the same data, in one run (issue 13's speed goal).

Run: .venv/bin/python benchmarks/bench_covariance.py [--subjects 2000] [--visits 8] [--seed 13]
Simulates a two-arm trial with ``--visits`` visits, an unstructured covariance and monotone dropout,
fits ``y ~ visit * arm + us(visit | id)`` by ML with ``longitudinal.fit.covariance`` (grouping and fit
timed, best of 3) and with ``glmmTMB(y ~ visit * arm + us(visit + 0 | id), dispformula = ~0)`` in R on
the same CSV (timed inside R), and prints both times, their ratio and both log-likelihoods. Issue 13's
goal: ours ≤ 1/20 of glmmTMB's time. Needs R with glmmTMB (Debian: r-cran-glmmtmb); without R it
prints our time alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from longitudinal.fit.covariance import CovarianceStructure, fit_covariance, group_by_pattern

R_SCRIPT = r"""
suppressPackageStartupMessages(library(glmmTMB))
d <- read.csv(commandArgs(TRUE)[1]); d$visit <- factor(d$visit); d$arm <- factor(d$arm); d$id <- factor(d$id)
t <- system.time(m <- glmmTMB(y ~ visit * arm + us(visit + 0 | id), data = d, dispformula = ~0, REML = FALSE))
cat(jsonlite::toJSON(list(seconds = unname(t["elapsed"]), logLik = as.numeric(logLik(m))), digits = NA), "\n")
"""


def simulate(subjects: int, visits: int, seed: int) -> pd.DataFrame:
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


def design(data: pd.DataFrame, visits: int) -> np.ndarray:
    """visit * arm with treatment contrasts (visit 1 and arm A as references), as R's model.matrix."""
    visit = data["visit"].to_numpy()
    treated = (data["arm"].to_numpy() == "B").astype(float)
    dummies = np.stack([(visit == v).astype(float) for v in range(2, visits + 1)], axis=1)
    return np.column_stack([np.ones(len(data)), dummies, treated, dummies * treated[:, None]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2000)
    parser.add_argument("--visits", type=int, default=8)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    data = simulate(args.subjects, args.visits, args.seed)
    X = design(data, args.visits)
    structure = CovarianceStructure("us", args.visits)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        groups = group_by_pattern(data["y"].to_numpy(), X, data["id"].to_numpy(), data["visit"].to_numpy() - 1)
        fit = fit_covariance(groups, structure, reml=False)
        times.append(time.perf_counter() - began)
    ours = min(times)
    print(f"{len(data):,} rows, {args.subjects:,} subjects, {args.visits} visits, {groups_count(data)} visit patterns")
    print(f"ours     : {ours:7.3f} s  logLik {fit.loglik:.4f}  converged {fit.converged}")
    if shutil.which("Rscript") is None:
        print("glmmTMB  : not measured (no Rscript)")
        return
    with tempfile.TemporaryDirectory() as folder:
        csv = Path(folder) / "trial.csv"
        data.to_csv(csv, index=False)
        script = Path(folder) / "fit.R"
        script.write_text(R_SCRIPT)
        done = subprocess.run(["Rscript", str(script), str(csv)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"glmmTMB  : failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        return
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    seconds, loglik = float(theirs["seconds"][0]), float(theirs["logLik"][0])
    print(f"glmmTMB  : {seconds:7.3f} s  logLik {loglik:.4f}")
    print(f"ours / glmmTMB = 1/{seconds / ours:.0f}; ΔlogLik (ours − glmmTMB) = {fit.loglik - loglik:+.2e}")


def groups_count(data: pd.DataFrame) -> int:
    return int(data.groupby("id")["visit"].apply(tuple).nunique())


if __name__ == "__main__":
    main()
