"""Simulated devices and injected faults: a seeded, reproducible clock for every client task.

Every client has a device profile (compute speed, upload and download bandwidth), drawn once
from ``devices.profiles`` with their shares. A client task's simulated duration is

    download_bytes / down_rate + steps * devices.step_s / speed + upload_bytes / up_rate + delay

where ``delay`` is the straggler delay that ``faults.delay_*`` injects. All draws are
counter-based (seed, stream, round, client[, attempt]), so they are the same on every node,
whatever the pool size or the order in which clients finish. :func:`close_round` applies
``round.deadline_s`` and ``round.min_clients`` to those durations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.config import DeviceProfile, FedSimConfig
from fedsim.data.partition import rng_for

_PROFILES, _DELAY, _FAIL = 301, 302, 303
REFERENCE = DeviceProfile()


class InjectedFault(RuntimeError):
    """A client task failure that ``faults.fail_prob`` asked for."""


def assign_profiles(cfg: FedSimConfig) -> list[tuple[str, DeviceProfile]]:
    """Each client's ``(profile name, profile)``, a seeded draw with the configured shares."""
    n = cfg.clients.num
    profiles = cfg.devices.profiles
    if not profiles:
        return [("reference", REFERENCE)] * n
    names = sorted(profiles)
    shares = np.array([profiles[k].share for k in names], dtype=float)
    picks = rng_for(cfg.seed, _PROFILES).choice(len(names), size=n, p=shares / shares.sum())
    return [(names[i], profiles[names[i]]) for i in picks]


def straggler_delay(cfg: FedSimConfig, round_idx: int, client_id: int) -> float:
    """Extra simulated seconds of ``client_id``'s task in ``round_idx`` (0 if not delayed)."""
    f = cfg.faults
    if f.delay_dist == "none" or f.delay_s <= 0:
        return 0.0
    rng = rng_for(cfg.seed, _DELAY, round_idx, client_id)
    delayed, u = rng.random(), rng.random()  # always two draws: the stream never shifts
    if delayed >= f.delay_prob:
        return 0.0
    if f.delay_dist == "constant":
        return f.delay_s
    if f.delay_dist == "uniform":
        return 2.0 * f.delay_s * u
    if f.delay_dist == "exponential":
        return -f.delay_s * float(np.log1p(-u))
    # lognormal with median delay_s: exp(log(median) + sigma * z), z from the same uniform
    from scipy.special import ndtri

    return f.delay_s * float(np.exp(f.delay_sigma * ndtri(min(max(u, 1e-12), 1 - 1e-12))))


def injected_failure(cfg: FedSimConfig, round_idx: int, client_id: int, attempt: int) -> bool:
    """Whether attempt ``attempt`` (0 first) of a client task fails on purpose."""
    p = cfg.faults.fail_prob
    return p > 0 and rng_for(cfg.seed, _FAIL, round_idx, client_id, attempt).random() < p


def task_seconds(
    profile: DeviceProfile, step_s: float, steps: int, up_bytes: int, down_bytes: int, delay: float
) -> float:
    """Simulated duration of one client task on ``profile`` (see the module docstring)."""
    down = down_bytes * 8 / (profile.down_mbps * 1e6)
    up = up_bytes * 8 / (profile.up_mbps * 1e6)
    return down + steps * step_s / profile.speed + up + delay


@dataclass
class RoundClose:
    """When a round closed on the simulated clock, and who made it.

    Attributes:
        on_time: clients whose updates the round uses, by client id.
        late: clients that reported after the round closed.
        seconds: simulated length of the round.
    """

    on_time: list[int]
    late: list[int]
    seconds: float


def close_round(times: dict[int, float], deadline_s: float, min_clients: int) -> RoundClose:
    """Apply the deadline: the round closes at ``deadline_s`` if ``min_clients`` reported by
    then, otherwise when the ``min_clients``-th client reports (or the last one, if fewer).

    Args:
        times: simulated duration of each successful client task.
        deadline_s: the round's deadline (0: none, wait for everyone).
        min_clients: how many reports the round waits for past the deadline.
    """
    order = sorted(times, key=lambda c: (times[c], c))
    if not order:
        return RoundClose([], [], 0.0)
    if deadline_s <= 0:
        return RoundClose(sorted(order), [], times[order[-1]])
    made_it = [c for c in order if times[c] <= deadline_s]
    if len(made_it) < min_clients:
        made_it = order[:min_clients]
        seconds = times[made_it[-1]]
    else:
        seconds = deadline_s if len(made_it) < len(order) else times[order[-1]]
    late = sorted(set(order) - set(made_it))
    return RoundClose(sorted(made_it), late, seconds)
