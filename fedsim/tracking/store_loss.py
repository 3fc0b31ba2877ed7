"""A tracking store lost mid-run: the run goes on without it, and says so once.

MLflow raises on every write once its store is gone: a SQLite file deleted, replaced or made
read-only, a full disk, a tracking server that went away. None of that costs a result: the
checkpoints hold every round's metrics, client tables and merge diagnostics. So once a run's
MLflow run exists, its writes go through :class:`GuardedClient`: the first that fails prints
one warning and marks the store lost, every later write is skipped, and training and
checkpointing go on. At its end the run says since which round MLflow has nothing, and that
``fedsim run --resume RUN_DIR --new-run`` logs the whole history into a new MLflow run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedsim import termination
from fedsim.errors import one_line

_log = logging.getLogger(__name__)

# The MlflowClient calls that write: a failure of one of them is a lost store. Reads pass
# through and raise (a run reads only at its start, before anything is at stake).
WRITES = frozenset(
    {
        "delete_run",
        "delete_tag",
        "log_artifact",
        "log_artifacts",
        "log_batch",
        "log_dict",
        "log_figure",
        "log_image",
        "log_inputs",
        "log_metric",
        "log_param",
        "log_table",
        "log_text",
        "set_tag",
        "set_terminated",
        "update_run",
    }
)


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's own error (which wraps a database's), an OS error
    (an artifact directory gone or full), a request that failed, a database error let through."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    errors: tuple[type[BaseException], ...] = (MlflowException, OSError, RequestException)
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover - mlflow-skinny talks to a server only
        return errors
    return (*errors, SQLAlchemyError)


@dataclass(frozen=True)
class StoreLoss:
    """When and why the store was lost.

    Attributes:
        round: the round being logged when the first write failed; MLflow has nothing of this
            round or any later one.
        reason: the store's error, on one line.
    """

    round: int
    reason: str


class GuardedClient:
    """An ``MlflowClient`` whose writes stop, after one warning, once one of them fails.

    Args:
        client: the run's ``MlflowClient``.
        uri: the store's URI (for the warning).
        current_round: the round being logged now (the tracker's last step).
    """

    def __init__(self, client, uri: str, current_round: Callable[[], int]):
        self._client = client
        self._uri = uri
        self._current_round = current_round
        self._errors = store_errors()
        self._lock = threading.Lock()  # the system metrics' thread writes too
        self.lost: StoreLoss | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        if name not in WRITES:

            def read(*args, **kwargs):
                with termination.deferred():  # an interrupt waits for the store call's end
                    return attr(*args, **kwargs)

            return read

        def write(*args, **kwargs):
            if self.lost is not None:
                return None
            try:
                with termination.deferred():
                    return attr(*args, **kwargs)
            except self._errors as exc:
                self._lose(exc)
                return None

        return write

    def _lose(self, exc: BaseException) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = StoreLoss(max(self._current_round(), 0), _root_cause(exc))
        _drop_cached_engine(self._uri)
        _log.warning(
            "the MLflow store %s failed while logging round %d (%s); the run goes on without "
            "MLflow: training and checkpoints continue",
            self._uri,
            self.lost.round,
            self.lost.reason,
        )


def _root_cause(exc: BaseException) -> str:
    """The innermost error on one line: the database's own ("attempt to write a readonly
    database", "file is not a database") rather than MLflow's and SQLAlchemy's wrappings."""
    seen = {id(exc)}
    while True:
        inner = (
            getattr(exc, "orig", None) or exc.__cause__
        )  # SQLAlchemy's DBAPI error, or the cause
        if inner is None or id(inner) in seen:
            return one_line(exc, 200)
        seen.add(id(inner))
        exc = inner


def _drop_cached_engine(uri: str) -> None:
    """Forget MLflow's cached store and database engine for ``uri`` (MLflow keeps one of each
    per URI for the process): a deleted SQLite file's pooled connections still point at the
    deleted file, and the cached store believes the tables exist, so a store opened again at
    the same place in this process (``fedsim.resume(..., new_run=True)`` from Python) would
    fail again. Both are MLflow internals; without them nothing is dropped."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
        engine = SqlAlchemyStore._engine_map.pop(uri, None)
    except (ImportError, AttributeError):  # pragma: no cover - another MLflow's internals
        return
    if engine is not None:
        engine.dispose()


def untracked_summary(loss: StoreLoss, run_dir, checkpoints: bool) -> str:
    """What the end of a run that lost its store says: which rounds MLflow lacks, and how to
    log the history into a new MLflow run."""
    head = f"the run finished, but its MLflow run lacks round {loss.round} and every later one"
    if checkpoints and run_dir is not None:
        return (
            f"{head}; the checkpoints hold them all: fedsim run --resume {run_dir} --new-run "
            "logs the whole run into a new MLflow run"
        )
    return f"{head}, and checkpoint.every=0 kept no checkpoint: only the summary shows them"
