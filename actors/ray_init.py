"""Starting Ray, light enough to begin before the rest of fedsim is imported.

``fedsim run`` starts Ray in a background thread first thing (:class:`RayStart`), so the local
Ray comes up while the driver imports torch, loads and checks the config and the data.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fedsim.errors import ConfigError, RunFailed, one_line

# What a local Ray's start that failed for lack of time says (Ray 2.60: "Timed out waiting for
# file .../gcs_server_port_...", "The current node timed out during startup", "Timed out after
# N seconds while waiting for node to startup").
_TIMED_OUT = ("timed out", "timeout")


def init_ray(log_to_driver: bool = True) -> bool:
    """Join the Ray cluster that ``RAY_ADDRESS`` names, or start a local one.

    Args:
        log_to_driver: forward what the actors print, and Ray's reports of dead workers, to
            this process's stdout and stderr (``resources.log_to_driver``; Ray's own
            ``ray.init`` option). Without a terminal on stdout, the forwarded lines come
            without colour codes.

    Returns:
        Whether this call started Ray (and so should shut it down).

    Raises:
        ConfigError: ``RAY_ADDRESS`` names a cluster that cannot be joined.
        RunFailed: a local Ray did not start (one line, with advice when it timed out, as
            Ray's start does on a busy machine).
    """
    import ray

    if ray.is_initialized():
        return False
    # No runtime_env here: under `ray job submit` the job's own runtime_env applies, and
    # the actors quieten tokenizers and transformers themselves (ClientWorker.__init__).
    address = os.environ.get("RAY_ADDRESS") or None
    if log_to_driver and not sys.stdout.isatty():
        # read by the driver when it prints a forwarded line: no escape codes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=log_to_driver,
        )
    except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions when it cannot start
        reason = one_line(exc)
        if address is not None:
            raise ConfigError(
                "RAY_ADDRESS", f"cannot join the Ray cluster at {address!r}: {reason}"
            ) from None
        raise RunFailed(start_failure(reason)) from None
    return True


def start_failure(reason: str) -> str:
    """The one line that says a local Ray did not start, and what to do when it timed out."""
    line = f"the local Ray did not start: {reason}"
    if any(word in reason.lower() for word in _TIMED_OUT):
        line += (
            ". Ray's processes came up too slowly, as they do on a busy machine: retry when it "
            "is less loaded, or start Ray once (ray start --head) and run with RAY_ADDRESS=auto "
            "so that each run joins it instead of starting one"
        )
    return line


class RayStart:
    """:func:`init_ray` in a background thread, begun at construction (``log_to_driver``: see
    :func:`init_ray`).

    The thread lives until :meth:`close`: Ray's driver connection dies with the thread that
    called ``ray.init`` (measured with Ray 2.60: 'Failed to connect to GCS within 60 s' once
    that thread had ended). Work that must follow the start (the actor pool) is handed to the
    same thread with :meth:`submit`.
    """

    def __init__(self, log_to_driver: bool = True) -> None:
        self._threads = ThreadPoolExecutor(1, thread_name_prefix="fedsim-ray")
        self.future: Future = self._threads.submit(init_ray, log_to_driver)

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` in the thread, after Ray has started (or failed to)."""
        return self._threads.submit(fn, *args)

    def result(self) -> bool:
        """Wait for the start: whether it started Ray (and so should shut it down).

        Raises:
            ConfigError: ``RAY_ADDRESS`` names a cluster that cannot be joined.
        """
        return self.future.result()

    def close(self) -> Any:
        """End the thread (after ``ray.shutdown``, if this start is to be undone)."""
        self._threads.shutdown()
