"""experiments/bench/gpu.py on a machine without a GPU: one line and status 2; its case configs
load; its NVML arithmetic (round windows, utilisation, peak memory) on hand-made samples."""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        load_bench().main([])
    assert done.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("gpu.py: no CUDA GPU here")


@pytest.mark.parametrize("case", ["floor", "1", "2", "4", "8"])
def test_every_case_is_a_valid_demo_config(case, tmp_path):
    from fedsim.config import load_config

    bench = load_bench()
    args = argparse.Namespace(rounds=2, overrides=["seed=3"])
    cfg = load_config(bench.CONFIG, bench.case_overrides(args, case, tmp_path))
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.train.precision == "bf16" and cfg.rounds == 2 and cfg.seed == 3
    assert cfg.clients.num >= 8 and cfg.clients.fraction == 1.0  # every actor is busy
    if case == "floor":
        assert cfg.resources.client.num_gpus == 1
    else:
        k = int(case)
        assert cfg.resources.client.num_gpus == pytest.approx(1 / k)
        assert cfg.resources.actors == k
        assert k * cfg.resources.client.num_gpus <= 1 + 1e-9  # K actors fit on one GPU


def test_round_windows_utilisation_and_peaks_on_hand_made_samples():
    bench = load_bench()
    # rounds logged at t = 10 s and 20 s, lasting 4 s and 5 s: windows [6, 10] and [15, 20]
    windows = bench.round_windows([10_000, 20_000], [4.0, 5.0])
    assert windows == [(6.0, 10.0), (15.0, 20.0)]
    samples = [
        (5.0, 99.0, {1: 100, 2: 10}),  # before round 1: not counted in the utilisation
        (7.0, 50.0, {1: 100, 2: 300, 3: 200}),
        (16.0, 70.0, {1: 100, 2: 250, 3: 400}),
        (21.0, 0.0, {}),
    ]
    assert bench.mean_util(samples, windows) == pytest.approx(60.0)
    assert math.isnan(bench.mean_util(samples, [(30.0, 40.0)]))
    # the driver (pid 1) is left out: actors 2 and 3 peak at 300 and 400, together at 650
    assert bench.peak_memory(samples, exclude={1}) == (400, 650)
    assert bench.peak_memory(samples, exclude=set()) == (400, 750)


def test_a_k_that_does_not_fit_is_reported_and_left_out_of_the_ratio():
    bench = load_bench()
    floor = {"round_s": [2.0, 2.0]}
    ok = {
        "round_s": [3.0, 5.0],
        "actor_peak": 2 * bench.MB,
        "total_peak": 4 * bench.MB,
        "util": 80.0,
    }
    row = bench.table_row(2, ok, floor)
    assert row["round s"] == "4.00" and row["round/floor"] == "2.00" and row["fits"] == "yes"
    assert row["GPU MB/actor"] == "2" and row["GPU MB"] == "4" and row["util %"] == "80"
    oom = bench.table_row(8, {"error": "CUDA out of memory. Tried to allocate 2.00 GiB"}, floor)
    assert oom["fits"].startswith("no (CUDA out of memory") and oom["round s"] == "-"
