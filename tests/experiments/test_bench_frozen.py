"""experiments/bench/frozen.py: the row's arithmetic and its arguments (the measurement itself
starts 4-8 actors per backbone: run the script; the equality it reports is tested on workers in
tests/fedsim/models/test_frozen.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "frozen.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_frozen", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_saving_is_per_actor_after_the_first():
    bench = load_bench()
    t = {"w": torch.ones(2)}
    private = {"pss": [300e6, 300e6, 300e6], "frozen": 100e6, "initial": t, "update": t}
    shared = {"pss": [233e6, 234e6, 233e6], "frozen": 100e6, "initial": t, "update": t}
    row = bench.row("default", 3, private, shared)
    # (900 - 700) / 2 = 100 MB per extra actor: all of the frozen weights
    assert row["saving MB/extra actor"] == "100" and row["saving/frozen"] == "1.00"
    assert row["private PSS MB/actor"] == "300" and row["shared PSS MB/actor"] == "233"
    assert row["same numbers"] == "yes"
    other = {**shared, "update": {"w": torch.ones(2) * 2}}
    assert bench.row("default", 3, private, other)["same numbers"] == "NO"


def test_one_actor_is_refused(capsys):
    with pytest.raises(SystemExit) as done:
        load_bench().main(["--actors", "1"])
    assert done.value.code == 2 and "at least 2" in capsys.readouterr().err
