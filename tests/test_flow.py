"""The whole pipeline on the bundled example study, as a Prefect flow under the test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from longitudinal.selection import COLUMNS

pytestmark = pytest.mark.slow
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "config" / "example-data" / "trial.csv"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home)}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture(scope="module")
def example_run(harness, tmp_path_factory: pytest.TempPathFactory, copy_example_study) -> Path:
    from flows.study_pipeline import study_pipeline

    config = copy_example_study(tmp_path_factory.mktemp("study"))
    return Path(study_pipeline(config_path=str(config)))


def test_run_folder_holds_every_output(example_run: Path) -> None:
    expected = {"report.html", "figures", "model_comparison.csv", "selected_model.json", "validation.json",
                "quarantine.csv", "data.parquet", "manifest.json"}
    assert expected <= {p.name for p in example_run.iterdir()}
    assert (example_run.parent / "latest").resolve() == example_run.resolve()
    assert not [p for p in example_run.parent.iterdir() if p.name.startswith(".staging-")]
    figures = {p.stem for p in (example_run / "figures").glob("*.png")}
    assert {"trajectories", "model_comparison", "coefficients", "random_effects", "residuals_vs_fitted", "qq",
            "residuals_over_time", "observed_vs_fitted"} <= figures


def test_model_comparison_contract(example_run: Path) -> None:
    table = pd.read_csv(example_run / "model_comparison.csv")
    assert tuple(table.columns) == COLUMNS
    assert set(table["model"]) == {"ri", "ris", "ris_uncorrelated"}
    assert table["selected"].sum() == 1
    assert table["converged"].all()
    assert table["n_obs"].nunique() == 1


def test_selected_model_contract(example_run: Path) -> None:
    selected = json.loads((example_run / "selected_model.json").read_text())
    assert selected["method"] == "REML"
    assert selected["criterion"] == "bic"
    table = pd.read_csv(example_run / "model_comparison.csv")
    assert selected["model"] == table.loc[table["selected"], "model"].item()
    terms = {fe["term"] for fe in selected["fixed_effects"]}
    assert {"(Intercept)", "week", "armtreatment", "week:armtreatment", "age"} <= terms
    for fe in selected["fixed_effects"]:
        assert set(fe) == {"term", "estimate", "std_error", "ci_low", "ci_high", "p_value"}
        assert fe["ci_low"] < fe["estimate"] < fe["ci_high"]
    assert selected["residual_sd"] > 0


def test_every_row_is_accounted_for(example_run: Path) -> None:
    manifest = json.loads((example_run / "manifest.json").read_text())
    quarantine = pd.read_csv(example_run / "quarantine.csv")
    data = pd.read_parquet(example_run / "data.parquet")
    rows = manifest["rows"]
    assert rows["read"] == rows["analysed"] + rows["quarantined"]
    assert rows["analysed"] == len(data) and rows["quarantined"] == len(quarantine)
    assert len(quarantine) > 0 and quarantine["reason"].notna().all()
    assert {"source_file", "source_line", "reason"} <= set(quarantine.columns)
    validation = json.loads((example_run / "validation.json").read_text())
    assert validation["rows_read"] == rows["read"]


def test_manifest_records_provenance_and_timings(example_run: Path) -> None:
    manifest = json.loads((example_run / "manifest.json").read_text())
    assert set(manifest["timings"]["stages"]) == {"ingest", "validate", "fit", "select", "report"}
    assert {"ri", "ris", "ris_uncorrelated"} <= set(manifest["timings"]["fits"])
    assert manifest["prefect_flow_run_id"]
    assert len(manifest["config"]["sha256"]) == 64
    assert all(len(f["sha256"]) == 64 for f in manifest["inputs"])
    assert manifest["versions"]["prefect"]


def test_report_is_self_contained(example_run: Path) -> None:
    html = (example_run / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "src=\"http" not in html and "href=\"http" not in html


def test_failed_validation_fails_the_flow_before_fits_and_keeps_latest(harness, tmp_path: Path, copy_example_study) -> None:
    from flows.study_pipeline import study_pipeline
    from longitudinal.errors import DataError

    data = tmp_path / "two-subjects.csv"
    data.write_text("patient_id,week,arm,age,site,score\nA,0,control,50,1,10\nA,1,control,50,1,11\n"
                    "B,0,treatment,40,2,12\nB,1,treatment,40,2,13\n")
    config = copy_example_study(tmp_path)
    config.write_text(config.read_text().replace(str(EXAMPLE_DATA), str(data)))
    with pytest.raises(DataError, match=r"only 2 subjects left after the row checks \(3 needed\)"):
        study_pipeline(config_path=str(config))
    study_dir = tmp_path / "reports" / "example-trial"
    # No run folder, no staging folder, no latest: only the study's curated data and the failed checks.
    assert sorted(p.name for p in study_dir.iterdir()) == ["curated", "validations"]
    (checks,) = (study_dir / "validations").iterdir()
    assert {"validation.json", "quarantine.csv"} <= {p.name for p in checks.iterdir()}
