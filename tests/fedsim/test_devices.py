"""Simulated devices, injected faults and the round deadline, against direct references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedsim.config import ConfigError, DeviceProfile, load_config
from fedsim.devices import (
    REFERENCE,
    assign_profiles,
    close_round,
    injected_failure,
    straggler_delay,
    task_seconds,
)


def _cfg(*overrides: str):
    return load_config(None, ["model.backbone=tiny", *overrides])


def test_no_profiles_means_every_client_is_the_reference_device():
    cfg = _cfg("clients.num=7", "clients.ranks=equal:4")
    assert assign_profiles(cfg) == [("reference", REFERENCE)] * 7


def test_profiles_are_drawn_with_their_shares_and_reproducibly():
    over = [
        "clients.num=4000",
        "clients.ranks=equal:4",
        "devices.profiles={phone: {share: 3, speed: 0.25}, laptop: {share: 1, speed: 2}}",
    ]
    first, again = assign_profiles(_cfg(*over)), assign_profiles(_cfg(*over))
    assert first == again
    phones = sum(name == "phone" for name, _ in first) / len(first)
    assert abs(phones - 0.75) < 0.03  # 4000 draws: 3 standard deviations is about 0.02
    assert {p.speed for _, p in first} == {0.25, 2.0}
    other_seed = assign_profiles(_cfg(*over, "seed=1"))
    assert other_seed != first


def test_task_seconds_is_download_compute_upload_and_delay():
    p = DeviceProfile(speed=0.5, up_mbps=8.0, down_mbps=16.0)
    # 2 MB down at 16 Mbit/s = 1 s; 10 steps x 0.3 s / 0.5 = 6 s; 1 MB up at 8 Mbit/s = 1 s
    assert task_seconds(p, 0.3, 10, 1_000_000, 2_000_000, 2.5) == pytest.approx(1 + 6 + 1 + 2.5)


@pytest.mark.parametrize(
    "dist, check",
    [
        ("constant", lambda d: np.allclose(d, 4.0)),
        ("uniform", lambda d: d.min() >= 0 and d.max() <= 8 and abs(d.mean() - 4) < 0.15),
        ("exponential", lambda d: d.min() >= 0 and abs(d.mean() - 4) < 0.2),
        ("lognormal", lambda d: abs(np.median(d) - 4) < 0.25 and abs(np.log(d).std() - 0.5) < 0.03),
    ],
)
def test_delay_distributions_have_their_moments(dist, check):
    cfg = _cfg(f"faults.delay_dist={dist}", "faults.delay_s=4", "faults.delay_sigma=0.5")
    d = np.array([straggler_delay(cfg, r, c) for r in range(1, 11) for c in range(400)])
    assert check(d)
    again = np.array([straggler_delay(cfg, r, c) for r in range(1, 11) for c in range(400)])
    assert np.array_equal(d, again)


def test_delay_prob_delays_that_share_of_tasks_and_none_means_no_delay():
    cfg = _cfg("faults.delay_dist=constant", "faults.delay_s=1", "faults.delay_prob=0.2")
    d = np.array([straggler_delay(cfg, r, c) for r in range(1, 6) for c in range(1000)])
    assert set(np.unique(d)) == {0.0, 1.0}
    assert abs((d > 0).mean() - 0.2) < 0.02
    assert straggler_delay(_cfg(), 1, 0) == 0.0


def test_injected_failures_happen_at_the_rate_and_differ_by_attempt():
    cfg = _cfg("faults.fail_prob=0.3")
    draws = np.array(
        [
            [injected_failure(cfg, r, c, a) for a in range(3)]
            for r in range(1, 6)
            for c in range(600)
        ]
    )
    assert abs(draws.mean() - 0.3) < 0.02
    # attempts are independent draws: a retry of a failed task usually succeeds
    assert abs(draws[draws[:, 0], 1].mean() - 0.3) < 0.05
    assert not injected_failure(_cfg(), 1, 0, 0)


def _close_by_timeline(times: dict[int, float], deadline: float, min_clients: int):
    """Slow reference: walk the reports in time order and close like a server would."""
    if not times:
        return [], [], 0.0
    events = sorted((t, c) for c, t in times.items())
    got: list[int] = []
    closed_at = None
    for t, c in events:
        if deadline > 0 and t > deadline and len(got) >= min_clients:
            # the deadline passed, or the min_clients-th report came after it
            closed_at = max(deadline, events[len(got) - 1][0])
            break
        got.append(c)
    if closed_at is None:
        closed_at = events[len(got) - 1][0]
    late = [c for _, c in events if c not in got]
    return sorted(got), sorted(late), closed_at


def test_close_round_matches_a_timeline_reference_on_many_cases():
    rng = np.random.default_rng(0)
    for n, deadline, min_clients in itertools.product(
        [1, 2, 5, 9], [0.0, 0.5, 2.0, 5.0, 100.0], [1, 2, 4]
    ):
        if min_clients > n:
            continue
        for _ in range(20):
            times = {
                int(c): float(t) for c, t in zip(rng.permutation(50)[:n], rng.exponential(2, n))
            }
            got = close_round(times, deadline, min_clients)
            ref = _close_by_timeline(times, deadline, min_clients)
            assert (got.on_time, got.late) == (ref[0], ref[1])
            assert math.isclose(got.seconds, ref[2])


def test_close_round_cases_by_hand():
    times = {3: 1.0, 1: 2.0, 7: 9.0}
    assert close_round(times, 0, 1).on_time == [1, 3, 7]
    assert close_round(times, 0, 1).seconds == 9.0
    r = close_round(times, 5.0, 1)
    assert (r.on_time, r.late, r.seconds) == ([1, 3], [7], 5.0)
    r = close_round(times, 0.5, 2)  # nobody by the deadline: wait for the 2 fastest
    assert (r.on_time, r.late, r.seconds) == ([1, 3], [7], 2.0)
    assert close_round({}, 5.0, 1).on_time == []


@pytest.mark.parametrize(
    "override, key",
    [
        ("faults.fail_prob=1.5", "faults.fail_prob"),
        ("faults.delay_dist=exponential", "faults.delay_s"),
        ("round.deadline_s=-1", "round.deadline_s"),
        ("round.min_clients=9", "round.min_clients"),
        ("devices.profiles={a: {speed: 0}}", "devices.profiles.a.speed"),
        ("devices.profiles={a: {share: 0}}", "devices.profiles"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("resources.placement=diagonal", "resources.placement"),
    ],
)
def test_bad_fault_round_device_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        _cfg("clients.num=10", "clients.fraction=0.4", override)
    assert info.value.key == key
