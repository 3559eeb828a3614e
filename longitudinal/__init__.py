"""longitudinal: ingest, validate, fit candidate linear mixed models, select by AIC/BIC, report.

The library is pure Python over pandas and numpy; it never imports Prefect (the orchestration lives in
the sibling packages ``tasks`` and ``flows``). From Python (see ``longitudinal.api``)::

    import longitudinal
    m = longitudinal.fit("Reaction ~ Days + (Days | Subject)", df)   # REML, as lmer
    m.summary(); m.fixed_effects; m.predict(newdata)
    longitudinal.compare([m0, m])                                    # as lme4's anova

``longitudinal.fit`` is both the fitting function and the engines' sub-package (``longitudinal.fit.lmm``,
``longitudinal.fit.candidate``, ...). Importing ``longitudinal.api`` loads that sub-package first, which binds
the package as the attribute ``fit`` of this module; the function is bound after it, and resolves any other
attribute to the package (``api.PackageFunction``), so both uses keep working.
"""

from __future__ import annotations

from longitudinal.api import ConvergenceWarning, MixedModel, SingularFitWarning, compare
from longitudinal.api import fit as fit

__version__ = "0.1.0"

__all__ = ["ConvergenceWarning", "MixedModel", "SingularFitWarning", "compare", "fit", "__version__"]
