"""Freed memory kept for the next temporaries in a process that fits (``reuse_freed_memory``), such as the
pipeline's.

A fit allocates and frees many n-long temporaries (model-matrix columns, standardized copies, per-row
products: 1.6 MB each at 200,000 rows). glibc's malloc serves such a chunk by mmap, or from its heap once
its threshold has risen past the chunk's size, and gives heap memory back to the kernel whenever more than
its trim threshold is free at the top; either way the next temporary of the same size is faulted in again,
page by page: 4,300-4,800 minor faults a fit at 200,000 rows, ~8 ms of a 28 ms random-intercept fit's CPU.
Fixed thresholds keep up to ``TRIM_THRESHOLD`` of freed heap for reuse and serve from the heap every chunk
up to ``MMAP_THRESHOLD``, so that 2,000,000 rows' 16-32 MB columns and per-group arrays are reused too; larger
ones (the model matrix, 80 MB there) are mmapped and returned whole when freed. Measured in the pipeline
(``python -m benchmarks.pipeline --sizes 200k,2M --no-lme4``, one run each, 2M rows): fit stage unbalanced
2.97-3.09 s with 4 MB / 64 MB, 2.23-2.34 s with 64 MB / 128-256 MB, balanced 1.80 ->
1.15-1.42 s; the run's peak (proportional set) 894-913 MB -> 941-989 MB, the trim threshold's 128 MB the lower
end. At 200,000 rows the stage is unchanged (0.23-0.26 s).

Like ``fit.blas.limit_blas_threads``, for the rest of the process and decided by the application (the
pipeline's fit task module), never by the library itself. glibc only: elsewhere nothing changes.
``release_freed_memory`` gives back what a stage freed and the next will not reuse: the pipeline calls it
between its stages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: Chunks above this are mmapped (and unmapped when freed); below, they come from the heap.
MMAP_THRESHOLD = 64 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse, not given back to the kernel.
TRIM_THRESHOLD = 128 * 1024 * 1024
# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library (glibc's name first: ``find_library`` runs ``ldconfig``), None where there is none."""
    for name in ("libc.so.6", ctypes.util.find_library("c")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def reuse_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process; whether they were set (False without
    glibc's ``mallopt``)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def release_freed_memory() -> None:
    """Give back, between stages, the memory the stage before freed: Arrow's pool (its jemalloc or mimalloc keeps
    freed memory resident until its next allocation: after validation, the rows as read and typed, ~168 MB at
    2,000,000 rows) and glibc's heap (``malloc_trim``: with ``reuse_freed_memory``'s thresholds a stage's freed
    16-32 MB arrays stay in the heap for reuse, and what the next stage does not reuse would add to the run's
    peak)."""
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
