"""The package builds as a wheel that carries everything the README's Python example needs.

The wheel is built from this checkout (``python -m build --wheel --no-isolation``: hatchling from the dev
extras, no network), installed with ``pip install --no-deps --target`` into a temporary folder, and the README's
example runs in a fresh interpreter from a folder outside the repository with ``PYTHONPATH`` = that folder only.
The environment's site-packages provide numpy, pandas and scipy, as ``pip install`` of the wheel's dependencies
would; they also hold this checkout's editable install, which comes after ``PYTHONPATH`` on ``sys.path``: the
example checks that ``longitudinal`` is the wheel's, and a module missing from the wheel cannot be found in the
checkout (a package's submodules are looked up in its own folder only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from test_readme_example import readme_example

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="the dev extras' build package builds the wheel")
    pytest.importorskip("hatchling", reason="the dev extras' hatchling builds the wheel without the network")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (built,) = out.glob("longitudinal-*.whl")
    return built


def test_the_wheel_holds_the_three_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("longitudinal/__init__.py", "longitudinal/api.py", "longitudinal/fit/candidate.py",
                   "tasks/__init__.py", "flows/cli.py"):
        assert module in names, module
    assert not any(name.startswith(("tests/", "config/", "reports/")) for name in names)


def test_the_readme_example_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target),
         str(wheel)], capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    (elsewhere / "example.py").write_text(
        "import longitudinal\n"
        f"assert longitudinal.__file__.startswith({str(target)!r}), longitudinal.__file__\n"
        + readme_example()
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = str(target)
    result = subprocess.run([sys.executable, "example.py"], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Linear mixed model fit by REML" in result.stdout
