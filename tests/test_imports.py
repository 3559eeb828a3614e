"""The library stays free of Prefect (and of slow imports) so it can be used and tested alone."""

from __future__ import annotations

import subprocess
import sys

LIBRARY_MODULES = [
    "longitudinal", "longitudinal.config", "longitudinal.model.formula", "longitudinal.model.design",
    "longitudinal.records", "longitudinal.inference.criteria", "longitudinal.reporting.run_folder",
    "longitudinal.data.ingest", "longitudinal.data.validation", "longitudinal.fit.candidate", "longitudinal.fit.lmm",
    "longitudinal.simulate", "longitudinal.reporting.figures", "longitudinal.reporting.html",
]


def _imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_library_never_imports_prefect() -> None:
    modules = _imported_after("\n".join(f"import {m}" for m in LIBRARY_MODULES))
    assert not {m for m in modules if m == "prefect" or m.startswith("prefect.")}


def test_great_expectations_is_imported_lazily() -> None:
    modules = _imported_after("import longitudinal.data.validation, longitudinal.data.ingest")
    assert "great_expectations" not in modules
