"""``FitFailure``: one fit failed numerically, with the optimizer runs made before it failed.

A ``FitError`` (``longitudinal.errors``) that carries the ``OptimizerAttempt`` records, so a failed candidate
still reports what was tried. Raised by the engines' checks and optimizer, caught per candidate by
``fit.candidate``: one bad candidate never sinks the batch.
"""

from __future__ import annotations

from longitudinal.errors import FitError
from longitudinal.records import OptimizerAttempt


class FitFailure(FitError):
    """One fit failed numerically; ``attempts`` holds the optimizer runs made before the failure."""

    def __init__(self, message: str, attempts: tuple[OptimizerAttempt, ...] = ()) -> None:
        super().__init__(message)
        self.attempts = attempts
