"""Smoke test of experiments/bench/vlm.py on a tiny random LLaVA: it runs and prints its table.

No timing is compared: the point is that the benchmark still runs against the engine (a real
``fedsim.run`` on Ray, and the one-process floor) and reports positive times. Both cases run in
fresh processes, as the benchmark runs them; the engine's joins the session's Ray
(``--ray-address``) with one client actor, so the test pays neither a Ray start nor a second
actor's imports, and the actor's memory is still measured.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import fedsim  # noqa: F401  (before tests/ joins sys.path, as the builders need)

TESTS = Path(__file__).resolve().parents[1]
BENCH = TESTS.parent / "experiments" / "bench" / "vlm.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vlm", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_bench_on_a_tiny_llava(tmp_path, capsys, ray_address_for_actors):
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from vlm_builders import build_tiny_vlm

    model = build_tiny_vlm("llava", tmp_path / "llava")
    bench = load_bench()
    argv = ["--backbone", "hf-vlm", "--name-or-path", str(model), "--quick"]
    argv += ["--ray-address", ray_address_for_actors, "resources.actors=1"]
    rows = bench.main(argv)
    out = capsys.readouterr().out

    header = next(line for line in out.splitlines() if line.startswith("| model |"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(bench.COLUMNS)
    line = next(line for line in out.splitlines() if line.startswith("| hf-vlm:llava |"))
    cells = dict(zip(bench.COLUMNS, (c.strip() for c in line.strip("|").split("|"))))
    assert cells == {k: str(v) for k, v in rows[0].items()}
    for column in ("step s", "gen s/sample", "eval s/sample", "round s", "floor s", "round/floor"):
        assert float(cells[column]) > 0, column
    assert int(cells["sampled"]) == 2  # --quick samples 2 clients
    assert int(cells["actors"]) == 1  # resources.actors=1, found on the joined cluster
    assert 1 <= int(cells["gen tokens"]) <= 12  # the demo config's eval.max_new_tokens
    assert cells["same result"] == "yes"  # the floor did the engine's work
    for column in ("actor RSS MB", "actor PSS MB", "engine PSS MB", "floor RSS MB"):
        assert float(cells[column]) > 0, column
    assert any(line.startswith("summary: hf-vlm:llava:") for line in out.splitlines())
