"""Smoke test of experiments/bench/merges.py on tiny shapes: it runs and prints every method.

No timing is asserted: the point is that the benchmark still runs against the merger API, with
a batch row for every method, a streaming row for every method that streams, and a row of
the engine's path with the merge diagnostics (``stream+diag`` or ``batch+diag``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from aggregation import MERGERS, merger_class

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "merges.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_merges", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_cases(methods) -> list[tuple[str, str]]:
    cases = []
    for name in methods:
        cases.append((name, "batch"))
        if merger_class(name).streams:
            cases += [(name, "stream"), (name, "stream+diag")]
        else:
            cases.append((name, "batch+diag"))
    return cases


def table_lines(out: str, clients: int) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith(f"| {clients} |")
    ]


def test_tiny_benchmark_prints_a_row_per_method_and_path(capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    rows = bench.main(["--tiny", "--clients", "3", "--repeats", "1", "--no-memory"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # main restores the thread count
    cases = expected_cases(MERGERS)
    assert [(row[1], row[2]) for row in rows] == cases
    assert {"zeropad", "fedilora", "hetlora", "flora"} <= {m for m, p in cases if p == "stream"}
    assert all(row[0] == 3 for row in rows)
    table = table_lines(out, 3)
    assert [(cells[1], cells[2]) for cells in table] == cases
    for cells in table:
        merge_ms, floor_ms, ratio = (float(cell) for cell in cells[4:7])
        # the ratio is of the unrounded times; the printed ms are rounded to 0.1
        low = (merge_ms - 0.05) / (floor_ms + 0.05)
        high = (merge_ms + 0.05) / (floor_ms - 0.05) if floor_ms > 0.05 else float("inf")
        assert ratio > 0 and low <= ratio <= high, (merge_ms, floor_ms, ratio)
        assert cells[7] == "-"  # no memory column with --no-memory


@pytest.mark.slow  # 400 clients' merges
def test_tiny_benchmark_measures_server_peak_memory_per_path(capsys):
    # 400 tiny clients are about 2.8 MB of float32 inputs, which the batch path holds at once
    # and the stream never does (each case runs in a fresh process).
    bench = load_bench()
    rows = bench.main(["--tiny", "--clients", "400", "--repeats", "1", "--methods", "zeropad"])
    out = capsys.readouterr().out
    assert [(row[1], row[2]) for row in rows] == [
        ("zeropad", "batch"),
        ("zeropad", "stream"),
        ("zeropad", "stream+diag"),
    ]
    (batch, stream, diag) = (float(cells[7]) for cells in table_lines(out, 400))
    input_mb = float(rows[0][8])
    assert input_mb > 2
    if "could not be reset" not in out:
        assert batch >= input_mb and stream < 1.0, (batch, stream, input_mb)
        # the diagnostics keep (R,) numbers per client and combine them in a few (S, R)
        # float64 matrices at the end (S = 400 clients, R = 64: 0.2 MB each), never the
        # clients' updates (which grow with the adapter's size, not with R)
        matrix_mb = 400 * bench.GLOBAL_RANK * 8 / 1e6
        assert diag < 10 * matrix_mb, (diag, matrix_mb)
