"""The one round loop on Ray actors and in this process: the same numbers, the same failures."""

from __future__ import annotations

import pytest
import torch

import fedsim
from actors.executor import LocalExecutor
from fedsim.checkpoint.disk import load_checkpoint
from fedsim.config import ConfigError
from fedsim.errors import RunFailed

# Ray against in-process, run by run: CI runs them, the quick loop does not
pytestmark = pytest.mark.slow


def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


def _row(row: dict) -> dict:
    """A client-table row without its timing and Ray node; NaN made comparable."""
    return {k: ("nan" if v != v else v) for k, v in row.items() if k not in ("time_s", "node_id")}


def _tensors(tree) -> list[tuple[str, torch.Tensor]]:
    out = []

    def walk(x, key=""):
        if isinstance(x, dict):
            for k, v in sorted(x.items(), key=lambda kv: str(kv[0])):
                walk(v, f"{key}/{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")
        elif isinstance(x, torch.Tensor):
            out.append((key, x))

    walk(tree)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective.method=scaffold", "train.optimizer=sgd", "train.lr=0.05"),
        ("aggregation.method=flora", "editing.enabled=false", "sharing.policy=all"),
        # a fold of the frozen weights per task, undone before the actor's next client
        ("fedplora.enabled=true",),
    ],
    ids=["scaffold", "flora", "fedplora"],
)
def test_in_process_run_equals_the_ray_run(warm_ray, experiment_config, overrides):
    build = experiment_config("fedsim-executor")
    # round 2 edits (threshold 1): the editing hooks run on both paths
    cfg = build("rounds=2", "editing.threshold=1.0", *overrides)
    # SCAFFOLD on new actors, FLoRA on the actors SCAFFOLD leaves in the session's warm pool
    # (which gives the numbers of new actors: tests/actors/test_warm_pool.py); the pool starts
    # its actors as a plain RayExecutor does, so the FLoRA run pays no start-up of its own
    fresh = "scaffold" in overrides[0]
    if fresh:
        warm_ray.release()  # whatever the pool kept goes: these actors are new processes
    on_ray = fedsim.run(cfg, executor=warm_ray)
    assert not (fresh and warm_ray._kept.reused)
    local = fedsim.run(cfg, executor=LocalExecutor())
    assert _numbers(local) == _numbers(on_ray)
    # the client tables too, but for the timings and the Ray node
    assert len(local.clients) == len(on_ray.clients) == 3
    for a, b in zip(local.clients, on_ray.clients):
        assert [_row(r) for r in a] == [_row(r) for r in b]
    ours, theirs = load_checkpoint(local.run_dir), load_checkpoint(on_ray.run_dir)
    for (ka, a), (kb, b) in zip(_tensors(ours.server), _tensors(theirs.server), strict=True):
        assert ka == kb and torch.equal(a, b), ka
    assert ours.clients.keys() == theirs.clients.keys()
    for cid in ours.clients:
        pairs = zip(_tensors(ours.clients[cid]), _tensors(theirs.clients[cid]), strict=True)
        assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in pairs), cid


def test_in_process_retries_a_failed_task_to_the_same_numbers(experiment_config):
    build = experiment_config("fedsim-executor-faults")
    clean = fedsim.run(build("rounds=2"), executor=LocalExecutor())
    faulty = fedsim.run(
        build("rounds=2", "faults.fail_prob=0.5", "resources.max_retries=20"),
        executor=LocalExecutor(),
    )
    assert all(h.get("clients/failed", 0) == 0 for h in faulty.history)
    quality = ("global/", "personalized/", "train/")
    assert [{k: v for k, v in h.items() if k.startswith(quality)} for h in faulty.history] == [
        {k: v for k, v in h.items() if k.startswith(quality)} for h in clean.history
    ]


def test_in_process_counts_a_task_that_fails_every_attempt(experiment_config):
    build = experiment_config("fedsim-executor-faults")
    cfg = build(
        "rounds=3", "faults.fail_prob=1.0", "resources.max_retries=1", "round.max_empty_rounds=2"
    )
    with pytest.raises(RunFailed) as info:
        fedsim.run(cfg, executor=LocalExecutor())
    assert "rounds 1-2 merged no client update (round 2: 3 failed" in str(info.value)
    assert "faults.fail_prob: injected failure" in str(info.value)


def test_a_crashing_fault_is_refused_in_process(experiment_config):
    cfg = experiment_config("fedsim-executor-faults")(
        "faults.fail_prob=0.1", "faults.fail_mode=crash"
    )
    with pytest.raises(ConfigError) as info:
        fedsim.run(cfg, executor=LocalExecutor())
    assert info.value.key == "faults.fail_mode"
