"""Errors a run reports to the user without a traceback (config errors live in ``config``)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """A run that started but cannot go on: nothing trains, or the global model broke.

    The message says why and, when a checkpoint exists, the command that continues the run
    from the last good one. The MLflow run is marked FAILED.
    """
