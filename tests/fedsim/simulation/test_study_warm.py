"""A study's runs share one warm pool on Ray: the second run takes over the first run's actor
processes (and their node's shared frozen backbone) and still gives the numbers of fresh actors,
bit for bit."""

from __future__ import annotations

import pytest
import yaml

import fedsim.simulation.run as run_module
from actors.executor import LocalExecutor
from fedsim.simulation.study import run_study


def _numbers(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]


@pytest.mark.slow  # two runs on Ray: CI runs it, the quick loop does not
def test_a_studys_runs_reuse_the_actors_and_give_fresh_numbers(
    warm_ray, tmp_path, tiny_overrides, mlflow_store, monkeypatch, restore_threads
):
    uri = mlflow_store("fedsim-study-warm")
    (tmp_path / "base.yaml").write_text("rounds: 1\n")
    study = {
        "base": "base.yaml",
        "overrides": [*tiny_overrides, "rounds=1", f"tracking.uri={uri}"],
        "seeds": [0],
        "variants": {"fedilora": [], "zeropad": ["aggregation.method=zeropad"]},
        "output": str(tmp_path / "out.md"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    real_run = run_module.run
    seen = []  # (config, result, the actor processes that served it)

    def recording(cfg, executor, **kwargs):
        result = real_run(cfg, executor=executor, **kwargs)
        ids = [a._actor_id.hex() for a in executor._kept.actors]
        seen.append((cfg, result, ids))
        return result

    monkeypatch.setattr(run_module, "run", recording)
    run_study(path, quiet=True, pool=warm_ray)
    assert warm_ray._kept is not None  # a pool handed in stays warm
    assert len(seen) == 2
    assert seen[0][2] == seen[1][2]  # the same processes served both runs
    for cfg, result, _ in seen:
        fresh = real_run(cfg, executor=LocalExecutor(), quiet=True)  # fresh actors' numbers
        assert _numbers(result) == _numbers(fresh), cfg.tracking.run_name


def test_a_pool_that_is_no_warm_pool_is_named(tmp_path):
    from fedsim.config import ConfigError

    with pytest.raises(ConfigError, match="pool: expected fedsim.warm_pool"):
        run_study(tmp_path / "study.yaml", pool=LocalExecutor())


def test_warm_pool_is_a_ray_executor_that_keeps_its_actors():
    import fedsim
    from actors.executor import RayExecutor

    pool = fedsim.warm_pool()
    assert isinstance(pool, RayExecutor) and pool.keep_actors
    pool.shutdown()  # nothing started: nothing to stop
