"""Time every heterogeneous-rank merge method against one memory pass over the same inputs.

For each client count ``N`` the benchmark draws ``N`` ranks from {4, 8, 16, 32, 64} and random
float32 client states shaped like the default backbone's LoRA adapter (truncated to each
client's rank), then times ``get_merger(name).merge(...)`` for every method in ``MERGERS`` and,
as the practical floor, one pass that reads every input element once (a sum per tensor). It
prints one row per (clients, method): merge ms, floor ms, their ratio and the input size.

    /work/venv/bin/python experiments/bench/merges.py [--clients 10 100 500]
        [--methods zeropad fedilora ...] [--repeats 3] [--threads N] [--tiny]

See ``experiments/bench/README.md`` for the columns and a measured table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from aggregation import MERGERS, get_merger, rank_axis, truncate

RANK_CHOICES = (4, 8, 16, 32, 64)
GLOBAL_RANK = 64
DEFAULT_CLIENTS = (10, 100, 500)
# Above this many bytes of client tensors, a pool of distinct states per rank is generated and
# clients of the same rank share them (see ``make_clients``).
DEFAULT_MAX_GB = 6.0
# A case (one clients x method) whose warm-up is slow gets fewer timed repeats, so the whole
# run stays short: repeats are cut to fit roughly this many seconds (at least 1).
DEFAULT_CASE_BUDGET_S = 6.0

COLUMNS = ("clients", "method", "repeats", "merge ms", "floor ms", "merge/floor", "input MB")


def backbone_global_state() -> dict[str, Tensor]:
    """The rank-64 global adapter of the default backbone (peft key names), built offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from fedsim.config import LoraConfig, ModelConfig
    from fedsim.models.backbone import build_backbone
    from fedsim.models.lora import AdapterHost

    backbone = build_backbone(ModelConfig(), num_classes=9)
    host = AdapterHost(backbone, LoraConfig(), global_rank=GLOBAL_RANK)
    host.activate(GLOBAL_RANK, seed=0)
    return host.state(GLOBAL_RANK)


def tiny_global_state(seed: int = 0) -> dict[str, Tensor]:
    """A small hand-made rank-64 state: one linear and one 1x1-conv LoRA pair plus a dense head."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "base_model.model.text.layer.0.query.lora_A.weight": (GLOBAL_RANK, 16),
        "base_model.model.text.layer.0.query.lora_B.weight": (24, GLOBAL_RANK),
        "base_model.model.image.conv.lora_A.weight": (GLOBAL_RANK, 8, 1, 1),
        "base_model.model.image.conv.lora_B.weight": (12, GLOBAL_RANK, 1, 1),
        "base_model.model.classifier.weight": (9, 32),
        "base_model.model.classifier.bias": (9,),
    }
    return {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}


def client_shapes(global_state: Mapping[str, Tensor], rank: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a rank-``rank`` client: ``truncate(global_state, rank)``'s shapes."""
    shapes = {}
    for key, tensor in global_state.items():
        shape = list(tensor.shape)
        axis = rank_axis(key)
        if axis is not None:
            shape[axis] = rank
        shapes[key] = tuple(shape)
    return shapes


def state_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of one float32 state with these shapes."""
    return sum(4 * int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())


def make_clients(
    global_state: Mapping[str, Tensor],
    num_clients: int,
    seed: int,
    max_bytes: float,
) -> tuple[list[dict[str, Tensor]], list[int], list[float], int, int]:
    """Draw ranks, sample counts and random float32 client states.

    When ``num_clients`` distinct states would take more than ``max_bytes``, only a pool of
    ``k`` distinct states per rank is generated (the largest ``k`` that fits) and client ``i``
    of rank ``r`` reuses the pool entry ``i mod k``: the merge still reads ``num_clients``
    states, some of them the same tensors.

    Returns:
        ``(states, ranks, num_samples, input_bytes, distinct_bytes)``: ``input_bytes`` counts
        every client's tensors (what a merge reads), ``distinct_bytes`` the memory allocated.
    """
    rng = np.random.default_rng(seed)
    ranks = [int(r) for r in rng.choice(RANK_CHOICES, size=num_clients)]
    num_samples = [float(n) for n in rng.integers(10, 1000, size=num_clients)]
    shapes = {r: client_shapes(global_state, r) for r in RANK_CHOICES}
    input_bytes = sum(state_bytes(shapes[r]) for r in ranks)
    counts = {r: ranks.count(r) for r in RANK_CHOICES}
    pool = max(counts.values())
    while pool > 1 and sum(min(c, pool) * state_bytes(shapes[r]) for r, c in counts.items()) > (
        max_bytes
    ):
        pool = max(1, pool * 3 // 4)
    distinct_bytes = sum(min(c, pool) * state_bytes(shapes[r]) for r, c in counts.items())
    g = torch.Generator().manual_seed(seed)
    made: dict[int, list[dict[str, Tensor]]] = {r: [] for r in RANK_CHOICES}
    seen: dict[int, int] = dict.fromkeys(RANK_CHOICES, 0)
    states = []
    for r in ranks:
        index = seen[r] % pool
        seen[r] += 1
        if index == len(made[r]):
            made[r].append(
                {key: torch.randn(shape, generator=g) for key, shape in shapes[r].items()}
            )
        states.append(made[r][index])
    return states, ranks, num_samples, input_bytes, distinct_bytes


def memory_pass(states: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """The floor: read every element of every input tensor once (one sum per tensor)."""
    return torch.stack([t.sum() for state in states for t in state.values()]).sum()


def time_ms(fn: Callable[[], object], repeats: int, budget_s: float) -> tuple[float, int]:
    """Warm up once, then return the median wall time (ms) of up to ``repeats`` calls.

    Repeats are cut so that they take roughly ``budget_s`` seconds (at least one is timed).
    """
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    if warm > 0:
        repeats = max(1, min(repeats, int(budget_s / warm)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), repeats


def format_table(rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with ``COLUMNS`` as header."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=list(DEFAULT_CLIENTS))
    parser.add_argument(
        "--methods", nargs="+", default=list(MERGERS), choices=list(MERGERS), metavar="METHOD"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
    parser.add_argument(
        "--case-budget",
        type=float,
        default=DEFAULT_CASE_BUDGET_S,
        help="seconds of timed calls per case; fewer repeats when the warm-up is slower",
    )
    parser.add_argument(
        "--max-gb",
        type=float,
        default=DEFAULT_MAX_GB,
        help="above this many GB of distinct client tensors, clients of one rank share tensors",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while timing (default 1; 0 keeps torch's default, one per core). "
        "On a machine shared with another CPU job, more threads than free cores make every "
        "timing scheduler noise",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="small hand-made shapes instead of the backbone"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(n < 1 for n in args.clients) or args.threads < 0:
        parser.error("--repeats and --clients must be positive, --threads at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> list[tuple]:
    """Run the benchmark, print the table and return its rows."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> list[tuple]:
    """The benchmark proper, under the thread count ``main`` has set."""
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", os.cpu_count()={os.cpu_count()}, torch {torch.__version__}, "
        f"torch.get_num_threads()={torch.get_num_threads()}, device=cpu",
        flush=True,
    )
    start = time.perf_counter()
    global_state = tiny_global_state(args.seed) if args.tiny else backbone_global_state()
    full = state_bytes(client_shapes(global_state, GLOBAL_RANK))
    print(
        f"shapes: {'tiny' if args.tiny else 'default backbone'}, {len(global_state)} tensors, "
        f"rank-{GLOBAL_RANK} state {full / 1e6:.2f} MB "
        f"(built in {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    # A client of rank r has truncate(global_state, r)'s shapes; check that client_shapes agrees.
    for r in RANK_CHOICES:
        expected = {k: tuple(t.shape) for k, t in truncate(global_state, r).items()}
        assert client_shapes(global_state, r) == expected, f"rank {r} shapes disagree"
    rows = []
    for n in args.clients:
        states, ranks, num_samples, input_bytes, distinct = make_clients(
            global_state, n, args.seed + n, args.max_gb * 1e9
        )
        hist = ", ".join(f"r{r}: {ranks.count(r)}" for r in RANK_CHOICES)
        shared = "" if distinct == input_bytes else " (clients of one rank share tensors)"
        print(
            f"\n{n} clients ({hist}): input {input_bytes / 1e6:.1f} MB, "
            f"allocated {distinct / 1e6:.1f} MB{shared}",
            flush=True,
        )
        floor_ms, floor_reps = time_ms(lambda s=states: memory_pass(s), args.repeats, 1e9)
        for name in args.methods:
            merger = get_merger(name)

            def merge(m=merger, s=states, r=ranks, w=num_samples):
                return m.merge(s, r, w, previous=global_state, global_rank=GLOBAL_RANK)

            merge_ms, reps = time_ms(merge, args.repeats, args.case_budget)
            row = (
                n,
                name,
                reps,
                f"{merge_ms:.1f}",
                f"{floor_ms:.1f}",
                f"{merge_ms / floor_ms:.1f}" if floor_ms > 0 else "inf",
                f"{input_bytes / 1e6:.1f}",
            )
            rows.append(row)
            print("  " + "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, row)), flush=True)
        del states
    print("\n" + format_table(rows), flush=True)
    print(f"\ntotal {time.perf_counter() - start:.1f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
