"""One BLAS thread for a process that fits (``limit_blas_threads``), such as the pipeline's.

An engine's dense products are tall and thin (n × (p + 1) cross-products, (p + 1) × q·G rank-k updates of
a block of groups) or tiny (p × p factors), where OpenBLAS's extra threads only synchronize, and a waiting
OpenBLAS thread spins on a core the other fits, Prefect's server or the report need. Measured on the
2-core machine (``benchmarks/bench_fit_stage.py``, 200,000 rows at irregular times, the pipeline's four fits
in one process): 0.45-0.82 s with OpenBLAS's default two threads, 0.26-0.33 s with one.

The limit is for the rest of the process, set before the fits, not around each: giving OpenBLAS its threads
back after a fit wakes its workers, which then spin (measured: the same four fits took 0.59-0.71 s of CPU
time with the count restored after each, 0.28 without). numpy has no switch for it, so the OpenBLAS libraries
loaded are found among the process's mapped libraries and each one's ``set_num_threads`` is called (what
threadpoolctl does); with another BLAS, or where the library cannot be found, nothing changes. The library
itself never calls it: an application (the pipeline's fit task module) decides for its process.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

#: Thread setters of the OpenBLAS builds numpy and scipy ship or link: scipy-openblas (numpy's wheels use the
#: 64-bit integer one, scipy's the other) and a plain OpenBLAS with and without the 64-bit suffix.
_SETTERS = (
    "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_", "openblas_set_num_threads",
)


def _openblas_setters() -> tuple[Callable[[int], None], ...]:
    """The thread setter of every OpenBLAS mapped into this process (numpy's, and scipy's once imported)."""
    import numpy  # noqa: F401  (loads numpy's BLAS, so that it is mapped)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    paths = dict.fromkeys(line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower())
    setters = []
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(library, name) for name in _SETTERS if hasattr(library, name)), None)
        if setter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], None
            setters.append(setter)
    return tuple(setters)


def limit_blas_threads(threads: int = 1) -> bool:
    """Set the OpenBLAS libraries loaded so far (numpy's, scipy's) to ``threads`` threads for the rest of the
    process; False where none was found."""
    setters = _openblas_setters()
    for setter in setters:
        setter(threads)
    return bool(setters)
