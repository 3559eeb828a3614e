"""The command line of the pipeline benchmark: ``python -m benchmarks.pipeline [options]`` (see the package's
docstring and benchmarks/README.md)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from benchmarks.pipeline import __doc__ as DESCRIPTION
from benchmarks.pipeline.example import measure_example
from benchmarks.pipeline.measure import ROOT, code_dir, export_snapshot, find_time_tool, prefect_env
from benchmarks.pipeline.reference import find_lme4
from benchmarks.pipeline.results import cell, read_previous, write_results_csv
from benchmarks.pipeline.study import VISITS_PER_SUBJECT, measure_size, result_rows
from benchmarks.pipeline.summary import write_plot, write_summary
from flows.local_server import PrefectServer, start_prefect_server

RESULTS_DIR = ROOT / "benchmarks" / "results"
SIZES: tuple[int, ...] = (2_000, 20_000, 200_000, 2_000_000)
QUICK_SIZES: tuple[int, ...] = (2_000, 20_000)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``2000,20000`` or ``2k,200k,2M`` into row counts."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        number = part[:-1] if scale > 1 else part
        try:
            sizes.append(int(float(number) * scale))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes: {part!r} is not a row count (e.g. 2000,200k,2M)") from None
    if any(s < VISITS_PER_SUBJECT for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes: every size must be at least {VISITS_PER_SUBJECT} rows")
    return tuple(sizes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(DESCRIPTION or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=SIZES, help="row counts, e.g. 2000,20000,200k,2M")
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 rows only")
    parser.add_argument("--no-lme4", action="store_true", help="skip the lme4 comparison")
    parser.add_argument("--no-example", action="store_true", help="skip the bundled example and import times")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install R/lme4 or GNU time")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, run folders, logs)")
    parser.add_argument("--server", action="store_true", help="run against a Prefect server started once for the "
                        "benchmark (as `longitudinal serve` runs), instead of Prefect's embedded server per run")
    parser.add_argument("--snapshot", metavar="REV", help="measure the committed tree at REV (e.g. HEAD) instead "
                        "of the working tree (git archive into the temporary folder)")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else args.sizes
    args.out.mkdir(parents=True, exist_ok=True)

    notes: list[str] = []
    time_tool = find_time_tool(install=not args.no_install)
    if time_tool is None:
        notes.append("GNU time not available: peak process MB is ru_maxrss of children (an upper bound).")
    lme4_problem = "skipped (--no-lme4)" if args.no_lme4 else find_lme4(install=not args.no_install)
    if lme4_problem:
        notes.append(f"lme4 comparison skipped: {lme4_problem}.")

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    workdir = Path(tempfile.mkdtemp(prefix="longitudinal-bench-"))
    print(f"benchmark folder: {workdir}", flush=True)
    example = None
    server: PrefectServer | None = None
    try:
        source = None
        if args.snapshot:
            source = export_snapshot(args.snapshot, workdir / "source")
            sys.path.insert(0, str(source))  # the simulator too comes from the snapshot
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.snapshot],
                                    capture_output=True, text=True, check=False).stdout.strip()
            notes.append(f"Measured the committed tree at {args.snapshot} ({commit}), not the working tree.")
        probe_env = prefect_env(workdir / "probe", source)
        probe = subprocess.run(
            [sys.executable, "-c", "import longitudinal, flows.cli; print(longitudinal.__file__)"], env=probe_env,
            cwd=code_dir(probe_env), capture_output=True, text=True, check=False,
        )
        notes.append(f"Code measured: {probe.stdout.strip() or probe.stderr.strip()[-200:]}.")
        if not args.no_example:
            print("bundled example and fixed costs:", flush=True)
            example = measure_example(workdir, time_tool=time_tool, source=source)
        env = prefect_env(workdir / "prefect-home", source)
        if args.server:
            server = start_prefect_server(env, log=workdir / "server.log", ui=False, seconds=120.0)
            env["PREFECT_API_URL"] = server.api_url
            notes.append("Runs against a Prefect server started once for the benchmark (PREFECT_API_URL), "
                         "as scheduled and triggered runs are: no embedded server start-up per run.")
        if sizes:
            # Create the Prefect database once so that every size pays the warm start-up, as a scheduled
            # pipeline does; the cold start-up is in the example's numbers.
            print("warming the Prefect home with the smallest size (not recorded) ...", flush=True)
            measure_size(min(sizes), workdir / "warmup", env=env, time_tool=time_tool, lme4_problem="warm-up",
                         measured_at=started)
        measured = []
        csv_path = args.out / "results.csv"
        previous = [r for r in read_previous(csv_path) if int(r["rows"]) not in sizes]
        for size in sizes:
            print(f"{size:,} rows:", flush=True)
            result = measure_size(size, workdir, env=env, time_tool=time_tool, lme4_problem=lme4_problem,
                                  measured_at=started)
            if result.pipeline.error:
                notes.append(f"{size:,} rows: the pipeline failed: {result.pipeline.error[:300]}")
            if result.lme4_note and result.lme4_note != lme4_problem:
                notes.append(f"{size:,} rows: {result.lme4_note}")
            if result.pipeline.rows_analysed is not None and result.pipeline.rows_analysed != size:
                notes.append(f"{size:,} rows: the pipeline analysed {result.pipeline.rows_analysed:,} rows, "
                             "lme4 all of them: the comparison is not like for like.")
            measured += result_rows(result)
            # Rewrite after every size: a long run interrupted later still leaves its numbers.
            rows = sorted(previous + [{k: cell(v) for k, v in r.items()} for r in measured],
                          key=lambda r: int(r["rows"]))
            write_results_csv(rows, csv_path)
            write_summary(rows, example, notes, args.out / "summary.md")
            write_plot(rows, args.out / "scaling.png")
        if not sizes:
            rows = read_previous(csv_path)
            write_summary(rows, example, notes, args.out / "summary.md")
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'summary.md'}, {args.out / 'scaling.png'}", flush=True)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
