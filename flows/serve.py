"""Serve one deployment per study: a cron schedule, a data-arrival trigger, one run at a time.

Prefect has no file sensor. For a study whose ``data.source`` is a folder, a :class:`LandingWatcher`
watches it and emits a ``longitudinal.data.arrived`` event for each settled batch of new files (new =
content not yet ingested by the study); the deployment's ``DeploymentEventTrigger`` turns that event
into a run. The watcher's periodic rescan is the backstop for missed notifications. A concurrency
limit of one run per study, with later arrivals queued, keeps two runs of a study from overlapping.

At its start, ``serve`` starts a run of every study whose needs-run marker is set (a run that ingested data
and then failed for a passing cause, such as the server going away, never published them): otherwise
what that run registered would wait for the next arrival or the next scheduled run.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from prefect.exceptions import TerminationSignal
from prefect.runner import Runner
from prefect.settings import PREFECT_UI_URL
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger, emit_event
from prefect.schedules import Cron

from flows.study_pipeline import study_pipeline
from longitudinal.config import StudyConfig, load_config
from longitudinal.data.curation import is_new_file
from longitudinal.data.durable import printable
from longitudinal.data.landing import LandingWatcher
from longitudinal.reporting.run_folder import read_needs_run

ARRIVAL_EVENT = "longitudinal.data.arrived"
RUNNER_POLL_SECONDS = 1
log = logging.getLogger("longitudinal.serve")


def study_resource(study: str) -> str:
    return f"longitudinal.study.{study}"


def deployment_options(config_path: Path, config: StudyConfig) -> dict[str, Any]:
    """The study's deployment: its name, schedule, arrival trigger and concurrency limit (the keyword
    arguments of ``Flow.to_deployment`` and ``Runner.add_flow``)."""
    schedules = []
    if config.schedule is not None:
        schedules.append(Cron(config.schedule.cron, timezone=config.schedule.timezone))
    triggers: list[Any] = []
    if config.source_path.is_dir():
        triggers.append(DeploymentEventTrigger(
            name=f"{config.study}: new data",
            expect={ARRIVAL_EVENT},
            match={"prefect.resource.id": study_resource(config.study)},
            parameters={"config_path": str(config_path)},
        ))
    return dict(
        name=config.study,
        parameters={"config_path": str(config_path)},
        schedules=schedules,
        triggers=triggers,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["longitudinal", config.study],
        description=f"longitudinal pipeline for study {config.study} ({config_path})",
    )


def announce_arrival(config: StudyConfig, files: list[Path]) -> None:
    """Emit the event that starts the study's deployment (one event per settled batch).

    File names go into the event as text: a name that is not UTF-8 is shown with U+FFFD (the event
    carries them for people; the run finds the files itself)."""
    names = [printable(f) for f in files]
    event = emit_event(
        event=ARRIVAL_EVENT,
        resource={"prefect.resource.id": study_resource(config.study), "prefect.resource.name": config.study},
        payload={"files": names},
    )
    if event is None:
        raise RuntimeError(f"the arrival event for {', '.join(names)} was not sent (see the error above); "
                           "is PREFECT_API_URL set to a running Prefect server?")
    log.info("%s: %d new file(s) landed: %s", config.study, len(files), ", ".join(printable(f.name) for f in files))


def start_runs_that_were_not_published(deployments: list[tuple[StudyConfig, Any]]) -> list[str]:
    """Start a run of each study whose needs-run marker is set; returns those studies.

    ``deployments`` pairs each study with its registered deployment's id. The run is created scheduled to
    start now: the runner picks it up once it serves, within the study's concurrency limit. A failure
    here is logged, not raised: serving the schedule and the arrivals matters more."""
    from prefect.deployments import run_deployment

    started = []
    for config, deployment_id in deployments:
        marker = read_needs_run(config.output_dir)
        if marker is None:
            continue
        try:
            run_deployment(deployment_id, timeout=0, tags=["needs-run"])
        except Exception as exc:
            log.error("%s: data received since %s were never published, and a run could not be started: %s",
                      config.study, marker.get("since") or "an earlier run", printable(exc))
            continue
        log.warning("%s: the run started %s did not publish (%s); starting a run now", config.study,
                    marker.get("since") or "earlier", printable(marker.get("last_failure") or "it stopped"))
        started.append(config.study)
    return started


def _log_to_console(*names: str) -> None:
    """The watcher's messages (files landed, files not readable yet) on the console, beside Prefect's:
    they propagate to the root logger, whose console handler Prefect configured."""
    for name in names:
        logging.getLogger(name).setLevel(logging.INFO)


def warm_flow_runs() -> None:
    """Start each flow run as a fork of a warm process instead of a cold interpreter.

    Prefect's runner starts a served flow's run with ``multiprocessing``'s ``spawn``: a new interpreter
    that imports Prefect, great-expectations and the pipeline again (3-6 s) before any work. Here its
    context is ``forkserver``, whose server process (single-threaded, started now) has imported all that
    once (``flows.background``'s list); each run is a fresh fork of it, with the same isolation and the
    same environment handling as spawn (Prefect passes the settings and environment to the child itself).
    """
    import multiprocessing
    import multiprocessing.forkserver

    import prefect.flow_engine

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flows.preloaded"])
    multiprocessing.forkserver.ensure_running()
    prefect.flow_engine.multiprocessing = _SpawnAsForkserver(context)  # type: ignore[assignment]


class _SpawnAsForkserver:
    """``multiprocessing`` as ``prefect.flow_engine`` sees it, with ``get_context("spawn")`` answered by a
    forkserver context (the module's only use of it: ``run_flow_in_subprocess``)."""

    def __init__(self, context: Any):
        self._context = context

    def get_context(self, method: str | None = None) -> Any:
        import multiprocessing

        return self._context if method == "spawn" else multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        import multiprocessing

        return getattr(multiprocessing, name)


def serve_studies(config_paths: list[Path], *, settle_seconds: float = 2.0, rescan_seconds: float = 60.0) -> None:
    """Register and serve every study's deployment until interrupted; watch each landing folder."""
    configs = [(path.resolve(), load_config(path)) for path in config_paths]
    studies = [config.study for _, config in configs]
    if len(set(studies)) < len(studies):
        from longitudinal.errors import ConfigError

        raise ConfigError(f"two configs name the same study ({', '.join(studies)}); each study needs its own name")
    _log_to_console("longitudinal.serve", "longitudinal.data.landing", "longitudinal.reporting.run_folder")
    # What prefect.serve(*deployments) does, except that the runner is given the flow itself (add_flow, which
    # registers the deployment), so that it starts each run from it in a forked process (see warm_flow_runs)
    # rather than as ``python -m prefect.engine``, which imports everything again. It looks for runs to start
    # every second (Prefect's default: 10 s), so a triggered or scheduled run starts about a second after
    # it is created.
    runner = Runner(pause_on_shutdown=False, query_seconds=RUNNER_POLL_SECONDS)
    deployment_ids = [runner.add_flow(study_pipeline, **deployment_options(path, config)) for path, config in configs]
    start_runs_that_were_not_published([(config, d) for (_, config), d in zip(configs, deployment_ids)])
    warm_flow_runs()
    watchers = [_watch(config, settle_seconds, rescan_seconds) for _, config in configs if config.source_path.is_dir()]
    log.info("serving %s; runs start on their schedule, on new data, or from the UI (%s/deployments)",
             ", ".join(studies), PREFECT_UI_URL.value())
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        log.info("stopping")
    finally:
        for watcher in watchers:
            watcher.stop()


def _watch(config: StudyConfig, settle_seconds: float, rescan_seconds: float) -> LandingWatcher:
    def on_batch(files: list[Path]) -> None:
        announce_arrival(config, files)

    def is_new(file: Path) -> bool:
        return is_new_file(config, file)

    return LandingWatcher(config.source_path, on_batch, is_new=is_new, settle_seconds=settle_seconds,
                          rescan_seconds=rescan_seconds).start()
