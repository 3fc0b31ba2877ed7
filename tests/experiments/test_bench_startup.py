"""experiments/bench/startup.py: the report adds up, and (slow) both cases run end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "startup.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_startup", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_shows_each_phase_and_the_ratio_to_the_floor():
    bench = load_bench()
    fed = {
        "checks": 3.0,
        "ray": 3.1,
        "store": 3.2,
        "actors": 9.0,
        "ready": 9.5,
        "first_round": 12.0,
        "rounds": 30.0,
        "done": 31.5,
        "wall": 32.0,
    }
    floor = {"imports": 3.0, "loaded": 5.0, "wall": 5.5}
    lines = bench.report(fed, floor)
    text = "\n".join(lines)
    assert "| actors | 9.00 | 5.80 |" in text  # its end, and its length after store
    assert "start-up (to round 0): 9.50 s = 1.90 x the floor (5.00 s)" in text
    assert "tear-down: 1.50 s" in text and "training rounds: 18.00 s" in text
    assert bench.median_case([{"a": 1.0}, {"a": 3.0}, {"a": 2.0}]) == {"a": 2.0}


@pytest.mark.slow
def test_both_cases_run_and_the_phases_are_in_order(capsys, ray_address_for_actors):
    # the fedsim case joins the session's Ray: its 'ray' phase is the join, not a start
    bench = load_bench()
    argv = ["--backbone", "tiny", "--rounds", "1", "--image-size", "16", "--steps", "1"]
    argv += ["--actors", "1", "--ray-address", ray_address_for_actors]
    fed, floor = bench.main([*argv, "--extra", "data.subset=300", "data.min_per_client=5"])
    names = [name for name, _ in bench.PHASES if name in fed]
    assert names == ["checks", "ray", "store", "actors", "ready", "first_round", "rounds", "done"]
    ends = [fed[name] for name in names]
    assert ends == sorted(ends) and ends[0] > 0
    assert fed["wall"] >= fed["done"]
    assert 0 < floor["imports"] < floor["loaded"] <= floor["wall"]
    out = capsys.readouterr().out
    assert f"= {fed['ready'] / floor['loaded']:.2f} x the floor" in out
    assert f"| ray | {fed['ray']:.2f} |" in out and ray_address_for_actors in out
