"""VLM benchmark: training step, generation, the engine's round against a one-process floor.

For the built-in pretrained VLM (``smolvlm-effnet``, the default) or any Hugging Face
image-text-to-text model (``--backbone hf-vlm --name-or-path DIR``) on the demo config
(``experiments/vlm_emoji.yaml``), the benchmark runs two cases, each in a fresh Python process
(so memory and Ray start from nothing):

* **engine**: ``fedsim.run(cfg)`` for ``--rounds`` rounds on a local Ray that the process
  starts, or on the running cluster that ``--ray-address`` names (MLflow to a temporary SQLite
  store, checkpoints to a temporary directory, ``progress=false``); its round time is the
  median of ``time/round_s`` over rounds 1..R. A background thread samples the memory of the
  driver and of every Ray worker process (``MemorySampler`` of ``scale.py``; on a joined
  cluster, the driver and the run's client actors), and the peak RSS and PSS of each client
  actor.
* **floor**: the same work back to back in one process without Ray: one
  ``actors.client.ClientWorker(cfg)`` (its model load not timed), an in-process
  ``actors.server.ServerState``, and for each round the clients
  ``fedsim.data.partition.sample_clients`` picks, trained one after another with
  ``worker.train``, their updates merged, then the global evaluation
  (``worker.evaluate_global``), at the niceness Ray gives its workers (15), so that on a busy
  machine both cases compete for the CPU on the same terms. Then, on the same warm worker,
  the model alone: the median time of ``--steps`` training steps
  (``fedsim.tasks.training.train_local`` with the worker's host and task, batch
  ``train.batch_size``) and the greedy generation time per sample (the task's own
  generation, ``eval.max_new_tokens``, batch ``train.eval_batch_size``).

Both cases run the config with ``train.max_local_steps=2 eval.max_samples=8`` (about a third
of the demo's work per round, so that the default run stays near 5 minutes on 2 idle cores;
trailing ``key=value`` overrides come after them) or, with ``--quick``, a smoke run of 1 round
of 2 clients.

It prints one Markdown table row (see ``experiments/bench/README.md`` for the columns) and a
summary line:

    python experiments/bench/vlm.py [--config experiments/vlm_emoji.yaml] [--rounds 2]
        [--steps 5] [--backbone hf-vlm --name-or-path DIR] [--quick]
        [--ray-address HOST:PORT] [key=value ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

_HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = _HERE.parents[1] / "experiments" / "vlm_emoji.yaml"
RESULT_TAG = "VLM-BENCH-RESULT "
MB = 1e6
# The demo config's rounds (4 clients of 6 steps, each with its personalised evaluation of up
# to 32 generated answers, then 32 for the global one) take about 150 s each in one process on
# a 2-core CPU. By default the benchmark cuts that work to about a third so the whole run
# (engine, floor, and the model alone) stays near 5 minutes; pass train.max_local_steps=6
# eval.max_samples=32 for the demo's own. Trailing overrides are applied after these.
DEFAULT_OVERRIDES = ("train.max_local_steps=2", "eval.max_samples=8")
# --quick: a smoke run of a few seconds of model work (2 clients per round, 1 round).
QUICK_OVERRIDES = ("train.max_local_steps=1", "eval.max_samples=4")
QUICK_SAMPLED = 2

COLUMNS = (
    "model",
    "batch",
    "step s",
    "gen s/sample",
    "gen tokens",
    "eval s/sample",
    "sampled",
    "actors",
    "round s",
    "floor s",
    "round/floor",
    "same result",
    "actor RSS MB",
    "actor PSS MB",
    "engine PSS MB",
    "floor RSS MB",
    "floor PSS MB",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="fedsim YAML (%(default)s)")
    p.add_argument(
        "--backbone",
        choices=("smolvlm-effnet", "hf-vlm"),
        default="smolvlm-effnet",
        help="model.backbone (default %(default)s, the built-in pretrained demo VLM)",
    )
    p.add_argument("--name-or-path", help="hf-vlm: model.name_or_path (hub id or local dir)")
    p.add_argument("--rounds", type=int, help="training rounds of both cases (default 2; 1 quick)")
    p.add_argument(
        "--steps", type=int, help="timed training steps of the model alone (default 5; 2 quick)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(QUICK_OVERRIDES) + f", {QUICK_SAMPLED} clients sampled, "
        "1 round, 2 steps",
    )
    p.add_argument(
        "--interval", type=float, default=1.0, help="memory sampling period, seconds (%(default)s)"
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the engine case joins this running Ray cluster (its GCS address, or auto) instead "
        "of starting a local Ray; its memory then counts the driver and the run's client actors "
        "on this machine, not the cluster's daemons and idle workers",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="further fedsim overrides")
    p.add_argument("--case", choices=("engine", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.backbone == "hf-vlm" and not args.name_or_path:
        p.error("--backbone hf-vlm needs --name-or-path")
    for item in args.overrides:
        if "=" not in item:
            p.error(f"overrides are key=value, got {item!r}")
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    return args


def config_items(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The fedsim dotlist of both cases (over ``--config``): the same work in each."""
    from fedsim.config import load_config

    items = [f"model.backbone={args.backbone}"]
    if args.name_or_path:
        items.append(f"model.name_or_path={args.name_or_path}")
    items.append(f"rounds={args.rounds}")
    if args.quick:
        items += QUICK_OVERRIDES
        num = load_config(args.config, [*items, *args.overrides]).clients.num
        items.append(f"clients.fraction={min(1.0, QUICK_SAMPLED / num)}")
    else:
        items += DEFAULT_OVERRIDES
    items += [
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        "tracking.experiment=fedsim-bench-vlm",
        "tracking.save_adapter=false",
        "tracking.plots=false",
        f"checkpoint.dir={workdir / 'runs'}",
        "progress=false",
    ]
    return items + list(args.overrides)


def _scale_module():
    """``experiments/bench/scale.py`` as a module (no side effects on import)."""
    spec = importlib.util.spec_from_file_location("bench_scale", _HERE / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def memory_sampler(interval: float):
    """scale.py's ``MemorySampler`` (same thread, same groups and peaks) that also keeps each
    client actor's own peak RSS and PSS, and how busy other processes kept the machine.

    Its ``record`` reads every process once: PSS comes from ``/proc/PID/smaps_rollup``, which
    costs the kernel a walk of the process's page tables, about 0.1 s of CPU per sample of a
    run with two 2 GB actors. Sample every second or so, not faster, on a 2-core machine.

    ``other_cores()``: the machine's busy CPU time during the ``with`` block minus that of
    this process and its descendants (as last sampled), per second of wall time: the cores
    other jobs took, on average (0: the benchmark had the machine to itself).
    """
    import psutil

    base = _scale_module().MemorySampler
    gone = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)

    class ActorMemorySampler(base):
        def __init__(self, interval: float):
            super().__init__(interval)
            self.actor_peak: dict[int, list[int]] = {}  # pid -> [rss, pss]
            self.actor_nice = 0  # the client actors' niceness (Ray lowers its workers' priority)
            self.cpu: dict[int, float] = {}  # pid -> user + system CPU seconds, last sampled

        def __enter__(self):
            self._start = (time.perf_counter(), _busy_cpu_s(), sum(self.me.cpu_times()[:2]))
            return super().__enter__()

        def __exit__(self, *exc) -> None:
            super().__exit__(*exc)
            self._end = (time.perf_counter(), _busy_cpu_s())

        def other_cores(self) -> float:
            wall, busy = self._end[0] - self._start[0], self._end[1] - self._start[1]
            ours = sum(self.cpu.values()) - self._start[2]
            return max(0.0, busy - ours) / wall if wall > 0 else 0.0

        def record(self, procs: list) -> None:
            now = dict.fromkeys(("rss", "pss", "driver", "daemons", "actors"), 0)
            for proc in procs:
                try:
                    cpu = proc.cpu_times()
                    self.cpu[proc.pid] = cpu.user + cpu.system
                    info = proc.memory_full_info()
                    name = proc.name() if proc is not self.me else ""
                    cmdline = " ".join(proc.cmdline()) if proc is not self.me else ""
                    actor = name.startswith("ray::ClientActor")
                    nice = proc.nice() if actor else 0
                except gone:
                    continue
                if proc is self.me:
                    now["driver"] = info.rss
                if proc is self.me or name.startswith("ray::") or "default_worker.py" in cmdline:
                    now["rss"] += info.rss
                    now["pss"] += info.pss
                    if actor:
                        now["actors"] += 1
                        self.actor_nice = max(self.actor_nice, nice)
                        peak = self.actor_peak.setdefault(proc.pid, [0, 0])
                        peak[0], peak[1] = max(peak[0], info.rss), max(peak[1], info.pss)
                else:
                    now["daemons"] += info.rss
            for key, value in now.items():
                self.peak[key] = max(self.peak[key], value)

    return ActorMemorySampler(interval)


def _evaluates(cfg, t: int) -> bool:
    """Whether the engine evaluates round ``t`` (``eval.every``; the last round always)."""
    return t % cfg.eval.every == 0 or t == cfg.rounds


def run_engine(args: argparse.Namespace, workdir: Path) -> dict:
    """``fedsim.run`` on a local Ray this process starts (or on the cluster at
    ``--ray-address``); round times and peak memory."""
    import logging

    from mlflow.tracking import MlflowClient

    import fedsim
    from fedsim.config import load_config

    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address  # what the run joins
    cfg = load_config(args.config, config_items(args, workdir))
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    if client.get_experiment_by_name(cfg.tracking.experiment) is None:
        # artifacts (example generations, client tables) under the temp dir, never ./mlruns
        client.create_experiment(
            cfg.tracking.experiment, artifact_location=(workdir / "artifacts").as_uri()
        )
    with memory_sampler(args.interval) as mem:
        result = fedsim.run(cfg, executor=mem.executor())
    rounds = [h for h in result.history if h["round"] >= 1]
    return {
        "round_s": [h["time/round_s"] for h in rounds],
        "aggregate_s": [h["time/aggregate_s"] for h in rounds],
        "sampled": [h["clients/sampled"] for h in rounds],
        "failed": [h["clients/failed"] for h in rounds],
        "final": {k[7:]: v for k, v in result.final.items() if k.startswith("global/")},
        "peak": mem.peak,
        "actor_peak": list(mem.actor_peak.values()),
        "actor_nice": mem.actor_nice,
        "other_cores": mem.other_cores(),
    }


def step_times(worker, steps: int) -> tuple[list[float], int, int]:
    """Wall time of ``steps`` training steps, on the worker's own code (warm from the rounds).

    ``fedsim.tasks.training.train_local`` runs the worker's task (``train_batches``,
    ``loss``) on its host's adapter of the client with the most training rows. A step is
    timed from the request of its batch (encoding included, as in the engine) to the request
    of the next one; steps on a short last batch are dropped.

    Returns:
        ``(seconds per full-batch step, client id, its rank)``.
    """
    import numpy as np
    import torch

    from fedsim.tasks.training import train_local

    cfg = worker.cfg
    clients = worker.data.clients
    cid = max(range(len(clients)), key=lambda c: len(clients[c].train))
    rank, split, size = worker.ranks[cid], clients[cid].train, cfg.train.batch_size
    model = worker.host.activate(rank)
    rng = np.random.default_rng(cfg.seed)
    marks: list[float] = []
    sizes: list[int] = []

    def epoch(_e: int):
        batches = worker.task.train_batches(split, size, rng)
        while True:
            marks.append(time.perf_counter())
            try:
                batch = next(batches)
            except StopIteration:
                marks.pop()  # the next epoch's first request starts the next step
                return
            sizes.append(len(batch["input_ids"]))
            yield batch

    torch.manual_seed(cfg.seed)
    train_local(
        model,
        worker.host.trainable_parameters(rank),
        epoch,
        worker.task.loss,
        num_epochs=steps + 1,  # at least one full batch per epoch: enough for the steps
        max_steps=steps,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        device=worker.device,
        optimizer=cfg.train.optimizer,
    )
    marks.append(time.perf_counter())
    spans = [b - a for a, b in zip(marks, marks[1:])]
    timed = [s for s, n in zip(spans, sizes) if n == size]
    return timed or spans, cid, rank


def generation_times(worker) -> tuple[float, int, int]:
    """Greedy generation (the task's own, ``eval.max_new_tokens``) of the test set's first rows.

    One batch of ``train.eval_batch_size`` rows, as the global evaluation batches them, with
    the adapter the worker has active (the caller's: the final global one) on the model the
    rounds have warmed up. Also counts the new positions the batch decoded (``generate`` stops
    when every row has ended, at most ``eval.max_new_tokens``).

    Returns:
        ``(seconds, samples, new tokens of the batch)``; seconds is NaN when the task has no
        generation (a classifier).
    """
    import numpy as np

    cfg = worker.cfg
    task = worker.task
    generate = getattr(task, "_generate", None)
    n = min(len(worker.data.test), cfg.train.eval_batch_size)
    if generate is None or n == 0:
        return float("nan"), n, 0
    samples = task.samples(worker.data.test, np.arange(n))
    model = worker.host.model
    model.eval()
    decoded: list[int] = []
    inner = model.generate

    def counting_generate(*a, **kw):
        out = inner(*a, **kw)
        decoded.append(int(out.shape[1] - kw["input_ids"].shape[1]))
        return out

    model.generate = counting_generate  # an instance attribute: the task's call lands here
    try:
        start = time.perf_counter()
        generate(model, samples)
        spent = time.perf_counter() - start
    finally:
        del model.generate
    return spent, n, decoded[-1] if decoded else 0


def run_floor(args: argparse.Namespace, workdir: Path) -> dict:
    """The engine's rounds back to back in this process without Ray, then the model alone."""
    from actors.client import ClientWorker
    from actors.server import ServerState
    from fedsim.config import load_config, resolve_ranks
    from fedsim.data.partition import sample_clients
    from fedsim.messages import ClientMeta, ClientState, ClientTask
    from fedsim.simulation.run import server_args
    from fedsim.tasks import combine_parts

    cfg = load_config(args.config, config_items(args, workdir))
    # Ray runs its workers at a lower priority (niceness 15 by default): run the floor at the
    # client actors' niceness, so that on a busy machine both cases compete on the same terms.
    os.nice(max(0, args.nice - os.nice(0)))
    with memory_sampler(args.interval) as mem:
        start = time.perf_counter()
        worker = ClientWorker(cfg)
        initial = worker.initial_global()
        load_s = time.perf_counter() - start
        server = ServerState(*server_args(cfg, initial))
        ranks = resolve_ranks(cfg.clients, cfg.seed)
        # Round 0, untimed as in the engine: the initial adapter's global evaluation (it also
        # warms this worker up as it warms the actors up).
        worker.evaluate_global(server.broadcast(), 0, 1)
        states: dict[int, ClientState] = {}
        round_s, train_s, merge_s, eval_s, eval_n = [], [], [], [], 0
        final: dict[str, float] = {}
        for t in range(1, cfg.rounds + 1):
            round_start = time.perf_counter()
            broadcast = server.broadcast()
            evaluate = _evaluates(cfg, t)
            meta, uploads = [], []
            for cid in sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, t):
                report, upload, state = worker.train(
                    ClientTask(cid, ranks[cid], t, evaluate=evaluate), broadcast, states.get(cid)
                )
                states[cid] = state
                meta.append(ClientMeta(cid, report.rank, report.num_samples, report.steps))
                uploads.append(upload)
                ranks[cid] = report.next_rank or ranks[cid]
            train_s.append(time.perf_counter() - round_start)
            merge_start = time.perf_counter()
            server.aggregate(t, meta, uploads)
            merge_s.append(time.perf_counter() - merge_start)
            if evaluate:
                eval_start = time.perf_counter()
                part = worker.evaluate_global(server.broadcast(), 0, 1)
                eval_s.append(time.perf_counter() - eval_start)
                eval_n = len(part)
                final = combine_parts([part])[0]
            round_s.append(time.perf_counter() - round_start)
        # the global adapter is the active one after the last evaluation: generate with it
        gen_s, gen_n, gen_tokens = generation_times(worker)
        steps, step_client, step_rank = step_times(worker, args.steps)
    return {
        "round_s": round_s,
        "train_s": train_s,
        "merge_s": merge_s,
        "eval_s": eval_s,
        "eval_n": eval_n,
        "load_s": load_s,
        "final": final,
        "step_s": steps,
        "step_client": step_client,
        "step_rank": step_rank,
        "gen_s": gen_s,
        "gen_n": gen_n,
        "gen_tokens": gen_tokens,
        "peak": mem.peak,
        "other_cores": mem.other_cores(),
    }


def run_case(
    args: argparse.Namespace, argv: list[str], case: str, workdir: Path, nice: int = 0
) -> dict:
    """Run one case in a fresh Python process, so memory and Ray start from nothing."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--workdir", str(workdir)]
    cmd += ["--nice", str(nice)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)  # a local Ray of our own unless --ray-address names one
    proc = subprocess.run(cmd + argv, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise RuntimeError(f"the {case} case failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def same_result(engine: dict, floor: dict) -> bool:
    """Whether the floor's final global metrics equal the engine's (it did the same work)."""
    shared = set(engine["final"]) & set(floor["final"])
    return bool(shared) and all(
        math.isclose(engine["final"][k], floor["final"][k], rel_tol=1e-5, abs_tol=1e-7)
        for k in shared
    )


def _num(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, without exponent for ordinary sizes."""
    if value != value:
        return "n/a"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def table_row(args: argparse.Namespace, cfg, engine: dict, floor: dict) -> dict:
    round_s, floor_s = median(engine["round_s"]), median(floor["round_s"])
    actor_rss = max((p[0] for p in engine["actor_peak"]), default=0)
    actor_pss = max((p[1] for p in engine["actor_peak"]), default=0)
    model = args.backbone
    if args.backbone == "hf-vlm":
        model += ":" + Path(args.name_or_path.rstrip("/")).name
    return {
        "model": model,
        "batch": cfg.train.batch_size,
        "step s": _num(median(floor["step_s"])),
        "gen s/sample": _num(floor["gen_s"] / max(floor["gen_n"], 1)),
        "gen tokens": floor["gen_tokens"],
        "eval s/sample": _num(median(floor["eval_s"]) / max(floor["eval_n"], 1)),
        "sampled": int(median(engine["sampled"])),
        "actors": len(engine["actor_peak"]),
        "round s": _num(round_s),
        "floor s": _num(floor_s),
        "round/floor": f"{round_s / floor_s:.2f}",
        "same result": "yes" if same_result(engine, floor) else "NO",
        "actor RSS MB": f"{actor_rss / MB:.0f}",
        "actor PSS MB": f"{actor_pss / MB:.0f}",
        "engine PSS MB": f"{engine['peak']['pss'] / MB:.0f}",
        "floor RSS MB": f"{floor['peak']['rss'] / MB:.0f}",
        "floor PSS MB": f"{floor['peak']['pss'] / MB:.0f}",
    }


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---:|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)


# Above this many cores taken by other processes on average, the summary says so.
LOADED_CORES = 0.2


def summary(row: dict, rounds: int, gen_n: int, other_cores: float) -> str:
    load = (
        f"; measured under load: other processes kept {other_cores:.1f} of "
        f"{os.cpu_count()} cores busy"
        if other_cores > LOADED_CORES
        else ""
    )
    return (
        f"summary: {row['model']}: a training step of {row['batch']} samples takes "
        f"{row['step s']} s and greedy generation {row['gen s/sample']} s per sample (a batch "
        f"of {gen_n} decoding {row['gen tokens']} tokens); the "
        f"engine's round ({row['sampled']} clients on {row['actors']} actors, median of "
        f"{rounds}) takes {row['round s']} s = {row['round/floor']} x the one-process floor "
        f"({row['floor s']} s); each client actor peaks at {row['actor RSS MB']} MB RSS / "
        f"{row['actor PSS MB']} MB PSS, the floor process at {row['floor RSS MB']} MB RSS / "
        f"{row['floor PSS MB']} MB PSS{load}"
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table and the summary line, and return the rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.case:
        case = run_engine if args.case == "engine" else run_floor
        result = case(args, Path(args.workdir))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return []
    from fedsim.config import load_config

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-vlm-") as tmp:
        items = config_items(args, Path(tmp))
        cfg = load_config(args.config, items)
        shown = [x for x in items if not x.startswith(("tracking.", "checkpoint.", "progress"))]
        print(
            f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, load average "
            f"{os.getloadavg()[0]:.1f}; {args.config} with {' '.join(shown)}; steps={args.steps}"
            + (
                f"; the engine joins the Ray cluster at {args.ray_address}"
                if args.ray_address
                else ""
            ),
            flush=True,
        )
        engine = run_case(args, argv, "engine", Path(tmp) / "engine")
        engine_s = time.perf_counter() - start
        floor = run_case(args, argv, "floor", Path(tmp) / "floor", engine["actor_nice"])
    total = time.perf_counter() - start
    if any(engine["failed"]):
        print(f"failed client tasks per round: {engine['failed']}")
    print(
        f"engine round_s {[round(x, 2) for x in engine['round_s']]} (aggregate_s "
        f"{[round(x, 3) for x in engine['aggregate_s']]}); floor round_s "
        f"{[round(x, 2) for x in floor['round_s']]} = train "
        f"{[round(x, 2) for x in floor['train_s']]} + merge "
        f"{[round(x, 3) for x in floor['merge_s']]} + global eval "
        f"{[round(x, 2) for x in floor['eval_s']]} ({floor['eval_n']} samples); train steps "
        f"{[round(x, 3) for x in floor['step_s']]} s (client {floor['step_client']}, rank "
        f"{floor['step_rank']}); generation {floor['gen_s']:.2f} s for {floor['gen_n']} samples; "
        f"model load {floor['load_s']:.1f} s; final global loss engine "
        f"{engine['final'].get('loss', float('nan')):.6f}, floor "
        f"{floor['final'].get('loss', float('nan')):.6f}",
        flush=True,
    )
    print(
        f"load average at the end {os.getloadavg()[0]:.1f}; other processes kept "
        f"{engine['other_cores']:.2f} cores busy on average during the engine case, "
        f"{floor['other_cores']:.2f} during the floor case (run at the client actors' niceness, "
        f"{engine['actor_nice']}); total {total:.0f} s "
        f"(engine case {engine_s:.0f} s)\n"
    )
    row = table_row(args, cfg, engine, floor)
    print_table([row])
    print()
    other = max(engine["other_cores"], floor["other_cores"])
    print(summary(row, args.rounds, floor["gen_n"], other), flush=True)
    return [row]


if __name__ == "__main__":
    main()
