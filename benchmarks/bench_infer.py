"""Where the infer stage's time goes (issue 17): ``report_inference`` on the selected model of a big study, piece by
piece, in process and without Prefect.

The study is ``make bench``'s balanced design (rows/10 subjects × 10 visits, ``longitudinal.simulate``, seed
20240601, no dropout) or, with ``--design unbalanced``, ``bench_fit_stage.py``'s (3-12 visits at irregular
times: every subject its own visit pattern). The selected model is fitted once by REML, ``score ~ week * arm +
age + (week | patient_id)`` (timed once, ``REML fit``: for scale, one of the fit stage's four fits), then each
piece of the infer stage is timed (least of ``--repeats``):

- ``ddf``: ``fixed_effect_inference`` with Satterthwaite's df (lmerTest's);
- ``profile``: ``profile_intervals`` of the REML criterion (what ``report_inference`` asks for a REML fit), with
  its inner minimizations and criterion evaluations counted;
- ``marginal``: ``estimate_means`` for the example's ``estimates`` (means per arm at weeks 0, 3, 7);
- ``variance``: ``explained_variance`` (ICC, R²);
- ``report_inference``: the whole stage, as the flow runs it.

``--cpu`` times this process's CPU time instead of wall time (steadier when other jobs share the cores). OpenBLAS
gets one thread, as in the pipeline (``--blas-threads N`` sets another count). ``--baseline REV`` measures the
same in a second process on ``git archive REV`` (through ``PYTHONPATH``; git state is not touched) and prints
both side by side.

Not a test: ``.venv/bin/python benchmarks/bench_infer.py [--sizes 200k,2M] [--design unbalanced] [--cpu]
[--baseline HEAD]``. 2M rows need about 2 GB and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import best_of, snapshot

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240601
VISITS = 10
FORMULA = "score ~ week * arm + age + (week | patient_id)"
PIECES = ("REML fit", "ddf", "profile", "marginal", "variance", "report_inference")


def rows_of(size: str) -> int:
    return int(float(size[:-1]) * (1e3 if size[-1] == "k" else 1e6)) if size[-1] in "kM" else int(size)


def simulate(rows: int, design: str):  # -> pd.DataFrame
    """The study of about ``rows`` rows: balanced (``make bench``'s) or unbalanced (``bench_fit_stage.py``'s)."""
    if design == "unbalanced":
        from bench_fit_stage import simulate_unbalanced

        return simulate_unbalanced(rows)
    from longitudinal.simulate import SimulationSpec, simulate_trial

    spec = SimulationSpec(n_subjects=rows // VISITS, min_visits=VISITS, max_visits=VISITS, dropout_probability=0.0,
                          seed=SEED)
    return simulate_trial(spec)


def measure(size: str, design: str, repeats: int) -> dict[str, float]:
    """Seconds per piece of the infer stage at ``size`` rows, and the profile's inner minimizations and
    criterion evaluations (``minimizations``, ``evaluations``, from one call)."""
    from longitudinal.config import EstimatesConfig, load_config
    from longitudinal.fit.candidate import fit_candidate
    from longitudinal.inference import profile as profile_module
    from longitudinal.inference.ddf import fixed_effect_inference
    from longitudinal.inference.marginal import estimate_means
    from longitudinal.inference.reported import report_inference
    from longitudinal.inference.variance import explained_variance

    visits = simulate(rows_of(size), design).dropna()
    began = time.perf_counter()
    fit = fit_candidate(visits, "ris", FORMULA, method="REML")
    fitting = time.perf_counter() - began
    config = load_config(ROOT / "config" / "example.yaml")
    estimates = config.estimates
    assert isinstance(estimates, EstimatesConfig)
    result: dict[str, float] = {"rows": float(len(visits)), "subjects": float(visits["patient_id"].nunique()),
                                "REML fit": fitting}

    seconds, inference = best_of(repeats, lambda: fixed_effect_inference(fit, visits, "satterthwaite"))
    result["ddf"] = seconds
    counts = {"minimizations": 0, "evaluations": 0}
    minimize = profile_module._minimize

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = minimize(*args, **kwargs)
        counts["minimizations"] += 1
        counts["evaluations"] += int(found.nfev)
        return found

    profile_module._minimize = counted
    try:
        profile_module.profile_intervals(fit, visits, reml=True)
    finally:
        profile_module._minimize = minimize
    result.update({k: float(v) for k, v in counts.items()})
    result["profile"] = best_of(repeats, lambda: profile_module.profile_intervals(fit, visits, reml=True))[0]
    result["marginal"] = best_of(repeats, lambda: estimate_means(fit, visits, estimates, inference))[0]
    result["variance"] = best_of(repeats, lambda: explained_variance(fit, visits))[0]
    result["report_inference"] = best_of(repeats, lambda: report_inference(fit, visits, config))[0]
    return result


def measure_in(tree: Path, sizes: list[str], design: str, repeats: int, cpu: bool) -> dict[str, dict[str, float]]:
    """:func:`measure` in a fresh interpreter whose ``longitudinal`` is the one in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--json", "--repeats", str(repeats),
               "--sizes", ",".join(sizes), "--design", design, *(["--cpu"] if cpu else [])]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None,
                rev: str | None, clock: str) -> None:
    for size, result in results.items():
        before = (baseline or {}).get(size)
        print(f"\n### {size}: {int(result['rows']):,} rows, {int(result['subjects']):,} subjects ({clock})\n")
        print("| piece | seconds |" if before is None else f"| piece | {rev} | working tree | ratio |")
        print("|---|---|" if before is None else "|---|---|---|---|")
        for item in (*PIECES, "minimizations", "evaluations"):
            fmt = "{:,.0f}" if item in ("minimizations", "evaluations") else "{:,.3f}"
            now = result.get(item, float("nan"))
            if before is None:
                print(f"| {item} | {fmt.format(now)} |")
                continue
            then = before.get(item, float("nan"))
            print(f"| {item} | {fmt.format(then)} | {fmt.format(now)} | {now / then if then else float('nan'):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200k", help="comma-separated row counts: 20k, 200k, 2M")
    parser.add_argument("--design", choices=("balanced", "unbalanced"), default="balanced")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per piece")
    parser.add_argument("--cpu", action="store_true", help="process CPU time instead of wall time")
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--baseline", metavar="REV", help="also measure git archive REV, side by side")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    # before numpy loads OpenBLAS, in this process and in --baseline's
    os.environ["OPENBLAS_NUM_THREADS"] = str(options.blas_threads)
    if options.cpu:
        time.perf_counter = time.process_time  # type: ignore[assignment]  # timing.best_of's clock
    sizes = [s.strip() for s in options.sizes.split(",") if s.strip()]
    if options.json:
        print(json.dumps({size: measure(size, options.design, options.repeats) for size in sizes}))
        return
    baseline = None
    if options.baseline:
        with tempfile.TemporaryDirectory(prefix="bench-infer-") as scratch:
            baseline = measure_in(snapshot(options.baseline, Path(scratch)), sizes, options.design, options.repeats,
                                  options.cpu)
    results = {size: measure(size, options.design, options.repeats) for size in sizes}
    print_table(results, baseline, options.baseline, "CPU seconds" if options.cpu else "wall seconds")


if __name__ == "__main__":
    main()
