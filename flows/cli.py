"""The ``longitudinal`` command line: run, validate, simulate.

Exit codes: 0 success (the last line of standard output is the folder written), 1 when the pipeline
fails on the data, 2 on a usage or config error. A failure prints one line on stderr; ``--debug``
shows the traceback too. Prefect is imported only by ``run``, so ``validate`` and ``simulate`` start fast.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from longitudinal.errors import ConfigError, LongitudinalError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage line already
        return int(exc.code or 0)
    try:
        return int(args.handler(args))
    except LongitudinalError as exc:
        if args.debug:
            raise
        print(f"longitudinal {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"longitudinal {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with the way to see the traceback
        if args.debug:
            raise
        print(
            f"longitudinal {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(run again with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longitudinal",
        description="Ingest, validate, fit candidate linear mixed models, select by AIC/BIC and report.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the whole pipeline (a Prefect flow) for one study")
    run.add_argument("--config", required=True, type=Path, help="the study's YAML config")
    run.add_argument("--criterion", choices=["aic", "bic"], help="override models.criterion")
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="ingest and validate only (no fits)")
    validate.add_argument("--config", required=True, type=Path, help="the study's YAML config")
    validate.set_defaults(handler=_validate)

    simulate = commands.add_parser("simulate", help="write a synthetic two-arm longitudinal trial")
    simulate.add_argument("--out", required=True, type=Path, help="output file (.csv or .parquet)")
    simulate.add_argument("--subjects", type=int, default=300)
    simulate.add_argument("--min-visits", type=int, default=4)
    simulate.add_argument("--max-visits", type=int, default=8)
    simulate.add_argument("--seed", type=int, default=20240601)
    simulate.add_argument("--bad-rows", type=int, default=0, help="deliberately bad rows to inject")
    simulate.set_defaults(handler=_simulate)

    for sub in (run, validate, simulate):
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _run(args: argparse.Namespace) -> int:
    from longitudinal.config import load_config

    load_config(args.config)  # a config error exits 2 before Prefect's start-up cost
    _quiet_prefect(debug=args.debug)
    from flows.study_pipeline import study_pipeline

    _strip_prefect_tracebacks(debug=args.debug)
    # Prefect stops its embedded server at exit and logs that to stdout; registered before the flow
    # starts that server, this handler runs after it, so the run folder stays the last line.
    closing: list[str] = []
    atexit.register(lambda: print(*closing, sep="\n", flush=True) if closing else None)
    run_dir = study_pipeline(config_path=str(args.config.resolve()), criterion=args.criterion)
    closing += [f"report: {Path(run_dir) / 'report.html'}", str(run_dir)]
    return 0


def _validate(args: argparse.Namespace) -> int:
    from longitudinal.config import load_config
    from longitudinal.formula import candidate_covariates, check_columns, check_same_response, parse_candidates
    from longitudinal.ingest import read_sources
    from longitudinal.outputs import new_run_id, write_json, write_quarantine
    from longitudinal.records import SOURCE_COLUMNS
    from longitudinal.validation import ensure_valid, validate_visits, validation_summary

    config = load_config(args.config)
    formulas = parse_candidates(config.models.candidates)
    check_same_response(formulas, config.data.outcome)
    ingested = read_sources(config)
    roles = {config.data.subject, config.data.time, config.data.outcome}
    check_columns(formulas, {c for c in ingested.raw.columns if c not in SOURCE_COLUMNS} | roles)
    validated = validate_visits(ingested, config, candidate_covariates(formulas, roles))
    folder = config.output_dir / "validations" / new_run_id()
    folder.mkdir(parents=True)
    write_json(validation_summary(validated), folder / "validation.json")
    write_quarantine(validated, folder)
    print(
        f"{validated.rows_read} rows read = {validated.rows_analysed} analysed + "
        f"{validated.rows_quarantined} quarantined"
    )
    ensure_valid(validated, config)
    print(folder)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

    if args.out.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"--out {str(args.out)!r}: the file name must end in .csv or .parquet")
    if args.subjects < 1 or args.min_visits < 1 or args.max_visits < args.min_visits:
        raise ConfigError("--subjects and --min-visits must be at least 1 and --max-visits at least --min-visits")
    spec = SimulationSpec(
        n_subjects=args.subjects, min_visits=args.min_visits, max_visits=args.max_visits,
        seed=args.seed, n_bad_rows=args.bad_rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_table(simulate_trial(spec), args.out)
    print(args.out)
    return 0


def _quiet_prefect(*, debug: bool) -> None:
    """Prefect's console logs go to stdout, so stderr carries only our one-line error."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM", "ext://sys.stdout")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if debug:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "DEBUG")


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def _strip_prefect_tracebacks(*, debug: bool) -> None:
    """Prefect logs each failed task with its traceback; without --debug the console shows the message only."""
    if debug:
        return
    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        handler.addFilter(_NoTraceback())


if __name__ == "__main__":
    sys.exit(main())
