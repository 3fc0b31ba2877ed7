"""What a round logs: its metrics and its client table, from the clients' reports.

The methods add their own metrics and columns through their round-loop hooks
(:meth:`fedsim.methods.base.Method.round_metrics`, ``client_columns``).
"""

from __future__ import annotations

import numpy as np

from aggregation.diagnostics import band_metrics, energy_metrics
from fedsim.messages import AggregateReport, ClientReport
from fedsim.methods.base import Method
from fedsim.tasks import combine_parts
from fedsim.tasks.evaluation import summarize


def global_metrics(outcome) -> tuple[dict[str, float], list[dict]]:
    """``global/*`` metrics and example rows from the shards of a global evaluation."""
    # shards in shard order; combine_parts skips the empty ones of a pool larger than the set
    metrics, examples = combine_parts([v for _, v in sorted(outcome.values.items())])
    return {f"global/{k}": v for k, v in metrics.items()}, examples


def round_metrics(
    methods: list[Method],
    used: list[ClientReport],
    finished: list[ClientReport],
    rejected: dict[int, str],
    failed: dict,
    late: list,
) -> dict:
    """Metrics of one round: ``used`` reports were merged, ``finished`` includes late ones."""
    ok = [r for r in used if r.client_id not in rejected]
    m: dict[str, float] = {
        "clients/sampled": len(finished) + len(failed),
        "clients/failed": len(failed),
        "clients/late": len(late),
        "clients/rejected": len(rejected),
        # every client that finished training downloaded the broadcast and uploaded its update
        "comm/upload_bytes": sum(r.upload_bytes for r in finished),
        "comm/download_bytes": sum(r.download_bytes for r in finished),
    }
    if ok:
        # AUC is undefined on a held-out split with one class: summarise the clients that have it
        names = dict.fromkeys(k for r in ok for k in r.personalized)
        for metric in names:
            stats = summarize([r.personalized[metric] for r in ok if metric in r.personalized])
            for stat, value in stats.items():
                m[f"personalized/{metric}_{stat}"] = value
        m["train/loss_mean"] = float(np.mean([r.train_loss for r in ok]))
    for method in methods:
        m.update(method.round_metrics(used))
    return m


def merge_metrics(agg: AggregateReport, rank_levels: list[int]) -> dict[str, float]:
    """The server's metrics of a round's merge, plus the merge diagnostics per rank band
    (``merge/band_LO-HI/*``), the largest client share and the global adapter's energy share
    per rank band (``merge/energy_share_band_LO-HI``, ``merge/rank_collapse``), when the run
    keeps them."""
    m = dict(agg.metrics)
    if agg.diagnostics is not None:
        m.update(band_metrics(agg.diagnostics, rank_levels))
        shares = [c["share"] for c in agg.columns.values() if "share" in c]
        m["merge/max_share"] = max(shares, default=0.0)
        m.update(energy_metrics(agg.diagnostics.get("energy")))
    return m


def totals_metrics(totals, metrics: dict, simulated_s: float, aggregate_s: float) -> dict:
    """Add the round's bytes and simulated seconds (from ``metrics`` and the round's close)
    to the run's ``totals``; the running totals and the round's times as metrics."""
    totals.upload_bytes += metrics["comm/upload_bytes"]
    totals.download_bytes += metrics["comm/download_bytes"]
    totals.simulated_s += simulated_s
    return {
        "comm/upload_bytes_total": totals.upload_bytes,
        "comm/download_bytes_total": totals.download_bytes,
        "time/simulated_round_s": simulated_s,
        "time/simulated_total_s": totals.simulated_s,
        "time/aggregate_s": aggregate_s,
    }


def client_rows(
    methods: list[Method],
    reports: list[ClientReport],
    status: dict[int, str],
    sim_s: dict[int, float],
    profiles: list,
    server_columns: dict[int, dict] | None = None,
) -> list[dict]:
    """The round's client table: one row per client that finished (with the methods' client
    and server columns), then one per failed client."""
    server_columns = server_columns or {}
    rows = []
    for r in sorted(reports, key=lambda r: r.client_id):
        cid = r.client_id
        row = {
            "client_id": cid,
            "rank": r.rank,
            "num_samples": r.num_samples,
            "steps": r.steps,
            "train_loss": r.train_loss,
            **{f"personalized_{k}": v for k, v in r.personalized.items()},
        }
        for method in methods:
            row.update(method.client_columns(r))
        row.update(server_columns.get(cid, {}))
        row.update(
            {
                "time_s": r.time_s,
                "simulated_s": sim_s[cid],
                "device": profiles[cid][0],
                "node_id": r.node_id,
                "status": status.get(cid, "ok"),
            }
        )
        rows.append(row)
    for cid, reason in sorted(status.items()):
        if reason.startswith("failed"):
            rows.append({"client_id": cid, "device": profiles[cid][0], "status": reason})
    return rows
