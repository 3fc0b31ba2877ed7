"""Reading a finished run back from an MLflow store without changing the store.

``fedsim inspect`` reads stores it did not write and that may not be what their name says: a
file that is no SQLite database, an empty file (MLflow would write its schema into it), a
server that accepts a connection and never answers. :func:`open_store` checks a local store
read-only before MLflow touches it; :func:`find_run` tells a store it cannot reach from a run
the store does not hold; :func:`read_artifact` and :func:`read_table` check what they read.
Every problem is a :class:`ConfigError` naming the culprit (``--tracking-uri``, ``RUN_ID`` or
the artifact's path).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedsim.config import ConfigError
from fedsim.errors import one_line
from fedsim.tracking.store import REMOTE_TIMEOUT_S, store_path

STORE_KEY = "--tracking-uri"
RUN_KEY = "RUN_ID"
# The first 16 bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"
# Tables every MLflow SQL store has (its schema holds many more).
MLFLOW_TABLES = ("alembic_version", "experiments", "runs", "metrics")
# The largest artifact read back: fedsim's own diagnostics are kilobytes.
MAX_ARTIFACT_BYTES = 64 << 20
# MLflow's error codes for a run id that names no run (malformed ids are the second).
_NO_RUN = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def open_store(uri: str):
    """An :class:`mlflow.MlflowClient` of the store ``uri``, checked first without writing.

    A SQLite store must be a non-empty SQLite file holding MLflow's tables (checked through a
    read-only connection: MLflow itself would create its schema in an empty file); a local
    file store must be a directory. A tracking server is asked nothing here (see
    :func:`find_run`).

    Raises:
        ConfigError: naming ``--tracking-uri``.
    """
    parsed = urlparse(uri)
    local = store_path(uri)
    if parsed.scheme == "sqlite":
        _check_sqlite(uri, local)
    elif local is not None:
        _check_file_store(uri, Path(local))
    from mlflow import MlflowClient

    from fedsim.tracking.tracker import quiet_mlflow

    quiet_mlflow()
    try:
        return MlflowClient(uri)
    except Exception as exc:  # noqa: BLE001 - mlflow raises many types for a bad URI
        raise ConfigError(
            STORE_KEY, f"cannot open the MLflow store {uri}: {one_line(exc)}"
        ) from None


def _check_sqlite(uri: str, local: str | None) -> None:
    if not local or local == ":memory:":
        raise ConfigError(STORE_KEY, f"{uri} names no database file")
    path = Path(local)
    if not path.exists():
        raise ConfigError(STORE_KEY, f"no MLflow store at {path}")
    if not path.is_file():
        raise ConfigError(STORE_KEY, f"{path} is not a file, so no MLflow store")
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(STORE_KEY, f"cannot read {path}: {exc.strerror or exc}") from None
    if not header:
        raise ConfigError(STORE_KEY, f"{path} is empty, so no MLflow store (it was left as it is)")
    if header != SQLITE_HEADER:
        raise ConfigError(STORE_KEY, f"{path} is not an SQLite database, so no MLflow store")
    try:
        # mode=ro: this connection cannot write, whatever the file holds
        db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=REMOTE_TIMEOUT_S
        )
        try:
            names = {row[0] for row in db.execute("select name from sqlite_master")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(
            STORE_KEY, f"{path} is a damaged or locked SQLite database: {one_line(exc)}"
        ) from None
    missing = [t for t in MLFLOW_TABLES if t not in names]
    if missing:
        raise ConfigError(
            STORE_KEY,
            f"{path} is an SQLite database but no MLflow store (it has no {missing[0]} table)",
        )


def _check_file_store(uri: str, path: Path) -> None:
    if not path.exists():
        raise ConfigError(STORE_KEY, f"no MLflow store at {path}")
    if not path.is_dir():
        raise ConfigError(STORE_KEY, f"{path} is not a directory, so no MLflow file store")
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise ConfigError(
            STORE_KEY,
            f"{uri} is an MLflow file store, which this MLflow reads only with "
            "MLFLOW_ALLOW_FILE_STORE=true; set it, or move the runs into a database with "
            "`mlflow migrate-filestore` and pass its sqlite:/// URI",
        )


def find_run(client, uri: str, run_id: str):
    """The run ``run_id`` of the store, telling a store it cannot reach from a missing run.

    Call it inside :func:`fedsim.tracking.store.quick_http`: a server that does not answer
    then fails in seconds.

    Raises:
        ConfigError: ``RUN_ID`` when the store answers that it holds no such run;
            ``--tracking-uri`` when it cannot be reached or read.
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in _NO_RUN:
            raise ConfigError(RUN_KEY, f"no run {run_id!r} in the store {uri}") from None
        raise unreachable(uri, exc) from None
    except Exception as exc:  # noqa: BLE001 - a database or network error: not the run's fault
        raise unreachable(uri, exc) from None


def unreachable(uri: str, exc: BaseException) -> ConfigError:
    """The error for a store that did not answer, or failed, while it was read."""
    return ConfigError(STORE_KEY, f"cannot reach the MLflow store {uri}: {one_line(exc)}")


def read_artifact(client, run_id: str, path: str, where: str) -> str | None:
    """The text of the run's artifact ``path``, or None when the run has no such file.

    Raises:
        ConfigError: naming ``path``: larger than :data:`MAX_ARTIFACT_BYTES`, or not UTF-8.
    """
    from mlflow.exceptions import MlflowException

    try:
        local = Path(client.download_artifacts(run_id, path, where))
    except (MlflowException, OSError):
        return None
    if not local.is_file():  # a directory where a file was expected
        raise ConfigError(path, f"run {run_id}: the artifact is a directory, not a file")
    size = local.stat().st_size
    if size > MAX_ARTIFACT_BYTES:
        raise ConfigError(
            path,
            f"run {run_id}: the artifact holds {size:,} bytes, more than the "
            f"{MAX_ARTIFACT_BYTES >> 20} MiB fedsim reads back",
        )
    try:
        return local.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, f"run {run_id}: the artifact is not UTF-8 text") from None


def damaged(path: str, run_id: str, problem: str) -> ConfigError:
    """The error for an artifact that does not hold what fedsim wrote there."""
    return ConfigError(path, f"run {run_id}: the artifact is damaged: {problem}")


def read_json(text: str, path: str, run_id: str) -> Any:
    """Parse an artifact's JSON.

    Raises:
        ConfigError: naming ``path`` when ``text`` is no JSON.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise damaged(path, run_id, f"not JSON ({one_line(exc, 120)})") from None


def read_table(
    text: str | None, path: str = "table", run_id: str = "?", columns: tuple[str, ...] = ()
) -> list[dict]:
    """Rows of an MLflow table artifact (``{"columns": [...], "data": [[...], ...]}``).

    Args:
        text: the artifact's text; None or empty: no rows.
        path: the artifact's path, for errors.
        run_id: its run, for errors.
        columns: columns every row must have.

    Raises:
        ConfigError: naming ``path``: not JSON, not a table, a row whose length differs from
            the columns', or a required column missing.
    """
    if not text:
        return []
    table = read_json(text, path, run_id)
    names = table.get("columns") if isinstance(table, dict) else None
    data = table.get("data") if isinstance(table, dict) else None
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise damaged(path, run_id, "no list of column names under 'columns'")
    if not isinstance(data, list):
        raise damaged(path, run_id, "no list of rows under 'data'")
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != len(names):
            raise damaged(path, run_id, f"row {i} is not a list of {len(names)} values")
    for column in columns:
        if column not in names:
            raise damaged(path, run_id, f"no {column!r} column")
    return [dict(zip(names, row)) for row in data]
