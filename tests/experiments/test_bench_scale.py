"""experiments/bench/scale.py at a tiny size: its fedsim case (Ray) and its floor (the same round
loop in one process, ``LocalExecutor``) run, agree exactly, and the table adds up.

Both cases run as the benchmark runs them, each in a fresh Python process; the test records
what each case returned (by wrapping ``run_case``) to check the printed row against it. The
fedsim case joins the session's Ray (``--ray-address``) instead of starting one: its actors'
memory is then found through the run's pool.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "scale.py"
ROUNDS = 2
# keys the benchmark sets itself (from its flags, or per case): not passed on with --set
OWN_KEYS = ("seed", "rounds", "clients.", "model.backbone", "data.min_per_client", "sharing.")
OWN_KEYS += ("tracking.", "checkpoint.", "progress")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cells_of(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_floor_is_the_round_loop_in_process_and_matches_fedsim(
    tiny_overrides, monkeypatch, capsys, ray_address_for_actors
):
    bench = load_bench()
    recorded: dict[str, dict] = {}
    run_case = bench.run_case

    def recording(args, case, num, workdir):
        recorded[case] = run_case(args, case, num, workdir)
        return recorded[case]

    monkeypatch.setattr(bench, "run_case", recording)
    sets = [x for x in tiny_overrides if not x.split("=")[0].startswith(OWN_KEYS)]
    argv = ["--clients", "6", "--fraction", "0.5", "--rounds", str(ROUNDS), "--backbone", "tiny"]
    argv += ["--min-per-client", "5", "--ranks", "choice:2,4,8"]
    # joined: no Ray start in the case. A sample every second, not 0.2 s: at 0.2 s the sampler
    # alone takes a sizeable share of a core (PSS walks the page tables); the actors are still
    # sampled (once more just before they stop), which the actors column checks
    argv += ["--ray-address", ray_address_for_actors, "--interval", "1"]
    for item in sets:
        argv += ["--set", item]
    rows = bench.main(argv)
    out = capsys.readouterr().out

    fed, floor = recorded["fedsim"], recorded["floor"]
    # the floor is the real loop: the whole history but time/* is fedsim's, bit for bit
    assert bench.equal(floor["history"], fed["history"])
    assert [h["round"] for h in fed["history"]] == list(range(ROUNDS + 1))
    assert not any(k.startswith("time/") for h in fed["history"] for k in h)
    assert fed["sampled"] == [3] * ROUNDS and fed["failed"] == [0] * ROUNDS
    # one training time per round, one evaluation time per round after round 0 (eval.every=1)
    assert len(floor["train_s"]) == ROUNDS and len(floor["eval_s"]) == ROUNDS
    assert all(x > 0 for x in [*floor["train_s"], *floor["eval_s"], *fed["round_s"]])
    # the floor's own rounds hold its training and evaluation
    for round_s, train_s, eval_s in zip(floor["round_s"], floor["train_s"], floor["eval_s"]):
        assert train_s + eval_s <= round_s

    header = next(line for line in out.splitlines() if line.startswith("| clients |"))
    assert cells_of(header) == list(bench.COLUMNS)
    line = next(line for line in out.splitlines() if line.startswith("| 6 |"))
    cells = dict(zip(bench.COLUMNS, cells_of(line)))
    assert cells == {k: str(v) for k, v in rows[0].items()}
    assert cells["same result"] == "yes"
    assert int(cells["sampled"]) == 3
    assert int(cells["actors"]) == fed["pool"] == 2  # the session's 2 CPUs, 3 sampled
    for column in ("round s", "floor s", "eval s", "round/floor", "round/(floor+eval)"):
        assert float(cells[column]) > 0, column
    for column in ("RSS MB", "PSS MB", "driver MB"):
        assert float(cells[column]) > 0, column

    # the columns are the recorded times, and the ratios are of those times
    round_s, floor_s = bench.mean(fed["round_s"]), bench.mean(floor["train_s"])
    eval_s = sum(floor["eval_s"]) / ROUNDS
    assert cells["round s"] == f"{round_s:.2f}"
    assert cells["floor s"] == f"{floor_s:.2f}"
    assert cells["eval s"] == f"{eval_s:.2f}"
    assert cells["round/floor"] == f"{round_s / floor_s:.2f}"
    assert cells["round/(floor+eval)"] == f"{round_s / (floor_s + eval_s):.2f}"
    # the ideal: each round's own task times scheduled longest first, plus evaluation / actors
    assert len(fed["task_s"]) == ROUNDS and all(len(ts) == 3 for ts in fed["task_s"])
    ideal = bench.mean([bench.longest_first(ts, fed["pool"]) for ts in fed["task_s"]])
    ideal += eval_s / fed["pool"]
    assert cells["ideal s"] == f"{ideal:.2f}"
    assert cells["round/ideal"] == f"{round_s / ideal:.2f}"


# A stand-in for a local Ray's process tree under the benchmark's driver, run as
# ``python -c RAY_LIKE_TREE driver``: the driver's child is a daemon (the raylet) whose children
# are a client actor (Ray titles it ray::ClientActor...) and an idle worker (its command line
# runs default_worker.py). Each process prints its descendants' pids once they look so.
RAY_LIKE_TREE = r"""
import ctypes, os, subprocess, sys, time


def spawn(role, *args, argv0=sys.executable):
    cmd = [argv0, "-c", os.environ["RAY_LIKE_TREE"], role, *args]
    return subprocess.Popen(cmd, executable=sys.executable, stdout=subprocess.PIPE)


role = sys.argv[1]
if role == "actor":
    ctypes.CDLL(None).prctl(15, b"ray::ClientActor", 0, 0, 0)  # PR_SET_NAME, as Ray's title
kids = []
if role == "driver":
    kids = [spawn("raylet")]
elif role == "raylet":
    # (the name split: only the worker's command line may hold it, not this source's)
    kids = [spawn("actor", argv0="ray::ClientActor"), spawn("worker", "default_worker" ".py")]
below = [pid for kid in kids for pid in kid.stdout.readline().split()]
print(*(kid.pid for kid in kids), *(int(pid) for pid in below), flush=True)
time.sleep(120)
"""


def test_the_sampler_groups_the_drivers_descendants_by_their_ray_process_names():
    # The slow test's fedsim case joins the session's Ray, where its actors are found through
    # the pool; this checks the walk of a local Ray's tree (the benchmark's default) by itself.
    bench = load_bench()
    env = {**os.environ, "RAY_LIKE_TREE": RAY_LIKE_TREE}
    cmd = [sys.executable, "-c", RAY_LIKE_TREE, "driver"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    try:
        pids = [int(pid) for pid in driver.stdout.readline().split()]
        raylet, actor, worker = (psutil.Process(pid) for pid in pids)
        sampler = bench.MemorySampler(interval=60)
        sampler.me = psutil.Process(driver.pid)  # sample that tree as the benchmark's driver
        assert {proc.pid for proc in sampler.processes()} == {driver.pid, *pids}
        sampler.sample()
        peak = sampler.peak
        assert peak["actors"] == 1
        assert peak["driver"] == pytest.approx(sampler.me.memory_info().rss, rel=0.05)
        # the driver with the Ray workers (the actor and the idle worker); the daemon apart
        workers = actor.memory_info().rss + worker.memory_info().rss
        assert peak["rss"] - peak["driver"] == pytest.approx(workers, rel=0.05)
        assert peak["daemons"] == pytest.approx(raylet.memory_info().rss, rel=0.05)
        assert 0 < peak["pss"] <= peak["rss"]
    finally:
        for proc in psutil.Process(driver.pid).children(recursive=True):
            proc.kill()
        driver.kill()
        driver.wait()


def test_same_result_is_exact_and_ignores_time():
    bench = load_bench()
    nan = float("nan")
    history = [{"round": 0, "global/loss": 1.5, "personalized/auc_mean": nan}]
    fed = {"history": bench.untimed_history([{**history[0], "time/round_s": 0.5}])}
    floor = {"history": bench.untimed_history([{**history[0], "time/round_s": 0.7}])}
    assert bench.same_result(fed, floor)  # NaN == NaN, time/* left out
    floor["history"][0]["global/loss"] = 1.5 + 1e-12
    assert not bench.same_result(fed, floor)


def test_longest_first_makespan_on_hand_examples():
    bench = load_bench()
    assert bench.longest_first([7.4, 2.2, 5.9, 2.2], 2) == pytest.approx(9.6)  # 7.4+2.2 | 5.9+2.2
    assert bench.longest_first([3, 3, 2, 2, 2], 2) == pytest.approx(7)  # 3+2+2 | 3+2
    assert bench.longest_first([5, 1], 4) == 5
    assert bench.longest_first([], 2) == 0
    fed = {"pool": 2, "task_s": [[4.0, 1.0, 3.0], [2.0, 2.0]]}
    floor = {"eval_s": [3.0, 1.0], "rounds": 2}
    # rounds: max(4, 1+3) = 4 and 2 -> mean 3; evaluation 2 s a round over 2 actors -> 1
    assert bench.ideal_round(fed, floor) == pytest.approx(4.0)
