"""Binary GLMM fits (``longitudinal.fit.glmm`` through ``fit_candidate``) timed against glmer, in one run.

Run: .venv/bin/python benchmarks/bench_glmm.py [--case goal|distinct|all] [--subjects 20000] [--visits 5]
                                               [--seed 14] [--repeats 3] [--no-r]

``goal``, issue 14's speed goal: a two-arm trial of ``--subjects`` subjects (20,000) × ``--visits`` visits (5), a binary
outcome with a correlated random intercept and slope on the logit scale (100,000 rows); the candidates
``ri`` = ``y ~ t * arm + (1 | id)`` and ``ris`` = ``y ~ t * arm + (t | id)``, binomial, Laplace (nAGQ = 1).
Ours: ``fit_candidate(frame, name, formula, family="binomial")`` (the candidate as the pipeline fits it: design,
fit, Wald table, predictions), best of ``--repeats``. glmer: the same two formulas with default
``glmerControl()`` in R on the same CSV, each timed inside R with ``system.time`` (reading the CSV is not
counted), once. Goal: our two fits together ≤ 1/10 of glmer's two, logLik within 0.05 of glmer's or better.

``distinct``: the same trial with a continuous baseline covariate ``x`` (standard normal per subject, log-odds
ratio 0.5) in both candidates' fixed effects (``y ~ t * arm + x + ...``). In ``goal`` every subject has 5 binary outcomes, an arm
and the same visits, so the 20,000 subjects are at most 2 × 2⁵ = 64 distinct ones (same rows of X, Z and y),
and the engine fits each distinct subject once, weighted by its count (exact); with ``x`` every subject is
distinct and the engine does the per-subject work for all 20,000.

glmer's default penalized IRLS tolerance (tolPwrss = 1e-7) reports a logLik a little below the Laplace
approximation at its own estimates (tests/reference/make_reference_glmm.R measures up to 4.5e-3 on 1,500 rows);
the R side therefore also evaluates its deviance function at tolPwrss = 1e-12 (outside the timing) at glmer's
estimates and at ours: the first says how far glmer's optimum is from ours on one scale, the second whether our
logLik is glmer's Laplace approximation at our estimates (it sits a little below ours, by 1e-5 to 2e-4 here:
glmer's Laplace deviance, even at that tolerance, is below the approximation written out group by group, which
our logLik equals to 1e-11 on the three reference fits checked that way). Needs R with lme4 and jsonlite (Debian: r-cran-lme4
r-cran-jsonlite); without Rscript, or with ``--no-r``, it prints our times alone.

Not a test; the machine's other load shows in every number: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from longitudinal.fit.candidate import fit_candidate
from longitudinal.records import Fit

from timing import best_of

CASES = {
    "goal": {"ri": "y ~ t * arm + (1 | id)", "ris": "y ~ t * arm + (t | id)"},
    "distinct": {"ri": "y ~ t * arm + x + (1 | id)", "ris": "y ~ t * arm + x + (t | id)"},
}

R_SCRIPT = r"""
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(TRUE)
d <- read.csv(args[1], stringsAsFactors = FALSE); d$id <- factor(d$id); d$arm <- factor(d$arm)
ours <- jsonlite::fromJSON(args[2], simplifyVector = FALSE)
fits <- lapply(ours, function(o) {
  said <- character()
  keep <- function(condition) said <<- c(said, trimws(conditionMessage(condition)))
  t <- system.time(m <- withCallingHandlers(glmer(as.formula(o$formula), data = d, family = binomial),
    warning = function(w) { keep(w); invokeRestart("muffleWarning") },
    message = function(m) { keep(m); invokeRestart("muffleMessage") }))
  deviance <- suppressWarnings(glmer(as.formula(o$formula), data = d, family = binomial,
                                     control = glmerControl(tolPwrss = 1e-12), devFunOnly = TRUE))
  beta <- unlist(o$beta)[names(fixef(m))]
  list(formula = o$formula, seconds = unname(t[["elapsed"]]), logLik = as.numeric(logLik(m)),
       checked_logLik = -deviance(c(unname(getME(m, "theta")), unname(fixef(m)))) / 2,
       ours_checked_logLik = -deviance(c(unlist(o$theta), unname(beta))) / 2, messages = I(said))
})
cat(jsonlite::toJSON(fits, auto_unbox = TRUE, digits = NA), "\n")
"""


def simulate_binary_trial(subjects: int, visits: int, seed: int, x_effect: float) -> pd.DataFrame:
    """Two arms, visits t = 0..visits−1, logit P(y = 1) = −0.4 + 0.25 t + 0.1 arm − 0.45 t·arm + x_effect · x + b₀ +
    b₁ t with x a standard normal baseline covariate, SD(b₀) = 1.3, SD(b₁) = 0.35, corr −0.3 (make_reference_glmm.R's
    simulated trial, larger). Identifiers and arms as text, as the pipeline types them."""
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(subjects), visits)
    t = np.tile(np.arange(visits, dtype=float), subjects)
    treated = (np.arange(subjects) % 2 == 1)[subject]
    z1, z2, x = rng.normal(size=subjects), rng.normal(size=subjects), rng.normal(size=subjects)
    intercept = 1.3 * z1
    slope = 0.35 * (-0.3 * z1 + np.sqrt(1 - 0.3**2) * z2)
    eta = (-0.4 + 0.25 * t + 0.1 * treated - 0.45 * t * treated + x_effect * x[subject]
           + intercept[subject] + slope[subject] * t)
    y = (rng.random(t.size) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return pd.DataFrame({
        "id": np.char.add("s", subject.astype(str)), "arm": np.where(treated, "treatment", "control"), "t": t,
        "x": x[subject], "y": y,
    })


def theta_of(fit: Fit) -> list[float]:
    """lme4's θ of a one-factor fit: the lower Cholesky factor of the random-effect covariance, column by column
    ((1 | id): the SD; (t | id): L₁₁, L₂₁, L₂₂), a zero pivot (a singular fit) giving a zero column."""
    terms = [component.term for component in fit.random_effects]
    sds = np.array([component.sd for component in fit.random_effects])
    corr = np.eye(len(sds))
    for c in fit.correlations:
        i, j = terms.index(c.term1), terms.index(c.term2)
        corr[i, j] = corr[j, i] = c.corr
    cov = np.outer(sds, sds) * corr
    lower = np.zeros_like(cov)
    for j in range(len(sds)):
        pivot = cov[j, j] - lower[j, :j] @ lower[j, :j]
        lower[j, j] = np.sqrt(max(pivot, 0.0))
        for i in range(j + 1, len(sds)):
            lower[i, j] = (cov[i, j] - lower[i, :j] @ lower[j, :j]) / lower[j, j] if lower[j, j] > 0 else 0.0
    return [float(lower[i, j]) for j in range(len(sds)) for i in range(j, len(sds))]


def describe(fit: Fit) -> str:
    return (f"logLik {fit.loglik:.4f}  converged {fit.converged}  singular {fit.singular}  "
            f"{fit.iterations} iterations{'  [' + fit.message + ']' if fit.message else ''}")


def run_glmer(frame: pd.DataFrame, ours: dict[str, Fit]) -> list[dict[str, Any]] | str:
    """glmer's fits of the formulas of ``ours`` on ``frame`` (written as CSV), with glmer's deviance at
    tolPwrss = 1e-12 evaluated at its estimates and at ours; or why they could not be measured."""
    if shutil.which("Rscript") is None:
        return "not measured (no Rscript)"
    with tempfile.TemporaryDirectory() as folder:
        csv = Path(folder) / "trial.csv"
        frame.to_csv(csv, index=False)
        estimates = Path(folder) / "ours.json"
        estimates.write_text(json.dumps([
            {"formula": fit.formula, "theta": theta_of(fit),
             "beta": {effect.term: effect.estimate for effect in fit.fixed_effects}}
            for fit in ours.values()
        ]))
        script = Path(folder) / "fit.R"
        script.write_text(R_SCRIPT)
        done = subprocess.run(["Rscript", str(script), str(csv), str(estimates)],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        error = done.stderr.strip()
        return f"failed: {error.splitlines()[-1] if error else done.returncode}"
    fits: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return fits


def distinct_subjects(frame: pd.DataFrame, columns: list[str]) -> int:
    """How many subjects differ in ``columns`` (the rows in visit order): what the engine fits separately."""
    keys = frame.sort_values(["id", "t"]).groupby("id", sort=False)[columns].agg(tuple)
    return len(keys.drop_duplicates())


def bench_case(case: str, frame: pd.DataFrame, repeats: int, with_r: bool) -> None:
    candidates = CASES[case]
    columns = ["arm", "t", "y"] + (["x"] if case == "distinct" else [])
    print(f"{case}: {len(frame):,} rows, {frame['id'].nunique():,} subjects "
          f"({distinct_subjects(frame, columns):,} distinct), {frame['y'].mean():.3f} ones; binomial, Laplace")
    ours: dict[str, tuple[float, Fit]] = {}
    for name, formula in candidates.items():
        ours[name] = best_of(repeats, partial(fit_candidate, frame, name, formula, family="binomial"))
        print(f"  ours  {name:4s} {formula:30s}: {ours[name][0]:7.3f} s  {describe(ours[name][1])}")
    glmer = run_glmer(frame, {name: fit for name, (_, fit) in ours.items()}) if with_r else "not measured (--no-r)"
    if isinstance(glmer, str):
        print(f"  glmer: {glmer}")
        return
    for name, theirs in zip(candidates, glmer):
        said = "  [" + " | ".join(theirs["messages"]) + "]" if theirs["messages"] else ""
        fit = ours[name][1]
        print(f"  glmer {name:4s} {theirs['formula']:30s}: {theirs['seconds']:7.3f} s  logLik {theirs['logLik']:.4f}"
              f" (at tolPwrss 1e-12: {theirs['checked_logLik']:.4f}){said}")
        print(f"        ΔlogLik (ours − glmer) = {fit.loglik - theirs['logLik']:+.2e} (goal: ≥ −0.05); ours − glmer's "
              f"estimates at tolPwrss 1e-12 = {fit.loglik - theirs['checked_logLik']:+.2e}; glmer's deviance at our "
              f"estimates − our logLik = {theirs['ours_checked_logLik'] - fit.loglik:+.1e}")
    ours_total = sum(seconds for seconds, _ in ours.values())
    glmer_total = sum(float(theirs["seconds"]) for theirs in glmer)
    print(f"  both fits: ours {ours_total:.3f} s, glmer {glmer_total:.3f} s: "
          f"ours / glmer = 1/{glmer_total / ours_total:.1f} (goal: at most 1/10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=(*CASES, "all"), default="all")
    parser.add_argument("--subjects", type=int, default=20_000)
    parser.add_argument("--visits", type=int, default=5)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=3, help="our fits: best of this many")
    parser.add_argument("--no-r", action="store_true", help="skip glmer")
    args = parser.parse_args()
    for case in CASES if args.case == "all" else (args.case,):
        frame = simulate_binary_trial(args.subjects, args.visits, args.seed, x_effect=0.5 if case == "distinct" else 0.0)
        bench_case(case, frame, args.repeats, not args.no_r)


if __name__ == "__main__":
    main()
