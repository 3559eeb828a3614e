"""Benchmark the whole ``longitudinal run`` against lme4 on the same data, at 2,000 to 2,000,000 rows.

For each size it simulates a balanced study (``longitudinal.simulate``: 10 visits per subject, no dropout,
no bad rows), writes it as CSV into a temporary folder with a config holding the three candidates
(random intercept, correlated random intercept and slope, uncorrelated), runs ``longitudinal run`` as a
subprocess with its own ``PREFECT_HOME`` and measures its wall time and peak memory (the resident set
summed over the process tree, sampled every 0.1 s from /proc, and the largest single process from
``/usr/bin/time -v``). Per-stage and per-fit seconds come from the run's ``manifest.json``, the
log-likelihoods and the selection from ``model_comparison.csv``. Then ``Rscript benchmarks/lme4_fits.R``
fits the same formulas on the same CSV (ML for the candidates, REML for lme4's selected one). It also
times the bundled example (``config/example.yaml``) end to end, cold and warm Prefect home, and the
import time of the heavy libraries.

Writes ``benchmarks/results/results.csv`` (one row per size and stage or fit), ``summary.md`` (the goals of
issue 6, met or not) and ``scaling.png`` (time against rows, log-log). Rows of sizes not measured in this
invocation are kept from the previous results.csv (their ``measured_at`` tells them apart).

    .venv/bin/python -m benchmarks.pipeline              # all sizes (2M takes minutes, lme4 most)
    .venv/bin/python -m benchmarks.pipeline --quick      # 2,000 and 20,000 rows
    .venv/bin/python -m benchmarks.pipeline --sizes 200000 --no-example

Run from the repository's root (``-m`` finds ``benchmarks`` there). The modules, in the order they import:
``measure`` (one subprocess's time and memory, its environment, a snapshot of the code), ``reference``
(lme4 through ``lme4_fits.R``), ``study`` (one size: simulate, ``longitudinal run``, lme4, its rows),
``example`` (the bundled example and import times), ``results`` (results.csv), ``goals`` (issue 6's goals),
``summary`` (summary.md and scaling.png), ``__main__`` (the command line). The Prefect server of
``--server`` is ``flows.local_server``'s, the one the integration tests start.
"""
