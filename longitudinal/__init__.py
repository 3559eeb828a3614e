"""longitudinal: ingest, validate, fit candidate linear mixed models, select by AIC/BIC, report.

The library is pure Python over pandas and numpy; it never imports Prefect (the orchestration lives in
the sibling packages ``tasks`` and ``flows``).
"""

from __future__ import annotations

__version__ = "0.1.0"
