"""A study's runs, one after another or several at once on one Ray cluster.

:func:`fedsim.simulation.study.run_study` hands its planned runs to :func:`run_all`, which runs
them in *lanes*. A lane runs one run at a time on a warm pool of client actors
(:func:`fedsim.simulation.run.warm_pool`), so its later runs take over its earlier runs' actor
processes. With one lane the lane is the calling process itself. With more, each lane is a
Ray actor (:class:`StudyLane`) that drives its runs exactly as ``fedsim.run`` would in a
process of its own: its runs start their own client actors, in their own placement group,
anywhere on the cluster. The lanes stay on the study driver's node (they write the same MLflow
store and checkpoint directories, in the same working directory), hold no CPU or GPU of the
cluster's and take the next planned run as soon as they are free.

How many lanes (``study.parallel``, or ``parallel=``): a positive number is taken as it is
(at most one lane per run); 0, the default, is as many as the cluster's client slots hold when
each run keeps the pool it would start alone: ``slots // min(slots, per_round)``, with
``slots`` the client actors the cluster's CPUs and GPUs fit (``resources.client``) and
``per_round`` the clients a round samples (or ``resources.actors``, where set). A run alone
takes every slot a round can use, so on a small machine the default is 1 and concurrency is
asked for. With ``n`` lanes each run's pool is capped at ``slots // n`` actors (``resources
.actors``), so that the lanes' pools fit side by side; a run's numbers do not depend on its
number of actors.

A run that fails does not stop the study: the lane records the error (a line, with the resume
command where the run left a checkpoint) and takes the next run; :func:`run_all` returns the
failures with the results. Ctrl-C or SIGTERM stops the study: runs in flight are stopped the
same way (their MLflow runs marked KILLED, their resume lines printed).
"""

from __future__ import annotations

import copy
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedsim.config import ConfigError
from fedsim.errors import RunFailed, one_line

# Seconds a study waits for its lanes' runs to stop after Ctrl-C or SIGTERM before it ends the
# lanes' processes (a run's own stop takes about a second with a local store).
STOP_WAIT_S = 15.0


@dataclass
class Failure:
    """A run of the study that failed: its index in the plan, its label and the error's line."""

    index: int
    label: str
    error: str


def lane_count(requested: int, cfgs: list) -> tuple[int, int]:
    """The number of lanes for ``cfgs`` on the Ray cluster this process joined, and the pool
    cap per run (0: none); see :func:`plan_lanes`.

    Args:
        requested: ``study.parallel`` (0: as many as the cluster holds).
        cfgs: every planned run's config.
    """
    import ray

    from actors.pool import cluster_slots
    from fedsim.data.partition import clients_per_round

    if requested == 1 or not ray.is_initialized():  # one lane: no cluster to ask
        return 1, 0
    slots, own = None, 1
    for cfg in cfgs:
        fit, _, _ = cluster_slots(cfg)
        slots = fit if slots is None else min(slots, fit)
        per_round = clients_per_round(cfg.clients.num, cfg.clients.fraction)
        own = max(own, min(cfg.resources.actors or per_round, per_round))
    return plan_lanes(slots or 0, own, requested, len(cfgs))


def plan_lanes(slots: int, own: int, requested: int, runs: int) -> tuple[int, int]:
    """``(lanes, actors)``: how many runs at once, and the most client actors each run's pool
    may have with that many (0 with one lane: a run alone keeps the pool it would start).

    Args:
        slots: the client actors the cluster's resources fit (the smallest over the runs).
        own: the pool a run would start alone, at most (its sampled clients per round, or
            ``resources.actors``).
        requested: ``study.parallel``; 0: ``slots // min(slots, own)``.
        runs: the study's runs (no more lanes than runs).
    """
    if requested > 0:
        lanes = requested
    else:
        lanes = slots // min(slots, own) if slots > 0 else 1
    lanes = max(1, min(lanes, runs))
    return lanes, (max(1, slots // lanes) if lanes > 1 else 0)


def run_all(
    cfgs: list,
    lanes: int,
    actors: int,
    pool=None,
    on_done: Callable[[int, object, float], None] | None = None,
) -> tuple[list, list[Failure]]:
    """Run every config in ``lanes`` lanes; the results in plan order (None where a run
    failed) and the failures.

    Args:
        cfgs: the runs' configs, in plan order (their ``tracking.run_name`` labels them).
        lanes: how many runs at once (:func:`lane_count`).
        actors: the cap on each run's client actors with several lanes (0: none).
        pool: with one lane, the warm pool to run on (None: one of the study's own, stopped
            at the end).
        on_done: called as ``on_done(index, result_or_failure, seconds)`` as each run ends.
    """
    if lanes <= 1:
        return _in_process(cfgs, pool, on_done)
    return _in_lanes(cfgs, lanes, actors, on_done)


def _in_process(cfgs, pool, on_done) -> tuple[list, list[Failure]]:
    from fedsim.simulation.run import warm_pool

    own = pool is None
    pool = warm_pool() if own else pool
    results: list = [None] * len(cfgs)
    failures: list[Failure] = []
    try:
        for i, cfg in enumerate(cfgs):
            start = time.perf_counter()
            outcome = _one_run(cfg, pool)
            if isinstance(outcome, str):
                outcome = Failure(i, cfg.tracking.run_name, outcome)
                failures.append(outcome)
            else:
                results[i] = outcome
            if on_done is not None:
                on_done(i, outcome, time.perf_counter() - start)
    finally:
        if own:
            pool.shutdown()
    return results, failures


def _one_run(cfg, pool):
    """The run's result, or its error's line (a run that fails does not stop the study)."""
    from fedsim.simulation.run import run

    try:
        return run(cfg, quiet=True, executor=pool)
    except Exception as exc:  # noqa: BLE001 - the study goes on; the error is reported
        return one_line(exc, 400)


def _in_lanes(cfgs, lanes: int, actors: int, on_done) -> tuple[list, list[Failure]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    lane_cls = ray.remote(num_cpus=0, max_restarts=0)(StudyLane)
    options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
    workers = [lane_cls.options(**options).remote(os.getcwd()) for _ in range(lanes)]
    results: list = [None] * len(cfgs)
    failures: list[Failure] = []
    queue = list(range(len(cfgs)))
    busy: dict = {}  # object ref -> (lane, its pid, run index, start time)
    try:
        try:
            pids = ray.get([w.pid.remote() for w in workers])
        except ray.exceptions.RayError as exc:
            raise RunFailed(f"the study's lanes did not start: {one_line(exc, 300)}") from None
        free = list(zip(workers, pids))
        while queue or busy:
            while queue and free:
                lane, pid = free.pop(0)
                i = queue.pop(0)
                cfg = copy.deepcopy(cfgs[i])
                if actors:
                    cfg.resources.actors = min(cfg.resources.actors or actors, actors)
                busy[lane.run.remote(cfg)] = (lane, pid, i, time.perf_counter())
            (ref,), _ = ray.wait(list(busy), num_returns=1)
            lane, pid, i, start = busy.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the lane's process died
                outcome = f"the study's lane running it ended: {one_line(exc, 300)}"
                lane = pid = None
            if isinstance(outcome, str):
                outcome = Failure(i, cfgs[i].tracking.run_name, outcome)
                failures.append(outcome)
            else:
                results[i] = outcome
            if lane is not None:
                free.append((lane, pid))
            elif queue:  # a lane lost: a new one on the same node takes its place
                lane = lane_cls.options(**options).remote(os.getcwd())
                free.append((lane, ray.get(lane.pid.remote())))
                workers.append(lane)
            if on_done is not None:
                on_done(i, outcome, time.perf_counter() - start)
    except BaseException:
        _stop_lanes(busy)
        raise
    finally:
        _close_lanes(workers, busy)
    failures.sort(key=lambda f: f.index)
    return results, failures


def _close_lanes(workers: list, busy: dict) -> None:
    """Stop the idle lanes' pools (their actors, and the frozen-weight files they mapped),
    then end every lane's process."""
    import ray

    running = {id(lane) for lane, *_ in busy.values()}
    idle = [w for w in workers if id(w) not in running]
    try:
        ray.wait([w.close.remote() for w in idle], num_returns=len(idle), timeout=30)
    finally:
        for w in workers:
            ray.kill(w)


def _stop_lanes(busy: dict) -> None:
    """Stop the runs in flight as SIGTERM stops a run (MLflow KILLED, resume line printed),
    then wait a while for them."""
    import ray

    for _lane, pid, _i, _start in busy.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    if busy:
        ray.wait(list(busy), num_returns=len(busy), timeout=STOP_WAIT_S)


class StudyLane:
    """A Ray actor that runs a study's runs one at a time on a warm pool of its own (see the
    module's docstring). Each run is inside :func:`fedsim.termination.handle_sigterm`, so a
    SIGTERM from the study driver stops it as it stops ``fedsim run``."""

    def __init__(self, cwd: str):
        from fedsim import logs
        from fedsim.simulation.run import warm_pool

        os.chdir(cwd)  # the study's relative paths (store, checkpoints, data) as the driver's
        logs.install()
        self.pool = warm_pool()

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Stop the pool's actors (its runs are over)."""
        self.pool.shutdown()

    def run(self, cfg):
        from fedsim.termination import handle_sigterm

        with handle_sigterm():
            return _one_run(cfg, self.pool)


def check_parallel(value) -> int:
    """``study.parallel`` / ``parallel=``: a whole number of runs at once, 0 for automatic."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            "parallel",
            f"expected a whole number of runs at once (0: as many as the cluster holds), "
            f"got {value!r}",
        )
    return value
