"""Fixed costs: the bundled example end to end (a first run in a new Prefect home, then second runs with a
changed candidate, validate alone) and the import time of the heavy libraries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.pipeline.measure import ROOT, code_dir, longitudinal_command, python_wall, run_measured
from benchmarks.pipeline.study import run_pipeline

EXAMPLE_CONFIG = ROOT / "config" / "example.yaml"
# Module names as strings (the library is not imported here): the entry points whose import cost is measured.
HEAVY_MODULES: tuple[str, ...] = (
    "numpy", "pandas", "pyarrow", "scipy", "nlopt", "prefect", "great_expectations",
    "statsmodels.api", "matplotlib", "matplotlib.pyplot", "longitudinal.fit.lmm", "flows.study_pipeline",
)


def measure_imports(env: dict[str, str]) -> list[dict[str, Any]]:
    """Import time of each heavy module in a fresh interpreter (``-X importtime`` cumulative, and wall).

    Each module is imported alone, so shared dependencies (numpy, pandas) count in each of them: the
    numbers are what importing that module costs a cold interpreter, not additive shares.
    """
    baseline = python_wall(["-c", "pass"], env)
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


# The second run changes candidate `ri` as a statistician iterating on formulas would: each variant is new to
# the Prefect home, so its fit is not cached (the other candidates' are, and so is the REML refit while the
# selection stays the same).
RI_VARIANTS: tuple[str, ...] = (
    "score ~ week * arm + (1 | patient_id)",
    "score ~ week * arm + age + site + (1 | patient_id)",
    "score ~ week * arm + site + (1 | patient_id)",
    "score ~ week + arm + age + (1 | patient_id)",
    "score ~ week + arm + (1 | patient_id)",
)


def example_config_text(source: Path | None, *, data_source: str | None = None, output: str,
                        study: str | None = None, ri: str | None = None) -> str:
    """config/example.yaml (of the snapshot, if any) with its data source and output folder replaced.

    ``data_source`` None keeps the example's CSV (as an absolute path); ``study`` renames the study; ``ri``
    replaces candidate ``ri``'s formula. Text edits, so the example's comments and order stay.
    """
    example_config = (source or ROOT) / EXAMPLE_CONFIG.relative_to(ROOT)
    text = example_config.read_text()
    if data_source is None:
        found = re.search(r"^\s*source:\s*(\S+)", text, re.MULTILINE)
        data_source = json.dumps(str((example_config.parent / found.group(1)).resolve())) if found else '""'
    replacements = {r"^(\s*source:\s*)\S+": data_source, r"^(\s*directory:\s*)\S+": output}
    if study is not None:
        replacements[r"^(study:\s*)\S+"] = study
    if ri is not None:
        replacements[r"^(\s*ri:\s*).*$"] = json.dumps(ri)
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, _keep_key(value), text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise SystemExit(f"config/example.yaml: no line matches {pattern!r}; the benchmark needs updating")
    return text


def _keep_key(value: str) -> Callable[[re.Match[str]], str]:
    """A substitution keeping the line's key (group 1) and putting ``value`` after it."""
    return lambda match: f"{match.group(1)}{value}"


def example_data(source: Path | None) -> Path:
    """The bundled example's CSV (of the snapshot, if any)."""
    example_config = (source or ROOT) / EXAMPLE_CONFIG.relative_to(ROOT)
    found = re.search(r"^\s*source:\s*(\S+)", example_config.read_text(), re.MULTILINE)
    if found is None:
        raise SystemExit("config/example.yaml: no data source line; the benchmark needs updating")
    return (example_config.parent / found.group(1)).resolve()


def measure_example(workdir: Path, *, env: dict[str, str], time_tool: str | None, source: Path | None,
                    repeats: int = 3) -> dict[str, Any]:
    """The bundled example: a first run in a new Prefect home, then ``repeats`` second runs, each with
    candidate ``ri`` changed (so its fit is not cached), then ``longitudinal validate`` and import times.

    The config is copied with an absolute data path and an output folder in ``workdir``, so the repo's
    ``reports/`` is untouched. Each second run is a fresh ``longitudinal run`` process timed to its exit
    (it prints the report path last).
    """
    folder = workdir / "example"
    folder.mkdir(parents=True, exist_ok=True)
    output = json.dumps(str(folder / "reports"))
    config = folder / "example.yaml"
    config.write_text(example_config_text(source, output=output))
    out: dict[str, Any] = {"second": [], "changes": []}
    print("  example: first run (new Prefect home) ...", flush=True)
    out["first"] = run_pipeline(config, env=env, time_tool=time_tool, log_dir=folder / "logs-first")
    for k, formula in enumerate(RI_VARIANTS[:repeats], start=1):
        config.write_text(example_config_text(source, output=output, ri=formula))
        run = run_pipeline(config, env=env, time_tool=time_tool, log_dir=folder / f"logs-second-{k}")
        print(f"  example: second run {k} (ri: {formula}): "
              + (f"{run.measured.seconds:.2f} s" if not run.error else f"FAILED {run.error[:200]}"), flush=True)
        out["second"].append(run)
        out["changes"].append(formula)
    config.write_text(example_config_text(source, output=output))
    print("  example: validate only (no Prefect) ...", flush=True)
    out["validate_only"] = run_measured(
        [*longitudinal_command(), "validate", "--config", str(config)], env=env, cwd=code_dir(env),
        time_tool=time_tool,
        log_dir=folder / "logs-validate",
    )
    out["python_start"] = python_wall(["-c", "pass"], env)
    print("  import times ...", flush=True)
    out["imports"] = measure_imports(env)
    out["loaded_by_flow"] = modules_loaded_at_import("flows.study_pipeline", env)
    out["loaded_by_engine"] = modules_loaded_at_import("longitudinal.fit.lmm", env)
    return out


def example_rows(example: dict[str, Any], measured_at: str) -> list[dict[str, Any]]:
    """results.csv rows of the example: the first run, and each second run (design ``example``)."""
    first = example["first"]
    rows_analysed = first.rows_analysed or 0
    base = {"design": "example", "rows": rows_analysed, "measured_at": measured_at}
    out = [base | {"kind": "run", "name": "first run (new Prefect home)", "seconds": first.measured.seconds,
                   "stages_seconds": first.stages_seconds,
                   "peak_tree_mb": first.measured.peak_tree_mb, "selected": first.selected}]
    for k, (run, formula) in enumerate(zip(example["second"], example["changes"]), start=1):
        out.append(base | {
            "kind": "second run", "name": f"second run {k} (ri: {formula})",
            "seconds": None if run.error else run.measured.seconds,
            "stages_seconds": run.stages_seconds,
            "peak_tree_mb": run.measured.peak_tree_mb, "selected": run.selected,
        })
    return out
