"""Ray actors for clients and the server, and the pool that schedules client tasks on them.

More clients than slots are multiplexed: a task goes to whichever actor is free. A task that
fails (its actor died, or it raised) is retried on another actor up to
``resources.max_retries`` times with the same seed, so a retry gives the same result.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from actors.client import ClientTask, ClientWorker
from actors.server import ServerState
from fedsim.config import ConfigError, FedSimConfig

RemoteClient = ray.remote(ClientWorker)
RemoteServer = ray.remote(ServerState)


def pool_size(cfg: FedSimConfig, max_tasks: int) -> int:
    """How many client actors to start: what the cluster fits, capped by config and demand.

    Raises:
        ConfigError: the cluster cannot fit even one client actor (the numbers say why).
    """
    res = ray.cluster_resources()
    need = cfg.resources.client
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    slots = math.floor(cpus / need.num_cpus + 1e-9)
    if need.num_gpus > 0:
        slots = min(slots, math.floor(gpus / need.num_gpus + 1e-9))
    if slots < 1:
        raise ConfigError(
            "resources.client",
            f"a client actor needs num_cpus={need.num_cpus}, num_gpus={need.num_gpus} but the "
            f"Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs",
        )
    cap = cfg.resources.actors or slots
    return max(1, min(slots, cap, max_tasks))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


@dataclass
class Outcome:
    """Results of a batch of tasks: first return values, the other refs, and failures."""

    values: dict[Hashable, object] = field(default_factory=dict)
    refs: dict[Hashable, tuple] = field(default_factory=dict)
    failed: dict[Hashable, str] = field(default_factory=dict)


class ClientPool:
    """A pool of client actors, each holding one backbone.

    Args:
        cfg: the resolved config (sent once to each actor).
        size: number of actors.
    """

    def __init__(self, cfg: FedSimConfig, size: int):
        self.cfg = cfg
        self.actors = [self._spawn() for _ in range(size)]
        try:
            ray.get([a.ping.remote() for a in self.actors])
        except RayError as exc:
            raise RuntimeError(f"a client actor failed to start: {_short(exc)}") from None

    def _spawn(self):
        r = self.cfg.resources.client
        return RemoteClient.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus).remote(self.cfg)

    def __len__(self) -> int:
        return len(self.actors)

    def call_first(self, method: str, *args):
        """Call ``method`` on the first actor and return its value."""
        return ray.get(getattr(self.actors[0], method).remote(*args))

    def train(self, tasks: list[ClientTask], broadcast_ref, states: dict) -> Outcome:
        """Run client tasks.

        Args:
            tasks: the round's client tasks.
            broadcast_ref: object-store ref of the server's broadcast (shared by all tasks).
            states: client id to the ref of its persistent state (absent: first round).

        Returns:
            ``values[cid]`` is the report; ``refs[cid]`` the refs of (update, scaffold delta,
            new state).
        """
        jobs = {
            t.client_id: (
                lambda a, t=t: a.train.options(num_returns=4).remote(
                    t, broadcast_ref, states.get(t.client_id)
                )
            )
            for t in tasks
        }
        return self._run(jobs)

    def evaluate(self, broadcast_ref) -> Outcome:
        """Evaluate the global adapter, the test set split in one shard per actor."""
        n = len(self.actors)
        jobs = {
            shard: (lambda a, s=shard: (a.evaluate_global.remote(broadcast_ref, s, n),))
            for shard in range(n)
        }
        return self._run(jobs)

    def _run(self, jobs: dict[Hashable, Callable]) -> Outcome:
        out = Outcome()
        pending = deque(jobs)
        attempts: dict[Hashable, int] = dict.fromkeys(jobs, 0)
        tried_on: dict[Hashable, set[int]] = {k: set() for k in jobs}
        idle = deque(range(len(self.actors)))
        inflight: dict = {}
        while pending or inflight:
            while pending and idle:
                key = pending.popleft()
                # Prefer an actor this task has not failed on.
                fresh = [i for i in idle if i not in tried_on[key]]
                i = fresh[0] if fresh else idle[0]
                idle.remove(i)
                refs = jobs[key](self.actors[i])
                inflight[refs[0]] = (key, i, refs)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            key, i, refs = inflight.pop(ready[0])
            try:
                out.values[key] = ray.get(ready[0])
                out.refs[key] = refs[1:]
            except (RayActorError, RayTaskError) as exc:
                if isinstance(exc, RayActorError):
                    self.actors[i] = self._spawn()  # the process is gone: replace it
                attempts[key] += 1
                tried_on[key].add(i)
                if attempts[key] > self.cfg.resources.max_retries:
                    out.failed[key] = _short(exc)
                else:
                    pending.append(key)
            idle.append(i)
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def start_server(merger, initial, options) -> object:
    """Start the server actor (no CPU reserved: it only merges between client tasks)."""
    return RemoteServer.options(num_cpus=0).remote(merger, initial, options)
