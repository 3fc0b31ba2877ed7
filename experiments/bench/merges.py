"""Time every heterogeneous-rank merge method against one memory pass over the same inputs.

For each client count ``N`` the benchmark draws ``N`` ranks from {4, 8, 16, 32, 64} and random
float32 client states shaped like the default backbone's LoRA adapter (truncated to each
client's rank), then times ``get_merger(name).merge(...)`` for every method in ``MERGERS`` and,
as the practical floor, one pass that reads every input element once (a sum per tensor). For
every method that streams (``streams=True``) it also times the streaming merge: ``add`` of
every client one by one, then ``result()``. The ``+diag`` path is the engine's default path
(streaming where the method streams, else batch) with the merge diagnostics the server computes
every round (docs/algorithms.md §1.9: each update's ``(R,)`` squared change per dimension as it
arrives, its merge weight, then the per-dimension and per-client summary and the update norm).
It prints one row per (clients, method, path): merge ms, floor ms, their ratio, the server's
peak memory and the input size; compare a ``+diag`` row with the plain row above it for the
diagnostics' cost.

Server peak memory is measured per case in a fresh Python process: the growth of its resident
set (peak minus the level before the first client arrives, Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``). The batch path holds every client's state at once; the
streaming path generates client ``i``'s state right before ``add`` and drops it after, as
updates arriving one at a time would.

    python experiments/bench/merges.py [--clients 10 100 500]
        [--methods zeropad fedilora ...] [--repeats 3] [--threads N] [--tiny] [--no-memory]

See ``experiments/bench/README.md`` for the columns and a measured table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from aggregation import MERGERS, RankMerger, get_merger, rank_axis, truncate
from aggregation.diagnostics import DiagnosticsParts, diagnose

RANK_CHOICES = (4, 8, 16, 32, 64)
GLOBAL_RANK = 64
DEFAULT_CLIENTS = (10, 100, 500)
# Above this many bytes of client tensors, a pool of distinct states per rank is generated and
# clients of the same rank share them (see ``make_clients``).
DEFAULT_MAX_GB = 6.0
# A case (one clients x method) whose warm-up is slow gets fewer timed repeats, so the whole
# run stays short: repeats are cut to fit roughly this many seconds (at least 1).
DEFAULT_CASE_BUDGET_S = 6.0

COLUMNS = (
    "clients",
    "method",
    "path",
    "repeats",
    "merge ms",
    "floor ms",
    "merge/floor",
    "server peak MB",
    "input MB",
)
# The line a peak-memory child process prints its result on.
RESULT_TAG = "PEAK_RESULT "


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


def draw_clients(num_clients: int, seed: int) -> tuple[list[int], list[float]]:
    """Draw the clients' ranks from ``RANK_CHOICES`` and sample counts from [10, 1000)."""
    rng = np.random.default_rng(seed)
    ranks = [int(r) for r in rng.choice(RANK_CHOICES, size=num_clients)]
    num_samples = [float(n) for n in rng.integers(10, 1000, size=num_clients)]
    return ranks, num_samples


def random_state(shapes: Mapping[str, tuple[int, ...]], generator: torch.Generator):
    """A random float32 state with these shapes."""
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


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
    ranks, num_samples = draw_clients(num_clients, seed)
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
            made[r].append(random_state(shapes[r], g))
        states.append(made[r][index])
    return states, ranks, num_samples, input_bytes, distinct_bytes


def memory_pass(states: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """The floor: read every element of every input tensor once (one sum per tensor)."""
    return torch.stack([t.sum() for state in states for t in state.values()]).sum()


def stream_merge(
    merger: RankMerger,
    clients: Iterable[tuple[Mapping[str, Tensor], int, float]],
    global_state: Mapping[str, Tensor],
    diagnostics: bool = False,
) -> dict[str, Tensor]:
    """Merge ``(state, rank, num_samples)`` triples one at a time with ``merger.stream``.

    Each state is dropped after its ``add``, so when ``clients`` makes them lazily the server
    never holds more than one. With ``diagnostics``, also what the server computes for the
    merge diagnostics (as ``actors.server.ServerState`` does): per client on arrival its
    squared change per dimension and its merge weight, at the end the summary.
    """
    stream = merger.stream(global_state, GLOBAL_RANK, global_state)
    parts = DiagnosticsParts(merger, GLOBAL_RANK, global_state) if diagnostics else None
    for state, rank, count in clients:
        stream.add(state, rank, count)
        if parts is not None:
            parts.add(state, rank, count)
        del state
    merged = stream.result()
    if parts is not None:
        parts.result(merged)
    return merged


def batch_merge(
    merger: RankMerger,
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    global_state: Mapping[str, Tensor],
    diagnostics: bool = False,
) -> dict[str, Tensor]:
    """``merger.merge`` of every client at once; with ``diagnostics``, then the merge
    diagnostics of the same clients (:func:`aggregation.diagnostics.diagnose`)."""
    merged = merger.merge(
        states, ranks, num_samples, previous=global_state, global_rank=GLOBAL_RANK
    )
    if diagnostics:
        diagnose(merger, states, ranks, num_samples, GLOBAL_RANK, global_state, new=merged)
    return merged


def paths_of(merger: RankMerger) -> list[str]:
    """The rows of one method: batch, stream (if it streams) and the engine's path + diag."""
    return ["batch"] + (["stream", "stream+diag"] if merger.streams else ["batch+diag"])


def _status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_case(
    shapes: Mapping[str, tuple[int, ...]],
    method: str,
    path: str,
    num_clients: int,
    seed: int,
    max_bytes: float,
) -> dict[str, object]:
    """Run one merge and return the growth of this process's peak RSS while it ran.

    Called in a fresh process (``run_peak_case``). The global state (the server's, held in
    either path) and a 2-client warm-up of both paths on the tiny shapes come before the
    baseline, so lazily loaded code is not counted; the warm-up is tiny so that it leaves no
    freed memory the measured merge could reuse without growing the RSS.

    Returns:
        ``{"peak_bytes": ..., "exact": ...}``: the peak minus the RSS at the baseline;
        ``exact`` is False where the high-water mark could not be reset (then it is the
        process's lifetime peak ``ru_maxrss`` minus the baseline, an upper bound).
    """
    g = torch.Generator().manual_seed(seed)
    global_state = random_state(shapes, g)
    merger = get_merger(method)
    draw_clients(2, seed)  # numpy's first Generator allocates about 2.5 MB
    tiny = tiny_global_state(seed)
    warm_ranks = [RANK_CHOICES[0], RANK_CHOICES[-1]]
    warm = [(random_state(client_shapes(tiny, r), g), r, 10.0) for r in warm_ranks]
    merger.merge([s for s, _, _ in warm], warm_ranks, [10.0, 10.0], previous=tiny)
    diagnose(merger, [s for s, _, _ in warm], warm_ranks, [10.0, 10.0], GLOBAL_RANK, tiny)
    if merger.streams:
        stream_merge(merger, warm, tiny, diagnostics=True)
    del warm, tiny
    exact = _reset_peak()
    baseline = _status_kb("VmRSS")
    diagnostics = path.endswith("+diag")
    if path.startswith("batch"):
        states, ranks, num_samples, _, _ = make_clients(global_state, num_clients, seed, max_bytes)
        merged = batch_merge(merger, states, ranks, num_samples, global_state, diagnostics)
    else:
        ranks, num_samples = draw_clients(num_clients, seed)
        by_rank = {r: client_shapes(global_state, r) for r in RANK_CHOICES}
        lazy = (
            (random_state(by_rank[r], g), r, n) for r, n in zip(ranks, num_samples, strict=True)
        )
        merged = stream_merge(merger, lazy, global_state, diagnostics)
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del merged
    return {"peak_bytes": 1024 * (peak - baseline), "exact": exact}


def run_peak_case(
    args: argparse.Namespace, shapes_file: Path, method: str, path: str, num_clients: int
) -> dict[str, object]:
    """Run ``peak_case`` in a fresh Python process and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-case", path, method]
    cmd += [str(num_clients), "--shapes-file", str(shapes_file), "--seed", str(args.seed)]
    cmd += ["--max-gb", str(args.max_gb), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise RuntimeError(
            f"peak memory of {method} ({path}, {num_clients} clients) failed "
            f"(exit {proc.returncode})"
        )
    return json.loads(lines[-1][len(RESULT_TAG) :])


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
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the server peak memory column (one fresh process per case)",
    )
    # Internal: run one peak-memory case (``peak_case``) and print its result.
    parser.add_argument(
        "--peak-case",
        nargs=3,
        metavar=("PATH", "METHOD", "N"),
        default=None,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--shapes-file", default=None, help=argparse.SUPPRESS)
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
        if args.peak_case:
            path, method, num = args.peak_case
            shapes = json.loads(Path(args.shapes_file).read_text())
            shapes = {key: tuple(shape) for key, shape in shapes.items()}
            result = peak_case(
                shapes, method, path, int(num), args.seed + int(num), args.max_gb * 1e9
            )
            print(RESULT_TAG + json.dumps(result), flush=True)
            return []
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
    with tempfile.TemporaryDirectory(prefix="bench-merges-") as tmp:
        shapes_file = Path(tmp) / "shapes.json"
        shapes = {key: list(tensor.shape) for key, tensor in global_state.items()}
        shapes_file.write_text(json.dumps(shapes))
        rows = run_cases(args, global_state, shapes_file)
    print("\n" + format_table(rows), flush=True)
    print(f"\ntotal {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def run_cases(
    args: argparse.Namespace, global_state: Mapping[str, Tensor], shapes_file: Path
) -> list[tuple]:
    """Time (and, with ``args.memory``, measure) every (clients, method, path) case."""
    rows = []
    inexact = False
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

            def merge(m=merger, s=states, r=ranks, w=num_samples, diag=False):
                return batch_merge(m, s, r, w, global_state, diag)

            def stream(m=merger, s=states, r=ranks, w=num_samples, diag=False):
                return stream_merge(m, zip(s, r, w), global_state, diag)

            fns = {
                "batch": merge,
                "stream": stream,
                "batch+diag": lambda f=merge: f(diag=True),
                "stream+diag": lambda f=stream: f(diag=True),
            }
            for path in paths_of(merger):
                fn = fns[path]
                merge_ms, reps = time_ms(fn, args.repeats, args.case_budget)
                peak = "-"
                if args.memory:
                    result = run_peak_case(args, shapes_file, name, path, n)
                    peak = f"{result['peak_bytes'] / 1e6:.1f}"
                    inexact = inexact or not result["exact"]
                row = (
                    n,
                    name,
                    path,
                    reps,
                    f"{merge_ms:.1f}",
                    f"{floor_ms:.1f}",
                    f"{merge_ms / floor_ms:.1f}" if floor_ms > 0 else "inf",
                    peak,
                    f"{input_bytes / 1e6:.1f}",
                )
                rows.append(row)
                print("  " + "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, row)), flush=True)
        del states
    if inexact:
        print("NB: the RSS high-water mark could not be reset; peaks are ru_maxrss upper bounds")
    return rows


if __name__ == "__main__":
    main()
