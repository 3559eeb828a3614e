from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "config" / "example.yaml"

# Prefect must never phone home or share a home with the developer's own runs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# `longitudinal run` in a test runs as before, with Prefect's temporary server: a background server per test's
# Prefect home would outlive the test. tests/test_background.py turns it on for its own home and stops it.
os.environ["LONGITUDINAL_BACKGROUND"] = "off"


@pytest.fixture(scope="session")
def example_config() -> Path:
    return EXAMPLE_CONFIG


@pytest.fixture(scope="session")
def copy_example_study():
    """A function writing the example study's config to a folder, with its reports there too."""
    return _copy_example_study


def _copy_example_study(tmp_path: Path, **overrides: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    """The example study's config and data in tmp_path, writing its reports there too."""
    import yaml

    document = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    document["data"]["source"] = str(EXAMPLE_CONFIG.parent / document["data"]["source"])
    document["output"] = {"directory": str(tmp_path / "reports")}
    document.update(overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    """Prefect's test harness (a temporary server) with its own PREFECT_HOME, once per test module."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home)}):
        with prefect_test_harness(server_startup_timeout=90):
            yield
