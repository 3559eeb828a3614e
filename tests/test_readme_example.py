"""The README's Python example ("Use it from Python") runs as written, so it cannot rot.

The block is the ```python fence right after the ``<!-- readme-example`` comment; ``readme_example()`` is shared
with ``tests/test_api_package.py``, which runs the same block against the installed wheel.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- readme-example"


def readme_example(readme: Path = README) -> str:
    """The Python code of the fence following the README's ``<!-- readme-example`` comment."""
    text = readme.read_text()
    assert text.count(MARKER) == 1, f"{readme} must mark exactly one example with {MARKER!r}"
    found = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], flags=re.DOTALL)
    assert found is not None, f"no ```python fence after {MARKER!r} in {readme}"
    return found.group(1)


def test_the_readme_example_runs_and_prints_what_it_promises() -> None:
    code = readme_example()
    assert "longitudinal.fit(" in code and "longitudinal.compare(" in code and ".predict(" in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    out = printed.getvalue()
    assert "Linear mixed model fit by REML" in out
    assert "Satterthwaite" in out
    assert "aic_weight" in out and "chisq" in out
