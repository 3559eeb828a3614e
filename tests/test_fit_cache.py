"""The fit cache: its key changes with any library code, and a re-run on unchanged data reuses every fit."""

from __future__ import annotations

from pathlib import Path

from tasks.fitting import ENGINE_VERSION, engine_version


def test_the_cache_key_covers_every_module_of_the_library(tmp_path: Path) -> None:
    package = tmp_path / "longitudinal"
    (package / "fit").mkdir(parents=True)
    (package / "engine.py").write_text("x = 1\n")
    before = engine_version(package)
    assert engine_version(package) == before
    (package / "fit" / "transforms.py").write_text("y = 2\n")  # a module no list named
    added = engine_version(package)
    assert added != before
    (package / "fit" / "transforms.py").rename(package / "fit" / "splines.py")  # the same code, renamed
    assert engine_version(package) != added


def test_the_installed_library_has_a_version() -> None:
    assert len(ENGINE_VERSION) == 16 and ENGINE_VERSION == engine_version()
