"""A warm pool (``RayExecutor(keep_actors=True)``): later runs take over the earlier runs'
actor processes and give the numbers of fresh actors, bit for bit, also after a run that
failed, a crashed actor and an actor killed between runs."""

from __future__ import annotations

import pytest
import ray
import torch

import fedsim
from actors.executor import LocalExecutor, RayExecutor
from fedsim.checkpoint.disk import load_checkpoint
from fedsim.errors import RunFailed

# whole runs on Ray: CI runs them, the quick loop does not
pytestmark = pytest.mark.slow

SCAFFOLD = ("objective.method=scaffold", "train.optimizer=sgd", "train.lr=0.05")
FLORA = ("aggregation.method=flora", "editing.enabled=false", "sharing.policy=all", "seed=3")


def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


def _same_run(a, b) -> None:
    """Same metrics, same final server state and client states, tensor for tensor."""
    assert _numbers(a) == _numbers(b)
    ours, theirs = load_checkpoint(a.run_dir), load_checkpoint(b.run_dir)
    assert torch.equal(
        torch.cat([t.flatten() for t in _flat(ours.server)]),
        torch.cat([t.flatten() for t in _flat(theirs.server)]),
    )
    assert ours.clients.keys() == theirs.clients.keys()
    for cid in ours.clients:
        for x, y in zip(_flat(ours.clients[cid]), _flat(theirs.clients[cid]), strict=True):
            assert torch.equal(x, y), cid


def _flat(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _flat(tree[k])]
    if isinstance(tree, list | tuple):
        return [t for x in tree for t in _flat(x)]
    return [tree.float()] if isinstance(tree, torch.Tensor) else []


def _actor_ids(executor: RayExecutor) -> list[str]:
    """The kept actors the last run used, in slot order."""
    return [a._actor_id.hex() for a in executor._kept.actors]


@pytest.fixture(scope="module")
def build(experiment_config):
    return experiment_config("fedsim-warm-pool")


@pytest.fixture(scope="module")
def reference(build):
    """The FLoRA run in this process (which gives the numbers of fresh Ray actors:
    tests/actors/test_executor.py)."""
    return fedsim.run(build("rounds=2", *FLORA), executor=LocalExecutor())


def test_later_runs_reuse_the_actors_and_give_fresh_numbers(warm_ray, build, reference):
    warm = warm_ray  # the session's pool: whatever ran before, a run leaves its actors
    fedsim.run(build("rounds=1", *SCAFFOLD), executor=warm)
    first = _actor_ids(warm)
    again = fedsim.run(build("rounds=2", *FLORA), executor=warm)
    assert _actor_ids(warm) == first  # the same processes served the second run
    _same_run(again, reference)
    # a run that needs fewer actors uses some and keeps the others as spares
    fedsim.run(build("rounds=1", "resources.actors=1"), executor=warm)
    assert _actor_ids(warm) == first[:1] and len(warm._kept.spare) == 1
    # other per-actor resources: new actors, the kept ones are stopped
    fedsim.run(build("rounds=1", "resources.client.num_cpus=0.5"), executor=warm)
    assert not set(_actor_ids(warm)) & set(first)


def test_after_a_failed_run_and_crashed_actors_the_numbers_are_fresh(warm_ray, build, reference):
    # every task crashes its actor (replaced each time) and the run fails
    crash = ("faults.fail_prob=1.0", "faults.fail_mode=crash", "resources.max_retries=0")
    with pytest.raises(RunFailed):
        fedsim.run(build("rounds=1", "round.max_empty_rounds=1", *crash), executor=warm_ray)
    again = fedsim.run(build("rounds=2", *FLORA), executor=warm_ray)
    _same_run(again, reference)


def test_an_actor_killed_between_runs_is_replaced(ray_cluster, build, reference):
    with RayExecutor(keep_actors=True) as warm:
        fedsim.run(build("rounds=1", *SCAFFOLD), executor=warm)
        before = _actor_ids(warm)
        ray.kill(warm._kept.actors[0])
        again = fedsim.run(build("rounds=2", *FLORA), executor=warm)
        after = _actor_ids(warm)
        assert after[0] != before[0] and after[1:] == before[1:]
        _same_run(again, reference)
    assert warm._kept is None and ray.is_initialized()  # the session's Ray stays up
