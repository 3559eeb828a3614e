"""Fit: one task per candidate and method. No retries: the statistics are deterministic.

Fits are cached by (data fingerprint, formula, method, engine, family, quadrature points, engine code): a
re-run on data that did not change reuses them. The cache key ignores the data frame itself (hashing it per
task would cost more than it saves); the flow passes its fingerprint instead. A fit is stored as plain
pickle bytes, its cache record (key, expiry, serializer) in a folder of its own (``FitCachePolicy``): a fit
holds its fitted values, residuals and conditional modes, 48 MB at 2,000,000 rows, and Prefect's default
embeds a result base64-encoded in its JSON record, which cost 0.7-1.4 s per fit to write there (and the
record was decoded twice on a cache hit).
"""

from __future__ import annotations

import hashlib
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.serializers import Serializer
from prefect.settings import get_current_settings

import longitudinal
from longitudinal.fit.allocator import reuse_freed_memory
from longitudinal.fit.blas import limit_blas_threads
from longitudinal.fit.candidate import fit_candidate
from longitudinal.config import LINKS
from longitudinal.records import Fit, Method

#: What computes a fit: the formula language and design matrices, the engines, and the records and
#: exceptions they return. Folders are hashed whole, so a module added or renamed in them counts.
FIT_CODE = ("model", "fit", "records.py", "errors.py")


def engine_version(package: Path = Path(longitudinal.__file__).parent) -> str:
    """The library version plus a hash of every module that computes a fit: new code, new cache entries.

    Whole folders (``model/``, ``fit/``) plus ``records.py`` and ``errors.py``, not a list of file names: a
    list goes stale silently when a module is added or renamed (a new transform module would not invalidate
    cached fits). Code that only reads fits (``inference/``, ``reporting/``) or comes before the design
    (``data/``) does not re-fit anything when it changes.
    """
    digest = hashlib.sha256(longitudinal.__version__.encode())
    paths: set[Path] = set()
    for name in FIT_CODE:
        path = package / name
        paths.update(path.rglob("*.py") if path.is_dir() else [path] if path.is_file() else [])
    for path in sorted(paths):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


ENGINE_VERSION = engine_version()

# The process that runs fits runs them with one BLAS thread, set once before any (``longitudinal.fit.blas``:
# the engines' products are too thin for two, and a second OpenBLAS thread spins on the core Prefect needs),
# and keeps freed memory for its next temporaries (``longitudinal.fit.allocator``: page faults were a third
# of a small fit's CPU time).
limit_blas_threads(1)
reuse_freed_memory()


def fit_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    formula = hashlib.sha256(parameters["formula"].encode()).hexdigest()[:16]
    return (
        f"fit-{parameters['data_hash'][:32]}-{parameters['name']}-{formula}-{parameters['method']}-"
        f"{parameters['engine']}-{parameters['family']}-nagq{parameters['nagq']}-{ENGINE_VERSION}"
    )


class FitSerializer(Serializer):  # type: ignore[type-arg]  # prefect registers generic subscripts as types
    """A ``Fit`` as plain pickle bytes (the record is the library's own frozen dataclass: no cloudpickle
    needed, and no base64: the bytes go to a file of their own, see ``FitCachePolicy``)."""

    type: str = "longitudinal-fit"

    def dumps(self, obj: Fit) -> bytes:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, blob: bytes) -> Fit:
        fit: Fit = pickle.loads(blob)
        return fit


class FitCachePolicy(CacheKeyFnPolicy):
    """``fit_cache_key``, with the cache records kept apart from the results they point to.

    With key storage of its own a cache policy makes Prefect write a result as its serializer's bytes and the
    small record (key, expiry, serializer) next to it, instead of one JSON record embedding the result in
    base64. The folder, ``fit-cache-keys`` beside Prefect's local result storage, is looked up when a fit runs
    (not at import), so a run with another ``PREFECT_HOME`` (the tests', a benchmark's) keeps its own.
    """

    @property  # type: ignore[override]
    def key_storage(self) -> Path:
        return Path(get_current_settings().results.local_storage_path).expanduser() / "fit-cache-keys"

    @key_storage.setter
    def key_storage(self, _value: object) -> None:
        """Ignored: the folder always follows the current Prefect settings (see the getter)."""


def describe_family(family: str, nagq: int) -> str:
    """For log lines: "gaussian (identity link)", "binomial (logit link, Laplace)", "poisson (log link, nAGQ 7)"."""
    if family == "gaussian":
        return f"{family} ({LINKS[family]} link)"
    return f"{family} ({LINKS[family]} link, " + ("Laplace)" if nagq == 1 else f"nAGQ {nagq})")


# ``cache_result_in_memory=False``: Prefect's default keeps every persisted result in its result store's
# in-memory cache (an LRU of 1,000 records shared by the flow run's tasks) until the flow run ends, so the
# candidates' fitted values, residuals and random effects (48 MB a fit at 2,000,000 rows) stayed in memory
# through the refit, the inference and the report however the flow let go of them. The task still returns
# the fit it computed (the same object); a cache hit reads the file, as before.
@task(
    name="fit", task_run_name="fit-{name}-{method}", cache_policy=FitCachePolicy(cache_key_fn=fit_cache_key),
    cache_expiration=timedelta(days=30), persist_result=True, result_serializer=FitSerializer(),
    cache_result_in_memory=False,
)
def fit(
    visits: pd.DataFrame, name: str, formula: str, method: Method, engine: str, data_hash: str, family: str,
    nagq: int, start: list[float] | None = None,
) -> Fit:
    """``fit_candidate``; ``start`` (θ of the same formula's ML fit, for a REML refit) is not part of the cache
    key: it changes the optimizer's path, not the optimum."""
    result = fit_candidate(visits, name, formula, method=method, engine=engine, family=family, nagq=nagq,
                           start=start)
    how = method if family == "gaussian" else f"{method}, {family}"  # the optimizer's text names the approximation
    logger = get_run_logger()
    if result.usable:
        logger.info(
            "%s (%s): logLik %.4f, %d parameters, %s%s in %.2f s",
            name, how, result.loglik, result.n_params, result.optimizer,
            ", singular" if result.singular else "", result.seconds,
        )
    else:
        logger.warning("%s (%s) failed: %s", name, how, result.message)
    return result
