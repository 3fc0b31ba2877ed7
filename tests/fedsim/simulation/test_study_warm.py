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


@pytest.mark.slow  # three tiny runs on Ray
def test_a_resumed_study_runs_only_what_did_not_finish_and_gives_the_same_table(
    warm_ray, tmp_path, tiny_overrides, mlflow_store, capsys, restore_threads
):
    from mlflow import MlflowClient

    uri = mlflow_store("fedsim-study-resume")
    (tmp_path / "base.yaml").write_text("rounds: 1\n")
    study = {
        "base": "base.yaml",
        "overrides": [
            *tiny_overrides,
            "rounds=2",
            f"tracking.uri={uri}",
            "tracking.experiment=fedsim-study-resume",
        ],
        "seeds": [0],
        "variants": {"fedilora": [], "zeropad": ["aggregation.method=zeropad"]},
        "output": str(tmp_path / "out.md"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    whole = run_study(path, quiet=True, pool=warm_ray)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fedsim-study-resume")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    # as if the study had been stopped while zeropad ran: its run did not finish
    client.set_terminated(children["zeropad seed=0"].info.run_id, "KILLED")
    client.set_terminated(parent.info.run_id, "KILLED")
    capsys.readouterr()

    again = run_study(path, pool=warm_ray, resume=True)
    out = capsys.readouterr().out
    assert f"resuming: 1 of 2 runs finished in MLflow parent run {parent.info.run_id}" in out
    assert "[1/1] zeropad seed=0" in out and "fedilora seed=0:" not in out
    assert again == whole  # the table: the finished run read back, the other run again
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    names = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert names == ["fedilora seed=0", "zeropad seed=0", "zeropad seed=0"]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    # every run finished: nothing runs; a changed setting runs again (its digest differs)
    capsys.readouterr()
    assert run_study(path, pool=warm_ray, resume=True, quiet=True) == whole
    changed = run_study(path, ["train.lr=0.01"], pool=warm_ray, resume=True)
    assert "resuming: 0 of 2 runs finished" in capsys.readouterr().out
    assert changed != whole


def test_resume_must_be_a_flag(tmp_path):
    from fedsim.config import ConfigError

    with pytest.raises(ConfigError, match="resume"):
        run_study(tmp_path / "study.yaml", resume="yes")
