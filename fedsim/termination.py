"""SIGTERM handled like Ctrl-C: the run stops, its MLflow run is KILLED, the resume line printed.

``ray job stop``, Kubernetes (a pod deleted or evicted) and batch schedulers (a job over its
time limit, ``scancel``) stop a process with SIGTERM and, after a grace period of their own,
SIGKILL. Python's default for SIGTERM is to die on the spot, so without a handler the MLflow run
stayed RUNNING for good and nobody learnt how to continue. ``fedsim run`` (and ``compare``,
``sweep``) run inside :func:`handle_sigterm`, which turns SIGTERM into
:class:`fedsim.errors.Terminated`, a :class:`KeyboardInterrupt`, so it takes Ctrl-C's path:

- **The round in flight is abandoned at once** (a round can take minutes and the scheduler's
  grace period is seconds). The last completed round's checkpoint is kept: checkpoints are
  written under temporary names and renamed into place, so neither the stop nor a SIGKILL in
  the middle of a write can damage it, and a resume redoes the abandoned round with the same
  numbers.
- **First the record, then the clean-up**: the line
  ``fedsim: warning: the run stopped; continue it with: fedsim run --resume RUN_DIR`` is
  printed, then the MLflow run is marked KILLED (without a last system-metrics sample; well
  under a second with a local store), then the actors and Ray are stopped. The command exits
  with status 143 (128 + SIGTERM).
- **Grace period**: fedsim gives itself :data:`GRACE_S` seconds after the SIGTERM; if the stop
  is not done by then (a tracking server that does not answer), it exits 143 at once, saying
  so (with every thread's stack after that line where ``FEDSIM_STOP_STACKS`` is set). A
  second SIGTERM during the stop is ignored, so it cannot cut the clean-up short.

Ray's core worker installs a SIGTERM handler of its own when Ray starts in this process (it
prints a crash report, then calls the previous handler); :func:`reclaim` puts fedsim's back
once Ray is up.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedsim.errors import Terminated

# Seconds fedsim allows itself between a SIGTERM and its exit. Under the grace periods that
# schedulers give before SIGKILL (Kubernetes and Slurm: 30 s by default), so fedsim ends on its
# own terms; `ray job stop` waits only RAY_JOB_STOP_WAIT_TIME_S (3 s by default), which the
# MLflow status and the resume line fit in, as they come first.
GRACE_S = 20.0

# Set (to anything) to have a stop that outlasts the grace period print every thread's stack
# after its line: where the stop hung.
STACKS_VAR = "FEDSIM_STOP_STACKS"

# The exit status of a command stopped by SIGTERM: 128 + the signal number, as a shell reports
# a process that SIGTERM killed.
EXIT_STATUS = 128 + signal.SIGTERM


class _Handler:
    """The installed handler: raises :class:`Terminated` once, then starts the grace timer."""

    def __init__(self) -> None:
        self.received = False
        self.timer: threading.Timer | None = None

    def __call__(self, signum, frame) -> None:
        if self.received:  # the stop is under way: let it finish
            return
        self.received = True
        self.timer = threading.Timer(GRACE_S, _give_up)
        self.timer.daemon = True
        self.timer.start()
        interrupt(Terminated(f"SIGTERM (signal {signum})"))

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


_active: _Handler | None = None

# Blocks of the main thread that an interrupt must not cut (see deferred()): how deep, and the
# interrupt that came meanwhile.
_deferring = 0
_pending: BaseException | None = None


def interrupt(exc: BaseException) -> None:
    """Raise ``exc`` (an interrupt, from a signal handler) in the main thread now, or at the
    end of the :func:`deferred` block it is in."""
    global _pending
    if _deferring > 0:
        _pending = _pending or exc
        return
    raise exc


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, an interrupt (SIGTERM, the run's own stop after a lost GCS, Ctrl-C
    during a run) waits for the block's end, where it is raised.

    For calls that must not be cut in the middle: an MLflow store call interrupted inside
    SQLAlchemy left a half-closed connection (and a traceback in SQLAlchemy's log) behind,
    which the stop's own MLflow update then ran into. Outside the main thread, where no signal
    handler runs, the block changes nothing.
    """
    global _deferring, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if _deferring == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc


def _give_up() -> None:
    """The stop outlasted the grace period: leave now, saying so."""
    try:  # the process's stderr itself: sys.stderr may be a wrapper without a descriptor
        os.write(2, f"fedsim: the stop after SIGTERM took over {GRACE_S:g} s; exiting\n".encode())
        if os.environ.get(STACKS_VAR):  # where the stop hung, for a bug report
            import faulthandler

            faulthandler.dump_traceback(all_threads=True)
    finally:
        os._exit(EXIT_STATUS)


@contextmanager
def handle_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`fedsim.errors.Terminated` in the main thread.

    Installed only in the main thread (Python delivers signals there alone); elsewhere the
    block runs with the handler it had. The previous handler is restored on leaving, and a
    grace timer a SIGTERM started is cancelled::

        with handle_sigterm():
            fedsim.run(cfg)  # a SIGTERM ends the MLflow run KILLED and prints the resume line
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler, outer = _Handler(), _active
    previous = signal.signal(signal.SIGTERM, handler)
    _active = handler
    try:
        yield
    finally:
        handler.cancel()
        _active = outer
        signal.signal(signal.SIGTERM, previous)


def reclaim() -> None:
    """Install fedsim's SIGTERM handler again, if a :func:`handle_sigterm` block is active and
    this is the main thread: Ray's core worker replaces it when Ray starts in this process
    (with one that prints a crash report before passing the signal on)."""
    if _active is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _active)
