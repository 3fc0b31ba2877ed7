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
    # an actor killed between runs is replaced; the others serve on
    ray.kill(warm._kept.actors[0])
    again = fedsim.run(build("rounds=2", *FLORA), executor=warm)
    replaced = _actor_ids(warm)
    assert replaced[0] != first[0] and replaced[1:] == first[1:]
    _same_run(again, reference)
    # the one sampled client's task crashes its actor (replaced) and the run fails; the one
    # actor it used and the spare serve the next run, which is fresh
    crash = ("faults.fail_prob=1.0", "faults.fail_mode=crash", "resources.max_retries=0")
    with pytest.raises(RunFailed):
        one = ("clients.fraction=0.17", "round.max_empty_rounds=1")  # 1 of 6 clients a round
        fedsim.run(build("rounds=1", *one, *crash), executor=warm)
    assert len(warm._kept.actors) == 1 and len(warm._kept.spare) == 1
    again = fedsim.run(build("rounds=2", *FLORA), executor=warm)
    _same_run(again, reference)
    # a run that needs fewer actors uses some and keeps the others as spares
    kept = _actor_ids(warm)
    fedsim.run(build("rounds=1", "resources.actors=1"), executor=warm)
    assert _actor_ids(warm) == kept[:1] and len(warm._kept.spare) == 1
    # other per-actor resources: new actors, the kept ones are stopped. One new actor (one
    # start-up): the two kept ones could serve one by their number, so only their resources
    # make the pool start it (three would not fit the two kept ones whatever the resources)
    old = [*warm._kept.actors, *warm._kept.spare]
    fedsim.run(
        build("rounds=1", "resources.client.num_cpus=0.5", "resources.actors=1"), executor=warm
    )
    assert len(_actor_ids(warm)) == 1 and not set(_actor_ids(warm)) & set(kept)
    _stopped(old)
    # release() stops the kept actors and leaves Ray up (leaving the `with` block of a
    # RayExecutor(keep_actors=True) stops them too, and a Ray the executor started)
    actors = list(warm._kept.actors)
    warm.release()
    assert warm._kept is None and ray.is_initialized()
    _stopped(actors)


def _stopped(actors: list) -> None:
    """Every one of ``actors`` is gone (a call on it fails as on a dead actor)."""
    assert actors
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ping.remote(), timeout=30)
