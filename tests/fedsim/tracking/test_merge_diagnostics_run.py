"""The merge diagnostics in a run (issue 16): what each round logs (metrics, client columns,
per-dimension artifact), the plot, ``fedsim inspect``, and that they change no number.

In-process runs of the tiny config on real SQLite stores in temp dirs (the Ray path logs the
same through the same driver: tests/fedsim/simulation/test_resume.py compares a resumed Ray run's
diagnostics with an uninterrupted one's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from fedsim.checkpoint.disk import load_checkpoint
from fedsim.cli import main
from fedsim.tracking.merge_report import ENERGY_TITLE, inspect_run, merge_figure

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


def _dense_band_shares(a, b, bands: list[tuple[int, int]]) -> tuple[float, list[float]]:
    """A module's energy and its shares per band from numpy's SVD of the dense ``B @ A``."""
    a = a.double().reshape(a.shape[0], -1).numpy()
    b = b.double().reshape(b.shape[0], b.shape[1]).numpy()
    sq = [float(s) ** 2 for s in np.linalg.svd(b @ a, compute_uv=False)]
    energy = [sum(sq[j - 1] for j in range(lo, hi + 1) if j <= len(sq)) for lo, hi in bands]
    return sum(energy), [e / sum(energy) for e in energy]


def test_energy_share_per_rank_band_is_logged_each_round(run, store, tmp_path):
    bands = [(1, 2), (3, 4), (5, 8)]  # the federation's ranks 2, 4, 8
    names = [f"merge/energy_share_band_{lo}-{hi}" for lo, hi in bands]
    for h, dims in zip(run.history[1:], run.merge):
        energy = dims["energy"]
        assert energy["bands"] == ["1-2", "3-4", "5-8"]
        assert [h[n] for n in names] == energy["share"]
        assert h["merge/rank_collapse"] == energy["share"][0]
        assert sum(energy["share"]) == pytest.approx(1.0)
    assert "merge/rank_collapse" not in run.history[0]  # round 0 merges nothing
    # the last round's numbers against a dense SVD of the checkpointed global adapter
    glob = load_checkpoint(run.run_dir).server["global"]
    energy = run.merge[-1]["energy"]
    totals = [0.0] * len(bands)
    for key, a in glob.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        total, shares = _dense_band_shares(a, glob[f"{module}.lora_B.weight"], bands)
        got = energy["modules"][module]
        assert got["energy"] == pytest.approx(total, rel=1e-6)
        assert got["share"] == pytest.approx(shares, rel=1e-6, abs=1e-9)
        totals = [t + total * s for t, s in zip(totals, shares)]
    assert len(energy["modules"]) > 1
    assert energy["share"] == pytest.approx([t / sum(totals) for t in totals], rel=1e-6)
    # in MLflow, one value per merged round
    client = MlflowClient(store)
    logged = client.get_metric_history(run.run_id, "merge/rank_collapse")
    assert sorted((m.step, m.value) for m in logged) == [
        (t, h["merge/rank_collapse"]) for t, h in enumerate(run.history[1:], 1)
    ]
    # plots/merge.png's energy panel: one curve per band over the rounds
    fig = merge_figure(run.history, run.merge)
    (panel,) = [ax for ax in fig.axes if ax.get_title() == ENERGY_TITLE]
    lines = panel.get_lines()
    assert [line.get_label() for line in lines] == ["1-2 (rank collapse)", "3-4", "5-8"]
    for line, name in zip(lines, names):
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == [h[name] for h in run.history[1:]]


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
        assert a["energy"]["share"] == pytest.approx(b["energy"]["share"], rel=1e-4, abs=1e-9)
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
    collapse = run.history[2]["merge/rank_collapse"]
    assert out.count("rank collapse: ") == 1
    assert (
        f"rank collapse: {collapse:.1%} of the global adapter's energy in rank dimensions 1-2"
        in out
    )
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
