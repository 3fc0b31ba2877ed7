"""Fractional GPUs on a Ray node that declares GPUs it does not have (CI has none).

A separate process starts its own Ray with one declared GPU and runs the tiny config with
0.5 GPU per client actor: the placement group must pack two actors onto that one GPU, and the
workers, which find no CUDA device, must train on the CPU and finish the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.util import placement_group_table
    import fedsim
    from fedsim.config import load_config
    from actors.executor import RayExecutor

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    cfg = load_config(None, sys.argv[1:])
    with RayExecutor(keep_actors=True) as executor:  # keeps the run's pool to look at
        result = fedsim.run(cfg, executor=executor)
        size = len(executor._kept.actors)
        table = placement_group_table(executor._kept.group)
    print("RESULT " + json.dumps({
        "size": size,
        "bundles": list(table["bundles"].values()),
        "strategy": table["strategy"],
        "final_round": result.history[-1]["round"],
        "failed": sum(h.get("clients/failed", 0) for h in result.history),
    }))
    """
)


@pytest.mark.slow  # its own Ray instance in a subprocess
def test_fractional_gpus_pack_two_actors_on_one_declared_gpu(
    tiny_overrides, new_mlflow_db, tmp_path
):
    args = [
        *tiny_overrides,
        "resources.client.num_gpus=0.5",
        "resources.client.num_cpus=0.5",
        "rounds=1",
        # a copy of a built store: creating one (MLflow's migrations) costs seconds
        f"tracking.uri={new_mlflow_db(tmp_path)}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-4000:]
    got = json.loads(lines[0].removeprefix("RESULT "))
    assert got["size"] == 2  # one GPU at 0.5 per actor fits two (CPU would fit four)
    assert got["bundles"] == [{"CPU": 0.5, "GPU": 0.5}] * 2
    assert got["strategy"] == "PACK"
    assert got["final_round"] == 1 and got["failed"] == 0
