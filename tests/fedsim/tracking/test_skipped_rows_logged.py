"""Rows that ``data.on_error=skip`` leaves out reach MLflow: a metric and a table, not only
stdout."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import fedsim
from actors.executor import LocalExecutor

EXPERIMENT = "fedsim-skipped-rows"


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_skipped_rows_are_a_metric_and_a_table(
    make_config, mlflow_store, tmp_path, restore_threads
):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 30), (200, 40, 90)).save(tmp_path / "img" / "a.png")
    rows = [{"id": i, "img": "img/a.png", "label": i % 2, "text": f"meme {i}"} for i in range(24)]
    train = [json.dumps(r) for r in rows]
    train[3] = '{"id": 3, "img": "../../etc/passwd", "label": 1, "text": "escape"}'
    train[7] = "[" * 10_000
    (tmp_path / "train.jsonl").write_text("\n".join(train) + "\n")
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    uri = mlflow_store(EXPERIMENT)
    cfg = make_config(
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        "data.dataset=hateful_memes",
        f"data.root={tmp_path}",
        "data.on_error=skip",
        "data.subset=null",
        "data.min_per_client=4",
        "clients.num=2",
        "clients.ranks=[4,4]",
        "clients.fraction=1",
        "rounds=1",
        "tracking.save_adapter=false",
        "tracking.plots=false",
    )
    result = fedsim.run(cfg, executor=LocalExecutor())
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["data/skipped_rows"] == 2
    path = client.download_artifacts(result.run_id, "data/skipped_rows.json", str(tmp_path))
    table = json.loads(open(path).read())
    got = dict(zip(table["columns"], zip(*table["data"])))
    assert got["row"] == (4, 8)
    assert set(got["file"]) == {"train.jsonl"} or all(
        f.endswith("train.jsonl") for f in got["file"]
    )
    assert "outside data.root" in got["reason"][0]
