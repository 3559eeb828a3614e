"""The fit cache: its key changes with the code that computes a fit (``model/``, ``fit/``, ``records.py``,
``errors.py``), and a re-run on unchanged data reuses every fit."""

from __future__ import annotations

from pathlib import Path

from tasks.fitting import ENGINE_VERSION, engine_version


def test_the_cache_key_covers_every_module_that_computes_a_fit(tmp_path: Path) -> None:
    package = tmp_path / "longitudinal"
    for folder in ("fit/lmm", "model", "reporting"):
        (package / folder).mkdir(parents=True)
    (package / "fit" / "lmm" / "onefactor.py").write_text("x = 1\n")
    (package / "records.py").write_text("r = 1\n")
    before = engine_version(package)
    assert engine_version(package) == before
    (package / "model" / "transforms.py").write_text("y = 2\n")  # a module no list named
    added = engine_version(package)
    assert added != before
    (package / "model" / "transforms.py").rename(package / "model" / "splines.py")  # the same code, renamed
    renamed = engine_version(package)
    assert renamed != added
    (package / "fit" / "lmm" / "glmm.py").write_text("z = 3\n")  # a new engine, deeper down
    assert engine_version(package) != renamed
    renamed = engine_version(package)
    (package / "records.py").write_text("r = 2\n")
    assert engine_version(package) != renamed


def test_code_that_only_reads_fits_does_not_change_the_key(tmp_path: Path) -> None:
    package = tmp_path / "longitudinal"
    (package / "fit").mkdir(parents=True)
    (package / "reporting").mkdir()
    (package / "fit" / "candidate.py").write_text("x = 1\n")
    before = engine_version(package)
    (package / "reporting" / "html.py").write_text("y = 2\n")
    (package / "simulate.py").write_text("z = 3\n")
    assert engine_version(package) == before


def test_the_installed_library_has_a_version() -> None:
    assert len(ENGINE_VERSION) == 16 and ENGINE_VERSION == engine_version()
