"""Fixed costs: the bundled example end to end (cold and warm Prefect home, validate alone) and the import
time of the heavy libraries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.pipeline.measure import ROOT, code_dir, longitudinal_command, prefect_env, python_wall, run_measured
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
    out["python_start"] = python_wall(["-c", "pass"], env)
    print("  import times ...", flush=True)
    out["imports"] = measure_imports(env)
    out["loaded_by_flow"] = modules_loaded_at_import("flows.study_pipeline", env)
    out["loaded_by_engine"] = modules_loaded_at_import("longitudinal.fit.lmm", env)
    return out
