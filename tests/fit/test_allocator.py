"""``reuse_freed_memory``: a fitting process's n-long temporaries reuse freed memory instead of being
faulted in again page by page (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
import numpy as np
if sys.argv[1] == "reuse":
    from longitudinal.fit.allocator import reuse_freed_memory
    assert reuse_freed_memory()
def cycle():  # what a fit does with its columns: several n-long temporaries at once, then freed (n = 200,000)
    for _ in range(10):
        held = [np.full(200_000, 1.0) for _ in range(4)]
        del held
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_temporaries_reuse_freed_memory_instead_of_new_pages() -> None:
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                                 check=True).stdout)
        for mode in ("default", "reuse")
    }
    # glibc's default gives the freed 1.6 MB columns back (its heap is trimmed above twice the largest chunk
    # it has mmapped): ~390 faults per column each time; kept for reuse, next to none.
    assert faults["default"] > 10 * 4 * 300
    assert faults["reuse"] < 100
