"""README promises about the command line that no other test checks, each from ``.venv/bin/longitudinal``
as a user runs it (or, for a bug, through ``flows.cli.main`` with the bug injected)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LONGITUDINAL = Path(sys.executable).parent / "longitudinal"
DATA = "id,week,score,arm\n" + "".join(f"{s},{w},{10 * s + w},{'AB'[s % 2]}\n" for s in (1, 2, 3, 4) for w in (0, 1, 2))


def _study(tmp_path: Path, data: bytes, *, candidate: str = "score ~ week + arm + (1 | id)") -> Path:
    (tmp_path / "visits.csv").write_bytes(data)
    document = {
        "study": "s",
        "data": {"source": "visits.csv", "subject": "id", "time": "week", "outcome": "score", "categorical": ["arm"]},
        "models": {"candidates": {"ri": candidate}},
        "output": {"directory": "reports"},
    }
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


def _longitudinal(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LONGITUDINAL), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


# ------------------------------------------------------------------- "What happens when...": UTF-16


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_a_utf16_file_is_refused_with_one_line_saying_how_to_export_it(tmp_path: Path, encoding: str) -> None:
    # Excel's and Notepad's "Unicode text" is UTF-16 with a byte-order mark; other tools write it without.
    config = _study(tmp_path, DATA.encode(encoding))
    result = _longitudinal("validate", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, result
    (line,) = result.stderr.splitlines()
    assert line.startswith("longitudinal validate: error: visits.csv: "), line
    assert "UTF-8" in line and ("export" in line or "save it as" in line), line
    assert not (tmp_path / "reports" / "s" / "curated" / "registry.json").exists()  # nothing was ingested


# ------------------------------------------------------------------------------------ --debug


def test_debug_shows_the_traceback_of_a_data_error_and_without_it_one_line(tmp_path: Path) -> None:
    config = _study(tmp_path, b"")  # an empty file: a data error, exit 1
    plain = _longitudinal("validate", "--config", str(config), cwd=tmp_path)
    assert plain.returncode == 1
    (line,) = plain.stderr.splitlines()
    assert line.startswith("longitudinal validate: error: no rows to analyse: visits.csv is empty")
    debug = _longitudinal("validate", "--config", str(config), "--debug", cwd=tmp_path)
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):"), debug.stderr
    assert any(line.startswith("longitudinal.errors.DataError: no rows to analyse: visits.csv is empty")
               for line in debug.stderr.splitlines()), debug.stderr


def test_run_debug_shows_the_traceback_of_a_config_error(tmp_path: Path) -> None:
    # Refused before Prefect starts (about a second): a formula naming a column the data lack.
    config = _study(tmp_path, DATA.encode(), candidate="score ~ week + age + (1 | id)")
    plain = _longitudinal("run", "--config", str(config), cwd=tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    (line,) = plain.stderr.splitlines()
    assert "candidate 'ri' uses column 'age', which the data lack" in line
    debug = _longitudinal("run", "--config", str(config), "--debug", cwd=tmp_path)
    assert debug.returncode != 0
    assert "Traceback (most recent call last):" in debug.stderr
    assert "candidate 'ri' uses column 'age', which the data lack" in debug.stderr.rstrip().splitlines()[-1]


def test_a_bug_is_one_line_pointing_at_debug_and_debug_raises_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import flows.cli

    def broken(args: object) -> int:
        raise KeyError("visits")  # a programming error, not one of the project's own

    monkeypatch.setattr(flows.cli, "_validate", broken)
    config = _study(tmp_path, DATA.encode())
    assert flows.cli.main(["validate", "--config", str(config)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("longitudinal validate: internal error: KeyError: 'visits' "
                    "(run again with --debug for the traceback, and please report it)")
    with pytest.raises(KeyError, match="visits"):
        flows.cli.main(["validate", "--config", str(config), "--debug"])


def test_debug_keeps_the_exit_code_of_a_config_error(tmp_path: Path) -> None:
    config = _study(tmp_path, DATA.encode(), candidate="score ~ week + age + (1 | id)")
    debug = _longitudinal("run", "--config", str(config), "--debug", cwd=tmp_path)
    assert "Traceback (most recent call last):" in debug.stderr
    assert debug.returncode == 2


# ------------------------------------------------------------------------- Outputs: manifest.json


def test_the_manifest_records_the_git_commit_of_the_code_that_ran(tmp_path: Path) -> None:
    from longitudinal.reporting.run_folder import build_manifest

    config = tmp_path / "study.yaml"
    config.write_text("study: s\n")
    def head() -> str:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()

    before = head()  # others may commit meanwhile: the commit is HEAD before or after the manifest is built
    manifest = build_manifest(config_path=config, config={}, files=(), run_id="r", flow_run_id=None,
                              timings={}, counts={"read": 0, "analysed": 0, "quarantined": 0}, selected="ri")
    assert manifest["git_commit"] in {before, head()}
    assert len(manifest["git_commit"]) == 40
