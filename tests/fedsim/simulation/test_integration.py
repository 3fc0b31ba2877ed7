"""End to end on a real local Ray and a real SQLite MLflow store: one run, checked many ways.

A tiny backbone, 6 clients of ranks 8, 8, 4, 4, 2, 2, half of them sampled per round, 2
rounds, and one client sampled in round 1 that uploads NaN: its update must be rejected, counted
and logged, never merged. The same simulation on one actor must give the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import fedsim
from actors.executor import LocalExecutor
from fedsim.config import ConfigError, load_config
from fedsim.data.federated import Batcher, FederatedData, load_dataset
from fedsim.data.partition import sample_clients
from fedsim.models.backbone import build_backbone
from fedsim.tasks.evaluation import classification_metrics, predict

# one end-to-end run on Ray actors (and its twins): CI runs them, the quick loop does not
pytestmark = pytest.mark.slow

EXPERIMENT = "fedsim-integration"
ROUNDS = 2


@pytest.fixture(scope="module")
def nan_client(make_config) -> int:
    cfg = make_config()
    sampled = sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, 1)
    return sampled[len(sampled) // 2]


@pytest.fixture(scope="module")
def run_config(make_config, mlflow_store, nan_client):
    def build(*overrides: str):
        return make_config(
            f"rounds={ROUNDS}",
            f"faults.nan_update_clients=[{nan_client}]",
            f"tracking.uri={mlflow_store(EXPERIMENT)}",
            f"tracking.experiment={EXPERIMENT}",
            *overrides,
        )

    return build


@pytest.fixture(scope="module")
def simulation(warm_ray, run_config):
    """The run every test of this module inspects (two actors)."""
    cfg = run_config("resources.actors=2", "tracking.run_name=two-actors", "tracking.plots=true")
    return cfg, fedsim.run(cfg, executor=warm_ray)


@pytest.fixture(scope="module")
def mlflow_client(simulation) -> MlflowClient:
    cfg, _ = simulation
    return MlflowClient(tracking_uri=cfg.tracking.uri)


def test_run_is_finished_in_the_sqlite_store(simulation, mlflow_client):
    cfg, result = simulation
    assert result.tracking_uri == cfg.tracking.uri
    run = mlflow_client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert run.data.params["clients.num"] == "6"
    assert run.data.params["model.backbone"] == "tiny"


def test_ui_sees_a_training_run_with_its_data_and_system_metrics(simulation, mlflow_client):
    """The experiment is a training experiment, the run carries its tags and datasets, and
    the driver sampled this machine; the actors' node is the driver's, so the names carry no
    node label (two nodes: tests/cluster/test_cluster.py)."""
    _, result = simulation
    run = mlflow_client.get_run(result.run_id)
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["fedsim.merge"] == "fedilora"
    contexts = {i.dataset.name: i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"emoji-train": "train", "emoji-test": "test"}
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    assert all(k.count("/") == 1 for k in system), system


def test_history_has_rounds_0_to_final(simulation):
    _, result = simulation
    assert [h["round"] for h in result.history] == list(range(ROUNDS + 1))
    assert result.final is result.history[-1]
    assert result.clients[0] == []
    assert all(len(rows) == 3 for rows in result.clients[1:])


EVERY_ROUND = ["global/accuracy", "global/macro_f1", "global/loss", "time/round_s"]
TRAINING_ROUNDS = [
    "personalized/accuracy_mean",
    "personalized/accuracy_std",
    "personalized/accuracy_min",
    "personalized/macro_f1_mean",
    "train/loss_mean",
    "comm/upload_bytes",
    "comm/download_bytes",
    "clients/sampled",
    "clients/rejected",
    "clients/failed",
    "time/aggregate_s",
    "editing/edited_tensors",
]


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.parametrize("key", EVERY_ROUND + TRAINING_ROUNDS)
def test_metric_history_is_logged_per_round(simulation, mlflow_client, key):
    _, result = simulation
    history = _history(mlflow_client, result.run_id, key)
    first = 0 if key in EVERY_ROUND else 1
    assert sorted(history) == list(range(first, ROUNDS + 1))
    for step, value in history.items():
        assert value == pytest.approx(result.history[step][key])
        assert math.isfinite(value)


def test_metric_values_are_in_range(simulation):
    cfg, result = simulation
    per_round = len(sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, 1))
    for h in result.history:
        assert 0.0 <= h["global/accuracy"] <= 1.0
        assert 0.0 <= h["global/macro_f1"] <= 1.0
        assert h["global/loss"] > 0
        assert h["time/round_s"] > 0
    for h in result.history[1:]:
        assert 0.0 <= h["personalized/accuracy_min"] <= h["personalized/accuracy_mean"] <= 1.0
        assert 0.0 <= h["personalized/accuracy_std"] <= 0.5
        assert h["train/loss_mean"] > 0
        assert h["comm/upload_bytes"] > 0 and h["comm/download_bytes"] > 0
        assert h["clients/sampled"] == per_round
        assert h["clients/failed"] == 0


def test_nan_client_is_rejected_and_logged(simulation, mlflow_client, nan_client, tmp_path):
    cfg, result = simulation
    rejected = _history(mlflow_client, result.run_id, "clients/rejected")
    for t in range(1, ROUNDS + 1):
        sampled = sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, t)
        assert rejected[t] == (1 if nan_client in sampled else 0)
    assert rejected[1] == 1

    path = mlflow_client.download_artifacts(result.run_id, "clients/round_0001.json", tmp_path)
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    status = {row["client_id"]: row["status"] for row in rows}
    assert sorted(status) == sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, 1)
    assert status[nan_client].startswith("rejected")
    assert "NaN" in status[nan_client]
    assert all(s == "ok" for cid, s in status.items() if cid != nan_client)
    assert [r["status"] for r in result.clients[1]] == [status[c] for c in sorted(status)]


def test_config_artifact_reloads_to_the_same_config(simulation, mlflow_client, tmp_path):
    cfg, result = simulation
    path = mlflow_client.download_artifacts(result.run_id, "config.yaml", tmp_path)
    assert load_config(path) == cfg


def test_plots_are_logged(simulation, mlflow_client):
    _, result = simulation
    names = {a.path for a in mlflow_client.list_artifacts(result.run_id, "plots")}
    assert "plots/curves.png" in names
    # editing (on by default) compared the round-2 updates: its method adds its histogram
    assert any(
        r.get("min_similarity", float("nan")) == r.get("min_similarity") for r in result.clients[2]
    )
    assert "plots/editing_similarity.png" in names


@pytest.fixture(scope="module")
def global_adapter(simulation, mlflow_client, tmp_path_factory) -> Path:
    _, result = simulation
    dst = tmp_path_factory.mktemp("adapter")
    return Path(mlflow_client.download_artifacts(result.run_id, "global_adapter", dst))


# peft looks for the base model's config under base_model_name_or_path ("tiny"): harmless.
@pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")
def test_global_adapter_loads_with_peft(simulation, global_adapter):
    cfg, _ = simulation
    assert (global_adapter / "adapter_config.json").is_file()
    assert (global_adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((global_adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    saved = load_file(str(global_adapter / "adapter_model.safetensors"))

    base = build_backbone(cfg.model, 9, cfg.seed).model
    model = PeftModel.from_pretrained(base, str(global_adapter))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved)
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")
def test_saved_adapter_reproduces_the_final_global_accuracy(simulation, global_adapter):
    cfg, result = simulation
    data = FederatedData(cfg, load_dataset(cfg))
    backbone = build_backbone(cfg.model, data.num_classes, cfg.seed)
    model = PeftModel.from_pretrained(backbone.model, str(global_adapter))
    batcher = Batcher(
        data.dataset, backbone.tokenizer, cfg.data.max_text_tokens, cfg.data.text_placeholder
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the client actors (resources.client.num_cpus=1)
    try:
        y, p, losses, _ = predict(model, batcher.iterate(data.test, cfg.train.eval_batch_size))
    finally:
        torch.set_num_threads(threads)
    metrics = classification_metrics(y, p, losses)
    assert metrics["accuracy"] == result.final["global/accuracy"]
    assert metrics["loss"] == pytest.approx(result.final["global/loss"], rel=1e-5)


def _quality(history: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in h.items() if k.startswith(("global/", "personalized/"))} for h in history
    ]


def test_one_actor_gives_the_same_numbers_as_two(simulation, run_config, warm_ray):
    _, two = simulation
    one = fedsim.run(
        run_config("resources.actors=1", "tracking.run_name=one-actor"), executor=warm_ray
    )
    assert one.run_id != two.run_id
    assert _quality(one.history) == _quality(two.history)
    assert [h["clients/rejected"] for h in one.history[1:]] == [
        h["clients/rejected"] for h in two.history[1:]
    ]
    assert np.isfinite([h["global/loss"] for h in one.history]).all()


# The two config errors below are the driver's checks: in this process (no Ray needed).
def test_ranks_above_the_backbone_raise_config_error(make_config, mlflow_store, restore_threads):
    uri = mlflow_store("fedsim-bad-ranks")
    cfg = make_config(
        "clients.ranks=[32,8,4,4,2,2]",
        "resources.actors=1",
        f"tracking.uri={uri}",
        "tracking.experiment=fedsim-bad-ranks",
    )
    with pytest.raises(ConfigError) as info:
        fedsim.run(cfg, executor=LocalExecutor())
    assert info.value.key == "clients.ranks"
    assert "32" in str(info.value)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedsim-bad-ranks")
    assert client.search_runs([experiment.experiment_id]) == []


def test_impossible_partition_raises_config_error(make_config, mlflow_store, restore_threads):
    uri = mlflow_store("fedsim-bad-partition")
    cfg = make_config(
        "data.subset=40",  # 32 training rows for 6 clients of at least 10
        "data.min_per_client=10",
        "resources.actors=1",
        "resources.max_retries=0",
        f"tracking.uri={uri}",
        "tracking.experiment=fedsim-bad-partition",
    )
    with pytest.raises(ConfigError) as info:
        fedsim.run(cfg, executor=LocalExecutor())
    assert info.value.key in ("data.min_per_client", "data.subset")
