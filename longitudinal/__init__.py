"""longitudinal: ingest, validate, fit candidate linear mixed models, select by AIC/BIC, report.

The library is pure Python over pandas and numpy; it never imports Prefect (the orchestration lives in
the sibling packages ``tasks`` and ``flows``). From Python (see ``longitudinal.api``)::

    import longitudinal
    m = longitudinal.fit("Reaction ~ Days + (Days | Subject)", df)   # REML, as lmer
    m.summary(); m.fixed_effects; m.predict(newdata)
    longitudinal.compare([m0, m])                                    # as lme4's anova

``longitudinal.fit`` is both the fitting function and the engines' sub-package (``longitudinal.fit.lmm``,
``longitudinal.fit.candidate``, ...). The sub-package is imported here first (its ``__init__`` is empty: cheap),
which binds it as the attribute ``fit`` of this module; the function is bound after it and resolves any other
attribute to the package (``PackageFunction``), so both uses keep working. Loading a module of the
sub-package later binds it on the sub-package, never again on this module.

The API itself (``longitudinal.api``: the engines, pandas, scipy) is imported on first use, so that
``import longitudinal`` — which every command of the CLI does — costs milliseconds.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

import longitudinal.fit  # noqa: F401  (bound as this module's attribute now, before the function replaces it)

if TYPE_CHECKING:
    from longitudinal.api import ConvergenceWarning, MixedModel, SingularFitWarning, compare
    from longitudinal.api import fit_model as fit

__version__ = "0.1.0"

__all__ = ["ConvergenceWarning", "MixedModel", "SingularFitWarning", "compare", "fit", "__version__"]

#: Public names served by ``longitudinal.api``, imported when first read (PEP 562).
_API_NAMES = frozenset({"ConvergenceWarning", "MixedModel", "SingularFitWarning", "compare", "api"})


class PackageFunction:
    """``longitudinal.fit``: ``longitudinal.api.fit_model`` when called, the engines' package
    ``longitudinal.fit`` for attribute access, so that ``longitudinal.fit(formula, df)``,
    ``longitudinal.fit.candidate.fit_candidate`` and ``import longitudinal.fit.lmm as lmm`` all work (the last
    reads the attribute through the parent)."""

    __name__ = "fit"
    __qualname__ = "fit"
    __module__ = "longitudinal"

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        from longitudinal.api import fit_model

        return fit_model.__doc__

    @property
    def __signature__(self) -> Any:  # help(), Jupyter's ``fit?`` and IDEs show fit_model's parameters
        import inspect

        from longitudinal.api import fit_model

        return inspect.signature(fit_model)

    def __call__(self, *args: Any, **kwargs: Any) -> MixedModel:
        from longitudinal.api import fit_model

        return fit_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(sys.modules["longitudinal.fit"], name)

    def __repr__(self) -> str:
        return "<function longitudinal.fit (also the package longitudinal.fit)>"


if not TYPE_CHECKING:  # type checkers see ``fit_model`` itself, with its signature
    fit = PackageFunction()


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        api = importlib.import_module("longitudinal.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'longitudinal' has no attribute {name!r}")
