"""GPU-facing code paths exercised on the CPU: bf16 autocast and fractional-GPU placement."""

from __future__ import annotations

import numpy as np
import pytest

from actors.client import ClientWorker
from actors.pool import pool_size
from fedsim.config import ConfigError
from fedsim.messages import Broadcast, ClientTask


def test_bf16_training_and_evaluation_run_and_stay_finite(make_config):
    worker = ClientWorker(make_config("train.precision=bf16"))
    broadcast = Broadcast(adapter=worker.initial_global())
    report, upload, _ = worker.train(ClientTask(0, 8, 1), broadcast)
    update = upload.update
    assert np.isfinite(report.train_loss)
    assert np.isfinite(report.personalized["loss"])
    assert all(v.isfinite().all() for v in update.values())
    assert all(v.dtype == next(iter(update.values())).dtype for v in update.values())


def test_fractional_gpus_on_a_cluster_without_gpus_fail_fast_with_the_numbers(
    ray_cluster, make_config
):
    cfg = make_config("resources.client.num_gpus=0.25")
    with pytest.raises(ConfigError) as info:
        pool_size(cfg, max_tasks=3)
    assert info.value.key == "resources.client"
    assert "num_gpus=0.25" in str(info.value) and "0 GPUs" in str(info.value)


def test_pool_size_packs_fractional_cpus_and_respects_the_cap(ray_cluster, make_config):
    # 2 CPUs at 0.5 each fit 4 actors; demand (3 tasks) and resources.actors cap it.
    assert pool_size(make_config("resources.client.num_cpus=0.5"), max_tasks=3) == 3
    assert pool_size(make_config("resources.client.num_cpus=0.5", "resources.actors=2"), 9) == 2
    assert pool_size(make_config("resources.client.num_cpus=1"), max_tasks=9) == 2
