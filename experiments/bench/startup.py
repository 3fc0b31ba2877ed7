"""Start-up benchmark: how long a run takes to reach round 0, next to the start-up floor.

Two cases, each in a fresh Python process, run one after the other in one invocation:

* **floor**: what no run can avoid: import the model stack (``actors.client``: torch,
  transformers, peft) and load the backbone once (``ClientWorker``: its data and its backbone,
  what every client actor builds). A run can overlap everything else with it.
* **fedsim**: ``fedsim.simulation.run.run`` of the anchor workload (by default Flower's: 4
  clients, all sampled, MiniLM + EfficientNet-Lite0, LoRA rank 8, 6 steps of 16, 64 px, 2 client
  actors, 3 rounds) on its own local Ray (or, with ``--ray-address``, joining a running
  cluster: start-up without Ray's own) and a fresh MLflow SQLite store. The child process
  stamps the clock before its first import; the run reports its own phases
  (``RunResult.phases``).

It prints each phase's end, in seconds from the child process's first line, and the ratio of
the time to round 0 (the first evaluation: everything is up) to the floor:

    python experiments/bench/startup.py [--backbone minilm-effnet|tiny] [--rounds 3]
        [--image-size 64] [--steps 6] [--batch-size 16] [--actors 2] [--ray-address ADDRESS]

``--repeats K`` runs each case K times and prints the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

START = time.perf_counter()  # a child's clock starts before its first heavy import
START_WALL = time.time()

RESULT_TAG = "STARTUP-RESULT "
# The phases of RunResult.phases, in order, and what each one's end means.
PHASES = (
    ("checks", "config loaded and checked (preflight: data, splits, outputs)"),
    ("imports", "fedsim.simulation.run imported (before issue 14 only: now within checks)"),
    ("ray", "local Ray up (started in the background before the config loaded)"),
    ("store", "MLflow run created (overlaps the actors' start)"),
    ("actors", "every client actor holds its backbone"),
    ("ready", "server built: round 0 starts"),
    ("first_round", "round 0 evaluated"),
    ("rounds", "last round logged"),
    ("done", "final outputs logged, Ray shut down"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("minilm-effnet", "tiny"), default="minilm-effnet")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="train.max_local_steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--actors", type=int, default=2, help="resources.actors")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the fedsim case joins this running Ray cluster (its GCS address, or auto) instead "
        "of starting a local Ray (RAY_ADDRESS of the environment is ignored)",
    )
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides")
    p.add_argument(
        "--fedsim-root",
        metavar="DIR",
        help="time the fedsim of another checkout (e.g. a worktree of the commit before a "
        "change); its phases before round 0 are then read from MLflow",
    )
    p.add_argument("--case", choices=("fedsim", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The anchor workload as config overrides (everything under ``workdir``)."""
    return [
        f"model.backbone={args.backbone}",
        f"rounds={args.rounds}",
        f"clients.num={args.clients}",
        "clients.fraction=1.0",
        f"clients.ranks={args.rank}",
        f"data.image_size={args.image_size}",
        f"train.max_local_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"resources.actors={args.actors}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"checkpoint.dir={workdir / 'runs'}",
        "progress=false",
        *args.extra,
    ]


def child(args: argparse.Namespace) -> dict:
    """One case, in this (fresh) process; seconds since this module's first line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    workdir = Path(args.workdir)
    if args.case == "floor":
        from fedsim.config import load_config

        cfg = load_config(None, overrides(args, workdir))
        import actors.client  # the model stack

        imported = time.perf_counter() - START
        actors.client.ClientWorker(cfg)  # data and backbone, as a client actor builds them
        return {"imports": imported, "loaded": time.perf_counter() - START}
    try:  # what `fedsim run` does: Ray starts before the config loads
        from actors.ray_init import RayStart
    except ImportError:  # a fedsim from before (--fedsim-root): the library path of its day
        start = None
    else:
        start = RayStart()
    from fedsim.config import load_config

    cfg = load_config(None, overrides(args, workdir))
    if start is not None:
        from actors.executor import RayExecutor
        from fedsim.cli import start_run

        executor = RayExecutor(start)
        try:
            result = start_run(cfg, executor)
        finally:
            executor.close(None, None)
        return {k: result.phases_origin + v - START for k, v in result.phases.items()}
    from fedsim.simulation.preflight import preflight

    dataset = preflight(cfg)
    checks = time.perf_counter() - START
    from fedsim.simulation.run import run

    imports = time.perf_counter() - START
    result = run(cfg, dataset=dataset)
    done = time.perf_counter() - START
    phases = {"checks": checks, "imports": imports}
    # a fedsim from before the run reported its phases (for the before/after table): round 0
    # starts when its metrics were logged less the round's own time
    from mlflow import MlflowClient

    logged = MlflowClient(cfg.tracking.uri).get_metric_history(result.run_id, "global/accuracy")
    first = min(m.timestamp for m in logged if m.step == 0) / 1000 - START_WALL
    phases["ready"] = first - result.history[0]["time/round_s"]
    phases["first_round"] = first
    phases["rounds"] = phases["done"] = done
    return phases


def run_case(args: argparse.Namespace, case: str, workdir: Path) -> dict:
    """Run ``case`` in a fresh process; its phases plus the process's wall-clock seconds."""
    cmd = [sys.executable, __file__, "--case", case, "--workdir", str(workdir)]
    cmd += [
        f"--backbone={args.backbone}",
        f"--rounds={args.rounds}",
        f"--clients={args.clients}",
        f"--rank={args.rank}",
        f"--image-size={args.image_size}",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--actors={args.actors}",
    ]
    if args.extra:
        cmd += ["--extra", *args.extra]
    root = os.environ.get("FEDSIM_BENCH_ROOT") or str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    # what the run joins (fedsim reads RAY_ADDRESS): a local Ray of its own unless named here
    env.pop("RAY_ADDRESS", None)
    if args.ray_address:
        env["RAY_ADDRESS"] = args.ray_address
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"the {case} case failed (exit {proc.returncode})")
    return {**json.loads(lines[-1][len(RESULT_TAG) :]), "wall": wall}


def median_case(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def report(fed: dict, floor: dict, ray_address: str | None = None) -> list[str]:
    """The table: each phase's end next to the floor, and the ratios.

    Args:
        fed: the fedsim case's phase ends and ``wall``, seconds.
        floor: the floor case's ``imports``, ``loaded`` and ``wall``, seconds.
        ray_address: the cluster the fedsim case joined; None: it started a local Ray.

    Returns:
        The report's lines.
    """
    base = floor["loaded"]
    meanings = dict(PHASES)
    if ray_address:
        meanings["ray"] = f"joined the Ray cluster at {ray_address} (in the background)"
    lines = [
        f"floor: import the model stack {floor['imports']:.2f} s, + load data and backbone = "
        f"{base:.2f} s (process wall {floor['wall']:.2f} s)",
        "",
        "| phase | ends at s | phase s | what has happened |",
        "|---|---:|---:|---|",
    ]
    previous = 0.0
    for name, meaning in meanings.items():
        if name in fed:
            lines.append(f"| {name} | {fed[name]:.2f} | {fed[name] - previous:.2f} | {meaning} |")
            previous = fed[name]
    ready = fed["ready"]
    lines += [
        "",
        f"start-up (to round 0): {ready:.2f} s = {ready / base:.2f} x the floor ({base:.2f} s); "
        "target <= 2",
        f"first round (round 0 evaluation): {fed['first_round'] - ready:.2f} s; training rounds: "
        f"{fed['rounds'] - fed['first_round']:.2f} s; tear-down: "
        f"{fed['done'] - fed['rounds']:.2f} s",
        f"whole job: {fed['wall']:.2f} s of process wall clock "
        f"(the run call's phases end at {fed['done']:.2f} s)",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> tuple[dict, dict]:
    args = parse_args(argv)
    if args.case:
        print(RESULT_TAG + json.dumps(child(args)), flush=True)
        return {}, {}
    if args.fedsim_root:  # time another checkout's fedsim (e.g. the commit before a change)
        os.environ["FEDSIM_BENCH_ROOT"] = str(Path(args.fedsim_root).resolve())
    print(
        f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, load average "
        f"{os.getloadavg()[0]:.1f}; backbone={args.backbone}, clients={args.clients}, "
        f"rank={args.rank}, {args.steps} steps x {args.batch_size}, {args.image_size} px, "
        f"actors={args.actors}, rounds={args.rounds}"
        + (f"; fedsim joins the Ray cluster at {args.ray_address}" if args.ray_address else ""),
        flush=True,
    )
    floors, feds = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fedsim-startup-") as tmp:
            floors.append(run_case(args, "floor", Path(tmp)))
        with tempfile.TemporaryDirectory(prefix="fedsim-startup-") as tmp:
            feds.append(run_case(args, "fedsim", Path(tmp)))
    fed, floor = median_case(feds), median_case(floors)
    print("\n".join(report(fed, floor, args.ray_address)), flush=True)
    return fed, floor


if __name__ == "__main__":
    main()
