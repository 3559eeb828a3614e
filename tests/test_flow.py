"""The whole pipeline on the bundled example study, as a Prefect flow under the test harness."""

from __future__ import annotations

import json
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from longitudinal.inference.criteria import COLUMNS

pytestmark = pytest.mark.slow
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "config" / "example-data" / "trial.csv"


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
        assert set(fe) == {"term", "estimate", "std_error", "ci_low", "ci_high", "p_value", "df"}
        assert fe["ci_low"] < fe["estimate"] < fe["ci_high"]
        assert 1 < fe["df"] < selected["n_obs"]  # Satterthwaite's, the default
    assert selected["df_method"] == "satterthwaite"
    assert selected["residual_sd"] > 0
    low, high = selected["residual_sd_ci"]
    assert low < selected["residual_sd"] < high
    for vc in selected["random_effects"]:
        assert vc["ci_low"] <= vc["sd"] <= vc["ci_high"]


def test_the_example_writes_marginal_means_and_contrasts(example_run: Path) -> None:
    means = pd.read_csv(example_run / "marginal_means.csv")
    contrasts = pd.read_csv(example_run / "contrasts.csv")
    assert list(means.columns) == ["arm", "week", "estimate", "se", "df", "ci_low", "ci_high"]
    assert sorted(set(means["week"])) == [0, 3, 7] and set(means["arm"]) == {"control", "treatment"}
    assert list(contrasts["contrast"]) == ["treatment - control"] * 3
    assert (contrasts["adjustment"] == "none").all()


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
    assert set(manifest["timings"]["stages"]) == {"ingest", "validate", "fit", "select", "infer", "report"}
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


# ---------------------------------------------------------------- what the report shows is what the run wrote


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _report_tables(run: Path) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed((run / "report.html").read_text(encoding="utf-8"))
    return {" | ".join(table[0]): table[1:] for table in parser.tables if table}


def test_the_report_shows_the_runs_own_comparison_selection_and_counts(example_run: Path) -> None:
    from longitudinal.reporting.html import format_fixed, format_number

    tables = _report_tables(example_run)
    comparison = next(rows for header, rows in tables.items() if header.startswith("Model | Formula | Fit | k | logLik"))
    csv = pd.read_csv(example_run / "model_comparison.csv")
    assert len(comparison) == len(csv)
    for cells, (_, row) in zip(comparison, csv.iterrows()):
        assert cells[0].split(" ")[0] == row["model"]
        assert ("✔ selected" in cells[0]) == bool(row["selected"])
        assert cells[1] == row["formula"]
        assert cells[3] == str(row["n_params"])
        assert cells[4:6] == [format_fixed(row["loglik"]), format_fixed(row["aic"])]
        assert cells[7:10] == [format_fixed(row["bic"]), format_fixed(row["delta_aic"]), format_fixed(row["delta_bic"])]

    selected = json.loads((example_run / "selected_model.json").read_text())
    fixed = tables["Term | Estimate | SE | 95% CI | df | t | p"]  # Satterthwaite's df, the default
    assert [cells[0] for cells in fixed] == [fe["term"] for fe in selected["fixed_effects"]]
    for cells, fe in zip(fixed, selected["fixed_effects"]):
        assert cells[1:3] == [format_number(fe["estimate"]), format_number(fe["std_error"])]
        assert cells[4] == format_fixed(fe["df"], 1)
    random = next(rows for header, rows in tables.items() if header == "Group | Term | SD | 95% CI (profile) | Variance")
    shown = {(cells[0], cells[1]): cells[2:4] for cells in random}
    for vc in selected["random_effects"]:
        assert shown[(vc["group"], vc["term"])] == [
            format_number(vc["sd"]), f"{format_number(vc['ci_low'])} to {format_number(vc['ci_high'])}"]
    low, high = selected["residual_sd_ci"]
    assert shown[("Residual", "")] == [format_number(selected["residual_sd"]),
                                       f"{format_number(low)} to {format_number(high)}"]

    rows = json.loads((example_run / "manifest.json").read_text())["rows"]
    page = (example_run / "report.html").read_text(encoding="utf-8")
    assert (f"Rows read = rows analysed + rows quarantined: {rows['read']:,} = {rows['analysed']:,} + "
            f"{rows['quarantined']:,}.") in page


def test_selected_model_json_holds_the_random_part_and_the_lowest_criterion(example_run: Path) -> None:
    selected = json.loads((example_run / "selected_model.json").read_text())
    table = pd.read_csv(example_run / "model_comparison.csv")
    competing = table[table["loglik"].notna()]
    assert selected["model"] == competing.loc[competing["bic"].idxmin(), "model"]
    assert (competing["bic"] >= competing.loc[competing["selected"], "bic"].item()).all()
    # The example selects (week | patient_id): two SDs and their correlation, a REML criterion of −2 × logLik.
    assert [(vc["group"], vc["term"]) for vc in selected["random_effects"]] == [
        ("patient_id", "(Intercept)"), ("patient_id", "week")]
    assert all(vc["sd"] > 0 for vc in selected["random_effects"])
    ((correlation,),) = [[(c["term1"], c["term2"], c["corr"]) for c in selected["correlations"]]]
    assert correlation[:2] == ("(Intercept)", "week") and -1 < correlation[2] < 1
    assert selected["reml_criterion"] == pytest.approx(-2 * selected["loglik"], rel=1e-12)
    assert selected["converged"] and not selected["singular"]


def test_a_rerun_on_unchanged_data_reuses_every_fit(example_run: Path) -> None:
    from flows.study_pipeline import study_pipeline
    from prefect import get_client

    config = next((example_run.parents[2]).glob("*.yaml"))
    again = Path(study_pipeline(config_path=str(config)))
    assert again != example_run
    flow_run_id = json.loads((again / "manifest.json").read_text())["prefect_flow_run_id"]
    # Task-run states reach the server through the client's background event stream: poll briefly.
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs()
            children = {str(run.id) for run in client.read_flow_runs()
                        if run.parent_task_run_id and any(str(t.id) == str(run.parent_task_run_id) and
                                                          str(t.flow_run_id) == flow_run_id for t in runs)}
        fits = [t for t in runs if t.name.startswith(("fit-", "refit-")) and str(t.flow_run_id) in children | {flow_run_id}]
        settled = len(fits) == 4 and all(t.state is not None and t.state.is_final() for t in fits)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(fits) == 4, [t.name for t in fits]  # three ML fits and the REML refit
    assert all(t.state is not None and t.state.name == "Cached" for t in fits), [(t.name, t.state) for t in fits]
    pd.testing.assert_frame_equal(pd.read_csv(again / "model_comparison.csv"), pd.read_csv(example_run / "model_comparison.csv"))
    assert json.loads((again / "selected_model.json").read_text()) == json.loads((example_run / "selected_model.json").read_text())


def test_the_criterion_decides_the_selection_where_aic_and_bic_disagree(harness, tmp_path: Path, copy_example_study) -> None:
    from flows.study_pipeline import study_pipeline
    from longitudinal.simulate import SimulationSpec, simulate_trial, write_table

    # 60 simulated patients with a small random slope (SD 0.15): the slope's correlated model is 3.5 AIC
    # units better than the random intercept and 4.5 BIC units worse (measured with the engine).
    data = write_table(simulate_trial(SimulationSpec(n_subjects=60, seed=1, random_slope_sd=0.15)), tmp_path / "t.csv")
    config = copy_example_study(tmp_path)
    config.write_text(config.read_text().replace(str(EXAMPLE_DATA), str(data)))
    by_bic = json.loads((Path(study_pipeline(config_path=str(config))) / "selected_model.json").read_text())
    by_aic = json.loads((Path(study_pipeline(config_path=str(config), criterion="aic")) / "selected_model.json").read_text())
    assert (by_bic["criterion"], by_bic["model"]) == ("bic", "ri")
    assert (by_aic["criterion"], by_aic["model"]) == ("aic", "ris")


# ------------------------------------------------------------------------ the MMRM example (issue 13)

MMRM_CONFIG = Path(__file__).resolve().parents[1] / "config" / "example-mmrm.yaml"


@pytest.fixture(scope="module")
def mmrm_run(harness, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    from flows.study_pipeline import study_pipeline

    folder = tmp_path_factory.mktemp("mmrm")
    document = yaml.safe_load(MMRM_CONFIG.read_text())
    document["data"]["source"] = str(MMRM_CONFIG.parent / document["data"]["source"])
    document["output"] = {"directory": str(folder / "reports")}
    config = folder / "study.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return Path(study_pipeline(config_path=str(config)))


def test_the_mmrm_study_compares_structures_with_random_effects_candidates(mmrm_run: Path) -> None:
    from longitudinal.fit.candidate import fit_candidate

    table = pd.read_csv(mmrm_run / "model_comparison.csv").set_index("model")
    candidates = yaml_candidates()
    assert set(table.index) == set(candidates)
    assert table["converged"].all() and table["n_obs"].nunique() == 1
    # k = 12 fixed effects + the structure's parameters (+ the random intercept's variance), as nlme counts
    expected_k = {"us": 12 + 21, "toeph": 12 + 11, "ar1h": 12 + 7, "csh": 12 + 7, "ar1": 12 + 2, "cs": 12 + 2,
                  "ri": 12 + 2, "ri_ar1": 12 + 3, "ri_ar1h": 12 + 8, "ri_sp_exp": 12 + 3}
    assert table["n_params"].to_dict() == expected_k
    # compound symmetry and the random intercept are one model (positive correlation): the same likelihood
    assert table.loc["cs", "loglik"] == pytest.approx(table.loc["ri", "loglik"], abs=1e-4)
    # the pipeline's numbers are fit_candidate's on the analysed rows
    data = pd.read_parquet(mmrm_run / "data.parquet")
    direct = fit_candidate(data, "ar1h", candidates["ar1h"])
    assert table.loc["ar1h", "loglik"] == pytest.approx(direct.loglik, abs=1e-6)
    assert table.loc[table["selected"]].index.item() == table["aic"].idxmin()


def yaml_candidates() -> dict[str, str]:
    import yaml

    return dict(yaml.safe_load(MMRM_CONFIG.read_text())["models"]["candidates"])


def test_the_mmrm_report_shows_the_structure_its_matrix_and_the_residual_correlation(mmrm_run: Path) -> None:
    selected = json.loads((mmrm_run / "selected_model.json").read_text())
    covariance = selected["covariance"]
    assert covariance is not None and selected["method"] == "REML"
    assert covariance["visit"] == "week" and covariance["labels"] == ["0", "2", "4", "8", "12", "16"]
    matrix = covariance["matrix"]
    assert len(matrix) == 6 and all(len(row) == 6 for row in matrix)
    assert all(abs(matrix[i][j] - matrix[j][i]) < 1e-9 for i in range(6) for j in range(6))
    figures = {p.stem for p in (mmrm_run / "figures").glob("*.png")}
    assert {"residual_covariance", "residual_correlation"} <= figures
    report = (mmrm_run / "report.html").read_text()
    assert f"Residual covariance: {covariance['description']}" in report
    assert "Residual correlation within subjects" in report
    assert f"{matrix[0][1]:.4g}" in report  # the covariance table shows the fitted matrix


# ---------------------------------------------------------------------- the binary example (issue 14)

BINARY_CONFIG = Path(__file__).resolve().parents[1] / "config" / "example-binary.yaml"


def _binary_study(folder: Path, **models: object) -> Path:
    """The binary example's config in ``folder``, its reports there too, ``models`` keys replaced."""
    import yaml

    from longitudinal.config import read_yaml

    document = read_yaml(BINARY_CONFIG.read_text())  # as the config reads it: [no, yes] stays text
    document["data"]["source"] = str(BINARY_CONFIG.parent / document["data"]["source"])
    document["output"] = {"directory": str(folder / "reports")}
    document["models"].update(models)
    config = folder / "study.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def binary_run(harness, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flows.study_pipeline import study_pipeline

    return Path(study_pipeline(config_path=str(_binary_study(tmp_path_factory.mktemp("binary")))))


def test_the_binary_study_compares_its_three_candidates_with_k_as_glmer_counts(binary_run: Path) -> None:
    from longitudinal.fit.candidate import fit_candidate

    table = pd.read_csv(binary_run / "model_comparison.csv").set_index("model")
    assert set(table.index) == {"ri", "ris", "ris_uncorrelated"}
    assert table["converged"].all() and table["n_obs"].nunique() == 1
    # k = 4 fixed effects + θ (1, 3 and 2 covariance parameters), no residual variance
    assert table["n_params"].to_dict() == {"ri": 4 + 1, "ris": 4 + 3, "ris_uncorrelated": 4 + 2}
    assert table.loc[table["selected"]].index.item() == table["bic"].idxmin()
    # the pipeline's numbers are fit_candidate's on the analysed rows, fitted as a binomial GLMM
    data = pd.read_parquet(binary_run / "data.parquet")
    direct = fit_candidate(data, "ris", "improved ~ week * arm + (week | patient_id)", family="binomial")
    assert table.loc["ris", "loglik"] == pytest.approx(direct.loglik, abs=1e-6)


def test_the_binary_studys_selected_model_is_its_ml_fit(binary_run: Path) -> None:
    selected = json.loads((binary_run / "selected_model.json").read_text())
    table = pd.read_csv(binary_run / "model_comparison.csv").set_index("model")
    assert (selected["family"], selected["method"], selected["criterion"]) == ("binomial", "ML", "bic")
    assert selected["model"] == table.loc[table["selected"]].index.item()
    assert selected["loglik"] == pytest.approx(table.loc[selected["model"], "loglik"], abs=1e-9)  # no refit
    assert selected["reml_criterion"] is None
    assert {fe["term"] for fe in selected["fixed_effects"]} == {"(Intercept)", "week", "armtreatment",
                                                                "week:armtreatment"}
    manifest = json.loads((binary_run / "manifest.json").read_text())
    assert set(manifest["timings"]["fits"]) == {"ri", "ris", "ris_uncorrelated"}  # no REML entry
    assert set(manifest["timings"]["stages"]) == {"ingest", "validate", "fit", "select", "infer", "report"}


def test_the_binary_studys_validation_quarantines_the_answers_that_are_not_levels(binary_run: Path) -> None:
    quarantine = pd.read_csv(binary_run / "quarantine.csv", keep_default_na=False)
    assert sorted(quarantine["improved"]) == ["Yes", "maybe"]
    assert set(quarantine["reason"]) == {
        f"outcome is neither of data.outcome_levels: '{value}' (column 'improved'); allowed: 'no' (0) or 'yes' (1), "
        "compared as text, case-sensitive" for value in ("Yes", "maybe")}
    validation = json.loads((binary_run / "validation.json").read_text())
    assert validation["quarantine_reasons"]["outcome_is_binary"] == 2
    assert (validation["rows_read"], validation["rows_analysed"]) == (1800, 1798)
    varies = next(e for e in validation["expectations"] if e["name"] == "outcome_varies")
    assert varies["success"] and varies["level"] == "table"
    data = pd.read_parquet(binary_run / "data.parquet")
    assert set(data["improved"]) == {0.0, 1.0}


def test_quadrature_with_a_random_slope_stops_the_run_before_any_fit(harness, tmp_path: Path) -> None:
    # README, "Binary and count outcomes": nAGQ > 1 needs one scalar random effect in every candidate.
    from flows.study_pipeline import study_pipeline
    from longitudinal.errors import ConfigError

    config = _binary_study(tmp_path, nagq=5)
    with pytest.raises(ConfigError, match=(
        r"^models.nagq: 5 \(adaptive Gauss–Hermite quadrature\) needs a single scalar random effect in every "
        r"candidate, as glmer does, but candidate 'ris' has 2 \(\(1 \+ week \| patient_id\)\); set nagq: 1"
    )):
        study_pipeline(config_path=str(config))
    assert not (tmp_path / "reports").exists()


def test_quadrature_fits_a_random_intercept_study(harness, tmp_path: Path) -> None:
    from flows.study_pipeline import study_pipeline

    config = _binary_study(tmp_path, nagq=9, candidates={"ri": "improved ~ week * arm + (1 | patient_id)"})
    run = Path(study_pipeline(config_path=str(config)))
    selected = json.loads((run / "selected_model.json").read_text())
    assert (selected["model"], selected["family"], selected["nagq"], selected["method"]) == ("ri", "binomial", 9, "ML")


def test_prefect_keeps_no_fit_in_memory_for_the_rest_of_the_flow_run(harness) -> None:
    # Prefect's default (cache_result_in_memory) keeps every persisted result in the result store's in-memory
    # cache until the flow run ends: at two million rows the candidates' per-row arrays (48 MB a fit) stayed
    # through the refit, the inference and the report, however the flow let go of them.
    import uuid

    from prefect import flow
    from prefect.results import get_result_store

    from longitudinal.simulate import SimulationSpec, simulate_trial
    from tasks.fitting import fit

    visits = simulate_trial(SimulationSpec(n_subjects=30, seed=5))

    def held(task: object) -> tuple[bool, bool]:
        @flow(name="hold-a-fit")
        def hold() -> tuple[bool, bool]:
            computed = task(visits, "ri", "score ~ week + (1 | patient_id)", "ML",  # type: ignore[operator]
                            "lme4-style", uuid.uuid4().hex, "gaussian", 1)
            cached = [record.result for record in get_result_store().cache.values()]
            return computed.usable, any(result is computed for result in cached)
        return hold()

    assert held(fit) == (True, False)
    assert held(fit.with_options(cache_result_in_memory=True)) == (True, True)  # what the option prevents
