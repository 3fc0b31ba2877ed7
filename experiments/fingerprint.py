"""Fingerprint of fedsim's numbers: run a fixed set of methods and print what they computed.

A refactor that must not change behaviour is checked by running this before and after it and
comparing the two JSON files: every logged metric of every round (timings left out) and a
sha256 of every tensor, by name, of the final checkpoint (the server's global adapter, optimiser and
method state, every client's persistent state). Runs use the tiny backbone so the whole set
takes minutes; the methods are ``experiments/compare.yaml``'s variants plus every client
objective, sharing policy, a server optimiser, pruning, and a resumed run.

    python experiments/fingerprint.py OUT.json [--only NAME ...] [--local]
        [--backbone tiny|minilm-effnet]
    python experiments/fingerprint.py --compare BEFORE.json AFTER.json

It runs the code of the checkout it lies in (its parent directory comes first on the import
path, for this process and for Ray's workers), whatever fedsim the environment has installed:
a worktree's copy fingerprints the worktree's code, not an editable install's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _this_checkout_first() -> None:
    """Import fedsim from this script's checkout, here and in Ray's workers (which inherit
    ``PYTHONPATH`` from the Ray this process starts)."""
    sys.path.insert(0, str(ROOT))
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")


# name -> overrides over the tiny settings below
CASES: dict[str, list[str]] = {
    # experiments/compare.yaml
    "fedilora+editing": ["aggregation.method=fedilora", "editing.enabled=true"],
    "fedilora": ["aggregation.method=fedilora", "editing.enabled=false"],
    "zeropad": ["aggregation.method=zeropad", "editing.enabled=false"],
    "hetlora": ["aggregation.method=hetlora", "editing.enabled=false"],
    "flexlora": ["aggregation.method=flexlora", "editing.enabled=false"],
    "flora": ["aggregation.method=flora", "editing.enabled=false"],
    # client objectives, server optimisers, sharing, pruning
    "fedprox": ["objective.method=fedprox", "objective.mu=0.1"],
    "fedmllm": ["objective.method=fedmllm", "objective.mu=0.1", "objective.layer_skip=0"],
    "scaffold": [
        "objective.method=scaffold",
        "train.optimizer=sgd",
        "train.lr=0.05",
        "editing.enabled=false",
    ],
    # editing.enabled=true: zeropad with editing, as before editing.enabled=auto (the default,
    # off for zeropad), so the case computes the same numbers
    "fednova": ["objective.method=fednova", "aggregation.method=zeropad", "editing.enabled=true"],
    "fedadam+B": ["server.optimizer=fedadam", "sharing.policy=B", "editing.key=lora_B"],
    "A+fedavgm": ["sharing.policy=A", "server.optimizer=fedavgm", "editing.key=lora_A"],
    "local-only": ["sharing.policy=none", "editing.enabled=false"],
    "hetlora+pruning": [
        "aggregation.method=hetlora",
        "editing.enabled=false",
        "pruning.gamma=0.5",
        "pruning.threshold=10",
    ],
}
# resumed: run RESUME_AT rounds, then resume to ROUNDS (must equal the uninterrupted case)
RESUMED = {
    "resumed-scaffold": "scaffold",
    "resumed-flora": "flora",
    "resumed-fedadam+B": "fedadam+B",
}
ROUNDS, RESUME_AT = 3, 2


# --backbone: the tiny random-initialised one (every case, minutes) or the default pretrained
# one (the compare.yaml cases are the point there; about a minute each on 2 cores)
BACKBONES = {
    "tiny": ["model.backbone=tiny", "model.head_hidden=32", "data.image_size=16"],
    "minilm-effnet": ["model.backbone=minilm-effnet", "data.image_size=32"],
}


def tiny(cache: Path, runs: Path, store: str, backbone: str = "tiny") -> list[str]:
    return [
        f"checkpoint.dir={runs}",
        "checkpoint.keep=1",
        *BACKBONES[backbone],
        "data.subset=300",
        "data.min_per_client=5",
        f"data.cache_dir={cache}",
        "train.max_local_steps=3",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "clients.num=6",
        "clients.ranks=[8,8,4,4,2,2]",
        "clients.fraction=0.5",
        f"rounds={ROUNDS}",
        "progress=false",
        "tracking.plots=false",
        f"tracking.uri={store}",
        "tracking.experiment=fingerprint",
    ]


def digest(value) -> object:
    """sha256 of every tensor in a nested structure of dicts and lists (plain values kept)."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        return (
            f"{t.dtype}{list(t.shape)}:"
            + hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()[:16]
        )
    if isinstance(value, dict):
        return {str(k): digest(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [digest(v) for v in value]
    return value


def fingerprint(result) -> dict:
    from fedsim.checkpoint.disk import load_checkpoint

    history = [
        {k: v for k, v in h.items() if not k.startswith("time/") or k.startswith("time/simulated")}
        for h in result.history
    ]
    ckpt = load_checkpoint(result.run_dir)
    return {
        "history": history,
        "server": digest(ckpt.server),
        "clients": digest(ckpt.clients),
        "ranks": ckpt.meta["ranks"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    p.add_argument(
        "--local", action="store_true", help="run in this process (LocalExecutor), not on Ray"
    )
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="tiny")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override added to every case (e.g. aggregation.streaming=false)",
    )
    args = p.parse_args(argv)
    if args.compare:
        return compare(*map(Path, args.compare))
    _this_checkout_first()
    import ray

    import fedsim  # (before the simulation stack)

    print(f"fingerprint of the fedsim in {Path(fedsim.__file__).parent.parent}", flush=True)
    from fedsim.data.emoji import load_emoji
    from fedsim.simulation.run import resume, run

    work = Path(tempfile.mkdtemp(prefix="fedsim-fingerprint-"))
    cache, runs = work / "cache", work / "runs"
    size = 16 if args.backbone == "tiny" else 32
    load_emoji(size, "group", cache)
    store = f"sqlite:///{work / 'mlflow.db'}"
    base = tiny(cache, runs, store, args.backbone) + list(args.extra)
    if args.local:
        from actors.executor import LocalExecutor

        executor = LocalExecutor()
    else:
        executor = None
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    # no executor argument at all by default: the script also fingerprints older versions
    options = {"executor": executor} if executor is not None else {}
    out: dict = {}
    names = args.only or [*CASES, *RESUMED]
    for name in names:
        if name in RESUMED:
            case = CASES[RESUMED[name]]
            first = run(_cfg(base, case, f"rounds={RESUME_AT}"), **options)
            result = resume(first.run_dir, [f"rounds={ROUNDS}"], **options)
        else:
            result = run(_cfg(base, CASES[name]), **options)
        out[name] = fingerprint(result)
        print(f"{name}: global/accuracy {result.final.get('global/accuracy')}", flush=True)
    ray.shutdown()
    text = json.dumps(out, indent=1, sort_keys=True, default=str)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


def _cfg(base: list[str], case: list[str], *more: str):
    from fedsim.config import load_config

    return load_config(None, [*base, *case, *more])


def tensors(tree) -> list[tuple[str, str]]:
    """The ``(leaf key, digest)`` of every tensor in a fingerprint tree, sorted.

    Containers may be renamed between versions (a checkpoint's layout is not a number); the
    tensors' names and bytes may not.
    """
    out = []

    def walk(x, key=""):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, k)
        elif isinstance(x, list):
            for v in x:
                walk(v, key)
        elif isinstance(x, str) and x.startswith("torch."):
            out.append((key, x))

    walk(tree)
    return sorted(out)


def metrics(history: list[dict], other: list[dict]) -> list[dict]:
    """``history`` without a zero metric the other version does not log at all (before
    methods were plug-ins, ``editing/edited_tensors`` was logged as 0 with editing off)."""
    names = {k for h in other for k in h}
    return [{k: v for k, v in h.items() if k in names or v != 0} for h in history]


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'after' if name in b else 'before'}")
            continue
        x, y = a[name], b[name]
        parts = {
            "metrics": (metrics(x["history"], y["history"]), metrics(y["history"], x["history"])),
            "server tensors": (tensors(x["server"]), tensors(y["server"])),
            "client tensors": (tensors(x["clients"]), tensors(y["clients"])),
            "ranks": (x["ranks"], y["ranks"]),
        }
        differ = [part for part, (p, q) in parts.items() if p != q]
        bad += bool(differ)
        count = len(parts["server tensors"][0]) + len(parts["client tensors"][0])
        verdict = "DIFFERENT in " + ", ".join(differ) if differ else "identical"
        print(f"{name}: {verdict} ({len(x['history'])} rounds, {count} tensors)")
    print(f"{len(set(a) & set(b)) - bad} identical, {bad} different")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
