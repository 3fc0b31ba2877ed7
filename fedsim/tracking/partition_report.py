"""``fedsim partition``: what each client holds under a config, as a table and a heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.config import FedSimConfig, resolve_ranks
from fedsim.data.federated import FederatedData, load_dataset
from fedsim.data.partition import ModalityMask


def client_rows(cfg: FedSimConfig, data: FederatedData) -> list[dict]:
    """One dict per client: rank, sample counts, label histogram and modality counts."""
    ranks = resolve_ranks(cfg.clients, cfg.seed)
    labels = data.dataset.labels.numpy()
    k = data.num_classes
    rows = []
    for c in data.clients:
        rows_all = np.concatenate([c.train.rows, c.holdout.rows])
        mask = ModalityMask(
            np.concatenate([c.train.mask.image, c.holdout.mask.image]),
            np.concatenate([c.train.mask.text, c.holdout.mask.text]),
        )
        rows.append(
            {
                "client": c.client_id,
                "rank": ranks[c.client_id],
                "train": len(c.train),
                "holdout": len(c.holdout),
                "labels": np.bincount(labels[rows_all], minlength=k).tolist(),
                **mask.counts(),
            }
        )
    return rows


def print_table(cfg: FedSimConfig, data: FederatedData, rows: list[dict]) -> None:
    """Print the per-client table (rich)."""
    from rich.console import Console
    from rich.table import Table

    d = cfg.data
    table = Table(
        title=f"{cfg.clients.num} clients, {d.dataset} ({len(data.dataset)} rows, "
        f"{data.num_classes} classes), alpha={d.alpha}, scenario={d.scenario}, "
        f"global test {len(data.test)} rows"
    )
    for col in ("client", "rank", "train", "holdout", "both", "image only", "text only"):
        table.add_column(col, justify="right")
    table.add_column("neither", justify="right")
    table.add_column("labels (count per class)", justify="left", no_wrap=True)
    for r in rows:
        table.add_row(
            *map(str, (r["client"], r["rank"], r["train"], r["holdout"], r["both"])),
            str(r["image_only"]),
            str(r["text_only"]),
            str(r["neither"]),
            " ".join(map(str, r["labels"])),
        )
    console = Console(width=None if Console().is_terminal else 160)
    console.print(table)
    classes = ", ".join(f"{i}={c}" for i, c in enumerate(data.dataset.classes))
    console.print(f"classes: {classes}")


def heatmap_figure(data: FederatedData, rows: list[dict]):
    """A heat map of the label split: clients x classes, sample counts (a matplotlib figure;
    its height stops growing at 60 clients, the rows then thin out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = np.array([r["labels"] for r in rows])  # (clients, classes)
    height = 1 + 0.35 * min(counts.shape[0], 60)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * counts.shape[1], height))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(counts.shape[1]), data.dataset.classes, rotation=45, ha="right")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("client")
    ax.set_title("label split (samples per client and class)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def save_heatmap(data: FederatedData, rows: list[dict], path: str | Path) -> Path:
    """Write :func:`heatmap_figure` as a PNG to ``path``."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(data, rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def partition_report(cfg: FedSimConfig, heatmap: str | None = None) -> list[dict]:
    """Build the split of ``cfg``, print its table, optionally save the heat map.

    Raises:
        ConfigError: the split cannot be made, or the heat map's directory is not writable.
    """
    if heatmap:
        from fedsim.tracking.store import check_writable_dir

        check_writable_dir(Path(heatmap).expanduser().parent, "--heatmap")
    from fedsim.tasks.context import fit_rows

    # without the rows a run leaves out as longer than a generative model's context
    data = FederatedData(cfg, fit_rows(cfg, load_dataset(cfg)))
    rows = client_rows(cfg, data)
    print_table(cfg, data, rows)
    if heatmap:
        print(f"heat map written to {save_heatmap(data, rows, heatmap)}")
    return rows
