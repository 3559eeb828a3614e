"""The Prefect UI of the test server shows the served study's run and its four artifacts.

Headless Chromium (Debian's ``chromium``; .ci/run installs it) renders the new UI's flow-run page on its
Artifacts tab (``/v2/runs/flow-run/<id>?tab=Artifacts``; the classic UI's page shows artifacts only on
a click). The rendered DOM must hold the run's name and every artifact's key; a screenshot is saved in
the test's tmp folder and copied to tests/output/ui-flow-run.png for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("prefect_server")  # its fixtures assert too: show their values on failure

from prefect_server import STUDY, CompletedRun, PrefectServer, stop_group  # noqa: E402

pytest_plugins = ["prefect_server"]
#: Set by .ci/run: in CI the UI must be opened, so a missing browser fails the test instead of skipping it.
REQUIRE_BROWSER = os.environ.get("LONGITUDINAL_REQUIRE_BROWSER") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None and not REQUIRE_BROWSER,
                       reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it, "
                              "and there a missing browser fails this test)"),
]

OUTPUT = Path(__file__).resolve().parent / "output"
ATTEMPTS = 3


def _chromium(user_data: Path, *args: str) -> list[str]:
    assert shutil.which("chromium"), "chromium is not installed, and LONGITUDINAL_REQUIRE_BROWSER=1 says the UI must be opened"
    return [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", f"--user-data-dir={user_data}", "--virtual-time-budget=15000", *args,
    ]


def _run_chromium(command: list[str]) -> str:
    """Run Chromium in its own process group, returning its stdout; the group is gone afterwards."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        stop_group(process, grace_seconds=5)
    return out.decode("utf-8", errors="replace")


def _render(url: str, user_data: Path) -> str:
    """The page's DOM once the UI has fetched its data (Chromium's virtual time budget lets it)."""
    return _run_chromium(_chromium(user_data, "--dump-dom", url))


def test_the_ui_shows_the_run_with_its_validation_comparison_summary_and_report(first_run: CompletedRun, prefect_server: PrefectServer,
                                                       tmp_path: Path) -> None:
    flow_run = first_run.flow_run
    url = f"{prefect_server.ui_url}/v2/runs/flow-run/{flow_run.id}?tab=Artifacts"
    # README, "Prefect": the UI shows the validation summary, the model-comparison table, a run summary and a
    # link to the report; each under its key (tasks/common.py: artifact_key).
    artifact_keys = [f"{STUDY}-{what}" for what in ("validation", "model-comparison", "summary", "report")]
    wanted = (flow_run.name, *artifact_keys)
    page = ""
    for attempt in range(ATTEMPTS):  # the dump can come back before the UI's API calls have answered
        page = _render(url, tmp_path / f"chromium-{attempt}")
        if all(text in page for text in wanted):
            break
    missing = [text for text in wanted if text not in page]
    assert not missing, f"{url} rendered without {missing} after {ATTEMPTS} attempts:\n{page[:2000]}"

    screenshot = tmp_path / "ui-flow-run.png"
    _run_chromium(_chromium(tmp_path / "chromium-shot", "--window-size=1400,1000", f"--screenshot={screenshot}", url))
    assert screenshot.read_bytes().startswith(b"\x89PNG"), f"chromium wrote no screenshot of {url}"
    OUTPUT.mkdir(exist_ok=True)
    shutil.copyfile(screenshot, OUTPUT / "ui-flow-run.png")
