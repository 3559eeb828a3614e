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

    .venv/bin/python benchmarks/bench_pipeline.py              # all sizes (2M takes minutes, lme4 most)
    .venv/bin/python benchmarks/bench_pipeline.py --quick      # 2,000 and 20,000 rows
    .venv/bin/python benchmarks/bench_pipeline.py --sizes 200000 --no-example
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
LME4_SCRIPT = ROOT / "benchmarks" / "lme4_fits.R"
EXAMPLE_CONFIG = ROOT / "config" / "example.yaml"

SIZES: tuple[int, ...] = (2_000, 20_000, 200_000, 2_000_000)
QUICK_SIZES: tuple[int, ...] = (2_000, 20_000)
VISITS_PER_SUBJECT = 10
SEED = 20240601
CRITERION = "bic"
CANDIDATES: dict[str, str] = {
    "ri": "score ~ week * arm + age + (1 | patient_id)",
    "ris": "score ~ week * arm + age + (week | patient_id)",
    "ris_uncorrelated": "score ~ week * arm + age + (week || patient_id)",
}
HEAVY_MODULES: tuple[str, ...] = (
    "numpy", "pandas", "pyarrow", "scipy", "nlopt", "prefect", "great_expectations",
    "statsmodels.api", "matplotlib", "matplotlib.pyplot", "longitudinal.engine", "flows.study_pipeline",
)
APT_LME4 = ["r-base-core", "r-cran-lme4", "r-cran-jsonlite"]

# Goals of issue 6.
GOAL_FIT_RATIO = 1 / 30  # fit stage / lme4 fits, 200,000 rows
GOAL_LOGLIK = 0.05  # |ΔlogLik| per candidate
GOAL_MEMORY_GB = 4.0  # peak memory of the whole run at 2,000,000 rows
GOAL_SCALING = 12.0  # fit time at 2,000,000 / fit time at 200,000

CSV_FIELDS = (
    "rows", "subjects", "kind", "name", "seconds", "lme4_seconds", "ratio_to_lme4", "loglik", "lme4_loglik",
    "delta_loglik", "peak_tree_mb", "peak_process_mb", "selected", "lme4_selected", "measured_at",
)


# ----------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measured:
    """One subprocess: exit code, wall seconds, peak memory (MB) of its tree and of its largest process."""

    returncode: int
    seconds: float
    peak_tree_mb: float | None
    peak_process_mb: float | None
    stdout: str
    stderr: str


def find_time_tool(*, install: bool) -> str | None:
    """Path of GNU time (for ``-v``'s maximum resident set), installing Debian's ``time`` once if asked."""
    if Path("/usr/bin/time").exists():
        return "/usr/bin/time"
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing GNU time (apt-get install -y time) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "time"], capture_output=True, check=False)
        if Path("/usr/bin/time").exists():
            return "/usr/bin/time"
    return None


def read_tree_rss(root_pid: int) -> int:
    """Resident bytes summed over ``root_pid`` and all its descendants, read from /proc (0 if unreadable)."""
    children: dict[int, list[int]] = {}
    rss_pages: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
            # The command name is in parentheses and may hold spaces: split after the last ')'.
            fields = stat[stat.rindex(b")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(pid)
            rss_pages[pid] = int(fields[21])
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss_pages.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total * os.sysconf("SC_PAGE_SIZE")


def run_measured(command: Sequence[str], *, env: dict[str, str], cwd: Path, time_tool: str | None,
                 log_dir: Path) -> Measured:
    """Run ``command`` to completion; wall time, and peak memory sampled from /proc every 0.1 s.

    Output goes to files in ``log_dir`` (a pipe could fill up and stall a chatty run). Without /proc the
    tree peak is None; without GNU time the largest-process peak falls back to ``ru_maxrss`` of children
    (the largest child waited for so far in this process, so only an upper bound).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(command[0]).name + "_" + "_".join(command[1:3]))[:60]
    out_path, err_path, time_path = (log_dir / f"{stem}.{ext}" for ext in ("out", "err", "time"))
    full = [time_tool, "-v", "-o", str(time_path), *command] if time_tool else list(command)
    can_sample = Path("/proc/self/stat").exists()
    peak = [0]
    done = threading.Event()
    began = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(full, env=env, cwd=cwd, stdout=out, stderr=err)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], read_tree_rss(process.pid))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        if can_sample:
            sampler.start()
        returncode = process.wait()
        seconds = time.perf_counter() - began
        done.set()
        if can_sample:
            sampler.join()
    peak_process_mb: float | None = None
    if time_tool and time_path.exists():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_path.read_text())
        peak_process_mb = int(match.group(1)) / 1024 if match else None
    if peak_process_mb is None:
        import resource

        peak_process_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return Measured(
        returncode=returncode,
        seconds=seconds,
        peak_tree_mb=peak[0] / 2**20 if can_sample and peak[0] else None,
        peak_process_mb=peak_process_mb,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def prefect_env(home: Path, source: Path | None = None) -> dict[str, str]:
    """The environment of a benchmarked run: its own Prefect home, no telemetry, no API server configured.

    With ``source`` (a snapshot of the repository), ``PYTHONPATH`` puts its packages before the editable
    install, so the run measures that code.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class PrefectServer:
    process: subprocess.Popen[bytes]
    api_url: str

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


def start_prefect_server(env: dict[str, str], log: Path, timeout: float = 120.0) -> PrefectServer:
    """``prefect server start`` on a free loopback port, in its own process group; waits for /api/health."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prefect = Path(sys.executable).with_name("prefect")
    process = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return PrefectServer(process, api_url)
        if process.poll() is not None:
            break
        time.sleep(0.5)
    PrefectServer(process, api_url).stop()
    raise RuntimeError(f"the Prefect server did not start; see {log}")


def export_snapshot(revision: str, folder: Path) -> Path:
    """The committed tree at ``revision`` extracted into ``folder`` (``git archive``; git state untouched).

    Lets the benchmark measure committed code while colleagues edit the working tree.
    """
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--snapshot {revision}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def code_dir(env: dict[str, str]) -> Path:
    """Where the measured code lives: the snapshot on ``PYTHONPATH`` if any, else the repository.

    Subprocesses run there, because ``python -c`` puts the working folder first on ``sys.path``.
    """
    first = env.get("PYTHONPATH", "").split(os.pathsep)[0]
    return Path(first) if first else ROOT


def longitudinal_command() -> list[str]:
    """The ``longitudinal`` console script next to this interpreter, else the CLI module through it."""
    script = Path(sys.executable).parent / "longitudinal"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"]


# ----------------------------------------------------------------------------------------- one study


@dataclass
class PipelineRun:
    """What one ``longitudinal run`` reported: the process measures plus the run folder's numbers."""

    measured: Measured
    run_dir: Path | None
    stages: dict[str, float] = field(default_factory=dict)
    fits: dict[str, float] = field(default_factory=dict)
    logliks: dict[str, float] = field(default_factory=dict)
    selected: str | None = None
    rows_analysed: int | None = None
    error: str | None = None


def simulate_study(rows: int, folder: Path) -> Path:
    """A balanced study of ``rows`` rows (rows/10 subjects × 10 visits, no dropout, no bad rows), as CSV."""
    from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

    spec = SimulationSpec(
        n_subjects=max(1, rows // VISITS_PER_SUBJECT), min_visits=VISITS_PER_SUBJECT,
        max_visits=VISITS_PER_SUBJECT, dropout_probability=0.0, seed=SEED,
    )
    return write_table(simulate_trial(spec), folder / "data.csv")


def write_study_config(data_path: Path, folder: Path, study: str) -> Path:
    """A config for the benchmark study: the three candidates, BIC, no range check (nothing quarantined)."""
    lines = [
        f"study: {study}",
        "data:",
        f"  source: {json.dumps(str(data_path))}",
        "  subject: patient_id",
        "  time: week",
        "  outcome: score",
        "  categorical: [site]",
        "validation:",
        "  min_observations_per_subject: 2",
        "models:",
        f"  criterion: {CRITERION}",
        "  candidates:",
        *(f"    {name}: {json.dumps(formula)}" for name, formula in CANDIDATES.items()),
        "output:",
        f"  directory: {json.dumps(str(folder / 'reports'))}",
    ]
    path = folder / "study.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_pipeline(config: Path, *, env: dict[str, str], time_tool: str | None, log_dir: Path) -> PipelineRun:
    """Run ``longitudinal run --config`` and collect manifest timings, logLiks and the selection."""
    measured = run_measured(
        [*longitudinal_command(), "run", "--config", str(config)], env=env, cwd=code_dir(env), time_tool=time_tool,
        log_dir=log_dir,
    )
    lines = [line for line in measured.stdout.splitlines() if line.strip()]
    run_dir = Path(lines[-1].strip()) if lines else None
    if measured.returncode != 0 or run_dir is None or not (run_dir / "manifest.json").exists():
        tail = (measured.stderr.strip() or measured.stdout.strip())[-800:]
        return PipelineRun(measured, None, error=f"exit {measured.returncode}: {tail}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    result = PipelineRun(
        measured, run_dir,
        stages={k: float(v) for k, v in manifest.get("timings", {}).get("stages", {}).items()},
        fits={k: float(v) for k, v in manifest.get("timings", {}).get("fits", {}).items()},
        selected=manifest.get("selected"),
        rows_analysed=manifest.get("rows", {}).get("analysed"),
    )
    comparison = run_dir / "model_comparison.csv"
    if comparison.exists():
        with comparison.open() as handle:
            for row in csv.DictReader(handle):
                result.logliks[row["model"]] = float(row["loglik"])
    selected_json = run_dir / "selected_model.json"
    if selected_json.exists() and result.selected:
        loglik = json.loads(selected_json.read_text()).get("loglik")
        if loglik is not None:
            result.logliks[f"{result.selected} (REML)"] = float(loglik)
    return result


def find_lme4(*, install: bool) -> str | None:
    """None when ``Rscript`` with lme4 and jsonlite works, else why not (after one apt-get try if asked)."""

    def check() -> str | None:
        if not shutil.which("Rscript"):
            return "Rscript not found"
        probe = subprocess.run(
            ["Rscript", "-e", "suppressPackageStartupMessages({library(lme4); library(jsonlite)})"],
            capture_output=True, text=True, check=False,
        )
        return None if probe.returncode == 0 else f"R packages missing: {probe.stderr.strip()[-200:]}"

    problem = check()
    if problem and install and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"{problem}; trying apt-get install -y {' '.join(APT_LME4)} ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", *APT_LME4], capture_output=True, check=False)
        problem = check()
    return problem


def run_lme4(data_path: Path, *, log_dir: Path) -> tuple[dict[str, Any] | None, Measured]:
    """lme4's fits on the same CSV: the JSON of ``lme4_fits.R`` (None if it failed) and the process measures."""
    pairs = [f"{name}={formula}" for name, formula in CANDIDATES.items()]
    measured = run_measured(
        ["Rscript", str(LME4_SCRIPT), str(data_path), CRITERION, *pairs], env=dict(os.environ), cwd=data_path.parent,
        time_tool=None, log_dir=log_dir,
    )
    if measured.returncode != 0:
        return None, measured
    return json.loads(measured.stdout), measured


@dataclass
class SizeResult:
    """Everything measured at one size."""

    rows: int
    subjects: int
    simulate_seconds: float
    pipeline: PipelineRun
    lme4: dict[str, Any] | None
    lme4_note: str | None
    measured_at: str


def measure_size(rows: int, workdir: Path, *, env: dict[str, str], time_tool: str | None,
                 lme4_problem: str | None, measured_at: str) -> SizeResult:
    """Simulate one study, run the pipeline on it, then lme4 on the same CSV."""
    folder = workdir / f"rows_{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data_path = simulate_study(rows, folder)
    simulate_seconds = time.perf_counter() - began
    config = write_study_config(data_path, folder, f"bench-{rows}")
    print(f"  {rows:,} rows: data written in {simulate_seconds:.1f} s; longitudinal run ...", flush=True)
    pipeline = run_pipeline(config, env=env, time_tool=time_tool, log_dir=folder / "logs")
    if pipeline.error:
        print(f"  pipeline FAILED: {pipeline.error}", flush=True)
    else:
        peak = pipeline.measured.peak_tree_mb
        print(
            f"  run {pipeline.measured.seconds:.1f} s, peak {peak or float('nan'):.0f} MB, stages "
            + ", ".join(f"{k} {v:.2f}" for k, v in pipeline.stages.items()),
            flush=True,
        )
    lme4: dict[str, Any] | None = None
    note = lme4_problem
    if lme4_problem is None:
        print("  lme4 ...", flush=True)
        lme4, measured = run_lme4(data_path, log_dir=folder / "logs")
        if lme4 is None:
            note = f"lme4_fits.R failed (exit {measured.returncode}): {measured.stderr.strip()[-300:]}"
            print(f"  {note}", flush=True)
        else:
            print(f"  lme4 fits {lme4['fit_seconds_total']:.2f} s (process {measured.seconds:.1f} s)", flush=True)
    return SizeResult(
        rows=rows, subjects=max(1, rows // VISITS_PER_SUBJECT), simulate_seconds=simulate_seconds,
        pipeline=pipeline, lme4=lme4, lme4_note=note,
        measured_at=measured_at,
    )


def result_rows(result: SizeResult) -> list[dict[str, Any]]:
    """The results.csv rows of one size: the whole run, each stage, each fit, lme4's totals."""
    p, lme4 = result.pipeline, result.lme4
    base = {"rows": result.rows, "subjects": result.subjects, "measured_at": result.measured_at}
    lme4_fits: dict[str, dict[str, Any]] = {}
    if lme4:
        lme4_fits = dict(lme4["fits"]) | {f"{lme4['selected']} (REML)": lme4["refit"]}
    lme4_total = float(lme4["fit_seconds_total"]) if lme4 else None
    out: list[dict[str, Any]] = []

    def ratio(ours: float | None, theirs: float | None) -> float | None:
        return ours / theirs if ours is not None and theirs else None

    out.append(base | {
        "kind": "run", "name": "whole run (wall)", "seconds": p.measured.seconds, "lme4_seconds": lme4_total,
        "ratio_to_lme4": ratio(p.measured.seconds, lme4_total), "peak_tree_mb": p.measured.peak_tree_mb,
        "peak_process_mb": p.measured.peak_process_mb, "selected": p.selected,
        "lme4_selected": lme4["selected"] if lme4 else None,
    })
    overhead = p.measured.seconds - sum(p.stages.values()) if p.stages else None
    out.append(base | {"kind": "run", "name": "outside stages (start-up, Prefect, exit)", "seconds": overhead})
    for stage, seconds in p.stages.items():
        row = base | {"kind": "stage", "name": stage, "seconds": seconds}
        if stage == "fit":
            row |= {"lme4_seconds": lme4_total, "ratio_to_lme4": ratio(seconds, lme4_total)}
        out.append(row)
    for name in dict.fromkeys([*p.fits, *lme4_fits]):
        theirs = lme4_fits.get(name, {})
        ours_ll, their_ll = p.logliks.get(name), theirs.get("loglik")
        out.append(base | {
            "kind": "fit", "name": name, "seconds": p.fits.get(name), "lme4_seconds": theirs.get("seconds"),
            "ratio_to_lme4": ratio(p.fits.get(name), theirs.get("seconds")), "loglik": ours_ll,
            "lme4_loglik": their_ll,
            "delta_loglik": ours_ll - their_ll if ours_ll is not None and their_ll is not None else None,
        })
    if lme4:
        out.append(base | {"kind": "lme4", "name": "read CSV in R", "lme4_seconds": lme4["read_seconds"]})
    return out


# ----------------------------------------------------------------------------------------- fixed costs


def measure_imports(env: dict[str, str]) -> list[dict[str, Any]]:
    """Import time of each heavy module in a fresh interpreter (``-X importtime`` cumulative, and wall).

    Each module is imported alone, so shared dependencies (numpy, pandas) count in each of them: the
    numbers are what importing that module costs a cold interpreter, not additive shares.
    """
    baseline = _python_wall(["-c", "pass"], env)
    rows = []
    for module in HEAVY_MODULES:
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"], env=env, cwd=code_dir(env),
            capture_output=True, text=True, check=False,
        )
        wall = time.perf_counter() - began
        cumulative = None
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
            if len(parts) == 3 and parts[2] == module and parts[1].isdigit():
                cumulative = int(parts[1]) / 1e6
        rows.append({"module": module, "importtime_seconds": cumulative, "wall_seconds": wall - baseline,
                     "ok": done.returncode == 0})
    return rows


def modules_loaded_at_import(entry: str, env: dict[str, str]) -> list[str]:
    """Which heavy modules importing ``entry`` pulls in (lazy imports keep this list short)."""
    watched = [m for m in HEAVY_MODULES if m != entry]
    code = f"import sys, {entry}; print(' '.join(m for m in {watched!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=code_dir(env), capture_output=True, text=True,
                          check=False)
    return done.stdout.split() if done.returncode == 0 else [f"(failed: {done.stderr.strip()[-200:]})"]


def _python_wall(arguments: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, *arguments], env=env, cwd=code_dir(env), capture_output=True, check=False)
    return time.perf_counter() - began


def measure_example(workdir: Path, *, time_tool: str | None, source: Path | None) -> dict[str, Any]:
    """The bundled example end to end: a cold Prefect home (database created), then warm, then validate only.

    The config is copied with an absolute data path and an output folder in ``workdir``, so the repo's
    ``reports/`` is untouched.
    """
    folder = workdir / "example"
    folder.mkdir(parents=True, exist_ok=True)
    example_config = (source or ROOT) / EXAMPLE_CONFIG.relative_to(ROOT)
    text = example_config.read_text()
    data_source = re.search(r"^\s*source:\s*(\S+)", text, re.MULTILINE)
    data_path = (example_config.parent / data_source.group(1)).resolve() if data_source else None
    text = re.sub(r"^(\s*source:\s*)\S+", lambda m: f"{m.group(1)}{json.dumps(str(data_path))}", text,
                  flags=re.MULTILINE)
    text = re.sub(r"^(\s*directory:\s*)\S+", lambda m: f"{m.group(1)}{json.dumps(str(folder / 'reports'))}",
                  text, flags=re.MULTILINE)
    config = folder / "example.yaml"
    config.write_text(text)
    env = prefect_env(folder / "prefect-home", source)
    out: dict[str, Any] = {}
    for label in ("cold", "warm"):
        print(f"  example ({label} Prefect home) ...", flush=True)
        out[label] = run_pipeline(config, env=env, time_tool=time_tool, log_dir=folder / f"logs-{label}")
    print("  example: validate only (no Prefect) ...", flush=True)
    out["validate_only"] = run_measured(
        [*longitudinal_command(), "validate", "--config", str(config)], env=env, cwd=code_dir(env),
        time_tool=time_tool,
        log_dir=folder / "logs-validate",
    )
    out["python_start"] = _python_wall(["-c", "pass"], env)
    print("  import times ...", flush=True)
    out["imports"] = measure_imports(env)
    out["loaded_by_flow"] = modules_loaded_at_import("flows.study_pipeline", env)
    out["loaded_by_engine"] = modules_loaded_at_import("longitudinal.engine", env)
    return out


# ----------------------------------------------------------------------------------------- outputs


def read_previous(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier results.csv (to keep sizes not measured this time), or none."""
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One row per size × stage/fit; empty cells where a number does not apply."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in CSV_FIELDS})


def _cell(value: Any) -> Any:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.12g}" if math.isfinite(value) else ""
    return value


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pick(rows: list[dict[str, Any]], size: int, kind: str, name: str) -> dict[str, Any] | None:
    for row in rows:
        if int(row["rows"]) == size and row["kind"] == kind and row["name"] == name:
            return row
    return None


def evaluate_goals(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) for each goal of issue 6 that the rows allow to check."""
    goals: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**not met**")

    fit = _pick(rows, 200_000, "stage", "fit")
    ratio = _num(fit.get("ratio_to_lme4")) if fit else None
    goals.append((
        "200k rows: fit stage / lme4 fits (3 ML + REML refit)", f"≤ 1/30 ({GOAL_FIT_RATIO:.4f})",
        f"{_num(fit['seconds']):.2f} s / {_num(fit['lme4_seconds']) or float('nan'):.2f} s = "
        f"{ratio:.4f} (1/{1 / ratio:.1f})" if fit and ratio else "not measured",
        verdict(ratio <= GOAL_FIT_RATIO if ratio else None),
    ))
    deltas: list[tuple[str, float]] = [
        (r["name"], d) for r in rows
        if int(r["rows"]) == 200_000 and r["kind"] == "fit" and "(REML)" not in r["name"]
        and (d := _num(r.get("delta_loglik"))) is not None
    ]
    worst = max((abs(d) for _, d in deltas), default=None)
    goals.append((
        "200k rows: |ΔlogLik| vs lme4 per ML candidate", f"≤ {GOAL_LOGLIK}",
        ", ".join(f"{n} {d:+.2e}" for n, d in deltas) or "not measured",
        verdict(worst <= GOAL_LOGLIK if worst is not None else None),
    ))
    run = _pick(rows, 200_000, "run", "whole run (wall)")
    same = (run["selected"] == run["lme4_selected"]) if run and run.get("lme4_selected") else None
    goals.append((
        "200k rows: same selection as lme4", "same",
        f"ours {run['selected']}, lme4 {run['lme4_selected']}" if run and same is not None else "not measured",
        verdict(same),
    ))
    whole, theirs = (_num(run["seconds"]), _num(run["lme4_seconds"])) if run else (None, None)
    goals.append((
        "200k rows: whole run vs lme4 fits alone", "≤ 1×",
        f"{whole:.1f} s vs {theirs:.1f} s ({whole / theirs:.2f}×)" if whole and theirs else "not measured",
        verdict(whole <= theirs if whole and theirs else None),
    ))
    big = _pick(rows, 2_000_000, "run", "whole run (wall)")
    memory = _num(big.get("peak_tree_mb")) if big else None
    goals.append((
        "2M rows: peak memory of the whole run (process tree)", f"< {GOAL_MEMORY_GB:.0f} GB",
        f"{memory / 1024:.2f} GB" if memory else "not measured",
        verdict(memory / 1024 < GOAL_MEMORY_GB if memory else None),
    ))
    big_fit = _pick(rows, 2_000_000, "stage", "fit")
    fit_big = _num(big_fit["seconds"]) if big_fit else None
    fit_small = _num(fit["seconds"]) if fit else None
    scale = fit_big / fit_small if fit_big is not None and fit_small else None
    goals.append((
        "fit stage at 2M / at 200k", f"≤ {GOAL_SCALING:.0f}",
        f"{fit_big:.2f} s / {fit_small:.2f} s = {scale:.1f}" if scale is not None else "not measured",
        verdict(scale <= GOAL_SCALING if scale is not None else None),
    ))
    return goals


def write_summary(rows: list[dict[str, Any]], example: dict[str, Any] | None, notes: list[str], path: Path) -> None:
    """summary.md: the goals, a per-size table, per-fit comparison and the example's fixed costs."""
    sizes = sorted({int(r["rows"]) for r in rows})
    lines = ["# Pipeline benchmark", "", f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
             f"on {os.cpu_count()} cores; `{sys.executable} benchmarks/bench_pipeline.py`.", ""]
    stamps = sorted({r["measured_at"] for r in rows if r.get("measured_at")})
    if len(stamps) > 1:
        lines += [f"Sizes come from more than one invocation ({', '.join(stamps)}): ratios across sizes "
                  "mix machine states.", ""]
    lines += ["## Goals (issue 6)", "", "| goal | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {m} | {v} |" for g, t, m, v in evaluate_goals(rows)]
    lines += ["", "## Per size (seconds; memory in MB)", ""]
    stage_names = list(dict.fromkeys(r["name"] for r in rows if r["kind"] == "stage"))
    header = ["rows", "subjects", "whole run", "outside stages", *stage_names, "lme4 fits", "fit / lme4",
              "run / lme4", "peak tree MB", "peak process MB", "selected (ours / lme4)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sizes:
        run = _pick(rows, size, "run", "whole run (wall)") or {}
        outside = _pick(rows, size, "run", "outside stages (start-up, Prefect, exit)") or {}
        fit = _pick(rows, size, "stage", "fit") or {}
        cells = [f"{size:,}", run.get("subjects", ""), _fmt(run.get("seconds")), _fmt(outside.get("seconds"))]
        cells += [_fmt((_pick(rows, size, "stage", s) or {}).get("seconds")) for s in stage_names]
        fit_ratio = _num(fit.get("ratio_to_lme4"))
        run_ratio = _num(run.get("ratio_to_lme4"))
        cells += [
            _fmt(run.get("lme4_seconds")),
            _ratio_text(fit_ratio),
            _ratio_text(run_ratio),
            _fmt(run.get("peak_tree_mb"), 0), _fmt(run.get("peak_process_mb"), 0),
            f"{run.get('selected', '')} / {run.get('lme4_selected') or '-'}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## Per fit (seconds; ML unless marked REML)", "",
              "| rows | fit | ours | lme4 | ours / lme4 | logLik (ours) | ΔlogLik vs lme4 |", "|---|---|---|---|---|---|---|"]
    for size in sizes:
        for r in rows:
            if int(r["rows"]) == size and r["kind"] == "fit":
                ratio = _num(r.get("ratio_to_lme4"))
                delta = _num(r.get("delta_loglik"))
                loglik = _num(r.get("loglik"))
                lines.append(
                    f"| {size:,} | {r['name']} | {_fmt(r.get('seconds'), 3)} | {_fmt(r.get('lme4_seconds'), 3)} | "
                    f"{_ratio_text(ratio)} | {f'{loglik:.4f}' if loglik is not None else ''} | "
                    f"{f'{delta:+.2e}' if delta is not None else ''} |"
                )
    if example:
        lines += _example_lines(example)
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    lines += ["", "![time against rows](scaling.png)", ""]
    path.write_text("\n".join(lines))


def _example_lines(example: dict[str, Any]) -> list[str]:
    lines = ["", "## The bundled example (config/example.yaml), end to end", "",
             "| run | wall s | stages s | outside stages s | ingest | validate | fit | select | report | peak tree MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label in ("cold", "warm"):
        run: PipelineRun = example[label]
        if run.error:
            lines.append(f"| {label} | failed: {run.error[:120]} |")
            continue
        stages = sum(run.stages.values())
        lines.append(
            f"| {label} Prefect home | {run.measured.seconds:.2f} | {stages:.2f} | {run.measured.seconds - stages:.2f} | "
            + " | ".join(_fmt(run.stages.get(s), 3) for s in ("ingest", "validate", "fit", "select", "report"))
            + f" | {_fmt(run.measured.peak_tree_mb, 0)} |"
        )
    validate_only: Measured = example["validate_only"]
    lines += ["", f"`longitudinal validate` (ingest + validation, no Prefect): {validate_only.seconds:.2f} s "
              f"(exit {validate_only.returncode}); `python -c pass`: {example['python_start']:.2f} s.", "",
              "Import time in a fresh interpreter (each alone, so shared dependencies count in each):", "",
              "| module | -X importtime cumulative s | wall s (minus interpreter start) |", "|---|---|---|"]
    for row in example["imports"]:
        lines.append(f"| {row['module']} | {_fmt(row['importtime_seconds'], 2)} | {_fmt(row['wall_seconds'], 2)}"
                     f"{'' if row['ok'] else ' (import failed)'} |")
    lines += ["", f"Heavy modules loaded by `import flows.study_pipeline`: {', '.join(example['loaded_by_flow']) or 'none'}.",
              f"By `import longitudinal.engine`: {', '.join(example['loaded_by_engine']) or 'none'}."]
    return lines


def _ratio_text(ratio: float | None) -> str:
    """0.02 as '1/50', 2.5 as '2.5×'."""
    if ratio is None:
        return ""
    return f"1/{1 / ratio:.0f}" if ratio < 1 else f"{ratio:.1f}×"


def _fmt(value: Any, digits: int = 2) -> str:
    number = _num(value)
    return "" if number is None else f"{number:.{digits}f}"


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log time against rows: whole run, fit stage, lme4's fits; a dotted line of slope 1 for scale."""
    from matplotlib.figure import Figure

    series = {
        "whole longitudinal run": lambda size: _num((_pick(rows, size, "run", "whole run (wall)") or {}).get("seconds")),
        "fit stage (3 ML + REML refit)": lambda size: _num((_pick(rows, size, "stage", "fit") or {}).get("seconds")),
        "lme4 fits (3 ML + REML refit)": lambda size: _num(
            (_pick(rows, size, "run", "whole run (wall)") or {}).get("lme4_seconds")),
    }
    sizes = sorted({int(r["rows"]) for r in rows})
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    for (label, value), marker in zip(series.items(), ("o", "s", "^")):
        points = [(s, value(s)) for s in sizes if value(s)]
        if points:
            axes.plot(*zip(*points), marker=marker, label=label)
    fit_points = [(s, v) for s in sizes if (v := series["fit stage (3 ML + REML refit)"](s))]
    if fit_points:
        s0, v0 = fit_points[0]
        axes.plot([s0, sizes[-1]], [v0, v0 * sizes[-1] / s0], linestyle=":", color="grey",
                  label="linear in rows (from the smallest fit stage)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("rows (subjects × 10 visits)")
    axes.set_ylabel("seconds")
    axes.set_title("longitudinal vs lme4: time against rows")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------- main


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
            server = start_prefect_server(env, workdir / "server.log")
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
            rows = sorted(previous + [{k: _cell(v) for k, v in r.items()} for r in measured],
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
