"""Where a run's records go: the MLflow tracking store and the directories a run writes.

:func:`store_path` is the one parser of tracking URIs; :func:`check_tracking`,
:func:`check_writable_dir` and :func:`check_writable_file` prove, before anything starts, that
the store, a directory and a file take writes (the pre-flight checks of
:mod:`fedsim.simulation.preflight` and of a study call them); :func:`quick_http` makes a
tracking server that does not answer fail in seconds. Opening a SQLite store holds a lock
beside it (:func:`store_lock`), so that runs started together on a new store do not build its
schema at the same time.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from fedsim.config import ConfigError, FedSimConfig, tracking_uri
from fedsim.errors import one_line

# Seconds and retries of a request that checks or reads a remote tracking server (MLflow's
# own defaults retry for minutes, which is what a run wants and a check or `fedsim inspect`
# does not).
REMOTE_TIMEOUT_S = 10
_REMOTE_RETRIES = "0"

# Seconds to wait for another process that is opening (creating) the same SQLite store: MLflow
# builds a new store's schema in a few seconds, tens on a loaded machine.
_LOCK_TIMEOUT_S = 300


def check_writable_dir(path: str | Path, key: str) -> None:
    """Check that ``path`` is, or can be created as, a directory this process can write to.

    Creates nothing: the nearest existing ancestor must be a writable directory (a file is
    created in it and removed again, which also catches read-only mounts).

    Raises:
        ConfigError: naming ``key``, the path and what is wrong with it.
    """
    try:
        path = Path(path).expanduser()
    except RuntimeError as exc:  # ~user of a user this machine does not have
        raise ConfigError(key, f"cannot expand {path}: {exc}") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"cannot create {path}: {probe} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".fedsim-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(key, f"cannot write to {probe} (for {path}): {reason}") from None


def check_writable_file(path: str | Path, key: str) -> None:
    """Check that ``path`` names a file this process can write (create or replace).

    Creates nothing. A file that exists must be a writable regular file; otherwise its
    directory must pass :func:`check_writable_dir`.

    Raises:
        ConfigError: naming ``key``: an empty name, a directory, something that is no regular
            file, a file that cannot be written, or a directory that cannot take it.
    """
    if not str(path).strip():
        raise ConfigError(key, "is empty; name the file to write")
    try:
        path = Path(path).expanduser()
    except RuntimeError as exc:  # ~user of a user this machine does not have
        raise ConfigError(key, f"cannot expand {path}: {exc}") from None
    if path.is_dir():
        raise ConfigError(key, f"{path} is a directory; name a file, e.g. {path / 'table.md'}")
    if path.exists():
        if not path.is_file():
            raise ConfigError(key, f"{path} exists and is not a regular file")
        if not os.access(path, os.W_OK):
            raise ConfigError(key, f"cannot write {path}: permission denied")
    check_writable_dir(path.parent, key)


def store_path(uri: str) -> str | None:
    """The local path an MLflow tracking URI writes to; None for a tracking server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return parsed.path[1:]  # sqlite:///relative.db, sqlite:////absolute.db
    if parsed.scheme == "file":
        return parsed.path
    if uri == "databricks" or uri.startswith("databricks-uc"):  # MLflow's named servers
        return None
    if len(parsed.scheme) <= 1:  # a plain path (or a Windows drive letter)
        return uri
    return None


@contextmanager
def store_lock(uri: str):
    """Hold an inter-process lock on a SQLite store while it is opened (and maybe created).

    MLflow builds a new store's schema by running its migrations; two processes doing that at
    once on the same new file break each other (seen with MLflow 3.17: "duplicate column name",
    "table _alembic_tmp_metrics already exists", alembic's "expected to match one row", one
    process failing or both). Under the lock the first process creates the store and the others
    find it made. The lock is the file ``.NAME.lock`` beside the database ``NAME``; other stores
    need none. Without a writable place for it (checked before), the store opens unlocked.

    Raises:
        ConfigError: another process held the lock for ``_LOCK_TIMEOUT_S`` seconds.
    """
    local = store_path(uri) if urlparse(uri).scheme == "sqlite" else None
    if not local:
        yield
        return
    from filelock import FileLock, Timeout

    db = Path(local)
    lock = FileLock(str(db.with_name(f".{db.name}.lock")), timeout=_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
        held = True
    except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
        raise ConfigError(
            "tracking.uri",
            f"another process has held {lock.lock_file} for {_LOCK_TIMEOUT_S} s while opening "
            f"the store {uri}; is a fedsim or MLflow process stuck on it?",
        ) from None
    except OSError:
        held = False
    try:
        yield
    finally:
        if held:
            lock.release()


def _experiment(client, name: str):
    """Experiment ``name``, created if missing (by this process or, meanwhile, another)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp
    try:
        return client.get_experiment(client.create_experiment(name))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name)  # another run created it first


@contextmanager
def quick_http():
    """Inside, an MLflow request to a server that does not answer fails after
    :data:`REMOTE_TIMEOUT_S` seconds, without retries, instead of retrying for minutes."""
    names = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": _REMOTE_RETRIES,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REMOTE_TIMEOUT_S),
    }
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_tracking(cfg: FedSimConfig, run_id: str | None = None) -> None:
    """Open the MLflow store, find or create the experiment, and write one tag to it.

    Args:
        cfg: the resolved config.
        run_id: a resumed run's MLflow run, which must be in the store.

    Raises:
        ConfigError: naming ``tracking.uri`` (an unknown scheme, a store that cannot be opened
            or written, an unwritable local artifact location) or ``tracking.experiment``.
    """
    uri = tracking_uri(cfg.tracking.uri)
    parsed = urlparse(uri)
    local = store_path(uri)
    if parsed.scheme == "sqlite" and local in ("", ":memory:"):
        raise ConfigError("tracking.uri", f"{uri} names no database file")
    if local is not None:
        db = Path(local)
        check_writable_dir(db.parent if parsed.scheme == "sqlite" else db, "tracking.uri")
        if parsed.scheme == "sqlite" and db.exists() and not os.access(db, os.W_OK):
            raise ConfigError("tracking.uri", f"the database {db} is not writable")
    from fedsim.tracking.tracker import quiet_mlflow

    quiet_mlflow()
    from mlflow.tracking import MlflowClient

    try:
        with quick_http(), store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            exp = _experiment(client, cfg.tracking.experiment)
            if exp.lifecycle_stage == "deleted":
                raise ConfigError(
                    "tracking.experiment",
                    f"experiment {cfg.tracking.experiment!r} is deleted in {uri}; restore it "
                    "(mlflow experiments restore) or pick another name",
                )
            client.set_experiment_tag(exp.experiment_id, "fedsim.checked", "1")
            if run_id is not None and not _has_run(client, run_id):
                raise ConfigError(
                    "tracking.uri",
                    f"MLflow run {run_id} of the checkpoint is not in the store {uri}; resume "
                    "from the directory the run was started in, pass tracking.uri=, or "
                    "continue into a new MLflow run with --new-run",
                )
    except ConfigError:
        raise
    except Exception as exc:  # mlflow raises many types for a bad URI, server or database
        raise ConfigError(
            "tracking.uri", f"cannot open or write the MLflow store {uri}: {one_line(exc)}"
        ) from None
    artifacts = exp.artifact_location or ""
    art = urlparse(artifacts)
    if art.scheme in ("", "file") and artifacts:
        check_writable_dir(art.path if art.scheme else artifacts, "tracking.uri")


def _has_run(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True
