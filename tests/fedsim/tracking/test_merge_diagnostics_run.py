"""The merge diagnostics in a run (issue 16): what each round logs (metrics, client columns,
per-dimension artifact), the plot, ``fedsim inspect``, and that they change no number.

In-process runs of the tiny config on real SQLite stores in temp dirs (the Ray path logs the
same through the same driver: tests/fedsim/simulation/test_resume.py compares a resumed Ray run's
diagnostics with an uninterrupted one's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from fedsim.cli import main
from fedsim.tracking.merge_report import inspect_run

pytestmark = pytest.mark.usefixtures("restore_threads")
RANKS = [8, 8, 4, 4, 2, 2]


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_mlflow_db) -> str:
    return new_mlflow_db(tmp_path_factory.mktemp("diag"))


@pytest.fixture(scope="module")
def run(make_config, store):
    return _tiny_run(make_config, store, "tracking.plots=true")


def _tiny_run(make_config, store, *overrides):
    cfg = make_config(f"tracking.uri={store}", "tracking.experiment=diag", "rounds=3", *overrides)
    return fedsim.run(cfg, executor=LocalExecutor())


def _timeless(history):
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]


def test_every_merged_round_logs_its_diagnostics(run, store, tmp_path):
    assert [m["round"] for m in run.merge] == [1, 2, 3]
    client = MlflowClient(store)
    for t, (h, rows, dims) in enumerate(zip(run.history[1:], run.clients[1:], run.merge), 1):
        merged = [r for r in rows if r["status"] == "ok"]
        ranks = [r["rank"] for r in merged]
        # coverage of dimension j: the merged clients whose rank exceeds j
        assert dims["coverage"] == [sum(r > j for r in ranks) for j in range(8)]
        assert dims["weight"] == [
            float(sum(r["num_samples"] for r in merged if r["rank"] > j)) for j in range(8)
        ]
        assert dims["merge_weight"][: max(ranks)] == pytest.approx([1.0] * max(ranks))
        assert sum(r["share"] for r in merged) == pytest.approx(1.0)
        assert all(r["contribution_top"] <= r["contribution"] + 1e-12 for r in merged)
        assert h["merge/max_share"] == max(r["share"] for r in merged)
        # band metrics: the federation's ranks 2, 4, 8 make three bands
        norms = dims["update_norm"]
        assert h["merge/band_04-08/update_norm"] == pytest.approx(
            sum(v * v for v in norms[4:8]) ** 0.5
        )
        assert h["merge/band_00-02/coverage"] == dims["coverage"][0]
        logged = client.download_artifacts(run.run_id, f"merge/round_{t:04d}.json", str(tmp_path))
        assert json.loads(Path(logged).read_text()) == dims
    metrics = client.get_run(run.run_id).data.metrics
    assert {"merge/band_00-02/weight", "merge/band_02-04/update_norm"} <= set(metrics)
    assert "plots/merge.png" in {a.path for a in client.list_artifacts(run.run_id, "plots")}


def test_diagnostics_change_no_number_and_can_be_turned_off(make_config, store, run):
    off = _tiny_run(make_config, store, "tracking.merge_diagnostics=false")
    assert off.merge == []
    on = [{k: v for k, v in h.items() if not k.startswith("merge/")} for h in run.history]
    assert _timeless(off.history) == _timeless(on)
    client = MlflowClient(store)
    assert not [k for k in client.get_run(off.run_id).data.metrics if k.startswith("merge/")]
    assert not client.list_artifacts(off.run_id, "merge")
    assert "contribution" not in off.clients[1][0]
    with pytest.raises(fedsim.ConfigError, match="no merge diagnostics for round 1"):
        inspect_run(off.run_id, 1, store)


def test_streaming_and_batch_merges_give_the_same_diagnostics(make_config, store, run):
    batch = _tiny_run(make_config, store, "aggregation.streaming=false")
    for a, b in zip(batch.merge, run.merge):
        assert a["coverage"] == b["coverage"] and a["weight"] == b["weight"]
        assert a["update_norm"] == pytest.approx(b["update_norm"], rel=1e-4)
    for ra, rb in zip(batch.clients[1:], run.clients[1:]):
        for x, y in zip(ra, rb):
            assert x["share"] == pytest.approx(y["share"], rel=1e-4)


def test_inspect_prints_the_rounds_clients_labels_and_shares(run, store, capsys):
    assert main(["inspect", run.run_id, "--round", "2", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "round 2" in out and run.run_id in out
    merged = [r for r in run.clients[2] if r["status"] == "ok"]
    for r in merged:
        assert f"{r['share']:.1%}" in out
    assert "classes)" in out  # the labels each client holds, from data/clients.json
    assert out.count("merge per dimension band (aggregation.method=fedilora)") == 1  # once
    # without --round: the round whose global accuracy dropped most, else the last
    text = inspect_run(run.run_id, None, store)
    accs = [h["global/accuracy"] for h in run.history]
    drops = [(accs[t - 1] - accs[t], t) for t in range(1, len(accs)) if accs[t - 1] > accs[t]]
    assert f"round {max(drops)[1] if drops else 3}" in text


def test_inspect_names_what_is_missing(run, store, tmp_path, capsys):
    assert main(["inspect", run.run_id, "--round", "7", "--tracking-uri", store]) == 2
    assert "rounds with diagnostics: 1-3" in capsys.readouterr().err
    assert main(["inspect", "nosuchrun", "--tracking-uri", store]) == 2
    assert "no run 'nosuchrun'" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["inspect", run.run_id, "--tracking-uri", missing]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
