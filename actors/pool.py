"""Ray actors for clients and the server, and the pool that schedules client tasks on them.

More clients than slots are multiplexed: a task goes to whichever actor is free. A task that
fails (its actor died, or it raised) is retried on another actor up to
``resources.max_retries`` times with the same seed, so a retry gives the same result.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from actors.server import ServerState
from fedsim.config import ConfigError, FedSimConfig
from fedsim.messages import ClientTask


class ClientActor:
    """The Ray actor around :class:`actors.client.ClientWorker`.

    The model stack (transformers, peft, the backbone) is imported in the actor process only:
    the driver, which merely schedules tasks, never loads it (seconds of start-up and hundreds
    of MB less).
    """

    def __init__(self, cfg: FedSimConfig):
        from actors.client import ClientWorker

        self.worker = ClientWorker(cfg, frozen_dir=_frozen_dir(cfg))

    def reset(self, cfg: FedSimConfig) -> str:
        """Serve another run: a new worker built from ``cfg``, as a new actor would build it.

        Only the process stays (its imported modules): the backbone, the data, the adapters
        and every method's state are built afresh (:class:`actors.executor.RayExecutor` with
        ``keep_actors=True``).
        """
        from actors.client import ClientWorker

        self.worker = None  # the old worker's memory goes before the new one is built
        self.worker = ClientWorker(cfg, frozen_dir=_frozen_dir(cfg))
        return self.worker.ping()

    def drop_frozen(self) -> int:
        """Remove this node's shared frozen-weight files (the pool is ending; the mappings
        the actors hold stay valid). Returns how many were removed."""
        from fedsim.models.frozen import drop, node_directory

        return drop(node_directory())

    def ping(self) -> str:
        return self.worker.ping()

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()

    def describe(self):
        return self.worker.describe()

    def initial_global(self):
        return self.worker.initial_global()

    def shared_keys(self, keys: list[str]) -> list[str]:
        return self.worker.shared_keys(keys)

    def train(self, task, broadcast, state):
        return self.worker.train(task, broadcast, state)

    def evaluate_global(self, broadcast, shard: int, num_shards: int):
        return self.worker.evaluate_global(broadcast, shard, num_shards)

    def peft_files(self, state, target_modules: str, rank: int, global_rank: int, dense):
        return self.worker.peft_files(state, target_modules, rank, global_rank, dense)


def _frozen_dir(cfg: FedSimConfig):
    """Where this node's actors share the frozen backbone, or None (``resources.share_frozen``
    off: each actor builds its own)."""
    # hf-vlm: a Hugging Face model's pickled copy can lose state that generation needs (seen
    # with a tiny LLaVA: its tasks failed on the mapped copy), so it is built privately
    if not cfg.resources.share_frozen or cfg.model.backbone == "hf-vlm":
        return None
    from fedsim.models.frozen import node_directory

    return node_directory()


RemoteClient = ray.remote(ClientActor)
RemoteServer = ray.remote(ServerState)


def cluster_slots(cfg: FedSimConfig) -> tuple[int, float, float]:
    """How many client actors the cluster's total resources fit, and those totals."""
    res = ray.cluster_resources()
    need = cfg.resources.client
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    slots = math.floor(cpus / need.num_cpus + 1e-9)
    if need.num_gpus > 0:
        slots = min(slots, math.floor(gpus / need.num_gpus + 1e-9))
    return slots, cpus, gpus


def pool_size(cfg: FedSimConfig, max_tasks: int) -> int:
    """How many client actors to start: what the cluster fits, capped by config and demand.

    Raises:
        ConfigError: the cluster cannot fit even one client actor (the numbers say why).
    """
    slots, cpus, gpus = cluster_slots(cfg)
    need = cfg.resources.client
    if slots < 1:
        raise ConfigError(
            "resources.client",
            f"a client actor needs num_cpus={need.num_cpus}, num_gpus={need.num_gpus} but the "
            f"Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs",
        )
    cap = cfg.resources.actors or slots
    return max(1, min(slots, cap, max_tasks))


class Cancelled(Exception):
    """The run stopped (a check failed) before its client actors were placed."""


# how often a placement that is waited for looks whether the run was cancelled meanwhile
_CANCEL_POLL_S = 0.2


def reserve(cfg: FedSimConfig, size: int, cancel: threading.Event | None = None):
    """A placement group of ``size`` client-actor bundles, placed or failed within the timeout.

    Args:
        cfg: the resolved config (``resources``).
        size: number of bundles, one per client actor.
        cancel: set by another thread when the run no longer needs the actors (a check failed
            while they were being placed): the wait ends at once instead of lasting until the
            cluster has room or the timeout.

    Returns:
        The ready placement group, or None with ``resources.placement=none``.

    Raises:
        ConfigError: the cluster could not place the bundles in time (the numbers say why).
        Cancelled: ``cancel`` was set first (the group is removed).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    r = cfg.resources
    if r.placement == "none":
        return None
    bundle = {"CPU": float(r.client.num_cpus)}
    if r.client.num_gpus > 0:
        bundle["GPU"] = float(r.client.num_gpus)
    pg = placement_group([dict(bundle) for _ in range(size)], strategy=r.placement.upper())
    placed, deadline = pg.ready(), time.monotonic() + r.placement_timeout_s
    ready: list = []
    while not ready and (left := deadline - time.monotonic()) > 0:
        ready, _ = ray.wait([placed], timeout=min(left, _CANCEL_POLL_S) if cancel else left)
        if not ready and cancel is not None and cancel.is_set():
            remove_placement_group(pg)
            raise Cancelled
    if not ready:
        remove_placement_group(pg)
        free = ray.available_resources()
        raise ConfigError(
            "resources",
            f"the Ray cluster could not place {size} client actors of {bundle} with "
            f"placement={r.placement} within {r.placement_timeout_s:g} s (free now: "
            f"{free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs; nodes: "
            f"{len([n for n in ray.nodes() if n.get('Alive')])}); lower resources.actors or "
            "the per-actor resources, or choose another resources.placement",
        )
    return pg


_CONFIG_ERROR = re.compile(r"ConfigError: config error: (\S+): (.*)")


def _config_error(exc: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` an actor's constructor raised, if that is what ``exc`` wraps.

    Ray keeps the exception object of a failed task but only the text of a failed actor
    constructor, so the text is searched too.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError):
            return exc
        match = _CONFIG_ERROR.search(str(exc))
        if match:
            message = match.group(2).strip()
            return ConfigError(
                match.group(1), message[:400] + ("..." if len(message) > 400 else "")
            )
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def short_reason(exc: BaseException) -> str:
    """The last line of an exception's text: why a task failed, in one line."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


OnDone = Callable[[int, object, "ClientRefs | None"], None]


@dataclass(frozen=True)
class ClientRefs:
    """Object refs of what a client task returned besides its report."""

    upload: ray.ObjectRef  # fedsim.messages.Upload, for the server
    state: ray.ObjectRef  # fedsim.messages.ClientState, the client's next persistent state


@dataclass
class Outcome:
    """Results of a batch of tasks: first return values, the other refs, and failures.

    ``values[key]`` is a task's first return value (a client's ``ClientReport``, a shard's
    evaluation part); ``refs[key]`` the refs of the rest (a client task's ``ClientRefs``).
    """

    values: dict[Hashable, object] = field(default_factory=dict)
    refs: dict[Hashable, ClientRefs] = field(default_factory=dict)
    failed: dict[Hashable, str] = field(default_factory=dict)


class ClientPool:
    """A pool of client actors, each holding one backbone.

    Args:
        cfg: the resolved config (sent once to each actor).
        size: number of actors.
        wait: wait until every actor is ready (else call :meth:`wait_ready` later).
        reuse: a finished run's pool whose actors this pool takes over when they
            :meth:`fits` (each builds a new worker from ``cfg``); otherwise it is shut down.
        cancel: see :func:`reserve` (the pool is being started in the background).

    Raises:
        Cancelled: ``cancel`` was set before the actors were placed.
    """

    def __init__(
        self,
        cfg: FedSimConfig,
        size: int,
        wait: bool = True,
        reuse=None,
        cancel: threading.Event | None = None,
    ):
        self.cfg = cfg
        self.replaced = 0
        # kept actors this run does not use (a warm pool's, held for later runs)
        self.spare: list = []
        if reuse is not None and reuse.fits(cfg, size):
            # the previous runs' actors, each given a new worker for this config
            kept, reuse.actors, reuse.spare = reuse.actors + reuse.spare, [], []
            self.group, reuse.group, self.reused = reuse.group, None, True
            self.actors, self.spare = kept[:size], kept[size:]
            self._pings = [a.reset.remote(cfg) for a in self.actors]
        else:
            if reuse is not None:
                reuse.shutdown()
            self.group, self.reused = reserve(cfg, size, cancel), False
            # every actor starts at once and loads its backbone in parallel with the others
            self.actors = [self._spawn(i) for i in range(size)]
            self._pings = [a.ping.remote() for a in self.actors]
        if wait:
            self.wait_ready()

    def fits(self, cfg: FedSimConfig, size: int) -> bool:
        """Whether this pool's actors can serve a run of ``cfg`` with ``size`` actors: at least
        as many (the others wait as spares), with the same per-actor resources and placement.
        """
        mine, theirs = self.cfg.resources, cfg.resources
        return (
            bool(self.actors)
            and len(self.actors) + len(self.spare) >= size
            and (mine.client.num_cpus, mine.client.num_gpus, mine.placement)
            == (theirs.client.num_cpus, theirs.client.num_gpus, theirs.placement)
        )

    def wait_ready(self) -> None:
        """Wait until every actor has built its backbone (the driver works meanwhile).

        Raises:
            ConfigError: an actor's constructor found a user mistake (one line).
            RuntimeError: an actor failed to start for another reason.
        """
        pings, self._pings = self._pings, []
        try:
            for i, ping in enumerate(pings):
                try:
                    ray.get(ping)
                except RayActorError:
                    if not self.reused:
                        raise
                    # a kept actor that died since its last run: a new one takes its slot
                    self.actors[i] = self._spawn(i)
                    ray.get(self.actors[i].ping.remote())
        except RayError as exc:
            self.shutdown()
            cause = _config_error(exc)
            if cause is not None:  # a user mistake the actor found: keep it one line
                raise cause from None
            raise RuntimeError(f"a client actor failed to start: {short_reason(exc)}") from None

    def _spawn(self, index: int):
        """Start the actor of slot ``index`` (in its placement-group bundle, if any)."""
        r = self.cfg.resources.client
        options: dict = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=index
            )
        return RemoteClient.options(**options).remote(self.cfg)

    def __len__(self) -> int:
        return len(self.actors)

    def call_first(self, method: str, *args):
        """Call ``method`` on the first actor and return its value."""
        return ray.get(getattr(self.actors[0], method).remote(*args))

    def train(
        self, tasks: list[ClientTask], broadcast_ref, states: dict, on_done: OnDone | None = None
    ) -> Outcome:
        """Run client tasks.

        Args:
            tasks: the round's client tasks.
            broadcast_ref: object-store ref of the server's broadcast (shared by all tasks).
            states: client id to the ref of its persistent state (absent: first round).
            on_done: called with ``(client id, report, ClientRefs)`` as each task succeeds and
                with ``(client id, None, None)`` when one has failed for good, in the order
                they finish (the streaming merge).

        Returns:
            ``values[cid]`` is the client's report, ``refs[cid]`` its upload and new state.
        """
        jobs = {
            t.client_id: (
                lambda a, attempt, t=t: a.train.options(num_returns=3).remote(
                    replace(t, attempt=attempt), broadcast_ref, states.get(t.client_id)
                )
            )
            for t in tasks
        }
        out = self._run(jobs, on_done)
        out.refs = {c: ClientRefs(*refs) for c, refs in out.refs.items()}
        return out

    def evaluate(self, broadcast_ref) -> Outcome:
        """Evaluate the global adapter, the test set split in one shard per actor."""
        n = len(self.actors)
        jobs = {
            shard: (lambda a, _attempt, s=shard: (a.evaluate_global.remote(broadcast_ref, s, n),))
            for shard in range(n)
        }
        return self._run(jobs)

    def _run(self, jobs: dict[Hashable, Callable], on_done: OnDone | None = None) -> Outcome:
        out = Outcome()
        pending = deque(jobs)
        attempts: dict[Hashable, int] = dict.fromkeys(jobs, 0)
        tried_on: dict[Hashable, set[int]] = {k: set() for k in jobs}
        idle = deque(range(len(self.actors)))
        inflight: dict = {}
        while pending or inflight:
            self._refill(jobs, pending, idle, inflight, attempts, tried_on)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            key, i, refs = inflight.pop(ready[0])
            idle.append(i)
            try:
                out.values[key] = ray.get(ready[0])
                out.refs[key] = refs[1:]
            except (RayActorError, RayTaskError) as exc:
                if isinstance(exc, RayActorError):
                    self.actors[i] = self._spawn(i)  # the process is gone: replace it
                    self.replaced += 1
                attempts[key] += 1
                tried_on[key].add(i)
                if attempts[key] > self.cfg.resources.max_retries:
                    out.failed[key] = short_reason(exc)
                    if on_done is not None:
                        on_done(key, None, None)
                else:
                    pending.append(key)
                continue
            if on_done is not None:
                # the freed actor gets its next task first, so the callback (a merge) overlaps
                # training
                self._refill(jobs, pending, idle, inflight, attempts, tried_on)
                on_done(key, out.values[key], ClientRefs(*refs[1:]))
        return out

    def _refill(self, jobs, pending, idle, inflight, attempts, tried_on) -> None:
        """Hand pending tasks to idle actors (preferring one the task has not failed on)."""
        while pending and idle:
            key = pending.popleft()
            fresh = [i for i in idle if i not in tried_on[key]]
            i = fresh[0] if fresh else idle[0]
            idle.remove(i)
            refs = jobs[key](self.actors[i], attempts[key])
            inflight[refs[0]] = (key, i, refs)

    def shutdown(self) -> None:
        actors = self.actors + self.spare
        if actors and self.cfg.resources.share_frozen:
            # the shared frozen-weight files go with the pool (models/frozen.py); an actor that
            # died cannot answer, and one that is slow does not hold up the shutdown. A pool
            # whose start was never waited for (a check failed meanwhile) waits a second at
            # most: its actors may still be importing, and an idle kept actor answers at once
            dropped = [a.drop_frozen.remote() for a in actors]
            ray.wait(dropped, num_returns=len(dropped), timeout=1 if self._pings else 10)
        for a in actors:
            ray.kill(a)
        self.actors, self.spare = [], []
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None


def start_server(*args) -> object:
    """Start the server actor (no CPU reserved: it only merges between client tasks).

    Args:
        args: :class:`actors.server.ServerState`'s arguments.
    """
    return RemoteServer.options(num_cpus=0).remote(*args)
