"""Benchmark the whole ``longitudinal run`` against lme4 on the same data, and issue 17's goals, in one run.

Studies: ``balanced`` (the library's simulator, 10 weekly visits per subject, no dropout, no bad rows) at 2,000
to 2,000,000 rows and ``unbalanced`` (``unbalanced.py``: 3-12 visits per subject at irregular weeks, every
subject its own visit pattern) at 200,000 and 2,000,000 rows. Each is written as CSV with a config holding
the three candidates (random intercept, correlated random intercept and slope, uncorrelated); ``longitudinal
run`` runs as a new process with its own ``PREFECT_HOME`` and is measured: wall time, peak memory (the
proportional set summed over its processes, sampled every 0.1 s from /proc: the command's tree and, when
``longitudinal run`` works in a background daemon of the Prefect home, the processes the daemon forks for the
run), per-stage and per-fit seconds from the run's ``manifest.json``, log-likelihoods and the selection.
Then ``Rscript benchmarks/lme4_fits.R`` fits the same formulas on the same CSV (ML for the candidates, REML
for lme4's selected one).

Once per invocation: the bundled example (``config/example.yaml``) run first in a new Prefect home, then
again with a candidate changed each time (its fit not cached), ``longitudinal validate`` and the import time
of the heavy libraries; and the example under ``longitudinal serve`` with a landing folder, timed from a
file's arrival to its published report. Whatever background server the benchmark's runs start is stopped
at the end (``longitudinal server stop``), also on errors.

Writes ``benchmarks/results/results.csv`` (one row per design, size and stage or fit; the example's and
serve's rows), ``summary.md`` (issue 17's goals, met or not, and the tables), ``scaling.png`` (time against
rows, log-log, both designs, ours and lme4's) and ``readme_performance.md`` (a draft of the README's
Performance section). Rows of studies not measured in this invocation are kept from the previous
results.csv (their ``measured_at`` tells them apart).

    .venv/bin/python -m benchmarks.pipeline              # everything (lme4 at 2M takes minutes)
    .venv/bin/python -m benchmarks.pipeline --quick      # 2,000 and 20,000 rows, both designs
    .venv/bin/python -m benchmarks.pipeline --designs unbalanced --sizes 200k --no-example --no-serve

Run from the repository's root (``-m`` finds ``benchmarks`` there). The modules, in the order they import:
``measure`` (one subprocess's time and memory, the background daemon, its environment, a snapshot of the
code), ``reference`` (lme4 through ``lme4_fits.R``), ``unbalanced`` (the unbalanced study), ``study`` (one
design and size: simulate, ``longitudinal run``, lme4, its rows), ``example`` (the bundled example and import
times), ``serve`` (the example under ``longitudinal serve``), ``results`` (results.csv), ``goals`` (issue
17's goals), ``summary`` (summary.md, scaling.png, the README draft), ``__main__`` (the command line). The
Prefect servers of ``--server`` and of the serve measure are ``flows.local_server``'s, the ones the
integration tests start.
"""
