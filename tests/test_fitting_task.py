"""The fit task's cache key and log wording for binomial and Poisson studies (issue 14)."""

from __future__ import annotations

from typing import Any

from tasks.fitting import describe_family, fit_cache_key


def _key(**changes: Any) -> str:
    parameters = {"data_hash": "ab" * 32, "name": "ri", "formula": "y ~ t + (1 | id)", "method": "ML",
                  "engine": "lme4-style", "family": "gaussian", "nagq": 1} | changes
    return fit_cache_key(None, parameters)  # type: ignore[arg-type]  # the key reads the parameters only


def test_the_cache_key_tells_families_and_quadrature_apart() -> None:
    keys = {_key(), _key(family="binomial"), _key(family="poisson"), _key(family="binomial", nagq=5),
            _key(family="binomial", nagq=7)}
    assert len(keys) == 5
    assert _key(family="binomial", nagq=5) == _key(family="binomial", nagq=5)


def test_log_lines_name_the_family_its_link_and_the_approximation() -> None:
    assert describe_family("gaussian", 1) == "gaussian (identity link)"
    assert describe_family("binomial", 1) == "binomial (logit link, Laplace)"
    assert describe_family("poisson", 7) == "poisson (log link, nAGQ 7)"
