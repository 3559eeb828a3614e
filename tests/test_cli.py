"""The command line as a user meets it: exit codes, one-line errors, the last line of stdout."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(
        "study: s\ndata: {source: x.csv, subject: id, time: t, outcome: y}\n"
        "models: {critrion: aic, candidates: {ri: 'y ~ t + (1 | id)'}}\n"
    )
    result = _cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "unknown key 'models.critrion'" in _one_line_error(result)


@pytest.mark.parametrize("candidate, message", [
    ("score ~ week + age + (1 | id)", "candidate 'ri' uses column 'age', which the data lack; columns are: id, week, score, arm"),
    ("score ~ week + (1 | id", "candidate 'ri' ('score ~ week + (1 | id'): unbalanced parentheses"),
])
def test_run_refuses_a_bad_config_before_prefect_starts(tmp_path: Path, candidate: str, message: str) -> None:
    (tmp_path / "v.csv").write_text("id,week,score,arm\n1,0,1,A\n")
    config = tmp_path / "study.yaml"
    config.write_text(
        "study: s\ndata: {source: v.csv, subject: id, time: week, outcome: score}\n"
        f"models: {{candidates: {{ri: '{candidate}'}}}}\n"
    )
    started = time.perf_counter()
    result = _cli("run", "--config", str(config))
    seconds = time.perf_counter() - started
    assert result.returncode == 2
    assert _one_line_error(result).startswith(f"longitudinal run: error: {message}")
    assert seconds < 5  # Prefect's start-up alone takes 10-15 s: these checks come first


@pytest.mark.parametrize("command", ["run", "validate"])
def test_quadrature_with_a_random_slope_stops_before_any_fit(tmp_path: Path, command: str) -> None:
    (tmp_path / "v.csv").write_text("id,week,event\n1,0,no\n")
    config = tmp_path / "study.yaml"
    config.write_text(
        "study: s\ndata: {source: v.csv, subject: id, time: week, outcome: event, outcome_levels: [no, yes]}\n"
        "models:\n  family: binomial\n  nagq: 5\n"
        "  candidates: {ri: 'event ~ week + (1 | id)', ris: 'event ~ week + (week | id)'}\n"
    )
    started = time.perf_counter()
    result = _cli(command, "--config", str(config))
    assert result.returncode == 2
    assert _one_line_error(result) == (
        f"longitudinal {command}: error: models.nagq: 5 (adaptive Gauss–Hermite quadrature) needs a single scalar "
        "random effect in every candidate, as glmer does, but candidate 'ris' has 2 ((1 + week | id)); set nagq: 1 "
        "(the Laplace approximation), or keep only candidates with one random effect such as '(1 | id)'"
    )
    assert time.perf_counter() - started < 5  # before Prefect starts, and before the data are read
    assert not (tmp_path / "reports").exists()


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = _cli("validate", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "does not exist" in _one_line_error(result)


def test_usage_error_exits_2() -> None:
    result = _cli("run")
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_bad_formula_exits_2_naming_the_candidate(tmp_path: Path) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(
        "study: s\ndata: {source: x.csv, subject: id, time: t, outcome: y}\n"
        "models: {candidates: {nested: 'y ~ t + (1 | 2id)'}}\n"
    )
    result = _cli("validate", "--config", str(config))
    assert result.returncode == 2
    assert "candidate 'nested'" in _one_line_error(result)


def test_simulate_writes_the_file_and_prints_it(tmp_path: Path) -> None:
    out = tmp_path / "sim.parquet"
    result = _cli("simulate", "--out", str(out), "--subjects", "20", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    frame = pd.read_parquet(out)
    assert frame["patient_id"].nunique() == 20


def test_validate_on_the_example(tmp_path: Path, copy_example_study) -> None:
    config = copy_example_study(tmp_path)
    result = _cli("validate", "--config", str(config))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "reports" / "example-trial" / "validations"
    quarantine = pd.read_csv(folder / "quarantine.csv")
    assert len(quarantine) > 0
    assert f"= {2025 - len(quarantine)} analysed + {len(quarantine)} quarantined" in result.stdout


def test_validate_on_the_binary_example(tmp_path: Path) -> None:
    example = ROOT / "config" / "example-binary.yaml"
    config = tmp_path / "study.yaml"
    config.write_text(example.read_text()
                      .replace("source: example-data/", f"source: {example.parent / 'example-data'}/")
                      .replace("directory: ../reports", f"directory: {tmp_path / 'reports'}"))
    result = _cli("validate", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "1800 rows read = 1798 analysed + 2 quarantined" in result.stdout
    folder = Path(result.stdout.strip().splitlines()[-1])
    quarantine = pd.read_csv(folder / "quarantine.csv", keep_default_na=False)
    assert sorted(quarantine["improved"]) == ["Yes", "maybe"]
    assert quarantine["reason"].str.startswith("outcome is neither of data.outcome_levels: ").all()


def test_data_error_exits_1(tmp_path: Path, copy_example_study) -> None:
    data = tmp_path / "renamed.csv"
    data.write_text("patient,week,arm,age,site,score\nA,0,control,50,1,10\n")
    config = copy_example_study(tmp_path)
    text = config.read_text()
    source = str(ROOT / "config" / "example-data" / "trial.csv")
    config.write_text(text.replace(source, str(data)))
    result = _cli("validate", "--config", str(config))
    assert result.returncode == 1
    assert "patient_id" in _one_line_error(result)


@pytest.mark.slow
def test_run_prints_the_run_folder_last(tmp_path: Path, copy_example_study) -> None:
    config = copy_example_study(tmp_path)
    env_home = tmp_path / "prefect-home"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--criterion", "aic"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**__import__("os").environ, "PREFECT_HOME": str(env_home)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (run_dir / "report.html").is_file()
    assert run_dir.parent == tmp_path / "reports" / "example-trial"
    assert pd.read_csv(run_dir / "model_comparison.csv")["selected"].sum() == 1
    assert '"criterion": "aic"' in (run_dir / "selected_model.json").read_text()
