"""Noticing that the Ray cluster's GCS went away, before Ray ends this process over it.

When the GCS (the head node's cluster directory) dies, the actors already running keep
answering, so a run can go on for a while; but Ray's core worker in the driver ends the process
``gcs_rpc_server_reconnect_timeout_s`` seconds later (60 by default) with exit status 1 and a
raw log line, whatever the driver is doing. :class:`GcsWatch` polls the GCS's port from a
thread and reports it lost once it has refused connections for a third of that time, which
leaves the driver the rest to stop the run itself: MLflow status, resume line, one clear error.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

# Ray's own setting (an environment variable, read by its core worker): how long a process
# waits for a lost GCS before it exits.
_RAY_TIMEOUT_VAR = "RAY_gcs_rpc_server_reconnect_timeout_s"
_RAY_TIMEOUT_DEFAULT_S = 60.0


def ray_gcs_timeout_s(environ=os.environ) -> float:
    """Seconds Ray's core worker waits for a lost GCS before it ends the process."""
    try:
        return max(float(environ.get(_RAY_TIMEOUT_VAR, _RAY_TIMEOUT_DEFAULT_S)), 1.0)
    except ValueError:
        return _RAY_TIMEOUT_DEFAULT_S


def answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


class GcsWatch:
    """Polls the GCS at ``address`` every ``interval_s`` from a daemon thread.

    Args:
        address: the GCS's ``host:port`` (``ray.get_runtime_context().gcs_address``).
        interval_s: seconds between two polls.
        lost_after_s: how long the GCS must refuse before it counts as lost (default: a third
            of :func:`ray_gcs_timeout_s`).

    Attributes:
        lost: once the GCS is lost, a sentence saying so; None while it answers.
    """

    def __init__(self, address: str, interval_s: float = 2.0, lost_after_s: float | None = None):
        self.address = address
        self.interval_s = interval_s
        self.lost_after_s = ray_gcs_timeout_s() / 3 if lost_after_s is None else lost_after_s
        self.lost: str | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._down_since: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fedsim-gcs-watch", daemon=True)
        self._thread.start()

    def on_lost(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback(reason)`` once, from the watch's thread, when the GCS is lost (at
        once if it is already); None: no call."""
        with self._lock:
            self._on_lost = callback
            lost = self.lost
        if lost is not None and callback is not None:
            callback(lost)

    def check(self) -> bool:
        """Poll now; whether the GCS answers. A GCS that refuses is lost at once (for a caller
        about to shut Ray down, which would wait for it)."""
        if answers(self.address):
            self._down_since = None
            return True
        self._declare(time.monotonic() - (self._down_since or time.monotonic()))
        return False

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s) and self.lost is None:
            if answers(self.address):
                self._down_since = None
                continue
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
            elif now - self._down_since >= self.lost_after_s:
                self._declare(now - self._down_since)

    def _declare(self, down_s: float) -> None:
        with self._lock:
            if self.lost is not None:
                return
            ago = f" {down_s:.0f} s ago" if down_s >= 1 else ""
            self.lost = f"the Ray cluster's GCS at {self.address} stopped answering{ago}"
            callback = self._on_lost
        if callback is not None:
            callback(self.lost)
