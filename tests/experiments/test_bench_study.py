"""experiments/bench/study.py: its plan of runs and its report's arithmetic.

The cases themselves are what ``fedsim compare`` runs (``fedsim.simulation.lanes``), tested
end to end on Ray by ``tests/fedsim/simulation/test_study_parallel.py``; a real invocation of
the benchmark takes minutes (two fresh processes, each with a Ray and a study of its own).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "study.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_study", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plan_is_every_merge_by_seed_of_the_default_experiment(tmp_path):
    bench = load_bench()
    args = bench.parse_args(
        ["--backbone", "tiny", "--rounds", "2", "--set", "train.max_local_steps=3"]
    )
    cfgs = bench.configs(args, tmp_path)
    assert [(c.aggregation.method, c.seed) for c in cfgs] == [
        ("fedilora", 0),
        ("fedilora", 1),
        ("fedilora", 2),
        ("zeropad", 0),
        ("zeropad", 1),
        ("zeropad", 2),
    ]
    assert all(c.rounds == 2 and c.train.max_local_steps == 3 and not c.progress for c in cfgs)
    assert cfgs[0].tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cfgs[4].tracking.run_name == "zeropad seed=1"


def _run(overhead: float, rounds: float, history) -> dict:
    return {"wall": overhead + rounds, "overhead": overhead, "rounds": rounds, "history": history}


def test_the_report_divides_the_measured_times():
    bench = load_bench()
    h = [{"round": 0, "global/accuracy": 0.5}]
    seq = {
        "wall": 100.0,
        "peak_mb": 2000.0,
        "lanes": 1,
        "runs": [_run(15.0, 5.0, h), _run(17.0, 5.0, h), _run(16.0, 5.0, h)],
    }
    con = {
        "wall": 50.0,
        "peak_mb": 3000.0,
        "lanes": 2,
        "runs": [_run(14.0, 6.0, h), _run(15.0, 6.0, h), _run(1.5, 6.0, h)],
    }
    lines = bench.report(seq, con)
    text = "\n".join(lines)
    assert "| sequential, fresh actors | 1 | 100.0 | 2000 | 16.00 (every run cold) |" in lines
    assert "| concurrent, warm actors | 2 | 50.0 | 3000 | 1.50 warm, 14.50 for each lane's" in text
    assert "concurrent / sequential = 0.50 (goal <= 0.6)" in text
    assert "warm per-run overhead: 1.50 s (goal <= 2 s), max 1.50 s; cold 16.00 s" in text
    assert "peak memory: concurrent / sequential = 1.50" in text
    assert "same numbers, run by run: yes" in text
    con["runs"][1]["history"] = [{"round": 0, "global/accuracy": 0.25}]
    assert "same numbers, run by run: NO" in "\n".join(bench.report(seq, con))
