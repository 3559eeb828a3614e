"""Small helpers shared by the task modules."""

from __future__ import annotations

import re


def artifact_key(study: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{study}-{what}".lower()).strip("-")
