"""Smoke test of experiments/bench/merges.py on tiny shapes: it runs and prints every method.

No timing is asserted: the point is that the benchmark still runs against the merger API.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from aggregation import MERGERS

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "merges.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_merges", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_prints_a_row_per_method(capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    rows = bench.main(["--tiny", "--clients", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # main restores the thread count
    assert [row[1] for row in rows] == list(MERGERS)
    assert all(row[0] == 3 for row in rows)
    table = [line for line in out.splitlines() if line.startswith("| 3 |")]
    assert [line.split("|")[2].strip() for line in table] == list(MERGERS)
    for line in table:
        merge_ms, floor_ms, ratio = (float(cell) for cell in line.split("|")[4:7])
        # the ratio is of the unrounded times; the printed ms are rounded to 0.1
        low = (merge_ms - 0.05) / (floor_ms + 0.05)
        high = (merge_ms + 0.05) / (floor_ms - 0.05) if floor_ms > 0.05 else float("inf")
        assert ratio > 0 and low <= ratio <= high, (merge_ms, floor_ms, ratio)
