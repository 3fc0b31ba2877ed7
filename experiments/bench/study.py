"""Study benchmark: a 6-run study one run after another on fresh actors, against the same runs
several at once on warm actors.

The study is 2 merges x 3 seeds of the default experiment, 3 rounds each (the sizes are flags).
Two cases, each in a fresh Python process with a local Ray of its own and a new MLflow store,
run one after the other in one invocation:

* **sequential**: what ``fedsim compare`` did before warm pools and lanes: the runs one after
  another, each on client actors of its own (started for it, stopped after it).
* **concurrent**: :func:`fedsim.simulation.lanes.run_all` with ``--parallel`` lanes (what
  ``fedsim compare --parallel N`` runs): each lane drives its runs on a warm pool, so only its
  first run starts actors.

It prints, per case, the study's wall time and its peak memory (PSS of the case's whole process
tree: driver, Ray's daemons, lanes and actors, sampled every ``--interval`` seconds), and per run
its start-up overhead: the run's wall time (``RunResult.phases["done"]``) less its rounds (from
round 0 to the last round logged). It checks that both cases give the same numbers, run by run,
and prints the ratios against the goals (study wall <= 0.6 x sequential; warm overhead <= 2 s):

    python experiments/bench/study.py [--backbone minilm-effnet|tiny] [--rounds 3]
        [--seeds 3] [--merges fedilora,zeropad] [--parallel 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

RESULT_TAG = "STUDY-RESULT "
GOAL_WALL = 0.6  # concurrent wall / sequential wall
GOAL_WARM_S = 2.0  # a warm run's start-up overhead


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("minilm-effnet", "tiny"), default="minilm-effnet")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--merges", default="fedilora,zeropad", help="aggregation.method values")
    p.add_argument("--parallel", type=int, default=2, help="lanes of the concurrent case")
    p.add_argument("--interval", type=float, default=0.5, help="memory sample interval, s")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    p.add_argument("--case", choices=("sequential", "concurrent"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configs(args: argparse.Namespace, workdir: Path) -> list:
    """The study's runs: every merge x seed, in plan order."""
    from fedsim.config import load_config

    common = [
        f"model.backbone={args.backbone}",
        f"rounds={args.rounds}",
        "progress=false",
        "tracking.plots=false",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"checkpoint.dir={workdir / 'runs'}",
        *args.sets,
    ]
    return [
        load_config(
            None,
            [*common, f"aggregation.method={m}", f"seed={s}", f"tracking.run_name={m} seed={s}"],
        )
        for m in args.merges.split(",")
        for s in range(args.seeds)
    ]


class TreeMemory:
    """The peak PSS, in MB, of this process and all its descendants (a background thread)."""

    def __init__(self, interval: float):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            total = 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.peak = max(self.peak, total / 2**20)


def child(args: argparse.Namespace) -> dict:
    """One case, in this (fresh) process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import ray

    from actors.executor import RayExecutor
    from actors.ray_init import init_ray
    from fedsim.simulation import lanes
    from fedsim.simulation.run import run

    cfgs = configs(args, Path(args.workdir))
    with TreeMemory(args.interval) as memory:
        init_ray(log_to_driver=False)
        start = time.perf_counter()
        if args.case == "sequential":
            results = [run(cfg, quiet=True, executor=RayExecutor()) for cfg in cfgs]
            count = 1
        else:
            count, actors = lanes.lane_count(args.parallel, cfgs)
            results, failures = lanes.run_all(cfgs, count, actors)
            if failures:
                raise SystemExit(f"runs failed: {failures}")
        wall = time.perf_counter() - start
        ray.shutdown()
    runs = []
    for result in results:
        phases = result.phases
        rounds = phases["rounds"] - phases["ready"]
        history = [
            {k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history
        ]
        runs.append(
            {
                "wall": phases["done"],
                "overhead": phases["done"] - rounds,
                "rounds": rounds,
                "history": history,
            }
        )
    return {"wall": wall, "peak_mb": memory.peak, "lanes": count, "runs": runs}


def run_case(args: argparse.Namespace, case: str, workdir: Path) -> dict:
    """Run ``case`` in a fresh process (a local Ray of its own); what it returned."""
    cmd = [sys.executable, __file__, "--case", case, "--workdir", str(workdir)]
    cmd += [f"--backbone={args.backbone}", f"--rounds={args.rounds}", f"--seeds={args.seeds}"]
    cmd += [f"--merges={args.merges}", f"--parallel={args.parallel}"]
    cmd += [f"--interval={args.interval}", *(f"--set={s}" for s in args.sets)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"the {case} case failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def report(seq: dict, con: dict) -> list[str]:
    """The table and the ratios against the goals."""
    lanes = con["lanes"]
    cold = [r["overhead"] for r in seq["runs"]]
    first = [r["overhead"] for r in con["runs"][:lanes]]
    warm = [r["overhead"] for r in con["runs"][lanes:]]
    same = all(a["history"] == b["history"] for a, b in zip(seq["runs"], con["runs"]))
    mean = statistics.mean
    lines = [
        "| case | runs at once | study wall s | peak PSS MB | overhead per run s (mean) |",
        "|---|---:|---:|---:|---|",
        f"| sequential, fresh actors | 1 | {seq['wall']:.1f} | {seq['peak_mb']:.0f} | "
        f"{mean(cold):.2f} (every run cold) |",
        f"| concurrent, warm actors | {lanes} | {con['wall']:.1f} | {con['peak_mb']:.0f} | "
        + (f"{mean(warm):.2f} warm, " if warm else "")
        + f"{mean(first):.2f} for each lane's first run |",
        "",
        f"study wall: concurrent / sequential = {con['wall'] / seq['wall']:.2f} "
        f"(goal <= {GOAL_WALL})",
    ]
    if warm:
        lines.append(
            f"warm per-run overhead: {mean(warm):.2f} s (goal <= {GOAL_WARM_S:g} s), "
            f"max {max(warm):.2f} s; cold {mean(cold):.2f} s"
        )
    lines.append(f"peak memory: concurrent / sequential = {con['peak_mb'] / seq['peak_mb']:.2f}")
    lines.append(f"same numbers, run by run: {'yes' if same else 'NO'}")
    lines.append(
        "per run (overhead s / rounds s): "
        + "; ".join(
            f"{i}: {a['overhead']:.1f}/{a['rounds']:.1f} vs {b['overhead']:.1f}/{b['rounds']:.1f}"
            for i, (a, b) in enumerate(zip(seq["runs"], con["runs"]))
        )
    )
    return lines


def main(argv: Sequence[str] | None = None) -> tuple[dict, dict]:
    args = parse_args(argv)
    if args.case:
        print(RESULT_TAG + json.dumps(child(args)), flush=True)
        return {}, {}
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-study-") as tmp:
        seq = run_case(args, "sequential", Path(tmp) / "sequential")
        con = run_case(args, "concurrent", Path(tmp) / "concurrent")
    print(
        f"{len(seq['runs'])} runs ({args.merges} x {args.seeds} seeds, {args.backbone}, "
        f"{args.rounds} rounds), {os.cpu_count()} CPUs"
    )
    print("\n".join(report(seq, con)))
    return seq, con


if __name__ == "__main__":
    main()
