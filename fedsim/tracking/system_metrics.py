"""System metrics of a run: CPU, memory, disk, network and GPU (where present) of the driver's
machine and of every Ray node the run's client actors use, shown in the MLflow UI's System
metrics tab.

The samples are taken by MLflow's own monitors (``mlflow.system_metrics.metrics``: the same
names as ``mlflow.start_run(log_system_metrics=True)``, e.g.
``system/cpu_utilization_percentage``). The driver samples its own machine in a thread; a node
of a multi-node cluster that holds client actors gets a ``num_cpus=0`` sampler actor pinned to
it, which the driver's thread asks for its sample each interval. Only the driver writes to the
store (a SQLite file on the head node is not reachable from the others). On one machine the
names are MLflow's plain ones; on a cluster each node's metrics go under its label,
``system/<node>/cpu_utilization_percentage``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

_log = logging.getLogger(__name__)


def _gpu_monitor() -> Any | None:
    """MLflow's NVIDIA (pynvml) or AMD (pyrsmi) monitor, or None where neither finds a GPU."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    for monitor in (GPUMonitor, ROCMMonitor):
        try:
            return monitor()
        except Exception:  # no driver, no library, no device: no GPU metrics
            continue
    return None


class NodeSampler:
    """Samples one machine with MLflow's monitors.

    Args:
        monitors: objects with MLflow's monitor interface (``collect_metrics``,
            ``aggregate_metrics``, ``clear_metrics``); None: CPU/memory, disk, network and a GPU
            monitor where a GPU is found.
    """

    def __init__(self, monitors: list | None = None):
        if monitors is None:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

            monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
            gpu = _gpu_monitor()
            if gpu is not None:
                monitors.append(gpu)
        self.monitors = monitors
        self._primed: int | None = None

    def prime(self) -> None:
        """Take a reading and drop it: psutil's CPU percentage counts from the previous call
        in the same thread (the very first returns a meaningless 0)."""
        for m in self.monitors:
            m.collect_metrics()
            m.clear_metrics()
        self._primed = threading.get_ident()

    def sample(self) -> dict[str, float]:
        """One reading (CPU utilisation: the mean since the previous call in this thread)."""
        if self._primed != threading.get_ident():
            self.prime()
            time.sleep(0.1)
        out: dict[str, float] = {}
        for m in self.monitors:
            m.collect_metrics()
            out.update(m.aggregate_metrics())
            m.clear_metrics()
        return out


def _node_labels(nodes: list[dict]) -> dict[str, str]:
    """Node id -> a readable label: its IP address, with the id's start where IPs repeat."""
    ips = [n.get("NodeManagerAddress") or n["NodeID"][:8] for n in nodes]
    return {
        n["NodeID"]: ip if ips.count(ip) == 1 else f"{ip}-{n['NodeID'][:8]}"
        for n, ip in zip(nodes, ips)
    }


def driver_label() -> str:
    """The label of the driver's Ray node when the Ray cluster has more than one node, else
    "" (one machine: MLflow's plain names). Decided before the first sample, so a run's
    series never change names."""
    import ray

    if not ray.is_initialized():
        return ""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return ""
    here = ray.get_runtime_context().get_node_id()
    return _node_labels(nodes).get(here, "driver")


class _RemoteNode:
    """A sampler actor on another Ray node; ``sample`` asks it for its last interval.

    ``answered``: whether it has returned a sample yet (until then its process may still be
    starting, which on a busy node takes longer than one interval)."""

    def __init__(self, node_id: str):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(NodeSampler).options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        self.actor = remote.remote()
        self.answered = False

    def sample(self, timeout: float) -> dict[str, float]:
        sample = self._ask(timeout)
        self.answered = True
        return sample

    def _ask(self, timeout: float) -> dict[str, float]:
        import ray

        return ray.get(self.actor.sample.remote(), timeout=timeout)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


# how long a sample waits for another node's sampler (at least one interval)
_ANSWER_WAIT_S = 5.0
# how long the run's last sample waits for a node's sampler that never answered (its actor's
# process still starting on a busy node); a sampler that answered once gets one interval
_FIRST_ANSWER_WAIT_S = 60.0


class SystemMetrics:
    """Logs system metrics to a run every ``interval_s`` seconds until :meth:`stop`.

    Args:
        client: the run's :class:`mlflow.tracking.MlflowClient`.
        run_id: the run.
        interval_s: seconds between two samples.
        first_step: the step of the first sample (a resumed run continues after its last).
        label: the driver's node label ("" on one machine; see :func:`driver_label`).
        local: the driver machine's sampler (tests pass one with their own monitors).
    """

    def __init__(
        self,
        client,
        run_id: str,
        interval_s: float,
        first_step: int = 0,
        label: str = "",
        local: NodeSampler | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.interval_s = interval_s
        self.step = first_step
        self.label = label
        self.nodes: dict[str, Any] = {label: local or NodeSampler()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tail = True  # log the interval's tail on stop
        self._thread = threading.Thread(
            target=self._loop, name="fedsim-system-metrics", daemon=True
        )
        self._thread.start()

    @staticmethod
    def next_step(client, run_id: str) -> int:
        """One past the last step of a ``system/`` metric in the run (0 if none)."""
        run = client.get_run(run_id)
        steps = [m.step for m in run.data._metric_objs if m.key.startswith("system/")]
        return max(steps) + 1 if steps else 0

    def add_ray_nodes(self, node_ids: set[str]) -> None:
        """Sample the Ray nodes ``node_ids`` too (the nodes that hold the run's client actors;
        the driver's own node is sampled already)."""
        if not node_ids:  # in-process: no Ray (asking Ray for its context would start it)
            return
        import ray

        here = ray.get_runtime_context().get_node_id()
        others = set(node_ids) - {here}
        if not others:
            return
        labels = _node_labels([n for n in ray.nodes() if n.get("Alive")])
        nodes: dict[str, Any] = dict(self.nodes)
        for node_id in sorted(others):
            try:
                nodes[labels.get(node_id, node_id[:8])] = _RemoteNode(node_id)
            except Exception as exc:  # a node gone meanwhile: the others still report
                _log.warning("no system metrics for Ray node %s: %s", node_id, exc)
        with self._lock:
            self.nodes = nodes

    def _log_once(self, last: bool = False) -> None:
        """Log one sample of every node. ``last``: the run's tail, for which a node that has
        not answered yet (its sampler still starting) is waited for up to
        ``_FIRST_ANSWER_WAIT_S``, so that a short run still records every node once."""
        with self._lock:
            nodes = dict(self.nodes)
        values: dict[str, float] = {}
        for label, sampler in nodes.items():
            prefix = f"system/{label}/" if label else "system/"
            try:
                if isinstance(sampler, NodeSampler):
                    sample = sampler.sample()
                else:
                    wait = max(self.interval_s, _ANSWER_WAIT_S)
                    if last and not sampler.answered:
                        wait = max(wait, _FIRST_ANSWER_WAIT_S)
                    sample = sampler.sample(timeout=wait)
            except Exception as exc:  # a node lost: its metrics stop, the run goes on
                _log.warning("system metrics of %s: %s", label or "the driver", exc)
                continue
            values.update({prefix + k: float(v) for k, v in sample.items()})
        if not values:
            return
        import mlflow

        ts = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, v, ts, self.step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)
        self.step += 1

    def _loop(self) -> None:
        # every local reading is taken in this thread (psutil counts CPU time per thread)
        for sampler in self.nodes.values():
            if isinstance(sampler, NodeSampler):
                sampler.prime()
        while True:
            stopping = self._stop.wait(self.interval_s)
            if stopping and not self._tail:
                return
            try:
                self._log_once(last=stopping)  # on stop: the interval's tail
            except Exception as exc:  # the store went away: stop sampling, keep the run
                _log.warning("system metrics stopped: %s", exc)
                return
            if stopping:
                return

    def stop(self, tail: bool = True) -> None:
        """Log a last sample (the interval's tail; not with ``tail=False``, for a run that
        must stop quickly), stop the thread and the node actors."""
        if self._stop.is_set():
            return
        self._tail = tail
        self._stop.set()
        self._thread.join()
        for sampler in self.nodes.values():
            if isinstance(sampler, _RemoteNode):
                try:
                    sampler.close()
                except Exception:
                    pass
