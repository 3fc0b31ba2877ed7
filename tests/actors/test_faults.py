"""Faults on a real local Ray: actors killed from outside, injected failures and crashes
retried on actors, clients finishing in any order, placement that cannot be met.

Every fault that a retry survives must leave the numbers of a run without it; the counts of
failed, late and replaced must be the ones the seeded fault draws predict. The runs without a
Ray fault are in this process (``LocalExecutor``, which gives Ray's numbers: see
tests/actors/test_executor.py): the reference runs the Ray runs are compared with, and the
driver's own bookkeeping of clients that fail every attempt, stragglers against a deadline
and device profiles (the simulated clock is the driver's, not Ray's).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import fedsim
from actors.executor import LocalExecutor
from fedsim.config import ConfigError
from fedsim.data.partition import sample_clients
from fedsim.devices import close_round, injected_failure

# every test here runs the engine, most on Ray actors: CI runs them, the quick loop does not
pytestmark = pytest.mark.slow

EXPERIMENT = "fedsim-faults"
# every task is 1 s late on the simulated clock; SLEEP makes it really sleep a quarter of that
# second (a Ray worker asleep in train for the killer to find: one scan of the processes takes
# milliseconds, and it scans every 0.05 s)
DELAYED = ["faults.delay_dist=constant", "faults.delay_s=1"]
SLEEP = ["faults.sleep_scale=0.25"]


def _numbers(history: list[dict]) -> list[dict]:
    def measured(k: str) -> bool:  # wall-clock times differ run to run; simulated ones do not
        return k.startswith("time/") and not k.startswith("time/simulated")

    skip = ("clients/actors_replaced",)
    return [{k: v for k, v in h.items() if k not in skip and not measured(k)} for h in history]


@pytest.fixture(scope="module")
def config(make_config, mlflow_store):
    def build(*overrides: str):
        uri = mlflow_store(EXPERIMENT)
        return make_config(
            f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", "rounds=3", *overrides
        )

    return build


@pytest.fixture(scope="module")
def baseline(config, restore_threads):
    """The run without faults, in this process: delayed like the runs it is compared with, but
    without really sleeping (sleeping never changes a number: the killed run, which sleeps,
    checks it)."""
    return fedsim.run(config(*DELAYED), executor=LocalExecutor())


def _our_training_worker() -> psutil.Process | None:
    """A Ray worker of this test session's cluster that is running ClientActor.train."""
    me = os.getpid()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::ClientActor.train"):
            try:
                if any(p.pid == me for p in proc.parents()):
                    return proc
            except psutil.NoSuchProcess:
                continue
    return None


def test_actor_killed_from_outside_is_replaced_and_changes_nothing(warm_ray, baseline, config):
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            proc = _our_training_worker()
            if proc is not None:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
            stop.wait(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        # asleep in train: a worker to kill
        result = fedsim.run(config(*DELAYED, *SLEEP), executor=warm_ray)
    finally:
        stop.set()
        thread.join()
    assert killed, "no training actor was found to kill"
    assert result.history[-1]["clients/actors_replaced"] >= 1
    assert all(h.get("clients/failed", 0) == 0 for h in result.history)
    assert _numbers(result.history) == _numbers(baseline.history)


def _expected_attempts(cfg, rounds: int) -> tuple[dict[int, int], int]:
    """Per round, how many clients fail every attempt; and the failed attempts of the rest."""
    failed: dict[int, int] = {}
    failed_attempts = 0
    for t in range(1, rounds + 1):
        failed[t] = 0
        for c in sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, t):
            tries = [injected_failure(cfg, t, c, a) for a in range(cfg.resources.max_retries + 1)]
            if all(tries):
                failed[t] += 1
            failed_attempts += tries.index(False) if not all(tries) else len(tries)
    return failed, failed_attempts


# a crash costs a new actor process (seconds each): 3 crashes (two in round 3) rather than 7
FAIL_PROB = {"raise": 0.3, "crash": 0.1}


@pytest.mark.parametrize("mode", ["raise", pytest.param("crash", marks=pytest.mark.slow)])
def test_injected_failures_are_retried_to_the_same_numbers(warm_ray, baseline, config, mode):
    cfg = config(
        *DELAYED,
        f"faults.fail_prob={FAIL_PROB[mode]}",
        f"faults.fail_mode={mode}",
        "resources.max_retries=4",
    )
    failed, attempts = _expected_attempts(cfg, cfg.rounds)
    assert attempts > 0 and not any(failed.values()), "pick a seed where retries succeed"
    result = fedsim.run(cfg, executor=warm_ray)
    assert _numbers(result.history) == _numbers(baseline.history)
    replaced = result.history[-1]["clients/actors_replaced"]
    assert replaced == (attempts if mode == "crash" else 0)


def test_clients_that_fail_every_attempt_are_counted_and_left_out(config, restore_threads):
    # in this process: the driver's count; a task failing on a Ray actor: the retry test above
    # and tests/fedsim/test_fail_loudly.py (every task fails, through `fedsim run`)
    cfg = config("faults.fail_prob=0.6", "resources.max_retries=0")
    failed, _ = _expected_attempts(cfg, cfg.rounds)
    assert any(failed.values())
    result = fedsim.run(cfg, executor=LocalExecutor())
    for t in range(1, cfg.rounds + 1):
        h = result.history[t]
        assert h["clients/failed"] == failed[t]
        rows = result.clients[t]
        assert sum(r["status"].startswith("failed") for r in rows) == failed[t]


def test_deadline_leaves_stragglers_out_of_the_round(config, restore_threads):
    cfg = config(
        "faults.delay_dist=exponential",
        "faults.delay_s=4",
        "round.deadline_s=4",
        "sharing.policy=all",
    )
    result = fedsim.run(cfg, executor=LocalExecutor())
    late_total = 0
    for t in range(1, cfg.rounds + 1):
        h, rows = result.history[t], result.clients[t]
        times = {r["client_id"]: r["simulated_s"] for r in rows}
        close = close_round(times, cfg.round.deadline_s, cfg.round.min_clients)
        assert sorted(r["client_id"] for r in rows if r["status"] == "late") == close.late
        assert h["clients/late"] == len(close.late)
        assert h["time/simulated_round_s"] == pytest.approx(close.seconds)
        on_time = [r for r in rows if r["status"] == "ok"]
        assert h["train/loss_mean"] == pytest.approx(np.mean([r["train_loss"] for r in on_time]))
        late_total += len(close.late)
    assert late_total > 0, "the seed gave no straggler; the test checks nothing"
    totals = np.cumsum([h["time/simulated_round_s"] for h in result.history[1:]])
    assert [h["time/simulated_total_s"] for h in result.history[1:]] == pytest.approx(totals)


def test_min_clients_keeps_the_round_open_past_the_deadline(config, restore_threads):
    cfg = config("round.deadline_s=0.001", "round.min_clients=2")
    result = fedsim.run(cfg, executor=LocalExecutor())
    for t in range(1, cfg.rounds + 1):
        rows = result.clients[t]
        assert sum(r["status"] == "ok" for r in rows) == 2
        second = sorted(r["simulated_s"] for r in rows)[1]
        assert result.history[t]["time/simulated_round_s"] == pytest.approx(second)


def test_finish_order_and_pool_size_do_not_change_the_numbers(warm_ray, config):
    """Random real sleeps shuffle the order clients finish on two actors; the reference runs
    every task in turn on one worker, in this process."""
    delays = ["faults.delay_dist=exponential", "faults.delay_s=1"]
    shuffled = fedsim.run(
        config(*delays, "faults.sleep_scale=0.5", "resources.actors=2"), executor=warm_ray
    )
    ordered = fedsim.run(config(*delays), executor=LocalExecutor())
    assert _numbers(shuffled.history) == _numbers(ordered.history)


def test_comm_totals_are_running_sums(baseline):
    for key in ("upload", "download"):
        per_round = [h[f"comm/{key}_bytes"] for h in baseline.history[1:]]
        totals = [h[f"comm/{key}_bytes_total"] for h in baseline.history[1:]]
        assert totals == list(np.cumsum(per_round)) and per_round[0] > 0


def test_device_profiles_drive_the_simulated_clock(config, restore_threads):
    slow = fedsim.run(
        config("devices.profiles={slow: {speed: 0.1, up_mbps: 1, down_mbps: 1}}"),
        executor=LocalExecutor(),
    )
    fast = fedsim.run(
        config("devices.profiles={fast: {speed: 10, up_mbps: 1000, down_mbps: 1000}}"),
        executor=LocalExecutor(),
    )
    for s, f in zip(slow.history[1:], fast.history[1:]):
        assert s["time/simulated_round_s"] > 50 * f["time/simulated_round_s"]
    assert {r["device"] for rows in slow.clients for r in rows} == {"slow"}


def test_placement_that_cannot_be_met_fails_fast_with_the_numbers(ray_address, config):
    """Two bundles on two distinct nodes of a one-node cluster: never placed, whatever is free,
    so the session's Ray serves (its warm pool, and that pool's placement group, stay)."""
    from ray.util import placement_group_table

    cfg = config(
        "resources.placement=strict_spread",
        "resources.actors=2",
        "resources.placement_timeout_s=1",
    )
    before = set(placement_group_table())
    with pytest.raises(ConfigError) as info:
        fedsim.run(cfg)
    assert info.value.key == "resources"
    assert "could not place 2 client actors" in str(info.value) and "nodes: 1" in str(info.value)
    tried = [pg for k, pg in placement_group_table().items() if k not in before]
    assert tried and all(pg["state"] == "REMOVED" for pg in tried)


def test_actors_still_waiting_for_room_are_not_started_once_the_run_stopped(ray_address, config):
    """A run whose check fails while its actors wait for room on the cluster (``fedsim run``
    places them in the background during its checks) stops the wait at once: the placement
    group is removed, no actor starts, and the error is not held back by
    ``resources.placement_timeout_s``."""
    from ray.util import placement_group_table

    from actors.pool import Cancelled, reserve

    # two bundles on two distinct nodes of a one-node cluster: they can never be placed
    cfg = config("resources.placement=strict_spread", "resources.placement_timeout_s=600")
    cancel, outcome = threading.Event(), {}

    def place() -> None:
        try:
            outcome["group"] = reserve(cfg, 2, cancel)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            outcome["error"] = exc

    before = set(placement_group_table())
    thread = threading.Thread(target=place)
    thread.start()
    for _ in range(300):  # the group exists and waits
        pending = [k for k, pg in placement_group_table().items() if k not in before]
        if pending:
            break
        time.sleep(0.1)
    assert pending and placement_group_table()[pending[0]]["state"] == "PENDING"
    cancel.set()
    thread.join(60)
    assert not thread.is_alive() and isinstance(outcome.get("error"), Cancelled), outcome
    assert placement_group_table()[pending[0]]["state"] == "REMOVED"
