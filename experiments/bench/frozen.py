"""Memory of K client actors on one node, with the frozen backbone shared or private.

For each backbone (the default classifier's config, ``experiments/default.yaml``, and the demo
VLM's, ``experiments/vlm_emoji.yaml``) and each K (2 and 4 by default), the script starts K real
client actors (``actors.pool.RemoteClient``: a ``ClientWorker`` each, on a local Ray of K
CPUs) twice, once with ``resources.share_frozen=false`` (every actor builds and holds its own
backbone) and once with ``true`` (the node's actors map one file), waits until every actor has
built its worker and trained one task (which reads every frozen weight, so that mapped pages
are resident), and reads each actor's PSS (``psutil``: proportional set size, a shared page
divided among the processes that map it). It prints one Markdown row per backbone and K: the
frozen weights' size, the mean PSS per actor private and shared, and the saving per actor
after the first, ``(sum private - sum shared) / (K - 1)``, which approaches the frozen weights'
size when the file is the only copy. Then it checks that both modes give the same initial
global adapter and the same first training update, bit for bit.

    python experiments/bench/frozen.py [--backbones default vlm] [--actors 2 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "default": (_ROOT / "experiments" / "default.yaml", []),
    "vlm": (_ROOT / "experiments" / "vlm_emoji.yaml", []),
    "tiny": (_ROOT / "experiments" / "default.yaml", ["model.backbone=tiny"]),
}
MB = 1e6
COLUMNS = (
    "backbone",
    "actors",
    "frozen MB",
    "private PSS MB/actor",
    "shared PSS MB/actor",
    "saving MB/extra actor",
    "saving/frozen",
    "same numbers",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", choices=sorted(CONFIGS), default=["default", "vlm"])
    p.add_argument("--actors", nargs="+", type=int, default=[2, 4], help="K values (each >= 2)")
    return p.parse_args(argv)


def _pss(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_full_info().pss


def measure(cfg, k: int) -> dict:
    """Start ``k`` actors with ``cfg``, read their PSS once all are ready, stop them.

    Returns:
        ``pss`` (bytes per actor), ``frozen`` (bytes of the backbone's parameters and buffers),
        ``initial`` and ``update`` (the first actor's initial adapter and one task's update).
    """
    import ray

    from actors.pool import RemoteClient
    from fedsim.messages import Broadcast, ClientTask

    actors = [RemoteClient.options(num_cpus=1).remote(cfg) for _ in range(k)]
    try:
        ray.get([a.ping.remote() for a in actors])
        pids = ray.get(
            [a.__ray_call__.remote(lambda self: __import__("os").getpid()) for a in actors]
        )
        initial = ray.get(actors[0].initial_global.remote())
        rank = ray.get(actors[0].__ray_call__.remote(lambda self: self.worker.ranks[0]))
        task = ClientTask(0, rank, 1)
        # one training task on every actor first: it reads every frozen weight, so the pages
        # of a mapped file are resident (PSS counts resident pages only)
        trained = ray.get([a.train.remote(task, Broadcast(initial), None) for a in actors])
        time.sleep(1.0)  # let the allocator settle
        pss = [_pss(pid) for pid in pids]
        frozen = ray.get(
            actors[0].__ray_call__.remote(
                lambda self: sum(
                    t.numel() * t.element_size()
                    for t in [
                        *self.worker.backbone.model.parameters(),
                        *self.worker.backbone.model.buffers(),
                    ]
                )
            )
        )
        _, upload, _ = trained[0]
        return {"pss": pss, "frozen": frozen, "initial": initial, "update": upload.update}
    finally:
        if cfg.resources.share_frozen:
            ray.get([a.drop_frozen.remote() for a in actors])
        for a in actors:
            ray.kill(a)


def same(a: dict, b: dict) -> bool:
    import torch

    return all(
        x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
        for x, y in ((a["initial"], b["initial"]), (a["update"], b["update"]))
    )


def row(name: str, k: int, private: dict, shared: dict) -> dict:
    saving = (sum(private["pss"]) - sum(shared["pss"])) / (k - 1)
    return {
        "backbone": name,
        "actors": k,
        "frozen MB": f"{private['frozen'] / MB:.0f}",
        "private PSS MB/actor": f"{statistics.mean(private['pss']) / MB:.0f}",
        "shared PSS MB/actor": f"{statistics.mean(shared['pss']) / MB:.0f}",
        "saving MB/extra actor": f"{saving / MB:.0f}",
        "saving/frozen": f"{saving / private['frozen']:.2f}",
        "same numbers": "yes" if same(private, shared) else "NO",
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if any(k < 2 for k in args.actors):
        print("frozen.py: --actors values must be at least 2", file=sys.stderr)
        raise SystemExit(2)
    import ray

    from fedsim.config import load_config

    rows = []
    started = not ray.is_initialized()  # a caller's Ray (a test's) is used as it is
    if started:
        ray.init(num_cpus=max(args.actors), include_dashboard=False, logging_level="ERROR")
    try:
        for name in args.backbones:
            path, extra = CONFIGS[name]
            for k in args.actors:
                results = {}
                for share in (False, True):
                    cfg = load_config(path, [*extra, f"resources.share_frozen={share}"])
                    results[share] = measure(cfg, k)
                rows.append(row(name, k, results[False], results[True]))
                print(f"{name} K={k}: {rows[-1]}", flush=True)
    finally:
        if started:
            ray.shutdown()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    return rows


if __name__ == "__main__":
    main()
