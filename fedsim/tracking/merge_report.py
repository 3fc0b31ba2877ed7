"""The merge diagnostics of a run (docs/algorithms.md §1.9): the per-round artifact, the run's
heat map plot and ``fedsim inspect RUN_ID [--round T]``.

What the server computes each round (:mod:`aggregation.diagnostics`) reaches MLflow three ways:
``merge/band_LO-HI/*``, ``merge/max_share``, ``merge/energy_share_band_LO-HI`` and
``merge/rank_collapse`` metrics, the per-client columns ``contribution``,
``contribution_top``, ``share``, ``top_band`` of ``clients/round_NNNN.json``, and the
per-dimension vectors with the per-module energy shares in ``merge/round_NNNN.json``. At the
end of the run ``plots/merge.png`` shows rounds x rank dimensions (coverage, update norm), the
energy share per rank band over rounds and the global score. :func:`inspect_run` reads them
back from any MLflow store, only reading (:mod:`fedsim.tracking.reader`), each artifact checked
(:mod:`fedsim.tracking.merge_artifacts`).
"""

from __future__ import annotations

import io
import tempfile

import numpy as np

from fedsim.config.arguments import check_int, check_text
from fedsim.errors import ConfigError
from fedsim.tracking.merge_artifacts import merge_artifact, read_round
from fedsim.tracking.reader import read_table

__all__ = ["SCORES", "inspect_run", "merge_artifact", "merge_figure", "read_table"]

SCORES = (("global/accuracy", "global accuracy"), ("global/rouge_l", "global ROUGE-L"))


def _score(history: list[dict]) -> tuple[str, str] | None:
    for key, label in SCORES:
        if any(key in h for h in history):
            return key, label
    return None


ENERGY_TITLE = "share of the global adapter's energy per rank band"


def energy_curves(merge: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per rank band (``"LO-HI"``, in band order), the rounds that measured the global
    adapter's energy and its share in the band (docs/algorithms.md §6.1)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for m in merge:
        energy = m.get("energy")
        if not energy:
            continue
        for band, share in zip(energy["bands"], energy["share"]):
            rounds, shares = curves.setdefault(band, ([], []))
            rounds.append(m["round"])
            shares.append(share)
    return curves


def merge_figure(history: list[dict], merge: list[dict]):
    """Rounds x rank dimensions heat maps of coverage and of the global update's norm, the
    share of the global adapter's energy per rank band (the first band's is
    ``merge/rank_collapse``) when measured, and the global score per round below them, all on
    the same round axis (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    width = max(len(m["coverage"]) for m in merge)
    rounds = [m["round"] for m in merge]
    first, last = min(rounds + [h["round"] for h in history]), max(rounds)
    span = np.arange(first, last + 1)
    coverage = np.full((width, len(span)), np.nan)
    update = np.full((width, len(span)), np.nan)
    for m in merge:
        col = m["round"] - first
        coverage[: len(m["coverage"]), col] = m["coverage"]
        if "update_norm" in m:
            update[: len(m["update_norm"]), col] = m["update_norm"]
    curves = energy_curves(merge)
    heights = [3, 3, 2, 2] if curves else [3, 3, 2]
    fig, grid = plt.subplots(
        len(heights),
        2,
        figsize=(8, 8.5 + 2 * bool(curves)),
        gridspec_kw={"height_ratios": heights, "width_ratios": [40, 1]},
    )
    axes = grid[:, 0]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    extent = (first - 0.5, last + 0.5, width - 0.5, -0.5)
    for ax, bar, values, title, cmap in (
        (axes[0], grid[0, 1], coverage, "sampled clients covering the dimension", "viridis"),
        (axes[1], grid[1, 1], update, "norm of the global update per dimension", "magma"),
    ):
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, extent=extent)
        ax.set_ylabel("rank dimension j")
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelbottom=False)
        fig.colorbar(image, cax=bar)
    grid[0, 1].yaxis.set_major_locator(MaxNLocator(integer=True))
    for bar in grid[2:, 1]:
        bar.axis("off")
    if curves:
        ax = axes[2]
        for i, (band, (at, shares)) in enumerate(curves.items()):
            label = f"{band} (rank collapse)" if i == 0 else band
            ax.plot(at, shares, marker="o", label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("energy share")
        ax.set_title(ENERGY_TITLE, fontsize=10)
        ax.tick_params(labelbottom=False)
        ax.legend(title="dimensions", fontsize=8, title_fontsize=8, loc="best", framealpha=0.8)
        ax.grid(alpha=0.3)
    score = _score(history)
    ax = axes[-1]
    if score is not None:
        points = [(h["round"], h[score[0]]) for h in history if score[0] in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_ylabel(score[1])
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# -- fedsim inspect ------------------------------------------------------------------------------
def inspect_run(run_id: str, round_idx: int | None = None, tracking_uri: str | None = None):
    """The table of one round of a finished (or running) run: its clients, their ranks, the
    labels they hold and their contributions to the merge, and the merge per dimension band.

    The store is only read: a local one is checked read-only first, a server that does not
    answer fails after :data:`fedsim.tracking.store.REMOTE_TIMEOUT_S` seconds (see
    :mod:`fedsim.tracking.reader`), and each artifact read is checked.

    Args:
        run_id: the MLflow run id.
        round_idx: the round (default: the round whose global score dropped most; the last
            round if none dropped).
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ``mlflow.db``).

    Returns:
        The text to print.

    Raises:
        ConfigError: naming ``--tracking-uri`` (no store there, not an MLflow store, cannot
            be reached), ``RUN_ID`` (the store holds no such run), ``--round`` (no
            diagnostics for that round), an artifact's path (damaged), or an argument of the
            wrong type.
    """
    import os

    from fedsim.config import tracking_uri as resolve_uri
    from fedsim.tracking.reader import find_run, open_store, unreachable
    from fedsim.tracking.store import quick_http

    check_text(run_id, "run_id")
    check_int(round_idx, "round_idx", optional=True)
    check_text(tracking_uri, "tracking_uri", optional=True)
    uri = resolve_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = open_store(uri)
    with quick_http():
        run = find_run(client, uri, run_id)
        try:
            history = _score_history(client, run_id)
            if round_idx is None:
                round_idx = _worst_round(history) or _last_round(run)
            with tempfile.TemporaryDirectory(prefix="fedsim-inspect-") as where:
                found = read_round(client, run_id, round_idx, where)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store went away while it was read
            raise unreachable(uri, exc) from None
    return _render(run, round_idx, *found, history)


def _score_history(client, run_id: str) -> dict[int, float]:
    for key, _ in SCORES:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        if history:
            return history
    return {}


def _last_round(run) -> int:
    try:
        return int(run.data.params.get("rounds", 0) or 0)
    except ValueError:  # a param fedsim did not write
        return 0


def _labels(histogram: str, classes: list[str], top: int = 3) -> str:
    """A client's label mix: its ``top`` most frequent classes with their shares."""
    counts = np.array([int(v) for v in str(histogram).split()])
    total = counts.sum()
    if total == 0:
        return "-"
    order = np.argsort(-counts, kind="stable")[:top]
    parts = [
        f"{classes[i] if i < len(classes) else i} {counts[i] / total:.0%}"
        for i in order
        if counts[i]
    ]
    return f"{', '.join(parts)} ({int((counts > 0).sum())} classes)"


def _worst_round(history: dict[int, float]) -> int | None:
    steps = sorted(history)
    drops = [(history[a] - history[b], b) for a, b in zip(steps, steps[1:])]
    drops = [d for d in drops if d[0] > 0]
    return max(drops)[1] if drops else None


def _render(run, t, rows, clients, classes, dims, history) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=170, file=io.StringIO())  # only the export prints
    title = f"run {run.info.run_name or run.info.run_id} ({run.info.run_id}), round {t}"
    score_now, score_before = history.get(t), history.get(t - 1)
    if score_now is not None:
        change = (
            "" if score_before is None else f" ({score_now - score_before:+.3f} vs round {t - 1})"
        )
        title += f": global score {score_now:.3f}{change}"
    table = Table(title=title, title_justify="left")
    for name in (
        "client",
        "rank",
        "n",
        "top band",
        "labels it holds",
        "contribution",
        "on its top band",
        "share",
        "status",
    ):
        table.add_column(name, justify="left" if name in ("labels it holds", "status") else "right")
    for r in sorted(rows, key=lambda r: -(r.get("share") or 0)):
        cid = r["client_id"]
        info = clients.get(cid, {})
        share = r.get("share")
        table.add_row(
            str(cid),
            str(r.get("rank", "")),
            str(r.get("num_samples", "")),
            str(r.get("top_band") or "-"),
            _labels(info["labels"], classes) if "labels" in info else "-",
            "-" if r.get("contribution") is None else f"{r['contribution']:.4f}",
            "-" if r.get("contribution_top") is None else f"{r['contribution_top']:.4f}",
            "-" if share is None else f"{share:.1%}",
            str(r.get("status", "ok")),
        )
    console.print(table)
    merge = run.data.tags.get("fedsim.merge", "?")
    bands = Table(
        title=f"merge per dimension band (aggregation.method={merge})",
        title_justify="left",
    )
    for name in ("dimensions", "clients covering", "their samples", "merge weight", "update norm"):
        bands.add_column(name, justify="right")
    width = len(dims["coverage"])
    # runs of dimensions held by the same number of clients with the same samples (the rank
    # bands when clients hold leading dimensions; shorter runs under Fed-PLoRA's random modules)
    held = list(zip(dims["coverage"], dims["weight"]))
    edges = [0] + [j for j in range(1, width) if held[j] != held[j - 1]] + [width]
    for lo, hi in zip(edges, edges[1:]):
        update = dims.get("update_norm")
        norm = "-" if update is None else f"{sum(v * v for v in update[lo:hi]) ** 0.5:.4f}"
        bands.add_row(
            f"{lo}-{hi - 1}",
            str(dims["coverage"][lo]),
            f"{dims['weight'][lo]:.0f}",
            f"{sum(dims['merge_weight'][lo:hi]) / (hi - lo):.3f}",
            norm,
        )
    console.print(bands)
    line = energy_line(dims.get("energy"))
    if line:
        console.print(line, highlight=False, markup=False)
    return console.export_text()


def energy_line(energy: dict | None) -> str | None:
    """``fedsim inspect``'s line on the global adapter's energy per rank band
    (docs/algorithms.md §6.1), or None when the round did not measure it."""
    if not energy:
        return None
    parts = ", ".join(f"{b} {v:.1%}" for b, v in zip(energy["bands"], energy["share"]))
    return (
        f"rank collapse: {energy['share'][0]:.1%} of the global adapter's energy in rank "
        f"dimensions {energy['bands'][0]} (share per rank band: {parts})"
    )
