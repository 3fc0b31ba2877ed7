"""Scale benchmark: fedsim's round time and memory at 10, 100, 1,000 clients, against a floor.

For each client count ``N`` the benchmark runs, each in a fresh process:

* **fedsim**: ``fedsim.simulation.run.run`` of ``--rounds`` rounds with ``clients.num=N`` and
  ``clients.fraction=--fraction`` on its own local Ray (so every Ray process of the run is a
  descendant of that process). A background thread samples, every ``--interval`` seconds, the
  RSS and PSS of the driver, of the Ray worker processes (the client actors, the server actor,
  idle workers) and of Ray's own daemons, and keeps the peak of each sum.
* **floor**: ``fedsim.simulation.run.run`` of the very same config with
  ``executor=actors.executor.LocalExecutor()``: the real round loop, every client task and the
  server in this one process, no Ray. Its ``LocalPool`` (one ``ClientWorker``, whose backbone
  load is not timed) trains the sampled clients of a round back to back and keeps the seconds
  of each round's training (``train_seconds``) and of each global evaluation
  (``eval_seconds``). Both runs execute the same loop, so the floor's history (every metric
  but ``time/*``) must equal fedsim's exactly: the check that it did the same work.

With ``--ray-address`` the fedsim case joins that running Ray cluster instead of starting one
(no Ray start-up in the case); its memory is then the driver and the run's client actors on
this machine, found through the run's pool, since they are not the process's descendants.

It prints one row per ``N`` (see ``experiments/bench/README.md`` for the columns) and the
memory growth per extra client next to the bytes of state a client keeps:

    python experiments/bench/scale.py [--clients 10,100,1000]
        [--backbone tiny|minilm-effnet] [--rounds 2] [--fraction 0.1] [--sharing B]
        [--ray-address HOST:PORT]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

DEFAULT_CLIENTS = "10,100,1000"
# The emoji benchmark has 3,944 rows; 80% (3,155) are partitioned over the clients. The default
# data.min_per_client=10 caps a run at 315 clients; 3 rows each (2 to train, 1 held out) is the
# most that 1,000 clients can all have. Every N uses the same minimum so rows differ only in N.
DEFAULT_MIN_PER_CLIENT = 3
# The default rank list has 10 entries; these distributions give any number of clients ranks.
# The tiny backbone's LoRA targets admit rank 16 at most.
DEFAULT_RANKS = {"minilm-effnet": "fedilora", "tiny": "choice:4,8,16"}
RESULT_TAG = "SCALE-RESULT "
MB = 1e6

COLUMNS = (
    "clients",
    "sampled",
    "actors",
    "round s",
    "floor s",
    "round/floor",
    "eval s",
    "round/(floor+eval)",
    "ideal s",
    "round/ideal",
    "same result",
    "RSS MB",
    "PSS MB",
    "driver MB",
    "daemons MB",
    "with state",
    "state B/client",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--clients",
        default=DEFAULT_CLIENTS,
        help="comma-separated client counts N (default %(default)s)",
    )
    p.add_argument("--backbone", choices=("tiny", "minilm-effnet"), default="tiny")
    p.add_argument("--rounds", type=int, default=2, help="training rounds per run")
    p.add_argument("--fraction", type=float, default=0.1, help="clients.fraction")
    p.add_argument(
        "--sharing",
        choices=("all", "B", "A", "none"),
        default="all",
        help="sharing.policy; B or A keep one LoRA factor on each client (non-empty state)",
    )
    p.add_argument(
        "--min-per-client",
        type=int,
        default=DEFAULT_MIN_PER_CLIENT,
        help="data.min_per_client (default %(default)s: what 1,000 clients can all have)",
    )
    p.add_argument(
        "--ranks",
        help="clients.ranks as a distribution name (default: fedilora for minilm-effnet, "
        "choice:4,8,16 for tiny)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.2, help="memory sampling period, seconds")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further fedsim config overrides (repeatable), e.g. --set data.image_size=64",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the fedsim case joins this running Ray cluster (its GCS address, or auto) instead "
        "of starting a local Ray; memory then counts the driver and the run's client actors on "
        "this machine, not the cluster's daemons and idle workers",
    )
    p.add_argument("--case", choices=("fedsim", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--num", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.client_counts = [int(x) for x in args.clients.split(",") if x.strip()]
    if not args.client_counts or min(args.client_counts) < 1:
        p.error("--clients needs positive integers, e.g. 10,100,1000")
    return args


def overrides(args: argparse.Namespace, num: int, workdir: Path) -> list[str]:
    """The fedsim dotlist of one run: everything but ``clients.num`` is the same for every N."""
    items = [
        f"seed={args.seed}",
        f"rounds={args.rounds}",
        f"clients.num={num}",
        f"clients.fraction={args.fraction}",
        f"clients.ranks={args.ranks or DEFAULT_RANKS[args.backbone]}",
        f"model.backbone={args.backbone}",
        f"data.min_per_client={args.min_per_client}",
        f"sharing.policy={args.sharing}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        "tracking.experiment=fedsim-scale",
        "tracking.save_adapter=false",
        "tracking.plots=false",
        f"checkpoint.dir={workdir / 'runs'}",
        "progress=false",
    ]
    # Editing compares a shared tensor with its global version: under B (A private) edit B.
    if args.sharing == "B":
        items.append("editing.key=lora_B")
    elif args.sharing == "none":
        items.append("editing.enabled=false")
    return items + list(args.overrides)


class MemorySampler:
    """Samples the memory of this process and its descendants in a background thread.

    Descendants are split into Ray worker processes (their command line runs Ray's
    ``default_worker.py``; actors rename themselves ``ray::...``) and everything else (GCS,
    raylet, agents, log monitor: Ray's daemons). Each sample sums RSS and PSS per group; the
    peak of each sum over the samples is kept. PSS divides a shared page among the processes
    that map it, so it does not count the shared libraries (torch) once per process as RSS does.

    A run given :meth:`executor` also has its client actors sampled where they are not
    descendants (on a Ray cluster this process joined), and once more just before they stop.
    """

    def __init__(self, interval: float):
        self.interval = interval
        self.me = psutil.Process()
        self.peak = {k: 0 for k in ("rss", "pss", "driver", "daemons", "actors")}
        self.pool_size = 0  # client actors in the pool of the run given executor()
        self._asked: list = []  # refs to (pid, node id) of the watched actors, not yet answered
        self._actor_pids: set[int] = set()  # the watched actors that run on this machine
        self._node = ""
        self._lock = threading.Lock()  # the thread and the executor's last sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def executor(self):
        """A :class:`actors.executor.RayExecutor` (the default one) whose client actors this
        sampler watches: it asks each for its process id as the pool starts (Ray's
        ``__ray_call__``, queued behind the actor's start) and samples them once more just
        before the run stops them, so a short run's actors are seen at least once."""
        from actors.executor import RayExecutor

        sampler = self

        class WatchedExecutor(RayExecutor):
            def make_pool(self, cfg, per_round: int, wait: bool = True):
                pool = super().make_pool(cfg, per_round, wait)
                sampler.watch(pool.actors)
                return pool

            def close(self, pool, server) -> None:
                sampler.stopping(functools.partial(RayExecutor.close, self, pool, server))

        return WatchedExecutor()

    def watch(self, actors: list) -> None:
        """Ask each of ``actors`` (Ray actor handles) where it runs; those on this machine are
        sampled from the answer on."""
        import ray

        self.pool_size = len(actors)
        self._node = ray.get_runtime_context().get_node_id()

        def where(_actor) -> tuple[int, str]:  # runs in the actor
            return os.getpid(), ray.get_runtime_context().get_node_id()

        self._asked += [actor.__ray_call__.remote(where) for actor in actors]

    def stopping(self, stop: Callable[[], None]) -> None:
        """Sample the watched actors once more, then ``stop()`` them (and maybe Ray) and forget
        them (their pids may be reused); the thread does not sample meanwhile."""
        with self._lock:
            self.record(self.processes())
            stop()
            self._asked, self._actor_pids = [], set()

    def _watched_pids(self) -> set[int]:
        """The watched actors' pids on this machine, as far as they have answered."""
        import ray

        if self._asked and ray.is_initialized():
            ready, self._asked = ray.wait(self._asked, num_returns=len(self._asked), timeout=0)
            for ref in ready:
                try:
                    pid, node = ray.get(ref)
                except ray.exceptions.RayError:  # it died before it answered: nothing to sample
                    continue
                if node == self._node:
                    self._actor_pids.add(pid)
        return self._actor_pids

    def processes(self) -> list[psutil.Process]:
        """This process, its descendants, and the watched actors that are neither."""
        procs = [self.me, *self.me.children(recursive=True)]
        seen = {proc.pid for proc in procs}
        for pid in sorted(self._watched_pids() - seen):
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        return procs

    def sample(self) -> None:
        with self._lock:
            self.record(self.processes())

    def record(self, procs: list[psutil.Process]) -> None:
        """Add one sample of ``procs`` (``processes()``) to the peaks."""
        rss = pss = daemons = actors = driver = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
                name = proc.name() if proc is not self.me else ""
                cmdline = " ".join(proc.cmdline()) if proc is not self.me else ""
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if proc is self.me:
                driver = info.rss
            if proc is self.me or name.startswith("ray::") or "default_worker.py" in cmdline:
                rss += info.rss
                pss += info.pss
                # an actor's process title is ray::ClientActor, or ray::ClientActor.<method>
                actors += name.startswith("ray::ClientActor")
            else:
                daemons += info.rss
        for key, value in (
            ("rss", rss),
            ("pss", pss),
            ("driver", driver),
            ("daemons", daemons),
            ("actors", actors),
        ):
            self.peak[key] = max(self.peak[key], value)


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in a nested dict of tensors."""
    import torch

    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += state_bytes(value)
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def load_run_config(args: argparse.Namespace, num: int, workdir: Path):
    """The config of either case, its MLflow experiment created with artifacts under
    ``workdir`` (never ``./mlruns``)."""
    import logging

    from mlflow.tracking import MlflowClient

    from fedsim.config import load_config

    cfg = load_config(None, overrides(args, num, workdir))
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial ... tables"
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    if client.get_experiment_by_name(cfg.tracking.experiment) is None:
        client.create_experiment(
            cfg.tracking.experiment, artifact_location=(workdir / "artifacts").as_uri()
        )
    return cfg


def untimed_history(history: list[dict]) -> list[dict]:
    """A run's history without its ``time/*`` metrics (wall times differ from run to run)."""
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]


def run_fedsim(args: argparse.Namespace, num: int, workdir: Path) -> dict:
    """One fedsim run of ``num`` clients on a local Ray this process starts (or on the cluster
    at ``--ray-address``); round times and peak memory."""
    from fedsim.checkpoint.disk import load_checkpoint
    from fedsim.simulation.run import run

    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address  # what the run joins
    cfg = load_run_config(args, num, workdir)
    with MemorySampler(args.interval) as mem:
        result = run(cfg, executor=mem.executor())
    rounds = [h for h in result.history if h["round"] >= 1]
    clients = load_checkpoint(result.run_dir).clients
    sizes = [state_bytes(s) for s in clients.values()]
    return {
        # the pool the run used: what the cluster fits, capped by config and demand
        "pool": mem.pool_size,
        # per round, each client task's own seconds (training + personalised evaluation)
        "task_s": [[row["time_s"] for row in rows] for rows in result.clients[1:]],
        "round_s": [h["time/round_s"] for h in rounds],
        "aggregate_s": [h["time/aggregate_s"] for h in rounds],
        "sampled": [h["clients/sampled"] for h in rounds],
        "failed": [h["clients/failed"] for h in rounds],
        "accuracy": result.final["global/accuracy"],
        "loss": result.final["global/loss"],
        "history": untimed_history(result.history),
        "clients_with_state": len(clients),
        "state_bytes_total": sum(sizes),
        "peak": mem.peak,
    }


def run_floor(args: argparse.Namespace, num: int, workdir: Path) -> dict:
    """The same run in this process without Ray: the real round loop on a ``LocalExecutor``.

    ``train_s`` is, per round 1..R, the time its one worker spent training that round's
    clients back to back; ``eval_s`` is, per global evaluation after round 0, the time of that
    evaluation. Neither includes the backbone load (the worker is built before the loop).
    """
    from actors.executor import LocalExecutor
    from fedsim.simulation.run import run

    cfg = load_run_config(args, num, workdir)
    executor = LocalExecutor()
    with MemorySampler(args.interval) as mem:
        result = run(cfg, executor=executor)
    pool = executor.pool
    rounds = [h for h in result.history if h["round"] >= 1]
    return {
        "train_s": list(pool.train_seconds),
        "eval_s": list(pool.eval_seconds[1:]),  # [0] is round 0's, before any training
        "rounds": cfg.rounds,
        "round_s": [h["time/round_s"] for h in rounds],
        "accuracy": result.final["global/accuracy"],
        "loss": result.final["global/loss"],
        "history": untimed_history(result.history),
        "peak": mem.peak,
    }


def run_case(args: argparse.Namespace, case: str, num: int, workdir: Path) -> dict:
    """Run one case in a fresh Python process, so memory and Ray start from nothing."""
    cmd = [sys.executable, str(Path(__file__).resolve())]
    cmd += ["--case", case, "--num", str(num), "--workdir", str(workdir)]
    cmd += ["--backbone", args.backbone, "--rounds", str(args.rounds)]
    cmd += ["--fraction", str(args.fraction), "--sharing", args.sharing]
    cmd += ["--min-per-client", str(args.min_per_client), "--seed", str(args.seed)]
    cmd += ["--interval", str(args.interval)]
    if args.ranks:
        cmd += ["--ranks", args.ranks]
    if args.ray_address:
        cmd += ["--ray-address", args.ray_address]
    for item in args.overrides:
        cmd += ["--set", item]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)  # a local Ray of our own unless --ray-address names one
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise RuntimeError(f"the {case} case with {num} clients failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def equal(a, b) -> bool:
    """``a == b`` for nested dicts and lists of numbers, where NaN equals NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def same_result(fed: dict, floor: dict) -> bool:
    """Whether the floor's history (every metric but ``time/*``, every round) is fedsim's
    exactly: both ran the same round loop, so they did the same work."""
    return equal(fed["history"], floor["history"])


def longest_first(times: Sequence[float], slots: int) -> float:
    """Makespan of ``times`` scheduled longest first, each on the slot that frees first."""
    ends = [0.0] * max(1, slots)
    for t in sorted(times, reverse=True):
        ends[ends.index(min(ends))] += t
    return max(ends)


def ideal_round(fed: dict, floor: dict) -> float:
    """The round time the pool could reach: each round's client tasks (their own seconds in
    the run) scheduled longest first over the actors, plus the global evaluation (the floor's
    one-thread time) split evenly over them; the mean over the rounds."""
    slots = fed["pool"]
    eval_s = sum(floor["eval_s"]) / floor["rounds"]
    return mean([longest_first(ts, slots) for ts in fed["task_s"]]) + eval_s / slots


def table_row(num: int, fed: dict, floor: dict) -> dict:
    round_s, floor_s = mean(fed["round_s"]), mean(floor["train_s"])
    # per round, as round s counts it: a round not evaluated (eval.every) adds no evaluation
    eval_s = sum(floor["eval_s"]) / floor["rounds"]
    ideal = ideal_round(fed, floor)
    with_state = fed["clients_with_state"]
    return {
        "clients": num,
        "sampled": int(mean(fed["sampled"])),
        "actors": fed["peak"]["actors"],
        "round s": f"{round_s:.2f}",
        "floor s": f"{floor_s:.2f}",
        "round/floor": f"{round_s / floor_s:.2f}",
        "eval s": f"{eval_s:.2f}",
        "round/(floor+eval)": f"{round_s / (floor_s + eval_s):.2f}",
        "ideal s": f"{ideal:.2f}",
        "round/ideal": f"{round_s / ideal:.2f}",
        "same result": "yes" if same_result(fed, floor) else "NO",
        "RSS MB": f"{fed['peak']['rss'] / MB:.0f}",
        "PSS MB": f"{fed['peak']['pss'] / MB:.0f}",
        "driver MB": f"{fed['peak']['driver'] / MB:.0f}",
        "daemons MB": f"{fed['peak']['daemons'] / MB:.0f}",
        "with state": with_state,
        "state B/client": f"{fed['state_bytes_total'] / with_state:.0f}" if with_state else "0",
    }


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---:|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)


def growth_lines(results: list[tuple[int, dict]]) -> list[str]:
    """Memory growth per extra client between consecutive client counts."""
    lines = []
    for (n0, a), (n1, b) in zip(results, results[1:]):
        extra = n1 - n0
        extra_state = b["clients_with_state"] - a["clients_with_state"]
        d_pss = b["peak"]["pss"] - a["peak"]["pss"]
        d_rss = b["peak"]["rss"] - a["peak"]["rss"]
        d_driver = b["peak"]["driver"] - a["peak"]["driver"]
        per_state = b["state_bytes_total"] / max(1, b["clients_with_state"])
        actors0, actors1 = a["peak"]["actors"], b["peak"]["actors"]
        line = (
            f"{n0} -> {n1} clients: PSS {d_pss / MB:+.1f} MB = {d_pss / extra:+.0f} B per extra "
            f"client; RSS {d_rss / MB:+.1f} MB = {d_rss / extra:+.0f} B per extra client; driver "
            f"{d_driver / MB:+.1f} MB = {d_driver / extra:+.0f} B per extra client"
        )
        if extra_state > 0:
            line += f" ({d_driver / extra_state:+.0f} B per extra client holding state)"
        line += f"; state {per_state:.0f} B per client holding state"
        if actors0 != actors1:
            line += f"; NB: {actors0} -> {actors1} client actors, so the totals include that"
        lines.append(line)
    return lines


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table and return its rows."""
    args = parse_args(argv)
    if args.case:
        case = run_fedsim if args.case == "fedsim" else run_floor
        result = case(args, args.num, Path(args.workdir))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return []
    print(
        f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}; backbone={args.backbone}, rounds={args.rounds}, "
        f"fraction={args.fraction}, sharing.policy={args.sharing}, "
        f"data.min_per_client={args.min_per_client}, "
        f"clients.ranks={args.ranks or DEFAULT_RANKS[args.backbone]}, seed={args.seed}"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
        + (
            f"; fedsim joins the Ray cluster at {args.ray_address} (memory: the driver and the "
            "client actors)"
            if args.ray_address
            else ""
        ),
        flush=True,
    )
    rows, results = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedsim-scale-") as tmp:
        for num in args.client_counts:
            workdir = Path(tmp) / f"n{num}"
            workdir.mkdir()
            case_start = time.perf_counter()
            fed = run_case(args, "fedsim", num, workdir)
            floor = run_case(args, "floor", num, workdir)
            if any(fed["failed"]):
                print(f"{num} clients: failed client tasks per round {fed['failed']}")
            print(
                f"{num} clients: fedsim round_s {[round(x, 2) for x in fed['round_s']]}, "
                f"floor round_s {[round(x, 2) for x in floor['round_s']]} = train_s "
                f"{[round(x, 2) for x in floor['train_s']]} + eval_s "
                f"{[round(x, 2) for x in floor['eval_s']]} + the rest; global accuracy / loss: "
                f"fedsim {fed['accuracy']:.4f} / {fed['loss']:.6f}, floor "
                f"{floor['accuracy']:.4f} / {floor['loss']:.6f}; floor process peak RSS "
                f"{floor['peak']['driver'] / MB:.0f} MB; {time.perf_counter() - case_start:.0f} s",
                flush=True,
            )
            rows.append(table_row(num, fed, floor))
            results.append((num, fed))
    total = time.perf_counter() - start
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; total {total:.0f} s\n")
    print_table(rows)
    print()
    for line in growth_lines(results):
        print(line)
    return rows


if __name__ == "__main__":
    main()
