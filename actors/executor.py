"""Where the round loop's work runs: Ray actors (the default) or this process.

The round loop (:class:`fedsim.simulation` ``_Driver``) talks to its client pool and its server
through an executor, so the same loop runs on a Ray cluster and, for debugging and for the
scale benchmark's floor, in one process with no Ray at all:

- ``make_pool(cfg, per_round)``: an object with ``train``, ``evaluate``, ``call_first``,
  ``replaced`` and ``shutdown`` (:class:`actors.pool.ClientPool` or :class:`LocalPool`);
- ``make_server(*args)``: the server (a Ray actor, or a plain :class:`ServerState`);
- ``call(server, method, *args)``: start a server call and return its ref (or its value);
- ``get(ref)`` / ``put(value)``: Ray's ``get`` and ``put``, or the identity.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any

from actors.client import ClientWorker
from actors.pool import ClientPool, ClientRefs, Outcome, pool_size, short_reason, start_server
from actors.server import ServerState
from fedsim.errors import ConfigError


def init_ray() -> bool:
    """Join the Ray cluster that ``RAY_ADDRESS`` names, or start a local one.

    Returns:
        Whether this call started Ray (and so should shut it down).

    Raises:
        ConfigError: ``RAY_ADDRESS`` names a cluster that cannot be joined.
    """
    import ray

    if ray.is_initialized():
        return False
    # No runtime_env here: under `ray job submit` the job's own runtime_env applies, and
    # the actors quieten tokenizers and transformers themselves (ClientWorker.__init__).
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR")
    except (ValueError, ConnectionError, TimeoutError) as exc:
        if address is None:
            raise
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(
            "RAY_ADDRESS", f"cannot join the Ray cluster at {address!r}: {reason}"
        ) from None
    return True


class RayExecutor:
    """Client actors in a placement group and a server actor, on the Ray cluster."""

    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        self.started = init_ray()

    def make_pool(self, cfg, per_round: int) -> ClientPool:
        return ClientPool(cfg, pool_size(cfg, per_round))

    def make_server(self, *args) -> Any:
        return start_server(*args)

    def call(self, server, method: str, *args) -> Any:
        return getattr(server, method).remote(*args)

    def get(self, ref) -> Any:
        import ray

        return ray.get(ref)

    def put(self, value) -> Any:
        import ray

        return ray.put(value)

    def close(self, pool, server) -> None:
        import ray

        if pool is not None:
            pool.shutdown()
        if server is not None:
            ray.kill(server)
        if self.started:
            ray.shutdown()


class LocalPool:
    """:class:`ClientPool`'s interface in this process: one worker runs every task in turn.

    A task that raises is retried up to ``resources.max_retries`` times, as on Ray. The
    seconds spent in each round's training and in each global evaluation are kept
    (``train_seconds``, ``eval_seconds``: one entry per call), for the scale benchmark's floor.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.worker = ClientWorker(cfg)
        self.replaced = 0
        self.train_seconds: list[float] = []
        self.eval_seconds: list[float] = []

    def __len__(self) -> int:
        return 1

    def call_first(self, method: str, *args) -> Any:
        return getattr(self.worker, method)(*args)

    def train(self, tasks, broadcast, states: dict) -> Outcome:
        start = time.perf_counter()
        jobs = {
            t.client_id: (
                lambda attempt, t=t: self.worker.train(
                    replace(t, attempt=attempt), broadcast, states.get(t.client_id)
                )
            )
            for t in tasks
        }
        out = self._run(jobs)
        self.train_seconds.append(time.perf_counter() - start)
        return out

    def evaluate(self, broadcast) -> Outcome:
        start = time.perf_counter()
        out = self._run({0: lambda _attempt: (self.worker.evaluate_global(broadcast, 0, 1),)})
        self.eval_seconds.append(time.perf_counter() - start)
        return out

    def _run(self, jobs: dict[Hashable, Callable]) -> Outcome:
        out = Outcome()
        for key, job in jobs.items():
            for attempt in range(self.cfg.resources.max_retries + 1):
                try:
                    first, *rest = job(attempt)
                except Exception as exc:  # a task failure, as Ray reports it
                    out.failed[key] = short_reason(exc)
                    continue
                out.failed.pop(key, None)
                out.values[key] = first
                if rest:
                    out.refs[key] = ClientRefs(*rest)
                break
        return out

    def shutdown(self) -> None:
        pass


class LocalExecutor:
    """Every client task and the server in this process, one after another; no Ray.

    Raises:
        ConfigError: ``faults.fail_mode=crash`` (a crash would end this very process).
    """

    def __init__(self) -> None:
        self.pool: LocalPool | None = None

    def start(self) -> None:
        pass

    def make_pool(self, cfg, per_round: int) -> LocalPool:
        if cfg.faults.fail_prob > 0 and cfg.faults.fail_mode == "crash":
            raise ConfigError(
                "faults.fail_mode",
                "crash ends the process that runs the task, which is the driver itself with "
                "the in-process executor; use fail_mode=raise or the Ray executor",
            )
        self.pool = LocalPool(cfg)
        return self.pool

    def make_server(self, *args) -> ServerState:
        return ServerState(*args)

    def call(self, server, method: str, *args) -> Any:
        return getattr(server, method)(*args)

    def get(self, ref) -> Any:
        return ref

    def put(self, value) -> Any:
        return value

    def close(self, pool, server) -> None:
        pass
