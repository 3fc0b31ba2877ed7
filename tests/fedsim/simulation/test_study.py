"""``fedsim compare`` / ``fedsim sweep``: cells x variants x seeds, nested MLflow runs, table."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fedsim.config import ConfigError
from fedsim.simulation.study import format_grid, format_table, grid_cells, load_study, run_study


def _write_study(tmp_path, tiny_overrides, uri, **extra):
    base = tmp_path / "base.yaml"
    base.write_text("rounds: 1\n")
    study = {
        "base": "base.yaml",
        "overrides": [
            *tiny_overrides,
            "rounds=1",
            "editing.enabled=false",
            f"tracking.uri={uri}",
            "tracking.experiment=fedsim-study",
        ],
        "seeds": [0],
        "last_rounds": 1,
        "output": str(tmp_path / "out.md"),
        "variants": {"FedAvg": ["server.optimizer=fedavg"], "local": ["sharing.policy=none"]},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_grid_cells_are_the_union_of_products(tmp_path, tiny_overrides):
    path = _write_study(
        tmp_path,
        tiny_overrides,
        "sqlite:///unused.db",
        grids=[
            {"data.scenario": ["aligned"], "data.alpha": [5.0, 0.5]},
            {"data.scenario": ["cross"], "data.cross_ratio": ["3:7"]},
        ],
    )
    study, _ = load_study(path)
    cells = grid_cells(study)
    assert [label for label, _ in cells] == [
        "scenario=aligned alpha=5.0",
        "scenario=aligned alpha=0.5",
        "scenario=cross cross_ratio=3:7",
    ]


def test_a_study_with_a_bad_run_fails_before_anything_runs(tmp_path, tiny_overrides):
    path = _write_study(tmp_path, tiny_overrides, "sqlite:///unused.db", grids=[{"rounds": [-1]}])
    with pytest.raises(ConfigError) as info:
        run_study(path)
    assert info.value.key == "rounds"


@pytest.mark.slow  # four runs: CI runs it, the quick loop does not
def test_sweep_nests_runs_under_a_parent_and_writes_the_table(
    ray_address, tmp_path, tiny_overrides, mlflow_store, monkeypatch, restore_threads
):
    # The study's own work (the plan, the parent run, the nesting, the table) is what is tested
    # here; its runs are the real fedsim.simulation.run.run, in this process (LocalExecutor gives
    # Ray's numbers; tests/actors/test_executor.py compares the two). ray_address: the study
    # still joins Ray (init_ray) before its first run.
    import fedsim.simulation.run as run_module
    from actors.executor import LocalExecutor, RayExecutor

    real_run = run_module.run
    in_process: list[str] = []
    pools: set[int] = set()

    def run_in_process(cfg, executor, **kwargs):
        # the study hands every run the same warm pool (tested on Ray: test_study_warm.py)
        assert isinstance(executor, RayExecutor) and executor.keep_actors
        pools.add(id(executor))
        in_process.append(cfg.tracking.run_name)
        return real_run(cfg, **kwargs, executor=LocalExecutor())

    monkeypatch.setattr(run_module, "run", run_in_process)
    uri = mlflow_store("fedsim-study")
    path = _write_study(
        tmp_path,
        tiny_overrides,
        uri,
        grids=[{"data.scenario": ["aligned", "hybrid"]}],
        more_metrics=["personalized/accuracy_mean"],
    )
    table = run_study(path)
    assert "| scenario=aligned |" in table and "| scenario=hybrid |" in table
    assert "`global/accuracy`:" in table and "`personalized/accuracy_mean`:" in table
    assert "local shares nothing with the server" in table
    assert (tmp_path / "out.md").read_text() == table
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fedsim-study")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "study study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4  # 2 cells x 2 variants x 1 seed
    assert sorted(in_process) == sorted(c.info.run_name for c in children)
    assert len(pools) == 1
    assert {c.data.params["data.scenario"] for c in children} == {"aligned", "hybrid"}


def test_grid_tables_hold_each_metrics_mean_over_the_last_rounds(tmp_path, tiny_overrides):
    path = _write_study(
        tmp_path,
        tiny_overrides,
        "sqlite:///unused.db",
        grids=[{"data.alpha": [5.0, 0.5]}],
        more_metrics=["personalized/accuracy_mean"],
        last_rounds=2,
        seeds=[0, 1],
    )
    study, _ = load_study(path)

    class Run:  # what format_grid reads of a RunResult
        def __init__(self, acc, pers):
            self.history = [{"global/accuracy": 0.0}] + [
                {"global/accuracy": a, "personalized/accuracy_mean": p} for a, p in zip(acc, pers)
            ]

    results = {
        ("alpha=5.0", "FedAvg"): [
            Run([0.1, 0.5, 0.7], [0.2, 0.2, 0.4]),
            Run([0, 0.3, 0.5], [0] * 3),
        ],
        ("alpha=0.5", "FedAvg"): [Run([0.9] * 3, [0.8] * 3)] * 2,
        ("alpha=5.0", "local"): [Run([0.04] * 3, [0.6] * 3)] * 2,
        ("alpha=0.5", "local"): [Run([0.04] * 3, [0.7] * 3)] * 2,
    }
    table = format_grid(results, study, 3, ["rounds=3"], untrained=["local"])
    glob, pers = table.split("`personalized/accuracy_mean`:")
    # seed 0: mean(0.5, 0.7) = 0.6, seed 1: mean(0.3, 0.5) = 0.4 -> 0.500 +- 0.100
    assert "| alpha=5.0 | 0.500 ± 0.100 | 0.040 ± 0.000 |" in glob
    assert "| alpha=0.5 | 0.900 ± 0.000 | 0.040 ± 0.000 |" in glob
    assert "| alpha=5.0 | 0.150 ± 0.150 | 0.600 ± 0.000 |" in pers
    assert "| alpha=0.5 | 0.800 ± 0.000 | 0.700 ± 0.000 |" in pers
    assert "last 2 of 3 rounds; extra overrides: rounds=3." in table
    assert "local shares nothing with the server" in table
    assert "shares nothing" not in format_grid(results, study, 3, [])


def test_a_table_without_grids_shows_the_further_metrics(tmp_path, tiny_overrides):
    path = _write_study(
        tmp_path,
        tiny_overrides,
        "sqlite:///unused.db",
        more_metrics=["privacy/epsilon"],
        last_rounds=2,
        seeds=[0],
    )
    study, _ = load_study(path)

    class Run:  # what format_table reads of a RunResult
        history = [{"global/accuracy": 0.0, "comm/upload_bytes": 0}] + [
            {"global/accuracy": 0.5, "privacy/epsilon": e, "comm/upload_bytes": 2e6}
            for e in (1.0, 2.0, 4.0)
        ]

    table = format_table({"DP": [Run()]}, study, 3, [])
    assert "| method | global acc |" in table and "| privacy/epsilon |" in table.splitlines()[0]
    assert "| 3.000 ± 0.000 |" in table  # mean of the last 2 rounds' epsilon
