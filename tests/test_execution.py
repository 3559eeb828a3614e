"""The fit stage on other task runners gives the same answer as the default thread pool."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    from prefect.settings import PREFECT_HOME, PREFECT_TASKS_REFRESH_CACHE, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Refresh the fit cache: each runner must really fit, not reuse the other's cached fits.
    home = str(tmp_path_factory.mktemp("prefect-home"))
    with temporary_settings({PREFECT_HOME: home, PREFECT_TASKS_REFRESH_CACHE: True}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


def _run(config: Path) -> Path:
    from flows.study_pipeline import study_pipeline

    return Path(study_pipeline(config_path=str(config)))


def _with_execution(path: Path, execution: dict | None, reports: Path) -> Path:
    document = yaml.safe_load(path.read_text())
    document["output"] = {"directory": str(reports)}
    if execution:
        document["execution"] = execution
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def threads(harness, tmp_path_factory: pytest.TempPathFactory, copy_example_study) -> Path:
    tmp_path = tmp_path_factory.mktemp("threads")
    return _run(_with_execution(copy_example_study(tmp_path / "study"), None, tmp_path / "reports"))


def _assert_same_answer(left_run: Path, right_run: Path) -> None:
    left = pd.read_csv(left_run / "model_comparison.csv").set_index("model")
    right = pd.read_csv(right_run / "model_comparison.csv").set_index("model")
    assert left["selected"].idxmax() == right["selected"].idxmax()
    pd.testing.assert_series_equal(left["loglik"], right["loglik"], rtol=0, atol=1e-9)
    assert json.loads((right_run / "selected_model.json").read_text())["fixed_effects"] == json.loads(
        (left_run / "selected_model.json").read_text()
    )["fixed_effects"]


def test_process_pool_gives_the_same_answer_as_threads(threads: Path, tmp_path: Path, copy_example_study) -> None:
    config = _with_execution(copy_example_study(tmp_path / "processes"), {"task_runner": "processes"}, tmp_path / "r")
    _assert_same_answer(threads, _run(config))


def test_dask_cluster_gives_the_same_selection_as_threads(threads: Path, tmp_path: Path, copy_example_study) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask_config = _with_execution(
            copy_example_study(tmp_path / "dask"), {"task_runner": "dask", "address": cluster.scheduler_address},
            tmp_path / "dask-reports",
        )
        on_dask = _run(dask_config)
        ran_on_cluster = [name for name in cluster.scheduler.task_prefixes if "fit" in name]
    assert ran_on_cluster, "no fit ran on the Dask cluster"
    _assert_same_answer(threads, on_dask)


def test_dask_without_an_address_starts_a_local_cluster_for_the_run(threads: Path, tmp_path: Path,
                                                                      copy_example_study,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import distributed

    started: list[distributed.LocalCluster] = []

    class RecordedCluster(distributed.LocalCluster):  # type: ignore[misc]
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(distributed, "LocalCluster", RecordedCluster)  # the class prefect-dask starts
    config = _with_execution(copy_example_study(tmp_path / "dask-local"), {"task_runner": "dask"}, tmp_path / "r")
    on_dask = _run(config)
    (cluster,) = started
    assert [name for name in cluster.scheduler.task_prefixes if "fit" in name], "no fit ran on the local cluster"
    assert cluster.status.name == "closed"  # started for the run, and stopped with it
    _assert_same_answer(threads, on_dask)
