"""Imported by the warm processes that flow runs are forked from (``longitudinal serve``'s forkserver):
importing this module imports everything a run needs, once.

``multiprocessing``'s forkserver imports the modules it is told to preload and ignores only an
ImportError; anything else would stop it, and with it every run. So a failure is printed and the
forkserver goes on cold: each run then imports what it needs itself, as a spawned process would.
"""

from __future__ import annotations

import sys

from flows.background import preload

try:
    preload()
except Exception as exc:  # noqa: BLE001 (see above: runs still work, only slower)
    print(f"longitudinal: the warm process could not import everything a run needs ({exc}); runs start cold",
          file=sys.stderr, flush=True)
