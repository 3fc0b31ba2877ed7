"""Where the round loop's work runs: Ray actors (the default) or this process.

The round loop (:mod:`fedsim.simulation.rounds`) talks to its client pool and its server
through an executor, so the same loop runs on a Ray cluster and, for debugging and for the
scale benchmark's floor, in one process with no Ray at all:

- ``make_pool(cfg, per_round)``: an object with ``train``, ``evaluate``, ``call_first``,
  ``replaced`` and ``shutdown`` (:class:`actors.pool.ClientPool` or :class:`LocalPool`);
- ``make_server(*args)``: the server (a plain :class:`ServerState` in this process, or a Ray
  actor with ``resources.server=actor``);
- ``call(server, method, *args)``: start a server call and return its ref (or its value);
- ``get(ref)`` / ``put(value)`` / ``share(value)``: Ray's ``get`` and ``put`` (``share``: a
  ref for many tasks, the value's own when it is one), or the identity;
- ``on_gcs_lost(callback)`` / ``take_gcs_loss()``: hear of, and take the report of, a Ray
  cluster whose GCS went away (:mod:`actors.gcs_watch`); never, in this process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from actors.gcs_watch import GcsWatch
from actors.pool import ClientPool, ClientRefs, Outcome, pool_size, short_reason, start_server
from actors.ray_init import RayStart, init_ray  # noqa: F401 - init_ray: public here too
from actors.server import ServerState
from fedsim.errors import ConfigError

# under fedsim's logger, whose handler prints "fedsim: warning: ..." (fedsim.logs)
_log = logging.getLogger(f"fedsim.{__name__}")


class RayExecutor:
    """Client actors in a placement group on the Ray cluster; the server in this process
    (``resources.server=driver``) or in an actor of its own (``actor``).

    With ``keep_actors=True`` the executor is a warm pool for several runs: a run's client
    actors outlive it, and the next run given the same executor takes them over when it needs
    as many actors with the same resources and placement (each actor builds a new worker from
    the new config: backbone, data, adapters and method state; only the process and its
    imported modules stay, which saves the seconds an actor takes to start). The numbers are
    those of fresh actors. :meth:`shutdown` (or leaving the ``with`` block) stops the actors,
    and Ray if this executor started it::

        with RayExecutor(keep_actors=True) as warm:
            for seed in (1, 2, 3):
                fedsim.run(cfg_for(seed), executor=warm)

    Args:
        start: a :class:`actors.ray_init.RayStart` already under way (``fedsim run`` begins
            it before importing the rest), or None to start Ray when needed.
        keep_actors: keep the client actors between runs (see above).
    """

    def __init__(self, start: RayStart | None = None, *, keep_actors: bool = False) -> None:
        self.started = False
        self.server_actor = False
        self.keep_actors = keep_actors
        self._start = start
        self._launched: Future | None = None
        self._kept: ClientPool | None = None
        self._cancel = threading.Event()
        self._gcs: GcsWatch | None = None
        self._gcs_reported = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _pool(self, cfg, size: int, cancel: threading.Event | None = None) -> ClientPool:
        """A pool of ``size`` actors: the kept one's actors when they fit, else new ones."""
        kept, self._kept = self._kept, None
        return ClientPool(cfg, size, wait=False, reuse=kept, cancel=cancel)

    def launch(self, cfg, per_round: int | None = None) -> None:
        """Start Ray (unless under way) and the client actors in a background thread, and
        return at once.

        The actors import the model stack and load their backbones while this process checks
        the data, imports and opens the tracking store; :meth:`make_pool` then hands over the
        launched pool. A second call does nothing.
        """
        if self._launched is not None:
            return
        if self._start is None:
            self._start = RayStart(cfg.resources.log_to_driver)
        start = self._start
        cancel = self._cancel = threading.Event()

        def bring_up() -> ClientPool:
            self.started = start.result()  # runs after the start: its error, if any
            size = per_round
            if size is None:  # how many clients a round samples
                from fedsim.data.partition import clients_per_round

                size = clients_per_round(cfg.clients.num, cfg.clients.fraction)
            return self._pool(cfg, pool_size(cfg, size), cancel)

        self._launched = start.submit(bring_up)

    def start(self) -> None:
        """Ray is up: joined or started here, or (after :meth:`launch`) waited for. From here
        on the cluster's GCS is watched (:mod:`actors.gcs_watch`)."""
        if self._launched is not None:
            self._launched.result()  # Ray is up and the actors are starting (or its error)
        elif self._start is not None:
            self.started = self._start.result()
        elif not self.started:
            self.started = init_ray()
        if self._gcs is None:
            import ray

            try:
                address = ray.get_runtime_context().gcs_address
            except Exception:  # noqa: BLE001 - a Ray Client connection names no GCS: no watch
                return
            self._gcs = GcsWatch(address)
            self._gcs_reported = False

    def on_gcs_lost(self, callback) -> None:
        """Call ``callback(reason)`` once, from another thread, if the Ray cluster's GCS goes
        away (None: no call); a run interrupts its main thread with it."""
        if self._gcs is not None:
            self._gcs.on_lost(callback)

    def take_gcs_loss(self) -> str | None:
        """Why the GCS counts as lost (a sentence), once it does, else None; the caller reports
        it, so :meth:`close` will not."""
        lost = self._gcs.lost if self._gcs is not None else None
        self._gcs_reported = self._gcs_reported or lost is not None
        return lost

    def make_pool(self, cfg, per_round: int, wait: bool = True) -> ClientPool:
        """Start the actors (or take those :meth:`launch` started); with ``wait=False`` return
        before they are ready (``pool.wait_ready()`` later)."""
        self.server_actor = cfg.resources.server == "actor"
        if self._launched is not None:
            launched, self._launched = self._launched, None
            pool = launched.result()
        else:
            pool = self._pool(cfg, pool_size(cfg, per_round))
        if wait:
            pool.wait_ready()
        return pool

    def make_server(self, *args) -> Any:
        return start_server(*args) if self.server_actor else ServerState(*args)

    def actor_nodes(self, pool: ClientPool) -> set[str]:
        """The Ray node ids that hold the pool's actors (for their system metrics)."""
        import ray

        return set(ray.get([a.node_id.remote() for a in pool.actors]))

    def call(self, server, method: str, *args) -> Any:
        """Start a server call: a ref (server actor), or its value (server in the driver).

        Object refs among ``args`` reach the method as their values either way: Ray resolves
        a top-level ref argument of an actor call, and this process fetches them otherwise.
        """
        if not isinstance(server, ServerState):
            return getattr(server, method).remote(*args)
        import ray

        refs = [i for i, a in enumerate(args) if isinstance(a, ray.ObjectRef)]
        values = list(args)
        for i, value in zip(refs, ray.get([args[i] for i in refs])):
            values[i] = value
        return getattr(server, method)(*values)

    def get(self, ref) -> Any:
        import ray

        if isinstance(ref, ray.ObjectRef) or (
            isinstance(ref, list) and ref and isinstance(ref[0], ray.ObjectRef)
        ):
            return ray.get(ref)
        return ref  # a value already (a call on the server in this process)

    def put(self, value) -> Any:
        import ray

        return ray.put(value)

    def share(self, value) -> Any:
        """One object-store ref for many tasks: ``value`` itself when it is a ref already."""
        import ray

        return value if isinstance(value, ray.ObjectRef) else ray.put(value)

    def close(self, pool, server) -> None:
        """Stop the pool and the server actor, and Ray if this executor started it; with
        ``keep_actors`` keep the pool's actors (and Ray) for the next run instead.

        Safe to call more than once (``fedsim run`` calls it again after a run ends). A Ray
        whose GCS is gone cannot stop actors: they are left to Ray, and a warning says so
        unless the run reported the loss already.
        """
        import ray

        if self._gcs is not None and (self._gcs.lost or not self._gcs.check()):
            if not self._gcs_reported:
                self._gcs_reported = True
                _log.warning(
                    "%s: Ray cannot stop cleanly; restart the cluster before the next run",
                    self._gcs.lost,
                )
            self._launched = self._kept = None  # nothing to stop without the GCS
            self.keep_actors = False
            self._stop_ray()
            return
        if self._launched is not None:  # launched, never taken over: a check failed meanwhile
            launched, self._launched = self._launched, None
            self._cancel.set()  # actors still waiting for room on the cluster are not started
            try:
                pool = pool or launched.result()
            except BaseException:  # noqa: BLE001 - the run's own error is the one to report
                pass
        if server is not None and not isinstance(server, ServerState):
            ray.kill(server)
        if self.keep_actors:
            if pool is not None and pool is not self._kept and pool.actors:
                if self._kept is not None:
                    self._kept.shutdown()
                self._kept = pool
            return
        if pool is not None:
            pool.shutdown()
        self._stop_ray()

    def release(self) -> None:
        """Stop the kept actors (freeing their resources) but stay a warm pool: the next run
        starts new actors and keeps them."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.shutdown()

    def shutdown(self) -> None:
        """Stop the kept actors, and Ray if this executor started it."""
        if self._launched is not None or self._kept is not None:
            kept, self._kept, self.keep_actors = self._kept, None, False
            self.close(kept, None)
        else:
            self._stop_ray()

    def _stop_ray(self) -> None:
        import ray

        if self._gcs is not None:
            self._gcs.stop()
            self._gcs = None
        start, self._start = self._start, None
        if start is not None:
            try:
                self.started = start.result() or self.started
            except BaseException:  # noqa: BLE001 - Ray did not start: nothing to stop
                pass
        if self.started:
            ray.shutdown()
            self.started = False
        if start is not None:  # after ray.shutdown: the thread that called ray.init
            start.close()


class LocalPool:
    """:class:`ClientPool`'s interface in this process: one worker runs every task in turn.

    A task that raises is retried up to ``resources.max_retries`` times, as on Ray. The
    seconds spent in each round's training and in each global evaluation are kept
    (``train_seconds``, ``eval_seconds``: one entry per call), for the scale benchmark's floor.
    """

    def __init__(self, cfg):
        from actors.client import ClientWorker

        self.cfg = cfg
        self.worker = ClientWorker(cfg)
        self.replaced = 0
        self.train_seconds: list[float] = []
        self.eval_seconds: list[float] = []

    def __len__(self) -> int:
        return 1

    def call_first(self, method: str, *args) -> Any:
        return getattr(self.worker, method)(*args)

    def wait_ready(self) -> None:
        pass

    def train(self, tasks, broadcast, states: dict, on_done=None) -> Outcome:
        start = time.perf_counter()
        jobs = {
            t.client_id: (
                lambda attempt, t=t: self.worker.train(
                    replace(t, attempt=attempt), broadcast, states.get(t.client_id)
                )
            )
            for t in tasks
        }
        out = self._run(jobs, on_done)
        self.train_seconds.append(time.perf_counter() - start)
        return out

    def evaluate(self, broadcast) -> Outcome:
        start = time.perf_counter()
        out = self._run({0: lambda _attempt: (self.worker.evaluate_global(broadcast, 0, 1),)})
        self.eval_seconds.append(time.perf_counter() - start)
        return out

    def _run(self, jobs: dict[Hashable, Callable], on_done=None) -> Outcome:
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
            if on_done is not None:
                if key in out.failed:
                    on_done(key, None, None)
                else:
                    on_done(key, out.values[key], out.refs.get(key))
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

    def launch(self, cfg, per_round: int | None = None) -> None:
        """Nothing starts ahead here (:meth:`RayExecutor.launch`'s signature, so ``fedsim
        run``'s :func:`fedsim.cli.start_run` takes this executor too)."""

    def make_pool(self, cfg, per_round: int, wait: bool = True) -> LocalPool:
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

    def actor_nodes(self, pool: LocalPool) -> set[str]:
        """No Ray node: everything runs on this machine."""
        return set()

    def call(self, server, method: str, *args) -> Any:
        return getattr(server, method)(*args)

    def get(self, ref) -> Any:
        return ref

    def put(self, value) -> Any:
        return value

    def share(self, value) -> Any:
        return value

    def on_gcs_lost(self, callback) -> None:
        """No Ray, no GCS to lose."""

    def take_gcs_loss(self) -> None:
        return None

    def close(self, pool, server) -> None:
        pass
