"""The ``longitudinal`` command line: run, validate, serve, repair, simulate.

Exit codes: 0 success (the last line of standard output is the folder written), 1 when the pipeline
fails on the data, 2 on a usage or config error. A failure prints one line on stderr; ``--debug``
shows the traceback too. Prefect is imported only by ``run`` and ``serve``, so ``validate``, ``repair`` and
``simulate`` start fast.
"""

from __future__ import annotations

import argparse
import atexit
import io
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from flows.embedded_server import start_embedded_server_once
from longitudinal.errors import ConfigError, LongitudinalError

if TYPE_CHECKING:
    from longitudinal.records import Ingested, Validated


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name's undecodable bytes never crash a print
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage line already
        return int(exc.code or 0)
    args.argv = argv
    try:
        return int(args.handler(args))
    except LongitudinalError as exc:
        if args.debug:  # the traceback too, and still the README's exit code (2 config, 1 data)
            traceback.print_exc()
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

    serve = commands.add_parser(
        "serve", help="serve each study as a Prefect deployment: schedule, new-data trigger, one run at a time",
    )
    serve.add_argument("--config", required=True, type=Path, action="append", help="a study's YAML config (repeatable)")
    serve.add_argument("--settle-seconds", type=float, default=2.0,
                       help="a landed file counts as complete once unchanged this long (default 2)")
    serve.add_argument("--rescan-seconds", type=float, default=60.0,
                       help="how often the landing folders are rescanned as a backstop (default 60)")
    serve.set_defaults(handler=_serve)

    server = commands.add_parser(
        "server", help="the background Prefect server that 'run' starts and reuses: status or stop",
        description="'longitudinal run' without a PREFECT_API_URL of your own starts a Prefect server (with "
                    "its UI) and a warm process in the background on first use, in $PREFECT_HOME (~/.prefect), "
                    "and reuses them: later runs skip the start-up. They stop after "
                    "LONGITUDINAL_BACKGROUND_IDLE_MINUTES (60) minutes without a run, or with 'stop'. "
                    "LONGITUDINAL_BACKGROUND=off runs each 'run' with Prefect's temporary server instead.",
    )
    server.add_argument("action", choices=("status", "stop"), help="status: where it is; stop: stop it and its server")
    server.set_defaults(handler=_server)

    repair = commands.add_parser(
        "repair", help="rebuild the study's curated registry from its parts (damaged files are set aside, never deleted)",
    )
    repair.add_argument("--config", required=True, type=Path, help="the study's YAML config")
    repair.set_defaults(handler=_repair)

    simulate = commands.add_parser("simulate", help="write a synthetic two-arm longitudinal trial")
    simulate.add_argument("--out", required=True, type=Path, help="output file (.csv or .parquet)")
    simulate.add_argument(
        "--design", choices=("slopes", "mmrm", "binary"), default="slopes",
        help="slopes: random intercepts and slopes over weekly visits (the default); mmrm: six scheduled "
             "visits with a serially correlated covariance, for repeated-measures models (--subjects, "
             "--seed only); binary: an improved yes/no outcome at six weekly visits, logistic with a random "
             "intercept and slope, for binomial models (--subjects, --seed, --bad-rows only)",
    )
    simulate.add_argument("--subjects", type=int, default=300)
    simulate.add_argument("--min-visits", type=int, default=4)
    simulate.add_argument("--max-visits", type=int, default=8)
    simulate.add_argument("--seed", type=int, default=20240601)
    simulate.add_argument("--bad-rows", type=int, default=0, help="deliberately bad rows to inject")
    simulate.set_defaults(handler=_simulate)

    for sub in (run, validate, serve, server, repair, simulate):
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _run(args: argparse.Namespace) -> int:
    if not args.debug and not os.environ.get("LONGITUDINAL_WARM_CHILD"):
        from flows.background import run_in_background

        code = run_in_background(args.argv, check=lambda: _check_before_prefect(args.config))
        if code is not None:
            return code
    _check_before_prefect(args.config)  # a config, formula or column error exits 2 in about a second
    from longitudinal.data.validation import preload_great_expectations

    preload_great_expectations()  # its 2-5 s import overlaps Prefect's start-up
    _quiet_prefect(debug=args.debug)
    from flows.study_pipeline import study_pipeline

    _strip_prefect_tracebacks(debug=args.debug)
    # Prefect stops its embedded server at exit and logs that to stdout; registered before the flow
    # starts that server, this handler runs after it, so the run folder stays the last line.
    closing: list[str] = []
    atexit.register(lambda: print(*closing, sep="\n", flush=True) if closing else None)
    start_embedded_server_once()
    run_dir = study_pipeline(config_path=str(args.config.resolve()), criterion=args.criterion)
    closing += [f"report: {Path(run_dir) / 'report.html'}", str(run_dir)]
    return 0


def _check_before_prefect(path: Path) -> None:
    """The config, the candidate formulas and (from the data files' header lines) the columns they use.

    The same checks the flow makes, made before Prefect's start-up (10-15 s) so that a mistake in the
    config costs a second. The column check reads only headers; it is left to the flow when the headers
    cannot tell (a landing folder whose earlier files the study has already curated, which may hold
    columns the current files lack) or cannot be read cheaply (the flow then reports the file).
    """
    from longitudinal.config import load_config
    from longitudinal.data.curation import check_registry, curated_dir
    from longitudinal.errors import DataError
    from longitudinal.model.formula import check_candidates, check_family, check_same_response, parse_candidates
    from longitudinal.data.ingest import read_header

    config = load_config(path)
    formulas = parse_candidates(config.models.candidates)
    check_same_response(formulas, config.data.outcome)
    check_family(formulas, family=config.models.family, nagq=config.models.nagq)
    check_registry(config)  # a damaged curated registry exits 1, naming the repair command
    if config.source_path.is_dir() and (curated_dir(config) / "registry.json").exists():
        return
    try:
        columns = read_header(config)
    except DataError:
        return
    if columns:
        check_candidates(formulas, config.data.roles, columns)


def _serve(args: argparse.Namespace) -> int:
    from longitudinal.config import load_config

    for path in args.config:
        load_config(path)
    if not os.environ.get("PREFECT_API_URL"):
        from flows.background import background_server_for_serve

        api_url = background_server_for_serve()  # the one 'run' uses, started if needed
        if api_url is not None:
            os.environ["PREFECT_API_URL"] = api_url
    if not os.environ.get("PREFECT_API_URL"):
        _quiet_prefect(debug=args.debug)
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ConfigError(
                "serve needs a running Prefect server: start one with 'make server' and set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api (or let serve start one in the background: "
                "unset LONGITUDINAL_BACKGROUND=off)"
            )
    _quiet_prefect(debug=args.debug)
    from flows.serve import serve_studies

    _strip_prefect_tracebacks(debug=args.debug)
    serve_studies(list(args.config), settle_seconds=args.settle_seconds, rescan_seconds=args.rescan_seconds)
    return 0


def _server(args: argparse.Namespace) -> int:
    from flows.background import background_status, stop_background

    paths, daemon = background_status()
    if args.action == "status":
        if daemon is None:
            print(f"no background server for Prefect home {paths.home} ('longitudinal run' starts one)")
            return 0
        print(f"background Prefect server: {daemon.ui_url} (API {daemon.api_url}), since {daemon.started}\n"
              f"process {daemon.pid}, server process {daemon.server_pid}, Prefect home {paths.home}\n"
              f"log: {paths.log}")
        return 0
    stopped = stop_background(paths.home)
    if stopped is None:
        print(f"no background server for Prefect home {paths.home}")
    else:
        print(f"stopped the background Prefect server at {stopped.ui_url} (Prefect home {paths.home})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from longitudinal.config import load_config
    from longitudinal.model.formula import check_candidates, check_family, check_same_response, parse_candidates
    from longitudinal.data.ingest import read_sources
    from longitudinal.reporting.run_folder import write_validation
    from longitudinal.data.validation import ensure_valid, validate_visits

    config = load_config(args.config)
    formulas = parse_candidates(config.models.candidates)
    check_same_response(formulas, config.data.outcome)
    check_family(formulas, family=config.models.family, nagq=config.models.nagq)
    ingested = read_sources(config)
    covariates = check_candidates(formulas, config.data.roles, list(ingested.raw.columns))
    validated = validate_visits(ingested, config, covariates)
    folder = write_validation(validated, config)
    for note in validated.notes:
        print(note)
    for warning in validated.warnings:
        print(f"warning: {warning}")
    print(
        f"{validated.rows_read} rows read = {validated.rows_analysed} analysed + "
        f"{validated.rows_quarantined} quarantined"
    )
    print(folder)  # the checks and the quarantine, also when the table-level check below fails
    ensure_valid(validated, config, folder)
    return 0


def _repair(args: argparse.Namespace) -> int:
    from longitudinal.config import load_config
    from longitudinal.data.curation import repair_curated

    for line in repair_curated(load_config(args.config)).lines():
        print(line)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from longitudinal.simulate import SimulationSpec, simulate_trial, write_table, write_truth

    if args.out.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"--out {str(args.out)!r}: the file name must end in .csv or .parquet")
    if args.subjects < 1 or args.min_visits < 1 or args.max_visits < args.min_visits:
        raise ConfigError("--subjects and --min-visits must be at least 1 and --max-visits at least --min-visits")
    if args.design == "mmrm":
        from longitudinal.simulate import MmrmSpec, simulate_mmrm_trial

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_table(simulate_mmrm_trial(MmrmSpec(n_subjects=args.subjects, seed=args.seed)), args.out)
        print(args.out)
        return 0
    if args.design == "binary":
        from longitudinal.simulate import BinarySpec, simulate_binary_trial

        binary = BinarySpec(n_subjects=args.subjects, seed=args.seed, n_bad_rows=args.bad_rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_table(simulate_binary_trial(binary), args.out)
        write_truth(binary, args.out)
        print(args.out)
        return 0
    spec = SimulationSpec(
        n_subjects=args.subjects, min_visits=args.min_visits, max_visits=args.max_visits,
        seed=args.seed, n_bad_rows=args.bad_rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_table(simulate_trial(spec), args.out)
    write_truth(spec, args.out)  # next to the data: what a fit should recover
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
