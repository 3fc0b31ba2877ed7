"""Errors a run reports to the user as one line, without a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key holds a value that is not allowed; the message names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config error: {key}: {message}")
        self.key = key


class RunFailed(RuntimeError):
    """A run that started but cannot go on: nothing trains, or the global model broke.

    The message says why and, when a checkpoint exists, the command that continues the run
    from the last good one. The MLflow run is marked FAILED.
    """


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (YAML, MLflow and OS errors span several), cut to
    ``limit`` characters; the exception's type name when it has no message."""
    text = " ".join(str(exc).split())
    return (text[:limit] + "...") if len(text) > limit else text or type(exc).__name__


class Terminated(KeyboardInterrupt):
    """The process was asked to stop with SIGTERM (``ray job stop``, Kubernetes, a batch
    scheduler's time limit): handled like Ctrl-C, its MLflow run is marked KILLED and the
    command that continues it is printed (see :mod:`fedsim.termination`)."""
