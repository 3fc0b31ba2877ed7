"""Where fedsim's own output goes: results to stdout, diagnostics to stderr.

**The rule.** stdout carries results only: a run's summary table, its MLflow run id and the
command that opens it, a study's table and where it was written, and the output of
``fedsim config``, ``fedsim partition`` and ``fedsim inspect``; a script can pipe it. stderr
carries diagnostics: the progress bar, warnings (a round that merged nothing, a rejected update,
skipped rows, a relative path under ``ray job submit``, ...), the one-line error of a failed
command and the hint that continues a stopped run. ``fedsim run --quiet`` (and ``compare``,
``sweep``) prints no results and no bar: only warnings and errors remain.

**The logger.** Every diagnostic goes through :mod:`logging`, under the ``fedsim`` logger
(``logging.getLogger(__name__)`` in each module). Like ``transformers``, fedsim gives that
logger a handler of its own that writes ``fedsim: warning: ...`` (``fedsim: ...`` for INFO)
to the current ``sys.stderr``, at level INFO, and does not propagate to the root logger (no
message twice under a ``logging.basicConfig``). To take the messages into your own logging
setup, call :func:`propagate`; to hide the warnings, raise the level:
``logging.getLogger("fedsim").setLevel(logging.ERROR)``.

Ray forwards what the actors print (and Ray's own reports of a dead worker) to the driver,
stdout to stdout and stderr to stderr; ``resources.log_to_driver=false`` turns that off (the
output stays in Ray's log files, ``/tmp/ray/session_latest/logs``).
"""

from __future__ import annotations

import logging
import sys

NAME = "fedsim"


class _Handler(logging.Handler):
    """``fedsim: warning: message`` on the current ``sys.stderr`` (so a redirected or captured
    stderr gets it), above a progress bar when one is drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:  # clears and redraws an active bar around the line
                tqdm.tqdm.write(text, file=sys.stderr)
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging's own contract: never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"fedsim: {level}{record.getMessage()}"


def install() -> logging.Logger:
    """Give the ``fedsim`` logger its stderr handler (once; ``import fedsim`` does it)."""
    logger = logging.getLogger(NAME)
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        handler = _Handler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def propagate() -> None:
    """Hand fedsim's messages to the root logger's handlers instead of fedsim's own."""
    logger = logging.getLogger(NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(handler)
    logger.propagate = True
