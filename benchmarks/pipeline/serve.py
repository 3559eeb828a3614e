"""The bundled example under ``longitudinal serve``: seconds from a file landing in the study's folder to
its published report.

A Prefect server is started for this (``flows.local_server``, the one the integration tests and
``--server`` start), then ``longitudinal serve`` on a copy of the example study whose ``data.source`` is a
landing folder, with serve's defaults (a file written in place counts once unchanged for
``--settle-seconds`` 2; one renamed in, as here, after 0.3 s). Each arrival is a new file with new content
(the example's rows under new subject ids), moved into the folder at once, as an export should be; the clock stops when the study's ``latest`` link points at a new
run folder holding ``report.html`` (``longitudinal/reporting/run_folder.py`` publishes a run by moving
its folder into place, then the link). Every process started here is stopped with its whole group.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.pipeline.example import example_config_text, example_data
from benchmarks.pipeline.measure import code_dir, longitudinal_command, prefect_env
from flows.local_server import log_tail, start_group, start_prefect_server, stop_group

STUDY = "bench-served"
FLOW = "longitudinal-study"
SERVE_READY_SECONDS = 180.0
REPORT_SECONDS = 180.0
PAUSE_SECONDS = 3.0  # after a publish, before the next file: the finished run's bookkeeping ends first


def write_arrival(data: Path, target: Path, prefix: str) -> None:
    """The example's rows with every subject id prefixed (new subjects, new content), written aside then
    renamed into the landing folder."""
    aside = target.parent / f".partial-{target.name}"
    with data.open(newline="") as source, aside.open("w", newline="") as sink:
        reader = csv.DictReader(source)
        writer = csv.DictWriter(sink, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        for row in reader:
            writer.writerow({**row, "patient_id": prefix + row["patient_id"]})
    os.replace(aside, target)


def deployment_exists(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/deployments/name/{FLOW}/{STUDY}", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def published(study_dir: Path) -> Path | None:
    """The run folder ``latest`` points at, once its report is there."""
    link = study_dir / "latest"
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return target if (target / "report.html").exists() else None


def measure_serve(workdir: Path, *, source: Path | None, arrivals: int = 3) -> dict[str, Any]:
    """Latency of ``arrivals`` files, one after another, each to its published report; with the stages'
    seconds of each run (from its manifest), so that the wait outside the work shows."""
    folder = workdir / "serve"
    landing = folder / "incoming"
    landing.mkdir(parents=True, exist_ok=True)
    config = folder / "study.yaml"
    config.write_text(example_config_text(source, data_source="incoming", output="reports", study=STUDY))
    study_dir = folder / "reports" / STUDY
    data = example_data(source)
    out: dict[str, Any] = {"latencies": [], "stages": [], "rows": [], "error": None}
    server = start_prefect_server(prefect_env(folder / "server-home", source), log=folder / "server.log",
                                  cwd=folder, ui=False, seconds=120.0)
    env = prefect_env(folder / "serve-home", source) | {"PREFECT_API_URL": server.api_url}
    log = folder / "serve.log"
    process = None
    try:
        began = time.perf_counter()
        process = start_group([*longitudinal_command(), "serve", "--config", str(config)], env=env, log=log,
                              cwd=code_dir(env))
        ready_since = None
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"longitudinal serve exited with {process.returncode}\n{log_tail(log)}")
            if time.perf_counter() - began > SERVE_READY_SECONDS:
                raise RuntimeError(f"longitudinal serve: not serving within {SERVE_READY_SECONDS:.0f} s\n"
                                   + log_tail(log))
            if deployment_exists(server.api_url):
                ready_since = ready_since or time.perf_counter()
                text = log.read_text(errors="replace") if log.exists() else ""
                if "being served" in text or time.perf_counter() - ready_since > 5.0:
                    break
            time.sleep(0.2)
        out["serve_ready_seconds"] = time.perf_counter() - began
        print(f"  serve: serving after {out['serve_ready_seconds']:.1f} s", flush=True)
        for k in range(1, arrivals + 1):
            before = published(study_dir)
            target = landing / f"site-{k}.csv"
            clock = time.perf_counter()
            write_arrival(data, target, prefix=f"A{k}-")
            while True:
                now = published(study_dir)
                if now is not None and now != before:
                    break
                if process.poll() is not None:
                    raise RuntimeError(f"longitudinal serve exited with {process.returncode}\n{log_tail(log)}")
                if time.perf_counter() - clock > REPORT_SECONDS:
                    raise RuntimeError(f"arrival {k}: no report within {REPORT_SECONDS:.0f} s\n{log_tail(log)}")
                time.sleep(0.05)
            latency = time.perf_counter() - clock
            manifest = json.loads((now / "manifest.json").read_text())
            stages = sum(float(v) for v in manifest.get("timings", {}).get("stages", {}).values())
            out["latencies"].append(latency)
            out["stages"].append(stages)
            out["rows"].append(int(manifest.get("rows", {}).get("analysed") or 0))
            print(f"  serve: arrival {k}: report after {latency:.2f} s (stages {stages:.2f} s)", flush=True)
            time.sleep(PAUSE_SECONDS)
    except (RuntimeError, OSError, ValueError) as exc:
        out["error"] = str(exc)[-1500:]
        print(f"  serve FAILED: {out['error']}", flush=True)
    finally:
        if process is not None:
            stop_group(process)
        server.stop()
    return out


def serve_rows(serve: dict[str, Any], measured_at: str) -> list[dict[str, Any]]:
    """results.csv rows (design ``serve``): each arrival's latency, with the run's stages beside it."""
    return [{"design": "serve", "rows": rows, "measured_at": measured_at, "kind": "latency",
             "name": f"arrival {k}", "seconds": latency, "stages_seconds": stages}
            for k, (latency, stages, rows) in enumerate(zip(serve["latencies"], serve["stages"], serve["rows"]),
                                                        start=1)]


def summarize(values: list[float]) -> tuple[float, float] | None:
    """(min, median), or None without values."""
    return (min(values), statistics.median(values)) if values else None
